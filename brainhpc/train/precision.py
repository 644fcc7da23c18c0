"""Training precision: fp32, or bf16 autocast with channels_last tensors, and what ``auto`` picks.

``resolve(requested, device, arch, size)`` turns ``--precision auto|bf16|fp32`` into a
``Precision`` (the name used, and why). ``auto`` is honest: it picks bf16 only where it was
measured to be faster for that architecture on that class of hardware (``SPEEDUP`` below, from
``benchmarks/bench_train.py``), and fp32 everywhere else, so an unmeasured model or CPU never
gets slower. Hardware classes:

* ``amx``: CPUs with AMX-BF16 tiles (Intel Sapphire Rapids and later);
* ``avx512_bf16``: CPUs with AVX-512 bf16 dot products but no AMX (AMD Zen 4/5, Cooper Lake);
* ``cuda``: GPUs with native bf16 (compute capability >= 8.0); bf16 is assumed to win there for
  any model not listed with a measured loss (tensor cores), so ``auto`` means bf16 on them;
* anything else (no bf16 instructions: emulated, slower): fp32.

``fused_optimizers`` switches Adam/AdamW/SGD to their fused kernels (one kernel per step instead
of a Python loop over parameters: measured BrainCNN 128 px 55 -> 67 img/s here, its 34M-parameter
dense layer dominates the update). Fused kernels need each state tensor in its parameter's
layout: ``restore_layout`` puts loaded state back into it (a checkpoint saved under the other
precision's layout). ``identity_name`` is what a cell's identity records: the resolved name.
``cuda_settings`` turns on cuDNN autotuning and TF32 matmuls on GPUs.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import asdict, dataclass

import torch

from brainhpc.errors import BrainhpcError

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "bf16", "fp32")
MIN_SPEEDUP = 1.1  # auto takes bf16 only when it was measured at least this much faster

# Speed-up of one training step in bf16 (autocast + channels_last) over fp32, both with fused
# Adam, 2 threads, default model options, per architecture and image size (batch: the default,
# 64 for the generators, 32 for the classifiers). Architecture names: generator archs as in
# ``brainhpc.models.ARCHS``, classifiers by model class (``Trainer`` uses ``task.arch`` or the
# model class names). Measured with benchmarks/bench_train.py (fp32 vs bf16 side by side).
SPEEDUP: dict[str, dict[str, dict[int, float]]] = {
    # AMD EPYC (Zen 5, family 26) with avx512_bf16, no AMX: the development machine, 2 threads,
    # best of 3 interleaved runs while another job kept about one core busy (load 1.9-2.4),
    # 2026-12-01 (benchmarks/bench_train.py). With 1 thread under load 4-7 every ratio was also
    # above 1.3 (1.36-2.67x). Under heavier load 2-thread bf16 runs can be slower than fp32 (more,
    # shorter kernels, each an OpenMP barrier that waits for a descheduled thread).
    "avx512_bf16": {
        "BrainCNN": {64: 1.91, 128: 2.49},
        "BrainCVAE": {64: 1.31, 128: 1.27},  # 25M dense weights: their dtype casts are 31%
        "vae": {64: 1.44, 128: 1.80},
        "dcgan": {64: 2.07, 128: 2.76},
        "wgan-gp": {64: 1.31, 128: 1.71},  # the gradient penalty stays fp32
        "ddpm": {64: 1.77, 128: 2.28},  # contiguous layout (CONTIGUOUS); batch 16
    },
    # Intel Xeon with AMX: the numbers reported in issue 15 (2 threads, idle machine; fp32 ->
    # bf16 + channels_last + fused Adam, so the fused gain is included), not re-measured here;
    # the generators the issue did not measure are left out (so fp32 until someone does).
    "amx": {
        "BrainCNN": {128: 2.2},
        "BrainCVAE": {128: 2.0},
        "dcgan": {64: 2.2, 128: 3.0},
    },
    # GPUs: bf16 is the default for every model (see the module docstring); entries here would
    # record measured exceptions (speed-up < MIN_SPEEDUP), from `make gpu-check`.
    "cuda": {},
}


# Architectures kept in the contiguous layout under bf16: GroupNorm's CPU kernels are far slower
# on channels_last (DDPM's U-Net: 64 channels, 64 px, batch 16, forward + backward, 1 thread:
# bf16 3.6 ms contiguous vs 75 ms channels_last; fp32 12 vs 27 ms).
CONTIGUOUS = {"ddpm", "ldm"}


@dataclass(frozen=True)
class Precision:
    """What a run computes in: ``name`` is "bf16" (autocast, channels_last unless the
    architecture is in ``CONTIGUOUS``) or "fp32" (contiguous)."""

    name: str
    requested: str
    hardware: str | None  # amx | avx512_bf16 | cuda | None (no native bf16)
    reason: str
    channels_last: bool = False

    @property
    def dtype(self) -> torch.dtype | None:
        """The autocast dtype, or None for plain fp32."""
        return torch.bfloat16 if self.name == "bf16" else None

    def as_dict(self) -> dict:
        return asdict(self)


@functools.cache
def cpu_bf16_hardware() -> str | None:
    """"amx" or "avx512_bf16" when this CPU has native bf16 instructions (Linux), else None."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f
                          if line.startswith("flags")), [])
    except OSError:
        return None
    if not torch.backends.mkldnn.is_available():
        return None  # no oneDNN: bf16 convolutions would not use those units
    if "amx_bf16" in flags:
        return "amx"
    if "avx512_bf16" in flags:
        return "avx512_bf16"
    return None


def hardware(device: torch.device) -> str | None:
    """The bf16 hardware class of ``device`` (see the module docstring)."""
    if device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        return "cuda" if major >= 8 else None
    if device.type == "cpu":
        return cpu_bf16_hardware()
    return None


def measured_speedup(hw: str | None, arch: str, size: int | None) -> float | None:
    """The table's bf16 speed-up for ``arch`` at the measured size nearest ``size``, or None."""
    sizes = SPEEDUP.get(hw or "", {}).get(arch)
    if not sizes:
        return None
    near = min(sizes, key=lambda s: abs(s - (size or s)))
    return sizes[near]


def resolve(requested: str, device: torch.device, arch: str, size: int | None = None
            ) -> Precision:
    """``requested`` (auto | bf16 | fp32) -> the Precision to train ``arch`` with on ``device``."""
    p = _resolve(requested, device, arch, size)
    if p.name == "bf16" and arch not in CONTIGUOUS:
        p = dataclasses.replace(p, channels_last=True)
    return p


def _resolve(requested: str, device: torch.device, arch: str, size: int | None) -> Precision:
    if requested not in PRECISIONS:
        raise BrainhpcError(f"precision {requested!r} is not one of {', '.join(PRECISIONS)}")
    hw = hardware(device)
    if requested == "fp32":
        return Precision("fp32", requested, hw, "requested")
    if requested == "bf16":
        if hw is None:
            log.warning("bf16 requested on %s without native bf16 support: it is emulated there "
                        "and usually slower than fp32 (--precision auto picks fp32)", device)
        return Precision("bf16", requested, hw, "requested")
    if hw is None:
        what = "GPU (compute capability < 8.0)" if device.type == "cuda" else "CPU"
        return Precision("fp32", requested, hw, f"auto: this {what} has no native bf16")
    speed = measured_speedup(hw, arch, size)
    at = f"{arch} at {size} px" if size else arch
    if hw == "cuda":
        if speed is not None and speed < MIN_SPEEDUP:
            return Precision("fp32", requested, hw,
                             f"auto: bf16 measured {speed:.2f}x for {at} on GPUs")
        return Precision("bf16", requested, hw, "auto: bf16 on GPUs with native bf16")
    if speed is None:
        return Precision("fp32", requested, hw,
                         f"auto: no bf16 measurement for {at} on {hw} CPUs (fp32 kept; "
                         "benchmarks/bench_train.py measures it)")
    if speed < MIN_SPEEDUP:
        return Precision("fp32", requested, hw,
                         f"auto: bf16 measured only {speed:.2f}x for {at} on {hw} CPUs")
    return Precision("bf16", requested, hw, f"auto: bf16 measured {speed:.2f}x for {at} on "
                                            f"{hw} CPUs")


def identity_name(requested: str, device: torch.device, arch: str | None,
                  size: int | None = None) -> str:
    """The name ``resolve`` will give a run of ``arch`` at ``size`` on ``device``, for identities:
    "fp32" or "bf16"; "auto@<hardware>" where ``auto``'s answer depends on an architecture (or
    size) the caller cannot name, so that two runs share an identity only if they compute alike."""
    if requested not in PRECISIONS:
        raise BrainhpcError(f"precision {requested!r} is not one of {', '.join(PRECISIONS)}")
    if requested != "auto":
        return requested
    table = SPEEDUP.get(hardware(device) or "", {})
    if arch is not None:
        cases = [(arch, s) for s in ([size] if size else list(table.get(arch, {})) or [None])]
    else:  # every measured model, and an unmeasured one
        cases = [(a, s) for a, sizes in table.items() for s in sizes] + [("", size)]
    names = {_resolve("auto", device, a, s).name for a, s in cases}
    return names.pop() if len(names) == 1 else f"auto@{hardware(device)}"


def cuda_settings(device: torch.device) -> None:
    """On GPUs: cuDNN picks the fastest convolution for each shape (input shapes are fixed
    here), and fp32 matmuls may use TF32 tensor cores. Nothing changes on CPUs."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")


def restore_layout(opt: torch.optim.Optimizer) -> int:
    """Give every state tensor shaped like its parameter that parameter's strides; returns how
    many were copied. ``Optimizer.load_state_dict`` keeps the strides the state was saved with:
    after a layout change (channels_last under bf16, contiguous under fp32) fused Adam refuses
    that state on CUDA and, measured here, pairs the wrong elements on CPU."""
    n = 0
    for p, st in opt.state.items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor) and v.shape == p.shape and v.stride() != p.stride():
                st[k] = torch.empty_like(p, dtype=v.dtype).copy_(v)
                n += 1
    return n


FUSABLE = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)


def fused_optimizers(optimizers: dict[str, torch.optim.Optimizer]) -> list[str]:
    """Switch Adam/AdamW/SGD whose parameters all sit on a fused-kernel device (CPU, CUDA) to
    ``fused=True``; returns the names switched. Call again after loading a state dict (a loaded
    param group carries the flag it was saved with)."""
    done = []
    for name, opt in optimizers.items():
        if not isinstance(opt, FUSABLE):
            continue
        params = [p for g in opt.param_groups for p in g["params"]]
        if not params or not all(p.is_floating_point() and p.device.type in ("cpu", "cuda")
                                 for p in params):
            continue
        if any(g.get("differentiable") or g.get("capturable") for g in opt.param_groups):
            continue
        for g in opt.param_groups:
            g["fused"], g["foreach"] = True, False
        for p, st in opt.state.items():  # fused kernels want the step counter beside the param
            if isinstance(st.get("step"), torch.Tensor):
                st["step"] = st["step"].to(device=p.device, dtype=torch.float32)
        done.append(name)
    return done
