"""Precision: what auto resolves to, bf16 vs fp32 agreement, what the trainer does with it (layout,
fused optimisers, exact resume), where it is recorded, validation every k epochs, threads, and
gpu-check's parts that run without a GPU."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from brainhpc import gpu_check
from brainhpc.errors import BrainhpcError
from brainhpc.train import TrainConfig, Trainer
from brainhpc.train import precision as P
from brainhpc.train.distributed import allocated_cpus

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")
REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ resolve
@pytest.fixture
def table(monkeypatch):
    """A known speed-up table on an avx512_bf16 CPU."""
    monkeypatch.setattr(P, "cpu_bf16_hardware", lambda: "avx512_bf16")
    monkeypatch.setattr(P, "SPEEDUP", {"avx512_bf16": {"fast": {64: 2.0, 128: 3.0},
                                                       "mixed": {64: 1.05, 128: 1.8},
                                                       "ddpm": {64: 2.0}},
                                       "cuda": {"slow-on-gpu": {128: 0.8}}})


def test_auto_takes_bf16_only_where_it_was_measured_faster(table):
    assert P.resolve("auto", CPU, "fast", 64).name == "bf16"
    assert P.resolve("auto", CPU, "mixed", 64).name == "fp32"  # 1.05x < MIN_SPEEDUP
    assert P.resolve("auto", CPU, "mixed", 128).name == "bf16"
    assert P.resolve("auto", CPU, "mixed", 256).name == "bf16"  # nearest measured size: 128
    unknown = P.resolve("auto", CPU, "UNet", 64)
    assert unknown.name == "fp32" and "no bf16 measurement for UNet" in unknown.reason
    p = P.resolve("auto", CPU, "fast", 128)
    assert p.channels_last and p.dtype == torch.bfloat16 and "3.00x" in p.reason
    assert p.as_dict()["hardware"] == "avx512_bf16"
    assert not P.resolve("auto", CPU, "ddpm", 64).channels_last  # GroupNorm: contiguous
    assert P.resolve("fp32", CPU, "fast", 64).name == "fp32"  # explicit always wins
    assert P.resolve("bf16", CPU, "UNet", 64).name == "bf16"


def test_auto_is_fp32_without_bf16_hardware_and_bad_values_are_refused(monkeypatch):
    monkeypatch.setattr(P, "cpu_bf16_hardware", lambda: None)
    p = P.resolve("auto", CPU, "dcgan", 64)
    assert p.name == "fp32" and p.dtype is None and not p.channels_last
    assert "no native bf16" in p.reason
    with pytest.raises(BrainhpcError, match="precision 'fp16'.*auto, bf16, fp32"):
        P.resolve("fp16", CPU, "dcgan", 64)
    with pytest.raises(BrainhpcError, match="precision must be one of"):
        TrainConfig(out="x", precision="half")


def test_gpus_default_to_bf16_unless_measured_slower(table, monkeypatch):
    monkeypatch.setattr(P, "hardware", lambda device: "cuda")
    gpu = torch.device("cuda", 0)
    assert P.resolve("auto", gpu, "anything", 128).name == "bf16"
    assert P.resolve("auto", gpu, "slow-on-gpu", 128).name == "fp32"


def test_this_cpus_hardware_class_follows_its_flags():
    with open("/proc/cpuinfo") as f:
        flags = next(line for line in f if line.startswith("flags")).split()
    want = "amx" if "amx_bf16" in flags else "avx512_bf16" if "avx512_bf16" in flags else None
    assert P.cpu_bf16_hardware() == want


# ------------------------------------------------------------------ the trainer
class ConvTask:
    """A tiny conv regression: enough to exercise autocast, layout and the optimiser."""

    arch = "tinyconv"

    def __init__(self, seen=None, stop_at=None):
        self.seen = seen if seen is not None else []
        self.stop_at = stop_at

    def models(self):
        return {"net": nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                                     nn.ReLU(),
                                     nn.Conv2d(8, 1, 3, padding=1))}

    def optimizers(self, models):
        return {"net": torch.optim.Adam(models["net"].parameters(), lr=1e-2)}

    def training_step(self, t, batch):
        x = batch[0].float() / 255
        with t.autocast():
            y = t.models["net"](x)
        self.seen.append((y.dtype, x.is_contiguous(memory_format=torch.channels_last)))
        loss = F.mse_loss(y.float(), x.flip(-1))
        opt = t.optimizers["net"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if t.step + 1 == self.stop_at:
            t.request_checkpoint(stop=True)
        return {"loss": loss}

    def validate(self, t):
        return {"epoch_seen": t.epoch}


def images(n=32, size=16):
    g = torch.Generator().manual_seed(0)
    return torch.utils.data.TensorDataset(torch.randint(0, 256, (n, 1, size, size),
                                                        dtype=torch.uint8, generator=g))


def tcfg(out, **kw):
    base = dict(out=out, epochs=2, batch_size=8, seed=3, checkpoint_every=0, progress=False,
                device="cpu", checkpoint_minutes=0, log_every=1)
    return TrainConfig(**{**base, **kw})


def fit(out, precision, **kw):
    task = ConvTask()
    t = Trainer(task, images(), tcfg(out, precision=precision, **kw))
    summary = t.fit()
    return t, task, summary


def test_bf16_and_fp32_agree_within_tolerance(tmp_path):
    t32, task32, s32 = fit(tmp_path / "a", "fp32")
    t16, task16, s16 = fit(tmp_path / "b", "bf16")
    assert {d for d, _ in task32.seen} == {torch.float32}
    assert {d for d, _ in task16.seen} == {torch.bfloat16}  # autocast really ran
    assert s32["precision"]["name"] == "fp32" and s16["precision"]["name"] == "bf16"
    # bf16 layout: channels_last weights; fp32 keeps the contiguous layout
    w16 = t16.raw("net")[0].weight
    assert w16.is_contiguous(memory_format=torch.channels_last) and w16.dtype == torch.float32
    loss = {k: [json.loads(x)["loss"] for x in (tmp_path / k / "metrics.jsonl").read_text()
                .splitlines() if '"train"' in x] for k in ("a", "b")}
    assert len(loss["a"]) == len(loss["b"]) == 8
    np.testing.assert_allclose(loss["b"], loss["a"], rtol=0.05, atol=2e-3)
    for (k, a), b in zip(t32.raw("net").state_dict().items(),
                         t16.raw("net").state_dict().values(), strict=True):
        if a.is_floating_point():
            torch.testing.assert_close(b, a, rtol=0.05, atol=0.02, msg=k)
    assert not torch.equal(t32.raw("net")[0].weight, w16)  # two different computations


def test_bf16_run_resumes_bit_identical_with_fused_adam(tmp_path):
    ref, _, _ = fit(tmp_path / "ref", "bf16")
    assert ref.fused == ["net"] and ref.optimizers["net"].param_groups[0]["fused"] is True
    cut = Trainer(ConvTask(stop_at=5), images(), tcfg(tmp_path / "cut", precision="bf16"))
    assert cut.fit()["status"] == "interrupted"
    again = Trainer(ConvTask(), images(), tcfg(tmp_path / "cut", precision="bf16"))
    assert again.resumed and again.optimizers["net"].param_groups[0]["fused"] is True
    again.fit()
    for a, b in zip(ref.raw("net").state_dict().values(),
                    again.raw("net").state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_fused_flag_is_restored_over_an_unfused_checkpoint(tmp_path):
    opt = torch.optim.Adam(nn.Linear(2, 1).parameters())
    state = opt.state_dict()  # as an older brainhpc saved it: fused None
    assert P.fused_optimizers({"a": opt}) == ["a"]
    opt.load_state_dict(state)
    assert not opt.param_groups[0]["fused"]
    P.fused_optimizers({"a": opt})
    assert opt.param_groups[0]["fused"] and not opt.param_groups[0]["foreach"]
    sgd_params = [nn.Parameter(torch.zeros(2, dtype=torch.int64), requires_grad=False)]
    assert P.fused_optimizers({"b": torch.optim.SGD(sgd_params, lr=0.1)}) == []  # not floats


def test_validation_every_k_epochs_and_always_the_last(tmp_path):
    t = Trainer(ConvTask(), images(), tcfg(tmp_path, epochs=5, val_every=2))
    t.fit()
    vals = [json.loads(x)["epoch_seen"] for x in (tmp_path / "metrics.jsonl").read_text()
            .splitlines() if '"val"' in x]
    assert vals == [1, 3, 4]
    with pytest.raises(BrainhpcError, match="val_every must be an integer >= 1"):
        tcfg(tmp_path, val_every=0)


def test_in_memory_datasets_get_no_worker_processes(tmp_path):
    t = Trainer(ConvTask(), images(), tcfg(tmp_path, num_workers=2))
    assert t.loader.num_workers == 0


def test_threads_fit_the_slurm_allocation():
    cores = len(os.sched_getaffinity(0))
    assert allocated_cpus({}) == cores
    assert allocated_cpus({"SLURM_JOB_ID": "7", "SLURM_CPUS_PER_TASK": "1"}) == 1
    assert allocated_cpus({"SLURM_JOB_ID": "7", "SLURM_CPUS_PER_TASK": "512"}) == cores
    assert allocated_cpus({"SLURM_CPUS_PER_TASK": "1"}) == cores  # not inside a SLURM job


# ------------------------------------------------------------------ recorded by the cells
def test_precision_is_recorded_in_metrics_json(prepared_phantom, tmp_path):
    from brainhpc.classify import ClassifyConfig, classify

    for prec in ("fp32", "bf16"):
        out = tmp_path / prec
        classify(ClassifyConfig(model="cnn", train_data="real", data=prepared_phantom, out=out,
                                epochs=1, batch_size=16, precision=prec, progress=False,
                                device="cpu"))
        m = json.loads((out / "metrics.json").read_text())
        assert m["train_precision"]["name"] == prec and m["train_precision"]["requested"] == prec
        assert m["threads"] == torch.get_num_threads()
    with pytest.raises(BrainhpcError, match="unknown precision 'fp64'"):
        ClassifyConfig(model="cnn", train_data="real", data=prepared_phantom, out=tmp_path,
                       precision="fp64")


# -------------------------------------------- gpu-check (more: test_gpu_check.py)
def test_smoke_cells_share_the_cores(tmp_path):
    """Local cells share the cores (every sweep run with --executor local, the smoke's too)."""
    from brainhpc.sweep.config import load_sweep
    from brainhpc.sweep.local import local_threads

    def cell_threads(path):
        return min(local_threads(r, r.array_parallelism)
                   for r in load_sweep(path).resources.values())

    base = (REPO / "jobs" / "smoke.toml").read_text()
    assert cell_threads(REPO / "jobs" / "smoke.toml") == 1  # cpus_per_task = 1
    more = tmp_path / "smoke.toml"
    more.write_text(base.replace("cpus_per_task = 1", "cpus_per_task = 64"))
    assert cell_threads(more) == max(1, allocated_cpus() // 2)  # two cells at once


def test_gpu_check_smoke_timeout_kills_the_cells_too(tmp_path, monkeypatch):
    """The smoke's cells are the local executor's children: a timeout must not leave them
    holding the GPU (a stand-in "python" starts a grandchild and waits)."""
    import subprocess
    import time

    pidfile = tmp_path / "cell.pid"
    fake = tmp_path / "python"
    fake.write_text(f"#!/bin/sh\nsleep 60 >/dev/null 2>&1 &\necho $! > {pidfile}\nwait\n")
    fake.chmod(0o755)
    monkeypatch.setattr(gpu_check.sys, "executable", str(fake))
    with pytest.raises(subprocess.TimeoutExpired):
        gpu_check.smoke(tmp_path / "out", timeout_s=1)
    cell = int(pidfile.read_text())
    for _ in range(50):  # killed: gone, or a zombie until its reaper notices
        try:
            state = Path(f"/proc/{cell}/stat").read_text().split()[2]
        except FileNotFoundError:
            break
        if state == "Z":
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the smoke's cell (pid {cell}) survived the timeout")
