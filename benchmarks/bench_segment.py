"""U-Net training and inference throughput (images/s) of the segment cell on this machine, at 64
and 128 px: what the CPU study sizes its epochs from.

Side by side in one run: the segment cell's default U-Net (MONAI ``UNet`` channels 16-32-64-128,
strides 2-2-2, ``res_units=0``: the plain U-Net) against the same network with one and with two
residual units per block (``res_units=2`` is MONAI's tutorial setting), and the default in bf16
(autocast + channels_last model and batches, what ``--precision bf16`` makes the trainer do).
The step is the cell's own ``SegTask.training_step`` (image+mask augmentation, DiceCE, Adam) in
a plain loop, batch 16; runs alternate configurations ``--repeats`` times and the median
per-step time of each is compared (robust to a busy neighbour on shared cores). Inference is
``predict_probs`` on 256 slices. The load average is printed beside the numbers.

    .venv/bin/python benchmarks/bench_segment.py           # about 2 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import time

import numpy as np
import torch

from brainhpc.predictors.segmenter import predict_probs
from brainhpc.segment.cell import SegmentConfig, SegTask

CONFIGS = {"default (res_units=0)": {}, "default in bf16": {"precision": "bf16"},
           "res_units=1": {"res_units": 1}, "tutorial (res_units=2)": {"res_units": 2}}


class Ctx:
    def __init__(self, model, opt, bf16: bool):
        self.models, self.optimizers, self.bf16 = {"unet": model}, {"unet": opt}, bf16

    def autocast(self):
        if self.bf16:
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()


def batch(size: int, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 1, size, size), dtype=np.uint8)
    masks = np.zeros_like(images)
    for i in range(n):
        y, x = rng.integers(0, size // 2, 2)
        masks[i, 0, y:y + size // 6, x:x + size // 5] = 1
    return torch.from_numpy(images), torch.from_numpy(masks)


class _NoVal:
    """Stands in for the validation split, which the timed training step never reads."""

    masks = np.zeros((0, 1, 1, 1), np.uint8)
    images = masks

    def patient_ids(self):
        return []


def step_times(cfg: SegmentConfig, size: int, steps: int) -> list[float]:
    torch.manual_seed(0)
    task = SegTask(cfg, _NoVal(), prior=0.02)  # the training step only: no validation
    bf16 = cfg.precision == "bf16"
    fmt = torch.channels_last if bf16 else torch.contiguous_format
    model = task.models()["unet"].to(memory_format=fmt)
    ctx = Ctx(model, task.optimizers({"unet": model})["unet"], bf16)
    x = tuple(t.contiguous(memory_format=fmt) for t in batch(size, cfg.batch_size))
    task.training_step(ctx, x)  # warm-up
    out = []
    for _ in range(steps):
        t0 = time.perf_counter()
        task.training_step(ctx, x)
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6, help="timed steps per run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sizes", default="64,128")
    args = ap.parse_args()
    print(f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()}")
    tmp = tempfile.mkdtemp()
    for size in (int(s) for s in args.sizes.split(",")):
        per = {name: [] for name in CONFIGS}
        for _ in range(args.repeats):
            for name, kw in CONFIGS.items():
                cfg = SegmentConfig(train_data="real", data=tmp, out=tmp, device="cpu", **kw)
                per[name] += step_times(cfg, size, args.steps)
        base = statistics.median(per["default (res_units=0)"])
        for name, times in per.items():
            med = statistics.median(times)
            print(f"{size:4d} px  {name:24s} train {16 / med:7.1f} img/s  "
                  f"({med * 1000:6.1f} ms/step of 16; this/default time ratio {med / base:.2f})")
        cfg = SegmentConfig(train_data="real", data=tmp, out=tmp, device="cpu")
        task = SegTask(cfg, _NoVal(), prior=0.02)
        model = task.models()["unet"]
        images = batch(size, 256)[0].numpy()
        predict_probs(model, images[:16], torch.device("cpu"))
        t0 = time.perf_counter()
        predict_probs(model, images, torch.device("cpu"))
        dt = time.perf_counter() - t0
        print(f"{size:4d} px  default inference        {256 / dt:7.1f} img/s")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
