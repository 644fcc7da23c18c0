"""The evaluate stage (brainhpc.evaluate over a sweep's models) on a real, tiny run through the
debug executor:
a CNN, a VAE detector and a U-Net (1 epoch, 32 px phantoms) scored on a raw folder with masks
(holding byte copies of training images, which must be dropped and counted) and on a prepared
dataset; an unfinished model is listed, not fatal; a re-run scores only what is new; a set
without masks skips the segmenters, saying so. The same through SLURM: test_sweep_slurm.py."""

import csv
import json
import pdb
import shutil
from pathlib import Path

import cv2
import pytest

from brainhpc.data import phantom
from brainhpc.data.shards import load_split
from brainhpc.errors import BrainhpcError
from brainhpc.evaluate import EvaluateConfig, evaluate
from brainhpc.prepare import PrepareConfig, prepare
from brainhpc.sweep.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

SWEEP = """
name = "ext"
[data]
path = "{raw}"
size = 32
[classify]
epochs = 1
batch_size = 16
[[classify.cells]]
model = "cnn"
train_data = ["real"]
options = {{ augment = false }}
[[classify.cells]]
model = "vae"
techniques = ["giaem", "dbscan"]
train_data = ["real"]
[[classify.cells]]               # never finishes: a batch larger than the training set
model = "cnn"
train_data = ["real"]
seeds = [1]
batch_size = 100000
[[segment.cells]]
train_data = ["real"]
epochs = 1
batch_size = 16
options = {{ channels = [8, 16], strides = [2] }}
[[evaluate]]
name = "raw"
path = "{ext}"
[[evaluate]]
name = "prep"
path = "{prep}"
"""
N_COPIES = 4


def write_folder(root: Path, slices, prefix: str = "") -> Path:
    """Br35H layout (yes/, no/) with each tumour slice's mask beside it (X_mask.png)."""
    for p in slices:
        folder = root / ("yes" if p.label else "no")
        folder.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / f"{prefix}{p.name}"), p.image)
        if p.label:
            name = f"{prefix}{p.name}".replace(".png", "_mask.png")
            cv2.imwrite(str(folder / name), p.mask * 255)
    return root


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("extstage")
    raw = write_folder(base / "raw", phantom.generate(90, seed=7))
    ext = base / "ext"
    ext.mkdir()
    prep = base / "prep"
    prepare(PrepareConfig(out=prep, phantom=40, size=32, seed=3, progress=False))
    path = base / "ext.toml"
    path.write_text(SWEEP.format(raw=raw, ext=ext, prep=prep))
    rd = base / "run"
    argv = [str(path), "--executor", "debug", "--run-dir", str(rd)]
    assert main([*argv, "--only", "prepare"]) == 0
    # the external raw folder: fresh slices, plus byte copies of training images (with masks)
    write_folder(ext, phantom.generate(24, seed=99), prefix="new-")
    copied = load_split(rd / "prepare" / "data" / "prepared", "train").sources[:N_COPIES]
    for k, source in enumerate(copied):
        src = raw / source
        shutil.copy(src, ext / src.parent.name / f"copy-{k}.png")
        if src.with_name(src.stem + "_mask.png").exists():
            shutil.copy(src.with_name(src.stem + "_mask.png"),
                        ext / src.parent.name / f"copy-{k}_mask.png")
    with pytest.MonkeyPatch.context() as mp:  # the debug executor's post-mortem debugger
        mp.setattr(pdb, "post_mortem", lambda *a: None)
        assert main(argv) == 1  # cnn-real-s1 fails; everything else runs
        yield rd, argv, ext


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def test_every_finished_model_is_scored_and_copies_dropped(run):
    rd, _, ext = run
    cell = _json(rd / "evaluate" / "raw" / "cell.json")
    assert cell["status"] == "done", cell.get("error")
    summary = _json(rd / "evaluate" / "raw" / "summary.json")
    assert summary["not_finished"] == ["classify/cnn-real-s1"]
    assert [s["cell"] for s in summary["scored"]["classify"]] == ["cnn-real-s0", "vae-real-s0"]
    assert [s["cell"] for s in summary["scored"]["segment"]] == ["unet-real-s0"]
    assert summary["segmenters_skipped"] is None and summary["errors"] == []
    assert {s["n"] for st in ("classify", "segment") for s in summary["scored"][st]} == {24}
    assert {s["dropped"] for st in ("classify", "segment") for s in summary["scored"][st]} == {
        N_COPIES}
    for stage, cid in (("classify", "cnn-real-s0"), ("classify", "vae-real-s0"),
                       ("segment", "unet-real-s0")):
        m = _json(rd / "evaluate" / "raw" / stage / cid / "metrics.json")
        assert m["status"] == "done" and m["data_kind"] == "raw folder", (stage, cid)
        # copies of the model's training images never count as external
        assert m["overlap"]["checked"] and m["overlap"]["exact_copies"] == N_COPIES, (stage, cid)
        n = m["techniques"]["giaem"]["n"] if cid.startswith("vae") else m["n"]
        assert m["overlap"]["n_before"] == 24 + N_COPIES and n == 24, (stage, cid)
        assert m["config"]["checkpoint"] == str((rd / stage / cid / "model.pt").resolve())
    cnn = _json(rd / "evaluate" / "raw" / "classify" / "cnn-real-s0" / "metrics.json")
    assert 0.0 <= cnn["balanced_accuracy"] <= 1.0 and cnn["frozen"] is True
    vae = _json(rd / "evaluate" / "raw" / "classify" / "vae-real-s0" / "metrics.json")
    assert set(vae["techniques"]) == {"giaem", "dbscan"}
    assert "localisation" in vae["techniques"]["giaem"]  # the raw set has masks
    seg = _json(rd / "evaluate" / "raw" / "segment" / "unet-real-s0" / "metrics.json")
    assert 0.0 <= seg["dice_patient_mean"] <= 1.0 and "baseline_empty" in seg
    assert not (rd / "evaluate" / "raw" / "classify" / "cnn-real-s1").exists()


def test_prepared_external_set_is_scored_on_its_test_split(run):
    rd, _, _ = run
    summary = _json(rd / "evaluate" / "prep" / "summary.json")
    assert summary["split"] == "test" and summary["errors"] == []
    for stage, cid in (("classify", "cnn-real-s0"), ("segment", "unet-real-s0")):
        m = _json(rd / "evaluate" / "prep" / stage / cid / "metrics.json")
        assert m["data_kind"] == "prepared:test" and m["split"] == "test"
        assert m["overlap"]["dropped"] == 0  # phantoms of another seed: nothing copied


def test_aggregate_has_the_external_columns(run):
    rd, _, _ = run
    rows = {(r["cell"], r["technique"]): r
            for r in csv.DictReader((rd / "results" / "metrics.csv").open())}
    cnn = rows[("cnn-real-s0", "")]
    assert float(cnn["raw_dropped"]) == N_COPIES and cnn["raw_n"] == "24"
    assert 0.0 <= float(cnn["prep_balanced_accuracy"]) <= 1.0
    assert rows[("vae-real-s0", "giaem")]["raw_recall_tumour"] != ""
    seg = list(csv.DictReader((rd / "results" / "segmentation.csv").open()))
    assert seg[0]["cell"] == "unet-real-s0" and seg[0]["raw_dice_patient"] != ""
    table = (rd / "results" / "table.md").read_text()
    assert "raw: bal. acc" in table and "### data: test split" in table
    # the detector's localisation on the external set with masks, beside its intensity baseline
    giaem, intensity = rows[("vae-real-s0", "giaem")], rows[("vae-real-s0", "intensity threshold")]
    assert 0.0 < float(giaem["raw_pixel_auprc"]) <= 1.0 and giaem["raw_dice_ungated"] != ""
    assert 0.0 <= float(intensity["raw_dice"]) <= 1.0
    assert 0.0 <= float(intensity["raw_balanced_accuracy"]) <= 1.0
    assert "prep_pixel_auprc" in giaem  # the prepared set's test split has masks too
    assert "### Anomaly localisation on raw (external" in table
    ivals = list(csv.DictReader((rd / "results" / "intervals.csv").open()))
    assert any(r["dataset"] == "data on raw" and r["arm"] == "intensity threshold"
               for r in ivals)  # its image decisions carry an interval too
    # ... and its localisation, per tumour slice over patients, on its own split and on raw
    loc = {(r["dataset"], r["arm"]) for r in ivals if r["stage"] == "localise"}
    assert {("data", "residual maps"), ("data on raw", "intensity threshold"),
            ("data on raw", "giaem")} <= loc
    comps = list(csv.DictReader((rd / "results" / "comparisons.csv").open()))
    assert any(r["stage"] == "localise" and r["versus"] == "intensity threshold"
               and r["verdict"] in ("better", "worse", "not resolved") for r in comps)
    assert "### data on raw: anomaly localisation with intervals" in table


def test_rerun_resubmits_evaluate_and_skips_scored_models(run, capsys):
    rd, argv, _ = run
    before = (rd / "evaluate" / "raw" / "classify" / "cnn-real-s0" / "metrics.json").stat()
    assert main(argv) == 1  # the failed classify cell again, so evaluate and aggregate again
    recs = json.loads((rd / "jobs.json").read_text())
    last = [(r["stage"], r["cells"]) for r in recs[-3:]]
    assert last == [("classify", ["cnn-real-s1"]), ("evaluate", ["raw", "prep"]),
                    ("aggregate", ["results"])]
    summary = _json(rd / "evaluate" / "raw" / "summary.json")
    assert all(s["already_scored"] for st in ("classify", "segment")
               for s in summary["scored"][st])
    after = (rd / "evaluate" / "raw" / "classify" / "cnn-real-s0" / "metrics.json").stat()
    assert after.st_mtime_ns == before.st_mtime_ns


def test_set_without_masks_skips_segmenters_saying_so(run, tmp_path):
    rd, _, _ = run
    folder = tmp_path / "nomask"
    for p in phantom.generate(16, seed=5):
        (folder / ("yes" if p.label else "no")).mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / ("yes" if p.label else "no") / p.name), p.image)
    out = tmp_path / "out"
    summary = evaluate(EvaluateConfig(run_dir=rd, out=out, name="nomask", data=folder,
                                      device="cpu"))
    assert summary["status"] == "done" and summary["scored"]["segment"] == []
    assert "has no tumour masks: segmenters not scored" in summary["segmenters_skipped"]
    assert [s["cell"] for s in summary["scored"]["classify"]] == ["cnn-real-s0", "vae-real-s0"]
    assert not (out / "segment").exists()
    # a model that cannot be scored fails the cell after the others, naming it
    bad = tmp_path / "one"
    (bad / "yes").mkdir(parents=True)
    with pytest.raises(BrainhpcError, match="no usable images|cannot recognise"):
        evaluate(EvaluateConfig(run_dir=rd, out=tmp_path / "out2", name="one", data=bad))
    assert _json(tmp_path / "out2" / "summary.json")["status"] == "failed"
    with pytest.raises(BrainhpcError, match="plan.json is missing"):
        evaluate(EvaluateConfig(run_dir=tmp_path, out=tmp_path / "o", name="x", data=folder))


def test_fresh_phantom_set_is_written_once_and_scored(run, tmp_path):
    rd, _, _ = run
    out = tmp_path / "fresh"
    cfg = EvaluateConfig(run_dir=rd, out=out, name="fresh", phantom=30, seed=123)
    assert cfg.images == out / "phantom-30-s123"  # another N or seed: another folder
    summary = evaluate(cfg)
    assert summary["errors"] == [] and summary["segmenters_skipped"] is None
    assert {s["n"] for st in ("classify", "segment") for s in summary["scored"][st]} == {30}
    assert {s["dropped"] for st in ("classify", "segment") for s in summary["scored"][st]} == {0}
    images = sorted((out / "phantom-30-s123").rglob("*.png"))
    assert len(images) == 60  # 30 slices and their masks
    stamp = images[0].stat().st_mtime_ns
    evaluate(cfg)  # a re-run reuses the folder and skips the scored models
    assert images[0].stat().st_mtime_ns == stamp


def test_a_unet_saved_without_fingerprints_still_drops_copies(run, tmp_path):
    """A U-Net whose model.pt predates its development fingerprints gets them from the prepared
    dataset its cell's metrics.json names: its external score never counts training images."""
    import torch

    rd, _, ext = run
    cell = tmp_path / "old-unet"
    cell.mkdir()
    state = torch.load(rd / "segment" / "unet-real-s0" / "model.pt", weights_only=True)
    for key in ("development_images", "data_key"):
        state.pop(key)
    torch.save(state, cell / "model.pt")
    shutil.copy(rd / "segment" / "unet-real-s0" / "metrics.json", cell / "metrics.json")
    m = evaluate(EvaluateConfig(checkpoint=cell, data=ext, out=tmp_path / "ev", device="cpu"))
    assert m["overlap"]["checked"] and m["overlap"]["dropped"] == N_COPIES and m["n"] == 24


def test_a_run_without_models_of_the_dataset_is_an_error(run, tmp_path):
    rd, _, ext = run
    with pytest.raises(BrainhpcError, match=r"no classify or segment cells of dataset 'lgg'; "
                                            r"its datasets: \(one dataset"):
        evaluate(EvaluateConfig(run_dir=rd, dataset="lgg", data=ext, out=tmp_path / "o"))
