"""The one cell lifecycle (brainhpc.cell) and the config fields it is built on (brainhpc.options):
checks and their messages, the command line generated from a config, skip / refuse / resume /
force, the same for every stage (the stage table's configs), and what a failure leaves."""

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest

from brainhpc import cli, options, stages
from brainhpc.cell import Config, Outputs, force_option, out_option, run_cell
from brainhpc.errors import BrainhpcError
from brainhpc.options import check, option


@dataclass
class Toy(Config):
    """A stage config with one field of each kind the options know."""

    stage: ClassVar[str] = "toy"

    data: Path = option(help="input")
    out: Path = out_option()
    epochs: int = option(3, "epochs", min=1)
    lr: float = option(1e-3, "learning rate", gt=0)
    dropout: float = option(0.0, "dropout", min=0, lt=1)
    median: int | None = option(None, "odd side", min=1, odd=True)
    mode: str = option("a", "mode", choices=("a", "b"))
    augment: bool = option(True, "augment")
    verbose: bool = option(False, "say more")
    channels: tuple[int, ...] = option((8, 16), "channels", min=1)
    names: tuple[str, ...] | str | None = option(None, "names", flag="name")
    opts: dict = option(factory=dict, flag="opt", help="options")
    labels: str | None = option(None, "labels", nargs="+")
    force: bool = force_option()

    def __post_init__(self):
        check(self)


@pytest.mark.parametrize("kw, message", [
    ({"epochs": 0}, "toy: epochs must be an integer >= 1, got 0"),
    ({"epochs": 2.5}, "toy: epochs must be an integer >= 1, got 2.5"),
    ({"epochs": True}, "toy: epochs must be an integer >= 1, got True"),
    ({"lr": 0}, "toy: lr must be a number > 0, got 0"),
    ({"lr": float("nan")}, "toy: lr must be a number > 0, got nan"),
    ({"dropout": 1.0}, r"toy: dropout must be a number in \[0, 1\), got 1.0"),
    ({"median": 4}, r"toy: median must be an odd integer >= 1 \(or unset\), got 4"),
    ({"mode": "c"}, "toy: unknown mode 'c'; valid: a, b"),
    ({"augment": "yes"}, "toy: augment must be true or false, got 'yes'"),
    ({"channels": "8,x"}, "toy: channels must be a list of numbers >= 1, got '8,x'"),
    ({"channels": (8, 0)}, "toy: channels must be a list of numbers >= 1, got"),
    ({"opts": [1]}, "toy: opts must be a table, got"),
])
def test_checks_name_the_field_and_what_is_expected(tmp_path, kw, message):
    with pytest.raises(BrainhpcError, match=message):
        Toy(data=tmp_path, out=tmp_path, **kw)


def test_values_are_converted_where_lossless(tmp_path):
    t = Toy(data=str(tmp_path), out=str(tmp_path / "o"), channels="4, 8,16", names="x,y",
            median=3)
    assert t.data == tmp_path and isinstance(t.out, Path)
    assert t.channels == (4, 8, 16) and t.names == ("x", "y") and t.median == 3


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    options.add_arguments(p, Toy)
    return p


def test_command_line_comes_from_the_fields(tmp_path):
    args = _parser().parse_args(["--data", str(tmp_path), "--out", str(tmp_path / "o"),
                                 "--epochs", "5", "--no-augment", "--verbose", "--channels",
                                 "4,8", "--name", "x", "--name", "y,z", "--opt", "k=[1,2]",
                                 "--opt", "s=text", "--labels", "tumour=a", "healthy=b"])
    t = options.from_args(Toy, args)
    assert (t.epochs, t.augment, t.verbose, t.channels) == (5, False, True, (4, 8))
    assert t.names == ("x", "y", "z") and t.opts == {"k": [1, 2], "s": "text"}
    assert t.labels == "tumour=a healthy=b"
    # an unset flag keeps the dataclass default: one place for every default
    bare = options.from_args(Toy, _parser().parse_args(["--data", "d", "--out", "o"]))
    assert bare == Toy(data=Path("d"), out=Path("o"))
    with pytest.raises(SystemExit):
        _parser().parse_args(["--out", "o"])  # --data is required: no default


def test_help_shows_defaults_and_run_fields_last():
    text = _parser().format_help()
    assert "(default: 3)" in text and "(default: 8,16)" in text and "{a,b}" in text
    assert "turn off: augment" in text
    # what the cell computes first, how to run it (out, force) after
    assert text.index("--epochs") < text.index("--labels") < text.index("--out") \
        < text.index("--force")


@pytest.mark.parametrize("name", [s for s, st in stages.TABLE.items() if st.command])
def test_every_stage_command_is_its_config(name):
    """Each `brainhpc <stage>` flag is a field of the stage's config, and back."""
    cls = stages.TABLE[name].config_class()
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    dests = {a.dest for a in sub.choices[name]._actions} - {"help"}
    fields = {f.name for f in cls.__dataclass_fields__.values()
              if f.metadata and f.metadata.get("cli", True)}
    assert dests == fields
    assert issubclass(cls, Config)  # its identity comes from the one lifecycle


# ------------------------------------------------------------------ the lifecycle

OUT = Outputs(result="result.json", wipe=("work.txt", "checkpoints"))


def _body(calls: list, status: str = "done"):
    def body(ctx):
        calls.append(ctx.ident)
        (ctx.out / "work.txt").write_text("work")
        if status != "done":
            return {"status": status}
        return ctx.finish({"value": len(calls)})
    return body


def test_skip_refuse_resume_force(tmp_path):
    calls = []
    cfg = Toy(data=tmp_path, out=tmp_path / "o")
    first = run_cell(cfg, _body(calls), OUT)
    assert first["status"] == "done" and first["config"] == cfg.identity()
    assert json.loads((cfg.out / "config.json").read_text())["status"] == "done"
    again = run_cell(cfg, _body(calls), OUT)  # finished, same identity: skipped
    assert again["skipped"] and len(calls) == 1
    other = Toy(data=tmp_path, out=tmp_path / "o", epochs=9)
    with pytest.raises(BrainhpcError, match=r"holds a finished toy run with a different config "
                                            r"\(epochs: 3 -> 9\).*--force"):
        run_cell(other, _body(calls), OUT)
    (cfg.out / "keep.txt").write_text("not the stage's")
    forced = run_cell(Toy(data=tmp_path, out=tmp_path / "o", epochs=9, force=True),
                      _body(calls), OUT)
    assert forced["config"]["epochs"] == 9 and (cfg.out / "keep.txt").exists()


def test_identity_leaves_out_how_to_run(tmp_path):
    a = Toy(data=tmp_path, out=tmp_path / "a").identity()
    b = Toy(data=tmp_path, out=tmp_path / "b", force=True).identity()
    assert a == b and "out" not in a and "force" not in a and a["data"] == str(tmp_path)


def test_unfinished_runs_resume_or_are_refused_when_they_hold_work(tmp_path):
    calls = []
    cfg = Toy(data=tmp_path, out=tmp_path / "o")
    run_cell(cfg, _body(calls, "interrupted"), OUT)
    assert json.loads((cfg.out / "config.json").read_text())["status"] == "interrupted"
    assert run_cell(cfg, _body(calls), OUT)["status"] == "done"  # resumed: same identity
    # another config over an attempt that left nothing to resume from simply runs
    fresh = Toy(data=tmp_path, out=tmp_path / "f")
    run_cell(fresh, _body(calls, "interrupted"), OUT)
    changed = Toy(data=tmp_path, out=tmp_path / "f", epochs=4)
    assert run_cell(changed, _body(calls), OUT)["config"]["epochs"] == 4
    # ... but not over a checkpoint of another config
    ckpt = Toy(data=tmp_path, out=tmp_path / "c")
    run_cell(ckpt, _body(calls, "interrupted"), OUT)
    (ckpt.out / "checkpoints").mkdir()
    (ckpt.out / "checkpoints" / "last.pt").write_bytes(b"state")
    with pytest.raises(BrainhpcError, match="holds an unfinished toy run with a different"):
        run_cell(Toy(data=tmp_path, out=tmp_path / "c", epochs=4), _body(calls), OUT)


def test_a_failure_is_recorded_and_kept_out_of_the_result(tmp_path):
    def boom(ctx):
        raise BrainhpcError("bad input")

    cfg = Toy(data=tmp_path, out=tmp_path / "o")
    with pytest.raises(BrainhpcError, match="bad input"):
        run_cell(cfg, boom, OUT)
    state = json.loads((cfg.out / "config.json").read_text())
    assert state["status"] == "failed" and "bad input" in state["error"]
    assert not (cfg.out / OUT.result).exists()
    (cfg.out / OUT.result).write_text("{not json")
    with pytest.raises(BrainhpcError, match=r"result.json: unreadable.*--force"):
        run_cell(cfg, _body([]), OUT)


def test_incremental_stages_run_again_when_finished(tmp_path):
    calls = []
    cfg = Toy(data=tmp_path, out=tmp_path / "o")
    inc = Outputs(result="summary.json", incremental=True)
    run_cell(cfg, _body(calls), inc)
    run_cell(cfg, _body(calls), inc)
    assert len(calls) == 2


def test_every_seed_is_checked_where_it_is_declared(tmp_path):
    """Seeds feed numpy's generators, which refuse negative ones: the configs refuse them first,
    so --dry-run does too (a generate cell used to train, then crash drawing its grid)."""
    from brainhpc.generate import GenerateConfig
    from brainhpc.prepare import PrepareConfig

    with pytest.raises(BrainhpcError, match="prepare: seed must be an integer >= 0, got -1"):
        PrepareConfig(out=tmp_path, phantom=20, seed=-1)
    with pytest.raises(BrainhpcError, match="generate: seed must be an integer >= 0, got -2"):
        GenerateConfig(arch="vae", label="tumour", data=tmp_path, out=tmp_path, seed=-2)

