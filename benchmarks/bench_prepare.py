"""Prepare throughput: ``brainhpc prepare`` beside a naive single-process PIL loop, in one run.

Both read the same real JPEGs and do the same per-image work (decode to grayscale, background
shift, threshold + largest component bounding box, pad to a square, resize, hash). The naive loop
is what one writes first: PIL decode and resize, scipy.ndimage for the components, one process,
nothing written. ``brainhpc prepare`` additionally finds duplicate groups, splits, and writes the
HDF5 shards, manifest and preview: its images/s counts all of that (wall time of the command).

Data: $BRAINHPC_REAL_DATA or ../shared/datasets/brain-tumor-mri beside the repo (Training/).
Run: python benchmarks/bench_prepare.py [--limit N] [--size 128]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from brainhpc.data.folder import default_workers
from brainhpc.data.layouts import discover
from brainhpc.prepare import PrepareConfig, prepare

REPO = Path(__file__).resolve().parent.parent


def naive_one(path: Path, size: int) -> np.ndarray:
    img = np.asarray(Image.open(path).convert("L"), dtype=np.float32)
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    img = np.clip(img - np.median(border), 0, None)
    fg = ndimage.gaussian_filter(img, 1.0) > img.mean()  # a global threshold
    fg = ndimage.binary_opening(fg, iterations=2)
    labels, n = ndimage.label(fg)
    if n:
        largest = 1 + np.argmax(ndimage.sum(fg, labels, range(1, n + 1)))
        ys, xs = ndimage.find_objects((labels == largest).astype(np.int32))[0]
        img = img[ys, xs]
    side = max(img.shape)
    square = np.zeros((side, side), np.float32)
    square[:img.shape[0], :img.shape[1]] = img
    out = Image.fromarray(square.clip(0, 255).astype(np.uint8)).resize((size, size),
                                                                         Image.Resampling.BOX)
    arr = np.asarray(out)
    hashlib.sha256(path.read_bytes()).hexdigest()
    return arr


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=Path(os.environ.get(
        "BRAINHPC_REAL_DATA", REPO.parent / "shared/datasets/brain-tumor-mri")) / "Training")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--limit", type=int, default=2000, help="naive loop: images timed")
    args = p.parse_args()
    if not args.data.is_dir():
        raise SystemExit(f"bench_prepare: no data at {args.data} (set BRAINHPC_REAL_DATA)")

    files = [args.data / rel for rel, _ in discover(args.data).files]
    rng = np.random.default_rng(0)
    sample = [files[i] for i in rng.permutation(len(files))[:args.limit]]
    t = time.perf_counter()
    for path in sample:
        naive_one(path, args.size)
    naive = len(sample) / (time.perf_counter() - t)

    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        m = prepare(PrepareConfig(out=Path(tmp) / "p", data=args.data, size=args.size,
                                  progress=False))
        ours = (m["total"] + len(m["skipped"])) / (time.perf_counter() - t)

    print(f"prepare throughput at {args.size} px on {len(files)} real images "
          f"({default_workers()} cores, load {os.getloadavg()[0]:.1f}):")
    print(f"  naive PIL loop (1 process, {len(sample)} images, no output): {naive:8.1f} img/s")
    print(f"  brainhpc prepare (end to end, shards written):       {ours:8.1f} img/s")
    print(f"  ratio: {ours / naive:.2f}x  (goal >= 3x on 2 cores)")
    d = m["duplicates"]
    print(f"  duplicate groups: {d['groups']} ({d['exact_groups']} byte-identical, "
          f"{d['grouped_files']} files, largest {d['largest_group']})")


if __name__ == "__main__":
    main()
