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


@pytest.fixture
def no_slurm_client(monkeypatch, tmp_path_factory):
    """A PATH without sbatch: a dry run then prints its plan without asking a cluster, so tests
    of the plan pass whether or not this machine's SLURM cluster is up."""
    empty = tmp_path_factory.mktemp("nobin")
    monkeypatch.setenv("PATH", str(empty))


@pytest.fixture(scope="session")
def prepared_phantom(tmp_path_factory) -> Path:
    """A prepared phantom dataset at 64 px (240 slices, with tumour masks)."""
    from brainhpc.prepare import PrepareConfig, prepare

    out = tmp_path_factory.mktemp("phantom") / "prepared"
    prepare(PrepareConfig(out=out, phantom=240, size=64, seed=0, progress=False))
    return out


def shared_dataset(name: str) -> Path | None:
    """A shared real dataset (brain-tumor-mri, br35h, lgg-flair): $BRAINHPC_DATASETS/<name>,
    else ../shared/datasets/<name> beside the repo ($BRAINHPC_REAL_DATA still names the
    brain-tumor-mri folder itself)."""
    env = os.environ.get("BRAINHPC_REAL_DATA")
    if name == "brain-tumor-mri" and env:
        path = Path(env)
    else:
        base = os.environ.get("BRAINHPC_DATASETS")
        path = (Path(base) if base else REPO.parent / "shared" / "datasets") / name
    return path if path.is_dir() else None


def real_data_root() -> Path | None:
    return shared_dataset("brain-tumor-mri")


def _need(name: str) -> Path:
    path = shared_dataset(name)
    if path is None:
        pytest.skip(f"real MRI data {name} not found: set BRAINHPC_DATASETS (or "
                    f"BRAINHPC_REAL_DATA for brain-tumor-mri) or put the shared datasets at "
                    f"../shared/datasets/{name}")
    return path


@pytest.fixture(scope="session")
def real_data() -> Path:
    return _need("brain-tumor-mri")


@pytest.fixture(scope="session")
def br35h_data() -> Path:
    return _need("br35h")


@pytest.fixture(scope="session")
def lgg_data() -> Path:
    return _need("lgg-flair")
