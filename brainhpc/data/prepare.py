"""``brainhpc prepare``: a labelled image folder (or phantom data) -> a prepared HDF5 dataset.

Output, built in a staging folder beside ``--out`` and renamed into place only when whole::

    OUT/train/shard-00000.h5 ...   images N x 1 x H x W uint8 (scaled to [0, 1] on read),
    OUT/val/...  OUT/test/...      labels (0 healthy, 1 tumour), sources, brain masks,
                                   fingerprints; tumour masks and patient ids where known
    OUT/manifest.json              counts, duplicate groups and the split audit, the confound
                                   check, skipped files, shard checksums, config
    OUT/preview.png                a labelled grid of pre-processed training images

Leakage (``brainhpc.data.duplicates``): byte-identical files, near-duplicates (two detectors
over 8 flips/rotations of a size-independent thumbnail) and slices of one patient are joined
into groups, and a group is never split across train/val/test. The split is stratified by label
and fixed by the seed, and does not depend on ``--size``. The manifest's ``confound`` block says
how well trivial image statistics alone predict the label (``brainhpc.data.confound``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from brainhpc import __version__
from brainhpc.data import duplicates, layouts, phantom, preprocess
from brainhpc.data.confound import confound_check, image_statistics
from brainhpc.data.shards import (
    DEFAULT_SHARD_SIZE,
    LABEL_NAMES,
    LABELS,
    SPLITS,
    ShardData,
    write_shards,
)
from brainhpc.errors import BrainhpcError
from brainhpc.fsio import config_hash, sha256_file, write_json
from brainhpc.images import save_grid

log = logging.getLogger(__name__)

MIN_PER_LABEL = 3  # images of each label, at least (check_splits checks each split after)
PREVIEW_IMAGES = 32


@dataclass
class PrepareConfig:
    out: Path
    data: Path | None = None  # a labelled image folder (see brainhpc.data.layouts)
    phantom: int | None = None  # or: this many procedural phantom slices
    phantom_lesions: str = "standard"  # how visible their lesions are (phantom.LESIONS)
    size: int = 128
    seed: int = 0
    split: tuple[float, float, float] = (0.7, 0.2, 0.1)
    labels: str | None = None  # "tumour=a,b healthy=c" for layouts that are not auto-detected
    force: bool = False
    workers: int | None = None  # threads; None: every core this process may use
    shard_size: int = DEFAULT_SHARD_SIZE
    near_dup_bits: int = duplicates.NEAR_DUP_BITS
    near_dup_corr: float = duplicates.NEAR_DUP_CORR
    progress: bool = True

    def __post_init__(self):
        self.out = Path(self.out)
        if (self.data is None) == (self.phantom is None):
            raise BrainhpcError("prepare: give exactly one of --data PATH or --phantom N")
        if self.data is not None:
            self.data = Path(self.data)
        if self.phantom is not None and (not isinstance(self.phantom, int) or self.phantom < 10):
            raise BrainhpcError(f"prepare: --phantom must be an integer >= 10, "
                                f"got {self.phantom!r}")
        if self.phantom_lesions not in phantom.LESIONS:
            raise BrainhpcError(f"prepare: phantom_lesions must be one of "
                                f"{', '.join(phantom.LESIONS)}, got {self.phantom_lesions!r}")
        if not isinstance(self.size, int) or not 16 <= self.size <= 1024:
            raise BrainhpcError(f"prepare: --size must be an integer in 16..1024, "
                                f"got {self.size!r}")
        if isinstance(self.split, str):
            self.split = parse_split(self.split)
        self.split = tuple(float(x) for x in self.split)
        if len(self.split) != 3 or min(self.split) <= 0 or abs(sum(self.split) - 1) > 1e-6:
            raise BrainhpcError(f"prepare: --split must be three positive fractions train,val,test "
                                f"summing to 1, got {self.split!r}")
        if not isinstance(self.shard_size, int) or self.shard_size < 1:
            raise BrainhpcError(f"prepare: shard_size must be an integer >= 1, "
                                f"got {self.shard_size!r}")
        if not isinstance(self.near_dup_bits, int) or not 0 <= self.near_dup_bits <= 32:
            raise BrainhpcError(f"prepare: near_dup_bits must be in 0..32, "
                                f"got {self.near_dup_bits!r}")
        if not isinstance(self.near_dup_corr, (int, float)) or not 0 < self.near_dup_corr <= 1:
            raise BrainhpcError(f"prepare: near_dup_corr must be in (0, 1], "
                                f"got {self.near_dup_corr!r}")
        if self.workers is not None and (not isinstance(self.workers, int) or self.workers < 1):
            raise BrainhpcError(f"prepare: --workers must be an integer >= 1, got {self.workers!r}")
        if self.labels is not None and not isinstance(self.labels, str):
            self.labels = " ".join(self.labels)
        if self.labels and self.data is None:
            raise BrainhpcError("prepare: --labels only applies to --data")
        if self.labels:
            layouts.parse_labels(self.labels, one_class=True)  # fail now, not after the scan

    def identity(self) -> dict:
        """What defines the output: a folder prepared with the same identity is not redone."""
        d = asdict(self)
        for key in ("out", "force", "workers", "progress"):
            d.pop(key)
        if d["phantom_lesions"] == "standard":  # identities of earlier datasets unchanged
            d.pop("phantom_lesions")
        d["data"] = None if self.data is None else str(self.data.resolve())
        d["split"] = list(self.split)
        return d


def parse_split(text: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise BrainhpcError(f"prepare: --split must look like 0.7,0.2,0.1, got {text!r}") from None
    if len(parts) != 3:
        raise BrainhpcError(f"prepare: --split needs three fractions train,val,test, got {text!r}")
    return parts


# ----------------------------------------------------------------------------- processing

def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _map(func, tasks: list, workers: int, progress: bool, what: str) -> list:
    """Run ``func`` over ``tasks`` on ``workers`` threads (in-process for one), in order.

    Threads, not processes: OpenCV and numpy release the GIL in decode, blur, threshold,
    components and resize. On 2 cores the 5,708 Brain Tumor MRI images took 4.17 s in one
    thread, 2.94 s in two, and 4.75 s in a 2-process pool, which spent ~1.5 s just starting (its
    server imports the caller's modules, torch included). Threads also need no pickling, no
    forked OpenCV state (which deadlocked) and no worker signal handlers.
    """
    bar = tqdm(total=len(tasks), desc=what, unit="img", disable=not progress, mininterval=1.0)
    if workers <= 1 or len(tasks) < 64:
        results = []
        for t in tasks:
            results.append(func(t))
            bar.update(1)
        bar.close()
        return results
    chunk = max(1, min(64, len(tasks) // (workers * 8)))

    def run(part: list) -> list:
        return [func(t) for t in part]

    cv_threads = cv2.getNumThreads()
    cv2.setNumThreads(1)  # our threads are the parallelism; OpenCV's own would oversubscribe
    ex = ThreadPoolExecutor(workers, thread_name_prefix=f"brainhpc-{what}")
    results: list = []
    try:
        for part in ex.map(run, [tasks[i:i + chunk] for i in range(0, len(tasks), chunk)]):
            results.extend(part)
            bar.update(len(part))
    except BaseException:
        ex.shutdown(cancel_futures=True)  # Ctrl-C / SIGTERM: drop queued chunks, finish running
        raise
    finally:
        ex.shutdown()
        cv2.setNumThreads(cv_threads)
        bar.close()
    return results


@dataclass
class Items:
    """Everything known about the candidate images, aligned by index."""

    sources: list[str]
    labels: np.ndarray
    sha: list[str]
    thumbs: np.ndarray  # N x 32 x 32 uint8 (size-independent fingerprints)
    images: np.ndarray  # N x 1 x H x W uint8
    brain: np.ndarray  # N x 1 x H x W uint8
    aspect: np.ndarray  # N float
    masks: np.ndarray | None
    patients: list[str] | None = None
    skipped: list[dict] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)
    layout: str = ""

    def data(self, attrs: dict) -> ShardData:
        return ShardData(self.images, self.labels, self.sources, self.masks, attrs,
                         brain=self.brain, patients=self.patients, thumbs=self.thumbs,
                         sha256=self.sha)


def _stack(procs: list[preprocess.Processed], key: str, shape: tuple) -> np.ndarray:
    if not procs:
        return np.zeros((0, *shape), np.uint8)
    return np.stack([getattr(p, key) for p in procs]).reshape(len(procs), *shape)


def _items(procs: list[preprocess.Processed], sources: list[str], labels: list[int],
           size: int, **kw) -> Items:
    thumb = (preprocess.THUMB, preprocess.THUMB)
    return Items(sources, np.array(labels, np.int64), [p.sha256 for p in procs],
                 _stack(procs, "thumb", thumb), _stack(procs, "image", (1, size, size)),
                 _stack(procs, "brain", (1, size, size)),
                 np.array([p.aspect for p in procs], float), **kw)


def _masks(procs: list[preprocess.Processed], labels: list[int], size: int,
           notices: list[str]) -> np.ndarray | None:
    """Tumour masks when every image has ground truth (a healthy image without a mask file has
    an empty one; a tumour image without one leaves the dataset without masks)."""
    have = [p.mask is not None for p in procs]
    if not any(have):
        return None
    missing = [i for i, (h, y) in enumerate(zip(have, labels, strict=True)) if not h and y == 1]
    if missing:
        notices.append(f"{sum(have)} of {len(procs)} images have masks but {len(missing)} "
                       "tumour images have none: masks are not stored")
        return None
    empty = np.zeros((size, size), np.uint8)
    return np.stack([empty if p.mask is None else p.mask for p in procs])[:, None]


def _gather(cfg: PrepareConfig, workers: int, one_class: bool = False) -> Items:
    size = cfg.size
    if cfg.phantom is not None:
        tasks = [(i, cfg.seed, size, cfg.phantom_lesions) for i in range(cfg.phantom)]
        results = _map(preprocess.process_phantom, tasks, workers, cfg.progress, "phantom")
        procs = [r[0] for r in results]
        labels = [r[1] for r in results]
        return _items(procs, [r[2] for r in results], labels, size,
                      masks=_masks(procs, labels, size, []), layout="phantom")

    found = layouts.discover(cfg.data, cfg.labels, one_class=one_class)
    for notice in found.notices:
        log.info("%s", notice)
    root = cfg.data.resolve()
    tasks = [preprocess.FileTask(i, str(root / e.rel), size,
                                 None if e.mask is None else str(root / e.mask), e.channel)
             for i, e in enumerate(found.files)]
    procs = _map(preprocess.process_file, tasks, workers, cfg.progress, "prepare")
    skipped = list(found.skipped)
    keep = []
    for p, entry in zip(procs, found.files, strict=True):
        if p.error:
            skipped.append({"source": entry.rel, "reason": p.error})
        else:
            keep.append(p)
    entries = [found.files[p.index] for p in keep]
    labels = [e.label if e.label is not None else p.mask_label
              for e, p in zip(entries, keep, strict=True)]
    patients = None
    if any(e.patient is not None for e in entries):
        patients = [e.patient or e.rel for e in entries]
    notices = list(found.notices)
    return _items(keep, [e.rel for e in entries], labels, size,
                  masks=_masks(keep, labels, size, notices), patients=patients,
                  skipped=skipped, notices=notices, layout=found.layout)


def read_folder(data: str | os.PathLike, size: int, labels: str | None = None,
                workers: int | None = None, progress: bool = False,
                one_class: bool = False) -> tuple[ShardData, list[dict]]:
    """Pre-process a raw labelled folder in memory (no split, no files written).

    Used to evaluate a trained classifier on another dataset with exactly the same pre-processing.
    ``one_class`` lets ``labels`` name a single class (a folder of tumour scans only, say).
    """
    cfg = PrepareConfig(out=Path(tempfile.gettempdir()), data=Path(data), size=size,
                        labels=labels, workers=workers, progress=progress)
    items = _gather(cfg, cfg.workers or default_workers(), one_class=one_class)
    if not len(items.labels):
        raise BrainhpcError(f"{data}: no usable images ({len(items.skipped)} skipped)")
    return items.data({"size": size, "source": str(data), "layout": items.layout}), items.skipped


# ----------------------------------------------------------------------------- split

def split_groups(group_ids: np.ndarray, labels: np.ndarray, fractions, seed: int) -> np.ndarray:
    """Split index (0 train, 1 val, 2 test) per image: stratified by label, groups kept whole.

    Per label, groups are visited largest first (ties in seeded random order) and each goes to the
    split furthest below its target count, so big groups cannot overshoot a small split.
    A group with mixed labels counts under its majority label.
    """
    rng = np.random.default_rng(seed)
    fractions = np.asarray(fractions, float)
    out = np.full(len(labels), -1, np.int64)
    uniq, inverse = np.unique(group_ids, return_inverse=True)
    members = [[] for _ in uniq]
    for i, g in enumerate(inverse):
        members[g].append(i)
    group_label = np.array([np.bincount(labels[m], minlength=2).argmax() for m in members])
    for label in np.unique(group_label):
        gs = np.flatnonzero(group_label == label)
        gs = gs[rng.permutation(len(gs))]
        gs = gs[np.argsort([-len(members[g]) for g in gs], kind="stable")]
        total = sum(len(members[g]) for g in gs)
        target = fractions * total
        have = np.zeros(3)
        for g in gs:
            k = int(np.argmax((target - have) / np.maximum(target, 1e-9)))
            out[members[g]] = k
            have[k] += len(members[g])
    return out


def check_splits(labels: np.ndarray, split: np.ndarray, cfg: PrepareConfig) -> None:
    """Every split needs both labels (thresholds are chosen on val and scored on test); with
    few patients or big duplicate groups a label can end up in one split only."""
    counts = _counts(labels, split)
    empty = [f"{name} has no {lab} image" for name, c in counts.items()
             for lab in LABELS if c[lab] == 0]
    if empty:
        raise BrainhpcError(
            f"{cfg.data or 'phantom data'}: the leakage-aware split leaves {'; '.join(empty)} "
            f"(counts {counts}); duplicate groups and patients are never split, so this dataset "
            "needs more distinct scans per label (or other --split fractions)")


# ----------------------------------------------------------------------------- command

def _existing(out: Path) -> dict | None:
    manifest = out / "manifest.json"
    if not manifest.is_file():
        return None
    try:
        return json.loads(manifest.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _refuse_or_skip(cfg: PrepareConfig, chash: str) -> dict | None:
    """The manifest when ``out`` already holds this dataset; raise when it holds another."""
    if not cfg.out.exists():
        return None
    if not cfg.out.is_dir():
        raise BrainhpcError(f"--out {cfg.out} exists and is not a folder")
    old = _existing(cfg.out)
    if old is not None and old.get("config_hash") == chash and not cfg.force:
        return old
    if cfg.force or not any(cfg.out.iterdir()):
        return None
    if old is not None:
        before = old.get("config", {})
        changed = [f"{k}: {before.get(k)!r} -> {v!r}" for k, v in cfg.identity().items()
                   if before.get(k) != v]
        raise BrainhpcError(f"{cfg.out} already holds a prepared dataset with other settings "
                            f"({'; '.join(changed) or 'different version'}); pass --force to "
                            f"replace it, or choose another --out")
    raise BrainhpcError(f"{cfg.out} exists and is not empty (and holds no manifest.json); "
                        f"pass --force to replace it, or choose another --out")


def _counts(labels: np.ndarray, split: np.ndarray) -> dict:
    counts = {}
    for k, name in enumerate(SPLITS):
        sel = labels[split == k]
        counts[name] = {LABEL_NAMES[v]: int((sel == v).sum()) for v in sorted(LABEL_NAMES)}
        counts[name]["total"] = int(len(sel))
    return counts


def _preview(path: Path, images: np.ndarray, labels: np.ndarray, seed: int) -> None:
    rng = np.random.default_rng(seed)
    per = PREVIEW_IMAGES // 2
    pick = np.concatenate([rng.permutation(np.flatnonzero(labels == v))[:per] for v in (1, 0)])
    save_grid(images[pick], path, ncols=8, captions=[LABEL_NAMES[int(v)] for v in labels[pick]],
              title=f"{len(labels)} training images (first rows tumour, then healthy)")


def prepare(cfg: PrepareConfig) -> dict:
    """Build the prepared dataset in ``cfg.out``; returns the manifest (also when skipped)."""
    t0 = time.perf_counter()
    identity = cfg.identity()
    chash = config_hash(identity)
    done = _refuse_or_skip(cfg, chash)
    if done:
        log.info("%s already holds this prepared dataset (config %s): nothing to do", cfg.out,
                 chash)
        return done

    workers = cfg.workers or default_workers()
    items = _gather(cfg, workers)
    t_processed = time.perf_counter()
    for name, value in LABELS.items():
        n = int((items.labels == value).sum())
        if n < MIN_PER_LABEL:
            reasons = "; ".join(f"{s['source']}: {s['reason']}" for s in items.skipped[:5])
            raise BrainhpcError(
                f"{cfg.data}: only {n} usable {name} image(s), need at least {MIN_PER_LABEL} "
                f"(one per split); {len(items.skipped)} file(s) skipped"
                + (f", e.g. {reasons}" if reasons else ""))
    if items.skipped:
        log.warning("%d file(s) skipped (reasons in manifest.json), e.g. %s: %s",
                    len(items.skipped), items.skipped[0]["source"], items.skipped[0]["reason"])

    groups, dup_stats, pairs = duplicates.duplicate_groups(
        items.sha, items.thumbs, items.labels, items.patients, cfg.near_dup_bits,
        cfg.near_dup_corr)
    listed = []
    for g in np.unique(groups):
        idx = np.flatnonzero(groups == g)
        if len(idx) > 1:
            listed.append(sorted(items.sources[i] for i in idx))
    split = split_groups(groups, items.labels, cfg.split, cfg.seed)
    dup_stats["audit"] = duplicates.audit(pairs, split, items.labels, items.patients,
                                          rule_bits=cfg.near_dup_bits,
                                          rule_corr=cfg.near_dup_corr)
    check_splits(items.labels, split, cfg)
    log.info("%d images, %d duplicate groups (%d exact), largest %d: kept within one split; "
             "%d near pairs at the audit thresholds still cross splits",
             len(items.labels), dup_stats["groups"], dup_stats["exact_groups"],
             dup_stats["largest_group"], dup_stats["audit"]["cross_split_audit_pairs"])
    stats = image_statistics(items.images, items.brain, items.aspect)
    train, test = split == 0, split == 2
    confound = confound_check(stats[train], items.labels[train], groups[train], stats[test],
                              items.labels[test], cfg.seed)

    try:
        cfg.out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{cfg.out.name}.staging-", dir=cfg.out.parent))
    except OSError as e:
        raise BrainhpcError(f"cannot write --out {cfg.out} ({e.strerror or e}); give a writable "
                            f"folder (in a container, mount one, e.g. -v \"$PWD/out:/out\")"
                            ) from e
    try:
        attrs = {"size": cfg.size, "seed": cfg.seed, "config_hash": chash,
                 "source": "phantom" if cfg.data is None else str(cfg.data)}
        shards = []
        for k, name in enumerate(SPLITS):
            idx = np.flatnonzero(split == k)
            idx = idx[np.argsort([items.sources[i] for i in idx], kind="stable")]
            part = items.data(attrs).select(idx)
            paths = write_shards(staging / name, part.images, part.labels, part.sources,
                                 attrs={**attrs, "split": name}, shard_size=cfg.shard_size,
                                 **part.optional())
            shards += [{"path": p.relative_to(staging).as_posix(), "sha256": sha256_file(p),
                        "images": int(min(cfg.shard_size, len(idx) - j * cfg.shard_size))}
                       for j, p in enumerate(paths)]
        _preview(staging / "preview.png", items.images[train], items.labels[train], cfg.seed)
        wall = time.perf_counter() - t0
        n_seen = len(items.labels) + len(items.skipped)
        manifest = {
            "format": 1,
            "version": __version__,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "config": identity,
            "config_hash": chash,
            "layout": items.layout,
            "size": cfg.size,
            "counts": _counts(items.labels, split),
            "total": int(len(items.labels)),
            "has_masks": items.masks is not None,
            "patients": None if items.patients is None else len(set(items.patients)),
            "duplicates": dup_stats,
            "confound": confound,
            "duplicate_groups": listed,
            "skipped": items.skipped,
            "notices": items.notices,
            "shards": shards,
            "timing": {"wall_s": round(wall, 3), "workers": workers,
                       "images_per_s": round(n_seen / max(t_processed - t0, 1e-9), 1)},
        }
        write_json(staging / "manifest.json", manifest)
        _swap_into_place(staging, cfg.out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("prepared %s: %s (%.1f s)", cfg.out,
             ", ".join(f"{s} {c['total']}" for s, c in manifest["counts"].items()), wall)
    return manifest


def _swap_into_place(staging: Path, out: Path) -> None:
    """Replace ``out`` by ``staging`` with renames: at any moment one whole dataset is in place."""
    if out.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, trash / out.name)
        os.replace(staging, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(staging, out)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "prepare", help="pre-process a labelled MRI folder (or phantom data) into HDF5 shards",
        description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", type=Path, help="labelled image folder (br35h, brain-tumor-mri, "
                                               "lgg, or any layout with --labels)")
    src.add_argument("--phantom", type=int, metavar="N", help="N procedural phantom slices")
    p.add_argument("--phantom-lesions", default="standard",
                   help="phantom lesions: standard (faint and small at 64 px) | visible")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    p.add_argument("--seed", type=int, default=0, help="split (and phantom) seed")
    p.add_argument("--split", default="0.7,0.2,0.1", help="train,val,test fractions")
    p.add_argument("--labels", nargs="+", metavar="LABEL=DIR[,DIR]",
                   help="explicit folder mapping, e.g. --labels tumour=a,b healthy=c")
    p.add_argument("--workers", type=int, help="threads (default: all usable cores)")
    p.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE,
                   help="max images per shard file")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--force", action="store_true", help="replace an existing prepared dataset")
    p.set_defaults(func=run)


def run(args) -> int:
    cfg = PrepareConfig(out=args.out, data=args.data, phantom=args.phantom,
                        phantom_lesions=args.phantom_lesions, size=args.size,
                        seed=args.seed, split=args.split,
                        labels=" ".join(args.labels) if args.labels else None, force=args.force,
                        workers=args.workers, shard_size=args.shard_size,
                        progress=not args.no_progress)
    m = prepare(cfg)
    d = m["duplicates"]
    print(f"{cfg.out}: " + ", ".join(f"{s} {c['total']}" for s, c in m["counts"].items())
          + f"; {d['groups']} duplicate groups ({d['exact_groups']} byte-identical), "
          f"{d['audit']['cross_split_near_pairs']} near pairs across splits; "
          f"{len(m['skipped'])} skipped")
    c = m["confound"]
    if c.get("cv_auc") is not None:
        print(f"image statistics alone: cross-validated ROC-AUC {c['cv_auc']:.3f}"
              + "".join(f"; WARNING: {w}" for w in c["warnings"]))
    return 0
