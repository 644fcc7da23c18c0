"""Every number of the aggregate with its interval, and every comparison with a verdict.

Computed from the cells' per-image predictions (``brainhpc.metrics.predictions``), never from
their summary numbers, so nothing is re-trained:

* an **arm** is one model on one kind of training data of one dataset (``cnn`` on ``real``, the
  VAE's ``giaem`` on ``synthetic:vae``, a U-Net on ``mixed:vae``), pooled over its folds and
  seeds: with grouped cross-validation the pooled out-of-fold predictions cover every group
  once per seed. A **baseline** arm (image statistics, brain area, intensity threshold, the
  empty mask) is taken once per fold, from the first finished cell of that fold;
* ``intervals.csv``: each arm's metrics with their 95% group-bootstrap interval
  (``brainhpc.metrics.bootstrap``: 2,000 resamples of duplicate groups or patients, seeded),
  the number of groups, and the spread (standard deviation) of the metric across its folds and
  seeds;
* ``comparisons.csv``: each model arm against the real-data arm of the same model and against
  each baseline of its dataset, by a paired group bootstrap of the difference (for
  segmentation also the ratio to the real-data Dice); verdict better / worse / not resolved.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from brainhpc.fsio import read_json
from brainhpc.metrics import bootstrap
from brainhpc.metrics.bootstrap import CLASSIFY_METRICS, SEGMENT_METRICS, Sample
from brainhpc.metrics.predictions import LOCALISATION, PATIENTS, PREDICTIONS, read_rows

INTERVAL_COLS = ("dataset", "stage", "model", "arm", "train_data", "metric", "value", "lo",
                 "hi", "groups", "n", "runs", "spread")
COMPARISON_COLS = ("dataset", "stage", "model", "arm", "train_data", "metric", "versus",
                   "kind", "value", "lo", "hi", "verdict", "groups")
# predictions arms that are baselines (taken once per fold), by stage
BASELINES = {"classify": ("image statistics", "brain area", "intensity threshold"),
             "segment": ("intensity", "empty"), "localise": ("intensity threshold",)}
# what each stage's arms are compared on ("localise": a VAE detector's localisation.csv)
COMPARED = {"classify": ("balanced_accuracy", "roc_auc"), "segment": ("dice_patient",),
            "localise": ("dice",)}
METRICS = {"classify": CLASSIFY_METRICS, "segment": SEGMENT_METRICS, "localise": ("dice",)}


@dataclass
class Arm:
    """One arm's predictions, per (fold, seed) run."""

    dataset: str
    stage: str
    model: str  # cnn | vae | unet | baseline
    arm: str  # the predictions' arm: cnn, giaem, ..., image statistics, unet, intensity
    train_data: str
    runs: dict = field(default_factory=dict)  # (fold, seed) -> rows (segment: slices, patients)

    @property
    def key(self) -> tuple:
        return (self.dataset, self.stage, self.model, self.arm, self.train_data)

    def rows(self, which: int = 0) -> list[dict]:
        return [r for run in self.runs.values() for r in run[which]]


def _done(folder: Path) -> bool:
    return read_json(folder / "metrics.json").get("status") == "done"


def _cell_files(stage: str, folder: Path) -> dict[str, tuple[list, list]]:
    """arm -> (rows, patient rows) of one finished cell."""
    rows = read_rows(folder / (LOCALISATION if stage == "localise" else PREDICTIONS))
    patients = read_rows(folder / PATIENTS) if stage == "segment" else []
    out: dict[str, tuple[list, list]] = {}
    for r in rows:
        out.setdefault(r["arm"], ([], []))[0].append(r)
    for r in patients:
        out.setdefault(r["arm"], ([], []))[1].append(r)
    return out


def _folders(run_dir: Path, plan: dict, stage: str, c: dict) -> list[tuple[str, Path]]:
    """(what the predictions are of, folder) of one cell: its own test split, and each external
    set (``[[evaluate]]``) of its dataset that scored it ("<dataset> on <set>")."""
    ds = c["params"].get("dataset") or "data"
    out = [(ds, run_dir / stage / c["id"])]
    for ev in plan.get("evaluate", []):
        if (ev["params"].get("dataset") or "data") == ds:
            out.append((f"{ds} on {ev['params']['name']}",
                        run_dir / "evaluate" / ev["id"] / stage / c["id"]))
    return out


def collect(run_dir: Path, plan: dict) -> list[Arm]:
    """Every arm of the run's finished classify and segment cells, on their own test splits
    and on the external sets."""
    arms: dict[tuple, Arm] = {}
    for stage in ("classify", "segment"):
        for c in plan.get(stage, []):
            p = c["params"]
            run = (p.get("fold"), p.get("seed", 0))
            for ds, folder in _folders(run_dir, plan, stage, c):
                if _done(folder):
                    _add(arms, stage, ds, run, p, folder)
                    if (folder / LOCALISATION).exists():  # a VAE detector, masks scored
                        _add(arms, "localise", ds, run, p, folder)
    return list(arms.values())


def _add(arms: dict, stage: str, ds: str, run: tuple, p: dict, folder: Path) -> None:
    """The arms of one finished cell folder's predictions into ``arms``."""
    for name, files in _cell_files(stage, folder).items():
        base = name in BASELINES[stage]
        model = "baseline" if base else p.get("model", "unet")
        arm = Arm(ds, stage, model, name, "real" if base else p["train_data"])
        arm = arms.setdefault(arm.key, arm)
        key = (run[0], None) if base else run
        if key not in arm.runs:
            arm.runs[key] = files


def _samples(arm: Arm, metric: str, runs=None) -> Sample:
    """The arm's rows for ``metric``; for Dice only the units with tumour (Dice defined), so
    the group count is the patients that carry the number."""
    runs = list(arm.runs.values()) if runs is None else runs
    if metric in ("dice_patient", "dice_slice"):
        rows = [r for run in runs for r in run[1 if metric == "dice_patient" else 0]]
        return Sample.of([r for r in rows if np.isfinite(r["dice"])])
    return Sample.of([r for run in runs for r in run[0]])


def _spread(arm: Arm, metric: str) -> float | None:
    """Standard deviation of the metric across the arm's (fold, seed) runs."""
    if len(arm.runs) < 2:
        return None
    values = [bootstrap.estimate(metric, _samples(arm, metric, [run]), resamples=0).value
              for run in arm.runs.values()]
    values = [v for v in values if v is not None]
    return statistics.stdev(values) if len(values) > 1 else None


def _head(arm: Arm) -> dict:
    return {"dataset": arm.dataset, "stage": arm.stage, "model": arm.model, "arm": arm.arm,
            "train_data": arm.train_data}


def interval_rows(arms: list[Arm]) -> list[dict]:
    out = []
    for arm in arms:
        for metric in METRICS[arm.stage]:
            e = bootstrap.estimate(metric, _samples(arm, metric))
            out.append({**_head(arm), "metric": metric, "value": e.value, "lo": e.lo,
                        "hi": e.hi, "groups": e.groups, "n": e.n, "runs": len(arm.runs),
                        "spread": _spread(arm, metric)})
    return out


def _opponents(arm: Arm, arms: list[Arm]) -> list[tuple[Arm, str]]:
    """(other arm, how it is named in the comparison) for one model arm."""
    same = [a for a in arms if a.dataset == arm.dataset and a.stage == arm.stage]
    out = [(a, "real") for a in same if arm.train_data != "real" and a.train_data == "real"
           and a.model == arm.model and a.arm == arm.arm]
    return out + [(a, a.arm) for a in same if a.model == "baseline"]


def comparison_rows(arms: list[Arm]) -> list[dict]:
    out = []
    for arm in (a for a in arms if a.model != "baseline"):
        for other, versus in _opponents(arm, arms):
            for metric in COMPARED[arm.stage]:
                kinds = ("difference", "ratio") if arm.stage == "segment" and versus == "real" \
                    else ("difference",)
                for kind in kinds:
                    e, call = bootstrap.compare(metric, _samples(arm, metric),
                                                _samples(other, metric), ratio=kind == "ratio")
                    out.append({**_head(arm), "metric": metric, "versus": versus, "kind": kind,
                                "value": e.value, "lo": e.lo, "hi": e.hi, "verdict": call,
                                "groups": e.groups})
    return out


def summarise(run_dir: Path, plan: dict) -> tuple[list[dict], list[dict]]:
    """(intervals.csv rows, comparisons.csv rows) of a run."""
    arms = collect(run_dir, plan)
    return interval_rows(arms), comparison_rows(arms)


def finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and bool(np.isfinite(v))


# ------------------------------------------------------------------------------ tables

ARM_NAMES = {"cnn": "CNN", "giaem": "VAE (GIAEM)", "dbscan": "VAE (DBSCAN)",
             "kmeans-single": "VAE (single-image KMeans)", "kmeans-global": "VAE (Global KMeans)",
             "image statistics": "Image statistics (baseline)",
             "brain area": "Brain area (baseline)",
             "intensity threshold": "Intensity threshold (baseline)", "unet": "U-Net",
             "intensity": "Intensity threshold (baseline)", "empty": "Empty mask (baseline)",
             "residual maps": "VAE residual map (ungated)"}


def _ci(row: dict | None, scale: float = 100, digits: int = 1) -> str:
    if not row or not finite(row.get("value")):
        return "-"
    text = f"{scale * row['value']:.{digits}f}"
    if finite(row.get("lo")):
        text += f" [{scale * row['lo']:.{digits}f}, {scale * row['hi']:.{digits}f}]"
    return text


def _verdict(row: dict | None, scale: float = 100, digits: int = 1) -> str:
    """``better (+5.1 [+1.2, +9.0])``: the verdict and the paired interval of the difference."""
    if not row or not finite(row.get("value")):
        return "-"
    if not finite(row.get("lo")):
        return f"not resolved ({scale * row['value']:+.{digits}f})"
    return (f"{row['verdict']} ({scale * row['value']:+.{digits}f} "
            f"[{scale * row['lo']:+.{digits}f}, {scale * row['hi']:+.{digits}f}])")


def _runs(row: dict | None, scale: float = 100, digits: int = 1) -> str:
    """``3 (sd 2.1)``: the arm's runs and the spread of the metric across them."""
    if not row:
        return "-"
    sd = row.get("spread")
    return f"{row['runs']}" + (f" (sd {scale * sd:.{digits}f})" if finite(sd) else "")


def _index(rows: list[dict], *keys) -> dict:
    return {tuple(r.get(k) for k in keys): r for r in rows}


def _order(r: dict) -> tuple:
    base = r["model"] == "baseline"
    return (base, {"cnn": 0, "vae": 1}.get(r["model"], 2), r["arm"],
            {"real": 0}.get(r["train_data"], 1), r["train_data"])


def _arms(intervals: list[dict], ds: str, stage: str) -> list[dict]:
    seen = {}
    for r in intervals:
        if r["dataset"] == ds and r["stage"] == stage:
            seen.setdefault((r["model"], r["arm"], r["train_data"]), r)
    return sorted(seen.values(), key=_order)


def _lookups(intervals: list[dict], comparisons: list[dict], ds: str, stage: str):
    """(arms of a dataset's stage, estimates and comparisons by key, baseline arm names)."""
    arms = _arms(intervals, ds, stage)
    est = _index(intervals, "dataset", "model", "arm", "train_data", "metric")
    cmp = _index(comparisons, "dataset", "model", "arm", "train_data", "metric", "versus",
                 "kind")
    return arms, est, cmp, [a["arm"] for a in arms if a["model"] == "baseline"]


def _classify_table(ds: str, intervals: list[dict], comparisons: list[dict]) -> list[str]:
    arms, est, cmp, bases = _lookups(intervals, comparisons, ds, "classify")
    if not arms:
        return []
    head = ["Model", "Train data", "Bal. acc [95% CI]", "ROC-AUC [95% CI]", "Recall healthy",
            "Recall tumour", "Groups", "Runs (sd)", "vs real (bal. acc)",
            *(f"vs {b} (bal. acc; ROC-AUC)" for b in bases)]
    out = [f"### {ds}: classification with intervals", "", "| " + " | ".join(head) + " |",
           "|" + "---|" * len(head)]
    for a in arms:
        k = (ds, a["model"], a["arm"], a["train_data"])
        cells = [ARM_NAMES.get(a["arm"], a["arm"]), a["train_data"],
                 _ci(est.get((*k, "balanced_accuracy"))),
                 _ci(est.get((*k, "roc_auc")), 1, 3),
                 _ci(est.get((*k, "recall_healthy"))), _ci(est.get((*k, "recall_tumour"))),
                 str(a["groups"]), _runs(est.get((*k, "balanced_accuracy"))),
                 _verdict(cmp.get((*k, "balanced_accuracy", "real", "difference")))]
        for b in bases:
            bal = cmp.get((*k, "balanced_accuracy", b, "difference"))
            auc = cmp.get((*k, "roc_auc", b, "difference"))
            cells.append("-" if not bal else f"{_verdict(bal)}; {auc['verdict'] if auc else '-'}")
        out.append("| " + " | ".join(cells) + " |")
    return out + ["", *NOTE_CLASSIFY, ""]


NOTE_CLASSIFY = (
    "Balanced accuracy and recalls in %, ROC-AUC as a fraction; [95% CI] from 2,000 bootstrap "
    "resamples of duplicate groups / patients (Groups), over the pooled test predictions of the "
    "arm's runs (folds x seeds; with folds, out-of-fold); sd: the spread of balanced accuracy "
    "across those runs. Verdicts: paired group bootstrap of "
    "the difference (points of balanced accuracy) on the groups both arms scored: better / "
    "worse when the whole 95% interval is above / below 0, else not resolved. Baselines are "
    "fitted on the real training split with cuts chosen on validation, like the models; the "
    "majority class scores 50.0 and ROC-AUC 0.5.",)


def _localise_table(ds: str, intervals: list[dict], comparisons: list[dict]) -> list[str]:
    arms, est, cmp, bases = _lookups(intervals, comparisons, ds, "localise")
    if not arms:
        return []
    head = ["Detector", "Train data", "Dice per tumour slice [95% CI]", "Groups", "Runs (sd)",
            "vs real", *(f"vs {b}" for b in bases)]
    out = [f"### {ds}: anomaly localisation with intervals", "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for a in arms:
        k = (ds, a["model"], a["arm"], a["train_data"])
        cells = [ARM_NAMES.get(a["arm"], a["arm"]), a["train_data"],
                 _ci(est.get((*k, "dice")), 1, 3), str(a["groups"]),
                 _runs(est.get((*k, "dice")), 1, 3),
                 _verdict(cmp.get((*k, "dice", "real", "difference")), 1, 3),
                 *(_verdict(cmp.get((*k, "dice", b, "difference")), 1, 3) for b in bases)]
        out.append("| " + " | ".join(cells) + " |")
    return out + ["", "Dice per tumour slice, mean over the slices (technique rows: its "
                  "detected region, 0 on a slice it calls healthy; residual map: thresholded "
                  "at the value chosen on validation masks, on every slice; baseline: "
                  "standardised intensity inside the brain at its validation threshold); "
                  "[95% CI] and verdicts from a (paired) bootstrap over the groups (patients), "
                  "as above.", ""]


def _segment_table(ds: str, intervals: list[dict], comparisons: list[dict]) -> list[str]:
    arms, est, cmp, bases = _lookups(intervals, comparisons, ds, "segment")
    if not arms:
        return []
    head = ["Model", "Train data", "Dice per patient [95% CI]", "Dice per slice [95% CI]",
            "Patients", "Runs (sd)", "Share of real [95% CI]", "vs real",
            *(f"vs {b}" for b in bases)]
    out = [f"### {ds}: segmentation with intervals", "", "| " + " | ".join(head) + " |",
           "|" + "---|" * len(head)]
    for a in arms:
        k = (ds, a["model"], a["arm"], a["train_data"])
        ratio = cmp.get((*k, "dice_patient", "real", "ratio"))
        share = "-" if not ratio else f"{_ci(ratio, 100, 0)}% ({ratio['verdict']} vs 100%)"
        cells = [ARM_NAMES.get(a["arm"], a["arm"]), a["train_data"],
                 _ci(est.get((*k, "dice_patient")), 1, 3),
                 _ci(est.get((*k, "dice_slice")), 1, 3), str(a["groups"]),
                 _runs(est.get((*k, "dice_patient")), 1, 3),
                 share, _verdict(cmp.get((*k, "dice_patient", "real", "difference")), 1, 3),
                 *(_verdict(cmp.get((*k, "dice_patient", b, "difference")), 1, 3)
                   for b in bases)]
        out.append("| " + " | ".join(cells) + " |")
    return out + ["", "Dice per patient: 3-D Dice over each test patient's stacked slices, "
                  "mean over patients; [95% CI] and verdicts from a (paired) bootstrap over "
                  "patients, as above. Share of real: the arm's Dice per patient over the "
                  "real-trained U-Net's on the same patients (Akbar et al. report 80-90%).", ""]


def tables(intervals: list[dict], comparisons: list[dict]) -> str:
    """The interval tables of table.md and the README, from the two CSVs' rows alone."""
    out = []
    for ds in dict.fromkeys(r["dataset"] for r in intervals):
        out += _classify_table(ds, intervals, comparisons)
        out += _localise_table(ds, intervals, comparisons)
        out += _segment_table(ds, intervals, comparisons)
    return "\n".join(out)
