"""The aggregate stage: every cell's numbers in one place, ``RUN_DIR/results/``::

    metrics.csv       one row per classifier result: the CNN of a classify cell, each technique
                      of a VAE cell and its intensity-threshold baseline, plus one "image
                      statistics only" row per dataset; failed/missing cells too, with the error
                      and log path. Balanced accuracy and ROC-AUC lead; per-class recall, the
                      degenerate flag, the reference study's numbers where it has a row, and one
                      column group per external set (``[[evaluate]]``: ``<name>_balanced_accuracy``,
                      ``<name>_roc_auc``, recalls, images dropped as copies of development data)
    segmentation.csv  one row per segment cell: per-patient and per-slice Dice, HD95, detection,
                      the empty-mask and intensity baselines, external sets with masks
    generators.csv    one row per generate cell: FID, KID, memorisation, times
    intervals.csv     every arm (model x training data, pooled over folds and seeds) and
                      baseline with 95% group-bootstrap intervals, from the cells'
                      predictions.csv (``brainhpc.sweep.intervals``)
    comparisons.csv   each arm against the real-data arm and each baseline: paired bootstrap
                      of the difference, verdict better / worse / not resolved
    table.md          the tables a reader needs, baselines beside every model (see ``tables``)
    by_train_data.png, proportion.png, segmentation_proportion.png (when their cells exist)
    figures/<stage>/  the cells' sample grids, real slices, memorisation pairs, VAE error maps and
                      segmentation overlays (PNG copies: results/ stands on its own), and per
                      dataset, fold and label every generator's samples beside real slices
                      (``<dataset>-<fold>-<label>-side-by-side.png``, ``brainhpc.sweep.figures``)
    provenance.json   the sweep file, command, code commit, machine and compute behind them

It reads ``RUN_DIR/plan.json`` (written at submission) for the expected cells, so a cell that
never produced output still gets its row. Cell folders are ``RUN_DIR/<stage>/<cell id>`` (an id
may hold a dataset prefix, ``br35h/cnn-real-s0``); an evaluate cell ``<id>`` keeps the scores of
each classify/segment cell ``<cell>`` in ``RUN_DIR/evaluate/<id>/<stage>/<cell>/metrics.json``.
"""

from __future__ import annotations

import csv
import io
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from brainhpc.data.training import parse_train_spec
from brainhpc.errors import BrainhpcError
from brainhpc.fsio import atomic_path, read_json, write_json, write_text
from brainhpc.sweep import figures, intervals
from brainhpc.sweep.generators import GENERATOR_COLS, generator_table
from brainhpc.sweep.generators import generator_rows as _generator_rows
from brainhpc.sweep.headline import headline

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
# Akbar et al. (Sci Data 2024): synthetic-only segmenters reach 80-90% of real-data Dice.
SEGMENT_REFERENCE = "80-90%"
BASELINE_STATS, BASELINE_INTENSITY = "image statistics only", "intensity threshold"
BASELINE_AREA = "brain area only"
MODEL_NAMES = {None: "CNN", "giaem": "VAE (GIAEM)", "dbscan": "VAE (DBSCAN)",
               "kmeans-single": "VAE (single-image KMeans)",
               "kmeans-global": "VAE (Global KMeans)",
               BASELINE_INTENSITY: "Intensity threshold (baseline)",
               BASELINE_STATS: "Image statistics only (baseline)",
               BASELINE_AREA: "Brain area only (baseline)"}
LEAD = ("balanced_accuracy", "roc_auc", "recall_healthy", "recall_tumour")
METRIC_COLS = LEAD + ("accuracy", "precision", "recall", "f1", "degenerate")
EXTERNAL_METRICS = ("balanced_accuracy", "roc_auc", "recall_healthy", "recall_tumour", "n",
                    "dropped")
CLASSIFY_COLS = ("dataset", "cell", "status", "model", "technique", "train_data", "kind",
                 "generator", "p", "seed", "fold") + METRIC_COLS + (
    "pixel_auprc", "dice", "dice_ungated", "ref_accuracy", "ref_f1", "n_test", "n_train",
    "epochs", "steps",
    "wall_seconds", "device", "precision_mode", "world_size", "code_version", "code_hash",
    "config_hash", "error", "log")
SEGMENT_COLS = ("dataset", "cell", "status", "train_data", "kind", "generator", "p", "seed",
                "fold",
                "dice_patient", "dice_slice", "hd95", "sensitivity", "specificity",
                "empty_dice_patient", "intensity_dice_patient", "n_test_patients", "n_train",
                "epochs", "steps", "wall_seconds", "device", "precision_mode", "code_version",
                "code_hash", "error", "log")
FIXED_COLS = frozenset(CLASSIFY_COLS + SEGMENT_COLS)
def _outcome(folder: Path) -> dict:
    m = read_json(folder / "cell.json")
    return {"status": m.get("status", "missing"), "error": m.get("error", ""),
            "log": m.get("log", "")}


def _dataset(cell: dict) -> str:
    return cell["params"].get("dataset") or "data"


def _code_hash(result: dict) -> str | None:
    """The hash of the brainhpc sources a cell ran (``brainhpc.provenance``), None before."""
    code = result.get("code")
    return code.get("code_hash") if isinstance(code, dict) else None


def _manifest(run_dir: Path, dataset: str, fold: int | None = None) -> dict:
    sub = "" if fold is None else f"f{fold}"
    for folder in (run_dir / "prepare" / dataset / sub / "prepared",
                   run_dir / "prepare" / "data" / sub / "prepared"):
        m = read_json(folder / "manifest.json")
        if m:
            return m
    return {}


def _metrics(block: dict) -> dict:
    """The metric columns of one metrics block (top-level CNN block or a technique's test)."""
    rec = block.get("recall_per_class") or {}
    return {"balanced_accuracy": block.get("balanced_accuracy"), "roc_auc": block.get("roc_auc"),
            "recall_healthy": rec.get("healthy"), "recall_tumour": rec.get("tumour"),
            **{k: block.get(k) for k in ("accuracy", "precision", "recall", "f1",
                                         "degenerate")}}


def _precision(value) -> str | None:
    """The resolved precision's name (cells record a dict: name, requested, reason)."""
    return value.get("name") if isinstance(value, dict) else value


def _train_precision(m: dict) -> str | None:
    """The precision a model trained in (``precision`` in cells from before ``train_precision``,
    where it overwrote the test block's PPV)."""
    return _precision(m.get("train_precision", m.get("precision")))


def _spec_cols(train_data: str) -> dict:
    spec = parse_train_spec(train_data)
    return {"train_data": str(spec), "kind": spec.kind, "generator": spec.generator or "",
            "p": "" if spec.p is None else spec.p}


def _external(run_dir: Path, plan: dict, stage: str, cell: dict) -> list[tuple[str, dict]]:
    """(external set name, its metrics.json for this cell) for every evaluate cell of the
    cell's dataset."""
    out = []
    for ev in plan.get("evaluate", []):
        if _dataset(ev) != _dataset(cell):
            continue
        path = run_dir / "evaluate" / ev["id"] / stage / cell["id"] / "metrics.json"
        out.append((ev["params"]["name"], read_json(path)))
    return out


def _external_cols(name: str, block: dict | None, overlap: dict | None) -> dict:
    if not block:
        return {}
    m = _metrics(block)
    return {f"{name}_{k}": v for k, v in (
        *((k, m[k]) for k in EXTERNAL_METRICS[:4]), ("n", block.get("n")),
        ("dropped", (overlap or {}).get("dropped")))}


def _vae_rows(base: dict, common: dict, p: dict, m: dict, done: bool,
              external: list) -> list[dict]:
    """One row per technique of a VAE cell, and its intensity-threshold baseline row."""
    rows = []
    for tech in p.get("techniques") or ([p["technique"]] if p.get("technique") else []):
        row = {**base, "technique": tech, **common}
        block = ((m.get("techniques") or {}).get(tech) or {}) if done else {}
        if block:
            loc = block.get("localisation") or {}
            row.update(_metrics(block.get("test", {})), n_test=block["test"].get("n"),
                       dice=loc.get("dice_mean"),
                       dice_ungated=(m.get("localisation") or {}).get("best_dice_mean"),
                       pixel_auprc=(m.get("localisation") or {}).get("pixel_auprc"))
            for name, ev in external:
                tblock = (ev.get("techniques") or {}).get(tech) or {}
                maps = ev.get("localisation") or {}
                row.update(_external_cols(name, tblock, ev.get("overlap")),
                           **_external_loc(name, maps.get("pixel_auprc"),
                                           (tblock.get("localisation") or {}).get("dice_mean"),
                                           maps.get("best_dice_mean")))
        rows.append(row)
    intensity = ((m.get("baselines") or {}).get(BASELINE_INTENSITY.replace(" ", "_"))
                 if done else None)
    if intensity:
        loc = intensity.get("localisation") or {}
        row = {**base, "technique": BASELINE_INTENSITY, **common, **_metrics(intensity["test"]),
               "n_test": intensity["test"].get("n"), "pixel_auprc": loc.get("pixel_auprc"),
               "dice": loc.get("best_dice_mean")}
        for name, ev in external:
            ib = ((ev.get("baselines") or {}).get(BASELINE_INTENSITY.replace(" ", "_")) or {})
            eloc = ib.get("localisation") or {}
            row.update(_external_cols(name, ib.get("test"), ev.get("overlap")),
                       **_external_loc(name, eloc.get("pixel_auprc"),
                                       eloc.get("best_dice_mean"), None))
        rows.append(row)
    return rows


def _external_loc(name: str, auprc, dice, ungated) -> dict:
    """A detector's localisation on an external set with masks (evaluate, frozen rules)."""
    cols = {"pixel_auprc": auprc, "dice": dice, "dice_ungated": ungated}
    return {f"{name}_{k}": v for k, v in cols.items() if v is not None}


def _classify_cell_rows(run_dir: Path, plan: dict, c: dict) -> list[dict]:
    """The rows of one classify cell: the CNN's, or each technique's and the baseline's."""
    folder = run_dir / "classify" / c["id"]
    p = c["params"]
    base = {"dataset": _dataset(c), "cell": c["id"], **_outcome(folder), "model": p["model"],
            **_spec_cols(p["train_data"]), "seed": p.get("seed", 0), "fold": p.get("fold")}
    m = read_json(folder / "metrics.json")
    done = base["status"] == "done" and m.get("status") == "done"
    if base["status"] == "done" and not done:
        base.update(status="failed", error=f"{folder / 'metrics.json'} missing or unfinished")
    common = {} if not done else dict(
        n_train=(m.get("n_train") or {}).get("total"), epochs=m.get("epochs"),
        steps=m.get("steps"), wall_seconds=m.get("wall_seconds"), device=m.get("device"),
        precision_mode=_train_precision(m), world_size=m.get("world_size"),
        code_version=m.get("brainhpc"), code_hash=_code_hash(m),
        config_hash=m.get("config_hash"))
    external = _external(run_dir, plan, "classify", c) if done else []
    if p["model"] != "cnn":
        return _vae_rows(base, common, p, m, done, external)
    row = {**base, "technique": "", **common}
    if done:
        row.update(_metrics(m), n_test=m.get("n"))
        for name, ev in external:
            row.update(_external_cols(name, ev, ev.get("overlap")))
    return [row]


def _first_fold(plan: dict, ds: str) -> int | None:
    return next((c["params"].get("fold") for c in plan.get("prepare", [])
                 if (c["params"].get("dataset") or c["id"].split("/")[0]) == ds), None)


def _baseline_rows(run_dir: Path, plan: dict, ds: str) -> list[dict]:
    """The image-statistics (and brain-area) baseline rows of a dataset: one per fold, from the
    first finished classify cell of the fold (cut chosen on validation, as the models' are);
    runs from before those baselines fall back to the manifest's confound check."""
    rows, seen = [], set()
    for c in plan.get("classify", []):
        fold = c["params"].get("fold")
        m = read_json(run_dir / "classify" / c["id"] / "metrics.json")
        if _dataset(c) != ds or fold in seen or m.get("status") != "done":
            continue
        seen.add(fold)
        for key, block in (m.get("baselines") or {}).items():
            name = {"image_statistics": BASELINE_STATS, "brain_area": BASELINE_AREA}.get(key)
            if name and block.get("test"):
                cell = f"{ds}/{key.replace('_', '-')}" + ("" if fold is None else f"-f{fold}")
                rows.append(_baseline_row(ds, cell, name, fold, block["test"]))
    if rows:
        return rows
    stats = (_manifest(run_dir, ds, _first_fold(plan, ds)).get("confound") or {}).get("test")
    return [_baseline_row(ds, f"{ds}/image-statistics", BASELINE_STATS, None, stats)] \
        if stats else []


def _baseline_row(ds: str, cell: str, name: str, fold, block: dict) -> dict:
    return {"dataset": ds, "cell": cell, "status": "done", "model": "baseline",
            "technique": name, "train_data": "real", "kind": "real", "generator": "", "p": "",
            "seed": "", "fold": fold, **_metrics(block), "n_test": block.get("n")}


def classify_rows(run_dir: Path, plan: dict) -> list[dict]:
    """One row per classifier result (see the module docstring), plus the image-statistics
    baseline row of every dataset."""
    rows = [r for c in plan.get("classify", []) for r in _classify_cell_rows(run_dir, plan, c)]
    datasets = list(dict.fromkeys(_dataset(c) for c in plan.get("classify", [])))
    for ds in datasets:
        rows += _baseline_rows(run_dir, plan, ds)
    br35h = {ds for ds in datasets
             if _manifest(run_dir, ds, _first_fold(plan, ds)).get("layout") == "br35h"}
    for r in rows:  # the reference study's numbers are Br35H's: beside Br35H rows only
        ref = REFERENCE.get((r["model"], r.get("technique") or None, r["kind"])) \
            if r.get("p") == "" and r["dataset"] in br35h else None
        if ref:
            r["ref_accuracy"], r["ref_f1"] = ref[0] / 100, ref[3] / 100
    return rows


def segment_rows(run_dir: Path, plan: dict) -> list[dict]:
    rows = []
    for c in plan.get("segment", []):
        folder = run_dir / "segment" / c["id"]
        p = c["params"]
        row = {"dataset": _dataset(c), "cell": c["id"], **_outcome(folder),
               **_spec_cols(p["train_data"]), "seed": p.get("seed", 0), "fold": p.get("fold")}
        m = read_json(folder / "metrics.json")
        if row["status"] == "done" and m.get("status") == "done":
            t = m.get("test", {})
            det = t.get("detection") or {}
            base = m.get("baselines") or {}
            row.update(dice_patient=t.get("dice_patient_mean"),
                       dice_slice=t.get("dice_slice_mean"), hd95=t.get("hd95_mean"),
                       sensitivity=det.get("sensitivity"), specificity=det.get("specificity"),
                       empty_dice_patient=(base.get("empty") or {}).get("dice_patient_mean"),
                       intensity_dice_patient=(base.get("intensity") or {}).get(
                           "dice_patient_mean"),
                       n_test_patients=t.get("n_patients"),
                       n_train=(m.get("n_train") or {}).get("total"), epochs=m.get("epochs"),
                       steps=m.get("steps"), wall_seconds=m.get("wall_seconds"),
                       device=m.get("device"), precision_mode=_train_precision(m),
                       code_version=m.get("brainhpc"), code_hash=_code_hash(m))
            for name, ev in _external(run_dir, plan, "segment", c):
                et = ev.get("test", ev)
                if et.get("dice_patient_mean") is not None:
                    row[f"{name}_dice_patient"] = et.get("dice_patient_mean")
                    row[f"{name}_dice_slice"] = et.get("dice_slice_mean")
        elif row["status"] == "done":
            row.update(status="failed", error=f"{folder / 'metrics.json'} missing or unfinished")
        rows.append(row)
    return rows


def generator_rows(run_dir: Path, plan: dict) -> list[dict]:
    return _generator_rows(run_dir, plan, _outcome, _dataset, _code_hash, _train_precision)


def write_csv(path: Path, rows: list[dict], cols: tuple[str, ...]) -> None:
    extra = sorted({k for r in rows for k in r} - set(cols))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(cols) + extra, extrasaction="ignore",
                       lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: "" if r.get(k) is None else r.get(k) for k in list(cols) + extra})
    write_text(path, buf.getvalue())


# ----------------------------------------------------------------------------------- tables

def _nums(rows: list[dict], key: str) -> list[float]:
    return [r[key] for r in rows if isinstance(r.get(key), (int, float))
            and not isinstance(r.get(key), bool)]


def _fmt(values: list[float], pct: bool = True) -> str:
    if not values:
        return "-"
    k = 100 if pct else 1
    mean = k * statistics.fmean(values)
    d = 1 if pct else 3
    if len(values) == 1:
        return f"{mean:.{d}f}"
    return f"{mean:.{d}f} ± {k * statistics.stdev(values):.{d}f}"


def _groups(rows: list[dict], key) -> list[tuple[tuple, list[dict]]]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(key(r), []).append(r)
    return list(groups.items())


def _external_names(rows: list[dict], suffix: str = "_balanced_accuracy") -> list[str]:
    """The external sets' names, from their ``<name><suffix>`` columns (never a fixed column
    such as segmentation's ``empty_dice_patient`` baseline)."""
    names = []
    for r in rows:
        for k in r:
            if k.endswith(suffix) and k not in FIXED_COLS and k[:-len(suffix)] not in names:
                names.append(k[:-len(suffix)])
    return names


def _order(r: dict) -> tuple:
    tech = r.get("technique") or ""
    rank = {"": 0, BASELINE_INTENSITY: 8, BASELINE_STATS: 9, BASELINE_AREA: 10}.get(tech, 1)
    return (r["dataset"], {"cnn": 0, "vae": 1}.get(r["model"], 2), rank, tech,
            {"real": 0, "synthetic": 1, "mixed": 2}.get(r["kind"], 3), r["train_data"])


def classification_table(rows: list[dict]) -> str:
    """Per dataset: balanced accuracy and ROC-AUC first, recalls, the degenerate count, the
    reference study's accuracy and F1 beside ours, the external sets; baselines as rows."""
    out = []
    for (ds,), ds_rows in _groups(sorted(rows, key=_order), lambda r: (r["dataset"],)):
        # only the sets this dataset's models were scored on (never its own name)
        ext = [n for n in _external_names(ds_rows)
               if any(r.get(f"{n}_balanced_accuracy") not in (None, "") for r in ds_rows)]
        head = ["Model", "Train data", "Bal. acc", "ROC-AUC", "Recall healthy",
                "Recall tumour", "Acc", "F1", "Degenerate", "Done", "Ref Acc", "Ref F1"]
        for name in ext:
            head += [f"{name}: bal. acc", f"{name}: ROC-AUC", f"{name}: dropped"]
        out += [f"### {ds}: test split", "", "| " + " | ".join(head) + " |",
                "|" + "---|" * len(head)]
        for (model, tech, train), rs in _groups(ds_rows, lambda r: (
                r["model"], r.get("technique") or None, r["train_data"])):
            done = [r for r in rs if r["status"] == "done"]
            ref = next(((100 * r["ref_accuracy"], 0, 0, 100 * r["ref_f1"]) for r in rs
                        if isinstance(r.get("ref_accuracy"), (int, float))), None)
            cells = [MODEL_NAMES.get(tech, tech) if model != "baseline" else MODEL_NAMES[tech],
                     train, *(_fmt(_nums(done, k)) if k != "roc_auc" else
                              _fmt(_nums(done, k), pct=False)
                              for k in ("balanced_accuracy", "roc_auc", "recall_healthy",
                                        "recall_tumour", "accuracy", "f1")),
                     str(sum(bool(r.get("degenerate")) for r in done)),
                     f"{len(done)}/{len(rs)}",
                     *((f"{ref[0]:.2f}", f"{ref[3]:.2f}") if ref else ("-", "-"))]
            for name in ext:
                cells += [_fmt(_nums(done, f"{name}_balanced_accuracy")),
                          _fmt(_nums(done, f"{name}_roc_auc"), pct=False),
                          _fmt(_nums(done, f"{name}_dropped"), pct=False).split(".")[0]]
            out.append("| " + " | ".join(cells) + " |")
        out += ["", "Balanced accuracy and recalls in %, ROC-AUC as a fraction. Trivial "
                "baselines: the majority class scores balanced accuracy 50.0 and ROC-AUC 0.5; "
                "a row flagged degenerate predicts one class for >= 95% of the test slices. "
                "Reference columns (Br35H only): the reference study, on its own split, "
                "accuracy and F1 in %.", ""]
    return "\n".join(out)


def _localisation_rows(rows: list[dict], prefix: str, title: str) -> list[str]:
    """One table of localisation columns (``prefix``: "" for the own test split, "<set>_" for
    an external set); [] when no row carries them."""
    keys = [f"{prefix}{k}" for k in ("pixel_auprc", "dice", "dice_ungated")]
    with_loc = [r for r in rows if r["status"] == "done" and
                any(r.get(k) is not None and r.get(k) != "" for k in keys[:2])]
    if not with_loc:
        return []
    out = [title, "", "| Dataset | Detector | Train data | Pixel AUPRC | Dice (mean per slice) | "
           "Residual map Dice, ungated | Done |", "|---|---|---|---|---|---|---|"]
    for (ds, tech, train), rs in _groups(sorted(with_loc, key=_order), lambda r: (
            r["dataset"], r.get("technique"), r["train_data"])):
        out.append(f"| {ds} | {MODEL_NAMES.get(tech, tech)} | {train} | " + " | ".join(
            _fmt(_nums(rs, k), pct=False) for k in keys) + f" | {len(rs)} |")
    return out


def localisation_table(rows: list[dict]) -> str:
    out = _localisation_rows(rows, "", "### Anomaly localisation (test tumour slices)")
    for name in _external_names(rows, "_pixel_auprc"):
        ext = _localisation_rows(rows, f"{name}_", f"### Anomaly localisation on {name} "
                                 "(external tumour slices; thresholds frozen on the "
                                 "detector's own validation split)")
        out += ([""] if out and ext else []) + ext
    if not out:
        return ""
    out += ["", "Pixel AUPRC is the residual map's (the same for every technique of one VAE; "
            "for the baseline, standardised intensity inside the brain); Dice is each "
            "technique's detected region, gated (0 on a tumour slice the technique calls "
            "healthy); the ungated column thresholds the residual map itself at the "
            "validation-chosen value on every slice, as the baseline's Dice does (standardised "
            "intensity inside the brain, threshold chosen on validation). Predicting nothing "
            "scores Dice 0.", ""]
    return "\n".join(out)


def segmentation_table(rows: list[dict]) -> str:
    if not rows:
        return ""
    ext = _external_names(rows, "_dice_patient")
    head = ["Dataset", "Train data", "Dice per patient", "Dice per slice", "HD95 (px)",
            "Sensitivity", "Specificity", "% of real", "Done"]
    head += [f"{n}: Dice per patient" for n in ext]
    out = ["### Segmentation (U-Net, real test patients)", "", "| " + " | ".join(head) + " |",
           "|" + "---|" * len(head)]
    real = {}
    for (ds, train), rs in _groups(rows, lambda r: (r["dataset"], r["train_data"])):
        done = [r for r in rs if r["status"] == "done"]
        if train == "real" and _nums(done, "dice_patient"):
            real[ds] = statistics.fmean(_nums(done, "dice_patient"))
    for (ds, train), rs in _groups(sorted(rows, key=lambda r: (
            r["dataset"], r["kind"] != "real", r["train_data"])),
            lambda r: (r["dataset"], r["train_data"])):
        done = [r for r in rs if r["status"] == "done"]
        dice = _nums(done, "dice_patient")
        share = f"{100 * statistics.fmean(dice) / real[ds]:.0f}%" if dice and real.get(ds) \
            and train != "real" else "-"
        cells = [ds, train, _fmt(dice, pct=False), _fmt(_nums(done, "dice_slice"), pct=False),
                 _fmt(_nums(done, "hd95"), pct=False), _fmt(_nums(done, "sensitivity")),
                 _fmt(_nums(done, "specificity")), share, f"{len(done)}/{len(rs)}"]
        cells += [_fmt(_nums(done, f"{n}_dice_patient"), pct=False) for n in ext]
        out.append("| " + " | ".join(cells) + " |")
    for ds in sorted({r["dataset"] for r in rows}):
        done = [r for r in rows if r["dataset"] == ds and r["status"] == "done"]
        if done:
            out.append(f"| {ds} | baseline: empty mask | "
                       f"{_fmt(_nums(done[:1], 'empty_dice_patient'), pct=False)} | - | - | - "
                       f"| - | - | - |" + " - |" * len(ext))
            out.append(f"| {ds} | baseline: intensity threshold | "
                       f"{_fmt(_nums(done[:1], 'intensity_dice_patient'), pct=False)} | - | - "
                       f"| - | - | - | - |" + " - |" * len(ext))
    out += ["", f"Sensitivity/specificity: slice-level detection (any predicted tumour). "
            f"\"% of real\": synthetic-trained Dice per patient as a share of the real-trained "
            f"one; the reference (Akbar et al. 2024) reports {SEGMENT_REFERENCE}.", ""]
    return "\n".join(out)


def checks(rows: list[dict]) -> str:
    """Plain sentences: does the real-data CNN beat its trivial baselines (learning check)?"""
    out = []
    for ds in sorted({r["dataset"] for r in rows}):
        cnn = [r for r in rows if r["dataset"] == ds and r["model"] == "cnn"
               and r["kind"] == "real" and r["status"] == "done"]
        stats = [r for r in rows if r["dataset"] == ds and r.get("technique") == BASELINE_STATS]
        bal = _nums(cnn, "balanced_accuracy")
        if not bal:
            continue
        b = statistics.fmean(bal)
        base = _nums(stats, "balanced_accuracy")
        verdict = "learns (>= 90%)" if b >= 0.9 else "below the 90% learning check"
        line = (f"- {ds}: CNN trained on real data reaches balanced accuracy {100 * b:.1f}% on "
                f"the test split: {verdict}; majority class 50.0%")
        if base:
            line += f", image statistics only {100 * statistics.fmean(base):.1f}%"
        out.append(line + ".")
    return "\n".join(["### Learning check", "", *out, ""]) if out else ""


def code_versions(rows: list[dict]) -> str:
    """Which code made these numbers: one line, or a warning listing the versions."""
    hashes: dict[str, list[str]] = {}
    for r in rows:
        if r.get("status") == "done" and r.get("code_hash"):
            hashes.setdefault(r["code_hash"], []).append(r["cell"])
    if not hashes:
        return ""
    if len(hashes) == 1:
        return f"All {len(next(iter(hashes.values())))} cells ran code {next(iter(hashes))}.\n"
    lines = [f"- `{h}`: {len(cells)} cells, e.g. `{cells[0]}`" for h, cells in hashes.items()]
    return "\n".join([f"**Warning: these results come from {len(hashes)} code versions** "
                      "(hash of the brainhpc sources; `python -m brainhpc.sweep FILE "
                      "--rerun-stale` re-runs the cells of older code):", *lines, ""])


def interval_section(ivals: list[dict], comps: list[dict]) -> str:
    text = intervals.tables(ivals, comps)
    return f"## With intervals and verdicts\n\n{text}" if text else ""


def tables(rows: list[dict], seg: list[dict], gens: list[dict], name: str = "",
           ivals: list[dict] = (), comps: list[dict] = ()) -> str:
    bad = [r for r in rows + seg + gens if r["status"] not in ("done",)
           and r.get("model") != "baseline"]
    parts = [f"# Results{f' of {name}' if name else ''}", "", code_versions(rows + seg + gens),
             checks(rows), headline(rows, list(ivals), list(comps)),
             interval_section(list(ivals), list(comps)),
             "## Classification (per cell: mean ± sd over runs)", "",
             classification_table(rows), localisation_table(rows),
             segmentation_table(seg), generator_table(gens)]
    if bad:
        parts += ["## Cells without results", ""]
        seen = set()
        for r in bad:
            if r["cell"] in seen:
                continue
            seen.add(r["cell"])
            error = r.get("error", "").splitlines()[0] if r.get("error") else ""
            log = f" (log: `{r['log']}`)" if r.get("log") else ""
            parts.append(f"- `{r['cell']}` ({r['status']}): {error}{log}")
    return "\n".join(p for p in parts if p is not None) + "\n"



# ------------------------------------------------------------------------------------ plots

def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


def _bars(ivals: list[dict], rows: list[dict]) -> dict[str, dict]:
    """label -> {metric: (value, lo, hi)}: the intervals when the run has predictions, else
    the mean over runs (no interval)."""
    out: dict[str, dict] = {}
    for r in ivals:
        if r["stage"] == "classify" and r["metric"] in ("balanced_accuracy", "roc_auc"):
            label = (f"{r['dataset']} | {intervals.ARM_NAMES.get(r['arm'], r['arm'])} | "
                     f"{r['train_data']}")
            out.setdefault(label, {})[r["metric"]] = (r.get("value"), r.get("lo"), r.get("hi"))
    if out:
        return out
    for r in rows:
        if r["status"] == "done" and r.get("balanced_accuracy") is not None:
            label = (f"{r['dataset']} | {MODEL_NAMES.get(r.get('technique') or None)} | "
                     f"{r['train_data']}")
            for metric in ("balanced_accuracy", "roc_auc"):
                out.setdefault(label, {}).setdefault(metric, []).extend(_nums([r], metric))
    return {k: {m: (statistics.fmean(v) if v else None, None, None) for m, v in d.items()}
            for k, d in out.items()}


def _bar_plot(plt, bars: dict, path: Path, with_ci: bool) -> None:
    keys = sorted(bars)
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.32 * len(keys) + 1.5), sharey=True)
    for ax, metric in zip(axes, ("balanced_accuracy", "roc_auc"), strict=True):
        got = [bars[k].get(metric, (None, None, None)) for k in keys]
        vals = [v if intervals.finite(v) else 0 for v, _, _ in got]
        err = [[max(v - lo, 0) if intervals.finite(lo) else 0 for v, (_, lo, _) in
                zip(vals, got, strict=True)],
               [max(hi - v, 0) if intervals.finite(hi) else 0 for v, (_, _, hi) in
                zip(vals, got, strict=True)]]
        ax.barh(range(len(keys)), vals, xerr=err if with_ci else None, color="tab:blue",
                ecolor="black", capsize=2)
        ax.axvline(0.5, color="grey", lw=1, ls="--")  # chance / majority class
        ax.set_xlim(0, 1)
        ax.set_xlabel(f"test {metric.replace('_', ' ')}")
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(keys)), keys, fontsize=7)
    axes[0].invert_yaxis()
    fig.suptitle("test balanced accuracy and ROC-AUC by training data ("
                 + ("pooled over folds and seeds; bars: 95% group-bootstrap interval"
                    if with_ci else "mean over runs, no interval") + "; dashed: chance)")
    _save(fig, path)
    plt.close(fig)


def _curve_points(curve: list[dict], key: tuple, metric: str, what: str) -> list[tuple]:
    return [(0.0 if r["kind"] == "real" else float(r["p"]), r.get(metric)) for r in curve
            if r["dataset"] == key[0] and (r["kind"] == "real" or r["generator"] == key[2])
            and (what == "segmenter" or MODEL_NAMES.get(r.get("technique") or None) == key[1])
            and r.get(metric) is not None]


def _curve_ci(ivals: list[dict], key: tuple, p: float, metric: str, what: str):
    """(lo, hi) of a proportion-curve point from intervals.csv, or None."""
    stage, want = ("segment", "dice_patient") if what == "segmenter" else \
        ("classify", metric)
    for r in ivals:
        if r["stage"] != stage or r["metric"] != want or r["dataset"] != key[0]:
            continue
        spec = parse_train_spec(r["train_data"])
        point = 0.0 if spec.kind == "real" else spec.p
        name = "U-Net" if stage == "segment" else intervals.ARM_NAMES.get(r["arm"], r["arm"])
        name = {"CNN": MODEL_NAMES[None]}.get(name, name)
        if point == p and (spec.kind == "real" or spec.generator == key[2]) and \
                (what == "segmenter" or name == key[1]) and intervals.finite(r.get("lo")):
            return r["lo"], r["hi"]
    return None


def _curve_plot(plt, what: str, data: list[dict], metric: str, path: Path,
                ivals: list[dict]) -> bool:
    curve = [r for r in data if r["p"] != "" or r["kind"] == "real"]
    if not any(r["p"] != "" for r in curve):
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in sorted({(r["dataset"], MODEL_NAMES.get(r.get("technique") or None, "U-Net")
                        if what == "classifier" else "U-Net",
                        r["generator"]) for r in curve if r["p"] != ""}):
        pts = _curve_points(curve, key, metric, what)
        ps = sorted({p for p, _ in pts})
        ys = [statistics.fmean(v for p2, v in pts if p2 == p) for p in ps]
        cis = [_curve_ci(ivals, key, p, metric, what) for p in ps]
        err = [[max(y - c[0], 0) if c else 0 for y, c in zip(ys, cis, strict=True)],
               [max(c[1] - y, 0) if c else 0 for y, c in zip(ys, cis, strict=True)]]
        ax.errorbar(ps, ys, yerr=err if any(cis) else None, marker="o", capsize=3,
                    label=f"{key[0]}: {key[1]}, {key[2]}")
    ax.set_xlabel("synthetic fraction p of the training set (0 = real only)")
    ax.set_ylabel(f"test {metric.replace('_', ' ')}"
                  + (" (bars: 95% group-bootstrap interval)" if ivals else ""))
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, path)
    plt.close(fig)
    return True


def plots(rows: list[dict], seg: list[dict], out: Path, ivals: list[dict] = ()) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ivals, made = list(ivals), []
    bars = _bars(ivals, rows)
    if bars:
        _bar_plot(plt, bars, out / "by_train_data.png", with_ci=bool(ivals))
        made.append("by_train_data.png")
    done = [r for r in rows if r["status"] == "done" and r.get("balanced_accuracy") is not None]
    for what, data, metric, file in (
            ("classifier", done, "balanced_accuracy", "proportion.png"),
            ("segmenter", [r for r in seg if r["status"] == "done"], "dice_patient",
             "segmentation_proportion.png")):
        if _curve_plot(plt, what, data, metric, out / file, ivals):
            made.append(file)
    return made


# ------------------------------------------------------------------ provenance and reports

def provenance(run_dir: Path) -> dict:
    """What made these results: the sweep file and command, the code's commit, the machine,
    and the compute the cells took (sum of their cell walls; the run's own span)."""
    import os
    import platform
    import subprocess

    from brainhpc import __version__
    from brainhpc.sweep.resources import REPO

    sweep = read_json(run_dir / "sweep.json")
    commit = dirty = None
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"],
                                capture_output=True, text=True, timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "-C", str(REPO), "status", "--porcelain",
                                     "--untracked-files=no"], capture_output=True, text=True,
                                    timeout=10).stdout.strip()) if commit else None
    except (OSError, subprocess.SubprocessError):
        pass
    cpu = ""
    try:
        cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                    if line.startswith("model name")), "")
    except OSError:
        pass
    walls, starts, ends = [], [], []
    for marker in run_dir.glob("*/**/cell.json"):
        m = read_json(marker)
        wall = m.get("wall_seconds_total", m.get("wall_seconds"))  # all attempts
        if m.get("status") == "done" and isinstance(wall, (int, float)):
            walls.append(wall)
            starts.append(m.get("started") or 0)
            ends.append(m.get("finished") or 0)
    source = sweep.get("source", "")
    try:
        shown = str(Path(source).relative_to(REPO))
    except ValueError:
        shown = source
    return {"sweep": sweep.get("name"), "sweep_file": source,
            "command": f"python -m brainhpc.sweep {shown}" if source else None,
            "commit": commit, "uncommitted_changes": dirty, "brainhpc": __version__,
            "machine": {"cpu": cpu, "cpus": os.cpu_count(), "platform": platform.platform()},
            "cells_done": len(walls), "cell_wall_seconds_sum": round(sum(walls), 1),
            "span_seconds": round(max(ends) - min(starts), 1) if walls else None}


def _typed(value: str):
    """A CSV cell back to what the aggregate wrote: None, a bool, an int, a float or text."""
    if value in ("", None):
        return None
    if value in ("True", "False"):
        return value == "True"
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def read_rows(path: Path, keep: tuple[str, ...] = ("seed", "p")) -> list[dict]:
    """A results CSV back as row dicts with numbers (``keep`` columns stay as written)."""
    if not path.exists():
        return []
    with path.open() as f:
        return [{k: (v if k in keep else _typed(v)) for k, v in r.items()}
                for r in csv.DictReader(f)]


def report(results: str | Path) -> str:
    """The README's tables, rendered from a results folder's CSVs alone (so a test can check
    that the README shows exactly what ``results/metrics.csv`` holds)."""
    results = Path(results)
    text = ("seed", "p", "train_data", "kind", "generator", "technique", "model", "dataset",
            "cell", "status")  # as written: the tables group and sort on them
    rows = read_rows(results / "metrics.csv", keep=text)
    if not rows:
        raise BrainhpcError(f"{results / 'metrics.csv'} is missing or empty")
    seg = read_rows(results / "segmentation.csv", keep=text)
    gens = read_rows(results / "generators.csv")
    ivals = read_rows(results / "intervals.csv", keep=text + ("arm", "stage", "metric"))
    comps = read_rows(results / "comparisons.csv",
                      keep=text + ("arm", "stage", "metric", "versus", "kind", "verdict"))
    parts = [checks(rows), headline(rows, ivals, comps), interval_section(ivals, comps),
             classification_table(rows),
             localisation_table(rows), segmentation_table(seg), generator_table(gens)]
    return "\n".join(p for p in parts if p).rstrip() + "\n"


FIGURES = {"generate": ("samples.png", "real.png", "memorisation.png"),
           "classify": ("error_maps.png",), "segment": ("overlays.png",)}


def collect_figures(run_dir: Path, plan: dict, out: Path) -> list[str]:
    """The cells' PNGs a reader looks at (sample grids beside real slices, memorisation pairs,
    VAE error maps, segmentation overlays) copied to ``out/figures/<stage>/<cell>-<name>``:
    results/ is then complete on its own, without checkpoints or shards."""
    from brainhpc.fsio import write_bytes

    made = []
    for stage, names in FIGURES.items():
        for c in plan.get(stage, []):
            for name in names:
                src = run_dir / stage / c["id"] / name
                if src.is_file():
                    rel = f"figures/{stage}/{c['id'].replace('/', '-')}-{name}"
                    write_bytes(out / rel, src.read_bytes())
                    made.append(rel)
    return made


@dataclass
class AggregateConfig:
    """The aggregate cell of a sweep run (``brainhpc.stages``): ``RUN_DIR/results`` from the
    run's cells; ``name`` is the sweep's (it heads the tables)."""

    stage: ClassVar[str] = "aggregate"
    run_dir: Path
    name: str = ""


def aggregate_cell(cfg: AggregateConfig) -> dict:
    return aggregate(cfg.run_dir)


def aggregate(run_dir: str | Path) -> dict:
    """Write RUN_DIR/results/ from the plan and whatever the cells left; never fails on a cell."""
    run_dir = Path(run_dir)
    plan = read_json(run_dir / "plan.json")
    if not plan:
        raise BrainhpcError(f"{run_dir / 'plan.json'} is missing: not a sweep run directory")
    out = run_dir / "results"
    rows = classify_rows(run_dir, plan)
    seg = segment_rows(run_dir, plan)
    gens = generator_rows(run_dir, plan)
    ivals, comps = intervals.summarise(run_dir, plan)
    write_csv(out / "metrics.csv", rows, CLASSIFY_COLS)
    write_csv(out / "generators.csv", gens, GENERATOR_COLS)
    if seg:
        write_csv(out / "segmentation.csv", seg, SEGMENT_COLS)
    write_csv(out / "intervals.csv", ivals, intervals.INTERVAL_COLS)
    write_csv(out / "comparisons.csv", comps, intervals.COMPARISON_COLS)
    name = (read_json(run_dir / "sweep.json") or {}).get("name", "")
    write_text(out / "table.md", tables(rows, seg, gens, name, ivals, comps))
    made = (plots(rows, seg, out, ivals) + collect_figures(run_dir, plan, out)
            + figures.side_by_side(run_dir, plan, out))

    write_json(out / "provenance.json", provenance(run_dir))
    failed = sorted({r["cell"] for r in rows + seg + gens
                     if r["status"] != "done" and r.get("model") != "baseline"})
    return {"status": "done", "rows": len(rows), "segment_rows": len(seg),
            "generators": len(gens), "failed": failed, "plots": made}
