"""PNG charts of recorded timelines (matplotlib): memory over time with step markers and the peak named,
and, for group-granularity timelines, each group's peak measured beside the plan's prediction."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ...features.profiler import Timeline

MIB = 1024**2
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd")


def _positions(events: Sequence) -> list[float]:
    """x of each event: step k's events spread over [k, k + 1) in order; the run's start at 0, its end
    after the last step."""
    ordinal, counts, index = -1, [], []
    for e in events:
        if e.kind == "step_start":
            ordinal += 1
            counts.append(0)
        if ordinal >= 0 and e.kind not in ("run_end",):
            counts[ordinal] += 1
        index.append(ordinal)
    xs, seen = [], [0] * len(counts)
    for e, k in zip(events, index):
        if k < 0:
            xs.append(0.0)
        elif e.kind == "run_end":
            xs.append(float(len(counts)))
        else:
            xs.append(k + seen[k] / counts[k])
            seen[k] += 1
    return xs


def plot(timelines: Sequence[Timeline], path: Path | str, title: str = "") -> Path:
    """Write one chart of ``timelines`` (each a line, labelled by its ``label``) to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not timelines:
        raise ValueError("timelines: expected at least one")
    with_groups = [t for t in timelines if t.group_peaks()]
    rows = 1 + (1 if with_groups else 0)
    fig, axes = plt.subplots(rows, 1, figsize=(10, 4.2 * rows), squeeze=False)
    ax = axes[0][0]
    for i, tl in enumerate(timelines):
        color = COLORS[i % len(COLORS)]
        events = tl.events
        xs = _positions(events)
        # Each event's peak is the most allocated since the previous one: a step line is the envelope.
        ys = [(e.peak - tl.baseline_bytes) / MIB for e in events]
        name = tl.label or f"run {i + 1}"
        ax.step(xs, ys, where="pre", color=color, label=f"{name}: peak {tl.activation_peak_bytes / MIB:.1f} MiB")
        peak_index = max(range(len(events)), key=lambda k: events[k].peak)
        peak = events[peak_index]
        where = f"step {peak.step}" + (f", {peak.name}" if peak.kind == "group" else "")
        ax.annotate(f"peak {tl.activation_peak_bytes / MIB:.1f} MiB\n{where}",
                    (xs[peak_index], (peak.peak - tl.baseline_bytes) / MIB),
                    xytext=(8, -4 - 26 * i), textcoords="offset points", fontsize=8, color=color,
                    arrowprops=dict(arrowstyle="-", color=color, lw=0.6))
        if tl.predicted_peak_bytes is not None:
            ax.axhline(tl.predicted_peak_bytes / MIB, color=color, ls="--", lw=0.8,
                       label=f"{name}: Streamline's predicted peak {tl.predicted_peak_bytes / MIB:.1f} MiB")
    steps = max(sum(1 for e in t.events if e.kind == "step_start") for t in timelines)
    for k in range(steps + 1):
        ax.axvline(k, color="#888888", alpha=0.25, lw=0.8)
    ax.set_xlabel("denoising step (each step's events spread evenly across it)")
    ax.set_ylabel("MiB above the start of the first step")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
    device = ", ".join(sorted({f"{t.device} ({t.source})" for t in timelines}))
    ax.set_title(title or f"Memory timeline on {device}", fontsize=10)
    if with_groups:
        gx = axes[1][0]
        width = 0.8 / (len(with_groups) + (1 if any(t.predicted_peak_bytes for t in with_groups) else 0))
        names: list[str] = []
        for tl in with_groups:
            for g in tl.group_peaks():
                if g not in names:
                    names.append(g)
        positions = range(len(names))
        offset = 0
        for i, tl in enumerate(with_groups):
            peaks = tl.group_peaks()
            gx.bar([p + offset * width for p in positions], [(peaks.get(n, {}).get("measured") or 0) / MIB for n in names],
                   width, color=COLORS[timelines.index(tl) % len(COLORS)], label=f"{tl.label or 'run'}: measured")
            offset += 1
            predicted = [(peaks.get(n, {}).get("predicted") or 0) / MIB for n in names]
            if any(predicted):
                gx.bar([p + offset * width for p in positions], predicted, width, color="#aaaaaa",
                       label=f"{tl.label or 'run'}: predicted by the plan")
                offset += 1
        gx.set_xticks([p + width * (offset - 1) / 2 for p in positions])
        gx.set_xticklabels(names, rotation=90, fontsize=6)
        gx.set_ylabel("group peak, MiB above the first step")
        gx.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
