"""Training-data specs: parsing, assembling real/synthetic/mixed sets from real HDF5 shards,
class-balance weights, the VAE's healthy-only set, and every bad input."""

import numpy as np
import pytest
import torch

from brainhpc.data.shards import load_split, write_shards
from brainhpc.data.training import (
    TrainSpec,
    class_weights,
    healthy_only,
    parse_train_spec,
    sample_weights,
    synthetic_shard_dir,
    training_data,
)
from brainhpc.errors import BrainhpcError
from brainhpc.fsio import write_json

SIZE = 16


def _images(n, value, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 255, (n, 1, SIZE, SIZE), dtype=np.uint8) // 2 + value


def _write(folder, n_healthy, n_tumour, tag, seed, size=SIZE):
    labels = np.array([0] * n_healthy + [1] * n_tumour)
    images = _images(len(labels), 0, seed)[:, :, :size, :size]
    sources = [f"{tag}-{i:03d}" for i in range(len(labels))]
    write_shards(folder, images, labels, sources, attrs={"size": size, "seed": seed}, shard_size=7)


@pytest.fixture
def prepared(tmp_path):
    root = tmp_path / "prepared"
    _write(root / "train", 30, 10, "real-train", 1)
    _write(root / "val", 5, 5, "real-val", 2)
    _write(root / "test", 5, 5, "real-test", 3)
    write_json(root / "manifest.json", {"config": {"size": SIZE, "seed": 0}})
    return root


@pytest.fixture
def syn_dir(tmp_path):
    root = tmp_path / "synthetic"
    _write(synthetic_shard_dir(root, "dcgan", "healthy"), 40, 0, "dcgan-healthy", 4)
    _write(synthetic_shard_dir(root, "dcgan", "tumour"), 0, 25, "dcgan-tumour", 5)
    return root


def test_parse_every_valid_form():
    assert parse_train_spec("real") == TrainSpec("real")
    assert parse_train_spec("synthetic:dcgan") == TrainSpec("synthetic", "dcgan")
    assert parse_train_spec("mixed:vae") == TrainSpec("mixed", "vae")
    assert parse_train_spec("mixed:ddpm:0.25") == TrainSpec("mixed", "ddpm", 0.25)
    assert parse_train_spec(" MIXED:WGAN-GP:1 ") == TrainSpec("mixed", "wgan-gp", 1.0)
    assert parse_train_spec("mixed:vae:0").p == 0.0
    for text in ("real", "synthetic:dcgan", "mixed:vae", "mixed:ddpm:0.25"):
        assert str(parse_train_spec(text)) == text


@pytest.mark.parametrize("text,why", [
    ("", "empty"),
    ("fake", "unknown kind 'fake'"),
    ("synthetic", "needs a generator"),
    ("synthetic:gan", "unknown generator 'gan'"),
    ("real:dcgan", "takes no generator"),
    ("synthetic:dcgan:0.5", "nothing else"),
    ("mixed:dcgan:half", "not a number"),
    ("mixed:dcgan:1.5", "outside"),
    ("mixed:dcgan:-0.1", "outside"),
    ("mixed:dcgan:nan", "outside"),
    ("mixed:dcgan:0.5:1", "too many"),
])
def test_bad_specs_list_the_valid_forms(text, why):
    with pytest.raises(BrainhpcError) as e:
        parse_train_spec(text)
    msg = str(e.value)
    assert why in msg
    assert "real, synthetic:<generator>, mixed:<generator>, mixed:<generator>:<p>" in msg
    assert "vae, dcgan, wgan-gp, ddpm" in msg


def test_real_is_the_train_split(prepared):
    data = training_data("real", prepared)
    train = load_split(prepared, "train")
    assert data.sources == train.sources and np.array_equal(data.images, train.images)
    assert data.attrs["train_spec"] == "real"


def test_synthetic_and_mixed(prepared, syn_dir):
    syn = training_data("synthetic:dcgan", prepared, syn_dir)
    assert len(syn) == 65 and np.bincount(syn.labels).tolist() == [40, 25]
    assert all(s.startswith("dcgan-") for s in syn.sources)
    mixed = training_data("mixed:dcgan", prepared, syn_dir)
    assert len(mixed) == 40 + 65
    assert sum(s.startswith("real-train") for s in mixed.sources) == 40


@pytest.mark.parametrize("p", [0.0, 0.25, 0.5, 1.0])
def test_mixed_fraction_keeps_total_and_balance(prepared, syn_dir, p):
    data = training_data(f"mixed:dcgan:{p}", prepared, syn_dir, seed=3)
    assert len(data) == 40  # the real train size
    assert np.bincount(data.labels).tolist() == [30, 10]  # the real class counts
    n_syn = [sum(s.startswith("dcgan") for s, y in zip(data.sources, data.labels, strict=True)
                 if y == c) for c in (0, 1)]
    assert n_syn == [30 - round((1 - p) * 30), 10 - round((1 - p) * 10)]
    assert len(set(data.sources)) == len(data)  # drawn without replacement


def test_mixed_subsampling_is_deterministic_by_seed(prepared, syn_dir):
    a = training_data("mixed:dcgan:0.5", prepared, syn_dir, seed=1)
    b = training_data("mixed:dcgan:0.5", prepared, syn_dir, seed=1)
    c = training_data("mixed:dcgan:0.5", prepared, syn_dir, seed=2)
    assert a.sources == b.sources and np.array_equal(a.images, b.images)
    assert a.sources != c.sources


def test_missing_generator_names_the_cell_to_run(prepared, tmp_path):
    root = tmp_path / "half"
    _write(synthetic_shard_dir(root, "dcgan", "tumour"), 0, 5, "t", 1)
    with pytest.raises(BrainhpcError, match="generate cell dcgan-healthy must run first"):
        training_data("synthetic:dcgan", prepared, root)
    with pytest.raises(BrainhpcError, match="generate cell ddpm-healthy must run first"):
        training_data("mixed:ddpm:0.5", prepared, root)
    with pytest.raises(BrainhpcError, match="--synthetic-dir"):
        training_data("mixed:dcgan", prepared, None)


def test_synthetic_shortfall_and_size_mismatch(prepared, tmp_path):
    few = tmp_path / "few"
    _write(synthetic_shard_dir(few, "vae", "healthy"), 3, 0, "h", 1)
    _write(synthetic_shard_dir(few, "vae", "tumour"), 0, 3, "t", 2)
    with pytest.raises(BrainhpcError, match="needs 15 synthetic healthy images but generate cell "
                                            "vae-healthy wrote 3"):
        training_data("mixed:vae:0.5", prepared, few)
    big = tmp_path / "big"
    _write(synthetic_shard_dir(big, "vae", "healthy"), 5, 0, "h", 1, size=8)
    _write(synthetic_shard_dir(big, "vae", "tumour"), 0, 5, "t", 2, size=8)
    with pytest.raises(BrainhpcError, match="differ in size"):
        training_data("mixed:vae", prepared, big)
    wrong = tmp_path / "wrong"
    _write(synthetic_shard_dir(wrong, "vae", "healthy"), 0, 5, "h", 1)  # tumour images only
    _write(synthetic_shard_dir(wrong, "vae", "tumour"), 0, 5, "t", 2)
    with pytest.raises(BrainhpcError, match="holds no healthy images"):
        training_data("synthetic:vae", prepared, wrong)


def test_healthy_only_for_the_vae(prepared, syn_dir):
    data = training_data("mixed:dcgan:0.5", prepared, syn_dir)
    healthy = healthy_only(data)
    assert len(healthy) == 30 and (healthy.labels == 0).all()
    tumours = data.select(data.labels == 1)
    with pytest.raises(BrainhpcError, match="no healthy images .* among 10"):
        healthy_only(tumours)


def test_class_weights_balance_the_loss_and_the_sampler():
    labels = np.array([0] * 30 + [1] * 10)
    w = class_weights(labels)
    np.testing.assert_allclose(w, [40 / 60, 40 / 20])
    # weighted loss: each class contributes equally in total
    assert w[0] * 30 == pytest.approx(w[1] * 10)
    sw = sample_weights(labels)
    sampler = torch.utils.data.WeightedRandomSampler(sw, num_samples=4000,
                                                     generator=torch.Generator().manual_seed(0))
    drawn = labels[list(sampler)]
    assert abs(drawn.mean() - 0.5) < 0.05
    with pytest.raises(BrainhpcError, match="no tumour images"):
        class_weights(np.zeros(5, int))
