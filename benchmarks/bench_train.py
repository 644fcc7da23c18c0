"""Training throughput (images/s) per generator through ``Trainer`` vs a plain PyTorch loop.

Same task code, model, batch and data in both: the plain loop is ``for (x,) in DataLoader(...):
task.training_step(ctx, (x,))`` with a minimal context, the trainer is ``Trainer.fit`` with its
defaults (metric window every 10 steps, per-step flag agreement, signal handlers, the
distributed batch sampler); EMA is off in both so the comparison is the loop itself. Timing
starts after ``--warmup`` steps and covers n whole iterations (data, step, bookkeeping), n
calibrated to about ``--seconds`` of work. The end-of-run checkpoint is timed separately and
shown with its cost amortised over the default ``checkpoint_every`` (500 steps). Batch 32 at
64 px, 16 at 128 px. Runs alternate plain/trainer ``--repeats`` times and the median of each
is compared (per-iteration median, robust to a busy neighbour on shared cores; the wall-clock
ratio over all timed iterations is printed beside it). Models use CPU-sized options (below), not the
GPU defaults. Goal: trainer/plain >= 0.95. With CUDA present, the same runs on the GPU with
bf16 autocast.

    .venv/bin/python benchmarks/bench_train.py            # about 3 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import statistics
import tempfile
import time

import torch

from brainhpc.models import build_task
from brainhpc.train import TrainConfig, Trainer

CPU_OPTIONS = {
    "vae": {"base": 16, "latent": 128, "max_channels": 256},
    "dcgan": {"g_channels": 64, "min_channels": 16, "d_channels": 16, "ema": 0},
    "wgan-gp": {"g_channels": 64, "min_channels": 16, "d_channels": 16, "ema": 0},
    "ddpm": {"channels": 16, "res_blocks": 1, "ema": 0},
}


class PlainCtx:
    """What a task's training_step needs, with nothing else around it."""

    def __init__(self, models, optimizers, device, amp):
        self.models, self.optimizers, self.device, self.step = models, optimizers, device, 0
        self.amp = amp
        self.ema = {}

    def raw(self, name):
        return self.models[name]

    def autocast(self):
        if self.amp:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()


def data(size: int, n: int) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(0)
    return torch.utils.data.TensorDataset(torch.randint(0, 256, (n, 1, size, size),
                                                        dtype=torch.uint8, generator=g))


def timed(task, warmup: int, device, marks: list) -> None:
    """Record the entry time of every training step from ``warmup`` on."""
    inner = task.training_step
    calls = [0]

    def step(t, b):
        if calls[0] >= warmup:
            sync(device)
            marks.append(time.perf_counter())
        calls[0] += 1
        return inner(t, b)

    task.training_step = step


def run_plain(arch, size, batch, warmup, steps, device) -> list[float]:
    """Per-iteration seconds of the plain loop (after warmup)."""
    torch.manual_seed(0)
    task = build_task(arch, size, {**CPU_OPTIONS[arch], "batch_size": batch})
    marks: list[float] = []
    timed(task, warmup, device, marks)
    models = {k: m.to(device) for k, m in task.models().items()}
    ctx = PlainCtx(models, task.optimizers(models), device,
                   device.type == "cuda" and torch.cuda.is_bf16_supported())
    loader = torch.utils.data.DataLoader(data(size, batch * (warmup + steps)), batch_size=batch,
                                         shuffle=True, drop_last=True)
    for (x,) in loader:
        task.training_step(ctx, (x.to(device, non_blocking=True),))
        ctx.step += 1
    sync(device)
    marks.append(time.perf_counter())
    return [b - a for a, b in zip(marks, marks[1:], strict=False)]


def run_trainer(arch, size, batch, warmup, steps, device) -> tuple[list[float], float]:
    """Per-iteration seconds through Trainer.fit (after warmup) and the final save's seconds."""
    task = build_task(arch, size, {**CPU_OPTIONS[arch], "batch_size": batch})
    marks: list[float] = []
    timed(task, warmup, device, marks)
    saved = {}
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(out=out, epochs=1, batch_size=batch, max_steps=warmup + steps,
                          progress=False, device=device.type, resume=False)
        trainer = Trainer(task, data(size, batch * (warmup + steps)), cfg)
        save = trainer.save_checkpoint

        def timed_save():
            sync(device)
            marks.append(time.perf_counter())  # the last step and its bookkeeping are done
            result = save()
            saved["s"] = time.perf_counter() - marks[-1]
            return result

        trainer.save_checkpoint = timed_save
        trainer.fit()
        trainer.close()
    return [b - a for a, b in zip(marks, marks[1:], strict=False)], saved["s"]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench(device: torch.device, sizes, archs, batches, warmup, seconds, repeats) -> list[dict]:
    rows = []
    for size, batch in zip(sizes, batches, strict=True):
        for arch in archs:
            # calibrate: enough timed steps for ~`seconds` of work per run (3 at least)
            step_s = statistics.median(run_plain(arch, size, batch, warmup, 1, device))
            n = max(3, min(50, round(seconds / step_s)))
            plain, trainer, saves = [], [], []
            for _ in range(repeats):
                plain += run_plain(arch, size, batch, warmup, n, device)
                d, save = run_trainer(arch, size, batch, warmup, n, device)
                trainer += d
                saves.append(save)
            # wall: all timed iterations; median: per-iteration, robust to neighbours' bursts
            pw, tw = batch * len(plain) / sum(plain), batch * len(trainer) / sum(trainer)
            pm, tm = batch / statistics.median(plain), batch / statistics.median(trainer)
            save_s = statistics.median(saves)
            amort = tm / (1 + save_s / (500 * batch / tm))
            rows.append({"device": device.type, "arch": arch, "size": size, "batch": batch,
                         "steps": n, "plain": pm, "trainer": tm, "ratio": tm / pm,
                         "plain_wall": pw, "trainer_wall": tw, "ratio_wall": tw / pw,
                         "save_ms": 1000 * save_s, "ratio_ckpt": amort / pm})
            print(f"{device.type:>4} {arch:>8} {size:>4}px b{batch:<3} {n:>2}x{repeats} steps | "
                  f"median step: plain {pm:7.1f} trainer {tm:7.1f} img/s ratio {tm / pm:.3f} | "
                  f"wall: {pw:7.1f} vs {tw:7.1f} img/s ratio {tw / pw:.3f} | "
                  f"save {1000 * save_s:4.0f} ms, ratio with 1 save/500 steps {amort / pm:.3f}",
                  flush=True)
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    p.add_argument("--archs", nargs="+", default=list(CPU_OPTIONS))
    p.add_argument("--batches", type=int, nargs="+", default=[32, 16], help="one per size")
    p.add_argument("--seconds", type=float, default=2.0, help="timed work per run")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, batches {args.batches} for "
          f"sizes {args.sizes}, median of {args.repeats} alternating runs")
    t0 = time.time()
    rows = bench(torch.device("cpu"), args.sizes, args.archs, args.batches, args.warmup,
                 args.seconds, args.repeats)
    if torch.cuda.is_available():
        rows += bench(torch.device("cuda"), args.sizes, args.archs, args.batches, 5,
                      args.seconds, args.repeats)
    worst = min(r["ratio_ckpt"] for r in rows)
    print(f"worst trainer/plain ratio (median step, checkpoint amortised) {worst:.3f} "
          f"(goal >= 0.95); total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
