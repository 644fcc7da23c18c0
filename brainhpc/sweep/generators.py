"""The generator rows of the aggregate: one per generate cell, realism beside its floors.

Every realism number of a card (``brainhpc.metrics.realism``) is printed beside the same
metric for real data against real data (held-out half A vs half B, matched size): a generator
is only as good as its distance to that floor. C2ST is printed with its interval and its control
(two disjoint sets of real images, ideally 0.5). Rows from cards written before these metrics
show ``-`` there; their FID floor is the old one (real train vs held-out in a net fitted to the
train images), marked with a dagger because it does not bound anything.
"""

from __future__ import annotations

from pathlib import Path

from brainhpc.fsio import read_json

GENERATOR_COLS = (
    "dataset", "cell", "status", "arch", "label", "with_masks", "epochs", "steps", "n_train",
    "n_samples", "c2st_auc", "c2st_lo", "c2st_hi", "c2st_control", "precision", "recall",
    "density", "coverage", "precision_trained", "recall_trained", "precision_floor",
    "recall_floor", "kid", "kid_lo", "kid_hi", "kid_std", "kid_floor", "fid", "fid_floor",
    "fid_train_vs_heldout", "spectral", "spectral_floor", "near_copy_share", "nn_corr_median",
    "precision_mode", "train_seconds", "sample_seconds_per_1000", "wall_seconds",
    "code_version", "code_hash", "error", "log")


def realism_cols(q: dict) -> dict:
    """The flat CSV columns of a card's ``quality`` block (old and new cards alike)."""
    c2st = q.get("c2st") or {}
    prdc = q.get("prdc") or {}
    rand, trained = prdc.get("random") or {}, prdc.get("trained") or {}
    floor = prdc.get("floor_random") or {}
    mem = q.get("memorisation") or {}
    return {"c2st_auc": c2st.get("auc"), "c2st_lo": c2st.get("lo"), "c2st_hi": c2st.get("hi"),
            "c2st_control": c2st.get("control_auc"),
            **{k: rand.get(k) for k in ("precision", "recall", "density", "coverage")},
            "precision_trained": trained.get("precision"),
            "recall_trained": trained.get("recall"),
            "precision_floor": floor.get("precision"), "recall_floor": floor.get("recall"),
            **{k: q.get(k) for k in ("kid", "kid_lo", "kid_hi", "kid_std", "kid_floor", "fid",
                                     "fid_floor", "fid_train_vs_heldout", "spectral",
                                     "spectral_floor")},
            "near_copy_share": mem.get("near_copy_share"),
            "nn_corr_median": mem.get("nn_corr_median")}


def generator_rows(run_dir: Path, plan: dict, outcome, dataset, code_hash,
                   train_precision) -> list[dict]:
    """One row per generate cell of ``plan``; the helpers are the aggregate's own (outcome of a
    cell folder, dataset of a cell, code hash and precision of a result)."""
    rows = []
    for c in plan.get("generate", []):
        folder = run_dir / "generate" / c["id"]
        row = {"dataset": dataset(c), "cell": c["id"], **outcome(folder),
               "arch": c["params"]["arch"], "label": c["params"]["label"],
               "with_masks": bool(c["params"].get("with_masks", False))}
        card = read_json(folder / "card.json")
        if row["status"] == "done" and card.get("status") == "done":
            row.update({k: card.get(k) for k in ("epochs", "n_train", "n_samples", "steps",
                                                 "train_seconds", "sample_seconds_per_1000",
                                                 "wall_seconds")})
            row.update(code_version=card.get("brainhpc"), code_hash=code_hash(card),
                       precision_mode=train_precision(card),
                       **realism_cols(card.get("quality") or {}))
        rows.append(row)
    return rows


def _num(value, digits: int = 3) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return "-"
    return f"{value:.{digits}f}"


def _beside(r: dict, key: str, digits: int, floor_key: str | None = None) -> str:
    """``value (floor)``; the old, misleading FID floor gets a dagger."""
    value = _num(r.get(key), digits)
    floor = r.get(floor_key or f"{key}_floor")
    if floor is None and key == "fid" and r.get("fid_train_vs_heldout") is not None:
        return f"{value} ({_num(r['fid_train_vs_heldout'], 1)}†)"
    return value if floor is None else f"{value} ({_num(floor, digits)})"


def _c2st(r: dict) -> str:
    if r.get("c2st_auc") is None:
        return "-"
    ci = (f" [{_num(r['c2st_lo'], 2)}, {_num(r['c2st_hi'], 2)}]"
          if r.get("c2st_lo") is not None else "")
    control = f" ({_num(r['c2st_control'], 2)})" if r.get("c2st_control") is not None else ""
    return f"{_num(r['c2st_auc'], 2)}{ci}{control}"


def _kid(r: dict) -> str:
    if r.get("kid") is None:
        return "-"
    ci = f" [{r['kid_lo']:.3g}, {r['kid_hi']:.3g}]" if r.get("kid_lo") is not None else ""
    floor = f" ({r['kid_floor']:.3g})" if r.get("kid_floor") is not None else ""
    return f"{r['kid']:.3g}{ci}{floor}"


def _pr(r: dict) -> str:
    if r.get("precision") is None:
        return "-"
    floor = (f" ({_num(r['precision_floor'], 2)} / {_num(r['recall_floor'], 2)})"
             if r.get("precision_floor") is not None else "")
    return f"{_num(r['precision'], 2)} / {_num(r['recall'], 2)}{floor}"


NOTE = (
    "Realism against held-out real images of the label; in brackets the floor, the same metric "
    "for two disjoint halves of held-out real data at the same size (what a perfect generator "
    "would score). C2ST: ROC-AUC of a small CNN telling samples from real slices, 95% interval "
    "over groups, the control (two disjoint real sets, ideally 0.50) in brackets; 0.5 = "
    "indistinguishable, 1 = always told apart. Precision / recall (k = 5, Naeem et al. 2020) in "
    "a fixed random-init feature net. KID in the project's feature net (trained "
    "on the train split, not on the images scored), with its group-bootstrap interval. FID in "
    "that net; † marks the old floor (real train vs held-out in a net fitted to those train "
    "images), which does not bound anything. Spectral: mean absolute difference of log radial "
    "power spectra (blur and checkerboards). Near-copies: share of samples whose nearest "
    "training image correlates >= 0.95. See docs/realism.md.")


def generator_table(rows: list[dict]) -> str:
    if not rows:
        return ""
    out = ["### Generators", "", "| Dataset | Generator | Label | Masks | Epochs | C2ST AUC "
           "[95% CI] (control) | Precision / recall (floor) | KID [95% CI] (floor) | "
           "FID (floor) | Spectral (floor) | Near-copies | Train (s) | Status |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        share = r.get("near_copy_share")
        out.append(f"| {r['dataset']} | {r['arch']} | {r['label']} | "
                   f"{'yes' if r.get('with_masks') else 'no'} | {r.get('epochs') or '-'} | "
                   f"{_c2st(r)} | {_pr(r)} | {_kid(r)} | {_beside(r, 'fid', 1)} | "
                   f"{_beside(r, 'spectral', 3)} | "
                   f"{'-' if share is None else f'{100 * share:.1f}%'} | "
                   f"{'-' if r.get('train_seconds') is None else round(r['train_seconds'])} | "
                   f"{r['status']} |")
    return "\n".join(out + ["", NOTE, ""])
