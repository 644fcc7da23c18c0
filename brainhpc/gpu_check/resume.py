"""gpu-check's interrupt-and-resume check: SIGUSR2 mid-training, then the rest, as a SLURM cell
does at its time limit and again after its requeue.

One classify cell (BrainCNN on phantom slices, through the sweep's ``CellRunner``) runs in a
child process that submitit and brainhpc take for task 0 of SLURM job 4242 (its environment
only: no Slurm is needed, as inside a container). Once the trainer has logged steps the child
sends itself SIGUSR2, as SLURM does before the time limit. Checked: the cell stopped at a step
boundary as ``interrupted`` with a checkpoint, the requeue flag the sbatch teardown acts on and
the requeued submission (without ``--force``). The cell is then asked to go on in the other
precision (``bf16`` <-> ``fp32``, as a requeue onto another GPU model would resolve ``auto``):
the resolved precision is part of the cell's identity, so this must be refused, naming the
precision, not crash at the first step nor mix precisions in one result. Then it runs again, as
the requeued task would, in its own precision, and must resume: status done, ``resumed`` in its
metrics, the step count going on from the checkpoint (the log before it kept), the final weights
fp32, finite, moved from the checkpoint's, with the checkpoint's names and shapes. (Optimizer
state resumed into another memory layout is tested on CPU, tests/test_gpu_ready.py.)

``python -m brainhpc.gpu_check.resume --out DIR [--device cuda|cpu]`` prints one JSON line
(``ok``, ``detail``, facts) and exits 1 on a miss.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

JOB_ID = "4242"
OTHER = {"bf16": "fp32", "fp32": "bf16"}


def make_cell(run_dir: Path, precision: str, epochs: int, batch: int):
    from brainhpc.sweep.plan import Cell

    return Cell("classify", "cnn-real-s0", {
        "model": "cnn", "train_data": "real", "seed": 0, "epochs": epochs, "batch_size": batch,
        "precision": precision}, str(run_dir.resolve()))


def slurm_env(logs: Path) -> dict[str, str]:
    """This environment as task 0 of a one-task SLURM job (and nothing of a real job)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "SUBMITIT_", "SBATCH_"))}
    env.update(SLURM_JOB_ID=JOB_ID, SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NTASKS="1",
               SLURM_JOB_NUM_NODES="1", SLURM_NODEID="0", SUBMITIT_EXECUTOR="slurm",
               SUBMITIT_FOLDER=str(logs))
    return env


def _signal_when_training(folder: Path, timeout_s: float) -> None:
    """SIGUSR2 to this process once the cell's trainer has logged a training record."""
    log = folder / "metrics.jsonl"
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        try:
            if '"train"' in log.read_text():
                os.kill(os.getpid(), signal.SIGUSR2)
                return
        except OSError:
            pass
        time.sleep(0.02)


def child(run_dir: Path, device: str, precision: str, epochs: int, batch: int) -> None:
    """Phase 1 (in the SLURM-looking child): run the cell as an array task would, with
    submitit's signal handling, and interrupt it with SIGUSR2 from a watcher thread."""
    import submitit
    from submitit.core.utils import DelayedSubmission

    from brainhpc.sweep.runner import CellRunner

    cell = make_cell(run_dir, precision, epochs, batch)
    runner = CellRunner(force=True, device=device)
    delayed = DelayedSubmission(runner, cell)
    delayed.set_timeout(60, 3)
    env = submitit.JobEnvironment()
    env._handle_signals(env.paths, delayed)  # what submitit.core._submit does in a real task
    threading.Thread(target=_signal_when_training, args=(cell.folder, 600.0),
                     daemon=True).start()
    runner(cell)  # on SIGUSR2: checkpoint, flag, requeued submission, sys.exit


def interrupt(run_dir: Path, device: str, precision: str, epochs: int, batch: int,
              timeout_s: float) -> dict:
    """Phase 1 in a child process; what it left behind."""
    from submitit.core.utils import DelayedSubmission

    from brainhpc.sweep.runner import read_marker, requeue_flag

    logs = run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "brainhpc.gpu_check.resume", "--child", "--out", str(run_dir),
           "--device", device, "--first", precision, "--epochs", str(epochs), "--batch",
           str(batch)]
    proc = subprocess.run(cmd, env=slurm_env(logs), capture_output=True, text=True,
                          timeout=timeout_s)
    cell = make_cell(run_dir, precision, epochs, batch)
    marker = read_marker(cell) or {}
    flag = requeue_flag(logs, JOB_ID)
    pickle = logs / f"{JOB_ID}_submitted.pkl"
    again = DelayedSubmission.load(pickle) if pickle.exists() else None
    return {"rc": proc.returncode, "status": marker.get("status"), "flag": flag.exists(),
            "requeued_force": None if again is None else again.function.force,
            "tail": (proc.stdout + proc.stderr)[-2000:], "cell": cell}


def _weights(path: Path) -> tuple[int, dict[str, torch.Tensor]]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    return int(state["step"]), {f"{m}.{k}": v for m, sd in state["models"].items()
                                for k, v in sd.items() if v.is_floating_point()}


def _log_steps(folder: Path) -> list[int]:
    recs = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines() if x]
    return [r["step"] for r in recs if r.get("kind") == "train"]


def check_phase1(res: dict) -> tuple[list[str], int, dict]:
    """Misses of the interrupted run; the checkpoint's step and weights."""
    misses = []
    if res["rc"] == 0:
        misses.append("the cell finished before SIGUSR2 arrived (make it longer: --epochs)")
    if res["status"] != "interrupted":
        misses.append(f"cell.json status {res['status']!r} after SIGUSR2, not 'interrupted'")
    if not res["flag"]:
        misses.append("no requeue flag for the sbatch teardown")
    if res["requeued_force"] is not False:
        misses.append(f"requeued submission: force={res['requeued_force']} (expected False)")
    ckpt = res["cell"].folder / "checkpoints" / "last.pt"
    if not ckpt.exists():
        return misses + ["no checkpoint after SIGUSR2"], 0, {}
    step, weights = _weights(ckpt)
    return misses, step, weights


def check_phase2(cell, result: dict, step0: int, before: dict, precision: str,
                 device: str) -> tuple[list[str], dict]:
    """Misses of the resumed run, and its facts."""
    metrics = json.loads((cell.folder / "metrics.json").read_text())
    step, after = _weights(cell.folder / "checkpoints" / "last.pt")
    steps = _log_steps(cell.folder)
    facts = {"interrupted_at": step0, "final_step": step,
             "precision": metrics.get("train_precision", {}).get("name"),
             "resumed": metrics.get("resumed"), "device": metrics.get("device")}
    misses = []
    if result.get("status") != "done":
        misses.append(f"resumed cell ended {result.get('status')!r}")
    if facts["resumed"] is not True:
        misses.append("metrics.json: resumed is not true (it started over)")
    if facts["precision"] != precision:
        misses.append(f"resumed in {facts['precision']!r}, asked for {precision!r}")
    if not str(facts["device"]).startswith(device):
        misses.append(f"resumed on {facts['device']!r}, asked for {device!r}")
    if not step > step0 or not any(s <= step0 for s in steps) or len(set(steps)) != len(steps):
        misses.append(f"steps do not go on from the checkpoint (interrupted at {step0}, final "
                      f"{step}, logged steps {steps})")
    if sorted(after) != sorted(before) or any(after[k].shape != before[k].shape for k in after):
        misses.append("the resumed weights' names or shapes differ from the checkpoint's")
    elif any(v.dtype != torch.float32 or not torch.isfinite(v).all() for v in after.values()):
        misses.append("resumed weights are not all finite fp32")
    elif all(torch.equal(after[k], before[k]) for k in after):
        misses.append("the weights did not move after the resume")
    return misses, facts


def refused(out: Path, device: str, other: str, epochs: int, batch: int) -> list[str]:
    """Misses of the attempt to go on in the other precision: it must be refused by name."""
    from brainhpc.errors import BrainhpcError
    from brainhpc.sweep.runner import CellRunner

    try:
        result = CellRunner(force=False, device=device)(make_cell(out, other, epochs, batch))
    except BrainhpcError as e:
        return [] if "precision" in str(e) else [f"refused, but not for the precision: {e}"]
    return [f"going on in {other} was not refused (status {result.get('status')!r})"]


def check(out: Path, device: str, precisions: tuple[str, str], epochs: int, batch: int,
          phantom: int, size: int, timeout_s: float) -> dict:
    """Interrupt in ``first``, refuse ``other``, resume in ``first``; {"ok", "detail", facts}."""
    first, other = precisions
    then = first
    from brainhpc.prepare import PrepareConfig, prepare
    from brainhpc.sweep.plan import prepared_dir
    from brainhpc.sweep.runner import CellRunner

    shutil.rmtree(out, ignore_errors=True)
    prepare(PrepareConfig(out=prepared_dir(out), phantom=phantom, size=size, seed=0,
                          progress=False))
    res = interrupt(out, device, first, epochs, batch, timeout_s)
    misses, step0, before = check_phase1(res)
    facts: dict = {"first": first, "refused": other}
    if not misses:
        misses += refused(out, device, other, epochs, batch)
    if not misses:
        cell = make_cell(out, then, epochs, batch)
        result = CellRunner(force=False, device=device)(cell)
        more, got = check_phase2(cell, result, step0, before, then, device)
        misses, facts = misses + more, {**facts, **got}
    detail = (f"{first} interrupted by SIGUSR2 at step {facts.get('interrupted_at', '?')}, "
              f"{other} refused, resumed in {then} to step {facts.get('final_step', '?')}")
    if misses:
        detail = "; ".join(misses) + (f"\n{res['tail']}" if res["rc"] == 0 or not step0
                                      else "")
    return {"ok": not misses, "detail": detail, **facts}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m brainhpc.gpu_check.resume",
                                description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="run folder (redone each time)")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--first", default="bf16", choices=tuple(OTHER),
                   help="precision until SIGUSR2")
    p.add_argument("--then", choices=tuple(OTHER),
                   help="precision that must be refused after the interrupt (default: the "
                        "other one)")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--phantom", type=int, default=600, help="phantom slices to prepare")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds for the first phase")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.out, args.device, args.first, args.epochs, args.batch)
        return 0
    for key in [k for k in os.environ if k.startswith(("SLURM_", "SUBMITIT_"))]:
        del os.environ[key]  # the resumed run is a plain process, whatever job runs the check
    res = check(args.out, args.device, (args.first, args.then or OTHER[args.first]),
                args.epochs, args.batch, args.phantom, args.size, args.timeout)
    print(json.dumps(res))
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
