"""Which ComfyUI hosts the host and browser suites run against: one answer for scripts/dev.sh, .ci/run and
tests/host/conftest.py.

In this order:

1. ``$COMFYUI_PATHS`` (colon-separated), else ``$COMFYUI_PATH``: what the caller asked for, as given.
2. The ComfyUI this pack sits in (``ComfyUI/custom_nodes/<pack>``), else ``~/comfy/ComfyUI``: where a
   user's ComfyUI is (``streamlined_core.host.comfyui.find_comfyui`` looks there too).
3. The reference hosts packed beside the repository, ``../shared/hosts/ComfyUI-<version>.tar.gz``
   (``$STREAMLINE_SHARED_HOSTS`` names another folder), each unpacked once into
   ``build/hosts/<version>/ComfyUI`` (writable, git-ignored: ComfyUI writes ``user/``, ``output/``,
   ``temp/`` beside itself) and unpacked again only when the tarball's sha256 differs from the one
   stamped there.

Standard library only (``.ci/run`` asks before the environment exists). As a command::

    python3 tests/hosts.py          # one host root a line on stdout; where they came from, or why
                                    # none, on stderr
    python3 tests/hosts.py --why    # that sentence alone on stdout; exit status 1 when no host was
                                    # found or a reference host is missing (the sentence names it)
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_HOSTS = REPO.parent / "shared" / "hosts"
UNPACKED = REPO / "build" / "hosts"
# The reference hosts (../shared/hosts/README.md): the newest tested ComfyUI and the floor.
REFERENCE = ("0.3.64", "0.3.52")
STAMP = ".tarball.sha256"


def is_comfyui(path: Path) -> bool:
    """True when ``path`` looks like a ComfyUI checkout (as ``streamlined_core.host.comfyui.is_comfyui``)."""
    return (path / "comfy" / "model_patcher.py").is_file() and (path / "main.py").is_file()


def version(root: Path) -> str:
    """The ComfyUI version a checkout states (``comfyui_version.py``), or ``unknown``."""
    try:
        m = re.search(r'^__version__ = "(.*)"', (Path(root) / "comfyui_version.py").read_text(), re.M)
    except OSError:
        m = None
    return m.group(1) if m else "unknown"


def shared_hosts_dir() -> Path:
    return Path(os.environ.get("STREAMLINE_SHARED_HOSTS") or SHARED_HOSTS)


def tarballs(folder: Path | None = None) -> dict[str, Path]:
    """``{version: tarball}`` for every ``ComfyUI-<version>.tar.gz`` in the shared hosts folder, newest first."""
    folder = shared_hosts_dir() if folder is None else folder
    found = {}
    for path in folder.glob("ComfyUI-*.tar.gz") if folder.is_dir() else ():
        found[path.name[len("ComfyUI-"):-len(".tar.gz")]] = path
    key = lambda v: tuple(int(p) if p.isdigit() else -1 for p in v.split("."))  # noqa: E731
    return dict(sorted(found.items(), key=lambda item: key(item[0]), reverse=True))


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def unpack(tarball: Path, target: Path, log=print) -> Path:
    """``target/ComfyUI`` from ``tarball``, unpacked unless ``target`` already holds it (same sha256)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".lock", "w") as lock:  # one unpacker at a time
        fcntl.flock(lock, fcntl.LOCK_EX)
        digest = sha256(tarball)
        stamp = target / STAMP
        root = target / "ComfyUI"
        if stamp.is_file() and stamp.read_text().strip() == digest and is_comfyui(root):
            return root
        log(f"hosts: unpacking {tarball} into {target}")
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
        try:
            with tarfile.open(tarball) as tar:
                if hasattr(tarfile, "data_filter"):
                    tar.extractall(partial, filter="data")
                else:  # Python without extraction filters: the tarball is our own
                    tar.extractall(partial)
        except (OSError, tarfile.TarError) as exc:
            shutil.rmtree(partial, ignore_errors=True)
            raise RuntimeError(f"{tarball} could not be unpacked: {' '.join(str(exc).split())}") from exc
        if not is_comfyui(partial / "ComfyUI"):
            shutil.rmtree(partial, ignore_errors=True)
            raise RuntimeError(f"{tarball} does not unpack to a ComfyUI/ folder with comfy/model_patcher.py and main.py")
        (partial / STAMP).write_text(digest + "\n")
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)
        return root


def find_hosts(log=None) -> tuple[list[Path], str, bool]:
    """Every ComfyUI host to test against, a sentence saying where they came from or why there is none, and
    whether that is complete: False when none was found, or when the reference hosts were looked for and
    some are missing (the sentence names them).

    ``log`` (default: stderr) hears about unpacking.
    """
    log = log or (lambda line: print(line, file=sys.stderr))
    paths = os.environ.get("COMFYUI_PATHS")
    if paths:
        roots = [Path(p).expanduser() for p in paths.split(":") if p]
        return roots, f"$COMFYUI_PATHS ({paths})", bool(roots)
    env = os.environ.get("COMFYUI_PATH")
    if env:
        return [Path(env).expanduser()], f"$COMFYUI_PATH ({env})", True
    looked = [REPO.parent.parent, Path.home() / "comfy" / "ComfyUI"]
    for path in looked:
        if is_comfyui(path):
            return [path.resolve()], f"the ComfyUI at {path.resolve()}", True
    folder = shared_hosts_dir()
    found = tarballs(folder)
    roots = [unpack(tarball, UNPACKED / v, log) for v, tarball in found.items()]
    missing = [v for v in REFERENCE if v not in found]
    if missing:
        names = " and ".join(f"ComfyUI {v} ({folder / f'ComfyUI-{v}.tar.gz'})" for v in missing)
        where = "" if folder.is_dir() else f"; {folder} does not exist"
        why = (f"missing reference host{'s' if len(missing) > 1 else ''}: {names}{where}. No ComfyUI checkout either: "
               f"$COMFYUI_PATHS and $COMFYUI_PATH unset, none at {' or '.join(str(p) for p in looked)}")
        if roots:
            why = f"the reference hosts unpacked in {UNPACKED} ({', '.join(found)}); {why}"
        return roots, why, False
    return roots, f"the reference hosts {', '.join(found)} from {folder}, unpacked in {UNPACKED}", True


def main(argv: list[str]) -> int:
    try:
        roots, why, complete = find_hosts()
    except (OSError, RuntimeError, tarfile.TarError) as exc:
        roots, why, complete = [], f"no host: {' '.join(str(exc).split())}", False
    if "--why" in argv:
        print(why)
        return 0 if complete else 1
    print(f"hosts: {why}", file=sys.stderr)
    for root in roots:
        print(root)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
