"""Figures the aggregate builds across cells: every generator's samples beside real slices.

One cell's ``samples.png`` shows one generator; a reader judging realism wants the real slices
and each generator in rows of one picture, at the same scale and with the same mask outlines.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from brainhpc.data.shards import LABELS, load_split
from brainhpc.errors import BrainhpcError
from brainhpc.fsio import read_json
from brainhpc.images import save_grid

log = logging.getLogger(__name__)

PER_ROW = 8


def _groups(run_dir: Path, plan: dict) -> dict[tuple[str, str], list[dict]]:
    """Finished generate cards by (dataset/fold, label), in plan order."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for c in plan.get("generate", []):
        card = read_json(run_dir / "generate" / c["id"] / "card.json")
        if not card or card.get("status", "done") != "done" or not card.get("shards"):
            continue
        where = c["id"].rsplit("/", 1)[0]
        groups.setdefault((where, card["label"]), []).append(card)
    return groups


def _rows(cards: list[dict]) -> tuple[list[np.ndarray], list[np.ndarray | None], list[str]]:
    """Real train slices (a fixed random pick), then each generator's first samples."""
    first = cards[0]
    real = load_split(first["data"], "train", label=LABELS[first["label"]])
    pick = np.sort(np.random.default_rng(0).choice(len(real), min(PER_ROW, len(real)),
                                                   replace=False))
    masks = first.get("with_masks")
    images, outlines, names = [real.images[pick]], [real.masks[pick] if masks else None], ["real"]
    for card in cards:
        synth = load_split(card["shards"])
        images.append(synth.images[:PER_ROW])
        outlines.append(synth.masks[:PER_ROW] if masks else None)
        names.append(card["arch"])
    return images, outlines, names


def side_by_side(run_dir: Path, plan: dict, out: Path) -> list[str]:
    """``out/figures/generate/<dataset>-<fold>-<label>-side-by-side.png`` per group of finished
    generate cells: a row of real train slices, then a row per generator. A group whose shards
    cannot be read is logged and left out; the aggregate never fails on a figure."""
    made = []
    for (where, label), cards in _groups(run_dir, plan).items():
        rel = f"figures/generate/{where.replace('/', '-')}-{label}-side-by-side.png"
        try:
            images, outlines, names = _rows(cards)
        except (BrainhpcError, OSError, KeyError) as e:
            log.warning("%s: no side-by-side figure: %s", rel, e)
            continue
        n = min(len(x) for x in images)
        captions = [name if i == 0 else "" for name in names for i in range(n)]
        masks = None if outlines[0] is None else np.concatenate([m[:n] for m in outlines])
        save_grid(np.concatenate([x[:n] for x in images]), out / rel, ncols=n,
                  captions=captions, masks=masks,
                  title=f"{where} {label}: real train slices, then each generator's samples")
        made.append(rel)
    return made
