"""One rank of gpu-check's DDP check: ``torchrun --nproc-per-node=N -m brainhpc.gpu_check.ddp``.

Each rank joins one process group (NCCL on GPUs; gloo with ``--cpu``, for the tests), checks the
collectives the trainer relies on (all_reduce, all_gather_object, broadcast, barrier), then trains
every architecture a few steps through the ``Trainer`` with each trainable model in DDP, and rank
0 writes what passed to ``OUT/ddp.json``. On one rank the Trainer does not wrap (world size 1);
``ForcedDDP`` wraps anyway, so a 1-GPU node still runs DDP's reducer and its NCCL all-reduces,
the GANs' two optimisers through it and the WGAN-GP's gradient penalty beside it, as a
multi-GPU cell would. Checked per architecture: the models are in DDP, every step finished with
finite losses (the trainer stops otherwise), every model's parameters moved, and they are
bit-identical on every rank (DDP averages the gradients: a rank that drifts had a collective
skipped or mismatched). One architecture failing does not stop the others.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import sys
import tempfile
import time
import traceback
from dataclasses import fields, replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from brainhpc.gpu_check import ARCHS
from brainhpc.train import throughput as tp
from brainhpc.train.distributed import DistInfo, init_distributed
from brainhpc.train.trainer import TrainConfig, Trainer

BATCH = {**tp.BATCH, "unet": 16}  # the segment stage's default global batch
TIMEOUT_MIN = 5.0  # a collective one rank never joins fails after this, instead of hanging


class UNetTask:
    """The segment cell's training step (MONAI U-Net, DiceCE on image and mask, Adam) without
    its data plumbing and validation; the U-Net of ``SegmentConfig``'s defaults."""

    arch = "unet"

    def __init__(self):
        from monai.losses import DiceCELoss

        from brainhpc.segment.cell import SegmentConfig

        keys = ("channels", "strides", "res_units", "dropout")
        self.hparams = {f.name: f.default for f in fields(SegmentConfig) if f.name in keys}
        self.loss = DiceCELoss(sigmoid=True, batch=True)

    def models(self):
        from brainhpc.models.unet import build_unet

        return {"unet": build_unet(self.hparams)}

    def optimizers(self, models):
        return {"unet": torch.optim.Adam(models["unet"].parameters(), lr=1e-3)}

    def training_step(self, t, batch):
        images, masks = batch
        x, y = images.float().div_(255.0), (masks > 0).float()
        with t.autocast():
            logits = t.models["unet"](x)
        loss = self.loss(logits.float(), y)
        opt = t.optimizers["unet"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"loss": loss.detach()}


class ForcedDDP(Trainer):
    """The ``Trainer`` with every trainable model in DDP also on one rank, where ``Trainer``
    leaves models bare; on several ranks its own wrapping, exactly what the cells get."""

    def _wrap(self, m):
        if self.world_size > 1:
            return super()._wrap(m)
        if dist.is_initialized() and any(p.requires_grad for p in m.parameters()):
            return DDP(m, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        return m


def join(cpu: bool) -> DistInfo:
    """This rank's group: torchrun's when it started several ranks, else a 1-rank group made
    here (NCCL needs a group to run DDP at all)."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1:
        return init_distributed("cpu" if cpu else "cuda", timeout_minutes=TIMEOUT_MIN)
    if cpu:
        device, backend = torch.device("cpu"), "gloo"
    else:
        device, backend = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))), "nccl"
        torch.cuda.set_device(device)
    if not os.environ.get("MASTER_PORT"):  # not under torchrun: a free local port
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(s.getsockname()[1]))
    dist.init_process_group(backend, rank=0, world_size=1,
                            timeout=datetime.timedelta(minutes=TIMEOUT_MIN))
    return DistInfo(0, 1, 0, device, backend, owns_group=True)


def collectives(info: DistInfo) -> dict:
    """all_reduce (sum of ranks), all_gather_object (who is where), broadcast, barrier."""
    x = torch.full((4,), float(info.rank + 1), device=info.device)
    dist.all_reduce(x)
    want = info.world_size * (info.world_size + 1) / 2
    if x.tolist() != [want] * 4:
        raise RuntimeError(f"all_reduce gave {x.tolist()}, expected {want}")
    me = {"rank": info.rank, "host": socket.gethostname(), "device": str(info.device),
          "name": torch.cuda.get_device_name(info.device) if info.device.type == "cuda"
          else "cpu"}
    everyone: list = [None] * info.world_size
    dist.all_gather_object(everyone, me)
    if [e["rank"] for e in everyone] != list(range(info.world_size)):
        raise RuntimeError(f"all_gather_object gave {everyone}")
    y = torch.arange(3.0, device=info.device) * (info.rank == 0)
    dist.broadcast(y, 0)
    if y.tolist() != [0.0, 1.0, 2.0]:
        raise RuntimeError(f"broadcast from rank 0 gave {y.tolist()}")
    if info.backend == "nccl":
        dist.barrier(device_ids=[info.device.index])
    else:
        dist.barrier()
    return {"ranks": everyone, "backend": info.backend}


def _data(arch: str, size: int, n: int) -> torch.utils.data.TensorDataset:
    if arch != "unet":
        return tp.dataset(arch, size, n)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 1, size, size), dtype=torch.uint8, generator=g)
    return torch.utils.data.TensorDataset(x, (x > 200).to(torch.uint8) * 255)


def _flat(models: dict) -> dict[str, torch.Tensor]:
    return {k: torch.cat([p.detach().float().flatten() for p in m.parameters()])
            for k, m in models.items()}


def _rank_spread(flat: dict[str, torch.Tensor]) -> float:
    """Largest difference of any parameter between this rank and rank 0, over all ranks."""
    worst = torch.zeros((), device=next(iter(flat.values())).device)
    for v in flat.values():
        ref = v.clone()
        dist.broadcast(ref, 0)
        worst = torch.maximum(worst, (v - ref).abs().max())
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return float(worst)


def train_arch(arch: str, info: DistInfo, size: int, steps: int, precision: str) -> dict:
    """``steps`` DDP steps of ``arch`` through the trainer; what was checked (raises on a miss)."""
    batch = -(-BATCH[arch] // info.world_size) * info.world_size
    task = UNetTask() if arch == "unet" else tp.make_task(arch, size, batch)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(out=out, epochs=1, batch_size=batch, max_steps=steps, progress=False,
                          device=info.device.type, resume=False, checkpoint_every=0,
                          checkpoint_minutes=0, precision=precision, handle_signals=False)
        trainer = ForcedDDP(task, _data(arch, size, batch * (steps + 1)), cfg,
                            dist_info=replace(info, owns_group=False))
        try:
            bare = [k for k, m in trainer.models.items() if not isinstance(m, DDP)
                    and any(p.requires_grad for p in m.parameters())]
            before = _flat({k: trainer.raw(k) for k in trainer.models})
            result = trainer.fit()
        finally:
            trainer.close()
    after = _flat({k: trainer.raw(k) for k in trainer.models})
    still = [k for k in after if torch.equal(after[k], before[k])]
    spread = _rank_spread(after)
    if bare or still or spread or result["step"] != steps:
        raise RuntimeError(f"not in DDP: {bare or '-'}; unchanged: {still or '-'}; largest "
                           f"parameter difference between ranks {spread:.3g}; steps "
                           f"{result['step']} of {steps}")
    return {"models": sorted(after), "precision": trainer.precision.name, "batch": batch,
            "steps": steps, "rank_spread": spread}


def run(info: DistInfo, archs, size: int, steps: int, precision: str) -> dict:
    """Every check of this rank; failures are recorded, not raised, so the others still run."""
    report: dict = {"world_size": info.world_size, "device": str(info.device), "archs": {}}
    t0 = time.monotonic()
    try:
        report["collectives"] = {"ok": True, **collectives(info)}
    except Exception as e:
        report["collectives"] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        return report
    report["collectives"]["seconds"] = time.monotonic() - t0
    for arch in archs:
        t0 = time.monotonic()
        try:
            rec = {"ok": True, **train_arch(arch, info, size, steps, precision)}
        except Exception as e:
            rec = {"ok": False, "error": f"{type(e).__name__}: {e}",
                   "traceback": traceback.format_exc()[-3000:]}
        rec["seconds"] = time.monotonic() - t0
        report["archs"][arch] = rec
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m brainhpc.gpu_check.ddp",
                                description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="folder of ddp.json (rank 0)")
    p.add_argument("--archs", nargs="+", default=list(ARCHS), choices=ARCHS)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--steps", type=int, default=6, help="DDP steps per architecture (the "
                   "WGAN-GP's generator moves every 5th)")
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"))
    p.add_argument("--cpu", action="store_true", help="gloo on the CPU (tests)")
    args = p.parse_args(argv)
    info = join(args.cpu)
    try:
        report = run(info, args.archs, args.size, args.steps, args.precision)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    failed = not report["collectives"]["ok"] or not all(r["ok"] for r in
                                                         report["archs"].values())
    if info.rank == 0:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "ddp.json").write_text(json.dumps(report, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
