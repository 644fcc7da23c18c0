"""Issue 23, the training path on GPUs, tested as far as a CPU allows: resume across a layout
change (fused Adam), the precision in identity and fingerprint, a failing rank that takes its
peers down at once, a job environment that already holds MASTER_PORT/RANK, no host syncs in
a training step, device-resident batches, GPU placement and SyncBatchNorm."""

import json
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
import torch.nn.functional as F
from torch import nn

from brainhpc import cell as cellmod
from brainhpc.errors import BrainhpcError
from brainhpc.generate.cell import GenerateConfig
from brainhpc.segment.cell import SegmentConfig
from brainhpc.train import TrainConfig, Trainer
from brainhpc.train import distributed as D
from brainhpc.train import precision as P
from brainhpc.train import throughput as tp
from brainhpc.train.trainer import DistributedBatchSampler, TensorBatches, sync_batchnorm

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")

pytestmark = pytest.mark.usefixtures("one_thread")


def fake_gpu(monkeypatch, major: int, count: int = 1):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, 0))


# ------------------------------------------------------------------ 1. resume across layouts
class ConvTask:
    arch = "tinyconv"

    def __init__(self, stop_at=None):
        self.stop_at = stop_at

    def models(self):
        return {"net": nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                                     nn.ReLU(), nn.Conv2d(8, 1, 3, padding=1))}

    def optimizers(self, models):
        return {"net": torch.optim.Adam(models["net"].parameters(), lr=1e-2)}

    def training_step(self, t, batch):
        x = batch[0].float() / 255
        with t.autocast():
            y = t.models["net"](x)
        loss = F.mse_loss(y.float(), x.flip(-1))
        opt = t.optimizers["net"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if t.step + 1 == self.stop_at:
            t.request_checkpoint(stop=True)
        return {"loss": loss.detach()}


def images(n=32, size=16):
    g = torch.Generator().manual_seed(0)
    return torch.utils.data.TensorDataset(torch.randint(0, 256, (n, 1, size, size),
                                                        dtype=torch.uint8, generator=g))


def tcfg(out, **kw):
    base = dict(out=out, epochs=2, batch_size=8, seed=3, checkpoint_every=0, progress=False,
                device="cpu", checkpoint_minutes=0, log_every=1)
    return TrainConfig(**{**base, **kw})


def adam_step(state: dict, param: torch.Tensor, grad: torch.Tensor, fused: bool) -> torch.Tensor:
    p = param.clone().requires_grad_(True)
    opt = torch.optim.Adam([p], lr=0.1, fused=fused, foreach=False if fused else None)
    opt.load_state_dict({"state": {0: state}, "param_groups": [
        {**opt.param_groups[0], "params": [0]}]})
    P.restore_layout(opt)
    p.grad = grad.clone()
    opt.step()
    return p.detach()


def test_restore_layout_gives_state_its_parameters_strides():
    g = torch.Generator().manual_seed(0)
    param, grad = torch.randn(8, 3, 3, 3, generator=g), torch.randn(8, 3, 3, 3, generator=g)
    moments = torch.randn(8, 3, 3, 3, generator=g), torch.rand(8, 3, 3, 3, generator=g)
    last = {"step": torch.tensor(3.0), "exp_avg": moments[0].contiguous(
        memory_format=torch.channels_last), "exp_avg_sq": moments[1].contiguous(
        memory_format=torch.channels_last)}  # as a bf16 (channels_last) run saved them
    reference = adam_step({"step": torch.tensor(3.0), "exp_avg": moments[0],
                           "exp_avg_sq": moments[1]}, param, grad, fused=False)
    # an fp32 (contiguous) parameter: without the restore, CPU fused Adam pairs wrong elements
    torch.testing.assert_close(adam_step(dict(last), param, grad, fused=True), reference)
    for fmt in (torch.contiguous_format, torch.channels_last):  # and the other way round
        p = nn.Parameter(param.contiguous(memory_format=fmt))
        opt = torch.optim.Adam([p], fused=True)
        other = (torch.channels_last if fmt == torch.contiguous_format
                 else torch.contiguous_format)
        opt.state[p] = {"step": torch.tensor(1.0),
                        "exp_avg": moments[0].contiguous(memory_format=other)}
        assert P.restore_layout(opt) == 1
        assert opt.state[p]["exp_avg"].stride() == p.stride()
        assert torch.equal(opt.state[p]["exp_avg"], moments[0])
        assert P.restore_layout(opt) == 0  # nothing left to do


def _drop_precision_from_fingerprint(path: Path) -> None:
    """Make ``path`` look like a checkpoint from before the precision was recorded."""
    state = torch.load(path, weights_only=True)
    del state["fingerprint"]["precision"]
    torch.save(state, path)


@pytest.mark.parametrize("first, then", [("bf16", "fp32"), ("fp32", "bf16")])
def test_resume_across_the_layout_change_with_fused_adam(tmp_path, first, then):
    cut = Trainer(ConvTask(stop_at=3), images(), tcfg(tmp_path, precision=first))
    assert cut.fit()["status"] == "interrupted"
    saved = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert saved["fingerprint"]["precision"] == first
    with pytest.raises(BrainhpcError, match=f"precision: checkpoint '{first}' vs now '{then}'"):
        Trainer(ConvTask(), images(), tcfg(tmp_path, precision=then))
    _drop_precision_from_fingerprint(tmp_path / "checkpoints" / "last.pt")  # an older one
    again = Trainer(ConvTask(), images(), tcfg(tmp_path, precision=then))
    assert again.resumed and again.fused == ["net"]
    opt = again.optimizers["net"]
    assert opt.param_groups[0]["fused"]
    for p, st in opt.state.items():
        for v in st.values():
            if v.shape == p.shape:
                assert v.stride() == p.stride()
    weight = again.raw("net")[3].weight  # 8 input channels: the layouts differ
    assert weight.is_contiguous(memory_format=torch.channels_last) == (then == "bf16")
    assert again.fit()["status"] == "done"
    assert all(torch.isfinite(v).all() for v in again.raw("net").state_dict().values())


# ------------------------------------------------------------------ 1. precision in the identity
def test_identity_name_is_what_the_trainer_resolves(monkeypatch):
    monkeypatch.setattr(P, "cpu_bf16_hardware", lambda: "avx512_bf16")
    monkeypatch.setattr(P, "SPEEDUP", {"avx512_bf16": {"fast": {64: 2.0}, "mixed": {64: 1.05,
                                                                                   128: 1.8}},
                                       "cuda": {}})
    assert P.identity_name("fp32", CPU, None) == "fp32"
    assert P.identity_name("bf16", CPU, "anything") == "bf16"
    assert P.identity_name("auto", CPU, "fast", 64) == "bf16"
    assert P.identity_name("auto", CPU, "unmeasured", 64) == "fp32"
    assert P.identity_name("auto", CPU, "mixed", 64) == "fp32"
    assert P.identity_name("auto", CPU, "mixed") == "auto@avx512_bf16"  # depends on the size
    assert P.identity_name("auto", CPU, None) == "auto@avx512_bf16"  # depends on the model
    for arch, size in (("fast", 64), ("mixed", 64), ("mixed", 128), ("unmeasured", 64)):
        assert P.identity_name("auto", CPU, arch, size) == P.resolve("auto", CPU, arch,
                                                                     size).name
    monkeypatch.setattr(P, "cpu_bf16_hardware", lambda: None)
    assert P.identity_name("auto", CPU, None) == "fp32"
    gpu = torch.device("cuda", 0)
    fake_gpu(monkeypatch, 7)
    assert P.identity_name("auto", gpu, None) == "fp32"  # V100: no native bf16
    fake_gpu(monkeypatch, 9)
    assert P.identity_name("auto", gpu, None) == "bf16"
    monkeypatch.setattr(P, "SPEEDUP", {"cuda": {"slow": {128: 0.8}}})
    assert P.identity_name("auto", gpu, None) == "auto@cuda"
    assert P.identity_name("auto", gpu, "slow", 128) == "fp32"
    with pytest.raises(BrainhpcError, match="precision 'fp16'"):
        P.identity_name("fp16", CPU, None)


def test_a_cells_identity_holds_the_precision_of_the_gpu_it_lands_on(monkeypatch, tmp_path):
    base = dict(arch="dcgan", label="tumour", data=tmp_path, out=tmp_path / "g")
    monkeypatch.setattr(P, "cpu_bf16_hardware", lambda: None)
    assert GenerateConfig(**base).identity()["precision"] == "fp32"  # this CPU
    fake_gpu(monkeypatch, 7)
    assert GenerateConfig(**base).identity()["precision"] == "fp32"  # pre-Ampere GPU
    fake_gpu(monkeypatch, 8)
    ampere = GenerateConfig(**base).identity()
    assert ampere["precision"] == "bf16"
    assert GenerateConfig(**base, device="cpu").identity()["precision"] == "fp32"
    assert GenerateConfig(**base, precision="fp32").identity() != ampere
    seg = SegmentConfig(train_data="real", data=tmp_path, out=tmp_path / "s")
    assert seg.identity()["precision"] == "bf16"  # no model measured slower on GPUs


def test_the_trainer_refuses_to_train_otherwise_than_the_identity_says(tmp_path):
    t = Trainer(ConvTask(), images(), tcfg(tmp_path / "a", identity_precision="fp32"))
    assert t.precision.name == "fp32"
    Trainer(ConvTask(), images(), tcfg(tmp_path / "b", identity_precision="auto@avx512_bf16"))
    with pytest.raises(BrainhpcError, match="identity says bf16 but tinyconv resolves to fp32"):
        Trainer(ConvTask(), images(), tcfg(tmp_path / "c", identity_precision="bf16"))


def test_records_from_before_the_precision_was_in_the_identity(tmp_path):
    ident = {"lr": 1.0, "precision": "fp32"}
    out = tmp_path / "cell"
    out.mkdir()
    outputs = cellmod.Outputs(result="metrics.json")
    rec = {"status": "done", "config": {"lr": 1.0}, "train_precision": {"name": "fp32"}}
    (out / "metrics.json").write_text(json.dumps(rec))
    assert cellmod.previous(out, ident, outputs, "toy") == rec  # the same computation: skip
    with pytest.raises(BrainhpcError, match="precision: 'fp32' -> 'bf16'"):
        cellmod.previous(out, {**ident, "precision": "bf16"}, outputs, "toy")
    (out / "metrics.json").unlink()
    (out / "config.json").write_text(json.dumps({"status": "running", "config": {"lr": 1.0}}))
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "last.pt").write_bytes(b"x")
    assert cellmod.previous(out, ident, outputs, "toy") is None  # unfinished: resumes


def test_records_from_before_a_field_existed_read_it_at_its_default(tmp_path):
    """A field added later (default = the former behaviour) never orphans a finished cell; the
    same field set otherwise is another computation, refused."""
    out = tmp_path / "cell"
    out.mkdir()
    outputs = cellmod.Outputs(result="metrics.json")
    rec = {"status": "done", "config": {"lr": 1.0, "precision": "fp32"}}
    (out / "metrics.json").write_text(json.dumps(rec))
    ident, known = {"lr": 1.0, "precision": "fp32", "intensity": False}, {"intensity": False}
    assert cellmod.previous(out, ident, outputs, "toy", known) == rec
    with pytest.raises(BrainhpcError, match="intensity: False -> True"):
        cellmod.previous(out, {**ident, "intensity": True}, outputs, "toy", known)
    with pytest.raises(BrainhpcError, match="intensity: None -> False"):
        cellmod.previous(out, ident, outputs, "toy")  # without the defaults: refused


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


def test_the_sweep_runner_accepts_a_preset_master_port(monkeypatch, tmp_path):
    from brainhpc.sweep.runner import CellRunner

    monkeypatch.setattr(os, "environ", slurm_task_env(MASTER_PORT="29411", RANK="0",
                                                      SUBMITIT_FOLDER=str(tmp_path)))
    assert CellRunner()([]) == []
    assert os.environ["RANK"] == "1" and os.environ["MASTER_PORT"] == "29411"


# ------------------------------------------------------------------ 5. no host syncs in a step
def classify_tasks(size: int):
    from brainhpc.classify.tasks import CNNTask, VAETask

    cfg = SimpleNamespace(dropout=0.5, lr=1e-3, augment=True, vae_arch="paper", latent_dim=8,
                          latent_channels=4, kl_weight=1.0)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (40, 1, size, size), dtype=torch.uint8, generator=g)
    cnn = CNNTask(cfg, size, weights=torch.tensor([0.7, 1.3]).numpy(), val=None)
    labelled = torch.utils.data.TensorDataset(x, torch.randint(0, 2, (40,), generator=g))
    vae = VAETask(cfg, size, val_inputs=None)
    unit = torch.utils.data.TensorDataset(x.float() / 255)
    return {"classify-cnn": (cnn, labelled), "classify-vae": (vae, unit)}


def segment_task(size: int):
    from monai.losses import DiceCELoss

    from brainhpc.segment.cell import SegTask

    task = SegTask.__new__(SegTask)  # its training step only (validation data not needed)
    task.cfg = SegmentConfig(train_data="real", data=Path("."), out=Path("."), augment=True,
                             channels=(4, 8), strides=(2,))
    task.prior = 0.1
    task.loss = DiceCELoss(sigmoid=True, batch=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (40, 1, size, size), dtype=torch.uint8, generator=g)
    return task, torch.utils.data.TensorDataset(x, (x > 200).to(torch.uint8))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_no_host_sync_inside_training_steps(precision):
    """Between two check steps nothing reads a tensor value on the host (on a GPU each read
    waits for all queued work): every generator and classifier, the cells' own tasks."""
    from brainhpc.models import build_task

    size = 32
    small = {"dcgan": {"g_channels": 8, "min_channels": 4, "d_channels": 4},
             "wgan-gp": {"g_channels": 8, "min_channels": 4, "d_channels": 4, "n_critic": 2},
             "ddpm": {"channels": 8},  # emulated bf16 convolutions are slow on this CPU
             "ldm": {"ae_channels": [8, 8], "unet_channels": [8, 16], "unet_res_blocks": 1,
                     "head_channels": 8, "d_channels": 8, "d_layers": 2, "ae_steps": 2,
                     "adv_start": 1}}  # both phases and the patch loss within 5 steps
    for arch in tp.ARCHS:
        task = build_task(arch, size, {**small[arch], "ema": 0}) if arch in small else None
        got = tp.host_syncs(arch, size, precision, CPU, steps=5, batch=4, task=task)
        assert got == [0] * 4, arch
    for name, (task, data) in {**classify_tasks(size),
                               "segment": segment_task(size)}.items():
        got = tp.host_syncs(name, size, precision, CPU, steps=5, batch=4, task=task, data=data)
        assert got == [0] * 4, name


def test_the_sync_counter_sees_host_reads():
    item = torch.Tensor.item
    with tp.count_host_syncs() as calls:
        x = torch.ones(3)
        float(x.sum()), x.tolist(), bool(x.all()), x.sum().item()
    assert {"__float__", "tolist", "__bool__", "item"} <= set(calls)
    assert torch.Tensor.item is item  # restored


def test_non_finite_found_late_still_names_its_step_and_keeps_the_last_good(tmp_path):
    class NanAt(ConvTask):
        def training_step(self, t, batch):
            out = super().training_step(t, batch)
            return {"loss": out["loss"] * (float("nan") if t.step + 1 == 7 else 1.0)}

    with pytest.raises(BrainhpcError, match=r"non-finite loss at step 7 .*step 4\) kept"):
        Trainer(NanAt(), images(64), tcfg(tmp_path, log_every=5, checkpoint_every=4)).fit()
    assert torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["step"] == 4


# ------------------------------------------------------------------ 5. device-resident batches
def test_tensor_batches_are_the_dataloaders_batches():
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(
        torch.randint(0, 256, (43, 1, 8, 8), dtype=torch.uint8, generator=g),
        torch.randint(0, 2, (43,), generator=g))
    for rank, world, start in ((0, 1, 0), (1, 2, 0), (0, 2, 3)):
        sampler = DistributedBatchSampler(len(data), 8, rank, world, seed=5)
        sampler.set_epoch(2, start)
        ours = list(TensorBatches(data, sampler, CPU))
        theirs = list(torch.utils.data.DataLoader(data, batch_sampler=sampler))
        assert len(ours) == len(theirs) == 5 - start
        for a, b in zip(ours, theirs, strict=True):
            for x, y in zip(a, b, strict=True):
                assert torch.equal(x, y) and x.dtype == y.dtype and x.stride() == y.stride()


def test_in_memory_data_is_not_collated_item_by_item(tmp_path):
    t = Trainer(ConvTask(), images(), tcfg(tmp_path))
    assert isinstance(t.loader, TensorBatches) and t.loader.resident
    custom = Trainer(ConvTask(), images(), tcfg(tmp_path / "c"),
                     collate_fn=torch.utils.data.default_collate)
    assert isinstance(custom.loader, torch.utils.data.DataLoader)


def test_cuda_settings_only_on_gpus(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    before = torch.get_float32_matmul_precision()
    P.cuda_settings(CPU)
    assert not torch.backends.cudnn.benchmark and torch.get_float32_matmul_precision() == before
    try:
        P.cuda_settings(torch.device("cuda", 0))
        assert torch.backends.cudnn.benchmark
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before)


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
