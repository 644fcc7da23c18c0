"""Every number with its error bar: grouped folds, predictions files, group-bootstrap intervals,
paired verdicts, fair baselines; unit tests on planted data and one run through the sweep."""

import csv
import json

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from brainhpc.data.split import fold_split, group_names
from brainhpc.errors import BrainhpcError
from brainhpc.metrics.bootstrap import Sample, compare, estimate

# ------------------------------------------------------------------------------ bootstrap


def _planted(n_groups=120, per=5, shift=1.0, seed=0, noise=1.0):
    """Images in groups of ``per`` near-copies (one draw per group): label, score, decision."""
    rng = np.random.default_rng(seed)
    y = np.repeat(rng.integers(0, 2, n_groups), per)
    base = np.repeat(rng.normal(0, noise, n_groups), per)
    score = shift * y + base + rng.normal(0, 0.05, len(y))
    groups = np.repeat(np.arange(n_groups).astype(str), per).astype(object)
    return groups, y.astype(float), score


def _sample(groups, y, score, cut=0.5):
    return Sample(groups, y, score, (score > cut).astype(float))


def test_point_estimates_are_the_usual_metrics():
    g, y, s = _planted()
    sample = _sample(g, y, s)
    assert estimate("roc_auc", sample).value == pytest.approx(roc_auc_score(y, s))
    assert estimate("balanced_accuracy", sample).value == pytest.approx(
        balanced_accuracy_score(y, s > 0.5))
    e = estimate("recall_tumour", sample)
    assert e.value == pytest.approx(((s > 0.5) & (y == 1)).sum() / (y == 1).sum())
    assert e.groups == 120 and e.n == 600
    assert e.lo < e.value < e.hi


def test_planted_difference_is_better_identical_arms_not_resolved():
    g, y, s = _planted(shift=2.0)
    rng = np.random.default_rng(1)
    good = _sample(g, y, s)
    bad = _sample(g, y, s + rng.normal(0, 2.0, len(s)))  # the same images, a noisier model
    for metric in ("roc_auc", "balanced_accuracy"):
        diff, call = compare(metric, good, bad)
        assert call == "better" and diff.lo > 0, (metric, diff)
        assert compare(metric, bad, good)[1] == "worse"
        same, call = compare(metric, good, good)
        assert call == "not resolved" and same.value == 0


def test_interval_shrinks_as_groups_are_added():
    widths = []
    for n in (30, 120, 480):
        e = estimate("roc_auc", _sample(*_planted(n_groups=n, shift=0.8)))
        widths.append(e.hi - e.lo)
    assert widths[0] > widths[1] > widths[2]


def test_copies_do_not_narrow_the_interval():
    """Resampling groups: five copies of each scan give the interval of one copy each, where
    resampling images would pretend five times the data."""
    g, y, s = _planted(per=5)
    grouped = estimate("balanced_accuracy", _sample(g, y, s))
    ungrouped = estimate("balanced_accuracy", _sample(np.arange(len(g)).astype(str).astype(object),
                                                      y, s))
    one = estimate("balanced_accuracy", _sample(g[::5], y[::5], s[::5]))
    assert (grouped.hi - grouped.lo) > 1.8 * (ungrouped.hi - ungrouped.lo)
    assert (grouped.hi - grouped.lo) == pytest.approx(one.hi - one.lo, rel=0.3)


def test_compare_pairs_on_common_groups_and_ratio():
    g, y, s = _planted()
    dice = np.clip(0.5 + 0.1 * s, 0, 1)
    a = Sample(g, dice=dice)
    b = Sample(g[: len(g) // 2], dice=dice[: len(g) // 2] * 0.5)  # half the patients scored
    diff, call = compare("dice_patient", a, b)
    assert diff.groups == 60 and call == "better"
    ratio, call = compare("dice_patient", b, a, ratio=True)
    assert ratio.value == pytest.approx(0.5) and call == "worse"


def test_dice_mean_ignores_empty_truth():
    s = Sample(np.array(["a", "b", "c"], dtype=object), dice=np.array([0.2, np.nan, 0.6]))
    assert estimate("dice_slice", s).value == pytest.approx(0.4)


# ------------------------------------------------------------------------------ folds

def _patients(n=60, slices=6, seed=0):
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(n), slices)
    labels = rng.integers(0, 2, len(groups))  # slices of one patient carry both labels
    return groups, labels


def test_folds_keep_groups_whole_and_cover_everything_once():
    groups, labels = _patients()
    tested = np.zeros(len(groups), int)
    for fold in range(5):
        split = fold_split(groups, labels, 5, fold, (0.7, 0.2, 0.1), seed=0)
        for g in np.unique(groups):
            assert len(set(split[groups == g].tolist())) == 1, f"group {g} cut in fold {fold}"
        for k in (0, 1, 2):
            assert set(labels[split == k].tolist()) == {0, 1}
        tested += split == 2
        share = (split == 2).mean()
        assert 0.15 < share < 0.25
    assert (tested == 1).all()  # disjoint test parts that cover every image


def test_folds_depend_on_groups_and_seed_only():
    groups, labels = _patients()
    a = fold_split(groups, labels, 5, 2, (0.7, 0.2, 0.1), seed=3)
    b = fold_split(groups, labels, 5, 2, (0.7, 0.2, 0.1), seed=3)
    assert (a == b).all()
    assert not (a == fold_split(groups, labels, 5, 2, (0.7, 0.2, 0.1), seed=4)).all()
    with pytest.raises(BrainhpcError, match="fold 5 is not one of 0..4"):
        fold_split(groups, labels, 5, 5, (0.7, 0.2, 0.1), seed=0)


def test_group_names_are_the_first_source():
    names = group_names(np.array([7, 3, 7, 3]), ["b.png", "d.png", "a.png", "c.png"])
    assert names == ["a.png", "c.png", "a.png", "c.png"]


def _prepared_folds(tmp_path, size):
    from brainhpc.data.shards import load_split
    from brainhpc.prepare import PrepareConfig, prepare

    tests = []
    for fold in range(3):
        out = tmp_path / f"p{size}-f{fold}"
        prepare(PrepareConfig(out=out, phantom=90, size=size, seed=1, folds=3, fold=fold,
                              progress=False))
        tests.append(set(load_split(out, "test").group_ids()))
    return tests


@pytest.mark.slow
def test_prepared_folds_are_the_same_at_every_size(tmp_path):
    small, large = _prepared_folds(tmp_path, 32), _prepared_folds(tmp_path, 64)
    assert small == large
    assert not small[0] & small[1] and not small[1] & small[2]
    assert sum(len(t) for t in small) == len(small[0] | small[1] | small[2])


def test_prepare_refuses_a_fold_outside_the_folds(tmp_path):
    from brainhpc.prepare import PrepareConfig

    with pytest.raises(BrainhpcError, match=r"fold must be an integer in 0..2"):
        PrepareConfig(out=tmp_path / "p", phantom=90, folds=3, fold=3)
    with pytest.raises(BrainhpcError, match="--fold 1 needs --folds K"):
        PrepareConfig(out=tmp_path / "p", phantom=90, fold=1)


# ------------------------------------------------------------------------ sweep: fold axis

SWEEP = """
name = "cv"
[data]
phantom = 150
phantom_lesions = "visible"
size = 32
folds = 3
[classify]
epochs = 2
batch_size = 16
[[classify.cells]]
model = "cnn"
train_data = ["real"]
options = {{ lr = 1e-3, dropout = 0.2 }}
[[classify.cells]]
model = "vae"
techniques = ["giaem"]
train_data = ["real"]
folds = [0]
epochs = 1
[segment]
epochs = 1
batch_size = 16
[[segment.cells]]
train_data = ["real"]
{extra}
[resources]
cpus_per_task = 1
array_parallelism = 2
"""


def _plan(tmp_path, extra=""):
    from brainhpc.sweep.config import load_sweep
    from brainhpc.sweep.plan import expand

    path = tmp_path / "cv.toml"
    path.write_text(SWEEP.format(extra=extra))
    return expand(load_sweep(path), tmp_path / "run")


def test_folds_are_a_cell_axis(tmp_path):
    cells = _plan(tmp_path)
    assert [c.id for c in cells["prepare"]] == ["data/f0", "data/f1", "data/f2"]
    assert [c.params["fold"] for c in cells["prepare"]] == [0, 1, 2]
    assert [c.id for c in cells["classify"]] == ["f0/cnn-real-s0", "f1/cnn-real-s0",
                                                 "f2/cnn-real-s0", "f0/vae-real-s0"]
    from brainhpc.sweep.plan import stage_config

    cfg = stage_config(cells["classify"][1])
    assert cfg.data == tmp_path / "run" / "prepare" / "data" / "f1" / "prepared"
    assert cfg.out == tmp_path / "run" / "classify" / "f1" / "cnn-real-s0"
    assert stage_config(cells["prepare"][2]).fold == 2


def test_block_folds_are_checked(tmp_path):
    with pytest.raises(BrainhpcError, match="fold 3 on dataset 'data', which has folds 0..2"):
        _plan(tmp_path, "[[segment.cells]]\ntrain_data = [\"real\"]\nseeds = [1]\nfolds = [3]")
    with pytest.raises(BrainhpcError, match="must be a non-empty list of fold numbers"):
        _plan(tmp_path, "[[segment.cells]]\ntrain_data = [\"real\"]\nseeds = [1]\nfolds = []")


# ------------------------------------------------------------------ one run through the sweep

EXTERNAL = """
[[evaluate]]
name = "external"
phantom = 40
seed = 99
"""


@pytest.fixture(scope="module")
def cv_run(tmp_path_factory):
    from brainhpc.sweep.cli import main

    tmp = tmp_path_factory.mktemp("cv")
    sweep = tmp / "cv.toml"
    sweep.write_text(SWEEP.format(extra=EXTERNAL))
    assert main([str(sweep), "--executor", "local", "--run-dir", str(tmp / "run")]) == 0
    return tmp / "run"


def _csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_predictions_reproduce_the_cell_metrics(cv_run):
    folder = cv_run / "classify" / "f1" / "cnn-real-s0"
    m = json.loads((folder / "metrics.json").read_text())
    rows = [r for r in _csv(folder / "predictions.csv") if r["arm"] == "cnn"]
    y = np.array([int(r["label"]) for r in rows])
    d = np.array([int(r["decision"]) for r in rows])
    assert len(rows) == m["n"]
    assert balanced_accuracy_score(y, d) == pytest.approx(m["balanced_accuracy"])
    ppv = ((d == 1) & (y == 1)).sum() / max((d == 1).sum(), 1)
    assert m["precision"] == pytest.approx(ppv)  # test PPV, not the training precision mode
    metrics = _csv(cv_run / "results" / "metrics.csv")
    row = next(r for r in metrics if r["cell"] == "f1/cnn-real-s0")
    assert float(row["precision"]) == pytest.approx(ppv)
    assert row["precision_mode"] in ("fp32", "bf16") and row["fold"] == "1"
    base = m["baselines"]["image_statistics"]
    assert base["criterion"] == "balanced_accuracy" and "cut" in base  # chosen on validation


@pytest.mark.slow
def test_aggregate_pools_folds_into_intervals_and_verdicts(cv_run):
    ivals = _csv(cv_run / "results" / "intervals.csv")
    cnn = next(r for r in ivals if r["dataset"] == "data" and r["arm"] == "cnn"
               and r["metric"] == "balanced_accuracy")
    assert cnn["runs"] == "3" and int(cnn["groups"]) == int(cnn["n"]) == 150  # out-of-fold
    assert float(cnn["lo"]) <= float(cnn["value"]) <= float(cnn["hi"])
    assert cnn["spread"] != ""
    vae = next(r for r in ivals if r["arm"] == "giaem" and r["metric"] == "roc_auc")
    assert vae["runs"] == "1" and int(vae["n"]) < 150
    comps = _csv(cv_run / "results" / "comparisons.csv")
    versus = {(r["arm"], r["versus"]) for r in comps}
    assert {("cnn", "image statistics"), ("giaem", "intensity threshold"),
            ("unet", "empty"), ("unet", "intensity")} <= versus
    assert all(r["verdict"] in ("better", "worse", "not resolved") for r in comps)
    external = next(r for r in ivals if r["dataset"] == "data on external"
                    and r["arm"] == "cnn" and r["metric"] == "roc_auc")
    assert external["runs"] == "3" and int(external["groups"]) == 40  # every fold's model
    table = (cv_run / "results" / "table.md").read_text()
    assert "### data on external: classification with intervals" in table
    assert "### data: classification with intervals" in table
    assert "### data: segmentation with intervals" in table
    line = next(x for x in table.splitlines() if x.startswith("| CNN | real |"))
    assert "[" in line and any(v in line for v in ("better", "worse", "not resolved"))


@pytest.mark.slow
def test_readme_report_renders_intervals_from_csvs_alone(cv_run):
    from brainhpc.sweep.aggregate import report

    text = report(cv_run / "results")
    assert "classification with intervals" in text and "segmentation with intervals" in text
