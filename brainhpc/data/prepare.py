"""``brainhpc prepare``: a labelled image folder (or phantom data) -> a prepared HDF5 dataset.

Output, built in a staging folder beside ``--out`` and renamed into place only when whole::

    OUT/train/shard-00000.h5 ...   images N x 1 x H x W uint8 (scaled to [0, 1] on read),
    OUT/val/...  OUT/test/...      labels (0 healthy, 1 tumour), sources, masks (phantom only)
    OUT/manifest.json              counts, duplicate groups, skipped files, shard checksums, config
    OUT/preview.png                a labelled grid of pre-processed training images

Leakage: byte-identical files (SHA-256) and near-duplicates (64-bit perceptual hash of the
pre-processed image, Hamming distance <= NEAR_DUP_BITS) are joined into groups, and a group is
never split across train/val/test. The split is stratified by label and fixed by the seed.
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
from brainhpc.data import layouts, preprocess
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

# Hamming distance (of 64 bits) up to which two pre-processed images count as near-duplicates.
# Measured on the 5,708 shared real slices (hashes have 32 bits set, so distances are even):
# pairs at 0-2 are re-saved copies (median pixel correlation 0.99-1.00), at 4 mostly the same
# scan re-windowed or a neighbouring slice (median 0.93), with no pair across labels; at 6, 40
# pairs join a tumour and a healthy scan, i.e. different patients. 4 is the largest safe value.
NEAR_DUP_BITS = 4
MIN_PER_LABEL = 3  # one image of each label for each split, at least
PREVIEW_IMAGES = 32


@dataclass
class PrepareConfig:
    out: Path
    data: Path | None = None  # a labelled image folder (see brainhpc.data.layouts)
    phantom: int | None = None  # or: this many procedural phantom slices
    size: int = 128
    seed: int = 0
    split: tuple[float, float, float] = (0.7, 0.2, 0.1)
    labels: str | None = None  # "tumour=a,b healthy=c" for layouts that are not auto-detected
    force: bool = False
    workers: int | None = None  # threads; None: every core this process may use
    shard_size: int = DEFAULT_SHARD_SIZE
    near_dup_bits: int = NEAR_DUP_BITS
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
        if self.workers is not None and (not isinstance(self.workers, int) or self.workers < 1):
            raise BrainhpcError(f"prepare: --workers must be an integer >= 1, got {self.workers!r}")
        if self.labels is not None and not isinstance(self.labels, str):
            self.labels = " ".join(self.labels)
        if self.labels and self.data is None:
            raise BrainhpcError("prepare: --labels only applies to --data")
        if self.labels:
            layouts.parse_labels(self.labels)  # fail now, not after scanning the folder

    def identity(self) -> dict:
        """What defines the output: a folder prepared with the same identity is not redone."""
        d = asdict(self)
        for key in ("out", "force", "workers", "progress"):
            d.pop(key)
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
    phash: np.ndarray  # uint64
    images: np.ndarray  # N x 1 x H x W uint8
    masks: np.ndarray | None
    skipped: list[dict] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)
    layout: str = ""


def _gather(cfg: PrepareConfig, workers: int) -> Items:
    size = cfg.size
    if cfg.phantom is not None:
        tasks = [(i, cfg.seed, size) for i in range(cfg.phantom)]
        results = _map(preprocess.process_phantom, tasks, workers, cfg.progress, "phantom")
        procs = [r[0] for r in results]
        masks = np.stack([r[1] for r in results])[:, None]
        labels = np.array([r[2] for r in results], np.int64)
        sources = [r[3] for r in results]
        return Items(sources, labels, [p.sha256 for p in procs],
                     np.array([p.phash for p in procs], np.uint64),
                     np.stack([p.image for p in procs])[:, None], masks, layout="phantom")

    found = layouts.discover(cfg.data, cfg.labels)
    for notice in found.notices:
        log.info("%s", notice)
    root = cfg.data.resolve()
    tasks = [(i, str(root / rel), size) for i, (rel, _) in enumerate(found.files)]
    procs = _map(preprocess.process_file, tasks, workers, cfg.progress, "prepare")
    skipped = list(found.skipped)
    keep = []
    for p, (rel, _) in zip(procs, found.files, strict=True):
        if p.error:
            skipped.append({"source": rel, "reason": p.error})
        else:
            keep.append(p)
    sources = [found.files[p.index][0] for p in keep]
    labels = np.array([found.files[p.index][1] for p in keep], np.int64)
    images = (np.stack([p.image for p in keep])[:, None] if keep
              else np.zeros((0, 1, size, size), np.uint8))
    return Items(sources, labels, [p.sha256 for p in keep],
                 np.array([p.phash for p in keep], np.uint64), images, None, skipped,
                 found.notices, found.layout)


def read_folder(data: str | os.PathLike, size: int, labels: str | None = None,
                workers: int | None = None, progress: bool = False) -> tuple[ShardData, list[dict]]:
    """Pre-process a raw labelled folder in memory (no split, no files written).

    Used to evaluate a trained classifier on another dataset with exactly the same pre-processing.
    """
    cfg = PrepareConfig(out=Path(tempfile.gettempdir()), data=Path(data), size=size,
                        labels=labels, workers=workers, progress=progress)
    items = _gather(cfg, cfg.workers or default_workers())
    if not len(items.labels):
        raise BrainhpcError(f"{data}: no usable images ({len(items.skipped)} skipped)")
    attrs = {"size": size, "source": str(data), "layout": items.layout}
    return ShardData(items.images, items.labels, items.sources, None, attrs), items.skipped


# ----------------------------------------------------------------------------- duplicates

class _Groups:
    """Union-find over image indices."""

    def __init__(self, n: int):
        self.parent = np.arange(n)

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:
            self.parent[i], i = root, self.parent[i]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def ids(self) -> np.ndarray:
        return np.array([self.find(i) for i in range(len(self.parent))])


def near_pairs(hashes: np.ndarray, max_bits: int, block: int = 1024) -> list[tuple[int, int]]:
    """All pairs (i < j) whose 64-bit hashes differ in at most ``max_bits`` bits."""
    h = hashes.astype(np.uint64)
    pairs = []
    for lo in range(0, len(h), block):
        dist = np.bitwise_count(h[lo:lo + block, None] ^ h[None, :])
        ii, jj = np.nonzero(dist <= max_bits)
        ii = ii + lo
        sel = ii < jj
        pairs.extend(zip(ii[sel].tolist(), jj[sel].tolist(), strict=True))
    return pairs


def duplicate_groups(sha: list[str], hashes: np.ndarray, max_bits: int) -> tuple[np.ndarray, dict]:
    """Group ids per image (exact copies and near-duplicates joined) and counts for the manifest."""
    n = len(sha)
    groups = _Groups(n)
    first: dict[str, int] = {}
    exact_members: dict[str, list[int]] = {}
    for i, digest in enumerate(sha):
        exact_members.setdefault(digest, []).append(i)
        if digest in first:
            groups.union(first[digest], i)
        else:
            first[digest] = i
    exact = [m for m in exact_members.values() if len(m) > 1]
    near = near_pairs(hashes, max_bits)
    for i, j in near:
        groups.union(i, j)
    ids = groups.ids()
    _, inverse, sizes = np.unique(ids, return_inverse=True, return_counts=True)
    member_sizes = sizes[inverse]
    stats = {
        "near_dup_threshold_bits": max_bits,
        "exact_groups": len(exact),
        "exact_files": int(sum(len(m) for m in exact)),
        "near_pairs": len(near),
        "groups": int((sizes > 1).sum()),  # all duplicate groups (exact and/or near)
        "grouped_files": int((member_sizes > 1).sum()),
        "largest_group": int(sizes.max()) if n else 0,
    }
    return ids, stats


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

    groups, dup_stats = duplicate_groups(items.sha, items.phash, cfg.near_dup_bits)
    mixed = [g for g in np.unique(groups) if len(set(items.labels[groups == g].tolist())) > 1]
    dup_stats["label_conflicts"] = len(mixed)
    listed = []
    for g in np.unique(groups):
        idx = np.flatnonzero(groups == g)
        if len(idx) > 1:
            listed.append(sorted(items.sources[i] for i in idx))
    split = split_groups(groups, items.labels, cfg.split, cfg.seed)
    log.info("%d images, %d duplicate groups (%d exact), largest %d: kept within one split",
             len(items.labels), dup_stats["groups"], dup_stats["exact_groups"],
             dup_stats["largest_group"])

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
            masks = None if items.masks is None else items.masks[idx]
            paths = write_shards(staging / name, items.images[idx], items.labels[idx],
                                 [items.sources[i] for i in idx], masks,
                                 {**attrs, "split": name}, cfg.shard_size)
            shards += [{"path": p.relative_to(staging).as_posix(), "sha256": sha256_file(p),
                        "images": int(min(cfg.shard_size, len(idx) - j * cfg.shard_size))}
                       for j, p in enumerate(paths)]
        train = split == 0
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
            "duplicates": dup_stats,
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
                                               "or any layout with --labels)")
    src.add_argument("--phantom", type=int, metavar="N", help="N procedural phantom slices")
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
    cfg = PrepareConfig(out=args.out, data=args.data, phantom=args.phantom, size=args.size,
                        seed=args.seed, split=args.split,
                        labels=" ".join(args.labels) if args.labels else None, force=args.force,
                        workers=args.workers, shard_size=args.shard_size,
                        progress=not args.no_progress)
    m = prepare(cfg)
    d = m["duplicates"]
    print(f"{cfg.out}: " + ", ".join(f"{s} {c['total']}" for s, c in m["counts"].items())
          + f"; {d['groups']} duplicate groups ({d['exact_groups']} byte-identical); "
          f"{len(m['skipped'])} skipped")
    return 0
