"""Training throughput (images/s) per architecture: a plain fp32 PyTorch loop vs brainhpc's default.

Every architecture brainhpc trains (BrainCNN and the BrainCVAE classifier, the VAE, DCGAN,
WGAN-GP and DDPM generators) at 64 and 128 px, with its default options and the same task code
in every variant (``brainhpc.train.throughput``: the generators' own ``Task``; for the
classifiers the classify cell's loss and optimiser on the model classes), so only the loop and
the numerics differ:

* ``plain``: ``for (x,) in DataLoader(...): task.training_step(ctx, (x,))`` in fp32, contiguous
  tensors, the task's optimisers as constructed (torch's default for-loop Adam on CPU);
* ``fp32`` and ``bf16``: ``Trainer.fit`` with ``--precision fp32`` / ``bf16`` (bf16 autocast and
  channels_last), both with the trainer's fused optimisers, metric log and per-step bookkeeping;
* ``default`` is whichever of the two ``--precision auto`` picks on this machine
  (``brainhpc.train.precision``), and ``x plain`` its speed-up over the plain loop.
  ``bf16/fp32`` is the number ``precision.SPEEDUP`` records for this hardware class.

EMA is off in all variants (the same algorithm everywhere). Timing starts after ``--warmup``
steps (oneDNN builds its kernels on first use) and covers whole iterations; the three variants
alternate ``--repeats`` times. Each run's median step time is taken, and the table compares the
best run of each variant (what the machine does when a neighbour on shared cores is quiet; the
ratio of the runs' medians is printed beside it). ``uptime`` load is printed on every line.

    .venv/bin/python benchmarks/bench_train.py                       # ~10 minutes on 2 cores
    .venv/bin/python benchmarks/bench_train.py --archs dcgan --sizes 64 --repeats 5
    .venv/bin/python benchmarks/bench_train.py --device cuda --syncs  # host syncs per step

Goals on a CPU with bf16 units: default/plain >= 2.5 for BrainCNN and BrainCVAE, >= 2 for
each generator. With CUDA present the same table is measured on the GPU as well (``--device``
picks one). ``--syncs`` measures no speed: it counts, per architecture and precision, what makes
the host wait for the device in each steady-state training step (tensor values read on the host
and, on a GPU, what torch's sync debug mode reports; ``throughput.host_syncs``). Goal: 0.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import statistics
import time

import torch

from brainhpc.train import throughput as tp
from brainhpc.train.precision import hardware, resolve

GOAL = {"BrainCNN": 2.5, "BrainCVAE": 2.5}  # generators: 2.0
VARIANTS = ("plain", "fp32", "bf16")


class PlainCtx:
    """What a task's training_step needs, with nothing else around it (fp32)."""

    def __init__(self, models, optimizers, device):
        self.models, self.optimizers, self.device, self.step = models, optimizers, device, 0
        self.ema = {}

    def raw(self, name):
        return self.models[name]

    def autocast(self):
        return contextlib.nullcontext()


def run_plain(arch, size, batch, warmup, steps, device) -> list[float]:
    """Per-iteration seconds of the plain loop (after warmup)."""
    torch.manual_seed(0)
    task = tp.make_task(arch, size, batch)
    marks: list[float] = []
    tp.time_steps(task, warmup, device, marks)
    models = {k: m.to(device) for k, m in task.models().items()}
    ctx = PlainCtx(models, task.optimizers(models), device)
    ds = tp.dataset(arch, size, batch * (warmup + steps))
    for b in torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, drop_last=True):
        task.training_step(ctx, [x.to(device) for x in b])
        ctx.step += 1
    tp.sync(device)
    marks.append(time.perf_counter())
    return [b - a for a, b in zip(marks, marks[1:], strict=False)]


def run(variant, arch, size, batch, warmup, steps, device) -> list[float]:
    if variant == "plain":
        return run_plain(arch, size, batch, warmup, steps, device)
    return tp.step_times(arch, size, variant, device, warmup, steps, batch)[0]


def load() -> str:
    return "load {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def bench(device, sizes, archs, warmup, seconds, repeats) -> list[dict]:
    rows = []
    hw = hardware(device)
    for size in sizes:
        for arch in archs:
            batch = tp.BATCH[arch]
            step_s = statistics.median(run("fp32", arch, size, batch, warmup, 2, device))
            n = max(3, min(40, round(seconds / step_s)))
            runs: dict[str, list[float]] = {v: [] for v in VARIANTS}  # per-run median steps
            for _ in range(repeats):
                for v in VARIANTS:
                    runs[v].append(statistics.median(run(v, arch, size, batch, warmup, n,
                                                         device)))
            ips = {v: batch / min(runs[v]) for v in VARIANTS}
            med = {v: batch / statistics.median(runs[v]) for v in VARIANTS}
            auto = resolve("auto", device, arch, size).name
            row = {"device": device.type, "hw": hw, "arch": arch, "size": size, "batch": batch,
                   "steps": n, **ips, "speedup_bf16": ips["bf16"] / ips["fp32"], "auto": auto,
                   "ratio": ips[auto] / ips["plain"], "goal": GOAL.get(arch, 2.0),
                   "median_ratio": med[auto] / med["plain"],
                   "median_speedup_bf16": med["bf16"] / med["fp32"]}
            rows.append(row)
            print(f"{device.type:>4} {arch:>9} {size:>4}px b{batch:<3} {n:>2}x{repeats} | plain "
                  f"{ips['plain']:7.1f} | fp32 {ips['fp32']:7.1f} | bf16 {ips['bf16']:7.1f} "
                  f"img/s | bf16/fp32 {row['speedup_bf16']:.2f} | default {auto} "
                  f"{ips[auto]:7.1f} = {row['ratio']:.2f}x plain (goal {row['goal']:.1f}) | "
                  f"medians: bf16/fp32 {row['median_speedup_bf16']:.2f}, default/plain "
                  f"{row['median_ratio']:.2f} | {load()}", flush=True)
    return rows


def table(rows) -> str:
    lines = ["| device | arch | px | batch | plain fp32 img/s | brainhpc fp32 | brainhpc bf16 | "
             "bf16/fp32 | default | default img/s | default / plain | goal |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['device']} | {r['arch']} | {r['size']} | {r['batch']} | "
                     f"{r['plain']:.1f} | {r['fp32']:.1f} | {r['bf16']:.1f} | "
                     f"{r['speedup_bf16']:.2f} | {r['auto']} | {r[r['auto']]:.1f} | "
                     f"**{r['ratio']:.2f}x** | {r['goal']:.1f}x |")
    return "\n".join(lines)


def syncs(device, sizes, archs) -> int:
    """Print host syncs per steady-state step of each architecture; returns the worst count."""
    worst = 0
    for size in sizes:
        for arch in archs:
            for precision in ("fp32", "bf16"):
                per_step = tp.host_syncs(arch, size, precision, device, steps=6)
                worst = max([worst, *per_step])
                print(f"{device.type:>4} {arch:>9} {size:>4}px {precision} | host syncs per "
                      f"step {per_step} (goal 0)", flush=True)
    return worst


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    p.add_argument("--archs", nargs="+", default=list(tp.ARCHS), choices=tp.ARCHS)
    p.add_argument("--seconds", type=float, default=1.5, help="timed work per run")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--no-cuda", action="store_true", help="CPU only even with a GPU present")
    p.add_argument("--device", choices=("all", "cpu", "cuda"), default="all",
                   help="where to measure (all: the CPU, and the GPU when there is one)")
    p.add_argument("--syncs", action="store_true",
                   help="count host syncs per training step instead of timing")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    hw = hardware(torch.device("cpu"))
    print(f"torch {torch.__version__}, {args.threads} threads, CPU bf16 hardware: {hw}, "
          f"best of {args.repeats} alternating runs per variant; {load()}", flush=True)
    t0 = time.time()
    cuda = torch.cuda.is_available() and not args.no_cuda
    if args.device == "cuda" and not cuda:
        raise SystemExit("--device cuda: torch sees no GPU")
    devices = [torch.device(d) for d in ("cpu", "cuda")
               if args.device in ("all", d) and (d == "cpu" or cuda)]
    if args.syncs:
        worst = max(syncs(d, args.sizes, args.archs) for d in devices)
        print(f"\nmost host syncs in one step: {worst} (goal 0)")
        return
    rows = []
    for d in devices:
        rows += bench(d, args.sizes, args.archs, args.warmup if d.type == "cpu" else 5,
                      args.seconds, args.repeats)
    print()
    print(table(rows))
    short = [f"{r['device']} {r['arch']} {r['size']}px {r['ratio']:.2f}x" for r in rows
             if r["ratio"] < r["goal"]]
    print(f"\nbelow goal: {', '.join(short) or 'none'}; total {time.time() - t0:.0f} s; "
          f"{load()}")


if __name__ == "__main__":
    main()
