"""Find the labelled images of a dataset folder, whatever its layout.

Supported layouts (folder names are matched case-insensitively, extensions too):

- ``br35h``: ``yes/`` (tumour) and ``no/`` (healthy); an unlabelled ``pred/`` is ignored
  with a notice;
- ``brain-tumor-mri`` (the 4-class Brain Tumor MRI Dataset): ``Training/`` and/or ``Testing/``
  holding ``glioma/ meningioma/ pituitary/`` (tumour) and ``notumor/`` (healthy), or just those
  class folders;
- ``lgg`` (LGG FLAIR segmentation, Buda et al.): one folder per case, ``<case>/<case>_<n>.png``
  (or the original download's 3-channel ``.tif``, whose channel 1 is FLAIR) beside
  ``<case>_<n>_mask.png|tif``; the label is "the mask holds tumour", read when the image is
  processed; the patient (``TCGA_<site>_<id>``) groups slices so no patient straddles splits.
  The case folders may sit directly in the data folder or in one sub-folder (``kaggle_3m/``);
- ``labels``: any folders, mapped explicitly with ``--labels tumour=a,b healthy=c``
  (paths relative to the data folder; their images are collected recursively).

In every layout a file ``X_mask.<ext>`` beside ``X.<ext>`` is X's tumour mask, never an image of
its own; a mask without its image is skipped with that reason. Files without an image extension
inside class folders are reported as skipped, not silently lost.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from brainhpc.data.shards import LABELS
from brainhpc.errors import BrainhpcError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff")
MASK_SUFFIX = "_mask"
LGG_FLAIR_CHANNEL = 1  # pre-contrast, FLAIR, post-contrast in the original 3-channel .tif
TCGA_CASE = re.compile(r"^(TCGA_[A-Za-z0-9]+_[A-Za-z0-9]+)_\d{8}$")
LABEL_ALIASES = {"tumor": "tumour"}
BR35H = {"yes": "tumour", "no": "healthy"}
BR35H_IGNORED = ("pred",)
FOUR_CLASS = {"glioma": "tumour", "meningioma": "tumour", "pituitary": "tumour",
              "notumor": "healthy"}
FOUR_CLASS_SPLITS = ("training", "testing")
SUPPORTED = (
    "br35h: yes/ (tumour) and no/ (healthy), optional unlabelled pred/ (ignored); "
    "brain-tumor-mri: Training/ and/or Testing/ with glioma/ meningioma/ pituitary/ notumor/, "
    "or just those class folders; lgg: case folders of <case>_<n>.png|tif with "
    "<case>_<n>_mask.png|tif; any other layout: --labels tumour=DIR[,DIR] healthy=DIR[,DIR]"
)


class Entry(NamedTuple):
    """One image to prepare."""

    rel: str  # path relative to the data folder
    label: int | None  # None: labelled by its mask (lgg)
    mask: str | None = None  # relative path of X_mask beside it
    patient: str | None = None  # patient id (lgg case folders)
    channel: int | None = None  # pick this channel of a colour file


@dataclass
class Found:
    """The labelled image files of a dataset folder."""

    layout: str
    files: list[Entry]  # sorted by path
    skipped: list[dict] = field(default_factory=list)  # {"source", "reason"}
    notices: list[str] = field(default_factory=list)


def parse_labels(spec: str | list[str], one_class: bool = False) -> dict[str, list[str]]:
    """``"tumour=a,b healthy=c"`` (or its whitespace-split parts) -> {"tumour": [a, b], ...}.

    ``one_class`` accepts a single label (an external test folder of tumour scans only, say).
    """
    parts = spec.split() if isinstance(spec, str) else [p for s in spec for p in s.split()]
    mapping: dict[str, list[str]] = {}
    for part in parts:
        name, sep, folders = part.partition("=")
        name = LABEL_ALIASES.get(name.strip().lower(), name.strip().lower())
        if not sep or name not in LABELS or not folders.strip(","):
            raise BrainhpcError(
                f"--labels: cannot read {part!r}; expected LABEL=DIR[,DIR...] with LABEL one of "
                f"{', '.join(LABELS)} (or tumor), e.g. --labels tumour=yes healthy=no")
        mapping.setdefault(name, []).extend(f for f in folders.split(",") if f)
    missing = [name for name in LABELS if name not in mapping]
    if missing and not (one_class and mapping):
        raise BrainhpcError(f"--labels: no folders given for {', '.join(missing)}; "
                            f"both labels are needed, e.g. --labels tumour=yes healthy=no")
    return mapping


def _subdirs(folder: Path) -> dict[str, Path]:
    """Sub-folders by lower-cased name (hidden ones left out)."""
    return {p.name.lower(): p for p in sorted(folder.iterdir())
            if p.is_dir() and not p.name.startswith(".")}


def _mask_target(name: str) -> str | None:
    """``X_mask.png`` -> ``X`` (the stem of the image it belongs to), else None."""
    stem, ext = os.path.splitext(name)
    if ext.lower() in IMAGE_EXTENSIONS and stem.lower().endswith(MASK_SUFFIX):
        return stem[:-len(MASK_SUFFIX)]
    return None


def _collect(folder: Path, root: Path, label: int | None, found: Found, recursive: bool,
             patient: str | None = None) -> int:
    """Add the image files of ``folder`` (masks paired with their images) to ``found``;
    return how many images were added."""
    n = 0
    walker = os.walk(folder) if recursive else [(str(folder), [], os.listdir(folder))]
    for dirpath, dirnames, filenames in walker:
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        names = sorted(f for f in filenames if not f.startswith("."))  # .DS_Store and friends
        if not recursive:
            names = [f for f in names if Path(dirpath, f).is_file()]
        masks = {}
        for name in names:
            target = _mask_target(name)
            if target is not None:
                masks[target] = name
        images = {os.path.splitext(f)[0] for f in names
                  if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS}
        for name in names:
            path = Path(dirpath, name)
            rel = path.relative_to(root).as_posix()
            stem, ext = os.path.splitext(name)
            target = _mask_target(name)
            if target is not None and target in images:
                continue  # a mask: it travels with its image
            if target is not None and stem not in masks:  # an orphan X_mask file
                found.skipped.append({"source": rel, "reason": f"mask without its image "
                                      f"({target}.<{'|'.join(e[1:] for e in IMAGE_EXTENSIONS)}>)"})
                continue
            if ext.lower() not in IMAGE_EXTENSIONS:
                reason = (f"not an image file (expected {'/'.join(IMAGE_EXTENSIONS)}, "
                          f"got {ext or 'none'})")
                found.skipped.append({"source": rel, "reason": reason})
                continue
            mask = masks.get(stem)
            if label is None and mask is None:  # labelled by its mask (lgg), and it has none
                found.skipped.append({"source": rel, "reason": f"no {stem}{MASK_SUFFIX}.<ext> "
                                      "beside it: this layout labels a slice by its mask"})
                continue
            mask_rel = Path(dirpath, mask).relative_to(root).as_posix() if mask else None
            channel = LGG_FLAIR_CHANNEL if label is None and ext.lower() in (".tif", ".tiff") \
                else None
            found.files.append(Entry(rel, label, mask_rel, patient, channel))
            n += 1
    return n


def _case_folders(root: Path) -> list[Path] | None:
    """The LGG case folders under ``root`` (or under its one sub-folder), or None."""
    for parent in (root, *[d for d in _subdirs(root).values()][:1]):
        dirs = list(_subdirs(parent).values())
        if not dirs:
            continue
        with_masks = [d for d in dirs if any(_mask_target(f) for f in os.listdir(d))]
        if len(with_masks) >= max(1, len(dirs) // 2):
            return with_masks
        if parent is root and len(dirs) > 1:
            return None
    return None


def patient_of(case: str) -> str:
    """``TCGA_CS_4941_19960909`` -> ``TCGA_CS_4941``; other case names stand for themselves."""
    m = TCGA_CASE.match(case)
    return m.group(1) if m else case


def _describe(root: Path) -> str:
    dirs = [p.name + "/" for p in sorted(root.iterdir()) if p.is_dir()]
    n_files = sum(1 for p in root.iterdir() if p.is_file())
    shown = ", ".join(dirs[:12]) + (", ..." if len(dirs) > 12 else "")
    return f"folders [{shown}] and {n_files} file(s)" if dirs else f"no folders, {n_files} file(s)"


def _check_classes(counts: dict[str, int], where: dict[str, str], root: Path) -> None:
    for name, n in counts.items():
        if n == 0:
            raise BrainhpcError(f"{root}: class {name!r} has no images ({where[name]} holds no "
                                f"{'/'.join(IMAGE_EXTENSIONS)} files)")


def _by_labels(root: Path, labels, one_class: bool) -> Found:
    """``--labels tumour=a,b healthy=c``: every image below the named folders."""
    mapping = labels if isinstance(labels, dict) else parse_labels(labels, one_class)
    found = Found("labels", [])
    for name, folders in mapping.items():
        n = 0
        for rel in folders:
            folder = root / rel
            if not folder.is_dir():
                raise BrainhpcError(f"--labels: {name} folder {folder} does not exist; "
                                    f"{root} holds {_describe(root)}")
            n += _collect(folder, root, LABELS[name], found, recursive=True)
        _check_classes({name: n}, {name: ", ".join(folders)}, root)
    return found


def _br35h(root: Path, top: dict[str, Path]) -> Found:
    found = Found("br35h", [])
    for key, name in BR35H.items():
        n = _collect(top[key], root, LABELS[name], found, recursive=False)
        _check_classes({key: n}, {key: str(top[key])}, root)
    for key in BR35H_IGNORED:
        if key in top:
            found.notices.append(f"{top[key].name}/ holds unlabelled images: ignored")
    return found


def _four_class(root: Path, parents: list[Path]) -> Found:
    found = Found("brain-tumor-mri", [])
    counts = dict.fromkeys(LABELS, 0)
    where = {name: f"the {'/'.join(k for k, v in FOUR_CLASS.items() if v == name)} folders"
             for name in LABELS}
    for parent in parents:
        classes = _subdirs(parent)
        unknown = sorted(set(classes) - set(FOUR_CLASS))
        if unknown:
            found.notices.append(f"{parent}: unknown class folder(s) ignored: "
                                 f"{', '.join(unknown)}")
        for key, name in FOUR_CLASS.items():
            if key in classes:
                counts[name] += _collect(classes[key], root, LABELS[name], found, False)
    _check_classes(counts, where, root)
    return found


def _lgg(root: Path, cases: list[Path]) -> Found:
    found = Found("lgg", [])
    for case in cases:
        _collect(case, root, None, found, recursive=False, patient=patient_of(case.name))
    if not found.files:
        raise BrainhpcError(f"{root}: case folders hold masks but no images")
    return found


def _layout(root: Path) -> Found:
    """The first layout that fits ``root`` (see the module docstring), or a clear error."""
    top = _subdirs(root)
    if "yes" in top and "no" in top:
        return _br35h(root, top)
    parents = [top[s] for s in FOUR_CLASS_SPLITS if s in top]
    if not parents and any(k in FOUR_CLASS for k in top):
        parents = [root]
    if parents:
        return _four_class(root, parents)
    cases = _case_folders(root)
    if cases:
        return _lgg(root, cases)
    raise BrainhpcError(f"cannot recognise the layout of {root}: it holds {_describe(root)}. "
                        f"Supported: {SUPPORTED}")


def discover(data: str | os.PathLike, labels: str | list[str] | dict | None = None,
             one_class: bool = False) -> Found:
    """List the labelled images under ``data``; raise a BrainhpcError that says what was found.

    ``one_class`` lets an explicit ``labels`` mapping name one label only (external test sets).
    """
    root = Path(data)
    if not root.exists():
        raise BrainhpcError(f"data path {root} does not exist (give the folder that holds the "
                            f"class folders; in a container, mount it, e.g. -v /host/data:/data)")
    if not root.is_dir():
        raise BrainhpcError(f"data path {root} is not a folder")
    found = _by_labels(root, labels, one_class) if labels else _layout(root)
    found.files.sort()
    return found
