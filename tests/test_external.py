"""External validation: a classifier scored on another dataset never gets credit for images it
was developed on, and a one-class folder is scored with the metrics that exist for it."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from brainhpc.classify import ClassifyConfig, classify
from brainhpc.data import phantom
from brainhpc.data.shards import load_split
from brainhpc.evaluate import EvaluateConfig, evaluate
from brainhpc.predictors.classifier import load_classifier
from brainhpc.prepare import PrepareConfig, prepare

pytestmark = pytest.mark.usefixtures("one_thread")


def write_folder(root: Path, slices, name=lambda p: p.name) -> Path:
    for p in slices:
        folder = root / ("yes" if p.label else "no")
        folder.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / name(p)), p.image)
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    base = tmp_path_factory.mktemp("external")
    raw = write_folder(base / "raw", phantom.generate(60, seed=7))
    prepared = base / "prepared"
    prepare(PrepareConfig(out=prepared, data=raw, size=32, progress=False))
    cell = base / "cnn"
    classify(ClassifyConfig(model="cnn", train_data="real", data=prepared, out=cell, epochs=1,
                            batch_size=8, progress=False, augment=False))
    return raw, prepared, cell


def test_checkpoint_carries_development_fingerprints(trained):
    _, prepared, cell = trained
    clf = load_classifier(cell)
    dev = clf["development_images"]
    n = len(load_split(prepared, "train")) + len(load_split(prepared, "val"))
    assert len(dev["sha256"]) == n and tuple(dev["thumbs"].shape) == (n, 32, 32)


def test_external_set_drops_copies_and_near_copies(trained, tmp_path):
    raw, prepared, cell = trained
    ext = tmp_path / "ext"
    fresh = phantom.generate(12, seed=99)
    write_folder(ext, fresh, name=lambda p: f"new-{p.name}")
    train = load_split(prepared, "train").sources[:4]
    val = load_split(prepared, "val").sources[:3]
    for k, source in enumerate(train):  # byte-identical copies under new names
        shutil.copy(raw / source, ext / source.split("/")[0] / f"copy-{k}.png")
    for k, source in enumerate(val):  # mirrored and re-encoded: near-copies
        img = cv2.imread(str(raw / source), cv2.IMREAD_GRAYSCALE)
        cv2.imwrite(str(ext / source.split("/")[0] / f"flip-{k}.jpg"), img[:, ::-1])
    m = evaluate(EvaluateConfig(checkpoint=cell, data=ext, out=tmp_path / "ev", workers=1))
    assert m["overlap"]["checked"]
    assert m["overlap"]["exact_copies"] == 4 and m["overlap"]["near_copies"] == 3
    assert m["n"] == 12 and m["overlap"]["n_before"] == 19
    assert {"balanced_accuracy", "roc_auc", "recall_per_class", "baselines",
            "degenerate"} <= set(m)


def test_one_class_folder_is_scored_not_refused(trained, tmp_path):
    _, _, cell = trained
    ext = tmp_path / "tumours"
    ext.mkdir()
    for k, p in enumerate(q for q in phantom.generate(30, seed=55) if q.label):
        cv2.imwrite(str(ext / f"t{k}.png"), p.image)
    m = evaluate(EvaluateConfig(checkpoint=cell, data=ext, out=tmp_path / "ev",
                                labels="tumour=.", workers=1))
    assert m["n_per_class"]["healthy"] == 0 and m["n_per_class"]["tumour"] == m["n"] > 5
    assert m["balanced_accuracy"] is None and m["roc_auc"] is None
    assert m["recall_per_class"]["healthy"] is None
    assert 0.0 <= m["recall_per_class"]["tumour"] <= 1.0
    assert m["score_summary"]["q50"] is not None
    # without the one-label mapping a folder of loose images is no known layout
    with pytest.raises(Exception, match="cannot recognise the layout"):
        evaluate(EvaluateConfig(checkpoint=cell, data=ext, out=tmp_path / "ev2", workers=1))
    assert np.isfinite(m["score_summary"]["mean"])


def test_own_test_split_reproduces_the_cells_numbers(trained, tmp_path):
    """Scored on its own prepared dataset's test split, a saved model gives exactly the numbers
    its classify cell wrote: prepare's groups already separate that split, nothing is dropped."""
    _, prepared, cell = trained
    import json

    m = json.loads((cell / "metrics.json").read_text())
    ev = evaluate(EvaluateConfig(checkpoint=cell, data=prepared, out=tmp_path / "own"))
    assert ev["overlap"]["checked"] is False and "own prepared dataset" in ev["overlap"]["reason"]
    for key in ("n", "balanced_accuracy", "roc_auc", "confusion_matrix", "recall_per_class"):
        assert ev[key] == m[key], key


@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    """A VAE detector trained (1 epoch) on prepared phantoms with masks."""
    base = tmp_path_factory.mktemp("detector")
    prepared = base / "prepared"
    prepare(PrepareConfig(out=prepared, phantom=80, size=32, seed=5, progress=False))
    cell = base / "vae"
    classify(ClassifyConfig(model="vae", train_data="real", data=prepared, out=cell, epochs=1,
                            batch_size=8, progress=False, techniques=("giaem",)))
    return prepared, cell


def test_a_detector_scores_its_own_localisation_again_from_its_frozen_rules(detector, tmp_path):
    """model.pt carries the residual-map threshold and the intensity rule chosen on validation:
    evaluate on the cell's own test split gives the cell's localisation and baseline exactly."""
    import json

    prepared, cell = detector
    m = json.loads((cell / "metrics.json").read_text())
    ev = evaluate(EvaluateConfig(checkpoint=cell, data=prepared, out=tmp_path / "own"))
    for key in ("pixel_auprc", "best_dice_threshold", "best_dice_mean", "best_dice_pooled",
                "n_tumour_slices"):
        assert ev["localisation"][key] == m["localisation"][key], key
    own, again = m["baselines"]["intensity_threshold"], ev["baselines"]["intensity_threshold"]
    assert again["localisation"] == own["localisation"]
    for key in ("balanced_accuracy", "roc_auc", "confusion_matrix"):
        assert again["test"][key] == own["test"][key], key
    arms = {r.split(",")[0] for r in (tmp_path / "own" / "predictions.csv").read_text()
            .splitlines()[1:]}
    assert arms == {"giaem", "intensity threshold"}


def test_an_external_set_with_masks_scores_the_detectors_localisation(detector, tmp_path):
    import json

    _, cell = detector
    ext = tmp_path / "ext"
    for p in phantom.generate(40, seed=77):
        folder = ext / ("yes" if p.label else "no")
        folder.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / p.name), p.image)
        if p.label:
            cv2.imwrite(str(folder / p.name.replace(".png", "_mask.png")), p.mask * 255)
    ev = evaluate(EvaluateConfig(checkpoint=cell, data=ext, out=tmp_path / "ev", workers=1))
    loc, rules = ev["localisation"], load_classifier(cell)["rules"]
    assert loc["best_dice_threshold"] == rules["residual_threshold"] is not None
    assert 0.0 < loc["pixel_auprc"] <= 1.0 and 0.0 <= loc["best_dice_mean"] <= 1.0
    assert loc["n_tumour_slices"] == sum(p.label for p in phantom.generate(40, seed=77))
    base = ev["baselines"]["intensity_threshold"]
    assert base["intensity_threshold"] == rules["intensity"]["threshold"]
    # phantoms of another seed are the same population: the frozen rule finds their lesions
    # about as well as on the detector's own test split, and far better than marking nothing
    own = json.loads((cell / "metrics.json").read_text())["baselines"]["intensity_threshold"]
    assert abs(base["localisation"]["best_dice_mean"] -
               own["localisation"]["best_dice_mean"]) < 0.1
    assert base["localisation"]["best_dice_mean"] > 0.05
    # localisation.csv: per tumour slice, the numbers the means above are made of (the
    # aggregate's intervals over patients resample these rows)
    from brainhpc.metrics.predictions import read_rows

    rows = read_rows(tmp_path / "ev" / "localisation.csv")
    by_arm: dict = {}
    for r in rows:
        by_arm.setdefault(r["arm"], []).append(r["dice"])
    assert set(by_arm) == {"giaem", "residual maps", "intensity threshold"}
    assert {len(v) for v in by_arm.values()} == {loc["n_tumour_slices"]}
    assert np.isclose(np.mean(by_arm["residual maps"]), loc["best_dice_mean"], atol=1e-5)
    assert np.isclose(np.mean(by_arm["intensity threshold"]),
                      base["localisation"]["best_dice_mean"], atol=1e-5)
    assert np.isclose(np.mean(by_arm["giaem"]),
                      ev["techniques"]["giaem"]["localisation"]["dice_mean"], atol=1e-5)
    assert 0.0 <= base["test"]["balanced_accuracy"] <= 1.0
