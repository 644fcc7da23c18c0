"""What a SLURM array task does on the pre-timeout signal (SIGUSR2) and on preemption (SIGTERM):
checkpoint, leave a requeue flag for the sbatch teardown (never scontrol in the job), drop
--force, count time-outs; plus device=cuda failing loudly and packed cells. submitit's own
signal handler is used for real; SLURM is faked by its environment variables only. The same
through the real cluster and a stand-in container: test_sweep_slurm.py."""

import json
import os
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import submitit
import torch
from submitit.core import utils as sutils
from submitit.slurm.slurm import SlurmJobEnvironment

from brainhpc.errors import BrainhpcError
from brainhpc.sweep import runner as cells_mod
from brainhpc.sweep.plan import Cell, stage_config
from brainhpc.sweep.runner import CellRunner, read_marker, requeue_flag


def _cell(tmp_path: Path, cid: str = "cnn-real-s0", stage: str = "classify") -> Cell:
    return Cell(stage, cid, {"model": "cnn", "train_data": "real", "seed": 0},
                str(tmp_path / "run"))


@pytest.fixture
def slurm_task(tmp_path, monkeypatch):
    """This process as task 0 of SLURM job 4242 (environment only), submitit's handlers set up
    as submitit.core._submit does; no Slurm client reachable (PATH is empty)."""
    folder = tmp_path / "logs"
    folder.mkdir()
    for key, value in {"SLURM_JOB_ID": "4242", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
                       "SLURM_NTASKS": "1", "SLURM_JOB_NUM_NODES": "1", "SLURM_NODEID": "0",
                       "SUBMITIT_EXECUTOR": "slurm", "SUBMITIT_FOLDER": str(folder),
                       "PATH": str(tmp_path / "empty-bin")}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    saved = {s: signal.getsignal(s) for s in (signal.SIGUSR2, signal.SIGTERM, signal.SIGCONT)}

    def start(runner: CellRunner, arg, countdown: int = 3):
        delayed = sutils.DelayedSubmission(runner, arg)
        delayed.set_timeout(30, countdown)
        env = submitit.JobEnvironment()
        assert isinstance(env, SlurmJobEnvironment)
        env._handle_signals(env.paths, delayed)
        return env, delayed

    yield start
    for s, h in saved.items():
        signal.signal(s, h)


def _fake_stage(monkeypatch, calls: list, behaviour=None):
    def run_stage(cell, force=False, device="auto"):
        calls.append({"cell": cell.id, "force": force, "device": device})
        if behaviour:
            return behaviour(cell)
        return {"status": "done"}
    monkeypatch.setattr(cells_mod, "run_stage", run_stage)


class _FakeTrainer:
    def __init__(self):
        self.requests = []

    def request_checkpoint(self, stop=False):
        self.requests.append(stop)


@pytest.mark.parametrize("sig", [signal.SIGUSR2, signal.SIGTERM])
def test_signal_mid_training_checkpoints_then_leaves_a_flag_not_scontrol(
        tmp_path, monkeypatch, slurm_task, sig):
    """SIGUSR2 (time limit ahead) and SIGTERM (preemption) take the same path: the trainer is
    asked to save and stop, the stage returns "interrupted", the requeued submission is dumped
    without --force and the flag for the host's teardown is left; nothing calls scontrol (not on
    PATH here, as in a container)."""
    trainer = _FakeTrainer()
    training = []
    monkeypatch.setattr(cells_mod, "_live_trainer", lambda: trainer if training else None)
    calls = []

    def interrupted(cell):
        training.append(True)
        os.kill(os.getpid(), sig)  # arrives mid-"training"
        training.clear()  # fit() returned: its signal handlers are gone
        return {"status": "interrupted"}

    _fake_stage(monkeypatch, calls, interrupted)
    cell = _cell(tmp_path)
    runner = CellRunner(force=True, device="cpu")
    env, delayed = slurm_task(runner, cell)
    with pytest.raises(SystemExit):  # submitit's "exit after requeue"
        runner(cell)
    assert trainer.requests == [True], "the trainer was not asked to checkpoint and stop"
    assert calls == [{"cell": cell.id, "force": True, "device": "cpu"}]
    assert read_marker(cell)["status"] == "interrupted"
    flag = requeue_flag(os.environ["SUBMITIT_FOLDER"], "4242")
    assert json.loads(flag.read_text())["timeouts_left"] == 3  # preempted, not timed out
    again = sutils.DelayedSubmission.load(env.paths.submitted_pickle)
    assert isinstance(again.function, CellRunner)
    assert again.function.force is False and again.function.device == "cpu"
    assert again.args == (cell,)


def test_force_never_survives_a_requeue(tmp_path, monkeypatch, slurm_task):
    """A forced cell that is requeued by SLURM itself (node failure, PreemptMode=REQUEUE: the
    original submission with force=True runs again) resumes instead of wiping its checkpoint."""
    calls = []
    _fake_stage(monkeypatch, calls)
    cell = _cell(tmp_path)
    runner = CellRunner(force=True, device="cpu")
    slurm_task(runner, cell)
    runner(cell)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    runner(cell)
    assert [c["force"] for c in calls] == [True, False]
    assert read_marker(cell)["restarts"] == 1
    assert runner.checkpoint(cell).function.force is False


def test_time_outs_are_counted_against_max_num_timeout(tmp_path, monkeypatch, slurm_task):
    """After max_num_timeout time-outs the task is not requeued (no flag): it fails instead."""
    calls = []
    _fake_stage(monkeypatch, calls)
    cell = _cell(tmp_path)
    runner = CellRunner(device="cpu")
    env, delayed = slurm_task(runner, cell, countdown=0)
    handler = signal.getsignal(signal.SIGUSR2).__self__
    handler._start_time -= 3600  # ran past the guaranteed part of its 30 min: a time-out
    runner._submitit, runner._signal = handler.checkpoint_and_try_requeue, signal.SIGUSR2
    with pytest.raises(sutils.UncompletedJobError, match="timed-out too many times"):
        runner._requeue()
    assert not requeue_flag(os.environ["SUBMITIT_FOLDER"], "4242").exists()


def test_signal_between_packed_cells_requeues_the_unfinished_ones(tmp_path, monkeypatch,
                                                                   slurm_task):
    monkeypatch.setattr(cells_mod, "_live_trainer", lambda: None)
    calls = []
    pack = [_cell(tmp_path, f"cnn-real-s{i}") for i in range(3)]

    def first_then_signal(cell):
        if cell.id == pack[0].id:
            return {"status": "done"}
        os.kill(os.getpid(), signal.SIGUSR2)  # not training: requeue at once
        raise AssertionError("the signal handler should have exited")

    _fake_stage(monkeypatch, calls, first_then_signal)
    runner = CellRunner(device="cpu")
    env, _ = slurm_task(runner, pack)
    with pytest.raises(SystemExit):
        runner(pack)
    again = sutils.DelayedSubmission.load(env.paths.submitted_pickle)
    assert [c.id for c in again.args[0]] == [pack[1].id, pack[2].id]  # the done one is dropped
    assert requeue_flag(os.environ["SUBMITIT_FOLDER"], "4242").exists()


def test_a_failing_packed_cell_does_not_stop_the_others(tmp_path, monkeypatch):
    calls = []

    def second_fails(cell):
        if cell.id.endswith("s1"):
            raise BrainhpcError("batch larger than the training set")
        return {"status": "done"}

    _fake_stage(monkeypatch, calls, second_fails)
    pack = [_cell(tmp_path, f"cnn-real-s{i}") for i in range(3)]
    with pytest.raises(BrainhpcError, match=r"1 of 3 packed cells failed.*cnn-real-s1"):
        CellRunner()(pack)
    assert [c["cell"] for c in calls] == [c.id for c in pack]
    assert [read_marker(c)["status"] for c in pack] == ["done", "failed", "done"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_cell_without_cuda_fails_loudly(tmp_path, monkeypatch):
    calls = []
    _fake_stage(monkeypatch, calls)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    cell = _cell(tmp_path)
    with pytest.raises(BrainhpcError, match=r"GPUs were requested \(device=cuda\).*no CUDA.*"
                       r"CUDA_VISIBLE_DEVICES=0.*--nv.*driver"):
        CellRunner(device="cuda")(cell)
    assert calls == [], "the stage ran without its GPU"
    marker = read_marker(cell)
    assert marker["status"] == "failed" and "sees no CUDA device" in marker["error"]


def test_device_comes_from_the_resources_not_the_options(tmp_path):
    cell = _cell(tmp_path)
    assert stage_config(cell, device="cuda").device == "cuda"
    bad = Cell("classify", "x", {**cell.params, "device": "cpu"}, cell.run_dir)
    with pytest.raises(BrainhpcError, match="device.: the sweep sets it from the resources"):
        stage_config(bad)


def test_wall_time_adds_up_over_attempts(tmp_path, monkeypatch, slurm_task):
    """cell.json's wall_seconds is the last attempt's, wall_seconds_total all attempts' of this
    config (an interrupted one, a failed one, the finishing one); --force starts the count again."""
    clock = iter(range(0, 1000, 10))  # each time.time() call: 10 s later
    monkeypatch.setattr(cells_mod, "time", SimpleNamespace(time=lambda: float(next(clock))))
    outcomes = iter([{"status": "interrupted"}, RuntimeError("disk full"), {"status": "done"},
                     {"status": "done"}])

    def behaviour(cell):
        out = next(outcomes)
        if isinstance(out, Exception):
            raise out
        return out

    _fake_stage(monkeypatch, [], behaviour)
    cell = _cell(tmp_path)
    slurm_task(CellRunner(device="cpu"), cell)
    totals = []
    for force in (False, False, False, True):
        try:
            CellRunner(force=force, device="cpu")._run(cell, cells_mod._job_env(), force)
        except RuntimeError:
            pass
        m = read_marker(cell)
        totals.append((m["status"], m["wall_seconds"], m["wall_seconds_total"]))
    # t0 and the finishing time() are 10 s apart in every attempt (one call each)
    assert totals == [("interrupted", 10, 10), ("failed", 10, 20), ("done", 10, 30),
                      ("done", 10, 10)]
