"""``brainhpc prepare`` end to end: phantom and raw folders, leakage-aware split, bad inputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
import torch

from brainhpc import __version__
from brainhpc.cli import main
from brainhpc.data import phantom
from brainhpc.data.folder import read_folder
from brainhpc.data.shards import SPLITS, ShardDataset, load_split
from brainhpc.data.split import split_groups
from brainhpc.errors import BrainhpcError
from brainhpc.fsio import sha256_file
from brainhpc.prepare import PrepareConfig, prepare
from brainhpc.prepare import cell as prep


def all_sources(root: Path) -> dict[str, str]:
    """source -> split name."""
    return {s: split for split in SPLITS for s in load_split(root, split).sources}


@pytest.fixture(scope="module")
def raw_folder(tmp_path_factory) -> Path:
    """A Br35H-style folder of 60 phantom PNGs plus exact copies, near-copies and bad files."""
    root = tmp_path_factory.mktemp("raw") / "br35h"
    for p in phantom.generate(60, seed=7):
        folder = root / ("yes" if p.label else "no")
        folder.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / p.name), p.image)
    yes = sorted((root / "yes").iterdir())
    for k in range(4):  # byte-identical copies under another name
        (root / "yes" / f"copy-{k}.png").write_bytes(yes[k].read_bytes())
    for k in range(4, 8):  # re-encoded, resized JPEG near-copies
        img = cv2.imread(str(yes[k]), cv2.IMREAD_GRAYSCALE)
        small = cv2.resize(img, (img.shape[1] * 3 // 4, img.shape[0] * 3 // 4))
        cv2.imwrite(str(root / "yes" / f"near-{k}.JPG"), small, [cv2.IMWRITE_JPEG_QUALITY, 80])
    (root / "no" / "broken.jpg").write_bytes(yes[9].read_bytes()[:300])
    (root / "no" / "readme.txt").write_text("not an image")
    (root / "pred").mkdir()
    cv2.imwrite(str(root / "pred" / "unlabelled.png"), cv2.imread(str(yes[0])))
    return root


@pytest.fixture(scope="module")
def prepared_raw(raw_folder, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("prep") / "out"
    return out, prepare(PrepareConfig(out=out, data=raw_folder, size=48, seed=3, progress=False))


def test_phantom_dataset_contents(prepared_phantom):
    m = json.loads((prepared_phantom / "manifest.json").read_text())
    assert m["total"] == 240 and m["has_masks"] and m["version"] == __version__
    assert sum(c["total"] for c in m["counts"].values()) == 240
    for split in SPLITS:  # stratified: every split holds both labels in about the same share
        c = m["counts"][split]
        assert c["healthy"] > 0 and c["tumour"] > 0
        assert abs(c["tumour"] / c["total"] - m["counts"]["train"]["tumour"] / 168) < 0.15
    for shard in m["shards"]:
        path = prepared_phantom / shard["path"]
        assert sha256_file(path) == shard["sha256"]
        with h5py.File(path) as f:
            assert f["images"].dtype == np.uint8 and f["images"].shape[1:] == (1, 64, 64)
            assert f["images"].chunks == (1, 1, 64, 64)
            assert f.attrs["size"] == 64 and f.attrs["seed"] == 0
            assert f.attrs["config_hash"] == m["config_hash"]
            assert f.attrs["version"] == __version__ and "masks" in f
    train = load_split(prepared_phantom, "train")
    tumour = train.labels == 1
    assert (train.masks[tumour].reshape(tumour.sum(), -1).max(1) > 0).mean() > 0.9
    assert train.masks[~tumour].max() == 0
    assert (prepared_phantom / "preview.png").stat().st_size > 1000


@pytest.mark.parametrize("in_memory", [True, False])
def test_dataset_reader_returns_floats(prepared_phantom, in_memory):
    ds = ShardDataset(prepared_phantom, "val", in_memory=in_memory)
    x, y = ds[3]
    assert x.dtype == torch.float32 and x.shape == (1, 64, 64) and 0 <= x.min() <= x.max() <= 1
    raw = load_split(prepared_phantom, "val")
    assert torch.equal(x, torch.from_numpy(raw.images[3]).float() / 255) and y == raw.labels[3]


def test_split_is_deterministic_and_seeded(tmp_path):
    runs = {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        prepare(PrepareConfig(out=tmp_path / name, phantom=60, size=32, seed=seed,
                              progress=False))
        runs[name] = all_sources(tmp_path / name)
    assert runs["a"] == runs["b"]
    # phantom slices depend on the seed too; the split must differ as well (by name pattern)
    assert runs["a"] != runs["c"]


def test_split_groups_keep_groups_whole_and_hit_targets():
    rng = np.random.default_rng(0)
    labels = (rng.random(1000) < 0.3).astype(np.int64)
    groups = np.arange(1000)
    groups[100:140] = 100  # one big group
    groups[200:300:2] = groups[201:301:2]  # fifty pairs
    labels[groups == 100] = 1
    labels[200:300] = labels[201:301:2].repeat(2)[:100]
    split = split_groups(groups, labels, (0.7, 0.2, 0.1), seed=5)
    for g in np.unique(groups):
        assert len(set(split[groups == g])) == 1
    for lab in (0, 1):
        share = np.bincount(split[labels == lab], minlength=3) / (labels == lab).sum()
        assert np.allclose(share, (0.7, 0.2, 0.1), atol=0.03)


def test_raw_folder_duplicates_stay_in_one_split(prepared_raw, raw_folder):
    out, m = prepared_raw
    where = all_sources(out)
    for k in range(4):
        original = sorted(p.name for p in (raw_folder / "yes").iterdir()
                          if p.name.startswith("phantom"))[k]
        assert where[f"yes/copy-{k}.png"] == where[f"yes/{original}"]
    for k in range(4, 8):
        original = sorted(p.name for p in (raw_folder / "yes").iterdir()
                          if p.name.startswith("phantom"))[k]
        assert where[f"yes/near-{k}.JPG"] == where[f"yes/{original}"]
    d = m["duplicates"]
    assert d["exact_groups"] == 4 and d["groups"] >= 8 and d["label_conflicts"] == 0
    assert all(len({where[s] for s in group}) == 1 for group in m["duplicate_groups"])
    assert m["layout"] == "br35h" and any("pred/" in n for n in m["notices"])
    assert not any(s.startswith("pred/") for s in where)


def test_bad_files_are_skipped_with_reasons(prepared_raw):
    _, m = prepared_raw
    reasons = {s["source"]: s["reason"] for s in m["skipped"]}
    assert "truncated" in reasons["no/broken.jpg"]
    assert "not an image file" in reasons["no/readme.txt"]
    assert m["total"] == 60 + 8


def test_rerun_skips_and_other_settings_need_force(prepared_raw, raw_folder):
    out, m = prepared_raw
    before = (out / "manifest.json").stat().st_mtime_ns
    again = prepare(PrepareConfig(out=out, data=raw_folder, size=48, seed=3, progress=False))
    assert again["config_hash"] == m["config_hash"]
    assert (out / "manifest.json").stat().st_mtime_ns == before
    with pytest.raises(BrainhpcError, match=r"a different config \(size: 48 -> 32\).*--force"):
        prepare(PrepareConfig(out=out, data=raw_folder, size=32, seed=3, progress=False))


def test_force_replaces(tmp_path):
    out = tmp_path / "p"
    prepare(PrepareConfig(out=out, phantom=40, size=32, progress=False))
    m = prepare(PrepareConfig(out=out, phantom=40, size=40, force=True, progress=False))
    assert m["size"] == 40 and load_split(out, "train").images.shape[-1] == 40
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]  # no staging or old copies left


def test_refuses_non_empty_foreign_folder(tmp_path):
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "thesis.tex").write_text("precious")
    with pytest.raises(BrainhpcError, match="not empty"):
        prepare(PrepareConfig(out=tmp_path / "p", phantom=40, size=32, progress=False))


def test_write_failure_leaves_nothing_half_written(tmp_path, monkeypatch):
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    real = prep.write_shards
    monkeypatch.setattr(prep, "write_shards", failing)
    with pytest.raises(OSError, match="No space"):
        prepare(PrepareConfig(out=tmp_path / "p", phantom=40, size=32, progress=False))
    assert list(tmp_path.iterdir()) == []


def test_unwritable_out(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(BrainhpcError, match="cannot write --out"):
        prepare(PrepareConfig(out=tmp_path / "file" / "sub" / "p", phantom=20, size=32,
                              progress=False))


def test_too_few_usable_images(tmp_path):
    for name in ("yes", "no"):
        (tmp_path / "d" / name).mkdir(parents=True)
    for k, p in enumerate(phantom.generate(12, seed=1)):
        cv2.imwrite(str(tmp_path / "d" / "yes" / f"{k}.png"), p.image)
    for k in range(5):
        (tmp_path / "d" / "no" / f"{k}.jpg").write_bytes(b"\xff\xd8\xff\xe0garbage")
    with pytest.raises(BrainhpcError, match=r"only 0 usable healthy image.*truncated JPEG"):
        prepare(PrepareConfig(out=tmp_path / "p", data=tmp_path / "d", size=32, progress=False))


@pytest.mark.parametrize("kwargs,match", [
    ({}, "exactly one of"),
    ({"phantom": 40, "size": 8}, r"prepare: size must be an integer in 16\.\.1024, got 8"),
    ({"phantom": 40, "split": "0.7,0.2"}, "three positive fractions"),
    ({"phantom": 40, "split": (0.5, 0.5, 0.0)}, "split must be a list of numbers > 0"),
    ({"phantom": 40, "labels": "tumour=a healthy=b"}, "--labels only applies"),
])
def test_config_validation(tmp_path, kwargs, match):
    with pytest.raises(BrainhpcError, match=match):
        PrepareConfig(out=tmp_path, **kwargs)


def test_cli_errors_exit_non_zero(tmp_path, capsys):
    assert main(["prepare", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "cats").mkdir()
    assert main(["prepare", "--data", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "cannot recognise the layout" in capsys.readouterr().err


def test_python_m_entry_point(tmp_path):
    out = tmp_path / "p"
    r = subprocess.run([sys.executable, "-m", "brainhpc", "prepare", "--phantom", "30", "--size",
                        "32", "--out", str(out), "--no-progress"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "prepared" in r.stderr and "train" in r.stderr and (out / "manifest.json").is_file()


def test_parallel_prepare_matches_serial(tmp_path):
    """Worker threads change the speed, never the result (order, images, split, hashes)."""
    outs = []
    for workers in (1, 2):
        outs.append(tmp_path / f"w{workers}")
        prepare(PrepareConfig(out=outs[-1], phantom=100, size=32, workers=workers,
                              progress=False))
    for split in ("train", "val", "test"):
        a, b = load_split(outs[0], split), load_split(outs[1], split)
        assert a.sources == b.sources
        assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)
    m1, m2 = (json.loads((o / "manifest.json").read_text()) for o in outs)
    assert m1["duplicates"] == m2["duplicates"] and m1["config_hash"] == m2["config_hash"]


def test_prepare_finishes_under_a_sigterm_handler(tmp_path):
    """Inside a submitit/SLURM cell SIGTERM is caught (bypassed); prepare must still finish."""
    code = (
        "import signal, sys\n"
        "from brainhpc.prepare import PrepareConfig, prepare\n"
        "signal.signal(signal.SIGTERM, lambda *a: print('bypassed', file=sys.stderr))\n"
        f"prepare(PrepareConfig(out={str(tmp_path / 'p')!r}, phantom=100, size=32, workers=2,"
        " progress=False))\n"
        "print('done')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "done", r.stderr


def test_read_folder_matches_prepare(prepared_raw, raw_folder):
    data, skipped = read_folder(raw_folder, 48)
    out, _ = prepared_raw
    where = {s: i for i, s in enumerate(data.sources)}
    train = load_split(out, "train")
    for k in range(5):
        assert np.array_equal(train.images[k], data.images[where[train.sources[k]]])
    assert {s["source"] for s in skipped} == {"no/broken.jpg", "no/readme.txt"}


@pytest.mark.realdata
def test_real_brain_tumor_mri(real_data, tmp_path):
    out = tmp_path / "real"
    m = prepare(PrepareConfig(out=out, data=real_data / "Training", size=64, progress=False))
    assert m["layout"] == "brain-tumor-mri" and m["total"] + len(m["skipped"]) == 5708
    assert m["duplicates"]["exact_groups"] == 155  # as documented for the shared data
    where = all_sources(out)
    assert all(len({where[s] for s in group}) == 1 for group in m["duplicate_groups"])
    tumour_share = [c["tumour"] / c["total"] for c in m["counts"].values()]
    assert max(tumour_share) - min(tumour_share) < 0.03


def test_force_replaces_a_folder_that_is_not_a_dataset(tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("not a dataset")
    with pytest.raises(BrainhpcError, match="not empty.*--force"):
        prepare(PrepareConfig(out=out, phantom=30, size=32, progress=False))
    m = prepare(PrepareConfig(out=out, phantom=30, size=32, progress=False, force=True))
    assert m["status"] == "done" and not (out / "notes.txt").exists()
