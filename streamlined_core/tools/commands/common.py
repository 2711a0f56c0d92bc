"""What every ``streamline`` command shares: argument types, the stdout guard, output-path checks."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import logging
import os
import sys
from typing import Iterator, Sequence


def resolution(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH in pixels, e.g. 576x1024, got {text!r}") from None
    if h <= 0 or w <= 0 or h % 8 or w % 8:
        raise argparse.ArgumentTypeError(
            f"height and width must be positive multiples of 8 (the VAE's factor), got {text!r}"
        )
    return h, w

def positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return n

def non_negative(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text!r}")
    return n

def choices(accepted: Sequence[str]):
    def parse(text: str) -> list[str]:
        names = [t.strip().lower() for t in text.split(",") if t.strip()]
        bad = [n for n in names if n not in accepted]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(bad) or 'empty list'}: accepted values are {', '.join(accepted)}")
        return names

    return parse

@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Send everything written to stdout inside to stderr: ``print``, logging handlers bound to
    ``sys.stdout`` (AnimateDiff-Evolved's, when ComfyUI loads it) and writes to file descriptor 1
    (C extensions, child processes), so the command's stdout holds only its document."""
    stdout = sys.stdout
    stdout.flush()
    handlers = [(h, h.stream) for h in _stream_handlers() if h.stream is stdout or h.stream is sys.__stdout__]
    for h, _ in handlers:
        h.setStream(sys.stderr)
    saved = None
    try:
        saved = os.dup(1)
        os.dup2(2, 1)
    except OSError:  # no descriptor 1 or 2 (an embedding host): Python-level redirection only
        if saved is not None:
            os.close(saved)
            saved = None
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        for stream in (sys.__stdout__, stdout):  # bytes buffered for descriptor 1 belong to stderr
            with contextlib.suppress(Exception):
                stream.flush()
        if saved is not None:
            os.dup2(saved, 1)
            os.close(saved)
        for h, stream in handlers:
            if h.stream is sys.stderr:  # unless someone else rebound it meanwhile
                h.setStream(stream)

def _stream_handlers() -> list[logging.StreamHandler]:
    loggers = [logging.getLogger()]
    loggers += [lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)]
    return [h for lg in loggers for h in lg.handlers if isinstance(h, logging.StreamHandler)]

def unwritable(path: str) -> str | None:
    """Why ``--json-out PATH`` could not be written, before the device time is spent; None if it can."""
    target = os.path.abspath(path)
    folder = os.path.dirname(target)
    if os.path.isdir(target):
        return f"--json-out {path}: is a directory; give a file path"
    if not os.path.isdir(folder):
        return f"--json-out {path}: directory {folder} does not exist"
    if not os.access(folder, os.W_OK) or (os.path.exists(target) and not os.access(target, os.W_OK)):
        return f"--json-out {path}: not writable"
    return None


def missing_diffusers(what: str) -> str | None:
    """Why ``what`` cannot run (diffusers is not installed), or None when it can."""
    if importlib.util.find_spec("diffusers") is not None:
        return None
    return f"streamline: {what} needs diffusers: pip install 'comfyui-streamline[diffusers]'"
