"""``make gpu-check`` (``python -m brainhpc.gpu_check``): does brainhpc work on this GPU node?

For anyone who gets a 1-GPU node for ten minutes, with the project's ``.venv`` (torch's CUDA
build). In order, each timed, then one table:

1. CUDA: torch's CUDA build, the device, its compute capability, memory and native bf16;
2. NCCL: a 1-rank process group on the GPU (init, all_reduce, barrier, destroy);
3. throughput: img/s of one training step per architecture at 128 px through the ``Trainer``,
   in fp32 and bf16 (``brainhpc.train.throughput``), and what ``--precision auto`` picks;
4. smoke: the smoke sweep (``jobs/smoke.toml``, ``--executor local``, ``--force``) into
   ``--out``, with the device its cells actually trained on and the CNN's test balanced accuracy.

Without CUDA it says why and exits 0: there is nothing to check. Exit status 1 when a check
failed. About 3-5 minutes on one modern GPU (budget: 8).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from brainhpc.train import throughput as tp
from brainhpc.train.precision import resolve

log = logging.getLogger(__name__)

SIZE = 128
LEARNED = 0.9  # the smoke's CNN on real phantom data: test balanced accuracy at least this


def cuda_status() -> tuple[bool, str]:
    """(usable, what was found or why not)."""
    if torch.version.cuda is None:
        return False, (f"torch {torch.__version__} is a CPU-only build (install the CUDA build "
                       "into .venv; containers: VARIANT=gpu)")
    try:
        n = torch.cuda.device_count()
    except Exception as e:  # a broken driver raises here on some builds
        return False, f"CUDA driver error: {type(e).__name__}: {e}"
    if not torch.cuda.is_available() or n == 0:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        hint = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
        return False, (f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU"
                       f"{hint}: no driver, no device, or none allocated to this job")
    p = torch.cuda.get_device_properties(0)
    bf16 = "native bf16" if p.major >= 8 else "no native bf16 (fp32 under auto)"
    return True, (f"{p.name}, compute {p.major}.{p.minor}, {p.total_memory / 2**30:.0f} GiB, "
                  f"{bf16}; torch {torch.__version__}, CUDA {torch.version.cuda}, "
                  f"{n} device(s) visible")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_group(backend: str, device: torch.device) -> str:
    """Init a 1-rank group, all_reduce on ``device``, barrier, destroy; raises on failure."""
    saved = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT")}
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    try:
        dist.init_process_group(backend, rank=0, world_size=1)
        try:
            x = torch.full((4,), 2.0, device=device)
            dist.all_reduce(x)
            if device.type == "cuda":
                dist.barrier(device_ids=[device.index or 0])
                torch.cuda.synchronize(device)
            else:
                dist.barrier()
            if x.tolist() != [2.0] * 4:
                raise RuntimeError(f"all_reduce over 1 rank changed the tensor: {x.tolist()}")
        finally:
            dist.destroy_process_group()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return f"{backend} on {device}: init, all_reduce, barrier, destroy"


def throughput(device: torch.device, archs, size: int, warmup: int, steps: int) -> list[dict]:
    """img/s per architecture in fp32 and bf16 (median step), and auto's pick."""
    rows = []
    for arch in archs:
        row = {"arch": arch, "size": size, "batch": tp.BATCH[arch]}
        for prec in ("fp32", "bf16"):
            times, _ = tp.step_times(arch, size, prec, device, warmup, steps)
            row[prec] = tp.BATCH[arch] / statistics.median(times)
        row["auto"] = resolve("auto", device, arch, size).name
        rows.append(row)
        log.info("%s %d px: fp32 %.0f img/s, bf16 %.0f img/s", arch, size, row["fp32"],
                 row["bf16"])
    return rows


def smoke(out: Path, timeout_s: float) -> dict:
    """Run the smoke sweep in a subprocess; what it trained on and what the CNN scored."""
    cmd = [sys.executable, "-m", "brainhpc", "smoke", "--out", str(out), "--force",
           "--profile", "local-gpu"]
    # its own process group: on a timeout the cells the local executor started go too (they
    # would otherwise keep the GPU and write on into OUT)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    res: dict = {"rc": proc.returncode, "tail": output[-2000:]}
    devices, precisions = set(), set()
    for path in sorted(out.glob("classify/**/metrics.json")) + sorted(
            out.glob("generate/**/card.json")):
        try:
            rec = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if rec.get("device"):
            devices.add(str(rec["device"]).split(":")[0])
        prec = rec.get("train_precision") or {}
        if prec.get("name"):
            precisions.add(prec["name"])
        if path.parent.name.startswith("cnn-real-") and "balanced_accuracy" in rec:
            res["cnn_real_balanced_accuracy"] = rec["balanced_accuracy"]
    res["devices"], res["precisions"] = sorted(devices), sorted(precisions)
    return res


def table(rows: list[tuple[str, str, str, float]]) -> str:
    """rows of (check, OK/FAIL, detail, seconds) -> one aligned text table."""
    w = max(len(r[0]) for r in rows)
    lines = [f"{'check':<{w}}  result  {'seconds':>7}  detail"]
    for name, status, detail, secs in rows:
        lines.append(f"{name:<{w}}  {status:<6}  {secs:7.1f}  {detail}")
    return "\n".join(lines)


def run_checks(device: torch.device, backend: str, archs, size: int, warmup: int, steps: int,
               out: Path | None, smoke_timeout_s: float) -> list[tuple[str, str, str, float]]:
    """Every check after CUDA's; each row (check, OK/FAIL, detail, seconds) is printed as done."""
    rows: list[tuple[str, str, str, float]] = []

    def timed(name, fn):
        """fn() -> (status, detail, extra rows); an exception is a FAIL with its message."""
        t0 = time.monotonic()
        try:
            status, detail, extra = fn()
        except Exception as e:
            status, detail, extra = "FAIL", f"{type(e).__name__}: {e}", []
        new = [(name, status, detail, time.monotonic() - t0), *extra]
        rows.extend(new)
        for line in table(new).splitlines()[1:]:
            print(line, flush=True)

    timed(f"process group ({backend})", lambda: ("OK", process_group(backend, device), []))

    def speed():
        extra = []
        for r in throughput(device, archs, size, warmup, steps):
            fast = "bf16" if r["bf16"] > r["fp32"] else "fp32"
            close = max(r["bf16"], r["fp32"]) < 1.1 * min(r["bf16"], r["fp32"])
            extra.append((f"  {r['arch']} {r['size']} px b{r['batch']}",
                          "OK" if r["auto"] == fast or close else "FAIL",
                          f"fp32 {r['fp32']:.0f} img/s, bf16 {r['bf16']:.0f} img/s "
                          f"({r['bf16'] / r['fp32']:.2f}x); auto picks {r['auto']}", 0.0))
        return "OK", f"{len(extra)} architectures at {size} px, median step (rows below)", extra

    timed("training throughput", speed)

    def run_smoke():
        res = smoke(out, smoke_timeout_s)
        acc = res.get("cnn_real_balanced_accuracy")
        where = ", ".join(res["devices"]) or "unknown"
        detail = (f"exit {res['rc']}; cells trained on {where} in "
                  f"{', '.join(res['precisions']) or '?'}; CNN real test balanced accuracy "
                  f"{'-' if acc is None else f'{acc:.3f}'} (learned: >= {LEARNED}); {out}")
        ok = (res["rc"] == 0 and acc is not None and acc >= LEARNED
              and res["devices"] == [device.type])
        if res["rc"] != 0:
            detail += "\n" + res["tail"]
        elif res["devices"] != [device.type]:
            detail += (f"; expected every cell on {device.type} (the local executor must make "
                       "the GPU visible to its cells)")
        return ("OK" if ok else "FAIL"), detail, []

    if out is not None:
        timed("smoke sweep (--executor local)", run_smoke)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m brainhpc.gpu_check",
                                description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/gpu-check"),
                   help="folder of the smoke run (redone with --force each time)")
    p.add_argument("--no-smoke", action="store_true", help="skip the smoke sweep")
    p.add_argument("--archs", nargs="+", default=list(tp.ARCHS), choices=tp.ARCHS)
    p.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--smoke-timeout", type=float, default=360.0, help="seconds")
    p.add_argument("--cpu", action="store_true", help=argparse.SUPPRESS)  # tests: gloo on CPU
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    t0 = time.monotonic()
    ok, found = cuda_status()
    if args.cpu:
        device, backend, found = torch.device("cpu"), "gloo", f"--cpu: {found}"
    elif not ok:
        print(f"gpu-check skipped: {found}")
        return 0
    else:
        device, backend = torch.device("cuda", 0), "nccl"
        torch.cuda.set_device(device)
    print(f"gpu-check on {device}: {found}", flush=True)
    rows = [("CUDA", "OK" if ok else "SKIP", found, time.monotonic() - t0)]
    rows += run_checks(device, backend, args.archs, SIZE, args.warmup, args.steps,
                       None if args.no_smoke else args.out, args.smoke_timeout)
    failed = [r[0].strip() for r in rows if r[1] == "FAIL"]
    print()
    print(table(rows))
    print(f"\n{'FAILED: ' + ', '.join(failed) if failed else 'all checks passed'}; "
          f"total {time.monotonic() - t0:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
