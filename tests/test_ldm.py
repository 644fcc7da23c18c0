"""Latent diffusion (``generate --arch ldm``): options, the two phases through the real trainer,
the latent scale across a resume, and sampling."""

import json

import numpy as np
import pytest
import torch

from brainhpc import models
from brainhpc.data import phantom
from brainhpc.data.preprocess import preprocess_array
from brainhpc.errors import BrainhpcError
from brainhpc.models import ldm
from brainhpc.train import TrainConfig, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"ae_channels": [8, 8], "unet_channels": [8, 16], "unet_res_blocks": 1,
        "head_channels": 8, "d_channels": 8, "d_layers": 2, "timesteps": 40, "sample_steps": 4}
AE_STEPS = 2  # steps 0, 1: autoencoder (patch loss from step 1); 2 on: diffusion


@pytest.fixture(scope="module")
def slices():
    """24 phantom slices at 32 px (uint8, N x 1 x 32 x 32), as ``prepare`` crops them."""
    imgs = [preprocess_array(p.image, 32)[0] for p in phantom.generate(24, seed=5)]
    return torch.from_numpy(np.stack(imgs)[:, None])


def run(out, data, epochs=2, opts=None, **kw):
    """A trainer of the tiny LDM on ``data`` (batch 8: 3 steps per epoch of 24)."""
    task = models.build_task("ldm", 32, {**TINY, "ae_steps": AE_STEPS, "adv_start": 1,
                                         "batch_size": 8, "epochs": epochs, **(opts or {})},
                             image_channels=data.shape[1])
    base = dict(out=out, epochs=epochs, batch_size=8, progress=False, device="cpu",
                precision="fp32", checkpoint_every=0, checkpoint_minutes=0, log_every=1)
    cfg = TrainConfig(**{**base, **kw})
    return task, Trainer(task, torch.utils.data.TensorDataset(data), cfg)


def records(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------ options
@pytest.mark.parametrize("opts, match", [
    ({"schedule": "cosin"}, "option schedule 'cosin' is not one of scaled_linear_beta"),
    ({"prediction": "x0"}, "option prediction 'x0' is not one of epsilon, v_prediction"),
    ({"ae_channels": [16, 32, 64, 64, 64, 64, 64]}, "option ae_channels needs >= 2 levels"),
    ({"ae_channels": "16,32"}, "option ae_channels must be a list of positive integers"),
    ({"unet_channels": [8, 8, 8, 8, 8, 8]}, "option unet_channels needs >= 2 levels.*16 px"),
    ({"head_channels": 12}, r"option head_channels 12 does not divide .*\(16 channels\)"),
    ({"ae_steps": 0}, "option ae_steps must be an integer >= 1"),
    ({"lr": 0}, "option lr must be > 0"),
    ({"adv_start": -1}, "option adv_start must be an integer >= 0"),
    ({"kl_weight": -1e-6}, "option kl_weight must be >= 0"),
    ({"ema": 1.0}, r"option ema must be in \[0, 1\)"),
    ({"sample_steps": 50}, "option sample_steps 50 > timesteps 40"),
])
def test_bad_options_name_the_option(opts, match):
    with pytest.raises(BrainhpcError, match=f"ldm: {match}"):
        models.make_config("ldm", 32, {**TINY, **opts})


def test_defaults_and_latent_shape():
    cfg = ldm.Config()
    assert cfg.size == 64 and cfg.latent_size == 16 and cfg.sample_steps == 50
    assert cfg.adv_start < cfg.ae_steps
    net = ldm.LatentDiffusion(models.make_config("ldm", 32, TINY))
    recon, mu, sigma = net(torch.zeros(2, 1, 32, 32))
    assert recon.shape == (2, 1, 32, 32) and mu.shape == sigma.shape == (2, 3, 16, 16)
    assert net(mu, torch.tensor([0, 39])).shape == mu.shape
    assert not any(p.requires_grad for p in net.unet_ema.parameters())


# ------------------------------------------------------------------ training
def test_both_phases_train_through_the_trainer(slices, tmp_path):
    task, t = run(tmp_path, slices)
    ldm_net = t.raw("ldm")
    ae0 = {k: v.clone() for k, v in ldm_net.autoencoder.state_dict().items()}
    with t:
        summary = t.fit()
    assert summary["step"] == 6 and summary["status"] == "done"
    recs = [r for r in records(tmp_path) if r["kind"] == "train"]
    ae, diff = recs[:AE_STEPS], recs[AE_STEPS:]
    assert "g_loss" not in ae[0] and "d_loss" in ae[1]  # the patch loss from adv_start on
    assert all(np.isfinite(r[k]) for r in ae for k in ("l1", "ssim", "kl", "loss"))
    assert len(diff) == 4 and all(np.isfinite(r["loss"]) for r in diff)
    scale = float(ldm_net.scale_factor)
    assert np.isfinite(scale) and scale != 1.0 and scale > 0
    assert all(r["scale_factor"] == pytest.approx(scale) for r in diff)
    changed = [k for k, v in ldm_net.autoencoder.state_dict().items() if not torch.equal(v, ae0[k])]
    assert changed  # phase 1 trained the autoencoder ...
    # ... and its EMA of the UNet moved away from the initial weights but is not the UNet
    ema, unet = ldm_net.unet_ema.state_dict(), ldm_net.unet.state_dict()
    assert any(not torch.equal(ema[k], unet[k]) for k in unet)


def test_bf16_autocast_trains_both_phases_with_masks(slices, tmp_path):
    pairs = torch.cat([slices, (slices > 200).to(torch.uint8) * 255], 1)  # image + "mask"
    task, t = run(tmp_path, pairs, epochs=1, precision="bf16")
    with t:
        assert t.fit()["precision"]["name"] == "bf16"
    recs = [r for r in records(tmp_path) if r["kind"] == "train"]
    assert len(recs) == 3 and all(np.isfinite(r["loss"]) for r in recs)
    assert task.noise.alphas_cumprod.dtype == torch.float32  # latents stay fp32 for the noise
    out = task.sample(t.raw("ldm"), 2, torch.Generator().manual_seed(0))
    assert out.shape == (2, 2, 32, 32) and out.dtype == torch.float32


def test_too_few_steps_for_the_diffusion_phase_is_refused(slices, tmp_path):
    _, t = run(tmp_path, slices, epochs=1, opts={"ae_steps": 3})
    with t, pytest.raises(BrainhpcError, match=r"ae_steps 3 >= the run's 3 training steps "
                                               r"\(1 epochs of 3\)"):
        t.fit()


@pytest.mark.parametrize("cut", [AE_STEPS, 4])  # at the switch, after it
def test_resume_keeps_the_scale_and_ends_where_an_uninterrupted_run_does(slices, tmp_path, cut):
    _, ref = run(tmp_path / "ref", slices)
    with ref:
        ref.fit()
    _, part = run(tmp_path / "cut", slices, max_steps=cut)
    with part:
        part.fit()
    scale_at_cut = float(part.raw("ldm").scale_factor)
    assert (scale_at_cut == 1.0) == (cut == AE_STEPS)  # measured at the first phase-2 step
    _, resumed = run(tmp_path / "cut", slices)
    assert float(resumed.raw("ldm").scale_factor) == scale_at_cut  # from the checkpoint
    with resumed:
        summary = resumed.fit()
    assert summary["resumed"] and summary["step"] == 6
    a, b = ref.raw("ldm").state_dict(), resumed.raw("ldm").state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------ sampling
@pytest.mark.parametrize("channels", [1, 2])
def test_samples_have_shape_range_and_depend_only_on_the_seed(channels):
    task = models.build_task("ldm", 32, {**TINY, "batch_size": 4}, image_channels=channels)
    net = task.models()["ldm"]
    net.scale_factor.fill_(0.5)
    out = task.sample(net, 5, torch.Generator().manual_seed(0), batch=3)
    assert out.shape == (5, channels, 32, 32) and out.dtype == torch.float32
    assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0 and float(out.std()) > 0
    again = task.sample(net, 5, torch.Generator().manual_seed(0), batch=3)
    assert torch.equal(out, again)
    other = task.sample(net, 5, torch.Generator().manual_seed(1), batch=3)
    assert not torch.equal(out, other)


def test_sampling_uses_the_ema_unet_and_the_scale():
    task = models.build_task("ldm", 32, {**TINY, "batch_size": 4})
    net = task.models()["ldm"]
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    base = task.sample(net, 2, gen())
    with torch.no_grad():
        for p in net.unet.parameters():
            p.add_(1.0)  # the raw UNet is not what samples
    assert torch.equal(task.sample(net, 2, gen()), base)
    net.scale_factor.fill_(4.0)
    assert not torch.equal(task.sample(net, 2, gen()), base)
    assert task.models()["ldm"].sampler() is not None
    no_ema = models.build_task("ldm", 32, {**TINY, "batch_size": 4, "ema": 0})
    plain = no_ema.models()["ldm"]
    assert plain.unet_ema is None and plain.sampler() is plain.unet
    assert task.sample_ema and not no_ema.sample_ema


def test_zero_term_gives_every_parameter_a_zero_gradient():
    """What keeps DDP (no find_unused_parameters) valid when a phase leaves a part untrained."""
    net = ldm.LatentDiffusion(models.make_config("ldm", 32, TINY))
    recon, _, _ = net(torch.zeros(1, 1, 32, 32))
    (recon.mean() + ldm.zero_term(net.unet)).backward()
    assert all(p.grad is not None and not p.grad.any() for p in net.unet.parameters())
    assert all(p.grad is None for p in net.unet_ema.parameters())


def test_the_fast_ssim_is_monais_in_value_and_gradient():
    """brainhpc.models.ssim replaces MONAI's SSIM in the VAE and LDM losses for speed only."""
    from monai.losses import SSIMLoss
    from monai.metrics.regression import compute_ssim_and_cs

    from brainhpc.models.ssim import ssim, ssim_map

    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 2, 40, 36, generator=g)
    y = (x + 0.2 * torch.rand(4, 2, 40, 36, generator=g)).clamp(0, 1)
    ours = y.clone().requires_grad_(True)
    theirs = y.clone().requires_grad_(True)
    ref, _ = compute_ssim_and_cs(theirs, x, spatial_dims=2, kernel_size=(11, 11),
                                 kernel_sigma=(1.5, 1.5), data_range=1.0)
    got = ssim_map(ours, x)
    assert got.shape == ref.shape == (4, 2, 30, 26)
    assert torch.allclose(got, ref, atol=1e-5)
    got.sum().backward()
    ref.sum().backward()
    assert torch.allclose(ours.grad, theirs.grad, atol=1e-4)  # gradients up to ~2
    signed_x, signed_y = 2 * x - 1, 2 * y - 1  # the LDM's [-1, 1] images, data range 2
    loss = SSIMLoss(spatial_dims=2, data_range=2.0)(signed_y, signed_x)
    assert torch.allclose(1 - ssim(signed_y, signed_x, data_range=2.0).mean(), loss, atol=1e-5)
    with pytest.raises(ValueError, match="smaller than its 11 px window"):
        ssim(x[..., :8, :8], y[..., :8, :8])
