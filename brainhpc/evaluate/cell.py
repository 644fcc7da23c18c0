"""The ``evaluate`` cell: saved models scored on another image set, every rule frozen.

Which models: one saved model (``checkpoint``: a classify or segment cell's ``model.pt``, or its
folder; a classifier or a U-Net), or every finished model of one dataset of a sweep run
(``run_dir`` and ``dataset``: the sweep's evaluate stage, one cell per ``[[evaluate]]`` entry and
dataset). Which images: a prepared dataset or a raw folder (``data``; ``X_mask`` files beside the
images give segmenters and the VAE detector's localisation their masks), or ``phantom`` fresh
phantom slices with masks, written once to ``OUT/phantom-<N>-s<seed>/`` (no download; the run's
own phantoms use another seed). How each model is scored: ``brainhpc.evaluate.score``.

One model writes ``OUT/metrics.json`` (and ``error_maps.png`` or ``overlays.png``); a run writes
``OUT/<stage>/<cell id>/metrics.json`` per model and ``OUT/summary.json`` (what was scored,
skipped, or not finished). A run's evaluate cell is incremental: run again, it scores the models
that finished since and skips the scored ones (one whose ``model.pt`` changed, its cell re-run
with ``--force``, is scored again). Models whose cells did not finish are listed and do not fail
the cell; a model that cannot be scored does, after the others were scored.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from brainhpc.cell import (
    Config,
    Context,
    Outputs,
    device_option,
    force_option,
    out_option,
    previous,
    run_cell,
)
from brainhpc.data import phantom
from brainhpc.data.phantom import LESIONS
from brainhpc.data.shards import EVAL_SPLITS
from brainhpc.errors import BrainhpcError
from brainhpc.evaluate.score import (
    ImageSet,
    log_scores,
    score_classifier,
    score_segmentation,
)
from brainhpc.fsio import config_hash, read_json, sha256_file, write_json
from brainhpc.options import check, option
from brainhpc.predictors import load_predictor

log = logging.getLogger(__name__)

SCORED_STAGES = ("classify", "segment")
ONE = Outputs(result="metrics.json", wipe=("error_maps.png", "overlays.png", "predictions.csv",
                                           "patients.csv", "localisation.csv"))
RUN = Outputs(result="summary.json", incremental=True)


@dataclass
class EvaluateConfig(Config):
    stage: ClassVar[str] = "evaluate"

    out: Path = out_option("output folder of the scores")
    checkpoint: Path | None = option(None, "one saved model: a classify or segment cell's "
                                     "model.pt, or the cell folder")
    run_dir: Path | None = option(None, "or every finished model of this sweep run directory")
    dataset: str | None = option(None, "with --run-dir: the run's dataset whose models are "
                                 "scored (sweeps with several [data.<name>] tables)")
    data: Path | None = option(None, "prepared dataset or raw image folder (X_mask files beside "
                               "the images: masks)")
    phantom: int | None = option(None, "or N fresh phantom slices with masks, written to OUT",
                                 min=1, metavar="N")
    seed: int = option(1, "seed of the phantom slices", min=0)
    phantom_lesions: str = option("standard", "phantom lesion style (the models' dataset's)",
                                  choices=LESIONS)
    split: str = option("test", "prepared data: the split scored (the others must be asked "
                        "for)", choices=EVAL_SPLITS)
    labels: str | None = option(None, "raw folders: explicit mapping, e.g. --labels tumour=yes "
                                "healthy=no; one label alone scores a one-class folder",
                                nargs="+", metavar="LABEL=DIR[,DIR]")
    name: str = option("external", "the image set's name (summaries and logs)", run=True)
    device: str = device_option()
    workers: int | None = option(None, "pre-processing threads (raw folders)", min=1, run=True)
    force: bool = force_option()

    def __post_init__(self):
        check(self)
        if (self.checkpoint is None) == (self.run_dir is None):
            raise BrainhpcError("evaluate: give exactly one of --checkpoint (one saved model) or "
                                "--run-dir (every finished model of a sweep run)")
        if (self.data is None) == (self.phantom is None):
            raise BrainhpcError("evaluate: give exactly one of --data PATH or --phantom N")
        if self.checkpoint is not None:
            self.checkpoint = _model_file(self.checkpoint)
            if not self.checkpoint.exists():
                raise BrainhpcError(f"evaluate: saved model {self.checkpoint} does not exist (a "
                                    "finished classify or segment cell writes OUT/model.pt)")
        if self.data is not None and not self.data.exists():
            raise BrainhpcError(f"evaluate: data {self.data} does not exist")
        if self.labels is not None and self.data is not None and \
                (self.data / "manifest.json").exists():
            raise BrainhpcError(f"evaluate: --labels applies to raw image folders; {self.data} "
                                "is a prepared dataset (its labels are stored)")

    @property
    def images(self) -> Path:
        """The folder scored: ``data``, or the phantom slices' folder in OUT, named after what
        draws them (another N, seed or style is another folder, never the old slices)."""
        if self.data is not None:
            return self.data
        style = "" if self.phantom_lesions == "standard" else f"-{self.phantom_lesions}"
        return self.out / f"phantom-{self.phantom}-s{self.seed}{style}"

    def identity(self) -> dict:
        d = super().identity()
        if self.checkpoint is not None:  # a re-trained model is another evaluation
            d["checkpoint_sha256"] = sha256_file(self.checkpoint)
        return d


def evaluate(cfg: EvaluateConfig) -> dict:
    """Score one model (``metrics.json``) or a run's models (``summary.json``) on the set."""
    if cfg.checkpoint is not None:
        return run_cell(cfg, _one, ONE)
    return run_cell(cfg, _run, RUN)


def _model_file(path: Path) -> Path:
    path = Path(path)
    return path / "model.pt" if path.is_dir() else path


def write_phantom_folder(folder: Path, n: int, seed: int, lesions: str = "standard") -> Path:
    """``n`` phantom slices as a raw Br35H-style folder (``yes/``, ``no/``, ``X_mask.png`` beside
    each image), written to a staging folder and renamed."""
    import cv2

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


def _image_set(cfg: EvaluateConfig) -> ImageSet:
    if cfg.phantom is not None:
        write_phantom_folder(cfg.images, cfg.phantom, cfg.seed, cfg.phantom_lesions)
    return ImageSet(cfg.images, cfg.split, cfg.labels, cfg.workers)


def _device(cfg: EvaluateConfig) -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise BrainhpcError("evaluate: device 'cuda' requested but torch sees no CUDA device")
    return torch.device("cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu")


def score_model(model: dict, images: ImageSet, device: torch.device, out: Path) -> dict:
    """One loaded model on the image set: its metrics (not yet written)."""
    data, skipped, kind = images.get(int(model["image_size"]))
    if model["kind"] == "segmenter" and data.masks is None:
        return {"status": "no masks"}
    data, overlap = images.without_development(model)
    title = f"{model['kind']} on {images.path.name} ({kind})"
    if model["kind"] == "segmenter":
        scores = score_segmentation(model, data, device, out, title)
    else:
        scores = score_classifier(model, data, device, out, title)
    result = {"kind": model["kind"], "model": model.get("model", "unet"),
              "train_data": model.get("train_data"), "data": str(images.path),
              "data_kind": kind, "split": images.split if images.prepared else None,
              "image_size": int(model["image_size"]), **scores, "frozen": True,
              "overlap": overlap, "n_skipped": len(skipped), "skipped": skipped[:100],
              "device": str(device)}
    log_scores(model, result, str(images.path))
    return result


def _one(ctx: Context) -> dict:
    cfg = ctx.cfg
    model = load_predictor(cfg.checkpoint)
    result = score_model(model, _image_set(cfg), _device(cfg), cfg.out)
    if result.get("status") == "no masks":
        raise BrainhpcError(f"evaluate: {cfg.images} has no tumour masks (X_mask files beside "
                            "the images); a segmenter needs them to be scored")
    return ctx.finish(result)


def _cells(cfg: EvaluateConfig) -> dict[str, list[str]]:
    """stage -> ids of this dataset's classify/segment cells, from the run's plan."""
    plan = read_json(cfg.run_dir / "plan.json")
    if not plan:
        raise BrainhpcError(f"{cfg.run_dir / 'plan.json'} is missing: --run-dir scores the "
                            "models of a sweep run directory (python -m brainhpc.sweep)")
    cells = {s: [c["id"] for c in plan.get(s, []) if c["params"].get("dataset") == cfg.dataset]
             for s in SCORED_STAGES}
    if not any(cells.values()):
        have = sorted({c["params"].get("dataset") or "(one dataset: no --dataset)"
                       for s in SCORED_STAGES for c in plan.get(s, [])})
        raise BrainhpcError(f"evaluate: {cfg.run_dir} has no classify or segment cells of "
                            f"dataset {cfg.dataset!r}; its datasets: {', '.join(have) or 'none'}")
    return cells


def _finished(folder: Path) -> bool:
    done = read_json(folder / "metrics.json").get("status") == "done"
    return done and (folder / "model.pt").exists()


def _score_cell(cfg: EvaluateConfig, folder: Path, out: Path, images: ImageSet,
                device: torch.device) -> dict:
    """One finished model of the run, skipped when already scored with this very model.pt."""
    ident = {"checkpoint": str((folder / "model.pt").resolve()),
             "checkpoint_sha256": sha256_file(folder / "model.pt"),
             "data": str(images.path.resolve()), "split": images.split, "labels": cfg.labels}
    old = read_json(out / ONE.result).get("config") or {}
    stale = bool(old) and old.get("checkpoint_sha256") != ident["checkpoint_sha256"]
    if not (cfg.force or stale):
        done = previous(out, ident, ONE, "evaluate")
        if done is not None:
            return {**done, "skipped": True}
    result = score_model(load_predictor(folder), images, device, out)
    if result.get("status") != "no masks":
        result = {**result, "status": "done", "config_hash": config_hash(ident), "config": ident}
        write_json(out / ONE.result, result)
    return result


def _run(ctx: Context) -> dict:
    cfg = ctx.cfg
    images, device = _image_set(cfg), _device(cfg)
    scored: dict[str, list[dict]] = {s: [] for s in SCORED_STAGES}
    unfinished, errors, no_masks = [], [], None
    for stage, cids in _cells(cfg).items():
        for cid in cids:
            folder = cfg.run_dir / stage / cid
            if not _finished(folder):
                unfinished.append(f"{stage}/{cid}")
                continue
            if no_masks and stage == "segment":
                continue
            try:
                m = _score_cell(cfg, folder, cfg.out / stage / cid, images, device)
            except BrainhpcError as e:
                log.error("evaluate %s on %s: %s", cid, cfg.name, e)
                errors.append(f"{stage}/{cid}: {e}")
                continue
            if m.get("status") == "no masks":
                no_masks = f"the external set {images.path} has no tumour masks: segmenters " \
                           "not scored"
                log.warning("evaluate %s: %s", cfg.name, no_masks)
                continue
            n = m.get("n") or next(iter((m.get("techniques") or {"": {}}).values())).get("n")
            scored[stage].append({"cell": cid, "already_scored": bool(m.get("skipped")),
                                  "n": n, "dropped": (m.get("overlap") or {}).get("dropped")})
    summary = ctx.finish({
        "status": "failed" if errors else "done", "name": cfg.name, "dataset": cfg.dataset,
        "path": str(images.path), "labels": cfg.labels, "split": cfg.split, "scored": scored,
        "not_finished": unfinished, "segmenters_skipped": no_masks, "errors": errors,
        "device": str(device)})
    log.info("evaluate %s: %d model(s) scored on %s, %d not finished, %d error(s)", cfg.name,
             sum(len(v) for v in scored.values()), images.path, len(unfinished), len(errors))
    if errors:
        raise BrainhpcError(f"evaluate {cfg.name}: {len(errors)} finished model(s) could not be "
                            f"scored (see {cfg.out / RUN.result}): {'; '.join(errors)}")
    return summary
