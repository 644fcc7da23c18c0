"""gpu-check's throughput: img/s of one training step per architecture, fp32 beside bf16.

Measured through the ``Trainer`` (``brainhpc.train.throughput``; the U-Net with the DDP check's
``UNetTask``), median of the timed steps, one GPU. What fails, and why only this:

* ``auto`` (what every cell uses) picks a precision at least ``SLOWER`` times slower than the
  other. Smaller gaps are not a regression anyone can act on: small models at these batches are
  bound by kernel launches, so bf16 lands within +-20% of fp32 on many GPUs, and a 20-step median
  moves a few percent between runs. A 1.5x loss is a third of every cell's GPU time: worth a
  measured exception in ``precision.SPEEDUP["cuda"]``.
* the faster precision is slower than two CPU cores (``CPU_128``, ``make bench`` at 128 px,
  docs/cluster.md): any CUDA GPU is many times faster, so such a number means the GPU is not
  doing the work (host syncs every step, a CPU fallback, a throttled or shared device).
"""

from __future__ import annotations

import logging
import statistics
import tempfile

import torch

from brainhpc.train import throughput as tp
from brainhpc.train.precision import resolve
from brainhpc.train.trainer import TrainConfig, Trainer

log = logging.getLogger(__name__)

SLOWER = 1.5
OTHER = {"bf16": "fp32", "fp32": "bf16"}
# img/s of brainhpc's default precision at 128 px on 2 cores of the development CPU (AMD EPYC
# with avx512_bf16), from make bench (docs/cluster.md); the U-Net was not measured there
CPU_128 = {"BrainCNN": 204.7, "BrainCVAE": 249.4, "vae": 122.4, "dcgan": 71.5,
           "wgan-gp": 31.4, "ddpm": 6.4}


def unet_step_times(size: int, precision: str, device: torch.device, warmup: int,
                    steps: int) -> list[float]:
    """Seconds of each timed U-Net step (as ``throughput.step_times`` does for the others)."""
    from brainhpc.gpu_check.ddp import BATCH, UNetTask, _data

    batch = BATCH["unet"]
    torch.manual_seed(0)
    task = UNetTask()
    marks: list[float] = []
    tp.time_steps(task, warmup, device, marks)
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(out=out, epochs=1, batch_size=batch, max_steps=warmup + steps + 1,
                          progress=False, device=device.type, resume=False, checkpoint_every=0,
                          checkpoint_minutes=0, precision=precision, handle_signals=False)
        trainer = Trainer(task, _data("unet", size, batch * (warmup + steps + 2)), cfg)
        try:
            trainer.fit()
        finally:
            trainer.close()
    return [b - a for a, b in zip(marks, marks[1:], strict=False)]


def measure(device: torch.device, arch: str, size: int, warmup: int, steps: int) -> dict:
    """img/s in fp32 and bf16 (median step) and what ``auto`` picks, for one architecture."""
    batch = 16 if arch == "unet" else tp.BATCH[arch]
    row = {"arch": arch, "size": size, "batch": batch}
    for prec in ("fp32", "bf16"):
        if arch == "unet":
            times = unet_step_times(size, prec, device, warmup, steps)
        else:
            times, _ = tp.step_times(arch, size, prec, device, warmup, steps)
        row[prec] = batch / statistics.median(times)
    row["auto"] = resolve("auto", device, arch, size).name
    log.info("%s %d px: fp32 %.0f img/s, bf16 %.0f img/s", arch, size, row["fp32"], row["bf16"])
    return row


def judge(row: dict, device_type: str) -> tuple[str, str]:
    """(OK/FAIL, detail) of one measured row, by the rules of the module docstring."""
    auto, other = row["auto"], OTHER[row["auto"]]
    detail = (f"fp32 {row['fp32']:.0f} img/s, bf16 {row['bf16']:.0f} img/s "
              f"({row['bf16'] / row['fp32']:.2f}x); auto picks {auto}")
    misses = []
    if row[other] >= SLOWER * row[auto]:
        misses.append(f"auto's {auto} is {row[other] / row[auto]:.2f}x slower than {other} "
                      f"(>= {SLOWER}x): list the exception in precision.SPEEDUP['cuda']")
    floor = CPU_128.get(row["arch"]) if row["size"] == 128 else None
    if device_type == "cuda" and floor and max(row["fp32"], row["bf16"]) < floor:
        misses.append(f"slower than 2 CPU cores ({floor} img/s): the GPU is not doing the work")
    return ("FAIL" if misses else "OK"), "; ".join([detail, *misses])


def throughput(device: torch.device, archs, size: int, warmup: int,
               steps: int) -> list[tuple[str, str, str, float]]:
    """One row (name, OK/FAIL, detail, 0.0) per architecture; one failing does not stop the
    others."""
    rows = []
    for arch in archs:
        name = f"  {arch} {size} px"
        try:
            row = measure(device, arch, size, warmup, steps)
        except Exception as e:
            rows.append((name, "FAIL", f"{type(e).__name__}: {e}", 0.0))
            continue
        status, detail = judge(row, device.type)
        rows.append((f"{name} b{row['batch']}", status, detail, 0.0))
    return rows
