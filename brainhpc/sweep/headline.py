"""The headline tables: the reference study's Table 1 layout (method x training data), each of
our numbers with its interval and a verdict against the reference's number and against the
trivial baselines, and the U-Net's share of the real-data Dice against the synthetic-data bar.

Built from the rows of ``metrics.csv`` (the reference's numbers, which ``aggregate`` puts beside
Br35H rows only), ``intervals.csv`` and ``comparisons.csv`` alone, so ``report`` renders them
from a committed results folder exactly as ``aggregate`` did.

A verdict against a published number treats that number as fixed (it has no interval we could
use): ``better`` / ``worse`` when our whole 95% interval lies above / below it, else ``not
resolved``. Against a baseline it is the paired group-bootstrap verdict of ``comparisons.csv``.
"""

from __future__ import annotations

from brainhpc.sweep.intervals import ARM_NAMES, _ci, _index, _verdict, finite

# the reference's rows first, in its order; our other techniques after them
ARM_ORDER = ("cnn", "giaem", "kmeans-global", "dbscan", "kmeans-single")
SHARE_BAR = 0.85  # the synthetic-only U-Net's target share of the real Dice (Akbar et al.)


def against(value: float | None, lo, hi) -> str:
    """``better`` / ``worse`` when the interval [lo, hi] lies wholly above / below ``value``."""
    if value is None or not (finite(lo) and finite(hi)):
        return "-"
    return "better" if lo > value else "worse" if hi < value else "not resolved"


def _references(rows: list[dict]) -> dict[tuple, tuple[float, float]]:
    """(dataset, arm, train_data) -> the reference's (accuracy, F1), fractions."""
    out = {}
    for r in rows:
        if finite(r.get("ref_accuracy")):
            arm = r.get("technique") or "cnn"
            out[(r["dataset"], arm, r["train_data"])] = (r["ref_accuracy"], r.get("ref_f1"))
    return out


def _data_order(train_data: str) -> tuple:
    kind = train_data.split(":")[0]
    return ({"real": 0, "synthetic": 1, "mixed": 2}.get(kind, 3), train_data.count(":"),
            train_data)


def _model_arms(intervals: list[dict], ds: str, stage: str) -> list[tuple[str, str, str]]:
    seen = {(r["model"], r["arm"], r["train_data"]) for r in intervals
            if r["dataset"] == ds and r["stage"] == stage and r["model"] != "baseline"}
    rank = {a: i for i, a in enumerate(ARM_ORDER)}
    return sorted(seen, key=lambda k: (rank.get(k[1], len(rank)), k[1], _data_order(k[2])))


def _bases(intervals: list[dict], ds: str, stage: str) -> list[str]:
    return sorted({r["arm"] for r in intervals if r["dataset"] == ds and r["stage"] == stage
                   and r["model"] == "baseline"})


def classify_headline(ds: str, rows: list[dict], intervals: list[dict],
                      comparisons: list[dict]) -> list[str]:
    arms = _model_arms(intervals, ds, "classify")
    if not arms:
        return []
    refs = _references(rows)
    est = _index(intervals, "dataset", "model", "arm", "train_data", "metric")
    cmp = _index(comparisons, "dataset", "model", "arm", "train_data", "metric", "versus",
                 "kind")
    bases = _bases(intervals, ds, "classify")
    head = ["Method", "Training data", "Reference acc. (F1)", "Bal. acc [95% CI]",
            "ROC-AUC [95% CI]", "vs reference", *(f"vs {b}" for b in bases)]
    out = [f"### {ds}: classification in the reference's Table 1 layout", "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for model, arm, train in arms:
        k = (ds, model, arm, train)
        bal = est.get((*k, "balanced_accuracy")) or {}
        ref = refs.get((ds, arm, train))
        ref_text = "-" if not ref else f"{100 * ref[0]:.2f}" + (
            f" ({100 * ref[1]:.2f})" if finite(ref[1]) else "")
        cells = [ARM_NAMES.get(arm, arm), train, ref_text, _ci(bal or None),
                 _ci(est.get((*k, "roc_auc")), 1, 3),
                 against(ref[0] if ref else None, bal.get("lo"), bal.get("hi")),
                 *(_verdict(cmp.get((*k, "balanced_accuracy", b, "difference")))
                   for b in bases)]
        out.append("| " + " | ".join(cells) + " |")
    return out + ["", "Reference (Br35H only): the reference study's accuracy and F1 (%, its "
                  "own split of Br35H at 128 px). Ours: balanced accuracy (%) and ROC-AUC over "
                  "every test group of the arm's folds, 95% group-bootstrap intervals. vs "
                  "reference: "
                  "better / worse when our whole interval lies above / below its accuracy, else "
                  "not resolved. vs a baseline: the paired verdict of the difference in "
                  "balanced accuracy (points, with its interval).", ""]


def segment_headline(ds: str, intervals: list[dict], comparisons: list[dict]) -> list[str]:
    arms = _model_arms(intervals, ds, "segment")
    if not arms:
        return []
    est = _index(intervals, "dataset", "model", "arm", "train_data", "metric")
    cmp = _index(comparisons, "dataset", "model", "arm", "train_data", "metric", "versus",
                 "kind")
    bases = _bases(intervals, ds, "segment")
    head = ["Method", "Training data", "Dice per patient [95% CI]", "Share of real [95% CI]",
            f"vs {100 * SHARE_BAR:.0f}% of real", *(f"vs {b}" for b in bases)]
    out = [f"### {ds}: segmentation, with intervals", "", "| " + " | ".join(head) + " |",
           "|" + "---|" * len(head)]
    for model, arm, train in arms:
        k = (ds, model, arm, train)
        ratio = cmp.get((*k, "dice_patient", "real", "ratio")) or {}
        cells = [ARM_NAMES.get(arm, arm), train, _ci(est.get((*k, "dice_patient")), 1, 3),
                 _ci(ratio or None, 100, 0),
                 against(SHARE_BAR, ratio.get("lo"), ratio.get("hi")),
                 *(_verdict(cmp.get((*k, "dice_patient", b, "difference")), 1, 3)
                   for b in bases)]
        out.append("| " + " | ".join(cells) + " |")
    return out + ["", "Share of real: the arm's Dice per patient over the real-trained "
                  "U-Net's on the same patients, paired bootstrap over patients. vs "
                  f"{100 * SHARE_BAR:.0f}%: better / worse when the whole interval of the share "
                  "lies above / below it (the bar for synthetic data: Akbar et al. report "
                  "80-90%), else not resolved.", ""]


def headline(rows: list[dict], intervals: list[dict], comparisons: list[dict]) -> str:
    """The headline tables of every dataset with interval rows ("" when there are none)."""
    out = []
    for ds in dict.fromkeys(r["dataset"] for r in intervals):
        if " on " in ds:  # an external set: its tables are in the interval section
            continue
        out += classify_headline(ds, rows, intervals, comparisons)
        out += segment_headline(ds, intervals, comparisons)
    return "## Headline\n\n" + "\n".join(out) if out else ""
