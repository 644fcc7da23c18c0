"""The aggregate stage: every cell's numbers in one place, ``RUN_DIR/results/``::

    metrics.csv      one row per planned classify cell (failed/missing ones too, with the error
                     and log path): model, train data, generator, technique, seed, test metrics,
                     n, epochs, wall time, device, code version, config hash
    generators.csv   one row per planned generate cell: FID, KID, memorisation, times
    table.md         the reference study's table shape (mean over seeds) with its numbers beside
                     ours, then the failed cells
    by_train_data.png, proportion.png (only when mixed:<gen>:<p> cells exist)

It reads ``RUN_DIR/plan.json`` (written at submission) for the expected cells, so a cell that
never produced output still gets its row.
"""

from __future__ import annotations

import csv
import io
import json
import statistics
from pathlib import Path

from brainhpc.classify.data import parse_train_spec
from brainhpc.errors import BrainhpcError
from brainhpc.fsio import atomic_path, write_text

# Reference study (Br35H; issue 4): (model, technique, train kind) -> Acc, Prec, Rec, F1 in %.
REFERENCE = {
    ("cnn", None, "real"): (96.67, 95.42, 97.99, 96.69),
    ("cnn", None, "synthetic"): (58.16, 57.53, 56.94, 57.24),
    ("cnn", None, "mixed"): (49.97, 49.98, 99.93, 66.64),
    ("vae", "giaem", "real"): (60.44, 60.95, 67.11, 56.76),
    ("vae", "giaem", "synthetic"): (80.08, 68.26, 66.22, 67.09),
    ("vae", "giaem", "mixed"): (81.24, 69.99, 64.11, 65.95),
    ("vae", "kmeans-global", "real"): (82.93, 73.55, 67.58, 69.66),
    ("vae", "kmeans-global", "synthetic"): (79.39, 68.26, 69.44, 68.80),
    ("vae", "kmeans-global", "mixed"): (78.80, 39.88, 49.27, 44.08),
}
MODEL_NAMES = {None: "CNN", "giaem": "VAE (GIAEM)", "dbscan": "VAE (DBSCAN)",
               "kmeans-single": "VAE (single-image KMeans)", "kmeans-global": "VAE (Global KMeans)"}
METRICS = ("accuracy", "precision", "recall", "f1")
METRIC_COLS = METRICS + ("balanced_accuracy", "roc_auc")
CLASSIFY_COLS = ("cell", "status", "model", "technique", "train_data", "kind", "generator", "p",
                 "seed") + METRIC_COLS + ("n_test", "n_train", "epochs", "steps",
                                          "wall_seconds", "device", "world_size",
                                          "code_version", "config_hash", "error", "log")
GENERATOR_COLS = ("cell", "status", "arch", "label", "epochs", "steps", "n_train", "n_samples",
                  "fid", "kid", "kid_std", "fid_train_vs_heldout", "near_copy_share",
                  "train_seconds", "wall_seconds", "code_version", "error", "log")


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _outcome(folder: Path) -> dict:
    m = _json(folder / "cell.json")
    return {"status": m.get("status", "missing"), "error": m.get("error", ""),
            "log": m.get("log", "")}


def classify_rows(run_dir: Path, cells: list[dict]) -> list[dict]:
    rows = []
    for c in cells:
        folder = run_dir / "classify" / c["id"]
        p = c["params"]
        spec = parse_train_spec(p["train_data"])
        row = {"cell": c["id"], **_outcome(folder), "model": p["model"],
               "technique": p.get("technique") or "", "train_data": str(spec),
               "kind": spec.kind, "generator": spec.generator or "",
               "p": "" if spec.p is None else spec.p, "seed": p.get("seed", 0)}
        m = _json(folder / "metrics.json")
        if row["status"] == "done" and m.get("status") == "done":
            row.update({k: m.get(k) for k in METRIC_COLS})
            row.update(n_test=m.get("n"), n_train=m.get("n_train"), epochs=m.get("epochs"),
                       steps=m.get("steps"), wall_seconds=m.get("wall_seconds"),
                       device=m.get("device"), world_size=m.get("world_size"),
                       code_version=m.get("brainhpc"), config_hash=m.get("config_hash"))
        elif row["status"] == "done":
            row.update(status="failed", error=f"{folder / 'metrics.json'} missing or unfinished")
        rows.append(row)
    return rows


def generator_rows(run_dir: Path, cells: list[dict]) -> list[dict]:
    rows = []
    for c in cells:
        folder = run_dir / "generate" / c["id"]
        row = {"cell": c["id"], **_outcome(folder), "arch": c["params"]["arch"],
               "label": c["params"]["label"]}
        card = _json(folder / "card.json")
        if row["status"] == "done" and card.get("status") == "done":
            q = card.get("quality") or {}
            row.update({k: card.get(k) for k in ("epochs", "n_train", "n_samples",
                                                 "train_seconds", "wall_seconds")})
            row.update(steps=card.get("steps"), code_version=card.get("brainhpc"),
                       near_copy_share=(q.get("memorisation") or {}).get("near_copy_share"),
                       **{k: q.get(k) for k in ("fid", "kid", "kid_std",
                                                "fid_train_vs_heldout")})
        rows.append(row)
    return rows


def write_csv(path: Path, rows: list[dict], cols: tuple[str, ...]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: "" if r.get(k) is None else r.get(k) for k in cols})
    write_text(path, buf.getvalue())


def _fmt(values: list[float]) -> str:
    if not values:
        return "-"
    mean = 100 * statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.2f}"
    return f"{mean:.2f} ± {100 * statistics.stdev(values):.2f}"


def summary_table(rows: list[dict]) -> str:
    """Markdown in the reference table's shape: mean over seeds, reference numbers beside."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["technique"] or None, r["train_data"]), []).append(r)
    lines = ["| Model | Train data | Acc | Prec | Rec | F1 | ROC-AUC | seeds done "
             "| Ref Acc | Ref Prec | Ref Rec | Ref F1 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (model, tech, train), rs in sorted(groups.items(), key=lambda kv: (
            kv[0][0], kv[0][1] or "", kv[0][2])):
        done = [r for r in rs if r["status"] == "done"]
        cells = [_fmt([r[k] for r in done if isinstance(r.get(k), (int, float))])
                 for k in METRICS + ("roc_auc",)]
        ref = REFERENCE.get((model, tech, rs[0]["kind"])) if rs[0]["p"] == "" else None
        refs = [f"{v:.2f}" for v in ref] if ref else ["-"] * 4
        lines.append(f"| {MODEL_NAMES[tech]} | {train} | {' | '.join(cells)} | "
                     f"{len(done)}/{len(rs)} | {' | '.join(refs)} |")
    bad = [r for r in rows if r["status"] != "done"]
    if bad:
        lines += ["", "Cells without results:", ""]
        for r in bad:
            error = r["error"].splitlines()[0] if r["error"] else ""
            log = f" (log: `{r['log']}`)" if r["log"] else ""
            lines.append(f"- `{r['cell']}` ({r['status']}): {error}{log}")
    return "\n".join(lines) + "\n"


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


def plots(rows: list[dict], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r["status"] == "done" and r["f1"] is not None]
    if not done:
        return []
    made = []
    keys = sorted({(MODEL_NAMES[r["technique"] or None], r["train_data"]) for r in done})
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.35 * len(keys) + 1.5), sharey=True)
    for ax, metric in zip(axes, ("accuracy", "f1"), strict=True):
        vals = [statistics.fmean(r[metric] for r in done
                                 if (MODEL_NAMES[r["technique"] or None], r["train_data"]) == k)
                for k in keys]
        ax.barh(range(len(keys)), vals, color="tab:blue")
        ax.set_xlim(0, 1)
        ax.set_xlabel(f"test {metric}")
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(keys)), [f"{m} | {t}" for m, t in keys])
    axes[0].invert_yaxis()
    fig.suptitle("test metrics by training data (mean over seeds)")
    _save(fig, out / "by_train_data.png")
    plt.close(fig)
    made.append("by_train_data.png")
    curve = [r for r in done if r["p"] != ""]
    if curve:
        fig, ax = plt.subplots(figsize=(6, 4))
        for key in sorted({(MODEL_NAMES[r["technique"] or None], r["generator"]) for r in curve}):
            pts = sorted((r["p"], r["f1"]) for r in curve
                         if (MODEL_NAMES[r["technique"] or None], r["generator"]) == key)
            ps = sorted({p for p, _ in pts})
            ax.plot(ps, [statistics.fmean(f for p2, f in pts if p2 == p) for p in ps],
                    marker="o", label=f"{key[0]}, {key[1]}")
        ax.set_xlabel("synthetic fraction p of the training set")
        ax.set_ylabel("test F1")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        _save(fig, out / "proportion.png")
        plt.close(fig)
        made.append("proportion.png")
    return made


def aggregate(run_dir: str | Path) -> dict:
    """Write RUN_DIR/results/ from the plan and whatever the cells left; never fails on a cell."""
    run_dir = Path(run_dir)
    plan = _json(run_dir / "plan.json")
    if not plan:
        raise BrainhpcError(f"{run_dir / 'plan.json'} is missing: not a sweep run directory")
    out = run_dir / "results"
    rows = classify_rows(run_dir, plan.get("classify", []))
    gens = generator_rows(run_dir, plan.get("generate", []))
    write_csv(out / "metrics.csv", rows, CLASSIFY_COLS)
    write_csv(out / "generators.csv", gens, GENERATOR_COLS)
    write_text(out / "table.md", summary_table(rows))
    made = plots(rows, out)
    failed = [r["cell"] for r in rows + gens if r["status"] != "done"]
    return {"status": "done", "rows": len(rows), "generators": len(gens), "failed": failed,
            "plots": made}
