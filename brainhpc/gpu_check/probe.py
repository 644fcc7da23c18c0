"""Can this torch compute on this GPU? More than ``torch.cuda.is_available()``.

``is_available()`` is true whenever a driver answers, also when the wheel carries no kernels for
the GPU: PyTorch's cu126 wheels stop at sm_90, so on a Blackwell GPU (compute 10.0 or 12.0) torch
reports the device and then fails at the first kernel ("no kernel image is available"). So the
probe checks, in order: a CUDA build, a visible device, its compute capability in the wheel's
arch list (``torch.cuda.get_arch_list()``: a cubin of the same major version and a minor not
above the device's, or PTX of a capability not above it, which the driver compiles), then runs a
small fp32 matmul, a bf16 one where the GPU has bf16, and a convolution forward and backward
(cuDNN), each compared with the CPU's result.

``python -m brainhpc.gpu_check.probe`` prints one line and exits 0, or prints ``error: ...``
and exits 1: the image's ``%test`` (containers/brainhpc.def) runs it under ``--nv``;
``make gpu-check`` runs the same checks first.
"""

from __future__ import annotations

import os
import re
import sys

import torch
import torch.nn.functional as F

ARCH = re.compile(r"^(sm|compute)_(\d+)([a-z]?)$")


class ProbeError(Exception):
    """The GPU cannot be used, and why (one line a person can act on)."""


def kernels_for(capability: tuple[int, int], arch_list: list[str]) -> str | None:
    """The entry of ``arch_list`` whose code runs on a GPU of ``capability``, or None.

    A cubin ``sm_XY`` runs on compute X.Z with Z >= Y (``sm_80`` on 8.6 and 8.9); ``sm_XYa`` only
    on X.Y exactly; ``sm_XYf`` (family) on X.Z, Z >= Y; PTX ``compute_XY`` on any capability >=
    X.Y (compiled by the driver at first use: slow once, then cached)."""
    major, minor = capability
    cubins, ptx = [], []
    for entry in arch_list:
        m = ARCH.match(entry)
        if not m:
            continue
        kind, digits, suffix = m.groups()
        cap = (int(digits[:-1]), int(digits[-1]))
        if kind == "sm" and cap[0] == major and (
                cap[1] == minor if suffix == "a" else cap[1] <= minor):
            cubins.append((cap, entry))
        elif kind == "compute" and cap <= (major, minor):
            ptx.append((cap, entry))
    best = max(cubins or ptx, default=None)  # the nearest below the device
    return None if best is None else best[1]


def _device() -> torch.device:
    if torch.version.cuda is None:
        raise ProbeError(f"torch {torch.__version__} is a CPU-only build: it sees no GPU "
                         "(install a CUDA build; containers: VARIANT=gpu)")
    try:
        n = torch.cuda.device_count()
        ok = torch.cuda.is_available()
    except Exception as e:  # a broken driver raises here on some builds
        raise ProbeError(f"CUDA driver error: {type(e).__name__}: {e}") from e
    if not ok or n == 0:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        hint = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
        raise ProbeError(f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU"
                         f"{hint}: no GPU allocated, no driver, or a driver older than this "
                         "build needs (nvidia-smi; containers/README.md)")
    return torch.device("cuda", torch.cuda.current_device())


def _close(name: str, got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    err = float((got.float().cpu() - want.float()).abs().max() / want.float().abs().max())
    if not err <= tol:
        raise ProbeError(f"{name} on the GPU differs from the CPU's by {err:.3g} (relative, "
                         f"allowed {tol}): broken kernels for this GPU")


def _compute(device: torch.device, bf16: bool) -> None:
    """A matmul (fp32; bf16 when native) and a conv forward and backward, checked on the CPU."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(256, 256, generator=g), torch.randn(256, 256, generator=g)
    _close("fp32 matmul", a.to(device) @ b.to(device), a @ b, 1e-2)  # TF32 allowed
    if bf16:
        _close("bf16 matmul", a.to(device).bfloat16() @ b.to(device).bfloat16(), a @ b, 5e-2)
    x, w = torch.randn(4, 1, 32, 32, generator=g), torch.randn(8, 1, 3, 3, generator=g)
    xs = [x.clone().requires_grad_(True), x.to(device).requires_grad_(True)]
    outs = [F.conv2d(t, w.to(t.device), padding=1) for t in xs]
    for out in outs:
        out.square().sum().backward()
    _close("conv2d forward", outs[1], outs[0].detach(), 1e-2)
    _close("conv2d backward", xs[1].grad, xs[0].grad, 1e-2)
    torch.cuda.synchronize(device)


def probe() -> str:
    """Every check above on the current GPU; what was found (raises ``ProbeError``)."""
    device = _device()
    p = torch.cuda.get_device_properties(device)
    arch_list = torch.cuda.get_arch_list()
    runs = kernels_for((p.major, p.minor), arch_list)
    if runs is None:
        raise ProbeError(
            f"{p.name} is compute capability {p.major}.{p.minor}, but torch "
            f"{torch.__version__} (CUDA {torch.version.cuda}) has kernels for "
            f"{' '.join(arch_list) or 'no GPU'} only: use a torch build that lists "
            f"sm_{p.major}{p.minor} (Blackwell needs a CUDA 12.8+ build: Dockerfile "
            "CUDA_FLAVOUR=cu128, driver >= 570)")
    try:
        _compute(device, p.major >= 8)
    except ProbeError:
        raise
    except Exception as e:  # "no kernel image", cuDNN missing, illegal memory access ...
        raise ProbeError(f"computing on {p.name} failed: {type(e).__name__}: "
                         f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}") from e
    bf16 = "native bf16" if p.major >= 8 else "no native bf16 (fp32 under auto)"
    return (f"{p.name}, compute {p.major}.{p.minor} ({runs} kernels), "
            f"{p.total_memory / 2**30:.0f} GiB, {bf16}; torch {torch.__version__}, CUDA "
            f"{torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
            f"{torch.cuda.device_count()} device(s) visible; matmul and conv match the CPU")


def main() -> int:
    try:
        print(f"GPU ok: {probe()}")
    except ProbeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
