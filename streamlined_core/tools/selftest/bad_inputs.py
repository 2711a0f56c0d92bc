"""Bad inputs through a real server's ``/prompt``, as a user's workflow JSON would send them (see :mod:`.server`):
each node input of the pack missing, of the wrong type, beyond its edges, not one of its choices, linked to an
output of another type; each node's numbers at their edges; corrupt, truncated and mismatched calibration files;
malformed route parameters; the routes asked while a run records."""

from __future__ import annotations

import copy
import json
import threading
from pathlib import Path
from typing import Any

from .tally import Tally, check

WIDGETS = ("INT", "FLOAT", "STRING", "BOOLEAN")
# inputs the pack's nodes take from ComfyUI's own KSampler and CFGGuider: their edges are ComfyUI's (10,000 steps)
HOST_INPUTS = {"seed", "steps", "cfg", "sampler_name", "scheduler", "denoise"}


def refused(server: Any, prompt: dict, node_id: str, name: str) -> None:
    """``prompt`` is refused naming ``name`` (400 with the node's errors), or, where the server's validation lets it
    through, its run fails with a message naming ``name``; then the server still serves."""
    from .server import failure_of

    status, answer = server.post("/prompt", {"prompt": prompt, "client_id": "streamline-selftest"})
    errors = (answer.get("node_errors") or {}).get(node_id, {}).get("errors", [])
    if status == 200 and errors:  # the graph's other outputs run; this node's branch is refused
        server.wait(answer["prompt_id"])
        check(any(name in json.dumps(e) for e in errors), f"{name}: refused without naming it: {json.dumps(errors)[:600]}")
    elif status == 200:
        failure = failure_of(server.wait(answer["prompt_id"]))
        check(failure is not None, f"{name}: accepted and run without an error")
        check(name in str(failure.get("exception_message")),
              f"{name}: the run failed without naming it: {failure}")
    else:
        check(status == 400, f"{name}: answered {status}: {answer}")
        check(errors and any(name in json.dumps(e) for e in errors),
              f"{name}: refused without naming it: {json.dumps(answer)[:600]}")
    check(server.get("/system_stats").get("system"), "the server stopped serving")


def _wrong_link(kind: str) -> list:
    return ["1", 3] if kind != "LATENT" else ["1", 0]  # the tiny SVD's LATENT, else its MODEL


def bad_inputs(server: Any, tally: Tally) -> None:
    from .server import every_node, failure_of

    base = every_node()
    first = failure_of(server.run(base))  # (and switches on a broken variant the tests asked for)
    if tally.wants("the graph with every node runs"):
        with tally.case("the graph with every node runs"):
            check(first is None, f"the graph failed: {first}")
    info = server.get("/object_info")
    ours = {nid: n for nid, n in base.items() if info[n["class_type"]].get("category", "").startswith("Streamline")}
    for nid, node in ours.items():
        kind = node["class_type"]
        required = info[kind]["input"].get("required", {})
        edges: dict[str, dict] = {"min": {}, "max": {}}
        for name, spec in required.items():
            typ, options = spec[0], (spec[1] if len(spec) > 1 else {})
            cases = {"missing": None}
            if isinstance(typ, list):
                cases["not one of its choices"] = "no such choice"
            elif typ in ("INT", "FLOAT"):
                if name not in HOST_INPUTS and tally.wants(f"{kind}.{name} declares its minimum and maximum"):
                    with tally.case(f"{kind}.{name} declares its minimum and maximum"):  # what the page enforces
                        check("min" in options and "max" in options, f"{name}: {typ} without limits: {options}")
                cases["of the wrong type"] = "abc"
                step = options.get("step", 1) if typ == "FLOAT" else 1
                if "min" in options:
                    cases["below its minimum"] = options["min"] - step
                if "max" in options and options["max"] < 2**63:
                    cases["above its maximum"] = options["max"] + step
                if name not in HOST_INPUTS:
                    edges["min"][name], edges["max"][name] = options.get("min"), options.get("max")
            elif typ not in WIDGETS:
                cases["linked to another type"] = _wrong_link(typ)
            for what, value in cases.items():
                if not tally.wants(f"{kind}.{name} {what}"):
                    continue
                with tally.case(f"{kind}.{name} {what}"):
                    prompt = copy.deepcopy(base)
                    if value is None:
                        del prompt[nid]["inputs"][name]
                    else:
                        prompt[nid]["inputs"][name] = value
                    refused(server, prompt, nid, name)
        for side, values in edges.items():
            values = {k: v for k, v in values.items() if v is not None}
            if not values or not tally.wants(f"{kind} with {', '.join(values)} at their {side}imum"):
                continue
            with tally.case(f"{kind} with {', '.join(values)} at their {side}imum"):
                prompt = copy.deepcopy(base)
                prompt[nid]["inputs"].update(values)
                failure = failure_of(server.run(prompt))
                check(failure is None or any(n in str(failure.get("exception_message")) for n in values),
                      f"failed without naming the input: {failure}")
    _calibrations(server, tally, base)
    _routes(server, tally, base)


CORRUPT = ("corrupt", "truncated", "mismatched", "of the wrong shape")


def _calibrations(server: Any, tally: Tally, base: dict) -> None:
    """Calibration files that are corrupt, truncated or made for another model, chosen in the calibration widget."""
    from .server import failure_of

    folder = Path(server.base) / "models" / "streamline_rehash"
    prompt = copy.deepcopy(base)
    prompt["4"]["inputs"].update(schedule="gamma", calibration="auto (find or make one)")
    names = ("a calibration made by the node", *(f"a {n} calibration file" for n in CORRUPT))
    if not tally.wants(*names):
        return
    made: list[Path] = []
    with tally.case("a calibration made by the node"):  # (what the other files are made from: run when any is)
        failure = failure_of(server.run(prompt))
        check(failure is None, f"calibrating failed: {failure}")
        made = sorted(folder.glob("*.json"))
        check(made, f"no calibration file in {folder}")
    if not made:
        return
    good = made[0].read_text()
    doc = json.loads(good)
    other = dict(doc, made_for=dict(doc.get("made_for", {}), model="another model"))
    texts = {"corrupt": "\x00\x17 not json {", "truncated": good[: len(good) // 2], "mismatched": json.dumps(other),
             "of the wrong shape": json.dumps({"steps": "many"})}
    for name in CORRUPT:
        if not tally.wants(f"a {name} calibration file"):
            continue
        text = texts[name]
        with tally.case(f"a {name} calibration file"):
            file = folder / f"selftest-{name.replace(' ', '-')}.json"
            file.write_text(text)
            chosen = copy.deepcopy(prompt)
            chosen["4"]["inputs"]["calibration"] = file.name
            failure = failure_of(server.run(chosen))
            check(failure is not None and "calibration" in str(failure.get("exception_message")),
                  f"not refused naming the calibration input: {failure}")
            check(server.get("/system_stats").get("system"), "the server stopped serving")


ROUTES = [("/streamline/timelines?limit=abc", 400), ("/streamline/timelines?limit=0", 400),
          ("/streamline/timelines?limit=100000", 400), ("/streamline/timelines/bad%20id%3B", 400),
          ("/streamline/timelines/..%2F..%2Fetc%2Fpasswd", 400), ("/streamline/timelines/" + "x" * 200, 400),
          ("/streamline/timelines/no-such-prompt", 404)]


def _routes(server: Any, tally: Tally, base: dict) -> None:
    for path, code in ROUTES:
        if not tally.wants(f"GET {path[:60]}"):
            continue
        with tally.case(f"GET {path[:60]}"):
            status, answer = server.get_status(path)
            check(status == code and isinstance(answer, dict) and answer.get("error"), f"answered {status}: {answer}")
    if not tally.wants("the routes asked 40 times while a run records"):
        return
    with tally.case("the routes asked 40 times while a run records"):
        prompt = copy.deepcopy(base)
        prompt["8"]["inputs"]["noise_seed"] = prompt["4"]["inputs"]["seed"] = 99
        prompt_id = server.queue(prompt)
        answers: list = []

        def ask() -> None:
            for _ in range(10):
                answers.append(server.get_status("/streamline/timelines")[0])
                answers.append(server.get_status(f"/streamline/timelines/{prompt_id}")[0])

        threads = [threading.Thread(target=ask) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        from .server import failure_of

        failure = failure_of(server.wait(prompt_id))
        check(failure is None, f"the run failed: {failure}")
        check(len(answers) == 40 and set(answers) <= {200, 404}, f"answers: {sorted(set(answers))}")
        check(server.get_status(f"/streamline/timelines/{prompt_id}")[0] == 200, "the run's timeline is not kept")
