"""Quality: FID/KID behave (zero on identical sets, grow with noise), memorisation finds copies,
the feature net is cached (the realism report itself: tests/test_realism.py)."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from brainhpc.data.shards import load_split
from brainhpc.errors import BrainhpcError
from brainhpc.metrics import realism as qa

_spec = importlib.util.spec_from_file_location("gen_helpers",
                                               Path(__file__).with_name("test_generators.py"))
_helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_helpers)
make_prepared, phantom = _helpers.make_prepared, _helpers.phantom

FEAT = qa.FeatureConfig(steps=40, batch_size=32, width=16, dim=64)

pytestmark = pytest.mark.usefixtures("one_thread")



@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return make_prepared(tmp_path_factory.mktemp("prep"), size=32, n_train=60, n_held=40)


@pytest.fixture(scope="module")
def net(prepared, tmp_path_factory):
    return qa.feature_net(prepared, FEAT, cache_dir=tmp_path_factory.mktemp("cache"))[0]


def test_fid_matches_the_closed_form_for_gaussians():
    rng = np.random.default_rng(0)
    d, n = 4, 200_000
    a = rng.standard_normal((n, d))
    b = 2.0 * rng.standard_normal((n, d)) + np.array([1.0, 0, 0, 0])
    # |m|^2 + tr(I) + tr(4I) - 2 tr(2I) = 1 + d
    assert qa.fid(a, b) == pytest.approx(1 + d, abs=0.05)
    assert qa.fid(a, a) == pytest.approx(0, abs=1e-9)


def test_fid_kid_zero_on_itself_and_grow_with_noise(prepared, net):
    real = load_split(prepared, "val").images
    f = qa.features(net, real)
    assert f.shape == (len(real), 64)
    assert qa.fid(f, f) < 1e-6
    k0, _ = qa.kid(f, f, subsets=20)
    rng = np.random.default_rng(1)
    fids, kids = [], []
    for sigma in (0.02, 0.08, 0.25):
        noisy = np.clip(real / 255.0 + sigma * rng.standard_normal(real.shape), 0, 1)
        fn = qa.features(net, torch.from_numpy(noisy).float())
        fids.append(qa.fid(fn, f))
        kids.append(qa.kid(fn, f, subsets=20)[0])
    assert 0 < fids[0] < fids[1] < fids[2]
    assert abs(k0) < kids[1] < kids[2]


def test_real_heldout_scores_far_below_noise(prepared, net):
    train = qa.features(net, load_split(prepared, "train").images)
    held = qa.features(net, load_split(prepared, "val").images)
    blank = qa.features(net, np.zeros((40, 1, 32, 32), np.uint8) + 128)
    assert qa.fid(train, held) < qa.fid(blank, held)


def test_memorisation_flags_planted_copies(tmp_path):
    rng = np.random.default_rng(3)
    train = np.stack([phantom(rng, 32, i % 2 == 1) for i in range(40)])[:, None]
    synth = np.stack([phantom(rng, 32, i % 2 == 1) for i in range(20)])[:, None]
    planted = {4: 7, 11: 30, 17: 2}  # synthetic index -> train image it copies
    synth[4] = train[7]  # exact copy
    synth[11] = (train[30] * 0.8 + 20).astype(np.uint8)  # brightness/contrast changed
    synth[17] = np.clip(train[2] + rng.normal(0, 4, train[2].shape), 0, 255).astype(np.uint8)
    res = qa.memorisation(synth, train, png=tmp_path / "pairs.png", top=6, heldout=synth[:3])
    assert res["flagged"] == sorted(planted)
    assert res["near_copies"] == 3 and res["near_copy_share"] == pytest.approx(3 / 20)
    top = {p["synthetic"]: p["train"] for p in res["top_pairs"][:3]}
    assert top == planted
    assert res["top_pairs"][0]["corr"] == pytest.approx(1.0, abs=1e-4)
    assert (tmp_path / "pairs.png").stat().st_size > 0
    assert res["baseline_heldout"]["n"] == 3


def test_feature_net_is_cached_per_dataset(prepared, tmp_path, monkeypatch):
    net1, key1 = qa.feature_net(prepared, FEAT, cache_dir=tmp_path)
    assert (tmp_path / f"featnet-{key1}.pt").exists()

    def boom(*a, **k):
        raise AssertionError("retrained although cached")

    monkeypatch.setattr(qa, "_train_feature_net", boom)
    net2, key2 = qa.feature_net(prepared, FEAT, cache_dir=tmp_path)
    assert key2 == key1
    for a, b in zip(net1.state_dict().values(), net2.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    other = qa.FeatureConfig(steps=41, batch_size=32, width=16, dim=64)
    with pytest.raises(AssertionError, match="retrained"):
        qa.feature_net(prepared, other, cache_dir=tmp_path)  # another config, another key
    (tmp_path / f"featnet-{key1}.pt").write_bytes(b"junk")
    with pytest.raises(BrainhpcError, match="corrupt feature-network cache"):
        qa.feature_net(prepared, FEAT, cache_dir=tmp_path)


def test_cache_location_follows_env_then_dataset(prepared, tmp_path, monkeypatch):
    monkeypatch.setenv("BRAINHPC_CACHE", str(tmp_path))
    assert qa.cache_dir_for(prepared) == tmp_path / "quality"
    monkeypatch.delenv("BRAINHPC_CACHE")
    assert qa.cache_dir_for(prepared) == Path(prepared) / ".cache" / "quality"


def test_evaluate_reports_n_and_handles_missing_heldout(prepared, tmp_path):
    synth = load_split(prepared, "test", label=1).images[:15]
    res = qa.report(prepared, "tumour", synth, tmp_path, feature_cfg=FEAT,
                    cache_dir=tmp_path / "c", c2st_cfg=qa.C2STConfig(steps=30, resamples=100))
    # held-out = val + test (40 + 40 tumour slices), halves of 40; synthetic cut to 15
    assert res["n_synthetic"] == 15 and res["n_real"] == 80 and res["heldout_split"] == "val+test"
    assert res["n_reference"] == 40 and res["n_matched"] == 15
    assert res["fid"] > 0 and res["fid_floor"] > 0 and res["fid_train_vs_heldout"] >= 0
    assert res["memorisation"]["near_copies"] == 0
    bare = make_prepared(tmp_path / "bare", n_train=10, n_held=1)
    res = qa.report(bare, "healthy", synth, tmp_path, feature_cfg=FEAT, cache_dir=tmp_path)
    assert res["fid"] is None and "too few held-out healthy images" in res["note"]


def test_bad_inputs():
    with pytest.raises(BrainhpcError, match="at least 2 images"):
        qa.fid(np.zeros((1, 3)), np.zeros((5, 3)))
    with pytest.raises(BrainhpcError, match="image sizes differ"):
        qa.nearest(np.zeros((2, 1, 8, 8)), np.zeros((2, 1, 16, 16)))
    with pytest.raises(BrainhpcError, match="no 'config' key"):
        import json
        import tempfile
        d = Path(tempfile.mkdtemp())
        (d / "manifest.json").write_text(json.dumps({"x": 1}))
        qa.dataset_key(d)


def test_feature_net_trains_on_the_cpu_whatever_scores(prepared, tmp_path, monkeypatch):
    """Same key, same network: the first cell to train it may run on a GPU (issue 23)."""
    seen = []
    train = qa._train_feature_net
    monkeypatch.setattr(qa, "_train_feature_net",
                        lambda net, images, labels, cfg, device: seen.append(device) or
                        train(net, images, labels, cfg, device))
    net, _ = qa.feature_net(prepared, FEAT, cache_dir=tmp_path, device="meta")
    assert seen == [torch.device("cpu")]
    assert next(net.parameters()).device.type == "meta"  # scoring goes where it was asked
