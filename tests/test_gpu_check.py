"""make gpu-check on this CPU machine: it must fail without a GPU (through make, the launcher and
the module), start the image the jobs use, and its pieces that run on a CPU do: the DDP worker
(gloo, one rank, forced DDP wrappers, GAN and gradient penalty included), SIGUSR2, the other
precision refused and the resume through the sweep's cell runner, the throughput rules and the
summary."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from brainhpc import gpu_check
from brainhpc.gpu_check import probe, speed

REPO = Path(__file__).resolve().parent.parent
NO_GPU = not torch.cuda.is_available()


def _env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO),
                                                         os.environ.get("PYTHONPATH", "")]),
            **extra}


@pytest.mark.skipif(not NO_GPU, reason="this machine has a GPU")
def test_gpu_check_fails_without_a_gpu(tmp_path):
    """`make gpu-check IMAGE=venv` (the checkout's python) with no GPU visible: non-zero, and
    the reason, not "skipped"."""
    if shutil.which("make") is None:
        pytest.skip("no make here")
    bindir = Path(sys.executable).parent
    res = subprocess.run([shutil.which("make"), "-s", "-o", ".venv/.installed", "gpu-check",
                          "IMAGE=venv", f"BIN={bindir}", f"RUN_GPU={tmp_path / 'gc'}",
                          "GPU_CHECK_ARGS=--no-smoke"], cwd=REPO, capture_output=True,
                         text=True, env=_env(CUDA_VISIBLE_DEVICES=""), timeout=300)
    out = res.stdout + res.stderr
    assert res.returncode != 0, out
    assert "gpu-check FAILED: no usable GPU" in out and "sees no GPU" in out
    assert "CUDA_VISIBLE_DEVICES=''" in out and "skipped" not in out
    direct = subprocess.run([sys.executable, "-m", "brainhpc.gpu_check", "--no-smoke", "--out",
                             str(tmp_path / "gc2")], capture_output=True, text=True,
                            env=_env(CUDA_VISIBLE_DEVICES=""), timeout=300)
    assert direct.returncode == 1 and "no usable GPU" in direct.stdout
    probed = subprocess.run([sys.executable, "-m", "brainhpc.gpu_check.probe"],
                            capture_output=True, text=True, env=_env(CUDA_VISIBLE_DEVICES=""))
    assert probed.returncode == 1 and probed.stderr.startswith("error: ")
    assert "sees no GPU" in probed.stderr  # what containers/test.sh looks for in %test


def _launch(tmp_path, image: str, *args, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "containers" / "gpu-check.sh"), *args],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "IMAGE": image, "OUT": str(tmp_path / "out"),
                               "DRY": "1", **env})


def test_launcher_runs_the_check_inside_the_image(tmp_path):
    """A .sif through apptainer --nv, a tag through docker --gpus all --shm-size (NCCL), the
    image's brainhpc (python -P, working directory the output folder); no image: refused."""
    sif = tmp_path / "brainhpc.sif"
    sif.write_text("")
    out = str(tmp_path / "out")
    res = _launch(tmp_path, str(sif), "--no-smoke", APPTAINER="apptainer")
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["apptainer", "exec", "--nv", "--bind", out, "--pwd", out,
                                  str(sif), "python", "-P", "-m", "brainhpc.gpu_check", "--out",
                                  out, "--no-smoke"]
    res = _launch(tmp_path, "brainhpc:gpu")
    words = res.stdout.split()
    assert words[:6] == ["docker", "run", "--rm", "--gpus", "all", "--shm-size=8g"]
    assert words[-8:] == ["--entrypoint", "python", "brainhpc:gpu", "-P", "-m",
                          "brainhpc.gpu_check", "--out", out]
    assert f"{out}:{out}" in words
    res = _launch(tmp_path, "venv", PYTHON=sys.executable)
    assert res.stdout.split()[:3] == [sys.executable, "-m", "brainhpc.gpu_check"]
    for image, message in (("", "no image given"), (str(tmp_path / "no.sif"), "no such file")):
        res = _launch(tmp_path, image)
        assert res.returncode == 2 and message in res.stderr, res.stderr


def test_arch_list_decides_whether_the_wheel_runs_on_a_gpu():
    """cu126 has no Blackwell kernels; a cubin runs on later minors of its major; PTX on later
    GPUs; sm_90a only on 9.0."""
    cu126 = ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"]
    cu128 = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]
    k = probe.kernels_for
    assert k((10, 0), cu126) is None and k((12, 0), cu126) is None
    assert k((9, 0), cu126) == "sm_90" and k((8, 9), cu126) == "sm_86"
    assert k((10, 0), cu128) == "sm_100" and k((12, 0), cu128) == "sm_120"
    assert k((10, 0), [*cu126, "compute_90"]) == "compute_90"
    assert k((9, 0), ["sm_90a"]) == "sm_90a" and k((10, 0), ["sm_90a"]) is None
    assert k((3, 7), cu126) is None


@pytest.mark.slow
def test_ddp_worker_on_cpu_with_gloo(tmp_path):
    """The DDP check as gpu-check starts it (torchrun, one rank), on the CPU: collectives,
    then a classifier, the WGAN-GP (two models, gradient penalty), the LDM (both phases: the
    idle part's parameters still need gradients under DDP) and the U-Net in DDP."""
    rows = gpu_check.ddp_check(tmp_path, 1, True, ["BrainCNN", "wgan-gp", "ldm", "unet"], 32,
                               6, 300)
    assert [r[1] for r in rows] == ["OK"] * 5, rows
    assert rows[0][0] == "DDP gloo, 1 rank(s)" and "all_gather_object" in rows[0][2]
    report = json.loads((tmp_path / "ddp.json").read_text())
    wgan = report["archs"]["wgan-gp"]
    assert wgan["models"] == ["critic", "generator"] and wgan["steps"] == 6
    assert report["collectives"]["ranks"][0]["rank"] == 0


@pytest.mark.slow
def test_interrupt_refuse_the_other_precision_then_resume_on_cpu(tmp_path):
    """SIGUSR2 mid-training of a classify cell run as a SLURM task (environment only); going
    on in fp32 is refused (precision is in the identity), the requeued bf16 run resumes from
    the checkpoint to the end."""
    row = gpu_check.resume_check(tmp_path / "resume", "cpu", 300,
                                 ["--epochs", "4", "--phantom", "120", "--size", "32"])
    assert row[1] == "OK", row[2]
    assert row[2].startswith("bf16 interrupted by SIGUSR2 at step ")
    assert "fp32 refused, resumed in bf16" in row[2]
    logs = tmp_path / "resume" / "logs"  # what the sbatch teardown and the requeue read
    assert (logs / "requeue-4242").exists() and (logs / "4242_submitted.pkl").exists()


def test_throughput_fails_only_on_a_clear_regression():
    row = {"arch": "dcgan", "size": 128, "batch": 64, "fp32": 1000.0, "bf16": 1400.0,
           "auto": "bf16"}
    assert speed.judge(row, "cuda")[0] == "OK"
    assert speed.judge({**row, "bf16": 800.0}, "cuda")[0] == "OK"  # 1.25x: noise, launches
    status, detail = speed.judge({**row, "bf16": 600.0}, "cuda")
    assert status == "FAIL" and "1.67x slower than fp32" in detail and "SPEEDUP" in detail
    status, detail = speed.judge({**row, "fp32": 50.0, "bf16": 60.0}, "cuda")
    assert status == "FAIL" and "slower than 2 CPU cores (71.5 img/s)" in detail
    assert speed.judge({**row, "fp32": 50.0, "bf16": 60.0}, "cpu")[0] == "OK"
    assert speed.judge({**row, "size": 64, "fp32": 50.0, "bf16": 60.0}, "cuda")[0] == "OK"


def test_any_miss_fails_the_run_and_the_table_says_which(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(gpu_check, "ddp_check", lambda *a: [
        ("DDP gloo, 1 rank(s)", "OK", "collectives", 0.1), ("  dcgan", "FAIL", "boom", 0.2)])
    monkeypatch.setattr(gpu_check, "resume_check", lambda *a: ("SIGUSR2, resume", "OK", "ok",
                                                                1.0))
    monkeypatch.setattr(speed, "throughput", lambda *a: [("  vae 32 px b64", "OK", "x", 0.0)])
    assert gpu_check.main(["--cpu", "--no-smoke", "--out", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    table = out.split("\n\n")[-2]
    assert table.splitlines()[0].split() == ["check", "result", "seconds", "detail"]
    assert [line.split()[0] for line in table.splitlines()[1:]] == [
        "CUDA", "DDP", "dcgan", "SIGUSR2,", "training", "vae"]
    assert "FAILED: dcgan;" in out
