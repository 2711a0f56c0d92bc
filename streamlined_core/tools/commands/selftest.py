"""``streamline selftest [CHECK ...]``: property-based exactness, faults injected, out-of-memory recoveries, runs
repeated in a real server, bad inputs tried through it and compositions with other nodes, each counted (a
development command: it needs the test extras, hypothesis among them: ``pip install ".[test]"``)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .common import positive

# ComfyUI's attention flags: one process each (the host picks its attention function at import); the
# default process also runs the weight paths and the unrecognised forward
WORKER_TIMEOUT = 4 * 3600  # one ComfyUI process (the full profile's default backend: about an hour here)
CHECKS = ("exactness", "faults", "recoveries", "repeats", "bad-inputs", "compositions")
# the exactness self-test's architectures (selftest/archs.py DIFFUSERS, selftest/comfy.py), by key
ARCHS = ("diffusers-svd-unet", "diffusers-animatediff-unet", "diffusers-svd-vae", "diffusers-sd-vae",
         "comfyui-svd-unet", "comfyui-svd-vae", "comfyui-ade-unet", "comfyui-wan")
ARCHS_ENV = "STREAMLINE_SELFTEST_ARCHS"
BACKEND_FLAGS = {"default": "", "pytorch": "--use-pytorch-cross-attention", "split": "--use-split-cross-attention",
                 "sub-quadratic": "--use-quad-cross-attention"}


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the command's parser to ``sub`` (the ``streamline`` subparsers)."""
    p = sub.add_parser(
        "selftest",
        help="exactness over random tiny configurations, faults, out-of-memory recoveries, repeated runs, bad inputs "
             "and compositions, counted",
        description="exactness: hypothesis draws tiny configurations of diffusers' SVD and AnimateDiff U-Nets and "
        "VAE decoders and, with ComfyUI hosts, ComfyUI's SVD U-Net and VAE decoder under each attention backend its "
        "flags select on this machine, with fp16 and fp8 weights cast per call, partially loaded, and with a "
        "_forward the engine does not recognise; each example's sliced run is held to the host's own forward "
        "(fp32: 1e-5 of the output's magnitude; bf16 against fp32), and each category checks that streamline() "
        "restores the model. faults, recoveries, repeats, bad-inputs, compositions (per ComfyUI host, in a ComfyUI "
        "process and a real server of its own on the loopback address): errors and interrupts inside our nodes' runs, "
        "out-of-memory errors retried, 20 queued runs without growth, every node input missing, mistyped and beyond "
        "its edges, corrupt calibration files, our nodes chained with each other and with LoRA and FreeU patches. "
        "Prints the count and the failures per category; exits 1 if any failed. A development command: it needs the "
        "test extras (pip install \".[test]\").",
    )
    p.add_argument("check", nargs="*", default=[], metavar="CHECK",
                   help=f"what to test, any of {', '.join(CHECKS)} (default: all); every check but exactness needs a "
                        "ComfyUI host")
    p.add_argument("--profile", choices=["ci", "full"], default="ci",
                   help="examples per category: ci (10 per diffusers architecture, 3 per ComfyUI category) or full "
                        "(200 per diffusers architecture, 50 per ComfyUI category: 200 per ComfyUI architecture "
                        "across the four backends); default ci")
    p.add_argument("--examples", type=positive, default=None, metavar="N",
                   help="examples per category instead of the profile's")
    p.add_argument("--comfyui", action="append", default=None, metavar="PATH",
                   help="a ComfyUI checkout to test (repeatable; default: $COMFYUI_PATHS, colon-separated, else "
                        "$COMFYUI_PATH; none: the diffusers rows only)")
    p.add_argument("--backend", action="append", choices=list(BACKEND_FLAGS), default=None,
                   help="the ComfyUI attention backends to run (repeatable; default: all four; the weight paths and "
                        "the unrecognised forward run with the default one)")
    p.add_argument("--only", choices=["diffusers", "comfyui"], default=None, help="run one family of rows")
    p.add_argument("--arch", action="append", choices=ARCHS, default=None, metavar="KEY",
                   help=f"exactness: only the categories of these architectures (repeatable), among {', '.join(ARCHS)}")
    p.add_argument("--cases", default="", metavar="TEXT",
                   help="run only the faults, recoveries, bad inputs and compositions cases whose names contain TEXT "
                        "(case-insensitive; to rerun one failure)")
    p.add_argument("--runs", type=positive, default=None, metavar="N",
                   help="queued runs of the repeats check (default: 8 in the ci profile, 20 in full; growth is judged "
                        "from the third run on, so at least 4)")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    return p


def hosts(args: argparse.Namespace) -> list[str]:
    if args.comfyui:
        return args.comfyui
    paths = os.environ.get("COMFYUI_PATHS") or os.environ.get("COMFYUI_PATH") or ""
    return [p for p in paths.split(":") if p]


def run(args: argparse.Namespace) -> int:
    try:
        import hypothesis  # noqa: F401
    except ImportError:
        print("streamline selftest: needs hypothesis, a test dependency: pip install \".[test]\" from a clone",
              file=sys.stderr)
        return 2
    from ..selftest.exactness import PROFILES, run_category, wrong_variant

    unknown = [c for c in args.check if c not in CHECKS]
    if unknown:
        args.parser.error(f"CHECK {unknown[0]!r}: expected any of {', '.join(CHECKS)}")
    checks = args.check or list(CHECKS)
    if args.runs is not None and args.runs < 4:
        args.parser.error(f"--runs {args.runs}: growth is judged from the third run on; expected at least 4")
    reliability = [c.replace("-", " ") for c in CHECKS[1:] if c in checks]
    for root in hosts(args) if args.only != "diffusers" else []:
        if not (Path(root) / "comfy").is_dir():
            args.parser.error(f"--comfyui {root}: not a ComfyUI checkout (no comfy/ folder)")
    diffusers_n, comfy_n = PROFILES[args.profile]
    if args.examples:
        diffusers_n = comfy_n = args.examples
    rows: list[dict] = []
    categories: list[dict] = []
    notes: list[str] = []
    start = time.perf_counter()
    if "exactness" in checks and args.only != "comfyui":
        import diffusers

        from ..selftest.archs import DIFFUSERS

        for arch in DIFFUSERS:
            if args.arch and arch.key not in args.arch:
                continue
            _say(f"{arch.label}: {diffusers_n} examples")
            rows.append(run_category(arch, "default", f"diffusers {diffusers.__version__}", diffusers_n,
                                     wrong=wrong_variant()).as_dict())
            _said(rows[-1])
    if "compositions" in checks and args.only != "comfyui":
        from ..selftest.compose import diffusers_compositions

        _say("diffusers: streamline() under torch.compile")
        categories.append(diffusers_compositions(args.profile, args.cases).as_dict())
    if args.only != "diffusers":
        if not hosts(args):
            notes.append("no ComfyUI host: set --comfyui PATH (or $COMFYUI_PATH) for its rows"
                         + (f" and for {', '.join(reliability)}" if reliability else ""))
        for root in hosts(args):
            for flag in (BACKEND_FLAGS[b] for b in (args.backend or BACKEND_FLAGS) if "exactness" in checks):
                _say(f"ComfyUI at {root}, {flag or 'default flags'}: {comfy_n} examples per category")
                for row in _worker(root, comfy_n, args.profile, flag, args.arch):
                    rows.append(row)
                    _said(row)
            if reliability:
                _say(f"ComfyUI at {root}: {', '.join(reliability)}")
                for tally in _reliability(root, args.profile, reliability, args.cases, args.runs):
                    categories.append(tally)
                    _say(f"{tally['category']} on {tally['host']}: {tally['tried']} tried, {tally['failed']} failed "
                         f"({tally['seconds']:.0f} s)")
    failed = [r for r in rows if r["failed"]] + [c for c in categories if c["failed"]]
    if args.cases and categories and not sum(c["tried"] for c in categories):
        print(f"streamline selftest: no case's name contains --cases {args.cases!r}", file=sys.stderr)
        return 2
    if args.json:
        architectures = [{"arch": arch, "host": host, **t} for (arch, host), t in architecture_totals(rows).items()]
        print(json.dumps({"profile": args.profile, "rows": rows, "architectures": architectures,
                          "categories": categories, "notes": notes,
                          "failed": len(failed),
                          "seconds": time.perf_counter() - start}, indent=1, default=str))
    else:
        if rows:
            print(_table(rows, args.profile, notes, time.perf_counter() - start))
        if categories:
            print(_categories_table(categories))
        if notes and not rows:  # (the exactness table prints them)
            print("\n".join(f"note: {n}" for n in notes))
    return 1 if failed else 0


def _reliability(root: str, profile: str, categories: list[str], cases: str, runs: int | None) -> list[dict]:
    """The reliability categories on one ComfyUI host, in a process of their own (.selftest.reliability)."""
    command = [sys.executable, "-m", "streamlined_core.tools.selftest.reliability", str(Path(root).resolve()), profile,
               ",".join(categories)]
    try:
        env = dict(_worker_env(), STREAMLINE_SELFTEST_CASES=cases, STREAMLINE_SELFTEST_RUNS=str(runs or ""))
        done = subprocess.run(command, cwd=root, capture_output=True, text=True, env=env, timeout=WORKER_TIMEOUT)
        lines = done.stdout.strip().splitlines()
        if done.returncode == 0 and lines:
            return json.loads(lines[-1])
        why = f"failed: {(done.stderr or done.stdout)[-1500:]}"
    except subprocess.TimeoutExpired:
        why = f"ran past {WORKER_TIMEOUT} s"
    except json.JSONDecodeError:
        why = f"printed no result: {lines[-1][:300]}"
    return [{"category": c, "host": root, "tried": 0, "failed": 1, "notes": [], "seconds": 0,
             "failures": [{"case": "the ComfyUI process", "message": f"the ComfyUI process {why}"}]} for c in categories]


def _categories_table(categories: list[dict]) -> str:
    head = ("category", "host", "tried", "failed", "s")
    body = [(c["category"], c["host"], str(c["tried"]), str(c["failed"]), f"{c['seconds']:.0f}") for c in categories]
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    lines = [f"Reliability self-test: {sum(c['tried'] for c in categories)} cases, "
             f"{sum(c['failed'] for c in categories)} failed",
             "  ".join(h.ljust(w) for h, w in zip(head, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(x.ljust(w) for x, w in zip(b, widths)) for b in body]
    for c in categories:
        lines += [f"FAILED {c['category']} [{c['host']}] {f['case']}: {f['message'][:400]}" for f in c["failures"]]
        lines += [f"note {c['category']} [{c['host']}]: {n[:300]}" for n in c.get("notes", [])]
    return "\n".join(lines)


def _worker(root: str, examples: int, profile: str, flag: str, archs: list[str] | None = None) -> list[dict]:
    command = [sys.executable, "-m", "streamlined_core.tools.selftest.worker", str(Path(root).resolve()), str(examples),
               profile]

    def failed(why: str) -> list[dict]:
        return [{"arch": "comfyui", "path": flag or "default", "host": root, "examples": 0, "failed": True,
                 "failures": [{"check": "worker", "example": {}, "message": f"the ComfyUI process {why}"}]}]

    try:
        done = subprocess.run(command + ([flag] if flag else []), cwd=root, capture_output=True, text=True,
                              env={**_worker_env(), ARCHS_ENV: ",".join(archs or ())}, timeout=WORKER_TIMEOUT)
    except subprocess.TimeoutExpired:
        return failed(f"ran past {WORKER_TIMEOUT} s")
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        return failed(f"failed: {(done.stderr or done.stdout)[-1500:]}")
    try:
        return json.loads(lines[-1])
    except json.JSONDecodeError:
        return failed(f"printed no result: {lines[-1][:300]}")


def _worker_env() -> dict[str, str]:
    """A worker process's environment: this one, with this package importable ahead of $PYTHONPATH."""
    package = str(Path(__file__).resolve().parents[3])
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (package, os.environ.get("PYTHONPATH")) if p))


def _said(row: dict) -> None:
    """One category's result as it ends (on stderr: a long run that is stopped keeps what it did)."""
    failures = ", ".join(f"{f['check']}: {f['message'][:160]}" for f in row.get("failures", []))
    _say(f"{row['arch']} [{row.get('path', '')}] {row.get('host', '')}: {row.get('examples', 0)} examples, "
         f"groups sliced {row.get('groups_sliced', 0)}/{row.get('groups_seen', 0)}, "
         f"{'FAILED ' + failures if failures else 'passed'} ({row.get('seconds', 0):.0f} s)")


def _say(text: str) -> None:
    print(f"selftest: {text}", file=sys.stderr, flush=True)


def architecture_totals(rows: list[dict]) -> dict[tuple[str, str], dict[str, int]]:
    """Examples per architecture and host, summed over its backends and weight paths."""
    totals: dict[tuple[str, str], dict[str, int]] = {}
    for r in rows:
        t = totals.setdefault((r["arch"], r.get("host", "")), {"examples": 0, "paths": 0, "failed": 0})
        t["examples"] += r.get("examples", 0)
        t["paths"] += 1
        t["failed"] += bool(r.get("failed"))
    return totals


def _table(rows: list[dict], profile: str, notes: list[str], seconds: float) -> str:
    head = ("architecture", "host", "backend or weights", "examples", "fp32/bf16", "ill-cond.", "groups sliced",
            "restore", "failures", "s")
    body = []
    for r in rows:
        completions = f"+{r['completions']}" if r.get("completions") else ""
        body.append((r["arch"], r.get("host", ""), r.get("path", ""), f"{r.get('examples', 0)}{completions}",
                     f"{r.get('fp32', 0)}/{r.get('bf16', 0)}", str(r.get("ill_conditioned", 0)),
                     f"{r.get('groups_sliced', 0)}/{r.get('groups_seen', 0)}", str(r.get("restore_runs", 0)),
                     ", ".join(sorted({f["check"] for f in r.get("failures", [])})) or "0",
                     f"{r.get('seconds', 0):.0f}"))
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    lines = [f"Exactness self-test, profile {profile}: {sum(r.get('examples', 0) for r in rows)} examples in {seconds:.0f} s",
             "  ".join(h.ljust(w) for h, w in zip(head, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(b, widths)) for b in body]
    lines.append("per architecture, over its backends and weight paths:")
    lines += [f"  {arch:<27} {host:<17} {t['examples']:>5} examples, {t['paths']} path{'s' * (t['paths'] != 1)}, "
              f"{t['failed']} failed" for (arch, host), t in architecture_totals(rows).items()]
    for r in rows:
        for f in r.get("failures", []):
            lines.append(f"FAILED {r['arch']} [{r.get('path', '')}] {f['check']}: {f['message'][:400]}")
            if f.get("example"):
                lines.append(f"  smallest example: {json.dumps(f['example'], default=str)}")
        for n in r.get("notes", []):
            lines.append(f"note {r['arch']} [{r.get('path', '')}]: {n[:300]}")
    lines += [f"note: {n}" for n in notes]
    lines.append("ill-cond.: fp32 examples over 1e-5 (tiny latents, where a norm sees a handful of values) whose "
                 "distance from the fp64 forward is within 2x the host's own rounding (its own distance, or how far "
                 "one-ulp noise on its layers moves it); groups sliced: groups run with two or more slices / groups "
                 "with an axis of two or more; examples +N: N drawn examples run again with every group at two "
                 "slices, for the groups the draws never sliced")
    return "\n".join(lines)
