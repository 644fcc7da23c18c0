"""Which code a cell ran (brainhpc.provenance): the source hash and git state, recorded in every
result and cell marker; `sweep status` shows cells of other code as stale and `sweep
--rerun-stale` redoes exactly those, with force."""

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest

from brainhpc import provenance
from brainhpc.cell import Config, Outputs, force_option, out_option, run_cell
from brainhpc.fsio import write_json
from brainhpc.options import check, option
from brainhpc.provenance import code_version, recorded_code, source_hash
from brainhpc.sweep import rundir, runner
from brainhpc.sweep.plan import Cell

OTHER = "0123456789abcdef"


def _now() -> str:
    """This process's code hash (cached until a test clears the cache)."""
    return code_version()["code_hash"]


@pytest.fixture
def fresh_cache():
    provenance._version.cache_clear()
    yield
    provenance._version.cache_clear()


def _tree(root: Path) -> Path:
    (root / "sub").mkdir(parents=True)
    (root / "a.py").write_text("x = 1\n")
    (root / "sub" / "b.py").write_text("y = 2\n")
    (root / "notes.txt").write_text("not source\n")
    return root


# ------------------------------------------------------------------ the hash and git state

def test_the_hash_covers_every_source_file_its_path_and_bytes(tmp_path):
    tree = _tree(tmp_path / "t")
    h = source_hash(tree)
    assert len(h) == 16 and int(h, 16) >= 0
    (tree / "notes.txt").write_text("changed, but not a .py file\n")
    assert source_hash(tree) == h
    (tree / "sub" / "b.py").write_text("y = 3\n")
    edited = source_hash(tree)
    assert edited != h
    (tree / "sub" / "b.py").rename(tree / "sub" / "c.py")  # same bytes, another path
    assert source_hash(tree) not in (h, edited)
    (tree / "sub" / "c.py").rename(tree / "sub" / "b.py")
    assert source_hash(tree) == edited  # deterministic: the same tree, the same hash


def test_code_version_follows_the_root_and_is_computed_once(tmp_path, monkeypatch, fresh_cache):
    tree = _tree(tmp_path / "t")
    monkeypatch.setattr(provenance, "ROOT", tree)
    first = code_version()
    assert first["code_hash"] == source_hash(tree)
    (tree / "a.py").write_text("x = 2\n")
    assert code_version() == first  # cached: a running process keeps the code it started with
    provenance._version.cache_clear()
    assert code_version()["code_hash"] == source_hash(tree) != first["code_hash"]


def test_without_git_commit_and_dirty_are_none(tmp_path, monkeypatch, fresh_cache):
    tree = _tree(tmp_path / "not-a-repo")
    assert code_version(tree) == {"code_hash": source_hash(tree), "commit": None, "dirty": None}
    provenance._version.cache_clear()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no git executable at all
    assert code_version(tree)["commit"] is None and code_version(tree)["dirty"] is None


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_commit_and_uncommitted_changes_from_git(tmp_path, fresh_cache):
    repo = tmp_path / "repo"
    pkg = _tree(repo / "pkg")
    _tree(repo / "untracked")

    def git(*args):
        subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t",
                        *args], check=True, capture_output=True)

    git("init", "-q")
    git("add", "pkg")
    git("commit", "-q", "-m", "one")
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()
    assert code_version(pkg) == {"code_hash": source_hash(pkg), "commit": head, "dirty": False}
    # a copy that merely sits inside some repository is not that repository's commit
    assert code_version(repo / "untracked")["commit"] is None
    (pkg / "a.py").write_text("x = 99\n")
    provenance._version.cache_clear()
    assert code_version(pkg)["dirty"] is True and code_version(pkg)["commit"] == head


def test_recorded_code_reads_results_and_old_cells():
    assert recorded_code({"code": {"code_hash": "abc", "commit": None}}) == "abc"
    assert recorded_code({"status": "done"}) is None  # finished before code was recorded
    assert recorded_code({"code": None}) is None and recorded_code({"code": {}}) is None


# ------------------------------------------------------------------ every result records it

@dataclass
class Tiny(Config):
    stage: ClassVar[str] = "tiny"

    out: Path = out_option()
    seed: int = option(0, "an axis")
    force: bool = force_option()

    def __post_init__(self):
        check(self)


def test_a_finished_cell_records_its_code(tmp_path):
    cfg = Tiny(out=tmp_path / "cell")
    result = run_cell(cfg, lambda ctx: ctx.finish({"n": 1}), Outputs(result="result.json"))
    on_disk = json.loads((tmp_path / "cell" / "result.json").read_text())
    assert result["code"] == on_disk["code"] == code_version()
    assert recorded_code(on_disk) == _now()


def test_a_prepared_dataset_records_its_code(tmp_path):
    from brainhpc.prepare import PrepareConfig, prepare

    out = tmp_path / "prepared"
    prepare(PrepareConfig(out=out, phantom=40, size=32, seed=0, progress=False))
    assert json.loads((out / "manifest.json").read_text())["code"] == code_version()


# ------------------------------------------------------------------ the sweep: stale cells

def _mark(cell: Cell, code: str | None) -> None:
    rec = {"status": "done", "config_hash": cell.hash}
    if code is not None:
        rec["code"] = {"code_hash": code, "commit": None, "dirty": None}
    write_json(cell.marker, rec)


def test_stale_means_done_by_other_code(tmp_path):
    now, other, old = (Cell("prepare", n, {}, str(tmp_path)) for n in ("now", "other", "old"))
    _mark(now, _now())
    _mark(other, OTHER)
    _mark(old, None)
    assert [runner.is_stale(c) for c in (now, other, old)] == [False, True, True]
    assert runner.is_stale(old, unknown=False) is False
    write_json(other.marker, {"status": "failed", "config_hash": other.hash,
                              "code": {"code_hash": OTHER}})
    assert not runner.is_stale(other)  # not done: a plain re-run redoes it anyway
    assert rundir.stale_cells({"prepare": [now, old]}) == {"prepare/old"}


def test_the_runner_forces_the_cells_to_redo_and_records_their_code(tmp_path, monkeypatch):
    calls = []

    def fake_stage(cell, force=False, device="auto"):
        calls.append((cell.id, force))
        return {"status": "done", "code": {"code_hash": f"ran-{cell.id}"}}

    monkeypatch.setattr(runner, "run_stage", fake_stage)
    stale, fresh = Cell("prepare", "stale", {}, str(tmp_path)), Cell("prepare", "fresh", {},
                                                                    str(tmp_path))
    runner.CellRunner(redo=frozenset({"prepare/stale"}))([stale, fresh])
    assert calls == [("stale", True), ("fresh", False)]
    assert recorded_code(runner.read_marker(stale)) == "ran-stale"
    # like --force, it applies to the first run only: a requeued task resumes
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    calls.clear()
    runner.CellRunner(redo=frozenset({"prepare/stale"}))(stale)
    assert calls == [("stale", False)]


def test_a_stage_that_records_no_code_gets_the_code_that_ran_it(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "run_stage", lambda cell, force=False, device="auto":
                        {"status": "done"})
    cell = Cell("aggregate", "results", {}, str(tmp_path))
    runner.CellRunner()(cell)
    assert recorded_code(runner.read_marker(cell)) == _now()


def test_status_shows_stale_cells(tmp_path):
    from brainhpc.sweep.status import cell_states, table

    write_json(tmp_path / "sweep.json", {"name": "x"})
    cells = [Cell("prepare", n, {}, str(tmp_path)) for n in ("now", "other", "old")]
    for cell, code in zip(cells, (_now(), OTHER, None), strict=True):
        _mark(cell, code)
    rows = cell_states(tmp_path, queued={})
    assert {r["cell"]: r["state"] for r in rows} == {"now": "done", "other": "done (stale)",
                                                    "old": "done"}
    text = table(rows)
    assert "2 done, 1 done (stale)" in text and "--rerun-stale" in text


@pytest.fixture
def frozen_code(tmp_path, monkeypatch, fresh_cache) -> str:
    """A copy of the package that this process hashes and the cells' subprocesses import
    (PYTHONPATH, run from elsewhere than the checkout), so edits to the working tree while the
    test runs change neither; its hash. The copy differs from the tree by a comment, so a cell
    that ran the tree's code instead would record another hash."""
    copy = tmp_path / "code" / "brainhpc"
    shutil.copytree(provenance.ROOT, copy, ignore=shutil.ignore_patterns("__pycache__"))
    init = copy / "__init__.py"
    init.write_text(init.read_text() + "# a frozen copy for tests/test_provenance.py\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        p for p in (str(copy.parent), os.environ.get("PYTHONPATH")) if p))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(provenance, "ROOT", copy)
    provenance._version.cache_clear()
    return _now()


SWEEP = """
name = "stale"
[data.a]
phantom = 40
size = 32
[data.b]
phantom = 40
size = 32
"""


def test_rerun_stale_redoes_the_cells_of_other_code_only(tmp_path, capsys, frozen_code):
    """Through the local executor (a subprocess per cell): a re-run skips every finished cell;
    with --rerun-stale, the cell whose recorded code differs runs again with force (its outputs
    are redone) and the cell of this code is left alone."""
    from brainhpc.sweep.cli import main

    path, run = tmp_path / "stale.toml", tmp_path / "run"
    path.write_text(SWEEP)
    args = [str(path), "--executor", "local", "--run-dir", str(run)]
    assert main(args) == 0
    a, b = (run / "prepare" / n for n in ("a", "b"))
    for cell in (a, b):
        assert recorded_code(json.loads((cell / "cell.json").read_text())) == frozen_code
        manifest = json.loads((cell / "prepared" / "manifest.json").read_text())
        assert recorded_code(manifest) == frozen_code
        (cell / "prepared" / "sentinel").write_text("from the first run")
    marker = json.loads((a / "cell.json").read_text())
    write_json(a / "cell.json", {**marker, "code": {**marker["code"], "code_hash": OTHER}})
    b_marker = (b / "cell.json").read_bytes()
    capsys.readouterr()

    assert main(args) == 0  # a plain re-run: both done, nothing to do
    assert "nothing to submit" in capsys.readouterr().out
    assert main([*args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "1 done cell(s) ran other code (stale); --rerun-stale re-runs them" in out
    assert main([*args, "--dry-run", "--rerun-stale"]) == 0
    out = capsys.readouterr().out
    assert "1 done cell(s) ran other code (stale); would re-run" in out
    assert "[done, stale code: re-run]" in out

    assert main([*args, "--rerun-stale"]) == 0
    assert "1 stale to redo" in capsys.readouterr().out
    assert not (a / "prepared" / "sentinel").exists()  # redone with force: a new dataset
    assert recorded_code(json.loads((a / "cell.json").read_text())) == frozen_code
    assert recorded_code(json.loads((a / "prepared" / "manifest.json").read_text())) == frozen_code
    assert (b / "prepared" / "sentinel").exists() and (b / "cell.json").read_bytes() == b_marker
