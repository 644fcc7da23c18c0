"""Phantom slices: seeded and prefix-stable, well-formed, varied, hard for brightness statistics
yet learnable (lesions are where the masks say), and fit for the real pre-processing."""

import cv2
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from brainhpc.data import phantom
from brainhpc.data.preprocess import (
    apply_geometry,
    brain_bbox,
    preprocess_array,
    remove_background,
)
from brainhpc.errors import BrainhpcError


@pytest.fixture(scope="module")
def sample():
    return phantom.generate(400, seed=11)


def test_same_arguments_same_slices_and_prefix_stable():
    a, b, short = phantom.generate(6, seed=3), phantom.generate(6, seed=3), phantom.generate(3, 3)
    for x, y in zip(a, b, strict=True):
        assert x.name == y.name and x.label == y.label
        assert np.array_equal(x.image, y.image) and np.array_equal(x.mask, y.mask)
    for x, y in zip(a[:3], short, strict=True):  # slice i does not depend on n
        assert np.array_equal(x.image, y.image) and x.name == y.name
    one = phantom.make_slice(4, seed=3)  # what the parallel workers call per index
    assert np.array_equal(one.image, a[4].image) and one.name == a[4].name
    other = phantom.generate(3, seed=4)
    assert not all(x.image.shape == y.image.shape and np.array_equal(x.image, y.image)
                   for x, y in zip(short, other, strict=True))


def test_shapes_dtypes_names_and_masks(sample):
    names = [p.name for p in sample]
    assert len(set(names)) == len(names)
    assert names[7] == f"phantom-000007-{'tumour' if sample[7].label else 'healthy'}.png"
    for p in sample[:100]:
        assert p.image.dtype == np.uint8 and p.mask.dtype == np.uint8 and p.image.ndim == 2
        assert p.mask.shape == p.image.shape and set(np.unique(p.mask)) <= {0, 1}
        assert p.label in (0, 1) and p.contrast in phantom.CONTRASTS
        if p.label == 0:
            assert not p.mask.any()
        else:
            assert p.mask.any()
            x0, y0, x1, y1 = brain_bbox(remove_background(p.image))  # the lesion is in the head
            ys, xs = np.nonzero(p.mask)
            assert x0 <= xs.min() and xs.max() < x1 and y0 <= ys.min() and ys.max() < y1


def test_tumour_fraction_and_bad_arguments(sample):
    share = np.mean([p.label for p in sample])
    assert 0.4 < share < 0.6, share
    assert all(p.label == 0 for p in phantom.generate(10, tumour_fraction=0.0))
    assert all(p.label == 1 for p in phantom.generate(10, tumour_fraction=1.0))
    for kwargs in (dict(n=0), dict(n=2, tumour_fraction=1.5), dict(n=2, tumour_fraction=-0.1),
                   dict(n=2, seed=-1)):
        with pytest.raises(BrainhpcError):
            phantom.generate(**kwargs)


def test_variety_of_canvases_and_contrasts(sample):
    shapes = {p.image.shape for p in sample}
    assert len(shapes) > 100 and any(h != w for h, w in shapes) and any(h == w for h, w in shapes)
    assert all(180 <= s <= 320 for shape in shapes for s in shape)
    counts = {c: sum(p.contrast == c for p in sample) for c in phantom.CONTRASTS}
    assert min(counts.values()) > 60, counts
    # Backgrounds: mostly black, some grey.
    border = np.array([np.median(np.concatenate([p.image[0], p.image[-1]])) for p in sample])
    assert 0.5 < np.mean(border < 20) < 0.95


def _brightness(x: np.ndarray) -> list[float]:
    x = x.astype(np.float32)
    return [x.mean(), x.std(), *np.percentile(x, [50, 90, 99])]


def test_brightness_statistics_cannot_separate_the_classes(sample):
    y = np.array([p.label for p in sample])
    whole = np.array([_brightness(p.image) for p in sample])
    heads = [preprocess_array(p.image, 64)[0] for p in sample]
    head = np.array([_brightness(h[h > 10]) for h in heads])
    for name, X in (("whole image", whole), ("head region", head),
                    ("both", np.hstack([whole, head]))):
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        acc = cross_val_score(clf, X, y, cv=5).mean()
        print(f"logistic regression on brightness statistics ({name}): accuracy {acc:.3f}")
        assert acc < 0.95, (name, acc)


def test_lesions_are_visible_where_the_mask_says():
    """Healthy/tumour twins of a slice differ only around the lesions, and clearly inside them."""
    strong = 0
    for i in range(30):
        tum = phantom.make_one(np.random.default_rng([5, i]), i, True)
        healthy = phantom.make_one(np.random.default_rng([5, i]), i, False)
        diff = np.abs(tum.image.astype(np.int16) - healthy.image.astype(np.int16))
        m = tum.mask.astype(bool)
        strong += diff[m].mean() > 10
        edge = np.concatenate([diff[0], diff[-1], diff[:, 0], diff[:, -1]])
        assert not edge.any()  # same anatomy, noise and background away from the head
        assert diff[~m].mean() < diff[m].mean()
    assert strong >= 27, strong


def test_preprocessing_keeps_the_lesions(sample):
    kept, tumours = 0, 0
    for p in sample[:100]:
        out, geom = preprocess_array(p.image, 64)
        assert out.shape == (64, 64) and out.dtype == np.uint8
        x0, y0, x1, y1 = geom.x0, geom.y0, geom.x1, geom.y1
        h, w = p.image.shape
        assert (x1 - x0) * (y1 - y0) > 0.15 * h * w  # the crop is the head, not text or a ruler
        if p.label:
            tumours += 1
            kept += apply_geometry(p.mask, geom, 64).any()
    assert kept >= 0.95 * tumours, (kept, tumours)


def test_canvas_holds_the_head_with_a_margin(sample):
    """The head never touches the canvas edge, so the bounding box sees all of it."""
    for p in sample[:50]:
        head = cv2.GaussianBlur(remove_background(p.image), (5, 5), 0) > 60
        n, lab = cv2.connectedComponents(head.astype(np.uint8))
        big = max(range(1, n), key=lambda j: (lab == j).sum())
        ys, xs = np.nonzero(lab == big)
        assert ys.min() > 0 and xs.min() > 0
        assert ys.max() < p.image.shape[0] - 1 and xs.max() < p.image.shape[1] - 1


def test_visible_lesions_are_bigger_and_the_rest_of_the_slice_is_the_same():
    std = phantom.generate(60, seed=8)
    vis = phantom.generate(60, seed=8, lesions="visible")
    tumours = [k for k, p in enumerate(std) if p.label]
    assert [p.label for p in std] == [p.label for p in vis]
    area = (lambda ps: np.mean([ps[k].mask.sum() for k in tumours]))  # noqa: E731
    assert area(vis) > 1.5 * area(std)
    healthy = next(k for k, p in enumerate(std) if not p.label)
    assert np.array_equal(std[healthy].image, vis[healthy].image)  # lesions only differ
    with pytest.raises(BrainhpcError, match="lesions must be one of standard, visible"):
        phantom.generate(3, lesions="huge")


def test_prepare_and_sweep_take_the_lesion_style(tmp_path):
    from brainhpc.prepare import PrepareConfig
    from brainhpc.sweep.config import load_sweep

    assert PrepareConfig(out=tmp_path, phantom=20).identity()["phantom_lesions"] == "standard"
    assert PrepareConfig(out=tmp_path, phantom=20,
                         phantom_lesions="visible").identity()["phantom_lesions"] == "visible"
    with pytest.raises(BrainhpcError, match="unknown phantom_lesions 'big'; valid: standard"):
        PrepareConfig(out=tmp_path, phantom=20, phantom_lesions="big")
    path = tmp_path / "s.toml"
    path.write_text('[data]\nphantom = 20\nphantom_lesions = "big"\n')
    with pytest.raises(BrainhpcError, match="data.phantom_lesions: unknown 'big'"):
        load_sweep(path)
