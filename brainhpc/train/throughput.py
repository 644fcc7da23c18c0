"""Training throughput of every architecture brainhpc trains, measured through the ``Trainer``.

Used by ``benchmarks/bench_train.py`` (beside a plain fp32 loop) and ``brainhpc.gpu_check``.
Each architecture runs with its default options on random uint8 images (content does not change
the cost of a step) and EMA off; ``step_times`` returns the seconds of each timed step (after
``warmup`` steps: oneDNN and cuDNN pick their kernels on first use). ``host_syncs`` counts what
makes the host wait for the device in each step (``count_host_syncs``): none in the steady state.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from brainhpc.models import build_task
from brainhpc.models.classifiers import BrainCNN, BrainCVAE, vae_terms
from brainhpc.train.trainer import TrainConfig, Trainer

ARCHS = ("BrainCNN", "BrainCVAE", "vae", "dcgan", "wgan-gp", "ddpm", "ldm")
# global batch per architecture: the generators' and classifiers' defaults; DDPM 16 (64 is its
# default, but one CPU step would take ~10 s at 128 px)
BATCH = {"BrainCNN": 32, "BrainCVAE": 32, "vae": 64, "dcgan": 64, "wgan-gp": 64, "ddpm": 16,
         "ldm": 32}


class ClassifierTask:
    """The classify cell's training step without its data plumbing: BrainCNN with
    cross-entropy, or BrainCVAE with ``vae_terms`` (healthy images), Adam(lr 1e-3)."""

    def __init__(self, arch: str, size: int):
        self.arch, self.size = arch, size

    def models(self):
        model = BrainCNN(self.size) if self.arch == "BrainCNN" else BrainCVAE(self.size)
        return {"net": model}

    def optimizers(self, models):
        return {"net": torch.optim.Adam(models["net"].parameters(), lr=1e-3)}

    def training_step(self, t, batch):
        x = batch[0].float().div_(255.0)
        with t.autocast():
            out = t.models["net"](x)
        if self.arch == "BrainCNN":
            loss = F.cross_entropy(out.float(), batch[1])
        else:
            loss, _, _ = vae_terms(out[0], x, out[1], out[2])
        opt = t.optimizers["net"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"loss": loss.detach()}


def make_task(arch: str, size: int, batch: int):
    """The task for ``arch`` at its default options, EMA off (the LDM switches to its diffusion
    phase after two steps, so a few steps run both)."""
    if arch in ("BrainCNN", "BrainCVAE"):
        return ClassifierTask(arch, size)
    options = {"batch_size": batch}
    if arch != "vae":
        options["ema"] = 0
    if arch == "ldm":
        options.update(ae_steps=2, adv_start=1)
    return build_task(arch, size, options)


def dataset(arch: str, size: int, n: int) -> torch.utils.data.TensorDataset:
    """``n`` random uint8 images (and labels for the CNN)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 1, size, size), dtype=torch.uint8, generator=g)
    if arch == "BrainCNN":
        return torch.utils.data.TensorDataset(x, torch.randint(0, 2, (n,), generator=g))
    return torch.utils.data.TensorDataset(x)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(task, warmup: int, device: torch.device, marks: list[float]) -> None:
    """Wrap ``task.training_step`` to record the entry time of every step from ``warmup`` on."""
    inner = task.training_step
    calls = [0]

    def step(t, b):
        if calls[0] >= warmup:
            sync(device)
            marks.append(time.perf_counter())
        calls[0] += 1
        return inner(t, b)

    task.training_step = step


def step_times(arch: str, size: int, precision: str, device: torch.device, warmup: int,
               steps: int, batch: int | None = None) -> tuple[list[float], dict]:
    """Seconds of each of ``steps`` timed ``Trainer.fit`` steps, and the resolved precision.

    The end-of-run checkpoint is not counted (a closing mark is taken when it starts), and one
    batch more than the steps keeps the epoch (and any validation) from ending."""
    batch = batch or BATCH[arch]
    torch.manual_seed(0)
    task = make_task(arch, size, batch)
    marks: list[float] = []
    time_steps(task, warmup, device, marks)
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(out=out, epochs=1, batch_size=batch, max_steps=warmup + steps,
                          progress=False, device=device.type, resume=False, checkpoint_every=0,
                          checkpoint_minutes=0, precision=precision, handle_signals=False)
        trainer = Trainer(task, dataset(arch, size, batch * (warmup + steps + 1)), cfg)
        save = trainer.save_checkpoint

        def closing_mark():
            sync(device)
            marks.append(time.perf_counter())
            return save()

        trainer.save_checkpoint = closing_mark
        try:
            trainer.fit()
        finally:
            trainer.close()
    return [b - a for a, b in zip(marks, marks[1:], strict=False)], trainer.precision.as_dict()


# Tensor methods that read a value on the host: on a GPU each waits for all queued work
SYNC_READS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__", "numpy", "cpu")
# reads of tensors that are always made on the host (so never wait for a GPU), by call site
HOST_ONLY_READS = {
    ("monai/losses/dice.py", "tolist"),  # DiceLoss: torch.arange(2, ndim).tolist(), reduce axes
}


@contextlib.contextmanager
def count_host_syncs(device: torch.device | None = None) -> Iterator[list[str]]:
    """Record every host read of a tensor value (``SYNC_READS``) and, with CUDA, every
    synchronising CUDA call torch's sync debug mode reports; yields the list the names are
    appended to, as they happen. For a CPU ``device`` every read counts (each marks where a GPU
    run would wait) except the host-only ones (``HOST_ONLY_READS``); for a GPU, reads of
    tensors on it."""
    device = device or torch.device("cpu")
    calls: list[str] = []
    originals = {name: getattr(torch.Tensor, name) for name in SYNC_READS}

    def counted(name, fn):
        def wrapper(self, *args, **kwargs):
            site = sys._getframe(1).f_code.co_filename.replace("\\", "/")
            if device.type == "cpu":
                host_only = any(site.endswith(f) and name == n for f, n in HOST_ONLY_READS)
            else:
                host_only = self.device.type == "cpu"
            if not host_only:
                calls.append(name)
            return fn(self, *args, **kwargs)
        return wrapper

    for name, fn in originals.items():
        setattr(torch.Tensor, name, counted(name, fn))
    cuda = device.type == "cuda"
    mode = torch.cuda.get_sync_debug_mode() if cuda else 0
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            shown = warnings.showwarning

            def show(message, *args, **kwargs):
                if "synchroniz" in str(message):
                    calls.append("cuda-sync")
                else:
                    shown(message, *args, **kwargs)

            warnings.showwarning = show
            if cuda:
                torch.cuda.set_sync_debug_mode("warn")
            yield calls
    finally:
        if cuda:
            torch.cuda.set_sync_debug_mode(mode)
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)


def mark_steps(task, calls: list[str], marks: list[int]) -> None:
    """Wrap ``task.training_step`` to record ``len(calls)`` when each step starts."""
    inner = task.training_step

    def step(t, b):
        marks.append(len(calls))
        return inner(t, b)

    task.training_step = step


def host_syncs(arch: str, size: int, precision: str, device: torch.device, steps: int = 6,
               batch: int | None = None, task=None, data=None) -> list[int]:
    """Host syncs in each of the steps 1 .. ``steps`` - 1 of a ``Trainer.fit`` run of ``arch``
    (or ``task`` on ``data``), the step itself and the trainer's bookkeeping after it; the run's
    first check step (its last step: the metric log is read there) is not among them."""
    batch = batch or BATCH[arch]
    torch.manual_seed(0)
    task = task or make_task(arch, size, batch)
    data = data or dataset(arch, size, batch * (steps + 1))
    marks: list[int] = []
    with tempfile.TemporaryDirectory() as out, count_host_syncs(device) as calls:
        mark_steps(task, calls, marks)
        cfg = TrainConfig(out=out, epochs=1, batch_size=batch, max_steps=steps, progress=False,
                          device=device.type, resume=False, checkpoint_every=0,
                          checkpoint_minutes=0, precision=precision, handle_signals=False,
                          log_every=10 * steps)
        with Trainer(task, data, cfg) as trainer:
            trainer.fit()
    return [b - a for a, b in zip(marks, marks[1:], strict=False)]
