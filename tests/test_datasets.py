"""Real-world dataset layouts and their traps: LGG case folders with masks, Br35H's flipped and
rotated near-copies, splits that do not depend on --size, the confound check, odd files."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from brainhpc.data import phantom
from brainhpc.data import preprocess as pp
from brainhpc.data.folder import read_folder
from brainhpc.data.shards import SPLITS, ShardDataset, load_split
from brainhpc.prepare import PrepareConfig, prepare


def split_of(root: Path) -> dict[str, str]:
    return {s: split for split in SPLITS for s in load_split(root, split).sources}


# ------------------------------------------------------------------------------ LGG layout

def write_lgg(root: Path, cases: int = 8, slices: int = 8, ext: str = "png") -> None:
    """Case folders of phantom slices with ``_mask`` files, named like the LGG download. With
    ``tif`` each image holds 3 channels (pre-contrast, FLAIR, post-contrast) and only channel 1
    is the phantom: picking any other channel gives a different image."""
    for c in range(cases):
        case = f"TCGA_CS_{4900 + c}_1996090{c % 10}"
        (root / case).mkdir(parents=True)
        for k, p in enumerate(phantom.generate(slices, seed=100 + c)):
            mask = (p.mask > 0).astype(np.uint8) * 255
            if ext == "tif":
                other = np.full_like(p.image, 200)
                img = np.dstack([other, p.image, 255 - p.image])  # OpenCV order: B, G, R
            else:
                img = p.image
            cv2.imwrite(str(root / case / f"{case}_{k + 1}.{ext}"), img)
            cv2.imwrite(str(root / case / f"{case}_{k + 1}_mask.{ext}"), mask)


@pytest.mark.parametrize("ext", ["png", "tif"])
def test_lgg_layout_masks_labels_and_patients(tmp_path, ext):
    write_lgg(tmp_path / "lgg", ext=ext)
    out = tmp_path / "prepared"
    m = prepare(PrepareConfig(out=out, data=tmp_path / "lgg", size=48, seed=1, progress=False))
    assert m["layout"] == "lgg" and m["has_masks"] and m["patients"] == 8
    seen: dict[str, str] = {}
    for split in SPLITS:
        d = load_split(out, split)
        assert d.masks is not None and d.patients is not None and d.brain is not None
        for patient in set(d.patients):  # no patient straddles two splits
            assert seen.setdefault(patient, split) == split
        # the label is "the mask holds tumour"
        assert ((d.masks.reshape(len(d), -1).max(1) > 0) == (d.labels == 1)).all()
    # the stored image and mask are exactly what the FLAIR channel and its mask give
    d = load_split(out, "train")
    i = int(np.flatnonzero(d.labels == 1)[0])
    src = tmp_path / "lgg" / d.sources[i]
    mask = cv2.imread(str(src).replace(f".{ext}", f"_mask.{ext}"), cv2.IMREAD_GRAYSCALE)
    flair = cv2.imread(str(src), cv2.IMREAD_UNCHANGED)
    flair = flair[:, :, 1] if flair.ndim == 3 else flair
    want = pp.process_array(0, "", flair, 48, mask)
    assert np.array_equal(d.images[i, 0], want.image)
    assert np.array_equal(d.masks[i, 0], want.mask)
    ds = ShardDataset(out, "train", masks=True)
    image, label, mask_t = ds[i]
    assert label == 1 and mask_t.shape == image.shape and mask_t.max() == 1.0


# ------------------------------------------------------------------------------ Br35H traps

@pytest.fixture(scope="module")
def br35h_like(tmp_path_factory) -> Path:
    """yes/ and no/ with Br35H's traps: PNG bytes in .jpg names, ``No12.jpg`` spellings, and
    twins of scans that are flipped, rotated by quarter turns, or resized and shifted."""
    root = tmp_path_factory.mktemp("br35h") / "br35h"
    (root / "yes").mkdir(parents=True)
    (root / "no").mkdir()
    slices = phantom.generate(40, seed=11)
    for k, p in enumerate(slices):
        name = f"y{k}.jpg" if p.label else (f"No{k}.jpg" if k % 3 == 0 else f"no{k}.jpg")
        folder = root / ("yes" if p.label else "no")
        ok, buf = cv2.imencode(".png", p.image)  # PNG inside a .jpg name
        (folder / name).write_bytes(buf.tobytes())
        twin = {0: p.image[:, ::-1], 1: np.rot90(p.image), 2: np.rot90(p.image, 2),
                3: np.pad(cv2.resize(p.image, None, fx=0.8, fy=0.8), ((9, 0), (0, 5)))}[k % 4]
        cv2.imwrite(str(folder / f"twin-{name}"), np.ascontiguousarray(twin),
                    [cv2.IMWRITE_JPEG_QUALITY, 85])
    return root


def test_br35h_twins_never_straddle_splits(br35h_like, tmp_path):
    out = tmp_path / "prepared"
    m = prepare(PrepareConfig(out=out, data=br35h_like, size=48, progress=False))
    assert m["layout"] == "br35h" and m["total"] == 80 and not m["skipped"]
    where = split_of(out)
    assert any(s.startswith("no/No") for s in where)  # the capitalised spelling is read
    for source, split in where.items():
        if "twin-" in source:
            assert where[source.replace("twin-", "")] == split, source
    audit = m["duplicates"]["audit"]
    assert audit["cross_split_near_pairs"] == 0
    assert m["duplicates"]["near_pairs"] >= 40  # every twin found (by one detector or both)


def test_split_does_not_depend_on_size(br35h_like, tmp_path):
    a = prepare(PrepareConfig(out=tmp_path / "a", data=br35h_like, size=32, progress=False))
    b = prepare(PrepareConfig(out=tmp_path / "b", data=br35h_like, size=64, progress=False))
    assert split_of(tmp_path / "a") == split_of(tmp_path / "b")
    assert a["duplicates"]["groups"] == b["duplicates"]["groups"]
    pa = prepare(PrepareConfig(out=tmp_path / "pa", phantom=120, size=32, progress=False))
    pb = prepare(PrepareConfig(out=tmp_path / "pb", phantom=120, size=64, progress=False))
    assert split_of(tmp_path / "pa") == split_of(tmp_path / "pb")
    assert pa["counts"] == pb["counts"]


# ------------------------------------------------------------------------------ confound check

def test_confound_check_names_the_leaking_statistic(tmp_path):
    """Tumour scans twice as bright as healthy ones: brightness alone gives the label away."""
    for p in phantom.generate(60, seed=5):
        folder = tmp_path / "raw" / ("yes" if p.label else "no")
        folder.mkdir(parents=True, exist_ok=True)
        img = p.image if p.label else (p.image // 2)
        cv2.imwrite(str(folder / p.name), img)
    m = prepare(PrepareConfig(out=tmp_path / "out", data=tmp_path / "raw", size=32,
                              progress=False))
    c = m["confound"]
    assert c["per_statistic_auc"]["mean"] > 0.75
    assert any(w.startswith("mean alone") for w in c["warnings"])
    assert c["cv_auc"] > 0.75 and c["test"]["roc_auc"] is not None


def test_phantom_statistics_do_not_give_the_label_away(prepared_phantom):
    c = json.loads((prepared_phantom / "manifest.json").read_text())["confound"]
    assert set(c["per_statistic_auc"]) >= {"mean", "sharpness", "brain_fraction", "aspect"}
    assert 0.25 < c["cv_auc"] < 0.75, c


# ------------------------------------------------------------------------------ odd files

def white_page_scan() -> np.ndarray:
    """A dark-background scan pasted on a white page (the ZeroDivisionError of old)."""
    img = np.full((220, 260), 255, np.uint8)
    img[20:200, 30:230] = cv2.resize(phantom.make_slice(3, 1).image, (200, 180))
    return img


def odd_files(folder: Path) -> dict[str, str | None]:
    """Write odd files; returns name -> the reason expected in 'skipped' (None: processed)."""
    head = phantom.make_slice(1, 2).image
    files: dict[str, str | None] = {}

    def png(name, arr, reason=None, **kw):
        cv2.imwrite(str(folder / name), arr)
        files[name] = reason

    png("all-white.png", np.full((64, 64), 255, np.uint8), "blank image")
    png("all-black.png", np.zeros((64, 64), np.uint8), "blank image")
    png("grey.png", np.full((64, 64), 128, np.uint8), "blank image")
    png("one-pixel.png", np.full((1, 1), 9, np.uint8), "too small")
    png("thin.png", np.tile(np.arange(4000, dtype=np.uint16) % 256, (2, 1)).astype(np.uint8),
        "too small")
    png("sixteen-bit.png", head.astype(np.uint16) * 16)  # 12-bit data in a 16-bit PNG
    png("white-page.png", white_page_scan())
    Image.fromarray(head).convert("P").save(folder / "palette.png")
    files["palette.png"] = None
    rgba = np.dstack([head, head, head, np.full_like(head, 255)])
    Image.fromarray(rgba, "RGBA").save(folder / "rgba.png")
    files["rgba.png"] = None
    Image.fromarray(head).convert("CMYK").save(folder / "cmyk.jpg")
    files["cmyk.jpg"] = None
    im = Image.fromarray(np.ascontiguousarray(np.rot90(head, -1)))  # stored rotated ...
    exif = im.getexif()
    exif[0x0112] = 8  # ... with the EXIF tag that turns it upright again
    im.save(folder / "exif-rotated.jpg", exif=exif)
    files["exif-rotated.jpg"] = None
    ok, buf = cv2.imencode(".jpg", head)
    (folder / "truncated.jpg").write_bytes(buf.tobytes()[:400])
    files["truncated.jpg"] = "truncated JPEG"
    (folder / "zero.jpg").write_bytes(b"")
    files["zero.jpg"] = "empty file"
    (folder / "text.jpg").write_text("this is not an image\n")
    files["text.jpg"] = "not a decodable image"
    return files


def test_odd_files_never_stop_a_run(tmp_path):
    raw = tmp_path / "raw"
    for p in phantom.generate(24, seed=9):
        folder = raw / ("yes" if p.label else "no")
        folder.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / p.name), p.image)
    expected = {f"yes/{k}": v for k, v in odd_files(raw / "yes").items()}
    m = prepare(PrepareConfig(out=tmp_path / "out", data=raw, size=32, progress=False))
    skipped = {s["source"]: s["reason"] for s in m["skipped"]}
    where = split_of(tmp_path / "out")
    for name, reason in expected.items():
        if reason is None:
            assert name in where, (name, skipped.get(name))
        else:
            assert reason in skipped.get(name, ""), (name, skipped.get(name))
    # the same folder through evaluate's reader: it completes too, with the same verdicts
    data, skipped_eval = read_folder(raw, 32)
    assert {s["source"] for s in skipped_eval} == set(skipped)
    # what was processed is sane: the 16-bit scan is not crushed to black, the white page is
    # gone, the EXIF tag was applied (the upright scan and the tagged one are one group)
    stored = {s: data.images[i, 0] for i, s in enumerate(data.sources)}
    assert stored["yes/sixteen-bit.png"].mean() > 20
    page = stored["yes/white-page.png"]
    assert page[0, 0] == page[-1, -1] == 0
    upright = pp.process_array(0, "", phantom.make_slice(1, 2).image, 32).image
    corr = np.corrcoef(upright.ravel(), stored["yes/exif-rotated.jpg"].ravel())[0, 1]
    assert corr > 0.9


# ------------------------------------------------------------------------------ the real datasets

@pytest.mark.realdata
@pytest.mark.slow
def test_real_br35h_split_holds(br35h_data, tmp_path):
    m = prepare(PrepareConfig(out=tmp_path / "br35h", data=br35h_data, size=32, progress=False))
    assert m["layout"] == "br35h" and m["total"] == 3000
    d = m["duplicates"]
    # most of y0-y700 have a twin: thousands of near pairs, a few hundred distinct scans
    assert d["near_pairs"] > 10_000 and d["distinct_groups"] < 1000
    assert d["audit"]["cross_split_near_pairs"] == 0 and d["label_conflicts"] == 0


@pytest.mark.realdata
@pytest.mark.slow
def test_real_lgg_patients_and_masks(lgg_data, tmp_path):
    out = tmp_path / "lgg"
    m = prepare(PrepareConfig(out=out, data=lgg_data, size=32, progress=False))
    assert m["layout"] == "lgg" and m["has_masks"] and m["patients"] == 90
    seen: dict[str, str] = {}
    for split in SPLITS:
        for patient in set(load_split(out, split).patients):
            assert seen.setdefault(patient, split) == split
    share = sum(c["tumour"] for c in m["counts"].values()) / m["total"]
    assert 0.25 < share < 0.45  # about 35% of the slices hold tumour


def test_copies_need_the_grouping_rule_not_a_hash_match_alone():
    """External evaluation drops copies of development images: a mirrored re-save is one, two
    different phantom slices whose hashes happen to be close are not (the correlation must
    confirm a hash match, as in the grouping)."""
    from brainhpc.data.duplicates import copies_of, near_pairs

    thumbs = np.stack([pp.thumbnail(pp.square_crop(pp.remove_background(p.image))[0])
                       for p in phantom.generate(80, seed=3)])
    pairs = near_pairs(thumbs[:40], thumbs[40:], max_bits=6, min_corr=0.99)
    lookalike = np.flatnonzero((pairs.bits <= 6) & (pairs.corr < 0.7))
    assert len(lookalike), "no hash look-alike among 80 phantoms: widen the sample"
    i, j = pairs.i[lookalike[0]], pairs.j[lookalike[0]]
    base, base_sha = thumbs[40:], [f"b{k}" for k in range(40)]
    query = np.stack([thumbs[i], base[j][:, ::-1]])  # the look-alike, a mirrored copy of j
    exact, near = copies_of(["q0", "q1"], query, base_sha, base)
    assert exact.tolist() == [False, False] and near.tolist() == [False, True]


def test_near_pair_distances_do_not_depend_on_which_image_is_the_query():
    from brainhpc.data.duplicates import near_pairs

    thumbs = np.stack([pp.thumbnail(pp.square_crop(pp.remove_background(p.image))[0])
                       for p in phantom.generate(24, seed=4)])
    turned = np.ascontiguousarray(np.rot90(thumbs, 1, axes=(1, 2))[:, ::-1])
    ab = near_pairs(thumbs, turned, max_bits=64, min_corr=-1)
    ba = near_pairs(turned, thumbs, max_bits=64, min_corr=-1)
    bits_ab = {(i, j): b for i, j, b in zip(ab.i.tolist(), ab.j.tolist(), ab.bits.tolist(),
                                            strict=True)}
    bits_ba = {(j, i): b for i, j, b in zip(ba.i.tolist(), ba.j.tolist(), ba.bits.tolist(),
                                            strict=True)}
    assert bits_ab == bits_ba
    assert all(bits_ab[(k, k)] <= 6 for k in range(24))  # each turned copy is found


def test_tiny_lesions_survive_the_resize_and_keep_their_label(tmp_path):
    img = phantom.make_slice(2, 0).image
    mask = np.zeros(img.shape, np.uint8)
    cy, cx = np.array(img.shape) // 2
    mask[cy:cy + 2, cx:cx + 2] = 255  # far smaller than one pixel at 32 px
    out = pp.process_array(0, "", img, 32, mask)
    assert out.mask_label == 1 and out.mask.any()
    big = np.zeros(img.shape, np.uint8)
    big[cy - 30:cy + 30, cx - 30:cx + 30] = 255
    area = (pp.process_array(0, "", img, 32, big).mask > 0).sum()  # majority coverage
    _, geom = pp.preprocess_array(img, 32)
    expected = 60 * 60 * (32 / geom.side) ** 2
    assert abs(area - expected) < 0.2 * expected  # no halo: the lesion's own area


def test_lgg_slice_without_its_mask_is_skipped_with_a_reason(tmp_path):
    write_lgg(tmp_path / "lgg", cases=3, slices=4)
    orphan = next((tmp_path / "lgg").rglob("*_2_mask.png"))
    orphan.unlink()
    from brainhpc.data.layouts import discover

    found = discover(tmp_path / "lgg")
    assert any("this layout labels a slice by its mask" in s["reason"] for s in found.skipped)
    assert all(e.mask is not None for e in found.files)


def test_a_split_without_one_label_is_refused(tmp_path):
    """Three healthy scans that are all copies of one: one group, so one split holds them."""
    raw = tmp_path / "raw"
    for p in phantom.generate(30, seed=2):
        if p.label:
            (raw / "yes").mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(raw / "yes" / p.name), p.image)
    (raw / "no").mkdir()
    healthy = next(p for p in phantom.generate(30, seed=3) if not p.label)
    for k in range(3):
        cv2.imwrite(str(raw / "no" / f"copy{k}.png"), healthy.image)
    from brainhpc.errors import BrainhpcError

    with pytest.raises(BrainhpcError, match="has no healthy image"):
        prepare(PrepareConfig(out=tmp_path / "out", data=raw, size=32, progress=False))
