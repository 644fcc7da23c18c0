"""Generator options for convergence (issue 22): spectral norm and lr schedules of the GANs, the
VAE's L1 + SSIM reconstruction and KL warm-up, their validation, resume and host-sync rules."""

import json
import math

import numpy as np
import pytest
import torch
from torch.nn.utils import parametrize

from brainhpc import models
from brainhpc.data import phantom
from brainhpc.data.preprocess import preprocess_array
from brainhpc.errors import BrainhpcError
from brainhpc.models import dcgan, vae
from brainhpc.train import TrainConfig, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {
    "vae": {"base": 8, "latent": 16, "max_channels": 32},
    "dcgan": {"g_channels": 16, "min_channels": 8, "d_channels": 8},
    "wgan-gp": {"g_channels": 16, "min_channels": 8, "d_channels": 8, "n_critic": 2},
}


@pytest.fixture(scope="module")
def slices():
    """32 phantom slices at 32 px (uint8, N x 1 x 32 x 32), as ``prepare`` crops them."""
    imgs = [preprocess_array(p.image, 32)[0] for p in phantom.generate(32, seed=3)]
    return torch.from_numpy(np.stack(imgs)[:, None])


def trainer(arch, data, out, opts, batch=8, precision="fp32", **kw):
    task = models.build_task(arch, 32, {**TINY[arch], **opts, "batch_size": batch})
    base = dict(out=out, epochs=1, batch_size=batch, progress=False, device="cpu",
                precision=precision, checkpoint_every=0, checkpoint_minutes=0, log_every=1)
    return task, Trainer(task, torch.utils.data.TensorDataset(data), TrainConfig(**{**base, **kw}))


def train_records(out):
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == "train"]


def sn_layers(net):
    return [m for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]


# ------------------------------------------------------------------ spectral norm
def test_spectral_norm_bounds_the_discriminator_and_can_be_turned_off():
    critic = dcgan.Task(dcgan.Config(size=32, **TINY["dcgan"])).models()["critic"]
    layers = sn_layers(critic)
    assert len(layers) == 5 and all(parametrize.is_parametrized(m, "weight") for m in layers)
    x = torch.randn(4, 1, 32, 32)
    for _ in range(30):  # each training-mode forward is one power iteration
        critic(x)
    for m in layers:
        sigma = torch.linalg.matrix_norm(m.weight.detach().flatten(1), ord=2)
        assert float(sigma) == pytest.approx(1.0, abs=0.05)
    plain = dcgan.Task(dcgan.Config(size=32, spectral_norm=False, **TINY["dcgan"])).models()
    assert not any(parametrize.is_parametrized(m) for m in sn_layers(plain["critic"]))
    # the generator is never normalised; WGAN-GP's critic only on request
    assert not any(parametrize.is_parametrized(m) for m in sn_layers(plain["generator"]))
    wgan = models.build_task("wgan-gp", 32, TINY["wgan-gp"]).models()["critic"]
    assert not any(parametrize.is_parametrized(m) for m in sn_layers(wgan))
    wgan = models.build_task("wgan-gp", 32, {**TINY["wgan-gp"], "spectral_norm": True}).models()
    assert all(parametrize.is_parametrized(m, "weight") for m in sn_layers(wgan["critic"]))


# ------------------------------------------------------------------ lr schedules
def test_lr_factor_curves():
    f = dcgan.lr_factor
    assert all(f("constant", s, 10) == 1.0 for s in range(10))
    for sched in ("cosine", "linear"):
        curve = [f(sched, s, 11) for s in range(11)]
        assert curve[0] == 1.0 and curve[-1] == pytest.approx(dcgan.LR_FLOOR)
        assert all(a > b for a, b in zip(curve, curve[1:], strict=False))
        assert curve[5] == pytest.approx(0.55)  # both pass half-way between 1 and the floor
        assert f(sched, 20, 11) == pytest.approx(dcgan.LR_FLOOR)  # past the end: the floor
    assert f("cosine", 2, 11) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.2)))
    assert f("linear", 0, 1) == 1.0  # a one-step run


@pytest.mark.parametrize("arch", ["dcgan", "wgan-gp"])
def test_gan_with_spectral_norm_and_cosine_schedule_trains(arch, slices, tmp_path):
    task, t = trainer(arch, slices[:24], tmp_path, {"spectral_norm": True,
                                                     "lr_schedule": "cosine"})
    seen = []
    inner = task.training_step

    def step(tr, b):
        out = inner(tr, b)
        seen.append(tr.optimizers["critic"].param_groups[0]["lr"])
        return out

    task.training_step = step
    assert t.fit()["step"] == 3
    lr = task.cfg.lr
    assert seen == pytest.approx([lr, lr * 0.55, lr * dcgan.LR_FLOOR])
    for opt in t.optimizers.values():
        assert opt.param_groups[0]["lr"] == pytest.approx(lr * dcgan.LR_FLOOR)
    recs = train_records(tmp_path)
    assert [r["lr_generator"] for r in recs] == pytest.approx(seen)
    assert all(math.isfinite(v) for r in recs for k, v in r.items() if k.endswith("loss"))


def test_spectral_norm_under_bf16_autocast(slices, tmp_path):
    """The power iteration runs inside autocast: buffers stay fp32, losses finite."""
    task, t = trainer("dcgan", slices[:16], tmp_path, {}, precision="bf16")
    t.fit()
    critic = t.raw("critic")
    assert critic.net[0].parametrizations.weight[0]._u.dtype == torch.float32
    assert all(math.isfinite(r["d_loss"]) for r in train_records(tmp_path))


def test_resume_with_spectral_norm_matches_an_uninterrupted_run(slices, tmp_path):
    opts = {"lr_schedule": "cosine", "ema": 0.9}
    _, ref = trainer("dcgan", slices[:24], tmp_path / "a", opts, epochs=2)
    ref.fit()
    task, cut = trainer("dcgan", slices[:24], tmp_path / "b", opts, epochs=2)
    inner = task.training_step
    task.training_step = lambda tr, b: (inner(tr, b), tr.step == 3 and
                                        tr.request_checkpoint(stop=True))[0]
    assert cut.fit()["status"] == "interrupted" and cut.step == 4
    saved = torch.load(tmp_path / "b" / "checkpoints" / "last.pt", weights_only=True)
    assert "net.0.parametrizations.weight.original" in saved["models"]["critic"]
    assert "net.0.parametrizations.weight.0._u" in saved["models"]["critic"]
    _, resumed = trainer("dcgan", slices[:24], tmp_path / "b", opts, epochs=2)
    assert resumed.resumed and resumed.step == 4
    assert resumed.fit()["status"] == "done" and resumed.step == 6
    for name in ("critic", "generator"):
        a, b = ref.raw(name).state_dict(), resumed.raw(name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    a, b = ref.ema["generator"].state_dict(), resumed.ema["generator"].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_without_spectral_norm_is_another_run(slices, tmp_path):
    from brainhpc.models import make_config

    def fp(sn):
        model = make_config("dcgan", 32, {**TINY["dcgan"], "spectral_norm": sn})
        return {"model": vars(model)}  # what the generate cell's fingerprint carries

    task = models.build_task("dcgan", 32, {**TINY["dcgan"], "batch_size": 8})
    cfg = TrainConfig(out=tmp_path, epochs=1, batch_size=8, progress=False, device="cpu",
                      precision="fp32", checkpoint_minutes=0)
    data = torch.utils.data.TensorDataset(slices[:8])
    Trainer(task, data, cfg, fingerprint=fp(True)).fit()
    plain = models.build_task("dcgan", 32, {**TINY["dcgan"], "batch_size": 8,
                                            "spectral_norm": False})
    with pytest.raises(BrainhpcError, match="different run.*spectral_norm"):
        Trainer(plain, data, cfg, fingerprint=fp(False))


# ------------------------------------------------------------------ VAE
def test_l1ssim_is_zero_for_a_perfect_reconstruction_and_scales_per_pixel(slices):
    x = slices[:4].float().div(255).clamp(0.01, 0.99)
    perfect = vae.reconstruction("l1ssim", torch.logit(x), x)
    assert float(perfect) == pytest.approx(0.0, abs=1e-3)
    grey = vae.reconstruction("l1ssim", torch.zeros_like(x), x)  # x_hat = 0.5 everywhere
    assert 0.2 * 32 * 32 < float(grey) < 2 * 32 * 32  # a per-pixel sum: order of the pixels


def test_vae_l1ssim_loss_is_finite_and_decreases(slices, tmp_path):
    task, t = trainer("vae", slices, tmp_path, {"recon": "l1ssim", "lr": 2e-3}, batch=16,
                      epochs=8)
    t.fit()
    recon = [r["recon"] for r in train_records(tmp_path)]
    assert len(recon) == 16 and all(math.isfinite(v) for v in recon)
    assert np.mean(recon[-4:]) < 0.85 * np.mean(recon[:2])


def test_kl_warmup_schedule(slices, tmp_path):
    assert [vae.kl_factor(s, 4) for s in (0, 1, 2, 4, 9)] == [0.0, 0.25, 0.5, 1.0, 1.0]
    assert vae.kl_factor(0, 0) == 1.0
    _, t = trainer("vae", slices[:16], tmp_path, {"kl_warmup": 4, "kl_weight": 0.5}, epochs=3)
    t.fit()
    recs = train_records(tmp_path)
    assert [r["kl_weight"] for r in recs] == pytest.approx([0, 0.125, 0.25, 0.375, 0.5, 0.5])
    assert recs[0]["loss"] == pytest.approx(recs[0]["recon"])  # no KL on the first step


# ------------------------------------------------------------------ validation
@pytest.mark.parametrize("arch, opts, match", [
    ("dcgan", {"spectral_norm": "yes"}, "option spectral_norm must be true or false, got 'yes'"),
    ("dcgan", {"lr_schedule": "step"}, "lr_schedule 'step' is not one of constant, cosine, "
                                       "linear"),
    ("wgan-gp", {"spectral_norm": 1}, "option spectral_norm must be true or false"),
    ("wgan-gp", {"lr_schedule": "Cosine"}, "lr_schedule 'Cosine' is not one of"),
    ("vae", {"recon": "mse"}, "vae: option recon 'mse' is not one of bce, l1ssim"),
    ("vae", {"kl_warmup": -1}, "vae: option kl_warmup must be an integer >= 0"),
    ("vae", {"kl_warmup": 2.5}, "kl_warmup must be an integer >= 0 .*got 2.5"),
    ("vae", {"kl_warmup": True}, "kl_warmup must be an integer"),
])
def test_bad_option_values_name_the_option_and_the_valid_ones(arch, opts, match):
    with pytest.raises(BrainhpcError, match=match):
        models.make_config(arch, 32, opts)


def test_new_options_are_listed():
    assert {"spectral_norm", "lr_schedule"} <= set(models.option_names("dcgan"))
    assert {"spectral_norm", "lr_schedule"} <= set(models.option_names("wgan-gp"))
    assert {"recon", "kl_warmup"} <= set(models.option_names("vae"))
    assert dcgan.Config().spectral_norm and not models.make_config("wgan-gp", 32).spectral_norm
    assert vae.Config().recon == "bce" and vae.Config().kl_warmup == 0  # the reference study's


# ------------------------------------------------------------------ no host syncs
@pytest.mark.parametrize("arch, opts", [
    ("dcgan", {"lr_schedule": "cosine", "ema": 0}),
    ("wgan-gp", {"spectral_norm": True, "lr_schedule": "linear", "ema": 0}),
    ("vae", {"recon": "l1ssim", "kl_warmup": 3}),
])
def test_new_options_add_no_host_sync_to_a_step(arch, opts):
    from brainhpc.train import throughput as tp

    task = models.build_task(arch, 32, {**TINY[arch], **opts, "batch_size": 4})
    got = tp.host_syncs(arch, 32, "fp32", torch.device("cpu"), steps=5, batch=4, task=task)
    assert got == [0] * 4
