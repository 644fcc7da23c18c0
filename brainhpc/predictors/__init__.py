"""Predictors: the trained models the training stages save (``model.pt``) and evaluation reads.

A predictor is a network plus its frozen decision rule, both chosen on the real validation split
of its cell: a classifier (``classifier``: BrainCNN and its threshold, or the VAE detector with
its techniques) or a segmenter (``segmenter``: the U-Net with its probability threshold and
minimum area). Loading and scoring live here, below the stages, so scoring a model never imports
the code that trained it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from brainhpc.errors import BrainhpcError
from brainhpc.fsio import atomic_path

KINDS = ("classifier", "segmenter")


def save_predictor(path: str | Path, state: dict) -> Path:
    """Write ``state`` (tensors and plain values only) atomically to ``path``."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path


def read_saved(path: str | Path) -> dict:
    """The raw contents of ``model.pt`` (or of the one in a cell folder), with ``path`` added."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.pt"
    if not path.exists():
        raise BrainhpcError(f"saved model {path} does not exist (a finished classify or segment "
                            "cell writes OUT/model.pt)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise BrainhpcError(f"{path}: corrupt or unreadable model file "
                            f"({type(e).__name__}: {e})") from e
    if not isinstance(state, dict):
        raise BrainhpcError(f"{path}: not a brainhpc model file (written by `brainhpc classify` "
                            "or `brainhpc segment` as model.pt)")
    state["path"] = path
    state.setdefault("kind", "classifier")  # classifiers from before the kind key
    return state


def load_predictor(path: str | Path) -> dict:
    """A classifier or a segmenter, whichever ``model.pt`` holds (its ``kind``)."""
    from brainhpc.predictors.classifier import load_classifier
    from brainhpc.predictors.segmenter import load_segmenter

    state = read_saved(path)
    if state["kind"] == "segmenter":
        return load_segmenter(path, state)
    if state["kind"] == "classifier":
        return load_classifier(path, state)
    raise BrainhpcError(f"{state['path']}: unknown model kind {state['kind']!r}; valid: "
                        f"{', '.join(KINDS)}")
