"""The segment stage: metrics on hand-made masks (known Dice/HD95, empty cases), the chosen rules,
image+mask augmentation, image+mask training data (real, synthetic, mixed; missing masks), and
the cell end to end on `brainhpc prepare`'s phantom output (real HDF5, the real trainer, MONAI's
U-Net): it must beat the empty-mask and intensity baselines, resume, skip, refuse, force."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from brainhpc import cli
from brainhpc.anomaly import residuals
from brainhpc.data.shards import load_split, write_shards
from brainhpc.data.training import healthy_only, synthetic_shard_dir, training_data
from brainhpc.errors import BrainhpcError
from brainhpc.metrics import segmentation as sm
from brainhpc.metrics.predictions import (
    PATIENT_COLUMNS,
    PATIENTS,
    PREDICTIONS,
    SLICE_COLUMNS,
    read_rows,
)
from brainhpc.predictors.classifier import Detector
from brainhpc.predictors.segmenter import load_segmenter, predict_probs, score_segmenter
from brainhpc.segment import SegmentConfig, segment
from brainhpc.segment import cell as srun
from brainhpc.segment.cell import SegTask
from brainhpc.train.augment import intensity_batch


def evaluate_segmenter(path, data, what="data"):
    """A saved U-Net scored on ``data`` with its frozen rule (the metrics block)."""
    return score_segmenter(load_segmenter(path), data, what=what)[0]

pytestmark = pytest.mark.usefixtures("one_thread")

# a small U-Net that learns the 64 px phantoms within seconds on one CPU thread
FAST = dict(channels=(8, 16, 32), strides=(2, 2), res_units=0, lr=3e-3, batch_size=16,
            progress=False, device="cpu")


def square(size, y, x, h, w=None):
    m = np.zeros((size, size), bool)
    m[y:y + h, x:x + (w or h)] = True
    return m


def stack(*masks):
    return np.stack(masks)


# ------------------------------------------------------------------------------ metrics

def test_dice_known_values_and_empty_cases():
    size = 32
    empty = np.zeros((size, size), bool)
    truth = stack(square(size, 5, 5, 10), square(size, 5, 5, 10), empty, empty)
    pred = stack(square(size, 5, 8, 10), empty, square(size, 3, 3, 3), empty)
    d = sm.dice_per_slice(pred, truth)
    assert d[0] == pytest.approx(2 * 70 / 200)  # 10x10 squares 3 px apart overlap 10x7
    assert d[1] == 0.0 and np.isnan(d[2]) and np.isnan(d[3])  # missed; empty truth: undefined
    m = sm.segmentation_metrics(pred, truth, ["a", "b", "c", "d"])
    assert m["dice_slice_mean"] == pytest.approx(0.35) and m["n_tumour_slices"] == 2
    assert m["n_tumour_patients"] == 2 and m["n_patients"] == 4
    assert m["fp_healthy_patients"] == 1  # patient c: a predicted pixel without tumour
    assert m["n_hd95"] == 1 and m["n_missed"] == 1 and m["hd95_unit"] == "px"
    assert m["detection"] == {"min_area": 1, "sensitivity": 0.5, "specificity": 0.5,
                              "balanced_accuracy": 0.5, "tp": 1, "fn": 1, "fp": 1, "tn": 1}
    # per patient = 3D Dice over the stacked slices: patient x holds slices 0 and 1
    m = sm.segmentation_metrics(pred, truth, ["x", "x", "y", "y"])
    assert m["dice_patient_mean"] == pytest.approx(2 * 70 / (100 + 200))
    assert m["n_tumour_patients"] == 1 and m["fp_healthy_patients"] == 1
    assert m["dice_slice_mean"] == pytest.approx(0.35)  # per-slice unchanged by grouping
    # detection with a minimum area: the 9 px false positive no longer counts, nor does Dice move
    m = sm.segmentation_metrics(pred, truth, ["a", "b", "c", "d"], min_area=10)
    assert m["detection"]["fp"] == 0 and m["detection"]["specificity"] == 1.0
    assert m["detection_any_pixel"]["fp"] == 1 and m["dice_slice_mean"] == pytest.approx(0.35)
    # nothing to average: None, never a made-up 0 or 1
    none = sm.segmentation_metrics(stack(empty), stack(empty), ["p"])
    assert none["dice_slice_mean"] is None and none["dice_patient_mean"] is None
    assert none["hd95_mean"] is None and none["detection"]["sensitivity"] is None


def _hd95_brute(a, b):
    """Independent HD95: boundary pixels (mask minus its 4-neighbour erosion), all pairwise
    distances, 95th percentile of each directed set, the larger of the two."""
    def edge(m):
        er = cv2.erode(m.astype(np.uint8), np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], np.uint8),
                       borderType=cv2.BORDER_CONSTANT, borderValue=0)
        return np.argwhere(m & ~er.astype(bool))
    ea, eb = edge(a), edge(b)
    dist = np.sqrt(((ea[:, None, :] - eb[None, :, :]) ** 2).sum(-1))
    return max(np.percentile(dist.min(1), 95), np.percentile(dist.min(0), 95))


def test_hd95_known_values():
    size = 32
    one = square(size, 4, 4, 1)
    assert sm.hd95_per_slice(stack(one), stack(square(size, 4, 10, 1)))[0] == pytest.approx(6)
    assert sm.hd95_per_slice(stack(square(size, 3, 3, 8)), stack(square(size, 3, 3, 8)))[0] == 0
    a, b = square(size, 5, 5, 12), square(size, 8, 4, 9, 14)
    assert sm.hd95_per_slice(stack(a), stack(b))[0] == pytest.approx(_hd95_brute(a, b), abs=1e-4)
    # undefined where either side is empty: NaN, not inf, not 0
    empty = np.zeros((size, size), bool)
    assert np.isnan(sm.hd95_per_slice(stack(a, empty), stack(empty, a))).all()


def test_min_area_chosen_on_detection():
    size = 32
    healthy = [square(size, 2, 2, 2) for _ in range(4)]  # 4 px false positives
    tumour = [square(size, 10, 10, 5) for _ in range(4)]  # 25 px true lesions
    pred = stack(*healthy, *tumour)
    truth = stack(*[np.zeros((size, size), bool)] * 4, *tumour)
    area, bal = sm.choose_min_area(pred, truth, size)
    assert area == 8 and bal == 1.0  # the smallest grid value above 4 px that keeps 25 px
    assert sm.choose_min_area(pred[4:], truth[4:], size) == (1, None)  # no healthy slices
    assert sm.choose_min_area(pred, truth, 8)[0] == 1  # grid cut at 8*8/64 = 1 px


def _skull_case(n=6, size=32, seed=0):
    """Slices whose brain (a centred disc) holds a bright lesion on tumour slices, inside a
    skull ring brighter than any lesion: what raw whole-image thresholds mistake for tumour."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(yy - size / 2, xx - size / 2)
    brain, skull = r < size * 0.35, (r >= size * 0.4) & (r < size * 0.47)
    images = np.zeros((n, 1, size, size), np.uint8)
    truth = np.zeros((n, size, size), bool)
    for i in range(n):
        images[i, 0][brain] = rng.integers(60, 120, brain.sum())
        images[i, 0][skull] = 250
        if i % 2:
            truth[i] = square(size, 12 + i % 3, 12, 5)
            images[i, 0][truth[i]] = 200
    return images, truth, np.repeat(brain[None, None], n, 0).astype(np.uint8), skull


def test_intensity_baseline_counts_only_the_brain():
    """A bright pixel outside the brain never counts, standardised or not; the threshold is
    chosen on validation (here: the same slices) and finds the lesions."""
    images, truth, brain, skull = _skull_case()
    healthy = images[::2]
    std = residuals.Standardiser.fit(healthy, brain[::2])
    for rule in (residuals.IntensityRule.fit(std, images, brain, truth),
                 residuals.IntensityRule.fit(None, images, brain, truth),
                 residuals.IntensityRule(None, 0.5)):  # raw [0, 1]: the skull (0.98) is above
        pred = rule.masks(images, brain)
        assert not pred[:, skull].any() and not (pred & ~(brain[:, 0] > 0)).any()
        assert pred[truth].mean() > 0.9
    # without a brain mask (the whole image is "brain") the same cut takes the skull ring
    assert residuals.IntensityRule(None, 0.5).masks(images, None)[:, skull].all()
    rule = residuals.IntensityRule.fit(std, images, brain, truth)
    assert sm.segmentation_metrics(rule.masks(images, brain), truth,
                                   [str(i) for i in range(6)])["dice_slice_mean"] > 0.9
    back = residuals.IntensityRule.from_state(rule.state())
    assert np.array_equal(back.masks(images, brain), rule.masks(images, brain))


def test_segment_and_vae_localisation_share_one_intensity_baseline(prepared_phantom):
    """The segment cell's intensity baseline is the classify stage's VAE localisation baseline:
    the same standardiser (healthy real training slices), the same threshold, the same Dice."""
    val, test = (load_split(prepared_phantom, s) for s in ("val", "test"))
    rule, info = srun.intensity_rule(prepared_phantom, val)
    healthy = healthy_only(load_split(prepared_phantom, "train"))
    std = residuals.Standardiser.fit(healthy.images, healthy.brain)  # what classify fits
    assert np.array_equal(rule.standardiser.standard, std.standard)
    det = Detector(torch.nn.Identity(), std)  # the VAE's inputs, as classify's report takes them
    vb, tb = (residuals.brain_masks(d.brain, d.images) for d in (val, test))
    report, _, _ = residuals.intensity_baseline(det.inputs(val), val.labels, vb, det.inputs(test),
                                                test.labels, tb, val.masks, test.masks)
    assert report["intensity_threshold"] == rule.threshold == info["threshold"]
    mine = residuals.dice_scores(rule.masks(test.images, test.brain), test.masks)
    loc = report["localisation"]
    assert (loc["best_dice_pooled"], loc["best_dice_mean"]) == (mine["dice_pooled"],
                                                                mine["dice_mean"])
    assert 0 < mine["dice_pooled"] < 1 and info["definition"] == residuals.INTENSITY_DEFINITION
    assert info["brain_masks"] and "inside the brain mask" in info["definition"]


# ------------------------------------------------------------------------------ augmentation

class _Capture(torch.nn.Module):
    """Passes the input through (plus a parameter so the step can backprop)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))
        self.seen = []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return x * self.w


class _T:
    def __init__(self, model):
        self.models = {"unet": model}
        self.optimizers = {"unet": torch.optim.SGD(model.parameters(), lr=0.0)}

    def autocast(self):
        return torch.autocast("cpu", enabled=False)


def test_augmentation_moves_image_and_mask_together(tmp_path):
    """Images are their own masks (tumour = bright): after the training step's flips and shifts,
    the image the model sees and the mask the loss sees must still coincide pixel for pixel."""
    rng = np.random.default_rng(1)
    n, size = 32, 32
    masks = np.zeros((n, 1, size, size), np.uint8)
    for i in range(n):
        y, x = rng.integers(2, 20, 2)
        masks[i, 0, y:y + 3 + i % 5, x:x + 2 + i % 7] = 1  # asymmetric: flips show
    images = masks * 255
    cfg = SegmentConfig(train_data="real", data=tmp_path, out=tmp_path / "o", **FAST)
    task = SegTask.__new__(SegTask)  # no validation split: validate is not called here
    task.cfg = cfg
    seen_y = []
    task.loss = lambda logits, y: (seen_y.append(y.clone()), (logits * 0).sum())[1]
    model = _Capture()
    torch.manual_seed(0)
    for _ in range(4):
        task.training_step(_T(model), (torch.from_numpy(images), torch.from_numpy(masks)))
    moved = 0
    for x, y in zip(model.seen, seen_y, strict=True):
        assert torch.equal((x > 0.5).float(), y)
        moved += int((y != torch.from_numpy(masks).float()).flatten(1).any(1).sum())
    assert moved > n  # the augmentation did move most of them


def test_intensity_augmentation_changes_the_image_and_never_the_mask(tmp_path):
    """--intensity: the image the model sees differs from the stored one, inside the head only
    (the background stays black, values stay in [0, 1]); the mask the loss sees is untouched."""
    rng = np.random.default_rng(2)
    n, size = 16, 32
    images = np.zeros((n, 1, size, size), np.uint8)
    images[:, :, 4:28, 4:28] = rng.integers(40, 200, (n, 1, 24, 24))  # a "head" on black
    masks = (images > 150).astype(np.uint8)
    cfg = SegmentConfig(train_data="real", data=tmp_path, out=tmp_path / "o", augment=False,
                        intensity=True, **FAST)
    task = SegTask.__new__(SegTask)
    task.cfg = cfg
    seen_y = []
    task.loss = lambda logits, y: (seen_y.append(y.clone()), (logits * 0).sum())[1]
    model = _Capture()
    torch.manual_seed(0)
    task.training_step(_T(model), (torch.from_numpy(images), torch.from_numpy(masks)))
    x, stored = model.seen[0], torch.from_numpy(images).float() / 255.0
    assert torch.equal(seen_y[0], torch.from_numpy(masks).float())
    assert x.min() >= 0 and x.max() <= 1 and torch.equal(x[stored == 0], stored[stored == 0])
    change = (x - stored).abs().flatten(1).mean(1)
    assert (change > 0.01).all() and change.std() > 0.002  # every image, each its own draw


def test_intensity_augmentation_at_zero_strength_is_the_identity():
    x = torch.rand(4, 1, 16, 16) * (torch.rand(4, 1, 16, 16) > 0.3)
    out = intensity_batch(x, gamma=0.0, contrast=0.0, sharpen=(0.0, 0.0), noise=0.0)
    assert torch.allclose(out, x, atol=1e-6)


# ------------------------------------------------------------------------------ training data

def _shards(folder, data, idx, prefix, label, with_masks=True):
    write_shards(folder, data.images[idx], np.full(len(idx), label),
                 [f"{prefix}/{i}" for i in range(len(idx))],
                 masks=data.masks[idx] if with_masks else None, attrs={"size": 64})


def make_synthetic(root, prepared, gen="dcgan", healthy_masks=False, tumour_masks=True):
    """What generate cells <gen>-healthy and <gen>-tumour leave in SYN_DIR: here real phantom
    training slices renamed synthetic (the tumour cell with masks, as --with-masks writes)."""
    train = load_split(prepared, "train")
    for name, label, masks in (("healthy", 0, healthy_masks), ("tumour", 1, tumour_masks)):
        idx = np.flatnonzero(train.labels == label)[::-1][:40]
        _shards(synthetic_shard_dir(root, gen, name), train, idx, f"synthetic/{gen}/{name}",
                label, masks)
    return root


@pytest.mark.parametrize("healthy_masks", [False, True])
@pytest.mark.parametrize("spec", ["synthetic:dcgan", "mixed:dcgan", "mixed:dcgan:0.25"])
def test_training_data_matches_classify_and_fills_healthy_masks(prepared_phantom, tmp_path, spec,
                                                              healthy_masks):
    syn = make_synthetic(tmp_path / "syn", prepared_phantom, healthy_masks=healthy_masks)
    got = training_data(spec, prepared_phantom, syn, seed=3, masks=True)
    same = training_data(spec, prepared_phantom, syn, seed=3)  # what a classify cell draws
    assert got.sources == same.sources  # the same slices as the classify cell draws
    assert np.array_equal(got.images, same.images)
    assert got.masks is not None and set(np.unique(got.masks)) <= {0, 1}
    healthy_syn = [i for i, s in enumerate(got.sources) if s.startswith("synthetic/dcgan/healthy")]
    tumour_syn = [i for i, s in enumerate(got.sources) if s.startswith("synthetic/dcgan/tumour")]
    assert healthy_syn and tumour_syn
    assert got.masks[tumour_syn].any((1, 2, 3)).all()  # the tumour cell's masks kept
    assert not got.masks[healthy_syn].any()  # zeros filled in, or the (empty) ones written


def test_missing_masks_are_refused_with_the_fix(prepared_phantom, tmp_path):
    syn = make_synthetic(tmp_path / "syn", prepared_phantom, tumour_masks=False)
    with pytest.raises(BrainhpcError, match=r"dcgan-tumour.*without masks.*--with-masks"):
        training_data("mixed:dcgan", prepared_phantom, syn, masks=True)
    bare = tmp_path / "bare"  # a prepared dataset whose layout carries no masks
    for split in ("train", "val", "test"):
        d = load_split(prepared_phantom, split)
        write_shards(bare / split, d.images, d.labels, d.sources, attrs={"size": 64})
    shutil.copy(prepared_phantom / "manifest.json", bare / "manifest.json")
    with pytest.raises(BrainhpcError, match=rf"{bare}, split train: .*no tumour masks.*phantom"):
        training_data("real", bare, masks=True)
    code = cli.main(["segment", "--train-data", "real", "--data", str(bare), "--out",
                     str(tmp_path / "o"), "--channels", "8,16", "--strides", "2"])
    assert code == 2


# ------------------------------------------------------------------------------ bad input

@pytest.mark.parametrize("kw, message", [
    (dict(train_data="fake"), "unknown kind 'fake'"),
    (dict(train_data="synthetic:dcgan"), "needs --synthetic-dir"),
    (dict(epochs=0), "epochs must be an integer >= 1, got 0"),
    (dict(channels=(8,)), "channels needs at least 2 levels"),
    (dict(channels=(8, 16, 32), strides=(2,)),
     r"one entry per down-sampling.*len\(channels\) - 1 = 2"),
    (dict(strides=(2, 0, 2)), r"strides must be a list of numbers >= 1, got \(2, 0, 2\)"),
    (dict(lr=-1.0), "lr must be a number > 0"),
    (dict(threshold=1.0), r"threshold must be a number in \(0, 1\)"),
    (dict(min_area=0), "min_area must be an integer >= 1"),
    (dict(loss="focal"), "unknown loss 'focal'; valid: dicece, dice, ce"),
    (dict(device="tpu"), "unknown device 'tpu'"),
    (dict(dropout=1.0), r"dropout must be a number in \[0, 1\)"),
    (dict(precision="fp16"), "unknown precision 'fp16'; valid: auto, bf16, fp32"),
    (dict(val_every=0), "val_every must be an integer >= 1, got 0"),
])
def test_config_validation(tmp_path, kw, message):
    base = dict(train_data="real", data=tmp_path, out=tmp_path / "o")
    with pytest.raises(BrainhpcError, match=message):
        SegmentConfig(**{**base, **kw})


def test_bad_cli_input(prepared_phantom, tmp_path, capsys):
    argv = ["segment", "--train-data", "real", "--data", str(prepared_phantom), "--out",
            str(tmp_path / "o"), "--device", "cpu", "--no-progress"]
    assert cli.main([*argv, "--strides", "2,2,2,2,2,2,2", "--channels",
                     "2,2,2,2,2,2,2,2"]) == 2
    err = capsys.readouterr().err
    assert "64 px images cannot pass a U-Net with strides" in err and "divisible by 128" in err
    assert cli.main([*argv, "--channels", "8,x"]) == 2
    assert "channels must be a list of numbers >= 1, got '8,x'" in capsys.readouterr().err
    assert cli.main([*argv[:4], str(tmp_path / "nothing"), *argv[5:]]) == 2
    assert "prepared dataset" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------ the cell

@pytest.fixture(scope="module")
def real_cell(prepared_phantom, tmp_path_factory):
    out = tmp_path_factory.mktemp("seg") / "real"
    cfg = SegmentConfig(train_data="real", data=prepared_phantom, out=out, epochs=30, **FAST)
    return cfg, segment(cfg)


@pytest.mark.slow  # ~10 s: 30 epochs of a small U-Net on 166 phantom slices
def test_real_cell_learns_beats_baselines_and_reloads(real_cell, prepared_phantom):
    cfg, m = real_cell
    out = cfg.out
    assert m["status"] == "done" and m["image_size"] == 64 and m["world_size"] == 1
    prec = m["train_precision"]
    assert prec["requested"] == "auto" and prec["name"] in ("fp32", "bf16")
    t, base = m["test"], m["baselines"]
    # the network delineates lesions the trivial rules do not: Dice on tumour slices. The
    # intensity baseline (standardised, inside the brain) is strong on the phantoms' bright
    # lesions, and the 13 test tumour slices happen to be brighter than validation's: the
    # margin is wide on validation (~0.31 vs ~0.08), narrow on test (~0.32 vs ~0.30)
    assert base["empty"]["dice_slice_mean"] == 0.0
    assert t["dice_slice_mean"] > 0.15, t
    assert t["dice_slice_mean"] > base["intensity"]["dice_slice_mean"], (t, base)
    assert m["val"]["dice_patient_mean"] > base["intensity"]["val_dice_patient"] + 0.1, m["val"]
    intensity = base["intensity"]
    assert intensity["definition"] == residuals.INTENSITY_DEFINITION and intensity["brain_masks"]
    assert 0 < intensity["threshold"] < 1 and "81 healthy slices" in intensity["standardiser"]
    assert intensity["dice_patient_mean"] > 0.1  # not a degenerate rule
    assert t["n_tumour_slices"] == 13 and t["n_slices"] == 25 and t["n_hd95"] > 0
    assert 0 < t["hd95_mean"] < 64
    assert m["n_train"]["total"] == 166 and m["n_train"]["synthetic"] == 0
    assert m["n_train"]["tumour_slices"] == m["n_train"]["tumour_label"] == 85
    # epoch chosen on validation: best.pt's epoch, whose val Dice is the logged maximum
    log = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    vals = [r for r in log if r["kind"] == "val"]
    assert len(vals) == 30
    best = max(vals, key=lambda r: r["val_dice"])
    assert m["chosen"]["best_epoch"] == best["epoch"]
    assert m["val"]["dice_patient_mean"] == pytest.approx(best["val_dice"])
    # the saved model: weights_only, same predictions, same test numbers through evaluate
    state = torch.load(out / "model.pt", weights_only=True)
    assert state["kind"] == "segmenter" and state["min_area"] == m["chosen"]["min_area"]
    assert state["intensity_baseline"]["threshold"] == intensity["threshold"]
    seg = load_segmenter(out)
    test = load_split(prepared_phantom, "test")
    ev = evaluate_segmenter(out / "model.pt", test)
    for key in ("dice_slice_mean", "dice_patient_mean", "hd95_mean", "detection"):
        assert ev[key] == t[key], key
    assert ev["baseline_empty"]["dice_patient_mean"] == 0.0
    for key in ("dice_slice_mean", "dice_patient_mean", "detection"):  # the frozen rule, reloaded
        assert ev["baseline_intensity"][key] == intensity[key], key
    probs = predict_probs(seg["module"], test.images[:4], torch.device("cpu"))
    assert probs.shape == (4, 64, 64) and 0 <= probs.min() and probs.max() <= 1
    png = cv2.imread(str(out / "overlays.png"), cv2.IMREAD_COLOR)
    assert png is not None and png.shape[1] > 6 * 128
    green = (png[..., 1] > 150) & (png[..., 0] < 80) & (png[..., 2] < 80)
    red = (png[..., 2] > 150) & (png[..., 0] < 80) & (png[..., 1] < 80)
    assert green.sum() > 50 and red.sum() > 50  # both outlines drawn
    assert json.loads((out / "metrics.json").read_text()) == m


def assert_predictions_reproduce(folder, test_block, baselines):
    """predictions.csv and patients.csv: the contract's columns, one row per (arm, test slice)
    and (arm, patient), and means that are metrics.json's to the 6 digits written."""
    assert (folder / PREDICTIONS).read_text().splitlines()[0] == ",".join(SLICE_COLUMNS)
    assert (folder / PATIENTS).read_text().splitlines()[0] == ",".join(PATIENT_COLUMNS)
    rows, patients = read_rows(folder / PREDICTIONS), read_rows(folder / PATIENTS)
    blocks = {"unet": test_block, **baselines}
    assert {r["arm"] for r in rows} == {p["arm"] for p in patients} == set(blocks)
    for arm, block in blocks.items():
        mine = [r for r in rows if r["arm"] == arm]
        pats = [p for p in patients if p["arm"] == arm]
        assert len(mine) == block["n_slices"] and len(pats) == block["n_patients"], arm
        assert sum(p["slices"] for p in pats) == block["n_slices"]
        dice = [r["dice"] for r in mine if r["tumour"] == 1]
        assert len(dice) == block["n_tumour_slices"] and np.isfinite(dice).all()
        assert all(np.isnan(r["dice"]) for r in mine if r["tumour"] == 0)
        assert np.mean(dice) == pytest.approx(block["dice_slice_mean"], rel=1e-5, abs=1e-9), arm
        pdice = [p["dice"] for p in pats if np.isfinite(p["dice"])]
        assert len(pdice) == block["n_tumour_patients"]
        assert np.mean(pdice) == pytest.approx(block["dice_patient_mean"], rel=1e-5,
                                               abs=1e-9), arm
        assert all(r["intersection"] <= min(r["pred_area"], r["true_area"]) for r in mine)
    return rows, patients


@pytest.mark.slow
def test_real_cell_writes_predictions_that_reproduce_its_metrics(real_cell, prepared_phantom):
    cfg, m = real_cell
    rows, _ = assert_predictions_reproduce(cfg.out, m["test"], m["baselines"])
    test = load_split(prepared_phantom, "test")
    unet = [r for r in rows if r["arm"] == "unet"]
    assert [r["source"] for r in unet] == list(test.sources)
    assert [r["group"] for r in unet] == test.group_ids()
    assert [r["true_area"] for r in unet] == (test.masks > 0).sum((1, 2, 3)).tolist()
    assert m["baselines"]["intensity"]["dice_slice_mean"] > 0  # the arms differ: a real check
    assert {PREDICTIONS, PATIENTS} <= set(srun.OUTPUTS.wipe)


@pytest.mark.slow
def test_brainhpc_evaluate_scores_a_unet(real_cell, prepared_phantom, tmp_path):
    """`brainhpc evaluate` takes a U-Net like a classifier: on its own prepared test split it
    reproduces the cell's test numbers; on a raw folder with X_mask files it scores Dice, drops
    copies of the U-Net's development images, and draws overlays.png."""
    from brainhpc.data import phantom
    from brainhpc.evaluate.cell import write_phantom_folder

    cfg, m = real_cell
    own = tmp_path / "own"
    assert cli.main(["evaluate", "--checkpoint", str(cfg.out), "--data", str(prepared_phantom),
                     "--out", str(own)]) == 0
    ev = json.loads((own / "metrics.json").read_text())
    assert ev["kind"] == "segmenter" and ev["status"] == "done" and ev["frozen"]
    for key in ("dice_slice_mean", "dice_patient_mean", "hd95_mean", "detection"):
        assert ev[key] == m["test"][key], key
    assert_predictions_reproduce(own, m["test"], {"empty": ev["baseline_empty"],
                                                  "intensity": ev["baseline_intensity"]})
    assert ev["baseline_intensity"]["dice_patient_mean"] == \
        m["baselines"]["intensity"]["dice_patient_mean"]
    assert ev["overlap"]["checked"] is False  # prepare's groups already separate its splits
    raw = write_phantom_folder(tmp_path / "raw", 40, seed=77)
    copied = load_split(prepared_phantom, "train").sources[:3]  # development images
    for k, p in enumerate(phantom.generate(240, seed=0)):
        if p.name in {Path(c).name for c in copied}:
            sub = raw / ("yes" if p.label else "no")
            cv2.imwrite(str(sub / f"copy-{k}.png"), p.image)
            cv2.imwrite(str(sub / f"copy-{k}_mask.png"), (p.mask > 0).astype("uint8") * 255)
    out = tmp_path / "raw-ev"
    assert cli.main(["evaluate", "--checkpoint", str(cfg.out / "model.pt"), "--data", str(raw),
                     "--out", str(out), "--workers", "1"]) == 0
    ev = json.loads((out / "metrics.json").read_text())
    assert ev["data_kind"] == "raw folder" and ev["n"] == 40
    assert ev["overlap"]["checked"] and ev["overlap"]["dropped"] == ev["overlap"]["n_before"] - 40
    assert 0 <= ev["dice_patient_mean"] <= 1 and ev["baseline_empty"]["dice_patient_mean"] == 0
    assert (out / "overlays.png").exists()
    assert_predictions_reproduce(out, ev, {"empty": ev["baseline_empty"],
                                           "intensity": ev["baseline_intensity"]})
    # a folder without masks cannot score a segmenter: said, not a crash
    bare = tmp_path / "bare"
    for p in phantom.generate(12, seed=5):
        (bare / ("yes" if p.label else "no")).mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(bare / ("yes" if p.label else "no") / p.name), p.image)
    assert cli.main(["evaluate", "--checkpoint", str(cfg.out), "--data", str(bare), "--out",
                     str(tmp_path / "bare-ev")]) == 2


@pytest.mark.slow
def test_evaluate_segmenter_refuses_bad_input(real_cell, prepared_phantom, tmp_path):
    cfg, _ = real_cell
    test = load_split(prepared_phantom, "test")
    small = test.select(np.arange(4))
    small.images, small.masks = small.images[..., ::2, ::2], small.masks[..., ::2, ::2]
    with pytest.raises(BrainhpcError, match=r"ext: images are 32x32 px but 64x64 px.*--size 64"):
        evaluate_segmenter(cfg.out / "model.pt", small, what="ext")
    bare = test.select(np.arange(4))
    bare.masks = None
    with pytest.raises(BrainhpcError, match="ext: the shards hold no tumour masks"):
        evaluate_segmenter(cfg.out / "model.pt", bare, what="ext")
    junk = tmp_path / "model.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(BrainhpcError, match="corrupt or unreadable model file"):
        evaluate_segmenter(junk, test)
    with pytest.raises(BrainhpcError, match="does not exist"):
        load_segmenter(tmp_path / "nowhere")


@pytest.mark.slow
def test_rerun_skips_different_config_refused_force_redoes(real_cell, prepared_phantom):
    cfg, first = real_cell
    mtime = (cfg.out / "model.pt").stat().st_mtime_ns
    again = segment(SegmentConfig(train_data="real", data=prepared_phantom, out=cfg.out,
                                  epochs=30, **FAST))
    assert again["skipped"] and (cfg.out / "model.pt").stat().st_mtime_ns == mtime
    with pytest.raises(BrainhpcError, match=r"different config \(epochs: 30 -> 2\)"):
        segment(SegmentConfig(train_data="real", data=prepared_phantom, out=cfg.out, epochs=2,
                              **FAST))
    redone = segment(SegmentConfig(train_data="real", data=prepared_phantom, out=cfg.out,
                                   epochs=3, val_every=2, precision="fp32", force=True, **FAST))
    assert redone["epochs"] == 3 and not redone.get("skipped") and not redone["resumed"]
    assert redone["steps"] == 3 * 10 and redone["train_precision"]["name"] == "fp32"
    log = [json.loads(x) for x in (cfg.out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log if r["kind"] == "val"] == [1, 2]  # every 2nd, and the last
    assert redone["chosen"]["best_epoch"] in (1, 2)
    # --force wiped the first run's predictions: the files are the redone model's
    assert_predictions_reproduce(cfg.out, redone["test"], redone["baselines"])


@pytest.mark.slow
def test_interrupted_exits_3_then_resumes_identically(prepared_phantom, tmp_path, monkeypatch,
                                                      capsys):
    argv = ["segment", "--train-data", "real", "--data", str(prepared_phantom), "--epochs", "3",
            "--batch-size", "16", "--channels", "8,16", "--strides", "2", "--res-units", "0",
            "--device", "cpu", "--no-progress", "--checkpoint-every", "7"]
    assert cli.main([*argv, "--out", str(tmp_path / "whole")]) == 0
    step = SegTask.training_step

    def stop_at_13(self, t, batch):
        if t.step == 12:
            os.kill(os.getpid(), signal.SIGTERM)  # what SLURM sends before a time limit
        return step(self, t, batch)

    monkeypatch.setattr(SegTask, "training_step", stop_at_13)
    cut = [*argv, "--out", str(tmp_path / "cut")]
    assert cli.main(cut) == 3
    assert not (tmp_path / "cut" / "metrics.json").exists()
    assert cli.main([*cut, "--seed", "4"]) == 2
    assert "unfinished segment run with a different config (seed: 0 -> 4)" in \
        capsys.readouterr().err
    monkeypatch.setattr(SegTask, "training_step", step)
    assert cli.main(cut) == 0
    whole, resumed = (json.loads((tmp_path / d / "metrics.json").read_text())
                      for d in ("whole", "cut"))
    assert resumed["resumed"] and resumed["steps"] == whole["steps"] == 30
    a = torch.load(tmp_path / "whole" / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "cut" / "model.pt", weights_only=True)["state_dict"]
    for k in a:  # CPU, no workers: the resumed run is the uninterrupted one
        assert torch.equal(a[k], b[k]), k
    assert resumed["test"] == whole["test"]


@pytest.mark.slow
def test_synthetic_and_mixed_cells_with_patients(prepared_phantom, tmp_path):
    """Synthetic pairs from hand-written shards (healthy without masks), and a prepared dataset
    that groups slices into patients: per-patient Dice then differs from per-slice Dice."""
    grouped = tmp_path / "grouped"
    for split in ("train", "val", "test"):
        d = load_split(prepared_phantom, split)
        write_shards(grouped / split, d.images, d.labels, d.sources, masks=d.masks,
                     attrs={"size": 64}, patients=[f"p{i // 5}" for i in range(len(d))])
    shutil.copy(prepared_phantom / "manifest.json", grouped / "manifest.json")
    syn = make_synthetic(tmp_path / "syn", prepared_phantom)
    kw = dict(data=grouped, synthetic_dir=syn, epochs=2, **FAST)
    m = segment(SegmentConfig(train_data="synthetic:dcgan", out=tmp_path / "s", precision="bf16",
                              **kw))
    assert m["train_precision"]["name"] == "bf16"  # autocast + channels_last through MONAI's U-Net
    assert m["n_train"]["total"] == 80 and m["n_train"]["synthetic"] == 80
    assert m["n_train"]["tumour_slices"] == 40 and m["test"]["n_patients"] == 5
    assert m["test"]["n_slices"] == 25
    m = segment(SegmentConfig(train_data="mixed:dcgan:0.25", out=tmp_path / "p", **kw))
    # per class a quarter synthetic: 81 - round(0.75 * 81) + 85 - round(0.75 * 85) = 20 + 21
    assert m["n_train"]["total"] == 166 and m["n_train"]["synthetic"] == 41
    assert m["train_data"] == "mixed:dcgan:0.25"
    # patients of 5 slices: patients.csv's 3D Dice, not the slices', is dice_patient_mean
    _, patients = assert_predictions_reproduce(tmp_path / "p", m["test"], m["baselines"])
    assert [p["slices"] for p in patients if p["arm"] == "unet"] == [5] * 5
    assert m["test"]["dice_patient_mean"] != m["test"]["dice_slice_mean"]
    assert Path(m["checkpoint"]).exists() and (tmp_path / "p" / "overlays.png").exists()


def test_identity_ignores_run_only_settings(tmp_path):
    base = dict(train_data="real", data=tmp_path, out=tmp_path / "a", device="cpu")
    a = SegmentConfig(**base).identity()
    assert a == SegmentConfig(**{**base, "out": tmp_path / "b"}, synthetic_dir=tmp_path,
                              num_workers=2, progress=False, checkpoint_every=3).identity()
    # the precision is in it, resolved (issue 23): --precision counts only if it computes otherwise
    bf16 = SegmentConfig(**base, precision="bf16").identity()
    assert bf16["precision"] == "bf16" and (bf16 == a) == (a["precision"] == "bf16")
    assert a["channels"] == list(srun.SegmentConfig.channels) and a["min_area"] is None
    assert a != SegmentConfig(**base, augment=False).identity()
    assert a != SegmentConfig(**base, val_every=2).identity()  # it moves the chosen epoch


@pytest.mark.slow  # torchrun, 2 processes: ~25 s on 2 busy cores
def test_two_process_ddp_cell(prepared_phantom, tmp_path):
    """The cell under torchrun (gloo): both ranks train and validate, rank 0 alone evaluates and
    writes; a rendezvous that never connects (a known transport problem of this sandbox, see
    test_trainer) is an xfail, anything else a failure."""
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "SLURM_JOB_ID", "SLURM_NTASKS",
                "SLURM_PROCID", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "brainhpc", "segment", "--train-data", "real", "--data", str(prepared_phantom),
           "--out", str(out), "--epochs", "2", "--batch-size", "16", "--channels", "8,16",
           "--strides", "2", "--device", "cpu", "--no-progress"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        if "gloo" not in log:
            pytest.xfail("gloo rendezvous never connected (sandbox transport problem)")
        pytest.fail(f"torchrun segment hung after the rendezvous:\n{log[-6000:]}")
    assert proc.returncode == 0, log[-6000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["world_size"] == 2 and m["steps"] == 2 * (166 // 16)
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["kind"] == "val" for r in records) == 2  # one writer: no duplicate records
    assert load_segmenter(out)["image_size"] == 64
