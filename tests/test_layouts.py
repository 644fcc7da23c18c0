"""Layout detection on small fixture trees built here."""

from __future__ import annotations

from pathlib import Path

import pytest

from brainhpc.data.layouts import discover, parse_labels
from brainhpc.errors import BrainhpcError


def touch(root: Path, *names: str) -> None:
    for name in names:
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")


def test_br35h_with_pred_ignored_and_mixed_case(tmp_path):
    touch(tmp_path, "yes/y1.JPG", "yes/y2.png", "no/n1.jpeg", "no/notes.txt", "pred/p1.jpg")
    found = discover(tmp_path)
    assert found.layout == "br35h"
    assert [e[:2] for e in found.files] == [("no/n1.jpeg", 0), ("yes/y1.JPG", 1),
                                            ("yes/y2.png", 1)]
    assert any("pred/" in n and "ignored" in n for n in found.notices)
    assert found.skipped == [{"source": "no/notes.txt", "reason":
                              "not an image file (expected .jpg/.jpeg/.png/.tif/.tiff, got .txt)"}]


@pytest.mark.parametrize("parents", [["Training"], ["Training", "Testing"], [""]])
def test_four_class(tmp_path, parents):
    for parent in parents:
        for cls in ("glioma", "meningioma", "pituitary", "notumor"):
            touch(tmp_path / parent, f"{cls}/{cls}-1.jpg")
    found = discover(tmp_path)
    assert found.layout == "brain-tumor-mri"
    labels = {e.rel: e.label for e in found.files}
    assert len(labels) == 4 * len(parents)
    assert all(v == (0 if "notumor" in k else 1) for k, v in labels.items())


def test_generic_labels(tmp_path):
    touch(tmp_path, "a/x.png", "b/sub/y.png", "c/z.png")
    found = discover(tmp_path, "tumor=a,b healthy=c")
    assert found.layout == "labels"
    assert [e[:2] for e in found.files] == [("a/x.png", 1), ("b/sub/y.png", 1), ("c/z.png", 0)]


def test_missing_path(tmp_path):
    with pytest.raises(BrainhpcError, match="does not exist"):
        discover(tmp_path / "nope")


def test_unknown_layout_says_what_was_found_and_what_is_supported(tmp_path):
    touch(tmp_path, "cats/a.jpg", "dogs/b.jpg")
    with pytest.raises(BrainhpcError) as e:
        discover(tmp_path)
    assert "cats/" in str(e.value) and "dogs/" in str(e.value)
    assert "br35h" in str(e.value) and "--labels" in str(e.value)


def test_empty_class(tmp_path):
    touch(tmp_path, "yes/a.jpg")
    (tmp_path / "no").mkdir()
    with pytest.raises(BrainhpcError, match="'no' has no images"):
        discover(tmp_path)


@pytest.mark.parametrize("spec", ["tumour=a", "tumour:a healthy=b", "cats=a healthy=b",
                                  "tumour= healthy=b"])
def test_bad_label_specs(spec):
    with pytest.raises(BrainhpcError, match="--labels"):
        parse_labels(spec)


def test_label_folder_missing(tmp_path):
    touch(tmp_path, "a/x.png")
    with pytest.raises(BrainhpcError, match="healthy folder .*c does not exist"):
        discover(tmp_path, "tumour=a healthy=c")


def test_mask_beside_image_is_its_mask_in_every_layout(tmp_path):
    touch(tmp_path, "yes/y1.png", "yes/y1_mask.png", "yes/y2.jpg", "no/n1.png",
          "no/orphan_mask.png")
    found = discover(tmp_path)
    assert [(e.rel, e.mask) for e in found.files] == [
        ("no/n1.png", None), ("yes/y1.png", "yes/y1_mask.png"), ("yes/y2.jpg", None)]
    assert found.skipped == [{"source": "no/orphan_mask.png",
                              "reason": "mask without its image (orphan.<jpg|jpeg|png|tif|tiff>)"}]


@pytest.mark.parametrize("nest", ["", "kaggle_3m/"])
@pytest.mark.parametrize("ext", ["png", "tif"])
def test_lgg_case_folders(tmp_path, nest, ext):
    for case in ("TCGA_CS_4941_19960909", "TCGA_HT_7608_19940304"):
        touch(tmp_path, *(f"{nest}{case}/{case}_{k}{suffix}.{ext}"
                          for k in (1, 2) for suffix in ("", "_mask")))
    touch(tmp_path, f"{nest}data.csv")
    found = discover(tmp_path)
    assert found.layout == "lgg" and len(found.files) == 4
    assert all(e.label is None and e.mask == e.rel.replace(f".{ext}", f"_mask.{ext}")
               for e in found.files)
    assert {e.patient for e in found.files} == {"TCGA_CS_4941", "TCGA_HT_7608"}
    # the original download's 3-channel .tif holds FLAIR in channel 1
    assert {e.channel for e in found.files} == ({1} if ext == "tif" else {None})


def test_one_class_folder_only_when_asked(tmp_path):
    touch(tmp_path, "t/a.png", "t/b.png")
    with pytest.raises(BrainhpcError, match="both labels are needed"):
        discover(tmp_path, "tumour=t")
    found = discover(tmp_path, "tumour=t", one_class=True)
    assert [e.label for e in found.files] == [1, 1]
