"""Step Rehash's key steps: the paper's Algorithm 1 on a step-similarity map, the fixed positions
whose features the maps compare, a model's fingerprint, and the cut points it chooses among."""

from __future__ import annotations

import hashlib
import math
from typing import Hashable, Sequence

import torch
from torch import nn

# After the last up block's second attention: a reuse step recomputes only conv_in before its tail.
# Chosen by `streamline bench --rehash` on the fixture model (docs/step-rehash.md: Step Rehash against the field): at
# 13 of 25 key steps, the cut closest to full compute on calibration clips among those no dearer than
# DeepCache's that no other setting beats on both axes.
DEFAULT_CUT = "up0.1.attn"

# Candidates swept by calibration: the six boundaries of the last up block (the last replays the output).
LAST_UP_BLOCK = ("up0.0.res", "up0.0.attn", "up0.1.res", "up0.1.attn", "up0.2.res", "up0.2.attn")

DEFAULT_POSITIONS = 4096  # feature positions compared per sample, branch and step

DEFAULT_CALIBRATION_CAP = 512 * 2**20  # bytes of sampled features kept on the CPU during a calibration


def check_map(similarity: torch.Tensor, name: str = "similarity") -> torch.Tensor:
    if not isinstance(similarity, torch.Tensor) or similarity.dim() != 2 or similarity.shape[0] != similarity.shape[1]:
        shape = tuple(similarity.shape) if isinstance(similarity, torch.Tensor) else type(similarity).__name__
        raise ValueError(f"{name}: expected a square (steps, steps) map, got {shape}")
    if similarity.shape[0] < 1:
        raise ValueError(f"{name}: expected at least one step")
    if not torch.isfinite(similarity).all():
        raise ValueError(f"{name}: the map holds NaN or infinite values")
    return similarity.detach().double().cpu()


def key_steps_for_gamma(similarity: torch.Tensor, gamma: float) -> list[int]:
    """The paper's Algorithm 1: step 0 is key; a step whose similarity to the last key step is below
    ``gamma`` becomes key; the last step is key. ``similarity[i, j]``: step i's feature against step j's."""
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not math.isfinite(gamma):
        raise ValueError(f"gamma={gamma!r}: expected a number (a cosine similarity threshold, usually 0 to 1)")
    s = check_map(similarity)
    n = s.shape[0]
    keys, last = [0], 0
    for i in range(1, n):
        if s[last, i] < gamma:
            keys.append(i)
            last = i
    if keys[-1] != n - 1:
        keys.append(n - 1)
    return keys


def key_steps_for_count(similarity: torch.Tensor, count: int) -> tuple[list[int], float]:
    """Key steps by Algorithm 1 at the threshold whose key-step count is closest to ``count`` without
    exceeding it (the highest such threshold: the strictest reuse); returns the steps and the threshold."""
    s = check_map(similarity)
    n = s.shape[0]
    least = min(n, 2)
    if isinstance(count, bool) or not isinstance(count, int) or not least <= count:
        raise ValueError(f"count={count!r}: expected a whole number of key steps from {least} (the first and the last "
                         f"step) to {n} (every step)")
    # The walk changes only where gamma passes a similarity of the map: try every one, highest first, and
    # one just above the highest (every step key). The highest threshold of the best count is the strictest.
    values = sorted({float(v) for v in s[torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)]}, reverse=True)
    candidates = ([math.nextafter(values[0], math.inf)] if values else []) + values
    if not values:  # one step
        return [0], 1.0
    best: tuple[list[int], float] = ([], 0.0)  # the lowest similarity gives the least: the first and last step
    for gamma in candidates:
        keys = key_steps_for_gamma(s, gamma)
        if len(best[0]) < len(keys) <= count:
            best = (keys, gamma)
        if len(best[0]) == count:
            break
    return best


def interval_key_steps(steps: int, interval: int) -> list[int]:
    """Fixed-interval key steps (DeepCache's schedule): 0, k, 2k, ... and the last step."""
    keys = list(range(0, steps, interval))
    if keys[-1] != steps - 1:
        keys.append(steps - 1)
    return keys


def similarity_map(features: torch.Tensor) -> torch.Tensor:
    """Cosine similarity between every pair of steps, averaged over rows (samples and guidance branches).

    ``features``: (steps, rows, positions), each row one sample's or branch's sampled feature."""
    if features.dim() != 3:
        raise ValueError(f"features: expected (steps, rows, positions), got {tuple(features.shape)}")
    f = features.double()
    f = f / f.norm(dim=2, keepdim=True).clamp_min(1e-30)
    return torch.einsum("irp,jrp->ij", f, f) / f.shape[1]


class FeatureSampler:
    """Keeps, for each cut and each U-Net call of a step, a fixed random subset of every row's feature
    (the same positions for every step) on the CPU in fp32, under a byte cap.

    A row is one sample of the call's batch (a guidance branch of a CFG batch is a row of its own), with
    all its frames. Used as the ``reduce`` of a :class:`~streamlined_core.engine.stages.StageRequest`."""

    def __init__(self, cuts: Sequence[str], positions: int = DEFAULT_POSITIONS, seed: int = 0,
                 cap_bytes: int = DEFAULT_CALIBRATION_CAP) -> None:
        if isinstance(positions, bool) or not isinstance(positions, int) or positions < 1:
            raise ValueError(f"positions={positions!r}: expected a positive whole number of feature positions")
        self.cuts, self.positions, self.seed, self.cap_bytes = tuple(cuts), positions, seed, cap_bytes
        self._index: dict[tuple[str, int], torch.Tensor] = {}
        self.features: dict[tuple[str, Hashable], list[torch.Tensor]] = {}  # (cut, branch) -> one (rows, P) per step
        self.bytes = 0
        self.branch: Hashable = 0
        self.rows: dict[Hashable, int] = {}
        self.row_branches: Sequence[Hashable] | None = None  # set: each row of the call is a branch of its own

    def reduce(self, cut: str, h: torch.Tensor) -> None:
        rows = len(self.row_branches) if self.row_branches is not None else self.rows.get(self.branch)
        if rows is None:
            raise RuntimeError("FeatureSampler.rows: set the call's batch size (rows) before the call")
        flat = h.detach().reshape(rows, -1)
        n = flat.shape[1]
        index = self._index.get((cut, n))
        if index is None:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + n)
            index = torch.randperm(n, generator=g)[: self.positions].sort().values
            self._index[(cut, n)] = index
        kept = flat[:, index.to(flat.device)].float().cpu()
        self.bytes += kept.numel() * 4
        if self.bytes > self.cap_bytes:
            raise MemoryError(f"calibration: the sampled features exceed the cap of {self.cap_bytes / 2**20:.0f} MiB; "
                              f"lower positions= (now {self.positions}), the steps, or the number of cuts")
        if self.row_branches is None:
            self.features.setdefault((cut, self.branch), []).append(kept)
        else:  # a host that batches branches at some steps and runs them apart at others
            for b, row in zip(self.row_branches, kept.split(1)):
                self.features.setdefault((cut, b), []).append(row)

    def maps(self) -> dict[str, torch.Tensor]:
        """One (steps, steps) map per cut, averaged over every row of every branch."""
        out: dict[str, torch.Tensor] = {}
        for cut in self.cuts:
            per_branch = [torch.stack(v) for (c, _b), v in self.features.items() if c == cut]
            if not per_branch:
                continue
            steps = {f.shape[0] for f in per_branch}
            if len(steps) != 1:
                raise RuntimeError(f"calibration: branches saw different step counts at {cut}: {sorted(steps)}")
            out[cut] = similarity_map(torch.cat(per_branch, dim=1)).float()
        return out


def fingerprint(model: nn.Module, samples: int = 8) -> str:
    """A hash of the model's parameter and buffer names, shapes and a fixed sample of values (rounded to
    fp16, so fp16 and fp32 copies agree; a LoRA or a fine-tune changes it)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if t.device.type == "meta":
            raise ValueError(f"fingerprint: {name} is on the meta device; a schedule needs the loaded weights")
        h.update(name.encode())
        h.update(repr(tuple(t.shape)).encode())
        flat = t.detach().reshape(-1)
        if flat.numel():
            index = torch.linspace(0, flat.numel() - 1, min(samples, flat.numel())).round().long()
            h.update(flat[index.to(flat.device)].to(torch.float16).cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def default_count(steps: int) -> int:
    """The paper's share of key steps (13 of 25), scaled to ``steps``."""
    return min(steps, max(min(steps, 2), round(steps * 13 / 25)))


def step_ranges(steps: Sequence[int]) -> str:
    parts, start, prev = [], None, None
    for s in steps:
        if start is None:
            start = prev = s
        elif s == prev + 1:
            prev = s
        else:
            parts.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = prev = s
    if start is not None:
        parts.append(f"{start}" if start == prev else f"{start}-{prev}")
    return ", ".join(parts)
