"""Issue 23, the training path on GPUs, tested as far as a CPU allows: resume across a layout
change (fused Adam), the precision in identity and fingerprint, a failing rank that takes its
peers down at once, a job environment that already holds MASTER_PORT/RANK, no host syncs in
a training step, device-resident batches, GPU placement and SyncBatchNorm."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from torch import nn

from brainhpc.errors import BrainhpcError
from brainhpc.train import distributed as D
from brainhpc.train.trainer import sync_batchnorm

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")

pytestmark = pytest.mark.usefixtures("one_thread")


def fake_gpu(monkeypatch, major: int, count: int = 1):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, 0))


# ------------------------------------------------------------------ 3. a failing rank
def test_a_failed_teardown_never_enters_the_barrier(monkeypatch):
    calls = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "barrier", lambda **kw: calls.append("barrier"))
    monkeypatch.setattr(dist, "destroy_process_group", lambda: calls.append("destroy"))
    watch = SimpleNamespace(publish=lambda why: calls.append(f"publish {why}"),
                            stop=lambda: calls.append("stop"))
    info = D.DistInfo(0, 2, 0, CPU, "gloo", owns_group=True, watch=watch)
    D.teardown(info, failed=OSError("Disk quota exceeded"))
    assert calls == ["publish OSError: Disk quota exceeded", "destroy"]
    D.teardown(info, failed=True)  # idempotent: the group is gone
    assert len(calls) == 2
    info = D.DistInfo(0, 2, 0, CPU, "gloo", owns_group=True, watch=watch)
    D.teardown(info)
    assert calls[2:] == ["barrier", "stop", "destroy"]  # a normal end: the barrier first


def test_peer_watch_ends_the_process_when_a_peer_failed(monkeypatch):
    exits, seen = [], []
    monkeypatch.setattr(os, "_exit", exits.append)
    monkeypatch.setattr(D.logging, "shutdown", lambda: None)
    store = dist.HashStore()
    info = D.DistInfo(1, 2, 1, CPU, "gloo", on_peer_failure=seen.append)
    watch = D.PeerWatch(store, info, poll_s=0.01)
    watch.thread.start()
    store.set(D.FAILED_KEY, "rank 0 failed: OSError: Disk quota exceeded")
    watch.thread.join(timeout=10)
    assert exits == [D.PEER_FAILED_EXIT] and seen == ["rank 0 failed: OSError: Disk quota exceeded"]
    # a watch stopped by a normal teardown ignores a peer that leaves afterwards
    quiet = D.PeerWatch(dist.HashStore(), info, poll_s=0.01)
    quiet.stop()
    quiet._end("rank 0's store is unreachable")
    assert exits == [D.PEER_FAILED_EXIT]


def test_the_group_timeout_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(D.TIMEOUT_ENV, raising=False)
    assert D._timeout_minutes(30.0) == 30.0
    monkeypatch.setenv(D.TIMEOUT_ENV, "5")
    assert D._timeout_minutes(30.0) == 5.0
    monkeypatch.setenv(D.TIMEOUT_ENV, "soon")
    with pytest.raises(BrainhpcError, match="BRAINHPC_DIST_TIMEOUT_MINUTES='soon'"):
        D._timeout_minutes(30.0)


FAIL_SCRIPT = textwrap.dedent("""
    import faulthandler, os, sys, time
    faulthandler.dump_traceback_later(int(os.environ["DUMP_AFTER"]), exit=True)
    import torch
    from torch import nn
    from brainhpc.train import TrainConfig, Trainer
    torch.set_num_threads(1)
    mode, out = sys.argv[1], sys.argv[2]
    rank = int(os.environ["RANK"])

    class Lin:
        def models(self):
            return {"net": nn.Linear(4, 1)}
        def optimizers(self, m):
            return {"net": torch.optim.SGD(m["net"].parameters(), lr=0.01)}
        def training_step(self, t, batch):
            x, y = batch
            if mode == "stuck" and t.step == 3:  # between collectives
                if t.rank == 0:
                    raise OSError(122, "Disk quota exceeded")
                time.sleep(600)  # like a NCCL wait that never notices a dead peer
            loss = ((t.models["net"](x).squeeze(1) - y) ** 2).mean()
            t.optimizers["net"].zero_grad(); loss.backward(); t.optimizers["net"].step()
            return {"loss": loss.detach()}

    if rank == 0 and mode == "train":  # a full disk: rank 0 alone raises in a checkpoint
        real_save = torch.save
        def save(obj, f, *a, **k):
            if "last.pt" in str(f):
                raise OSError(122, "Disk quota exceeded")
            return real_save(obj, f, *a, **k)
        torch.save = save
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 4, generator=g)
    data = torch.utils.data.TensorDataset(x, x.sum(1))
    cfg = TrainConfig(out=out, epochs=50, batch_size=8, progress=False, device="cpu",
                      checkpoint_every=2, checkpoint_minutes=0, log_every=5)
    with Trainer(Lin(), data, cfg) as t:
        t.fit()
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_ranks(script: Path, mode: str, out: Path, timeout: float) -> list[tuple[int, str]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_"))}
    env.update({"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
                "LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
                "DUMP_AFTER": str(int(timeout) - 10), "PYTHONFAULTHANDLER": "1"})
    procs = [subprocess.Popen([sys.executable, str(script), mode, str(out)],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True) for r in (0, 1)]
    t_end = time.monotonic() + timeout
    results = []
    for proc in procs:
        try:
            text, _ = proc.communicate(timeout=max(1.0, t_end - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            text, _ = proc.communicate()
            text += "\n[killed by the test: hung]"
        results.append((proc.returncode, text))
    return results


# where the sandbox's gloo transport hangs (test_trainer): the rendezvous and DDP's first collective
SANDBOX_HANGS = ("init_process_group", "_verify_param_shape_across_processes")


def _two_ranks(script: Path, mode: str, out: Path, timeout: float) -> list[tuple[int, str]]:
    """Rank 0 and 1 as two plain processes (like SLURM tasks: no launcher that would kill the
    survivor); their exit status and output. A hang fails, unless it is the sandbox's gloo
    transport before training starts (see test_trainer): retried once, then an xfail."""
    for _ in range(2):
        shutil.rmtree(out, ignore_errors=True)
        results = _start_ranks(script, mode, out, timeout)
        outs = "\n".join(f"--- rank {r}: exit {c}\n{t[-4000:]}"
                         for r, (c, t) in enumerate(results))
        hung = any("Timeout (" in t or "[killed by the test" in t for _, t in results)
        if not hung:
            return results
        if not any(where in outs for where in SANDBOX_HANGS):
            pytest.fail(f"a rank hung:\n{outs}")
    pytest.xfail("gloo's transport hung before training (known sandbox problem, test_trainer)")


@pytest.mark.slow  # two processes, each importing torch: ~15 s
@pytest.mark.parametrize("mode", ["train", "stuck"])
def test_when_rank0_alone_raises_both_ranks_exit(tmp_path, mode):
    """Rank 0 fails saving a checkpoint while rank 1 goes on to the next collective ("train"),
    or fails between collectives while rank 1 is busy where it would notice nothing ("stuck",
    what a NCCL wait is). Both must exit, with failure, long before any group timeout
    (a generous bound: the test never asserts a speed)."""
    script = tmp_path / "fail.py"
    script.write_text(FAIL_SCRIPT)
    (r0, out0), (r1, out1) = _two_ranks(script, mode, tmp_path / "out", timeout=90)
    assert r0 != 0 and "Disk quota exceeded" in out0, out0[-4000:]
    assert r1 != 0, out1[-4000:]
    if mode == "stuck":  # only the peer watch can end it
        assert r1 == D.PEER_FAILED_EXIT, out1[-4000:]
        assert "rank 0 failed: OSError" in out1 or "(rank 0) is unreachable" in out1, out1


# ------------------------------------------------------------------ 4. MASTER_PORT/RANK preset
def slurm_task_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "SUBMITIT_")) and k not in (
               "WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
               "LOCAL_WORLD_SIZE")}
    env.update({"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "2", "SLURM_PROCID": "1",
                "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "node7", "SLURM_NNODES": "1",
                "SLURM_NODEID": "0", "SLURM_STEP_NODELIST": "node7", "SLURM_JOB_NUM_NODES": "1",
                "SLURM_STEP_ID": "0", "SUBMITIT_EXECUTOR": "slurm", **extra})
    return env


def test_preset_master_port_and_rank_are_accepted(monkeypatch):
    """sbatch hands the tasks the submitting shell's environment: a MASTER_PORT or RANK there
    must not stop a multi-GPU cell (the trainer takes SLURM's task, keeps the port)."""
    import submitit

    calls = {}
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: calls.update(kw))
    monkeypatch.setattr(D.PeerWatch, "start", classmethod(lambda cls, info: None))
    monkeypatch.setattr(os, "environ", slurm_task_env(MASTER_PORT="29411", RANK="0"))
    info = D.init_distributed("cpu")  # srun tasks without submitit's export
    assert (info.rank, info.world_size, calls["rank"]) == (1, 2, 1)
    assert os.environ["MASTER_PORT"] == "29411" and os.environ["RANK"] == "1"
    # what sweep/runner.py should do: submitit's export, allowed to overwrite the shell's values
    monkeypatch.setattr(os, "environ", slurm_task_env(MASTER_PORT="29411", RANK="0"))
    submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False,
                                                          overwrite=True)
    info = D.init_distributed("cpu")
    assert (info.rank, info.world_size, calls["rank"], calls["world_size"]) == (1, 2, 1, 2)
    assert os.environ["MASTER_PORT"] == "29411" and os.environ["MASTER_ADDR"] == "node7"


@pytest.mark.xfail(raises=RuntimeError, strict=False,
                   reason="issue 23: brainhpc/sweep/runner.py exports the torch environment with "
                          "overwrite=False (submitit refuses a preset MASTER_PORT/RANK); the "
                          "one-line fix belongs to the sweep's worktree")
def test_the_sweep_runner_accepts_a_preset_master_port(monkeypatch, tmp_path):
    from brainhpc.sweep.runner import CellRunner

    monkeypatch.setattr(os, "environ", slurm_task_env(MASTER_PORT="29411", RANK="0",
                                                      SUBMITIT_FOLDER=str(tmp_path)))
    assert CellRunner()([]) == []
    assert os.environ["RANK"] == "1" and os.environ["MASTER_PORT"] == "29411"


# ------------------------------------------------------------------ 8. GPU placement, SyncBatchNorm
def test_each_rank_gets_its_own_gpu_or_a_loud_refusal():
    assert D.gpu_index(0, 1, 1, env={}) == 0
    assert D.gpu_index(3, 4, 4, env={}) == 3  # several visible: the local rank's
    assert D.gpu_index(1, 2, 1, env={"CUDA_VISIBLE_DEVICES": "1"}) == 0  # one per task
    assert D.gpu_index(2, 4, 8, env={}) == 2
    with pytest.raises(BrainhpcError, match="4 ranks on this node but 2 visible GPU"):
        D.gpu_index(0, 4, 2, env={})  # every rank refuses, not only those past the GPUs
    with pytest.raises(BrainhpcError, match="2 ranks on this node but 1 visible GPU.*unset"):
        D.gpu_index(1, 2, 1, env={})  # one GPU that every task sees


def test_pick_device_uses_the_local_rank(monkeypatch):
    fake_gpu(monkeypatch, 8, count=4)
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    assert D._pick_device("auto", 2, 4) == torch.device("cuda", 2)
    assert chosen == [torch.device("cuda", 2)]
    with pytest.raises(BrainhpcError, match="8 ranks on this node but 4 visible"):
        D._pick_device("cuda", 1, 8)
    assert D._pick_device("cpu", 3, 8) == CPU


def test_batchnorm_is_synchronised_across_gpus_only():
    def models():
        return {"net": nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)),
                "bn": nn.BatchNorm2d(4)}

    gpu = torch.device("cuda", 0)
    for world, dev in ((1, gpu), (2, CPU)):
        same = sync_batchnorm(models(), world, dev)
        assert not any(isinstance(m, nn.SyncBatchNorm) for v in same.values()
                       for m in v.modules())
    before = models()
    weight = before["net"][1].weight
    synced = sync_batchnorm(before, 2, gpu)
    assert isinstance(synced["net"][1], nn.SyncBatchNorm) and isinstance(synced["bn"],
                                                                        nn.SyncBatchNorm)
    assert synced["net"][1].weight is weight  # the same parameters: optimisers still hold them
