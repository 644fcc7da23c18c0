"""BrainCNN and BrainCVAE: shapes at 32/64/128 px, the VAE objective, and that the VAE learns."""

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from brainhpc.errors import BrainhpcError
from brainhpc.models.classifiers import BrainCNN, BrainCVAE, vae_loss


@contextlib.contextmanager
def small_tensor_backend():
    """oneDNN (mkldnn) convolutions cost ~25 ms a call on this CPU for tiny 32 px batches
    (40x the native kernel, measured); training tests on tiny tensors use the native kernels."""
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = before


@pytest.mark.parametrize("size", [32, 64, 128])
def test_cnn_shapes(size):
    torch.manual_seed(0)
    model = BrainCNN(image_size=size).eval()
    x = torch.rand(3, 1, size, size)
    assert model(x).shape == (3, 2)
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 64, 128]
    assert all(c.kernel_size == (3, 3) and c.stride == (1, 1) for c in convs)
    linears = [m for m in model.classifier if isinstance(m, nn.Linear)]
    assert [m.out_features for m in linears] == [1024, 512, 128, 2]
    assert linears[0].in_features == 128 * (size // 8) ** 2


def test_cnn_dropout_is_configurable_and_off_in_eval():
    model = BrainCNN(image_size=32, dropout=0.2)
    drops = [m for m in model.classifier if isinstance(m, nn.Dropout)]
    assert len(drops) == 3 and all(d.p == 0.2 for d in drops)
    x = torch.rand(2, 1, 32, 32)
    model.eval()
    assert torch.equal(model(x), model(x))


def test_cnn_learns_a_trivial_task():
    torch.manual_seed(0)
    x = torch.rand(16, 1, 32, 32) * 0.5
    y = torch.arange(16) % 2
    x[y == 1, :, 8:16, 8:16] += 0.5  # tumour images carry a bright square
    model = BrainCNN(image_size=32, dropout=0.0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    with small_tensor_backend():
        for _ in range(8):
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("size", [32, 64, 128])
def test_vae_shapes_and_error_maps(size):
    torch.manual_seed(0)
    model = BrainCVAE(image_size=size, latent_dim=16)
    x = torch.rand(2, 1, size, size)
    logits, mu, logvar = model(x)
    assert logits.shape == x.shape and mu.shape == logvar.shape == (2, 16)
    x_hat = model.decode(mu)  # the reconstruction: sigmoid of the logits
    assert x_hat.shape == x.shape and x_hat.min() >= 0 and x_hat.max() <= 1
    maps = model.error_maps(x, batch_size=1)
    model.eval()
    torch.testing.assert_close(maps, (x - torch.sigmoid(model(x)[0]))[:, 0].abs())  # |x - x_hat|
    model.train()
    assert maps.shape == (2, size, size) and maps.min() >= 0 and maps.max() <= 1
    assert torch.equal(maps, model.error_maps(x, batch_size=1))  # deterministic: decodes the mean
    torch.testing.assert_close(maps, model.error_maps(x))  # batching changes nothing
    assert model.training  # error_maps restores the mode it found


def test_vae_layout_follows_the_spec():
    model = BrainCVAE(image_size=64, latent_dim=8)
    enc = [m for m in model.encoder if isinstance(m, nn.Conv2d)]
    dec = [m for m in model.decoder if isinstance(m, nn.ConvTranspose2d)]
    assert len(enc) == 2 and len(dec) == 2
    assert model.to_stats.out_features == 2 * 8 and model.from_latent.in_features == 8


def test_vae_loss_hand_computed():
    x = torch.full((2, 1, 2, 2), 0.5)
    x_hat = torch.logit(torch.full((2, 1, 2, 2), 0.25))  # logits of a 0.25 reconstruction
    mu, logvar = torch.zeros(2, 3), torch.zeros(2, 3)
    loss, parts = vae_loss(x_hat, x, mu, logvar, recon="mse")
    assert parts["recon"] == pytest.approx(4 * 0.0625)  # summed over 4 pixels, mean over batch
    assert parts["kl"] == pytest.approx(0.0)  # the posterior equals the prior
    mu = torch.ones(2, 3)  # KL = 0.5 * sum(mu^2) = 1.5 per image
    loss, parts = vae_loss(x_hat, x, mu, logvar, kl_weight=2.0, recon="mse")
    assert parts["kl"] == pytest.approx(1.5) and loss.item() == pytest.approx(0.25 + 3.0)
    _, parts = vae_loss(torch.zeros_like(x), x, torch.zeros(2, 3), logvar, recon="bce")
    assert parts["recon"] == pytest.approx(4 * 0.693147, rel=1e-4)  # BCE of 0.5 vs 0.5 is ln 2


def test_vae_loss_on_logits_matches_bce_and_survives_bf16_saturation():
    torch.manual_seed(0)
    x = torch.rand(4, 1, 8, 8)
    logits = torch.randn(4, 1, 8, 8) * 3
    mu, logvar = torch.zeros(4, 2), torch.zeros(4, 2)
    _, parts = vae_loss(logits, x, mu, logvar)
    ref = F.binary_cross_entropy(torch.sigmoid(logits), x, reduction="sum") / 4
    assert parts["recon"] == pytest.approx(float(ref), rel=1e-5)
    # a confident pixel in bf16: sigmoid(12) rounds to exactly 1.0, so BCE on probabilities
    # against a target of 0 is log(0) (clamped to 100 by torch); on logits it is the true 12
    big = torch.full((1, 1, 1, 1), 12.0, dtype=torch.bfloat16)
    zero = torch.zeros(1, 1, 1, 1)
    assert torch.sigmoid(big).item() == 1.0
    assert F.binary_cross_entropy(torch.sigmoid(big).float(), zero).item() == pytest.approx(100)
    _, parts = vae_loss(big, zero, torch.zeros(1, 2), torch.zeros(1, 2))
    assert parts["recon"] == pytest.approx(12.0, rel=1e-3)


def test_vae_loss_falls_with_a_few_steps():
    torch.manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    disc = (((yy - 16) ** 2 + (xx - 16) ** 2) < 100).float()
    x = (disc * torch.rand(16, 1, 1, 1) * 0.5 + 0.3 * disc).clamp(0, 1)  # 16 x 1 x 32 x 32
    model = BrainCVAE(image_size=32, latent_dim=8)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    first = None
    with small_tensor_backend():
        for _ in range(25):
            x_hat, mu, logvar = model(x)
            loss, _ = vae_loss(x_hat, x, mu, logvar, kl_weight=1.0)
            opt.zero_grad()
            loss.backward()
            opt.step()
            first = loss.item() if first is None else first
        model.eval()
        with torch.no_grad():
            x_hat, mu, logvar = model(x)
            final, _ = vae_loss(x_hat, x, mu, logvar)
    assert final.item() < 0.9 * first


def test_bad_model_arguments_are_refused():
    with pytest.raises(BrainhpcError, match="multiple of 8"):
        BrainCNN(image_size=60)
    with pytest.raises(BrainhpcError, match="dropout"):
        BrainCNN(image_size=32, dropout=1.0)
    with pytest.raises(BrainhpcError, match="multiple of 4"):
        BrainCVAE(image_size=30)
    x = torch.rand(1, 1, 4, 4)
    with pytest.raises(BrainhpcError, match="bce, mse"):
        vae_loss(x, x, torch.zeros(1, 2), torch.zeros(1, 2), recon="l1")


def test_vae_error_maps_through_the_techniques_end_to_end(tmp_path):
    """Real shards -> training spec -> healthy-only VAE -> error maps -> thresholds chosen on val
    -> frozen on test, with localisation against the masks (the trainer is not involved)."""
    import json

    import numpy as np

    from brainhpc.anomaly.techniques import TechniqueConfig, select_and_apply
    from brainhpc.data.shards import as_float, load_split, write_shards
    from brainhpc.data.training import healthy_only, training_data

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:32, :32]

    def split(name, n):
        labels = np.arange(n) % 2
        images = np.zeros((n, 1, 32, 32), np.uint8)
        masks = np.zeros_like(images)
        for i in range(n):
            brain = ((yy - 16) / 12.0) ** 2 + ((xx - 16) / 10.0) ** 2 < 1
            images[i, 0][brain] = 90 + rng.integers(0, 20)
            if labels[i]:
                cy, cx = rng.integers(11, 21, 2)
                spot = (yy - cy) ** 2 + (xx - cx) ** 2 < 9
                images[i, 0][spot] = 250
                masks[i, 0] = spot
        write_shards(tmp_path / "prep" / name, images, labels, [f"{name}{i}" for i in range(n)],
                     masks=masks)

    for name, n in (("train", 48), ("val", 24), ("test", 24)):
        split(name, n)
    train = healthy_only(training_data("real", tmp_path / "prep"))
    assert len(train) == 24
    torch.manual_seed(0)
    model = BrainCVAE(image_size=32, latent_dim=8)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x = as_float(train.images)
    with small_tensor_backend():
        for _ in range(40):
            x_hat, mu, logvar = model(x)
            loss, _ = vae_loss(x_hat, x, mu, logvar)
            opt.zero_grad()
            loss.backward()
            opt.step()
        val, test = load_split(tmp_path / "prep", "val"), load_split(tmp_path / "prep", "test")
        val_maps = model.error_maps(as_float(val.images))
        test_maps = model.error_maps(as_float(test.images))
    out = select_and_apply(TechniqueConfig(technique="giaem"), val_maps, val.labels, test_maps,
                           test.labels, test.masks)
    report = json.loads(json.dumps(out.report))  # JSON-ready
    assert report["test"]["n_per_class"] == {"healthy": 12, "tumour": 12}
    assert report["test"]["roc_auc"] > 0.9  # bright unseen spots reconstruct badly
    assert report["localisation"]["n"] == 12 and report["localisation"]["dice_mean"] > 0.3
