"""The house keeps its plan (ARCHITECTURE.md): packages import only downward, no module imports itself round a
loop, no module outgrows a screenful of screens, and package faces hold no code."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "lora_trainer"
SHARED = {"lora_trainer", "errors", "files", "progress"}  # the package root is there for __version__
STAGES = {"config", "data", "model", "adapters", "cache", "export", "sampling", "report", "fit"}
# What each stage, and each top-level module, may import of lora_trainer (ARCHITECTURE.md, "Rules").
ALLOWED = {
    "errors": set(),
    "files": {"errors"},  # a failed write is a one-line user error
    "progress": set(),
    "config": SHARED,
    "data": SHARED | {"config"},
    "model": SHARED | {"config"},
    "adapters": SHARED | {"config", "model"},  # per-block ranks index the UNet by its blocks (model.blocks)
    "cache": SHARED | {"config", "data", "model"},
    "export": SHARED | {"config", "data", "model", "adapters"},  # the model's module names (LDM layout, blocks)
    "sampling": SHARED | {"config", "model", "adapters", "export"},
    "report": SHARED,
    "fit": SHARED | STAGES,
    "cli": SHARED | STAGES,
    "__main__": {"cli"},
}


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports_of(path: Path, known: dict[str, Path]) -> set[str]:
    """The lora_trainer modules a file imports, at its top or inside functions."""
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names if alias.name.split(".")[0] == "lora_trainer")
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "lora_trainer":
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                targets.add(submodule if submodule in known else node.module)
    return targets


def home(module: str) -> str:
    """The stage or top-level module that `module` belongs to (`lora_trainer` for the package root)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "lora_trainer"


def test_every_stage_and_module_has_a_rule():
    assert {home(module) for module in modules()} - {"lora_trainer"} == set(ALLOWED)


def test_packages_import_only_what_the_plan_allows():
    known = modules()
    broken = []
    for module, path in known.items():
        source = home(module)
        for target in imports_of(path, known):
            destination = home(target)
            if destination != source and destination not in ALLOWED.get(source, set()):
                broken.append(f"{module} imports {target}")
    assert not broken, broken


def test_no_module_imports_itself_round_a_loop():
    known = modules()
    graph = {module: imports_of(path, known) - {module} for module, path in known.items()}
    cycles = []
    state: dict[str, str] = defaultdict(lambda: "new")

    def visit(module: str, trail: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if state[target] == "open":
                cycles.append(" -> ".join(trail[trail.index(target):] + [target]))
            elif state[target] == "new":
                visit(target, trail + [target])
        state[module] = "done"

    for module in graph:
        if state[module] == "new":
            visit(module, [module])
    assert not cycles, cycles


def test_modules_stay_small_and_the_top_stays_short():
    long = {str(path.relative_to(REPO)): lines for path in PACKAGE.rglob("*.py") if (lines := len(path.read_text().splitlines())) > 400}
    assert not long, long
    top = [entry.name for entry in PACKAGE.iterdir() if entry.name != "__pycache__"]
    assert len(top) <= 16, sorted(top)


def test_package_faces_hold_no_code():
    """An __init__.py is a docstring: nothing is re-exported, so every name has one import path."""
    for face in PACKAGE.rglob("__init__.py"):
        body = ast.parse(face.read_text(encoding="utf-8")).body
        statements = [node for node in body if not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant))]
        if face.parent == PACKAGE:
            statements = [node for node in statements if not (isinstance(node, ast.Assign) and node.targets[0].id == "__version__")]
        assert not statements, f"{face.relative_to(REPO)} holds code"
