"""Generators: architectures, the generate cell end to end on tiny phantom data, and bad input."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from brainhpc import models
from brainhpc.data.shards import LABELS, load_split, write_shards
from brainhpc.errors import BrainhpcError
from brainhpc.generate import GenerateConfig, generate
from brainhpc.models import dcgan, ddpm, vae, wgan_gp

TINY = {
    "vae": {"base": 8, "latent": 16, "max_channels": 32},
    "dcgan": {"g_channels": 16, "min_channels": 8, "d_channels": 8},
    "wgan-gp": {"g_channels": 16, "min_channels": 8, "d_channels": 8, "n_critic": 2},
    "ddpm": {"channels": 8, "res_blocks": 1, "timesteps": 40, "sample_steps": 4},
    "ldm": {"ae_channels": [8, 8], "unet_channels": [8, 16], "unet_res_blocks": 1,
            "head_channels": 8, "d_channels": 8, "d_layers": 2, "ae_steps": 1, "adv_start": 0,
            "timesteps": 40, "sample_steps": 4},
}

pytestmark = pytest.mark.usefixtures("one_thread")



def phantom(rng, size, tumour):
    """A phantom-like slice: elliptic brain with texture, two ventricles, a bright lesion."""
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
    if tumour:
        tx, ty = rng.uniform(-0.2, 0.2, 2)
        r = rng.uniform(0.05, 0.1)
        img[((xx - cx - tx) ** 2 + (yy - cy - ty) ** 2 < r * r) & brain] = 0.95
    img = img + 0.03 * rng.standard_normal(img.shape)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def make_prepared(root, size=32, n_train=40, n_held=12, seed=0, n_tumour=None):
    """A prepared-dataset folder: train/val/test shards (both labels) and manifest.json."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_held), ("test", n_held)):
        nt = n if n_tumour is None or split != "train" else n_tumour
        labels = np.array([0] * n + [1] * nt)
        imgs = np.stack([phantom(rng, size, bool(lab)) for lab in labels])[:, None]
        write_shards(root / split, imgs, labels, [f"{split}/{i}" for i in range(len(labels))],
                     attrs={"size": size, "seed": seed})
    (root / "manifest.json").write_text(json.dumps({"format": 1,
                                                    "config": {"size": size, "seed": seed}}))
    return root


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return make_prepared(tmp_path_factory.mktemp("prepared"))


def cfg_for(arch, prepared, out, **kw):
    base = dict(arch=arch, label="tumour", data=prepared, out=out, epochs=1, batch_size=16,
                n_samples=12, options=TINY[arch], quality=False, min_images=16, progress=False,
                device="cpu")
    return GenerateConfig(**{**base, **kw})


# ------------------------------------------------------------------ architectures
@pytest.mark.parametrize("arch", list(models.ARCHS))
@pytest.mark.parametrize("size", [32, 64, 128])
def test_samples_have_shape_and_range(arch, size):
    task = models.build_task(arch, size, {**TINY[arch], "batch_size": 4})
    name = task.sample_model
    net = task.models()[name]
    out = task.sample(net, 3, torch.Generator().manual_seed(0))
    assert out.shape == (3, 1, size, size) and out.dtype == torch.float32
    assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0
    again = task.sample(net, 3, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)  # sampling is a pure function of the generator seed


def test_vae_at_128_is_the_papers_network():
    net = vae.VAE(vae.Config(size=128))
    convs = [m for m in net.encoder if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 6 and convs[-1].out_channels == 1024
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.encoder) == 6
    assert net.mu.out_features == 512 and net.fc.out_features == 1024 * 2 * 2
    ups = [m for m in net.decoder if isinstance(m, torch.nn.ConvTranspose2d)]
    assert len(ups) == 6
    logits, mu, logvar = net(torch.rand(2, 1, 128, 128))
    assert logits.shape == (2, 1, 128, 128) and mu.shape == logvar.shape == (2, 512)


def test_dcgan_structure_and_wgan_critic_has_no_batchnorm():
    task = dcgan.Task(dcgan.Config(size=128))
    ms = task.models()
    g, d = ms["generator"], ms["critic"]
    assert g.fc.out_features == 128 * 8 * 8 and g.latent == 100
    assert isinstance(g.net[-1], torch.nn.Tanh)
    assert sum(isinstance(m, torch.nn.Conv2d) for m in d.net) == 4
    assert d(torch.zeros(2, 1, 128, 128)).shape == (2,)
    critic = wgan_gp.Task(wgan_gp.Config(size=64)).models()["critic"]
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in critic.modules())


def _gan_trainer(arch, tmp_path, precision, **opts):
    from brainhpc.train import TrainConfig, Trainer

    task = models.build_task(arch, 32, {**TINY[arch], **opts, "batch_size": 8})
    data = torch.utils.data.TensorDataset(torch.randint(0, 256, (24, 1, 32, 32),
                                                        dtype=torch.uint8))
    cfg = TrainConfig(out=tmp_path, epochs=1, batch_size=8, progress=False, device="cpu",
                      precision=precision, checkpoint_every=0, checkpoint_minutes=0)
    return task, Trainer(task, data, cfg)


def test_dcgan_runs_its_generator_once_per_step(tmp_path):
    task, t = _gan_trainer("dcgan", tmp_path, "fp32")
    calls = []
    t.raw("generator").register_forward_hook(lambda m, i, o: calls.append(o.requires_grad))
    t.raw("critic").register_forward_hook(lambda m, i, o: calls.append(len(i[0])))
    t.fit()
    # per step: G once (with its graph), D on real + fake (16), D on the same fake for G (8)
    assert calls == [True, 16, 8] * 3


def test_wgan_gp_penalty_runs_in_fp32_under_bf16(tmp_path):
    task, t = _gan_trainer("wgan-gp", tmp_path, "bf16", n_critic=2)
    seen = []
    t.raw("critic").register_forward_hook(
        lambda m, i, o: seen.append((len(i[0]), torch.is_autocast_enabled("cpu"), o.dtype)))
    gen = []
    t.raw("generator").register_forward_hook(lambda m, i, o: gen.append(o.requires_grad))
    summary = t.fit()
    assert summary["precision"]["name"] == "bf16"
    # step 1: critic on real + fake in bf16, then the penalty's interpolates in fp32;
    # step 2 adds the generator update (generator output kept with its graph on that step)
    assert seen[:2] == [(16, True, torch.bfloat16), (8, False, torch.float32)]
    assert seen[2:5] == [(16, True, torch.bfloat16), (8, False, torch.float32),
                         (8, True, torch.bfloat16)]
    assert gen == [False, True, False]
    assert np.isfinite(float(task.last_g))


def test_diffaugment_keeps_shape_moves_content_and_passes_gradients():
    torch.manual_seed(0)
    x = torch.rand(8, 1, 32, 32).mul(2).sub(1).requires_grad_(True)
    y = dcgan.diff_augment(x, ["translation", "cutout"])
    assert y.shape == x.shape and not torch.equal(y, x)
    assert ((y == -1).flatten(1).sum(1) >= 16 * 16 - 1).all()  # a half-size cutout is background
    y.sum().backward()
    assert x.grad.abs().sum() > 0
    assert torch.equal(dcgan.diff_augment(x, []), x)


def test_ddpm_schedules_and_levels():
    for sched in ddpm.SCHEDULES:
        a = ddpm.alphas_cumprod(sched, 100)
        assert a.shape == (100,) and (a[1:] < a[:-1]).all() and 0 < a[-1] < a[0] < 1
    assert ddpm.Config(size=32).mults == (1, 2, 2)
    assert ddpm.Config(size=128).mults == (1, 1, 2, 2, 4)
    net = ddpm.UNet(ddpm.Config(size=64, channels=8, res_blocks=1))
    assert net(torch.randn(2, 1, 64, 64), torch.tensor([0, 999])).shape == (2, 1, 64, 64)


# ------------------------------------------------------------------ the generate cell
@pytest.mark.parametrize("arch", list(models.ARCHS))
def test_every_arch_trains_and_writes_valid_shards(arch, prepared, tmp_path):
    card = generate(cfg_for(arch, prepared, tmp_path / arch, label="tumor", seed=3))
    assert card["status"] == "done" and card["label"] == "tumour" and card["steps"] == 2
    data = load_split(tmp_path / arch / "shards")
    assert data.images.shape == (12, 1, 32, 32) and data.images.dtype == np.uint8
    assert (data.labels == LABELS["tumour"]).all()
    assert data.images.std() > 0  # not a constant image
    attrs = data.attrs
    assert attrs["generator"] == arch and attrs["seed"] == 3 and attrs["label"] == "tumour"
    assert Path(attrs["checkpoint"]).exists() and attrs["checkpoint_sha256"] == card[
        "checkpoint_sha256"]
    for name in ("samples.png", "real.png", "metrics.jsonl", "card.json"):
        assert (tmp_path / arch / name).stat().st_size > 0
    records = [json.loads(x) for x in (tmp_path / arch / "metrics.jsonl").read_text().splitlines()]
    assert records and all(np.isfinite(v) for r in records for v in r.values()
                           if isinstance(v, float))


def test_card_quality_and_memorisation(prepared, tmp_path):
    card = generate(cfg_for("vae", prepared, tmp_path / "q", quality=True, feature_steps=20))
    q = card["quality"]
    assert q["n_synthetic"] == 12 and q["n_real"] == 24 and q["heldout_split"] == "val+test"
    assert q["fid"] >= 0 and np.isfinite(q["kid"])
    assert q["memorisation"]["n_train"] == 40 and (tmp_path / "q" / "memorisation.png").exists()
    on_disk = json.loads((tmp_path / "q" / "card.json").read_text())
    assert on_disk["quality"]["fid"] == q["fid"] and on_disk["wall_seconds"] > 0


def test_rerun_skips_conflict_needs_force(prepared, tmp_path):
    out = tmp_path / "r"
    first = generate(cfg_for("dcgan", prepared, out))
    mtime = (out / "shards" / "shard-00000.h5").stat().st_mtime_ns
    again = generate(cfg_for("dcgan", prepared, out))
    assert again["skipped"] and (out / "shards" / "shard-00000.h5").stat().st_mtime_ns == mtime
    with pytest.raises(BrainhpcError, match="different config.*seed"):
        generate(cfg_for("dcgan", prepared, out, seed=5))
    redone = generate(cfg_for("dcgan", prepared, out, seed=5, force=True))
    assert redone["seed"] == 5 and not redone.get("skipped") and not redone["resumed"]
    assert first["checkpoint_sha256"] != redone["checkpoint_sha256"]


def test_interrupted_run_resumes_to_the_same_samples(prepared, tmp_path):
    generate(cfg_for("vae", prepared, tmp_path / "ref", epochs=2))  # uninterrupted
    # an interrupted run: stopped after the first epoch, card left as "running"
    cfg = cfg_for("vae", prepared, tmp_path / "cut", epochs=2)
    part = generate(GenerateConfig(**{**cfg.__dict__, "epochs": 1}))
    (tmp_path / "cut" / "card.json").unlink()  # as if stopped there: no card, config running
    (tmp_path / "cut" / "config.json").write_text(json.dumps({"status": "running",
                                                              "config": cfg.identity()}))
    assert part["steps"] == 2
    done = generate(cfg)
    assert done["resumed"] and done["steps"] == 4
    a, b = load_split(tmp_path / "ref" / "shards"), load_split(tmp_path / "cut" / "shards")
    assert np.array_equal(a.images, b.images)


# ------------------------------------------------------------------ bad input
def test_unknown_arch_and_label_list_valid_ones(prepared, tmp_path):
    with pytest.raises(BrainhpcError, match="unknown arch 'gan'.*vae, dcgan, wgan-gp, ddpm"):
        GenerateConfig(arch="gan", label="tumour", data=prepared, out=tmp_path)
    with pytest.raises(BrainhpcError, match="unknown label 'tumours'.*healthy, tumour"):
        GenerateConfig(arch="vae", label="tumours", data=prepared, out=tmp_path)
    with pytest.raises(BrainhpcError, match="unknown option.*wdith.*valid: latent"):
        GenerateConfig(arch="vae", label="tumour", data=prepared, out=tmp_path,
                       options={"wdith": 3})
    with pytest.raises(BrainhpcError, match="diffaugment.*colour"):
        generate(cfg_for("dcgan", prepared, tmp_path / "x",
                         options={**TINY["dcgan"], "diffaugment": "colour"}))


def test_missing_or_incompatible_prepared_folder(prepared, tmp_path):
    with pytest.raises(BrainhpcError, match="does not exist"):
        generate(cfg_for("vae", tmp_path / "nope", tmp_path / "o"))
    bare = tmp_path / "bare"
    bare.mkdir()
    with pytest.raises(BrainhpcError, match="manifest.json is missing"):
        generate(cfg_for("vae", bare, tmp_path / "o"))
    (bare / "manifest.json").write_text(json.dumps({"format": 99, "config": {"size": 32}}))
    with pytest.raises(BrainhpcError, match="format 99"):
        generate(cfg_for("vae", bare, tmp_path / "o"))
    old = make_prepared(tmp_path / "old", n_train=20, n_held=2)
    import h5py
    with h5py.File(old / "train" / "shard-00000.h5", "a") as f:
        f.attrs["format"] = 0  # written by an older brainhpc
    with pytest.raises(BrainhpcError, match="shard format 0"):
        generate(cfg_for("vae", old, tmp_path / "o"))


def test_too_few_images_of_a_label(tmp_path):
    data = make_prepared(tmp_path / "few", n_train=20, n_held=2, n_tumour=5)
    with pytest.raises(BrainhpcError, match="has 5 tumour images, fewer than the 16"):
        generate(cfg_for("vae", data, tmp_path / "o"))
    with pytest.raises(BrainhpcError, match="batch_size 32 exceeds the 20 healthy"):
        generate(cfg_for("vae", data, tmp_path / "o", label="healthy", batch_size=32))


def test_corrupt_checkpoint_is_an_error_not_a_restart(prepared, tmp_path):
    out = tmp_path / "c"
    generate(cfg_for("vae", prepared, out))
    card = json.loads((out / "card.json").read_text())
    (out / "card.json").write_text(json.dumps({**card, "status": "failed"}))
    ckpt = out / "checkpoints" / "last.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])  # truncated by a crash of the file system
    with pytest.raises(BrainhpcError, match="last.pt: corrupt or unreadable checkpoint"):
        generate(cfg_for("vae", prepared, out))
    assert ckpt.stat().st_size == 1000  # left alone for the user to inspect


def test_checkpoint_of_another_model_is_refused(prepared, tmp_path):
    out = tmp_path / "m"
    generate(cfg_for("vae", prepared, out))
    (out / "card.json").unlink()  # the cell's records lost: the checkpoint itself must refuse
    (out / "config.json").unlink()
    with pytest.raises(BrainhpcError, match="different run"):
        generate(cfg_for("vae", prepared, out, options={**TINY["vae"], "latent": 8}))


def test_nan_loss_stops_and_marks_the_run_failed(prepared, tmp_path):
    out = tmp_path / "n"
    with pytest.raises(BrainhpcError, match="non-finite loss at step 1"):
        generate(cfg_for("vae", prepared, out, options={**TINY["vae"], "kl_weight": 1e39}))
    state = json.loads((out / "config.json").read_text())
    assert state["status"] == "failed" and "non-finite" in state["error"]
    assert not (out / "shards").exists() and not (out / "card.json").exists()


def test_cli_parser_runs_generate(prepared, tmp_path):
    from brainhpc.cli import build_parser

    args = build_parser().parse_args([
        "generate", "--arch", "wgan-gp", "--label", "tumor", "--data", str(prepared),
        "--out", str(tmp_path / "cli"), "--epochs", "1", "--n-samples", "5", "--seed", "2",
        "--batch-size", "16", "--no-quality", "--no-progress", "--device", "cpu",
        "--min-images", "16", *[x for k, v in TINY["wgan-gp"].items()
                                for x in ("--opt", f"{k}={v}")], "--opt", "diffaugment=cutout"])
    assert args.func(args) == 0
    card = json.loads((tmp_path / "cli" / "card.json").read_text())
    assert card["label"] == "tumour" and card["model"]["diffaugment"] == "cutout"
    assert len(load_split(tmp_path / "cli" / "shards")) == 5


def test_every_architecture_is_a_training_data_generator():
    """``synthetic:<arch>`` must name every generator the generate stage can train."""
    from brainhpc.data.training import GENERATORS

    assert GENERATORS == tuple(models.ARCHS)


def test_steps_size_a_cell_whatever_its_image_count(prepared, tmp_path):
    """``steps`` trains exactly that many steps: epochs follow from the label's image count
    (40 images of batch 16 make 2 steps an epoch, so 5 steps take 3 epochs, the last cut)."""
    card = generate(cfg_for("vae", prepared, tmp_path / "s", epochs=None, steps=5))
    assert card["status"] == "done" and card["steps"] == 5 and card["epochs"] == 3
    with pytest.raises(BrainhpcError, match=r"give steps \(5\) or epochs, not both"):
        cfg_for("vae", prepared, tmp_path / "b", epochs=2, steps=5)


def test_an_ldm_sized_in_steps_must_leave_steps_for_its_diffusion_model(prepared, tmp_path):
    """Refused at configuration (so the sweep's --dry-run says it), not after the autoencoder
    phase: with steps <= ae_steps the diffusion UNet would never train."""
    opts = {**TINY["ldm"], "ae_steps": 40}
    with pytest.raises(BrainhpcError, match=r"steps 40 <= ae_steps 40: the ldm diffusion"):
        cfg_for("ldm", prepared, tmp_path / "l", epochs=None, steps=40, options=opts)
    assert cfg_for("ldm", prepared, tmp_path / "k", epochs=None, steps=41, options=opts).steps == 41
