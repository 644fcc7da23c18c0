"""The shared trainer: exact resume, signals, NaN, bad checkpoints, best-of, sampler, real DDP."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from brainhpc.errors import BrainhpcError
from brainhpc.train import TrainConfig, Trainer, init_distributed
from brainhpc.train.distributed import cpu_threads, first_host, slurm_environment
from brainhpc.train.trainer import DistributedBatchSampler

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")



class Reg:
    """A small regression task that uses every RNG the trainer must restore."""

    def __init__(self, hidden=16, signal_at=None, stop_at=None, nan_at=None, seen=None):
        self.hidden, self.signal_at, self.stop_at, self.nan_at = hidden, signal_at, stop_at, nan_at
        self.ema_decay = {"net": 0.9}
        self.seen = seen if seen is not None else []
        gen = torch.Generator().manual_seed(1)
        self.val = (torch.randn(16, 4, generator=gen), None)

    def models(self):
        return {"net": nn.Sequential(nn.Linear(4, self.hidden), nn.Tanh(), nn.Dropout(0.2),
                                     nn.Linear(self.hidden, 1))}

    def optimizers(self, models):
        return {"net": torch.optim.Adam(models["net"].parameters(), lr=1e-2)}

    def schedulers(self, optimizers):
        return {"net": torch.optim.lr_scheduler.StepLR(optimizers["net"], 4, gamma=0.5)}

    def training_step(self, t, batch):
        x, y = batch
        x = x + 0.01 * (torch.randn_like(x) + float(np.random.randn()) + random.random())
        loss = ((t.models["net"](x).squeeze(1) - y) ** 2).mean()
        opt = t.optimizers["net"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step = t.step + 1
        self.seen.append((step, t.last_saved_step))
        if step == self.signal_at:
            os.kill(os.getpid(), signal.SIGTERM)
        if step == self.stop_at:
            t.request_checkpoint(stop=True)
        if step == self.nan_at:
            return {"loss": float("nan")}
        return {"loss": loss, "const": 1.0}

    def validate(self, t):
        x = self.val[0]
        return {"score": -float(t.raw("net")(x).pow(2).mean()), "step": t.step}


def dataset(n=40):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    return torch.utils.data.TensorDataset(x, x.sum(1) + 0.1 * torch.randn(n, generator=g))


def cfg(out, **kw):
    base = dict(out=out, epochs=3, batch_size=8, seed=7, checkpoint_every=0, log_every=2,
                progress=False, device="cpu", checkpoint_minutes=0)
    return TrainConfig(**{**base, **kw})


def state(t: Trainer) -> dict:
    return {"model": t.raw("net").state_dict(), "ema": t.ema["net"].state_dict(),
            "opt": t.optimizers["net"].state_dict()["state"],
            "sched": t.schedulers["net"].state_dict()}


def assert_same(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    else:
        assert a == b


def records(path):
    drop = ("time", "img_per_s")
    return [{k: v for k, v in json.loads(x).items() if k not in drop}
            for x in Path(path).read_text().splitlines()]


def test_interrupted_then_resumed_equals_uninterrupted(tmp_path):
    ref = Trainer(Reg(), dataset(), cfg(tmp_path / "a"))
    assert ref.fit()["status"] == "done" and ref.step == 15

    cut = Trainer(Reg(signal_at=7), dataset(), cfg(tmp_path / "b"))  # SIGTERM mid-epoch 2
    first = cut.fit()
    assert first["status"] == "interrupted" and first["step"] == 7
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # our handler was removed
    # the process would die here; a new one starts from the checkpoint
    np.random.seed(123), random.seed(123), torch.manual_seed(123)
    resumed = Trainer(Reg(), dataset(), cfg(tmp_path / "b"))
    assert resumed.resumed and (resumed.step, resumed.epoch, resumed.batch_in_epoch) == (7, 1, 2)
    assert resumed.fit()["status"] == "done"
    assert_same(state(ref), state(resumed))  # bitwise: weights, EMA, Adam moments, scheduler
    assert records(tmp_path / "a" / "metrics.jsonl") == records(tmp_path / "b" / "metrics.jsonl")


def test_request_checkpoint_and_stop_then_resume(tmp_path):
    ref = Trainer(Reg(), dataset(), cfg(tmp_path / "a", epochs=2))
    ref.fit()
    t = Trainer(Reg(stop_at=5), dataset(), cfg(tmp_path / "b", epochs=2))  # at an epoch end
    assert t.fit()["status"] == "interrupted"
    resumed = Trainer(Reg(), dataset(), cfg(tmp_path / "b", epochs=2))
    resumed.fit()
    assert_same(state(ref), state(resumed))
    assert records(tmp_path / "a" / "metrics.jsonl") == records(tmp_path / "b" / "metrics.jsonl")


def test_sigusr1_saves_at_the_next_step_then_calls_the_previous_handler(tmp_path):
    calls = []
    old = signal.signal(signal.SIGUSR1, lambda s, f: calls.append(s))
    try:
        seen = []
        task = Reg(seen=seen)
        orig = task.training_step

        def step(t, batch):
            out = orig(t, batch)
            if t.step + 1 == 3:
                os.kill(os.getpid(), signal.SIGUSR1)
            return out

        task.training_step = step
        result = Trainer(task, dataset(), cfg(tmp_path)).fit()
        assert result["status"] == "done" and result["step"] == 15
        assert dict(seen)[4] == 3  # the checkpoint was written at the step-3 boundary
        assert calls == [signal.SIGUSR1]  # e.g. submitit's requeue runs after our save
        assert signal.getsignal(signal.SIGUSR1) is not None
    finally:
        signal.signal(signal.SIGUSR1, old)


def test_periodic_checkpoints_and_nan_keeps_last_good(tmp_path):
    with pytest.raises(BrainhpcError, match=r"non-finite loss at step 7 .*step 6\) kept"):
        Trainer(Reg(nan_at=7), dataset(), cfg(tmp_path, checkpoint_every=3)).fit()
    saved = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert saved["step"] == 6
    assert all(torch.isfinite(v).all() for v in saved["models"]["net"].values())
    resumed = Trainer(Reg(), dataset(), cfg(tmp_path, checkpoint_every=3))
    assert resumed.step == 6 and resumed.fit()["status"] == "done"


def test_corrupt_checkpoints_are_errors(tmp_path):
    Trainer(Reg(), dataset(), cfg(tmp_path, epochs=1)).fit()
    path = tmp_path / "checkpoints" / "last.pt"
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(BrainhpcError, match="last.pt: corrupt or unreadable checkpoint"):
        Trainer(Reg(), dataset(), cfg(tmp_path))
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(BrainhpcError, match="corrupt or unreadable"):
        Trainer(Reg(), dataset(), cfg(tmp_path))
    torch.save([1, 2, 3], path)
    with pytest.raises(BrainhpcError, match="checkpoint format 'list'"):
        Trainer(Reg(), dataset(), cfg(tmp_path))


def test_mismatched_checkpoints_are_errors(tmp_path):
    Trainer(Reg(), dataset(), cfg(tmp_path, epochs=1)).fit()
    with pytest.raises(BrainhpcError, match="different run .*model shapes differ"):
        Trainer(Reg(hidden=8), dataset(), cfg(tmp_path))
    with pytest.raises(BrainhpcError, match="batch_size: checkpoint 8 vs now 4"):
        Trainer(Reg(), dataset(), cfg(tmp_path, batch_size=4))
    with pytest.raises(BrainhpcError, match="label: checkpoint None vs now 'tumour'"):
        Trainer(Reg(), dataset(), cfg(tmp_path), fingerprint={"label": "tumour"})
    fresh = Trainer(Reg(hidden=8), dataset(), cfg(tmp_path, resume=False))
    assert fresh.step == 0  # only an explicit resume=False starts over


def test_best_checkpoint_follows_the_validation_metric(tmp_path):
    t = Trainer(Reg(), dataset(), cfg(tmp_path, best_metric="step", best_mode="min"))
    t.fit()
    best = torch.load(tmp_path / "checkpoints" / "best.pt", weights_only=True)
    assert best["best"]["value"] == 5 and best["epoch"] == 0 and t.best["value"] == 5
    vals = [r for r in records(tmp_path / "metrics.jsonl") if r["kind"] == "val"]
    assert [r["step"] for r in vals] == [5, 10, 15]
    with pytest.raises(BrainhpcError, match="best_metric 'acc' is not among"):
        Trainer(Reg(), dataset(), cfg(tmp_path / "x", best_metric="acc")).fit()


def test_metrics_log_means_over_the_window(tmp_path):
    Trainer(Reg(), dataset(), cfg(tmp_path, epochs=1, log_every=2)).fit()
    recs = [r for r in records(tmp_path / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["step"] for r in recs] == [2, 4, 5] and all(r["const"] == 1.0 for r in recs)
    assert all(r["lr_net"] > 0 and np.isfinite(r["loss"]) for r in recs)


def test_batch_sampler_splits_global_batches():
    single = DistributedBatchSampler(21, 6, 0, 1, seed=3)
    ranks = [DistributedBatchSampler(21, 6, r, 2, seed=3) for r in (0, 1)]
    for s in [single, *ranks]:
        s.set_epoch(1)
    got = [a + b for a, b in zip(*[list(s) for s in ranks], strict=True)]
    assert got == list(single) and len(got) == 3  # 21 // 6 whole global batches
    single.set_epoch(1, start=2)
    assert list(single) == got[2:]
    single.set_epoch(2)
    assert list(single) != got
    with pytest.raises(BrainhpcError, match="not divisible by the 4 processes"):
        DistributedBatchSampler(21, 6, 0, 4, seed=0)
    with pytest.raises(BrainhpcError, match="5 training items are fewer than one batch of 6"):
        DistributedBatchSampler(5, 6, 0, 1, seed=0)


def test_train_config_is_validated(tmp_path):
    with pytest.raises(BrainhpcError, match="epochs must be an integer >= 1"):
        TrainConfig(out=tmp_path, epochs=0)
    with pytest.raises(BrainhpcError, match="best_mode must be 'max' or 'min'"):
        TrainConfig(out=tmp_path, best_mode="up")
    with pytest.raises(BrainhpcError, match="device 'tpu' is not one of auto, cpu, cuda"):
        init_distributed("tpu")


@pytest.mark.parametrize("submitit_job", [True, False])
def test_slurm_tasks_export_the_torch_environment(monkeypatch, submitit_job):
    """SLURM task variables become RANK/WORLD_SIZE/MASTER_* (the group itself is faked)."""
    drop = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE",
            "SUBMITIT_EXECUTOR")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update({"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "2", "SLURM_PROCID": "1",
                "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "node7", "SLURM_NNODES": "1",
                "SLURM_NODEID": "0", "SLURM_STEP_NODELIST": "node7", "SLURM_JOB_NUM_NODES": "1"})
    if submitit_job:
        env["SUBMITIT_EXECUTOR"] = "slurm"
    monkeypatch.setattr(os, "environ", env)  # the export writes here, not into the real env
    calls = {}
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda **kw: calls.update(kw))
    info = init_distributed("cpu")
    assert (info.rank, info.world_size, info.local_rank, info.backend) == (1, 2, 1, "gloo")
    assert calls["backend"] == "gloo" and calls["rank"] == 1 and calls["world_size"] == 2
    assert os.environ["MASTER_ADDR"] == "node7" and int(os.environ["MASTER_PORT"]) >= 20000
    assert ("SUBMITIT_EXECUTOR" in os.environ) == submitit_job


def test_slurm_environment_from_a_fake_step():
    step = {"SLURM_JOB_ID": "777", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "8",
            "SLURM_STEP_NUM_TASKS": "4", "SLURM_PROCID": "3", "SLURM_LOCALID": "1",
            "SLURM_JOB_NODELIST": "cn[01-04]", "SLURM_STEP_NODELIST": "gpu[07-08,12],cpu3",
            "SLURM_JOB_NUM_NODES": "4", "SLURM_STEP_NUM_NODES": "2"}
    got = slurm_environment(step)
    assert {k: got[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                                "MASTER_ADDR")} == {
        "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "gpu07"}  # the step's tasks and nodes, not the job's
    assert 20000 <= int(got["MASTER_PORT"]) <= 60000
    assert slurm_environment({**step, "SLURM_PROCID": "0"})["MASTER_PORT"] == got["MASTER_PORT"]
    assert slurm_environment({**step, "SLURM_STEP_ID": "1"})["MASTER_PORT"] != got["MASTER_PORT"]
    assert slurm_environment({**step, "MASTER_PORT": "29400"})["MASTER_PORT"] == "29400"
    job_only = {k: v for k, v in step.items() if not k.startswith("SLURM_STEP")}
    assert slurm_environment(job_only)["WORLD_SIZE"] == "8"
    assert slurm_environment(job_only)["MASTER_ADDR"] == "cn01"
    batch = {k: v for k, v in job_only.items() if k != "SLURM_PROCID"}
    assert slurm_environment(batch) is None  # the batch script is one process, not a task
    assert slurm_environment({**step, "SLURM_STEP_NUM_TASKS": "1"}) is None
    assert slurm_environment({}) is None
    with pytest.raises(BrainhpcError, match="SLURM_PROCID=4 is outside the step's 4 tasks"):
        slurm_environment({**step, "SLURM_PROCID": "4"})
    with pytest.raises(BrainhpcError, match="SLURM_NTASKS='two' is not an integer"):
        slurm_environment({**job_only, "SLURM_NTASKS": "two"})
    assert first_host("node7") == "node7" and first_host("a[3,5-6]-ib,b1") == "a3-ib"
    with pytest.raises(BrainhpcError, match="node list 'n\\[01-02'"):
        first_host("n[01-02")


def test_cpu_threads_share_the_cores_between_local_ranks():
    assert cpu_threads(2, current=8, cpus=16) == 8  # never more than asked for
    assert cpu_threads(4, current=16, cpus=16) == 4
    assert cpu_threads(3, current=16, cpus=2) == 1
    assert cpu_threads(1, current=1, cpus=64) == 1


DDP_SCRIPT = textwrap.dedent("""
    import faulthandler, os, sys, torch
    # a hung rank prints where it is stuck (then exits) well before the test gives up on it
    faulthandler.dump_traceback_later(int(os.environ.get("DDP_DUMP_AFTER", "150")), exit=True)
    from torch import nn
    from brainhpc.train import TrainConfig, Trainer
    from brainhpc.models import build_task
    torch.set_num_threads(1)
    out = sys.argv[1]

    class Lin:
        ema_decay = {"net": 0.5}
        def models(self):
            return {"net": nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1))}
        def optimizers(self, m):
            return {"net": torch.optim.SGD(m["net"].parameters(), lr=0.05, momentum=0.9)}
        def training_step(self, t, batch):
            x, y = batch
            loss = ((t.models["net"](x).squeeze(1) - y) ** 2).mean()
            t.optimizers["net"].zero_grad(); loss.backward(); t.optimizers["net"].step()
            return {"loss": loss}

    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 6, generator=g)
    ds = torch.utils.data.TensorDataset(x, x[:, 0] - x[:, 1])
    cfg = dict(epochs=3, batch_size=8, seed=1, progress=False, device="cpu", log_every=3,
               checkpoint_minutes=0)
    with Trainer(Lin(), ds, TrainConfig(out=out + "/lin", **cfg)) as t:
        t.fit()
        torch.save({"net": t.raw("net").state_dict(), "ema": t.ema["net"].state_dict()},
                   f"{out}/lin-rank{t.rank}-of{t.world_size}.pt")
    imgs = torch.randint(0, 256, (32, 1, 32, 32), dtype=torch.uint8)
    task = build_task("wgan-gp", 32, {"g_channels": 8, "min_channels": 4, "d_channels": 4,
                                      "n_critic": 2})
    with Trainer(task, torch.utils.data.TensorDataset(imgs),
                 TrainConfig(out=out + "/gan", **{**cfg, "epochs": 1})) as t:
        t.fit()
        torch.save({k: dict(t.raw(k).named_parameters()) for k in ("generator", "critic")},
                   f"{out}/gan-rank{t.rank}-of{t.world_size}.pt")
""")


def _run_hard(cmd, env, timeout, out_dir=None, connect_retries=0):
    """Run ``cmd`` in its own session; on a hang kill the whole group (the ranks too, which
    would otherwise keep the pipes open) and fail with every rank's output.

    ``connect_retries``: on this sandbox (gVisor) gloo's TCP transport sometimes never sees the
    peer's connection inside ``init_process_group`` (py-spy: rank 0 holds two established
    sockets that rank 1 never accepts; a bare init + all_reduce script does it too). Only a hang
    whose stack dumps show ``init_process_group`` is retried, with a warning; any other hang fails.
    """
    for attempt in range(connect_retries + 1):
        if out_dir is not None:
            shutil.rmtree(out_dir, ignore_errors=True)
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=timeout)
            hung = "Timeout (" in out  # a rank's faulthandler dump (it then exits)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            hung = True
        if hung and "init_process_group" in out and attempt < connect_retries:
            warnings.warn(f"gloo rendezvous hung in init_process_group (attempt {attempt + 1}); "
                          f"known sandbox transport problem, retrying", stacklevel=2)
            continue
        if hung:
            pytest.fail(f"{' '.join(cmd[2:5])} hung; output of all ranks (each dumped its "
                        f"Python stacks first):\n{out[-12000:]}")
        assert proc.returncode == 0, out[-12000:]
        return


@pytest.mark.slow  # torchrun with 2 processes plus a single-process reference: ~15-30 s
@pytest.mark.xfail(raises=pytest.fail.Exception, strict=False,
                   reason="gloo's TCP rendezvous sometimes never connects under this sandbox "
                          "(gVisor), even for a bare init + all_reduce; a hang that survives the "
                          "retry is reported as xfail, any wrong result still fails")
def test_two_process_gloo_ddp_matches_single_process(tmp_path):
    script = tmp_path / "ddp_run.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
           "PYTHONFAULTHANDLER": "1", "DDP_DUMP_AFTER": "80"}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "SLURM_JOB_ID", "SLURM_NTASKS",
                "SLURM_PROCID", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node=2", "--tee=3", str(script), str(tmp_path / "ddp")]
    _run_hard(torchrun, env, timeout=100, out_dir=tmp_path / "ddp", connect_retries=1)
    _run_hard([sys.executable, str(script), str(tmp_path / "one")], env, timeout=120)

    def load(name):
        return torch.load(name, weights_only=True)

    ddp = tmp_path / "ddp"
    r0, r1 = load(ddp / "lin-rank0-of2.pt"), load(ddp / "lin-rank1-of2.pt")
    one = load(tmp_path / "one" / "lin-rank0-of1.pt")
    for part in ("net", "ema"):
        for k in r0[part]:
            assert torch.equal(r0[part][k], r1[part][k])  # replicas identical
            torch.testing.assert_close(r0[part][k], one[part][k], rtol=0, atol=1e-5)
    g0, g1 = load(ddp / "gan-rank0-of2.pt"), load(ddp / "gan-rank1-of2.pt")
    for model in g0:
        for k in g0[model]:
            assert torch.equal(g0[model][k], g1[model][k]), (model, k)
    logs = (tmp_path / "ddp" / "lin" / "metrics.jsonl").read_text().splitlines()
    assert len(logs) == 6  # rank 0 alone wrote the log: steps 3..18 every 3
