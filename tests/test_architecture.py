"""The layout the code keeps (docs/architecture.md), read from its own imports: the stages are
siblings (none imports another), what they share sits below them and imports no stage and no
sweep module, every stage of the table runs through the one lifecycle, and functions stay
small."""

import ast
from pathlib import Path

import pytest

from brainhpc import stages

PACKAGE = Path(__file__).resolve().parents[1] / "brainhpc"
STAGE_PACKAGES = ("prepare", "generate", "classify", "segment", "evaluate")
SHARED = ("data", "train", "models", "metrics", "anomaly", "predictors", "cell.py",
          "options.py", "stages.py", "images.py", "fsio.py", "errors.py", "provenance.py")
MAX_FUNCTION_LINES = 60


def _modules(part: str) -> list[Path]:
    path = PACKAGE / part
    return sorted(path.rglob("*.py")) if path.is_dir() else [path]


def _imports(path: Path) -> set[str]:
    """The brainhpc modules a file imports (at any depth: lazy imports count too)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("brainhpc"):
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("brainhpc"))
    return out


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


@pytest.mark.parametrize("stage", STAGE_PACKAGES)
def test_no_stage_imports_another(stage):
    for path in _modules(stage):
        wrong = {m for m in _imports(path)
                 if _top(m) in STAGE_PACKAGES and _top(m) != stage}
        assert not wrong, f"{path.relative_to(PACKAGE.parent)} imports {sorted(wrong)}"


@pytest.mark.parametrize("part", SHARED)
def test_shared_code_imports_no_stage_and_no_sweep(part):
    for path in _modules(part):
        wrong = {m for m in _imports(path) if _top(m) in (*STAGE_PACKAGES, "sweep", "cli",
                                                          "smoke", "gpu_check")}
        assert not wrong, f"{path.relative_to(PACKAGE.parent)} imports {sorted(wrong)}"


def test_every_stage_is_in_the_table_and_runs_through_the_lifecycle():
    assert set(STAGE_PACKAGES) < set(stages.TABLE)
    for name in STAGE_PACKAGES:
        text = "".join(p.read_text() for p in _modules(name))
        assert "run_cell(" in text, f"stage {name} does not run through brainhpc.cell.run_cell"
        assert stages.TABLE[name].config.startswith(f"brainhpc.{name}:")


def test_functions_stay_small():
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} "
                                f"{node.name} ({n} lines)")
    assert not long, "functions over 60 lines: " + "; ".join(long)


def test_the_table_lists_each_stage_after_what_it_waits_for():
    from brainhpc.errors import BrainhpcError

    stages.check_order(stages.TABLE)
    report = stages.Stage("report", "m:C", "m:f", "a new stage", after=("classify",))
    agg = stages.Stage("aggregate", "m:C", "m:f", "waits for report", after=("report",))
    fine = {k: v for k, v in stages.TABLE.items() if k != "aggregate"}
    fine.update(report=report, aggregate=agg)  # report before aggregate: fine
    stages.check_order(fine)
    wrong = dict(stages.TABLE)  # aggregate keeps its place, report appended after it
    wrong.update(aggregate=agg, report=report)
    with pytest.raises(BrainhpcError, match="aggregate waits for report, which must come "
                                            "before it"):
        stages.check_order(wrong)
