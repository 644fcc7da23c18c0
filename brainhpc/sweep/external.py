"""The sweep's evaluate stage (external validation): every finished model of one dataset of a run,
scored on one external image set with everything frozen as its own cell chose it.

One evaluate cell per (``[[evaluate]]`` entry, dataset). It reads ``RUN_DIR/plan.json`` for the
classify and segment cells of its dataset and, for each that finished (``model.pt`` and a
``metrics.json`` with status done), writes::

    OUT/classify/<classify cell id>/metrics.json   brainhpc.classify.evaluate (its own skip and
                                                   overlap logic: copies of the model's
                                                   development images are dropped and counted)
    OUT/segment/<segment cell id>/metrics.json     brainhpc.segment.run.evaluate_segmenter, only
                                                   when the external set has tumour masks
    OUT/summary.json                               what was scored, skipped, or not finished

where OUT is the cell's folder, ``RUN_DIR/evaluate/<evaluate cell id>/`` (the aggregate reads
these paths). The external set is read and pre-processed once per model image size (the
``loaded`` cache of ``evaluate``). Models whose cells did not finish are listed in the summary
and do not fail the cell; a model that cannot be scored does, after the others were scored. An
already-scored model is skipped; one whose ``model.pt`` changed since (its cell was re-run with
``--force``) is scored again.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from brainhpc import __version__
from brainhpc.errors import BrainhpcError
from brainhpc.fsio import write_json

log = logging.getLogger(__name__)

SCORED_STAGES = ("classify", "segment")


@dataclass
class ExternalConfig:
    """One evaluate cell: entry ``name`` (``path``, ``labels``, ``split``) x ``dataset``."""

    run_dir: Path
    out: Path  # the evaluate cell's folder
    name: str
    path: Path | None = None  # a raw image folder or a prepared dataset
    dataset: str | None = None  # whose models; None: the one dataset of a plain [data]
    phantom: int | None = None  # or: fresh phantom slices, written to OUT/phantom/ first
    seed: int = 1
    phantom_lesions: str = "standard"  # the phantoms' lesion style (the dataset's: see cells)
    labels: str | None = None  # raw folders: "tumour=yes healthy=no" (one label: one class)
    split: str | None = None  # prepared datasets: train | val | test | all (None: test)
    device: str = "auto"
    force: bool = False

    def __post_init__(self):
        self.run_dir, self.out = Path(self.run_dir), Path(self.out)
        if not self.name:
            raise BrainhpcError("evaluate: the external set needs a name")
        if (self.path is None) == (self.phantom is None):
            raise BrainhpcError(f"evaluate {self.name}: give exactly one of path or phantom")
        if self.phantom is not None:  # one folder per lesion style: --force never reuses it
            self.path = self.out / ("phantom" if self.phantom_lesions == "standard"
                                    else f"phantom-{self.phantom_lesions}")
        else:
            self.path = Path(self.path)


def write_phantom_folder(folder: Path, n: int, seed: int, lesions: str = "standard") -> Path:
    """``n`` phantom slices as a raw Br35H-style folder (``yes/``, ``no/``, ``X_mask.png`` beside
    each image), written to a staging folder and renamed: an external set that needs no download
    and that no model of the run saw (the run's own phantoms use another seed)."""
    import shutil
    import tempfile

    import cv2

    from brainhpc.data import phantom

    if folder.is_dir():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        for p in phantom.generate(n, seed=seed, lesions=lesions):
            sub = staging / ("yes" if p.label else "no")
            sub.mkdir(exist_ok=True)
            cv2.imwrite(str(sub / p.name), p.image)
            cv2.imwrite(str(sub / p.name.replace(".png", "_mask.png")),
                        (p.mask > 0).astype("uint8") * 255)
        staging.rename(folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _cells(cfg: ExternalConfig) -> dict[str, list[str]]:
    """stage -> ids of this dataset's classify/segment cells, from the run's plan."""
    plan = _json(cfg.run_dir / "plan.json")
    if not plan:
        raise BrainhpcError(f"{cfg.run_dir / 'plan.json'} is missing: the evaluate stage scores "
                            "the models of a sweep run directory (python -m brainhpc.sweep)")
    return {s: [c["id"] for c in plan.get(s, []) if c["params"].get("dataset") == cfg.dataset]
            for s in SCORED_STAGES}


def _finished(folder: Path) -> bool:
    return (folder / "model.pt").exists() and _json(folder / "metrics.json").get("status") == "done"


def _stale(out: Path, model_pt: Path) -> bool:
    """Scores in ``out`` belong to another model.pt (its cell was re-run): score again."""
    from brainhpc.fsio import sha256_file

    old = _json(out / "metrics.json").get("config") or {}
    return bool(old) and old.get("checkpoint_sha256") != sha256_file(model_pt)


def _segment_one(cfg: ExternalConfig, ecfg, folder: Path, out: Path, loaded: dict,
                 device: str) -> dict:
    """Score one segmenter (``evaluate_segmenter``) after dropping copies of its development
    images (its dataset's train and validation splits); skips what is already scored."""
    from brainhpc.classify.evaluate import drop_overlap, load_data
    from brainhpc.classify.run import development_fingerprints
    from brainhpc.fsio import config_hash, sha256_file
    from brainhpc.segment.run import evaluate_segmenter, load_segmenter

    t0 = time.time()
    model_pt = folder / "model.pt"
    ident = {"checkpoint": str(model_pt.resolve()), "checkpoint_sha256": sha256_file(model_pt),
             "data": str(cfg.path.resolve()), "split": ecfg.split if ecfg.prepared else None,
             "labels": cfg.labels}
    old = _json(out / "metrics.json")
    if not ecfg.force and old:
        if old.get("config") == ident and old.get("status") == "done":
            return {**old, "skipped": True}
        raise BrainhpcError(f"{out} holds an evaluation with a different config; re-run the "
                            "sweep with --force to overwrite it")
    seg = load_segmenter(model_pt)
    size = int(seg["image_size"])
    if size not in loaded:
        loaded[size] = load_data(ecfg, size)
    data, _skipped, kind = loaded[size]
    if data.masks is None:
        return {"status": "no masks"}
    trained_on = Path(_json(folder / "metrics.json").get("data") or "")
    key = ("without development images", size, str(trained_on))  # the same for all its U-Nets
    if key not in loaded:
        dev = development_fingerprints(trained_on) if (trained_on / "manifest.json").exists() \
            else None
        loaded[key] = drop_overlap(data, {"development_images": dev})
    data, overlap = loaded[key]
    scores = evaluate_segmenter(seg, data, device, what=f"external set {cfg.name} ({cfg.path})")
    result = {"status": "done", **scores, "n": len(data), "overlap": overlap,
              "data": str(cfg.path), "data_kind": kind, "split": ident["split"],
              "image_size": size, "wall_seconds": round(time.time() - t0, 3), "device": device,
              "brainhpc": __version__, "config_hash": config_hash(ident), "config": ident}
    write_json(out / "metrics.json", result)
    return result


def external(cfg: ExternalConfig) -> dict:
    """Score every finished model of ``cfg.dataset`` on ``cfg.path``; returns the summary (also
    ``OUT/summary.json``). Raises after writing the summary when a finished model could not be
    scored (the other models' scores stay; a re-run skips them)."""
    import torch

    from brainhpc.classify.evaluate import EvaluateConfig, evaluate

    t0 = time.time()
    device = "cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu"
    cells = _cells(cfg)
    if cfg.phantom is not None:
        write_phantom_folder(cfg.path, cfg.phantom, cfg.seed, cfg.phantom_lesions)
    # image size -> the pre-processed external set (one read per size); for segmenters also
    # (.., size, their prepared dataset) -> that set without its development images
    loaded: dict = {}
    scored: dict[str, list[dict]] = {s: [] for s in SCORED_STAGES}
    unfinished, errors, no_masks = [], [], None
    for stage in SCORED_STAGES:
        for cid in cells[stage]:
            folder = cfg.run_dir / stage / cid
            if not _finished(folder):
                unfinished.append(f"{stage}/{cid}")
                continue
            if no_masks:
                continue
            out = cfg.out / stage / cid
            force = cfg.force or _stale(out, folder / "model.pt")
            ecfg = EvaluateConfig(checkpoint=folder, data=cfg.path, out=out,
                                  split=cfg.split or "test", labels=cfg.labels, device=device,
                                  force=force)
            try:
                if stage == "classify":
                    m = evaluate(ecfg, loaded=loaded)
                else:
                    m = _segment_one(cfg, ecfg, folder, out, loaded, device)
            except BrainhpcError as e:
                log.error("evaluate %s on %s: %s", cid, cfg.name, e)
                errors.append(f"{stage}/{cid}: {e}")
                continue
            if m["status"] == "no masks":
                no_masks = (f"the external set {cfg.path} has no tumour masks: segmenters not "
                            "scored")
                log.warning("evaluate %s: %s", cfg.name, no_masks)
                continue
            n = m.get("n") or next(iter((m.get("techniques") or {"": {}}).values())).get("n")
            scored[stage].append({"cell": cid, "already_scored": bool(m.get("skipped")),
                                  "n": n, "dropped": (m.get("overlap") or {}).get("dropped")})
    summary = {"status": "failed" if errors else "done", "name": cfg.name,
               "dataset": cfg.dataset, "path": str(cfg.path), "labels": cfg.labels,
               "split": cfg.split, "scored": scored, "not_finished": unfinished,
               "segmenters_skipped": no_masks, "errors": errors, "device": device,
               "wall_seconds": round(time.time() - t0, 3), "brainhpc": __version__}
    write_json(cfg.out / "summary.json", summary)
    n = sum(len(v) for v in scored.values())
    log.info("evaluate %s: %d model(s) scored on %s, %d not finished, %d error(s)", cfg.name, n,
             cfg.path, len(unfinished), len(errors))
    if errors:
        raise BrainhpcError(f"evaluate {cfg.name}: {len(errors)} finished model(s) could not be "
                            f"scored (see {cfg.out / 'summary.json'}): {'; '.join(errors)}")
    return summary
