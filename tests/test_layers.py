"""The floor plan: every fxshard module imports only from its own floor or below.

The floors, top to bottom, are those of docs/architecture.md. Imports are read with ``ast`` from
the source, wherever they sit (module level or inside a function); imports under
``if TYPE_CHECKING:`` are left out, since they never run. A new module gets a floor here and in
the docs' table; a violation being removed by work in progress is marked on its own, as an
``xfail(strict=False)`` pair with the reason, never by loosening the table.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fxshard"

# Floor of each module or package (a package's floor covers its submodules), highest first.
FLOORS: dict[str, int] = {
    # 8: front ends
    "fxshard.cli": 8, "fxshard.cli_parser": 8, "fxshard.cli_text": 8, "fxshard.cli_inspect": 8,
    "fxshard.viz": 8, "fxshard.viz_dot": 8, "fxshard.viz_text": 8,
    "fxshard.compare": 8, "fxshard.export": 8,
    # 7: the library entry points (fxshard itself re-exports them)
    "fxshard": 7, "fxshard.api": 7,
    # 6: planning
    "fxshard.planner": 6, "fxshard.refusal": 6, "fxshard.candidates": 6, "fxshard.candidate_shapes": 6, "fxshard.candidates_whole": 6, "fxshard.levers": 6, "fxshard.plan_options": 6,
    "fxshard.calibrate": 6, "fxshard.calibrate_report": 6,
    # 5: execution
    "fxshard.runtime": 5, "fxshard.runtime.checkpointing": 5,
    # 4: graph passes and partitioners
    "fxshard.passes": 4, "fxshard.passes.regions": 4,
    # 3: pricing and simulation
    "fxshard.cost_models": 3, "fxshard.cost_models.checkpointing": 3,
    "fxshard.simulate": 3, "fxshard.schedule_orders": 3, "fxshard.simulate_plan": 3, "fxshard.comm": 3,
    # 2: the model's graph and the hardware
    "fxshard.capture": 2, "fxshard.modules": 2,
    "fxshard.cluster": 2, "fxshard.cluster_parse": 2, "fxshard.devices": 2,
    # 1: plain data and leaves
    "fxshard.plan": 1, "fxshard.errors": 1, "fxshard.units": 1, "fxshard.zoo": 1, "fxshard.models": 1,
}

def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def floor(module: str) -> int | None:
    """The floor of ``module``: its own entry, else its closest enclosing package's."""
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in FLOORS:
            return FLOORS[".".join(parts[:end])]
    return None


def _is_type_checking(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return isinstance(test, ast.Name) and test.id == "TYPE_CHECKING" or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imported(path: Path, known: set[str]) -> set[str]:
    """The fxshard modules ``path`` imports (``from fxshard import zoo`` counts as fxshard.zoo)."""
    found: set[str] = set()
    pending = [ast.parse(path.read_text(), filename=str(path))]
    while pending:
        node = pending.pop()
        if _is_type_checking(node):
            pending.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "fxshard")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "fxshard":
            subs = {f"{node.module}.{a.name}" for a in node.names} & known
            found.update(subs or {node.module})
        pending.extend(ast.iter_child_nodes(node))
    return found


def test_the_import_reader_sees_function_level_imports_and_skips_type_checking(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from fxshard.api import compile\n"
                      "def f():\n    from fxshard import zoo\n    import fxshard.plan\n")
    assert imported(source, {"fxshard.zoo"}) == {"fxshard.zoo", "fxshard.plan"}


def test_every_module_has_a_floor():
    missing = sorted(m for m in modules() if floor(m) is None)
    assert not missing, f"place these modules on a floor in tests/test_layers.py and docs/architecture.md: {missing}"


def violations() -> list[tuple[str, str]]:
    """Every (importer, imported) pair where the imported module sits on a higher floor."""
    found = modules()
    return [(module, target) for module, path in found.items() if floor(module) is not None
            for target in sorted(imported(path, set(found)))
            if floor(target) is not None and floor(target) > floor(module)]


def test_no_module_imports_from_a_higher_floor():
    wrong = [f"{m} (floor {floor(m)}) imports {t} (floor {floor(t)})" for m, t in violations()]
    assert not wrong, "move the shared code down, or the importer up:\n" + "\n".join(wrong)


def test_floors_cover_packages_and_order_the_flow():
    assert floor("fxshard.runtime.local") == FLOORS["fxshard.runtime"]
    assert floor("fxshard.passes.partition.metis") == FLOORS["fxshard.passes"]
    flow = ["fxshard.cli", "fxshard.api", "fxshard.planner", "fxshard.runtime", "fxshard.passes", "fxshard.cost_models",
            "fxshard.capture", "fxshard.plan"]
    assert [floor(m) for m in flow] == sorted((floor(m) for m in flow), reverse=True)
    assert len({floor(m) for m in flow}) == len(flow)


@pytest.mark.parametrize("module", ["fxshard.errors", "fxshard.units", "fxshard.plan"])
def test_the_ground_floor_stands_alone(module):
    """The lowest floor imports nothing of fxshard but itself."""
    found = modules()
    assert all(floor(t) == 1 for t in imported(found[module], set(found)))
