"""``make gpu-check`` (``python -m brainhpc.gpu_check``): does brainhpc work on this GPU node?

Run it where the jobs run: inside the image (``make gpu-check IMAGE=brainhpc.sif``, or a docker
tag; ``containers/gpu-check.sh`` starts it there), on a node given one GPU or several. In order,
each timed, every row printed as it ends, then one table; exit status 1 on any miss:

1. CUDA (``probe``): a CUDA build, a visible GPU, its compute capability in the wheel's arch
   list, a matmul (fp32, bf16) and a convolution forward and backward that match the CPU's.
   Without a usable GPU it says why and exits 1: a check that tested nothing must not pass.
2. DDP (``ddp``, through ``torchrun --nproc-per-node=<every visible GPU>``): NCCL collectives,
   all_gather_object included, then every architecture (classifiers, the four generators with
   the GANs and the WGAN-GP's gradient penalty, the U-Net) trained a few steps with its models in
   DDP (also on one GPU), the ranks' weights compared.
3. interrupt and resume (``resume``): a classify cell gets SIGUSR2 mid-training, as from SLURM
   before its time limit, is requeued by flag; going on in the other precision is refused (it
   is in the cell's identity) and it resumes in its own.
4. throughput (``speed``): img/s per architecture at 128 px, fp32 beside bf16, on one GPU;
   fails only on a clear regression (see ``speed``).
5. smoke: the smoke sweep (``jobs/smoke.toml``, profile ``local-gpu``) on the GPU, with the
   device its cells trained on and the CNN's test balanced accuracy (``--no-smoke``: skipped).

Outputs under ``--out`` (``ddp/``, ``resume/``, ``smoke/``). About 6-9 minutes on one GPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from brainhpc.train import throughput as tp

log = logging.getLogger(__name__)

# the submodules are imported where used: ``python -m brainhpc.gpu_check.<module>`` (torchrun's
# ranks, the resume child, the image's %test) must not find itself imported by the package
ARCHS = (*tp.ARCHS, "unet")  # every architecture a cell trains
SIZE = 128
LEARNED = 0.9  # the smoke's CNN on real phantom data: test balanced accuracy at least this
Row = tuple[str, str, str, float]  # (check, OK/FAIL, detail, seconds)


def run_child(cmd: list[str], timeout_s: float, env: dict | None = None) -> tuple[int, str]:
    """``cmd`` in its own session; (exit status, output). On a timeout the whole session is
    killed (torchrun's ranks, the local executor's cells: they would keep the GPU)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env=env)
    try:
        output, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return proc.returncode, output


def ddp_check(out: Path, ranks: int, cpu: bool, archs, size: int, steps: int,
              timeout_s: float) -> list[Row]:
    """The DDP worker on ``ranks`` ranks through torchrun; its report as rows."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={ranks}", "-m", "brainhpc.gpu_check.ddp", "--out", str(out),
           "--size", str(size), "--steps", str(steps), "--archs", *archs] + (
        ["--cpu"] if cpu else [])
    (out / "ddp.json").unlink(missing_ok=True)
    t0 = time.monotonic()
    rc, output = run_child(cmd, timeout_s)
    try:
        report = json.loads((out / "ddp.json").read_text())
    except (OSError, json.JSONDecodeError):
        return [(f"DDP ({ranks} rank(s))", "FAIL", f"torchrun exit {rc}, no report:\n"
                 f"{output[-3000:]}", time.monotonic() - t0)]
    coll = report["collectives"]
    where = ", ".join(f"{r['rank']}: {r['name']}" for r in coll.get("ranks", []))
    rows = [(f"DDP {coll.get('backend', '?')}, {report['world_size']} rank(s)",
             "OK" if coll["ok"] else "FAIL",
             f"all_reduce, all_gather_object, broadcast, barrier ({where})" if coll["ok"]
             else coll["error"], coll.get("seconds", time.monotonic() - t0))]
    for arch, rec in report["archs"].items():
        detail = (f"{rec['steps']} DDP steps, batch {rec['batch']}, {rec['precision']}: "
                  f"{', '.join(rec['models'])} moved, identical on every rank" if rec["ok"]
                  else rec["error"])
        rows.append((f"  {arch}", "OK" if rec["ok"] else "FAIL", detail, rec["seconds"]))
    return rows


def resume_check(out: Path, device: str, timeout_s: float, extra: list[str]) -> Row:
    """The interrupt-and-resume check in a subprocess (it installs signal handlers)."""
    cmd = [sys.executable, "-m", "brainhpc.gpu_check.resume", "--out", str(out), "--device",
           device, "--timeout", str(timeout_s), *extra]
    t0 = time.monotonic()
    rc, output = run_child(cmd, 2 * timeout_s + 120)
    line = next((x for x in reversed(output.splitlines()) if x.startswith('{"ok"')), None)
    if line is None:
        return ("SIGUSR2, other precision refused, resume", "FAIL",
                f"exit {rc}, no result:\n{output[-3000:]}", time.monotonic() - t0)
    res = json.loads(line)
    return ("SIGUSR2, other precision refused, resume", "OK" if res["ok"] else "FAIL",
            res["detail"], time.monotonic() - t0)


def smoke(out: Path, timeout_s: float) -> dict:
    """Run the smoke sweep in a subprocess; what it trained on and what the CNN scored."""
    cmd = [sys.executable, "-m", "brainhpc", "smoke", "--out", str(out), "--force",
           "--profile", "local-gpu"]
    rc, output = run_child(cmd, timeout_s)
    res: dict = {"rc": rc, "tail": output[-2000:]}
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


def smoke_row(out: Path, device: str, timeout_s: float) -> tuple[str, str, list]:
    """(OK/FAIL, detail, []) of the smoke sweep on ``device``."""
    res = smoke(out, timeout_s)
    acc = res.get("cnn_real_balanced_accuracy")
    where = ", ".join(res["devices"]) or "unknown"
    detail = (f"exit {res['rc']}; cells trained on {where} in "
              f"{', '.join(res['precisions']) or '?'}; CNN real test balanced accuracy "
              f"{'-' if acc is None else f'{acc:.3f}'} (learned: >= {LEARNED}); {out}")
    ok = res["rc"] == 0 and acc is not None and acc >= LEARNED and res["devices"] == [device]
    if res["rc"] != 0:
        detail += "\n" + res["tail"]
    elif res["devices"] != [device]:
        detail += f"; expected every cell on {device}"
    return ("OK" if ok else "FAIL"), detail, []


def table(rows: list[Row]) -> str:
    """rows of (check, OK/FAIL, detail, seconds) -> one aligned text table."""
    w = max(len(r[0]) for r in rows)
    lines = [f"{'check':<{w}}  result  {'seconds':>7}  detail"]
    for name, status, detail, secs in rows:
        lines.append(f"{name:<{w}}  {status:<6}  {secs:7.1f}  {detail}")
    return "\n".join(lines)


def _timed(rows: list[Row], name: str, fn) -> None:
    """fn() -> (status, detail, extra rows), or a list of rows; an exception is a FAIL row.
    New rows are printed at once (a long check shows its progress)."""
    t0 = time.monotonic()
    try:
        got = fn()
        new = got if isinstance(got, list) else [(name, got[0], got[1],
                                                  time.monotonic() - t0), *got[2]]
    except Exception as e:
        new = [(name, "FAIL", f"{type(e).__name__}: {e}", time.monotonic() - t0)]
    rows.extend(new)
    for line in table(new).splitlines()[1:]:
        print(line, flush=True)


def run_checks(args, device: torch.device, ranks: int) -> list[Row]:
    """Every check after CUDA's (see the module docstring), in order."""
    rows: list[Row] = []
    cpu = device.type == "cpu"
    _timed(rows, "DDP", lambda: ddp_check(args.out / "ddp", ranks, cpu, args.archs, args.size,
                                          args.ddp_steps, args.timeout))
    # bf16 then fp32; GPUs without native bf16 (compute < 8.0) cannot autocast to it at all
    native = cpu or torch.cuda.get_device_capability(device)[0] >= 8
    extra = [] if native else ["--first", "fp32", "--then", "fp32"]
    _timed(rows, "SIGUSR2, resume", lambda: [resume_check(
        args.out / "resume", device.type, args.timeout, extra + args.resume_args)])

    def speed_rows():
        from brainhpc.gpu_check import speed

        got = speed.throughput(device, args.archs, args.size, args.warmup, args.steps)
        return "OK", f"{len(got)} architectures, median of {args.steps} steps (rows below)", got

    _timed(rows, f"training throughput (one {device.type})", speed_rows)
    if not args.no_smoke:
        _timed(rows, "smoke sweep (--executor local)",
               lambda: smoke_row(args.out / "smoke", device.type, args.smoke_timeout))
    return rows


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m brainhpc.gpu_check",
                                description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/gpu-check"),
                   help="folder of the checks' runs (redone each time)")
    p.add_argument("--no-smoke", action="store_true", help="skip the smoke sweep")
    p.add_argument("--archs", nargs="+", default=list(ARCHS), choices=ARCHS)
    p.add_argument("--ranks", type=int, default=0,
                   help="DDP ranks (default: one per visible GPU)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--ddp-steps", type=int, default=6, help="DDP steps per architecture")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per DDP/resume check")
    p.add_argument("--smoke-timeout", type=float, default=480.0, help="seconds")
    p.add_argument("--size", type=int, default=SIZE, help=argparse.SUPPRESS)
    p.add_argument("--resume-args", type=shlex.split, default=[], help=argparse.SUPPRESS)
    p.add_argument("--cpu", action="store_true", help=argparse.SUPPRESS)  # tests: gloo on CPU
    return p


def main(argv=None) -> int:
    from brainhpc.gpu_check import probe

    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    t0 = time.monotonic()
    if args.cpu:
        device, found = torch.device("cpu"), "--cpu: the checks' logic on the CPU (tests)"
    else:
        try:
            found = probe.probe()
        except probe.ProbeError as e:
            print(f"gpu-check FAILED: no usable GPU: {e}", flush=True)
            print(table([("CUDA", "FAIL", str(e), time.monotonic() - t0)]))
            return 1
        device = torch.device("cuda", 0)
        torch.cuda.set_device(device)
    ranks = args.ranks or (1 if args.cpu else torch.cuda.device_count())
    print(f"gpu-check on {device}, DDP over {ranks} rank(s): {found}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = [("CUDA", "OK", found, time.monotonic() - t0), *run_checks(args, device, ranks)]
    failed = [r[0].strip() for r in rows if r[1] == "FAIL"]
    print()
    print(table(rows))
    print(f"\n{'FAILED: ' + ', '.join(failed) if failed else 'all checks passed'}; "
          f"total {time.monotonic() - t0:.0f} s")
    return 1 if failed else 0
