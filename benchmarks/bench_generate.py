"""Generator throughput (images/s): training and sampling of every ``generate --arch``.

One row per architecture of ``brainhpc.models.ARCHS`` and image size (64 and 128 px by default),
with the architecture's default options (EMA off while training, as in ``bench_train.py``):

* ``train img/s``: ``Trainer.fit`` steps (``--precision``, default ``auto``: what a generate cell
  resolves to), timed after ``--warmup`` steps (oneDNN builds its kernels on first use), median
  step over ``--steps`` steps. The LDM trains in two phases of different cost, so it has two
  rows: ``ldm:ae`` (an autoencoder step with the patch discriminator: the dearer half of phase 1)
  and ``ldm:diffusion`` (a latent UNet step with the frozen encoder);
* ``sample img/s``: ``task.sample`` of ``--sample-n`` images from an untrained model (the cost
  does not depend on the weights) after a warm-up call; DDPM and LDM at their default
  ``sample_steps``, extrapolated from calls of 2 and 6 steps (``sample_rate``).

The global batch is the config's default, capped at ``--max-batch`` and, for DDPM, at
``bench_train.py``'s 16 (CPU img/s hardly depends on it beyond a few dozen; printed per row).
``uptime`` load is printed on every line: on shared cores a busy neighbour slows every number.
The full table takes several minutes on 2 idle cores, most of it DDPM at 128 px.

    .venv/bin/python benchmarks/bench_generate.py                # CPU, 64 and 128 px
    .venv/bin/python benchmarks/bench_generate.py --archs ldm --sizes 64 --steps 5
    .venv/bin/python benchmarks/bench_generate.py --quick        # tiny models, 32 px: a check

``--quick`` uses tiny options of each architecture at 32 px and 2 timed steps: it shows that
every architecture trains and samples here, not how fast.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time

import torch

from brainhpc import models
from brainhpc.train import throughput as tp
from brainhpc.train.trainer import TrainConfig, Trainer

QUICK = {  # tiny options (as the tests use) for --quick
    "vae": {"base": 8, "latent": 16, "max_channels": 32},
    "dcgan": {"g_channels": 16, "min_channels": 8, "d_channels": 8},
    "wgan-gp": {"g_channels": 16, "min_channels": 8, "d_channels": 8, "n_critic": 2},
    "ddpm": {"channels": 8, "res_blocks": 1, "timesteps": 40, "sample_steps": 4},
    "ldm": {"ae_channels": [8, 8], "unet_channels": [8, 16], "unet_res_blocks": 1,
            "head_channels": 8, "d_channels": 8, "d_layers": 2, "timesteps": 40,
            "sample_steps": 4},
}


def load() -> str:
    return "load {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def rows_of(archs: list[str], warmup: int, steps: int) -> list[tuple[str, str, dict]]:
    """(row name, architecture, row options) for each architecture. The LDM has two rows, its
    phase chosen by ``ae_steps``: every step in the autoencoder phase (with the patch loss from
    the start), or only the first (a warm-up step, so ``warmup`` must be >= 1)."""
    out = []
    for arch in archs:
        if arch == "ldm":
            out += [("ldm:ae", arch, {"ae_steps": warmup + steps, "adv_start": 0}),
                    ("ldm:diffusion", arch, {"ae_steps": 1})]
        else:
            out.append((arch, arch, {}))
    return out


def make_task(arch: str, size: int, options: dict, max_batch: int):
    """The task at ``options``, EMA off (the VAE has none), batch capped at ``max_batch`` and at
    ``bench_train.py``'s (``throughput.BATCH``: DDPM 16)."""
    batch = min(models.make_config(arch, size, options).batch_size, max_batch,
                tp.BATCH.get(arch, max_batch))
    opts = {**options, "batch_size": batch}
    if "ema" in models.option_names(arch):
        opts["ema"] = 0
    return models.build_task(arch, size, opts), batch


def train_seconds(arch: str, size: int, options: dict, max_batch: int, warmup: int,
                  steps: int, precision: str) -> tuple[float, int, str]:
    """Median seconds of a timed ``Trainer.fit`` step, the batch, the resolved precision."""
    torch.manual_seed(0)
    task, batch = make_task(arch, size, options, max_batch)
    marks: list[float] = []
    tp.time_steps(task, warmup, torch.device("cpu"), marks)
    data = tp.dataset(arch, size, batch * (warmup + steps + 1))
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(out=out, epochs=1, batch_size=batch, max_steps=warmup + steps,
                          progress=False, device="cpu", resume=False, checkpoint_every=0,
                          checkpoint_minutes=0, precision=precision, handle_signals=False)
        trainer = Trainer(task, data, cfg)
        save = trainer.save_checkpoint

        def closing_mark():  # the end-of-run checkpoint is not a step
            marks.append(time.perf_counter())
            return save()

        trainer.save_checkpoint = closing_mark
        with trainer:
            trainer.fit()
    times = [b - a for a, b in zip(marks, marks[1:], strict=False)]
    return statistics.median(times), batch, trainer.precision.name


def sample_rate(arch: str, size: int, options: dict, n: int) -> float:
    """Images per second of ``task.sample`` for ``n`` images (after a warm-up call). Samplers
    with ``sample_steps`` (DDPM, LDM) are timed at 2 and 6 steps, and the time at the default
    steps extrapolated from the line through both (per-call costs, e.g. the LDM's decoding,
    stay fixed): a batch of a few images would be dominated by per-call overhead, and a whole
    run of 50 steps takes minutes at 128 px."""
    torch.manual_seed(0)
    task, _ = make_task(arch, size, options, 64)
    net = task.models()[task.sample_model]
    steps = getattr(task.cfg, "sample_steps", None)

    def seconds(k: int | None) -> float:
        if k is not None:
            task.cfg.sample_steps = k
        t0 = time.perf_counter()
        task.sample(net, n, torch.Generator().manual_seed(1))
        return time.perf_counter() - t0

    seconds(None if steps is None else 2)  # warm-up
    if steps is None:
        return n / seconds(None)
    short, long = seconds(2), seconds(6)
    return n / (long + (long - short) / 4 * (steps - 6))


def bench(args) -> list[dict]:
    rows = []
    for size in args.sizes:
        for name, arch, opts in rows_of(args.archs, args.warmup, args.steps):
            opts = {**(QUICK[arch] if args.quick else {}), **opts}
            step_s, batch, prec = train_seconds(arch, size, opts, args.max_batch, args.warmup,
                                                args.steps, args.precision)
            row = {"arch": name, "size": size, "batch": batch, "precision": prec,
                   "step_s": step_s, "train": batch / step_s, "sample": None}
            if name != "ldm:ae":
                row["sample"] = sample_rate(arch, size, opts, args.sample_n)
            rows.append(row)
            shown = f"{rate(row['sample']):>8}" if row["sample"] else "       -"
            print(f"{name:>13} {size:>4}px b{batch:<3} {prec:>4} | train {row['train']:8.1f} "
                  f"img/s ({step_s:.3f} s/step) | sample {shown} img/s | {load()}", flush=True)
    return rows


def rate(x: float) -> str:
    return f"{x:.1f}" if x >= 1 else f"{x:.3f}"


def table(rows) -> str:
    lines = ["| arch | px | batch | precision | train img/s | s/step | sample img/s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        sample = rate(r["sample"]) if r["sample"] else "(in ldm:diffusion)"
        lines.append(f"| {r['arch']} | {r['size']} | {r['batch']} | {r['precision']} | "
                     f"{r['train']:.1f} | {r['step_s']:.3f} | {sample} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archs", nargs="+", default=list(models.ARCHS), choices=list(models.ARCHS))
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="default: 64 128")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3, help="timed training steps per row")
    p.add_argument("--sample-n", type=int, default=32, help="images sampled per timed call")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--quick", action="store_true",
                   help="tiny options at 32 px, 1 warm-up and 2 timed steps (a check)")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes = args.sizes or [32]
        args.warmup, args.steps, args.sample_n = 1, 2, 4
    args.sizes = args.sizes or [64, 128]
    if args.warmup < 1:
        p.error("--warmup must be >= 1 (the LDM's diffusion row warms up on its one AE step)")
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, CPU; {load()}", flush=True)
    t0 = time.time()
    rows = bench(args)
    print()
    print(table(rows))
    print(f"\ntotal {time.time() - t0:.0f} s; {load()}")


if __name__ == "__main__":
    main()
