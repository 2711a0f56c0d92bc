"""The package's rooms and their rules, read from the source (docs/development.md, Layout).

- the engine imports no feature, no tool and no ComfyUI (nor AnimateDiff-Evolved);
- the features import no tool;
- only the tools import matplotlib;
- no module imports another module's private names;
- no import circle among the package's modules at import time, and every import names a module that exists;
- no module over 500 lines unless ``tests/long_modules.txt`` lists it, with its reason.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "streamlined_core"
LONG_MODULES = ROOT / "tests" / "long_modules.txt"
LINE_LIMIT = 500
ROOMS = ("engine", "features", "host", "fixture", "tools")


@dataclass(frozen=True)
class Import:
    source: str  # the importing module, dotted from the repository root
    target: str  # what it imports: a module of the pack, or another top-level name (torch, comfy, ...)
    names: tuple[str, ...]  # the names taken from the target ("from target import names")
    top_level: bool  # at import time (module level, not inside a function or under TYPE_CHECKING)
    line: int


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def pack_files() -> list[Path]:
    return sorted(p for p in list(PACKAGE.rglob("*.py")) + list((ROOT / "nodes").rglob("*.py")) if "__pycache__" not in p.parts)


MODULES = {module_name(p): p for p in pack_files()}


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(path: Path) -> list[Import]:
    return imports_in(path.read_text(), module_name(path), path.name == "__init__.py")


def imports_in(text: str, source: str, is_package: bool) -> list[Import]:
    tree = ast.parse(text)
    found: list[Import] = []

    def resolve(level: int, module: str | None) -> str:
        base = source.split(".") if is_package else source.split(".")[:-1]
        if level > 1:
            base = base[: len(base) - (level - 1)]
        return ".".join(base + ([module] if module else []))

    def visit(node: ast.AST, top_level: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                visit(child, False)
            elif isinstance(child, ast.If) and _type_checking(child):
                visit(child, False)
            elif isinstance(child, ast.Import):
                for alias in child.names:
                    found.append(Import(source, alias.name, (), top_level, child.lineno))
            elif isinstance(child, ast.ImportFrom):
                target = child.module if child.level == 0 else resolve(child.level, child.module)
                if target == "__future__":
                    continue
                names = tuple(a.name for a in child.names)
                submodules = [n for n in names if f"{target}.{n}" in MODULES]
                for n in submodules:  # "from package import module": an import of that module
                    found.append(Import(source, f"{target}.{n}", (), top_level, child.lineno))
                rest = tuple(n for n in names if n not in submodules)
                if rest or not submodules:
                    found.append(Import(source, target, rest, top_level, child.lineno))
            else:
                visit(child, top_level)

    visit(tree, True)
    return found


IMPORTS = [i for p in pack_files() for i in imports_of(p)]


def room(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "streamlined_core" or len(parts) < 2:
        return None
    return parts[1] if parts[1] in ROOMS else None


def where(i: Import) -> str:
    path = MODULES[i.source].relative_to(ROOT) if i.source in MODULES else i.source
    return f"{path}:{i.line} imports {i.target}"


def test_the_package_is_its_rooms():
    loose = sorted(p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py")
    assert loose == [], "modules outside the rooms"
    assert sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__") == sorted(ROOMS)
    assert all(room(m) for m in MODULES if m.startswith("streamlined_core."))


@pytest.mark.parametrize("importer, forbidden", [
    ("engine", ("features", "tools", "fixture", "host")),
    ("features", ("tools",)),
    ("host", ("features", "tools", "fixture")),
])
def test_a_room_imports_only_the_rooms_below_it(importer, forbidden):
    bad = [where(i) for i in IMPORTS if room(i.source) == importer and room(i.target) in forbidden]
    assert bad == []


def test_the_engine_never_imports_comfyui():
    hosts = ("comfy", "comfy_extras", "comfy_execution", "folder_paths", "nodes", "server", "execution")
    bad = [where(i) for i in IMPORTS if room(i.source) == "engine" and i.target.split(".")[0] in hosts]
    assert bad == []


def test_only_the_tools_import_matplotlib():
    users = [i for i in IMPORTS if i.target.split(".")[0] == "matplotlib"]
    assert users, "the charts import matplotlib: the rule reads the imports"
    assert [where(i) for i in users if room(i.source) != "tools"] == []


def test_no_module_imports_another_modules_private_names():
    ours = [i for i in IMPORTS if i.target in MODULES or i.target == "streamlined_core" or room(i.target)]
    private = [f"{where(i)}: {n}" for i in ours for n in i.names if n.startswith("_") and not n.startswith("__")]
    private += [where(i) for i in ours if any(p.startswith("_") and not p.startswith("__") for p in i.target.split("."))]
    assert private == []


def test_every_import_of_the_pack_names_a_module_that_exists():
    """Relative imports resolve where the file is (a function-level import too, which runs only later)."""
    ours = [i for i in IMPORTS if i.target.split(".")[0] in ("streamlined_core", "nodes") or i.target == ""]
    assert ours
    assert [where(i) for i in ours if i.target not in MODULES and i.target != ""] == []


def test_no_import_circle_at_import_time():
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for i in IMPORTS:
        if i.top_level and i.target in MODULES and i.target != i.source:
            graph[i.source].add(i.target)
    # an import of a.b.c runs a/__init__ and a/b/__init__ first, but a package that imports its own
    # submodules is not a circle: only the edges written in the source count
    circles = []
    state: dict[str, int] = {}

    def walk(m: str, stack: list[str]) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                circles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                walk(n, stack)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            walk(m, [])
    assert circles == []


def long_module_reasons() -> dict[str, str]:
    reasons = {}
    for line in LONG_MODULES.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        path, sep, reason = line.partition(":")
        assert sep and reason.strip(), f"{LONG_MODULES.name}: {line!r} gives no reason (PATH: why)"
        reasons[path.strip()] = reason.strip()
    return reasons


def test_no_module_over_the_line_limit_unless_listed_with_its_reason():
    reasons = long_module_reasons()
    lengths = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in pack_files()}
    over = sorted(p for p, n in lengths.items() if n > LINE_LIMIT)
    assert [p for p in over if p not in reasons] == [], f"over {LINE_LIMIT} lines and not in {LONG_MODULES.name}"
    # the list holds only what needs it, so it shrinks when a module does
    assert sorted(p for p in reasons if lengths.get(p, 0) <= LINE_LIMIT) == []


def test_the_readers_see_a_violation():
    """What the rules read: a feature importing a tool and a private name, matplotlib inside a function."""
    text = "from ..tools.bench import unet\nfrom ..engine.api import _hidden\n\n\ndef f():\n    import matplotlib\n"
    found = imports_in(text, "streamlined_core.features.probe", is_package=False)
    assert [(i.target, i.names, i.top_level) for i in found] == [
        ("streamlined_core.tools.bench.unet", (), True),
        ("streamlined_core.engine.api", ("_hidden",), True),
        ("matplotlib", (), False),
    ]
    assert room(found[0].target) == "tools" and room(found[0].source) == "features"
