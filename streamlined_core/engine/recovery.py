"""Out of memory inside a sliced call, recovered once.

When the device runs out of memory inside a call the engine slices (Streamline Model's U-Net calls,
Streamline VAE Decode's bands), the call runs again, once, at the least-memory plan, after what the
failed attempt held is freed, with the call's arguments as they came (an attempt pops the host's control
residuals and writes its options); the log says so, and so does the run's context
(``RunContext.recovered``: Streamline VAE Decode's text reports it). The output is the same: every plan
computes the same result. A second out-of-memory error is raised as the device's own error type, with a message that
names the budget input the user sees.
"""

from __future__ import annotations

import gc
import logging
from typing import Any, Callable

import torch

from .context import current
from .memory import size_text
from .plan import fresh_containers
from .slicing import Runner

log = logging.getLogger(__name__)


def free_device_cache() -> None:
    """What a failed attempt held, back to the device: Python's garbage, then the allocator's cached blocks."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def run_recovering(run: Callable[[Any], Any], first: Any, least: Callable[[], tuple[Any, str]], what: str,
                   budget_name: str) -> Any:
    """``run(first)``; on the device's out-of-memory error, ``run(plan)`` once with ``(plan, description) =
    least()``, the least-memory plan. ``what`` names the call for the log (the model and its input shape);
    ``budget_name`` is the input the user sets (``vram_budget_gb``, ``budget_bytes``)."""
    failed = None
    try:
        return run(first)
    except torch.OutOfMemoryError as e:
        failed = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'out of memory'}"
    # outside the handler: the traceback, and the tensors its frames hold, are gone before the retry
    free_device_cache()
    plan, described = least()
    message = (f"Streamline: out of memory in {what} ({failed}); retrying once at the least-memory plan: "
               f"{described}")
    log.warning(message)
    ctx = current()
    if ctx is not None:
        ctx.recovered.append(message)
    try:
        return run(plan)
    except torch.OutOfMemoryError as e:
        second = e
    free_device_cache()
    raise torch.OutOfMemoryError(
        f"Streamline: out of memory in {what} again at the least-memory plan ({described}); the memory this call "
        f"needs is not free on the device. Lower {budget_name} if it is set above what the card has free (0 plans "
        f"for what the host leaves free), free memory used by other programs, or use fewer frames or a smaller "
        f"size") from second


def streamlined_call(engine: Any, arguments: dict[str, Any], decide: Callable, listeners: list, request: Any) -> Any:
    """A ``Streamliner``'s sliced call: its adapter's forward under ``decide``; out of memory, once more at the
    least-memory plan for this call's arguments."""

    def least() -> tuple[Callable, str]:
        plan = engine.plan_within(arguments, 0, "out of memory: the least-memory plan")
        return plan.decide, f"{plan.describe()}, predicted activation peak {size_text(plan.predicted_peak_bytes)}"

    # the call's containers as they came (new dicts and lists, the same tensors): an attempt pops the host's
    # control residuals and writes its options, and a retry must start from what the first attempt got
    pristine = fresh_containers(arguments)

    def attempt(d: Callable) -> Any:
        given = arguments if d is decide else pristine  # the retry is the only call given the least plan
        return engine.adapter.forward(engine.unet, Runner(d, listeners, request), **given)

    what = f"{type(engine.unet).__name__} for input {tuple(arguments[engine.adapter.sample].shape)}"
    return run_recovering(attempt, decide, least, what, engine.budget_name)
