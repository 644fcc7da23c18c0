"""Realism metrics that rank generators (issue 22): hand cases of PRDC, spectra and KID, and on
phantom data fresh real images beat noise, blur, a checkerboard and memorised copies on the
metric meant to catch each, with the real-vs-real floor below every degraded generator."""

import importlib.util
from pathlib import Path

import cv2
import numpy as np
import pytest

from brainhpc.data.shards import load_split
from brainhpc.errors import BrainhpcError
from brainhpc.metrics import realism as qa
from brainhpc.metrics.c2st import C2STConfig, c2st, split_by_group
from brainhpc.metrics.features import random_features
from brainhpc.metrics.prdc import prdc
from brainhpc.metrics.spectrum import radial_spectrum, spectral_distance

_spec = importlib.util.spec_from_file_location("gen_helpers",
                                               Path(__file__).with_name("test_generators.py"))
_helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_helpers)
make_prepared, phantom = _helpers.make_prepared, _helpers.phantom

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 32
FEAT = qa.FeatureConfig(steps=40, batch_size=32, width=16, dim=64)
FAST = C2STConfig(steps=150, resamples=300)


# ------------------------------------------------------------------ PRDC
def test_prdc_hand_case():
    # real 0, 1, 3: k=1 radii 1, 1, 2; fake 0.5, 10, 1.6: k=1 radii 1.1, 8.4, 1.1
    real, fake = np.array([[0.0], [1.0], [3.0]]), np.array([[0.5], [10.0], [1.6]])
    r = prdc(real, fake, k=1)
    assert r["precision"] == pytest.approx(2 / 3)  # 10 is in no real ball
    assert r["density"] == pytest.approx(4 / 3)  # 0.5 in the balls of 0 and 1, 1.6 of 1 and 3
    assert r["coverage"] == 1.0  # every real ball holds a fake point
    # 3 lies in no fake ball but the outlier's (10, radius 8.4): recall's known weakness
    assert r["recall"] == 1.0
    assert prdc(real, fake[[0, 2]], k=1)["recall"] == pytest.approx(2 / 3)


def test_prdc_identical_disjoint_and_small_sets():
    x = np.random.default_rng(0).standard_normal((50, 8))
    same = prdc(x, x)
    assert (same["precision"], same["recall"], same["coverage"], same["density"]) == (1, 1, 1, 1)
    far = prdc(x, x + 100)
    assert far["precision"] == far["recall"] == far["density"] == far["coverage"] == 0
    two = np.concatenate([x[:25], x[25:] + 100])  # two far clusters; copy only the first
    half = prdc(two, two[:25])
    assert (half["precision"], half["recall"], half["coverage"], half["density"]) == (
        1, 0.5, 0.5, 1)  # fidelity kept, half the diversity lost
    assert prdc(x[:3], x[:4])["k"] == 2  # k shrinks to what the sets allow
    with pytest.raises(BrainhpcError, match="at least 2 samples"):
        prdc(x[:1], x)


# ------------------------------------------------------------------ spectra
def test_spectrum_of_white_noise_is_flat_and_distance_is_zero_on_itself():
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((400, 1, 32, 32)) * 0.1
    s = radial_spectrum(noise)
    assert len(s) == int(np.rint(np.hypot(16, 16))) + 1  # rings 0 .. the Nyquist corner
    # white noise: power per frequency = H * W * variance = 1024 * 0.01 at every radius
    assert np.abs(s[1:] - np.log10(1024 * 0.01)).max() < 0.05
    assert spectral_distance(noise, noise) == 0


def test_spectrum_sees_checkerboard_and_blur():
    rng = np.random.default_rng(1)
    real = np.stack([phantom(rng, SIZE, True) for _ in range(60)])[:, None]
    yy, xx = np.mgrid[:SIZE, :SIZE]
    checker = np.clip(real + 12.0 * (((yy + xx) % 2) * 2 - 1), 0, 255).astype(np.uint8)
    blur = np.stack([cv2.GaussianBlur(i[0], (0, 0), 1.2) for i in real])[:, None]
    s_real, s_check, s_blur = (radial_spectrum(x) for x in (real, checker, blur))
    assert s_check[-1] - s_real[-1] > 1  # a peak, over a decade, in the corner ring
    assert np.all(s_blur[10:] < s_real[10:] - 0.5)  # high frequencies gone
    assert np.abs(s_check[:10] - s_real[:10]).max() < 0.1  # low ones untouched
    with pytest.raises(BrainhpcError, match="image sizes differ"):
        spectral_distance(real, real[:, :, :16, :16])


# ------------------------------------------------------------------ KID, halves, C2ST units
def test_kid_interval_point_is_the_unbiased_kid_and_groups_widen_it():
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((60, 6)), rng.standard_normal((60, 6)) + 0.5
    res = qa.kid_interval(a, b, [f"g{i}" for i in range(60)])
    assert res["value"] == pytest.approx(qa.kid(a, b, subsets=1, subset_size=60)[0])
    assert res["lo"] < res["value"] < res["hi"] and res["lo"] > 0
    # the same rows in 6 groups of 10 (b's rows copied per group): fewer independent draws
    grouped = qa.kid_interval(a, np.repeat(b[:6], 10, 0), np.repeat(np.arange(6), 10))
    assert grouped["hi"] - grouped["lo"] > res["hi"] - res["lo"]


def test_halves_keep_groups_whole_and_balance_sizes():
    groups = np.array([f"p{i // 4}" for i in range(40)] + [f"s{i}" for i in range(20)], object)
    a = qa.halves(groups, seed=3)
    assert not set(groups[a]) & set(groups[~a])
    assert abs(int(a.sum()) - int((~a).sum())) <= 4
    assert np.array_equal(a, qa.halves(groups, seed=3))
    fit = split_by_group(groups, np.random.default_rng(0))
    assert not set(groups[fit]) & set(groups[~fit])


def test_c2st_rejects_one_group_and_floats():
    x = np.zeros((4, 1, 8, 8), np.uint8)
    with pytest.raises(BrainhpcError, match="at least 2 groups"):
        c2st(x, ["a"] * 4, x, None, FAST)
    with pytest.raises(BrainhpcError, match="uint8"):
        c2st(x.astype(float), list("abcd"), x, None, FAST)


def test_random_features_are_fixed_and_see_brightness():
    x = np.random.default_rng(4).integers(0, 200, (5, 1, SIZE, SIZE)).astype(np.uint8)
    f = random_features(x)
    assert np.array_equal(f, random_features(x)) and f.shape[0] == 5
    assert not np.allclose(random_features(x + 40), f)


# ------------------------------------------------------------------ generators on phantom data
@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return make_prepared(tmp_path_factory.mktemp("prep"), size=SIZE, n_train=100, n_held=50)


@pytest.fixture(scope="module")
def scored(prepared, tmp_path_factory):
    """report() of every toy generator, tumour label, 60 images each."""
    rng = np.random.default_rng(5)
    fresh = np.stack([phantom(rng, SIZE, True) for _ in range(60)])[:, None]  # new real slices
    train = load_split(prepared, "train", label=1).images
    yy, xx = np.mgrid[:SIZE, :SIZE]
    gens = {
        "fresh": fresh,
        "noise": rng.integers(0, 256, fresh.shape).astype(np.uint8),
        "blur": np.stack([cv2.GaussianBlur(i[0], (0, 0), 1.2) for i in fresh])[:, None],
        "checker": np.clip(fresh + 12.0 * (((yy + xx) % 2) * 2 - 1), 0, 255).astype(np.uint8),
        "memorised": train[np.arange(60) % 5],  # five train slices, copied over and over
    }
    out, cache = tmp_path_factory.mktemp("out"), tmp_path_factory.mktemp("cache")
    return {name: qa.report(prepared, "tumour", s, out, feature_cfg=FEAT, cache_dir=cache,
                            c2st_cfg=FAST) for name, s in gens.items()}


def test_report_layout(scored):
    r = scored["fresh"]
    assert r["n_real"] == 100 and r["heldout_split"] == "val+test" and r["heldout_groups"] == 100
    assert r["n_reference"] == 50 and r["n_matched"] == 50 and r["n_synthetic"] == 60
    assert set(r["prdc"]) == {"trained", "random", "floor_trained", "floor_random"}
    assert set(r["c2st"]) >= {"auc", "lo", "hi", "control_auc", "control_lo", "control_hi",
                              "n_fit", "n_score"}
    assert r["kid_lo"] <= r["kid"] <= r["kid_hi"] and r["feature_key"]
    import json
    json.dumps(r)  # the generator card stores it


def test_c2st_control_near_chance_and_fresh_real_not_told_apart(scored):
    # the control is chance with an SD of ~0.06 at this size (12 seeds: mean 0.498)
    assert len({r["c2st"]["control_auc"] for r in scored.values()}) == 1  # one control for all
    assert 0.3 <= scored["fresh"]["c2st"]["control_auc"] <= 0.7
    fresh = scored["fresh"]["c2st"]
    assert fresh["lo"] < 0.5 < fresh["hi"] and 0.3 <= fresh["auc"] <= 0.7
    for name in ("noise", "blur", "checker", "memorised"):  # copies repeat across fit/score
        assert scored[name]["c2st"]["lo"] > max(0.75, fresh["hi"]), name


def test_each_degradation_is_caught_by_its_metric(scored):
    fresh, noise, blur = scored["fresh"], scored["noise"], scored["blur"]
    for space in ("trained", "random"):
        assert noise["prdc"][space]["precision"] < 0.1
        assert fresh["prdc"][space]["precision"] > 0.9
        mem = scored["memorised"]["prdc"][space]
        assert mem["recall"] < 0.2 and mem["precision"] > 0.9  # real slices, too few of them
        assert mem["coverage"] < 0.6 and mem["coverage"] < fresh["prdc"][space]["coverage"] - 0.3
    assert noise["c2st"]["auc"] > 0.95
    assert blur["spectral"] > 10 * fresh["spectral"]
    assert scored["checker"]["spectral"] > 3 * fresh["spectral"]
    assert scored["memorised"]["memorisation"]["near_copy_share"] == 1.0
    assert fresh["memorisation"]["near_copy_share"] < 0.1


def test_floor_below_every_degraded_generator(scored):
    floor = scored["fresh"]
    for name in ("noise", "blur", "checker", "memorised"):
        assert scored[name]["spectral"] > floor["spectral_floor"], name
    # a faint checkerboard is (nearly) invisible to FID/KID: what the spectrum is there for
    for name in ("noise", "blur", "memorised"):
        assert scored[name]["fid"] > floor["fid_floor"], name
        assert scored[name]["kid"] > floor["kid_floor"], name
    for name in ("noise", "blur"):  # resolved: the whole KID interval above the floor
        assert scored[name]["kid_lo"] > floor["kid_floor"], name
    for key in ("spectral", "fid"):  # fresh real slices sit at the floor
        assert scored["fresh"][key] < 2 * floor[f"{key}_floor"]


def test_too_few_or_no_heldout_images_is_a_note(tmp_path):
    synth = np.zeros((6, 1, SIZE, SIZE), np.uint8) + 100
    bare = make_prepared(tmp_path / "bare", size=SIZE, n_train=10, n_held=1)
    res = qa.report(bare, "healthy", synth, tmp_path, feature_cfg=FEAT, cache_dir=tmp_path)
    assert res["fid"] is None and res["c2st"] is None and "too few held-out healthy" in res["note"]
    assert res["n_real"] == 2 and res["memorisation"]["n_synthetic"] == 6
    for split in ("val", "test"):
        for f in (bare / split).glob("*"):
            f.unlink()
        (bare / split).rmdir()
    res = qa.report(bare, "healthy", synth, tmp_path, feature_cfg=FEAT, cache_dir=tmp_path)
    assert res["n_real"] == 0 and "no held-out healthy images" in res["note"]

