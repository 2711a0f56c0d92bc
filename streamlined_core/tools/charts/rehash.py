"""A PNG of Step Rehash's calibration (matplotlib): each cut's step-similarity map, key steps marked."""

from __future__ import annotations

from pathlib import Path

from ...features.rehash import Calibration


def draw_maps(cal: Calibration, path: Path | str, gamma: float | None = None, count: int | None = None) -> Path:
    """One heatmap per cut (similarity of step i's feature to step j's), with Algorithm 1's key steps
    drawn as ticks on both axes and the walk's segments outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    cuts = list(cal.maps)
    cols = min(3, len(cuts))
    rows = (len(cuts) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.4 * rows), squeeze=False)
    low = min(float(m.min()) for m in cal.maps.values())
    image = None
    for ax, cut in zip(axes.flat, cuts):
        sched = cal.schedule(cut, gamma, count)
        image = ax.imshow(cal.maps[cut].numpy(), vmin=low, vmax=1.0, cmap="viridis", origin="upper")
        keys = sched.key_steps
        for a, b in zip(keys, keys[1:] + [cal.steps]):
            ax.add_patch(Rectangle((a - 0.5, a - 0.5), b - a, b - a, fill=False, edgecolor="white", linewidth=0.8))
        ax.set_xticks(keys)
        ax.set_yticks(keys)
        ax.tick_params(labelsize=6)
        ax.set_title(f"{cut}: {len(keys)} key steps, gamma {sched.gamma:.4f}", fontsize=8)
    for ax in list(axes.flat)[len(cuts):]:
        ax.axis("off")
    fig.suptitle(f"Step similarity (cosine) on the fixture model, {cal.steps} steps; boxes: reuse spans of each key step",
                 fontsize=9)
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8)
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
