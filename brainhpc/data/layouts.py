"""Find the labelled images of a dataset folder, whatever its layout.

Supported layouts (folder names are matched case-insensitively, extensions too):

- ``br35h``: ``yes/`` (tumour) and ``no/`` (healthy); an unlabelled ``pred/`` is ignored
  with a notice;
- ``brain-tumor-mri`` (the 4-class Brain Tumor MRI Dataset): ``Training/`` and/or ``Testing/``
  holding ``glioma/ meningioma/ pituitary/`` (tumour) and ``notumor/`` (healthy), or just those
  class folders;
- ``labels``: any folders, mapped explicitly with ``--labels tumour=a,b healthy=c``
  (paths relative to the data folder; their images are collected recursively).

Files without an image extension inside class folders are reported as skipped, not silently lost.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from brainhpc.data.shards import LABELS
from brainhpc.errors import BrainhpcError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
LABEL_ALIASES = {"tumor": "tumour"}
BR35H = {"yes": "tumour", "no": "healthy"}
BR35H_IGNORED = ("pred",)
FOUR_CLASS = {"glioma": "tumour", "meningioma": "tumour", "pituitary": "tumour",
              "notumor": "healthy"}
FOUR_CLASS_SPLITS = ("training", "testing")
SUPPORTED = (
    "br35h: yes/ (tumour) and no/ (healthy), optional unlabelled pred/ (ignored); "
    "brain-tumor-mri: Training/ and/or Testing/ with glioma/ meningioma/ pituitary/ notumor/, "
    "or just those class folders; any other layout: --labels tumour=DIR[,DIR] healthy=DIR[,DIR]"
)


@dataclass
class Found:
    """The labelled image files of a dataset folder."""

    layout: str
    files: list[tuple[str, int]]  # (path relative to the data folder, label), sorted by path
    skipped: list[dict] = field(default_factory=list)  # {"source", "reason"}
    notices: list[str] = field(default_factory=list)


def parse_labels(spec: str | list[str]) -> dict[str, list[str]]:
    """``"tumour=a,b healthy=c"`` (or its whitespace-split parts) -> {"tumour": [a, b], ...}."""
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
    if missing:
        raise BrainhpcError(f"--labels: no folders given for {', '.join(missing)}; "
                            f"both labels are needed, e.g. --labels tumour=yes healthy=no")
    return mapping


def _subdirs(folder: Path) -> dict[str, Path]:
    """Sub-folders by lower-cased name (hidden ones left out)."""
    return {p.name.lower(): p for p in sorted(folder.iterdir())
            if p.is_dir() and not p.name.startswith(".")}


def _collect(folder: Path, root: Path, label: int, found: Found, recursive: bool) -> int:
    """Add the image files of ``folder`` to ``found``; return how many were added."""
    n = 0
    walker = os.walk(folder) if recursive else [(str(folder), [], os.listdir(folder))]
    for dirpath, dirnames, filenames in walker:
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath, name)
            if not recursive and not path.is_file():
                continue
            rel = path.relative_to(root).as_posix()
            if name.startswith("."):
                continue  # .DS_Store and friends
            if path.suffix.lower() in IMAGE_EXTENSIONS:
                found.files.append((rel, label))
                n += 1
            else:
                reason = (f"not an image file (expected {'/'.join(IMAGE_EXTENSIONS)}, "
                          f"got {path.suffix or 'none'})")
                found.skipped.append({"source": rel, "reason": reason})
    return n


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


def discover(data: str | os.PathLike, labels: str | list[str] | dict | None = None) -> Found:
    """List the labelled images under ``data``; raise a BrainhpcError that says what was found."""
    root = Path(data)
    if not root.exists():
        raise BrainhpcError(f"data path {root} does not exist (give the folder that holds the "
                            f"class folders; in a container, mount it, e.g. -v /host/data:/data)")
    if not root.is_dir():
        raise BrainhpcError(f"data path {root} is not a folder")

    if labels:
        mapping = labels if isinstance(labels, dict) else parse_labels(labels)
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
        found.files.sort()
        return found

    top = _subdirs(root)
    if "yes" in top and "no" in top:
        found = Found("br35h", [])
        for key, name in BR35H.items():
            n = _collect(top[key], root, LABELS[name], found, recursive=False)
            _check_classes({key: n}, {key: str(top[key])}, root)
        for key in BR35H_IGNORED:
            if key in top:
                found.notices.append(f"{top[key].name}/ holds unlabelled images: ignored")
        found.files.sort()
        return found

    parents = [top[s] for s in FOUR_CLASS_SPLITS if s in top]
    if not parents and any(k in FOUR_CLASS for k in top):
        parents = [root]
    if parents:
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
        found.files.sort()
        return found

    raise BrainhpcError(f"cannot recognise the layout of {root}: it holds {_describe(root)}. "
                        f"Supported: {SUPPORTED}")
