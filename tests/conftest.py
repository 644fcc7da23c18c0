"""Shared fixtures: a prepared phantom dataset (built once per session) and the real-data path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for modules that train tiny models (``pytestmark =
    pytest.mark.usefixtures("one_thread")``): with 2 threads a busy neighbour on the shared cores
    stalls every OpenMP barrier (measured 0.9 s instead of 0.013 s per tiny step)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def prepared_phantom(tmp_path_factory) -> Path:
    """A prepared phantom dataset at 64 px (240 slices, with tumour masks)."""
    from brainhpc.data.prepare import PrepareConfig, prepare

    out = tmp_path_factory.mktemp("phantom") / "prepared"
    prepare(PrepareConfig(out=out, phantom=240, size=64, seed=0, progress=False))
    return out


def real_data_root() -> Path | None:
    """The shared Brain Tumor MRI folder: $BRAINHPC_REAL_DATA, else ../shared beside the repo."""
    env = os.environ.get("BRAINHPC_REAL_DATA")
    path = Path(env) if env else REPO.parent / "shared" / "datasets" / "brain-tumor-mri"
    return path if path.is_dir() else None


@pytest.fixture(scope="session")
def real_data() -> Path:
    path = real_data_root()
    if path is None:
        pytest.skip("real MRI data not found: set BRAINHPC_REAL_DATA or put the shared datasets "
                    "at ../shared/datasets/brain-tumor-mri")
    return path
