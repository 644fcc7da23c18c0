"""Adding a stage is two edits: a package with a config and a function (here, this module), and
a line in the stage table. Everything else follows: `brainhpc <stage>` generated from the config,
its cells in a sweep file ([[<stage>.cells]]), their checks in --dry-run, resources, the sbatch
script, the dependency on the stages it names, and the one cell lifecycle."""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest

from brainhpc import cli, stages
from brainhpc.cell import Config, Outputs, force_option, out_option, run_cell
from brainhpc.data.shards import LABELS, load_split
from brainhpc.errors import BrainhpcError
from brainhpc.options import check, option

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- edit 1: the stage itself
@dataclass
class CountConfig(Config):
    """Count one label's training images of a prepared dataset."""

    stage: ClassVar[str] = "count"

    data: Path = option(help="prepared dataset")
    out: Path = out_option()
    label: str = option("tumour", "which label", choices=tuple(LABELS))
    seed: int = option(0, "unused, an axis")
    force: bool = force_option()

    def __post_init__(self):
        check(self)


def count(cfg: CountConfig) -> dict:
    return run_cell(cfg, _count, Outputs(result="counts.json"))


def _count(ctx) -> dict:
    n = len(load_split(ctx.cfg.data, "train", label=LABELS[ctx.cfg.label]))
    return ctx.finish({"label": ctx.cfg.label, "n": n})


# ---------------------------------------------------------------- edit 2: the table line
@pytest.fixture
def with_count(monkeypatch):
    table = dict(stages.TABLE)
    table.pop("aggregate")
    table["count"] = stages.Stage("count", f"{__name__}:CountConfig", f"{__name__}:count",
                                  "count a label's training images", after=("prepare",))
    agg = stages.TABLE["aggregate"]
    table["aggregate"] = stages.Stage(agg.name, agg.config, agg.function, agg.help,
                                      after=(*agg.after, "count"), command=False)
    monkeypatch.setattr(stages, "TABLE", table)
    monkeypatch.setattr(stages, "NAMES", tuple(table))


SWEEP = """
name = "counting"
profile = "local"
[data]
phantom = 40
size = 32
[[count.cells]]
name = "tumours"
seeds = [0, 1]
[[count.cells]]
name = "healthy"
label = "healthy"
"""


def test_a_new_stage_runs_from_a_sweep_file_and_the_command_line(with_count, tmp_path, capsys,
                                                                  no_slurm_client):
    from brainhpc.sweep.cli import main

    path = tmp_path / "counting.toml"
    path.write_text(SWEEP)
    rd = tmp_path / "run"
    assert main([str(path), "--run-dir", str(rd), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "== count: 3 cell(s) ==" in text and "#SBATCH --job-name=counting-count" in text
    assert "#SBATCH --dependency='afterany:<prepare job ids>'" in text
    assert main([str(path), "--executor", "debug", "--run-dir", str(rd)]) == 0
    train = load_split(rd / "prepare" / "data" / "prepared", "train")
    for cid, label in (("tumours-s0", 1), ("tumours-s1", 1), ("healthy", 0)):
        got = json.loads((rd / "count" / cid / "counts.json").read_text())
        assert got["status"] == "done" and got["n"] == int((train.labels == label).sum())
        assert json.loads((rd / "count" / cid / "cell.json").read_text())["status"] == "done"
    # the command line, generated from CountConfig
    out = tmp_path / "cli"
    assert cli.main(["count", "--data", str(rd / "prepare" / "data" / "prepared"), "--label",
                     "healthy", "--out", str(out)]) == 0
    assert json.loads((out / "counts.json").read_text())["n"] == int((train.labels == 0).sum())
    # its checks in --dry-run, naming the cell
    path.write_text(SWEEP.replace('label = "healthy"', 'label = "cats"'))
    with pytest.raises(BrainhpcError, match=r"count/healthy: unknown label 'cats'; valid: "
                                            "healthy, tumour"):
        from brainhpc.sweep.config import load_sweep
        from brainhpc.sweep.plan import expand

        expand(load_sweep(path), rd)
