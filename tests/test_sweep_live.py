"""The live status of a local run (brainhpc.sweep.status.Board): which cell runs, its epoch and
elapsed time, redrawn in place on a terminal and as change lines in a log; and the same through
a real local run of cells."""

import io
import json
import time

from brainhpc.fsio import write_json
from brainhpc.sweep.plan import Cell
from brainhpc.sweep.status import Board


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def _cells(tmp_path) -> list[Cell]:
    return [Cell("generate", "vae-healthy", {"arch": "vae"}, str(tmp_path)),
            Cell("classify", "cnn-real-s0", {"model": "cnn"}, str(tmp_path))]


def _mark(cell: Cell, status: str, **extra) -> None:
    write_json(cell.marker, {"status": status, "config_hash": cell.hash, **extra})


def test_board_lines_in_a_log_follow_the_cells(tmp_path):
    gen, cls = _cells(tmp_path)
    out = io.StringIO()
    board = Board([gen, cls], out, quiet_s=3600)
    _mark(cls, "done", started=time.time() - 500)  # an earlier attempt's: not this run's state
    board.refresh()
    board.submitted[(gen.stage, gen.id)] = time.time() - 80  # handed to the executor earlier
    _mark(gen, "running", started=time.time() - 75)
    write_json(gen.folder / "progress.json", {"epoch": 3, "epochs": 18, "step": 41,
                                              "steps": 100})
    board.refresh()
    board.refresh()  # nothing changed: no new line
    _mark(gen, "done", started=time.time() - 75, wall_seconds=80.0)
    board.submit(cls)
    _mark(cls, "failed", started=time.time())
    board.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 3, lines
    assert lines[0].endswith("2 waiting")
    assert "1 running, 1 waiting | generate/vae-healthy epoch 3/18, 41% 1:15" in lines[1]
    assert lines[2].endswith("1 done, 1 failed")


def test_board_redraws_a_table_on_a_terminal(tmp_path):
    gen, cls = _cells(tmp_path)
    out = Tty()
    board = Board([gen, cls], out)
    board.submit(gen)
    _mark(gen, "running", started=time.time())
    write_json(gen.folder / "progress.json", {"epoch": 1, "epochs": 2, "step": 5, "steps": 10})
    board.refresh()
    first = out.getvalue()
    assert "\x1b[" not in first  # nothing to overwrite yet
    assert "vae-healthy" in first and "running" in first and "epoch 1/2, 50%" in first
    board.refresh()
    again = out.getvalue()[len(first):]
    assert again.startswith(f"\x1b[{len(first.splitlines())}F\x1b[J")  # drawn over the old one
    # a marker of another config (an earlier run of the folder) is not this cell's state
    board.submit(cls)
    write_json(cls.marker, {"status": "done", "config_hash": "other", "started": time.time()})
    assert [r["state"] for r in board.rows()] == ["running", "starting"]


def test_a_local_run_shows_its_cells_while_they_run(tmp_path, capsys):
    """Through submitit's local executor: a summary line per change, then the final table."""
    from brainhpc.sweep.cli import main

    sweep = tmp_path / "live.toml"
    sweep.write_text('name = "live"\n[data]\nphantom = 60\nsize = 32\n'
                     '[generate]\narchs = ["vae"]\nlabels = ["healthy"]\nepochs = 2\n'
                     'n_samples = 16\nbatch_size = 8\nmin_images = 8\nquality = false\n')
    assert main([str(sweep), "--executor", "local", "--run-dir", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "local run of 3 cells" in out
    lines = [x for x in out.splitlines() if x.startswith("[")]
    # a line whenever a cell changes state: handed to its process, finished (at the least)
    assert len(lines) >= 4 and lines[0].endswith("] 1 starting, 2 waiting"), lines
    assert lines[-1].endswith("] 3 done"), lines
    progress = json.loads((tmp_path / "run" / "generate" / "vae-healthy" /
                           "progress.json").read_text())
    assert progress["epoch"] == progress["epochs"] == 2 and progress["step"] == progress["steps"]


def test_sweep_status_shows_the_epoch_of_running_cells(tmp_path):
    from brainhpc.sweep.status import cell_states, table

    write_json(tmp_path / "sweep.json", {"name": "x"})
    gen, cls = _cells(tmp_path)
    _mark(gen, "running", started=time.time())
    write_json(gen.folder / "progress.json", {"epoch": 2, "epochs": 5, "step": 30,
                                              "steps": 75})
    _mark(cls, "done", wall_seconds=3.0)
    write_json(cls.folder / "progress.json", {"epoch": 5, "epochs": 5, "step": 75,
                                              "steps": 75})
    rows = {r["cell"]: r for r in cell_states(tmp_path, queued={})}
    assert rows["vae-healthy"]["progress"] == "epoch 2/5, 40%"
    assert rows["cnn-real-s0"]["progress"] == ""  # only running cells show where they are
    assert "epoch 2/5, 40%" in table(list(rows.values()))
