"""The classify and evaluate cells end to end on tiny drawn phantom data (32 px, real HDF5
shards, the real trainer): every cell type, re-run/force/refusal, interruption and resume,
thresholds chosen on validation only, evaluate on prepared and raw folders, and bad input."""

import json
import os
import signal
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from brainhpc import cli
from brainhpc.anomaly.techniques import TECHNIQUES, TechniqueConfig, best_cut, fit_technique
from brainhpc.classify import ClassifyConfig, classify
from brainhpc.classify import tasks as crun
from brainhpc.data.shards import write_shards
from brainhpc.data.training import synthetic_shard_dir
from brainhpc.errors import BrainhpcError
from brainhpc.evaluate import EvaluateConfig, evaluate
from brainhpc.predictors.classifier import cnn_scores, load_classifier

SIZE = 32
FAST = dict(epochs=2, batch_size=16, latent_dim=16, progress=False, device="cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


def phantom(rng, size, tumour, lesion=0.95):
    """A drawn slice: textured elliptic brain, two ventricles, a lesion (and its mask)."""
    yy, xx = (np.mgrid[:size, :size] + 0.5) / size - 0.5
    cx, cy = rng.uniform(-0.05, 0.05, 2)
    ax, ay = rng.uniform(0.30, 0.42, 2)
    brain = ((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2 < 1
    f1, f2, p1, p2 = rng.uniform(2, 6, 2).tolist() + rng.uniform(0, 6.3, 2).tolist()
    img = np.where(brain, 0.5 + 0.08 * np.sin(f1 * 6.28 * xx + p1) * np.cos(f2 * 6.28 * yy + p2),
                   0.0)
    for s in (-1, 1):
        ry = rng.uniform(0.08, 0.14)
        img[((xx - cx - s * 0.06) / 0.04) ** 2 + ((yy - cy) / ry) ** 2 < 1] = 0.2
    mask = np.zeros((size, size), np.uint8)
    if tumour:
        tx, ty = rng.uniform(-0.2, 0.2, 2)
        r = rng.uniform(0.06, 0.12)
        m = ((xx - cx - tx) ** 2 + (yy - cy - ty) ** 2 < r * r) & brain
        img[m] = lesion
        mask[m] = 1
    img = img + 0.03 * rng.standard_normal(img.shape)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8), mask


def draw(n_healthy, n_tumour, seed, size=SIZE, lesion=0.95):
    rng = np.random.default_rng(seed)
    labels = np.array([0] * n_healthy + [1] * n_tumour)
    pairs = [phantom(rng, size, bool(lab), lesion) for lab in labels]
    images = np.stack([p[0] for p in pairs])[:, None]
    masks = np.stack([p[1] for p in pairs])[:, None]
    return images, labels, masks


def write_split(folder, n_healthy, n_tumour, seed, size=SIZE, lesion=0.95, prefix="real"):
    images, labels, masks = draw(n_healthy, n_tumour, seed, size, lesion)
    write_shards(folder, images, labels, [f"{prefix}/{seed}/{i}" for i in range(len(labels))],
                 masks=masks, attrs={"size": size, "seed": seed})


def make_prepared(root, size=SIZE, train=(32, 32), test_lesion=0.95, test_seed=3):
    """train/val/test shards with masks and a manifest, like `brainhpc prepare` writes."""
    root = Path(root)
    write_split(root / "train", *train, seed=1, size=size)
    write_split(root / "val", 12, 12, seed=2, size=size)
    write_split(root / "test", 12, 12, seed=test_seed, size=size, lesion=test_lesion)
    (root / "manifest.json").write_text(json.dumps({"format": 1,
                                                    "config": {"size": size, "seed": 0}}))
    return root


def make_synthetic(root, gen="dcgan", n=(24, 24), size=SIZE):
    """What generate cells <gen>-healthy and <gen>-tumour leave in SYN_DIR (shards only)."""
    for name, lab, k in (("healthy", 0, n[0]), ("tumour", 1, n[1])):
        images, labels, _ = draw(k if lab == 0 else 0, k if lab == 1 else 0, 10 + lab, size)
        write_shards(synthetic_shard_dir(root, gen, name), images, labels,
                     [f"synthetic/{gen}/{name}/{i}" for i in range(len(labels))],
                     attrs={"generator": gen, "label": name, "size": size})
    return root


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return make_prepared(tmp_path_factory.mktemp("prepared"))


@pytest.fixture(scope="module")
def cnn_cell(prepared, tmp_path_factory):
    out = tmp_path_factory.mktemp("cnn") / "cell"
    cfg = ClassifyConfig(model="cnn", train_data="real", data=prepared, out=out, **FAST)
    return cfg, classify(cfg)


def run_cli(argv, capsys):
    code = cli.main(argv)
    return code, capsys.readouterr().err


# ------------------------------------------------------------------------------ cells end to end

def test_cnn_real_end_to_end(cnn_cell, prepared):
    cfg, m = cnn_cell
    out = cfg.out
    assert m["status"] == "done" and m["model"] == "cnn" and m["techniques"] is None
    for key in ("accuracy", "precision", "recall", "f1", "roc_auc", "confusion_matrix",
                "n_per_class", "val", "chosen", "seed", "epochs", "wall_seconds", "device",
                "brainhpc", "config_hash"):
        assert key in m, key
    assert m["n"] == 24 and np.sum(m["confusion_matrix"]) == 24
    assert m["n_per_class"] == {"healthy": 12, "tumour": 12}
    assert m["roc_auc"] is not None and m["n_train"] == {
        "total": 64, "healthy": 32, "tumour": 32, "synthetic": 0, "real": 64}
    assert m["chosen"]["best_metric"] == "val_balanced_accuracy"
    assert m["chosen"]["best_epoch"] in (0, 1)
    assert m["chosen"]["class_weights"] == [1.0, 1.0]
    assert json.loads((out / "metrics.json").read_text()) == m
    log = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["kind"] == "val" for r in log) == 2
    # the saved classifier loads with weights_only and reproduces the recorded numbers
    state = torch.load(out / "model.pt", weights_only=True)
    assert state["model"] == "cnn" and state["threshold"] == m["chosen"]["threshold"]
    clf = load_classifier(out)
    from brainhpc.data.shards import load_split
    val, test = load_split(prepared, "val"), load_split(prepared, "test")
    val_s = cnn_scores(clf["module"], val.images, torch.device("cpu"))
    test_s = cnn_scores(clf["module"], test.images, torch.device("cpu"))
    # the threshold is the best cut of the validation scores, not of the test scores
    assert m["chosen"]["threshold"] == best_cut(val_s, val.labels, "balanced_accuracy")[0]
    assert m["roc_auc"] == pytest.approx(
        __import__("sklearn.metrics").metrics.roc_auc_score(test.labels, test_s))


def test_rerun_skips_different_config_refused_force_redoes(cnn_cell, prepared):
    cfg, first = cnn_cell
    mtime = (cfg.out / "model.pt").stat().st_mtime_ns
    again = classify(ClassifyConfig(model="cnn", train_data="real", data=prepared, out=cfg.out,
                                    **FAST))
    assert again["skipped"] and (cfg.out / "model.pt").stat().st_mtime_ns == mtime
    with pytest.raises(BrainhpcError, match="different config.*seed: 0 -> 7"):
        classify(ClassifyConfig(model="cnn", train_data="real", data=prepared, out=cfg.out,
                                seed=7, **FAST))
    redone = classify(ClassifyConfig(model="cnn", train_data="real", data=prepared, out=cfg.out,
                                     seed=7, force=True, **FAST))
    assert redone["seed"] == 7 and not redone.get("skipped") and not redone["resumed"]
    assert redone["checkpoint_sha256"] != first["checkpoint_sha256"]


def test_cnn_synthetic_and_mixed(prepared, tmp_path):
    syn = make_synthetic(tmp_path / "syn")
    kw = dict(model="cnn", data=prepared, synthetic_dir=syn, **FAST)
    m = classify(ClassifyConfig(train_data="synthetic:dcgan", out=tmp_path / "s", **kw))
    assert m["n_train"] == {"total": 48, "healthy": 24, "tumour": 24, "synthetic": 48, "real": 0}
    assert m["train_data"] == "synthetic:dcgan" and m["n"] == 24
    m = classify(ClassifyConfig(train_data="mixed:dcgan", out=tmp_path / "m", **kw))
    assert m["n_train"]["synthetic"] == 48 and m["n_train"]["real"] == 64
    m = classify(ClassifyConfig(train_data="mixed:dcgan:0.25", out=tmp_path / "p", **kw))
    assert m["n_train"] == {"total": 64, "healthy": 32, "tumour": 32, "synthetic": 16, "real": 48}


def test_vae_trains_once_and_scores_every_technique(prepared, tmp_path):
    out = tmp_path / "vae"
    m = classify(ClassifyConfig(model="vae", train_data="real", data=prepared, out=out, **FAST))
    assert m["status"] == "done" and list(m["techniques"]) == list(TECHNIQUES)
    assert m["n_train"]["vae_trained_on"] == 32  # healthy images only
    log = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["kind"] == "val" for r in log) == FAST["epochs"]  # one training, not four
    assert m["chosen"]["best_metric"] == "val_loss"
    for technique, block in m["techniques"].items():
        assert block["chosen"]["technique"] == technique
        assert "anomaly_threshold" in block["chosen"]
        assert set(block["localisation"]) >= {"dice_mean", "iou_mean"}
        assert block["localisation"]["n"] == 12
        t = block["test"]
        assert t["roc_auc"] is not None and np.sum(t["confusion_matrix"]) == 24
    assert {"pixel_auprc", "best_dice_mean", "best_dice_threshold"} <= set(m["localisation"])
    base = m["baselines"]["intensity_threshold"]
    assert base["test"]["roc_auc"] is not None and "localisation" in base
    png = cv2.imread(str(out / "error_maps.png"), cv2.IMREAD_GRAYSCALE)
    assert png is not None and png.shape[1] > 6 * SIZE
    # thresholds were selected from the validation maps of the saved model, and only those
    clf = load_classifier(out / "model.pt")
    from brainhpc.data.shards import load_split
    val = load_split(prepared, "val")
    maps = clf["detector"].maps(val, torch.device("cpu"))
    for technique in TECHNIQUES:
        refit = fit_technique(TechniqueConfig(technique=technique), maps, val.labels)
        chosen = m["techniques"][technique]["chosen"]
        assert refit.params == pytest.approx({k: chosen[k] for k in refit.params}), technique
    # evaluate on the same test split reuses the frozen rules: identical numbers
    ev = evaluate(EvaluateConfig(checkpoint=out, data=prepared, out=tmp_path / "ev"))
    assert ev["frozen"]
    for technique, block in m["techniques"].items():
        for key in ("accuracy", "f1", "roc_auc", "confusion_matrix"):
            assert ev["techniques"][technique][key] == block["test"][key], (technique, key)
        assert ev["techniques"][technique]["localisation"] == block["localisation"]


def test_thresholds_never_see_the_test_split(tmp_path):
    """Two datasets, identical train and val, different test (another lesion contrast): every
    chosen value and every validation number must be identical, the test numbers not."""
    a = make_prepared(tmp_path / "a")
    b = make_prepared(tmp_path / "b", test_lesion=0.7, test_seed=9)
    for model, technique in (("cnn", None), ("vae", "kmeans-global")):
        ma, mb = (classify(ClassifyConfig(model=model, train_data="real", techniques=technique,
                                          data=d, out=tmp_path / f"{model}-{d.name}", **FAST))
                  for d in (a, b))
        if model == "vae":  # the technique's block holds what the CNN has at the top level
            ma, mb = ma["techniques"][technique], mb["techniques"][technique]
            ma, mb = {**ma, **ma.pop("test")}, {**mb, **mb.pop("test")}
        assert ma["chosen"] == mb["chosen"], model
        assert ma["val"] == mb["val"], model
        assert ma["roc_auc"] != mb["roc_auc"] or ma["confusion_matrix"] != mb["confusion_matrix"]
        if model == "cnn":  # the test-optimal cut is a different value: peeking would show
            clf = load_classifier(tmp_path / f"{model}-b")
            from brainhpc.data.shards import load_split
            test = load_split(b, "test")
            s = cnn_scores(clf["module"], test.images, torch.device("cpu"))
            assert best_cut(s, test.labels)[0] != mb["chosen"]["threshold"]


def test_interrupted_exits_3_then_resumes(prepared, tmp_path, monkeypatch, capsys):
    out = tmp_path / "cut"
    argv = ["classify", "--model", "cnn", "--train-data", "real", "--data", str(prepared),
            "--out", str(out), "--epochs", "2", "--batch-size", "16", "--device", "cpu",
            "--no-progress"]
    step = crun.CNNTask.training_step

    def stop_at_3(self, t, batch):
        if t.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # what SLURM sends before a time limit
        return step(self, t, batch)

    monkeypatch.setattr(crun.CNNTask, "training_step", stop_at_3)
    assert cli.main(argv) == 3
    assert not (out / "metrics.json").exists() and (out / "checkpoints" / "last.pt").exists()
    code, err = run_cli([*argv, "--seed", "4"], capsys)  # never mixed into the unfinished run
    assert code == 2 and "unfinished classify run with a different config (seed: 0 -> 4)" in err
    monkeypatch.setattr(crun.CNNTask, "training_step", step)
    assert cli.main(argv) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["resumed"] and m["steps"] == 8 and m["status"] == "done"
    assert cli.main(argv) == 0  # finished: skipped


# ------------------------------------------------------------------------------ evaluate

def test_evaluate_prepared_all_splits_and_rerun(cnn_cell, prepared, tmp_path):
    cfg, m = cnn_cell
    ev = evaluate(EvaluateConfig(checkpoint=cfg.out / "model.pt", data=prepared, split="all",
                                 out=tmp_path / "ev"))
    assert ev["n"] == 64 + 24 + 24 and ev["chosen"]["threshold"] == \
        load_classifier(cfg.out)["threshold"]
    assert "holds the development images" in ev["overlap"]["reason"]  # said, not hidden
    again = evaluate(EvaluateConfig(checkpoint=cfg.out, data=prepared, split="all",
                                    out=tmp_path / "ev"))
    assert again["skipped"]
    with pytest.raises(BrainhpcError, match="different config.*split"):
        evaluate(EvaluateConfig(checkpoint=cfg.out, data=prepared, out=tmp_path / "ev"))


def test_evaluate_raw_folder(cnn_cell, tmp_path, capsys):
    cfg, _ = cnn_cell
    raw = tmp_path / "raw"
    images, labels, _ = draw(6, 7, seed=21, size=96)  # another size: pre-processing resizes
    for i, (img, lab) in enumerate(zip(images, labels, strict=True)):
        folder = raw / ("yes" if lab else "no")
        folder.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / f"img{i:02d}.png"), img[0])
    (raw / "no" / "notes.txt").write_text("not an image")
    code, err = run_cli(["evaluate", "--checkpoint", str(cfg.out), "--data", str(raw),
                         "--out", str(tmp_path / "ev"), "--workers", "1"], capsys)
    assert code == 0, err
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["data_kind"] == "raw folder" and m["split"] is None
    assert m["n_per_class"] == {"healthy": 6, "tumour": 7} and m["image_size"] == SIZE
    assert np.sum(m["confusion_matrix"]) == 13


def test_identity_ignores_run_only_settings(prepared, tmp_path):
    base = dict(model="cnn", train_data="real", data=prepared, out=tmp_path / "a")
    a = ClassifyConfig(**base).identity()
    assert a == ClassifyConfig(**{**base, "out": tmp_path / "b"}, synthetic_dir=tmp_path,
                               device="cpu", num_workers=2, progress=False).identity()
    assert a["epochs"] == 20 and a["lr"] == 1e-3  # defaults resolved, so they are recorded
    assert a != ClassifyConfig(**base, augment=False).identity()


# ------------------------------------------------------------------------------ bad input (CLI)

def _classify_argv(prepared, out, *extra):
    return ["classify", "--data", str(prepared), "--out", str(out), "--epochs", "1",
            "--batch-size", "16", "--device", "cpu", "--no-progress", *extra]


@pytest.mark.parametrize("extra, message", [
    (["--model", "svm", "--train-data", "real"], "unknown model 'svm'; valid: cnn, vae"),
    (["--model", "vae", "--train-data", "real", "--technique", "hdbscan"],
     r"techniques \['hdbscan'\] invalid or repeated; valid: giaem, dbscan, kmeans-single"),
    (["--model", "vae", "--train-data", "real", "--technique", "giaem,giaem"],
     "invalid or repeated"),
    (["--model", "vae", "--train-data", "real", "--vae-arch", "vit"], "unknown vae_arch 'vit'"),
    (["--model", "vae", "--train-data", "real", "--residual", "l2"], "unknown residual 'l2'"),
    (["--model", "vae", "--train-data", "real", "--median", "4"], "median must be an odd"),
    (["--model", "cnn", "--train-data", "real", "--technique", "giaem"],
     r"techniques \['giaem'\] are VAE anomaly-detection techniques; the cnn model takes none"),
    (["--model", "cnn", "--train-data", "fake:dcgan"],
     "training data spec 'fake:dcgan': unknown kind 'fake'; valid forms: real"),
    (["--model", "cnn", "--train-data", "synthetic:stylegan"],
     "unknown generator 'stylegan'.*generators: vae, dcgan, wgan-gp, ddpm"),
    (["--model", "cnn", "--train-data", "mixed:dcgan:1.5"], "fraction '1.5' is outside"),
    (["--model", "cnn", "--train-data", "synthetic:dcgan"], "needs --synthetic-dir"),
    (["--model", "cnn", "--train-data", "real", "--balance", "oversample"],
     "unknown balance 'oversample'; valid: weighted, none"),
    (["--model", "cnn", "--train-data", "real", "--criterion", "auc"],
     "unknown criterion 'auc'"),
    (["--model", "cnn", "--train-data", "real", "--dropout", "1.5"], "dropout.*1.5"),
    (["--model", "vae", "--train-data", "real", "--technique", "dbscan", "--opt", "epss=2"],
     "unknown technique option.*epss.*valid:.*eps"),
])
def test_bad_classify_arguments(prepared, tmp_path, capsys, extra, message):
    code, err = run_cli(_classify_argv(prepared, tmp_path / "o", *extra), capsys)
    assert code == 2
    assert __import__("re").search(message, err), err
    assert not (tmp_path / "o").exists()


def test_missing_generator_shards_name_the_cell(prepared, tmp_path, capsys):
    syn = tmp_path / "syn"
    make_synthetic(syn, gen="dcgan")
    code, err = run_cli(_classify_argv(prepared, tmp_path / "o", "--model", "cnn",
                                       "--train-data", "mixed:wgan-gp", "--synthetic-dir",
                                       str(syn)), capsys)
    assert code == 2 and "generate cell wgan-gp-healthy must run first" in err
    assert str(syn / "wgan-gp-healthy" / "shards") in err


def test_synthetic_of_another_size_is_refused(prepared, tmp_path, capsys):
    syn = make_synthetic(tmp_path / "syn", size=16)
    code, err = run_cli(_classify_argv(prepared, tmp_path / "o", "--model", "cnn",
                                       "--train-data", "synthetic:dcgan", "--synthetic-dir",
                                       str(syn)), capsys)
    assert code == 2 and "16x16 px" in err and "32x32 px" in err and "dcgan-healthy" in err


def test_empty_healthy_set_for_the_vae(tmp_path, capsys):
    data = make_prepared(tmp_path / "tumour-only", train=(0, 40))
    code, err = run_cli(_classify_argv(data, tmp_path / "o", "--model", "vae", "--train-data",
                                       "real", "--technique", "giaem"), capsys)
    assert code == 2 and "no healthy images (label 0) among 40" in err


def test_bad_evaluate_input(cnn_cell, tmp_path, capsys):
    cfg, _ = cnn_cell
    small = make_prepared(tmp_path / "p16", size=16, train=(4, 4))
    code, err = run_cli(["evaluate", "--checkpoint", str(cfg.out), "--data", str(small),
                         "--out", str(tmp_path / "e")], capsys)
    assert code == 2 and "prepared at 16x16 px" in err and "takes 32x32 px" in err
    assert "--size 32" in err
    code, err = run_cli(["evaluate", "--checkpoint", str(tmp_path / "nope"), "--data",
                         str(small), "--out", str(tmp_path / "e")], capsys)
    assert code == 2 and "nope does not exist" in err
    code, err = run_cli(["evaluate", "--checkpoint", str(cfg.out), "--data", str(small),
                         "--split", "holdout", "--out", str(tmp_path / "e")], capsys)
    assert code == 2 and "unknown split 'holdout'" in err
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    code, err = run_cli(["evaluate", "--checkpoint", str(junk), "--data", str(small),
                         "--out", str(tmp_path / "e")], capsys)
    assert code == 2 and "junk.pt: corrupt or unreadable" in err


# ----------------------------------------------------------------- real prepare, generate

def test_vae_cell_on_a_prepared_phantom_dataset(prepared_phantom, tmp_path):
    """Through `brainhpc prepare`'s real output (64 px phantoms with tumour masks)."""
    m = classify(ClassifyConfig(model="vae", train_data="real", techniques="giaem",
                                data=prepared_phantom, out=tmp_path / "v", epochs=1,
                                batch_size=16, latent_dim=16, progress=False, device="cpu"))
    block = m["techniques"]["giaem"]
    assert m["image_size"] == 64 and block["test"]["n"] == sum(
        block["test"]["n_per_class"].values())
    assert block["localisation"]["n"] == block["test"]["n_per_class"]["tumour"] > 0
    assert 0.0 <= block["localisation"]["dice_mean"] <= 1.0
    assert m["image_statistics_baseline"]["roc_auc"] is not None



def test_classify_reads_what_generate_writes(prepared, tmp_path):
    """generate cells with --out SYN_DIR/<arch>-<label> are exactly what synthetic:<arch> reads."""
    from brainhpc.generate import GenerateConfig, generate

    syn = tmp_path / "syn"
    for label in ("healthy", "tumour"):
        generate(GenerateConfig(arch="vae", label=label, data=prepared, out=syn / f"vae-{label}",
                                epochs=1, batch_size=16, n_samples=24, quality=False,
                                min_images=16, progress=False, device="cpu",
                                options={"base": 8, "latent": 16, "max_channels": 32}))
    m = classify(ClassifyConfig(model="cnn", train_data="synthetic:vae", data=prepared,
                                synthetic_dir=syn, out=tmp_path / "c", **FAST))
    assert m["n_train"] == {"total": 48, "healthy": 24, "tumour": 24, "synthetic": 48, "real": 0}


def test_vae_checkpoint_from_before_the_four_technique_detector_is_a_clear_error(cnn_cell,
                                                                                 tmp_path):
    cfg, _ = cnn_cell
    state = torch.load(cfg.out / "model.pt", weights_only=True)
    state.update(model="vae", technique="giaem")  # the old one-technique layout
    torch.save(state, tmp_path / "model.pt")
    with pytest.raises(BrainhpcError, match="older brainhpc.*techniques, residual.*re-run"):
        load_classifier(tmp_path / "model.pt")
