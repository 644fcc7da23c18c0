"""Generators that draw the tumour mask too (``generate --with-masks``): bad input, identity."""

import json
import shutil

import cv2
import numpy as np
import pytest
import torch

from brainhpc import models
from brainhpc.data.shards import load_split, write_shards
from brainhpc.data.training import training_data
from brainhpc.errors import BrainhpcError
from brainhpc.generate import GenerateConfig, generate
from brainhpc.generate.masks import MASK_MIN_PIXELS, binarise_masks
from brainhpc.images import outline_tiles, render_grid
from brainhpc.models import dcgan
from brainhpc.segment import SegmentConfig, segment

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {
    "vae": {"base": 8, "latent": 16, "max_channels": 32},
    "dcgan": {"g_channels": 16, "min_channels": 8, "d_channels": 8},
    "wgan-gp": {"g_channels": 16, "min_channels": 8, "d_channels": 8, "n_critic": 2},
    "ddpm": {"channels": 8, "res_blocks": 1, "timesteps": 40, "sample_steps": 4},
    "ldm": {"ae_channels": [8, 8], "unet_channels": [8, 16], "unet_res_blocks": 1,
            "head_channels": 8, "d_channels": 8, "d_layers": 2, "ae_steps": 1, "adv_start": 0,
            "timesteps": 40, "sample_steps": 4},
}


def cfg_for(arch, data, out, **kw):
    base = dict(arch=arch, label="tumour", data=data, out=out, epochs=1, batch_size=16,
                n_samples=12, options=TINY[arch], quality=False, min_images=16, progress=False,
                device="cpu", with_masks=True)
    return GenerateConfig(**{**base, **kw})


def copy_prepared(src, dst, masks):
    """``src`` rewritten with ``masks(split data) -> array | None`` as the tumour masks."""
    for split in ("train", "val", "test"):
        d = load_split(src, split)
        write_shards(dst / split, d.images, d.labels, d.sources, masks=masks(d),
                     attrs={"size": 64})
    shutil.copy(src / "manifest.json", dst / "manifest.json")
    return dst


# ------------------------------------------------------------------ bad input
def test_healthy_label_has_nothing_to_draw(prepared_phantom, tmp_path):
    with pytest.raises(BrainhpcError, match="healthy generator has nothing to draw"):
        cfg_for("vae", prepared_phantom, tmp_path, label="healthy")
    with pytest.raises(BrainhpcError, match="with_masks must be true or false, got 'yes'"):
        cfg_for("vae", prepared_phantom, tmp_path, with_masks="yes")


def test_prepared_data_without_masks_is_refused(prepared_phantom, tmp_path):
    bare = copy_prepared(prepared_phantom, tmp_path / "bare", lambda d: None)
    with pytest.raises(BrainhpcError, match=rf"dataset {bare} holds no tumour masks.*phantom.*"
                                            r"LGG.*X_mask"):
        generate(cfg_for("dcgan", bare, tmp_path / "o"))
    empty = copy_prepared(prepared_phantom, tmp_path / "empty", lambda d: np.zeros_like(d.images))
    with pytest.raises(BrainhpcError, match=rf"every tumour mask in {empty}/train is empty"):
        generate(cfg_for("dcgan", empty, tmp_path / "o2"))


def test_identity_holds_with_masks(prepared_phantom, tmp_path):
    plain = cfg_for("vae", prepared_phantom, tmp_path, with_masks=False).identity()
    masked = cfg_for("vae", prepared_phantom, tmp_path).identity()
    assert plain["with_masks"] is False and masked == {**plain, "with_masks": True}


def test_cli_flag_and_healthy_refusal(prepared_phantom, tmp_path, capsys):
    from brainhpc import cli

    code = cli.main(["generate", "--arch", "vae", "--label", "healthy", "--with-masks",
                     "--data", str(prepared_phantom), "--out", str(tmp_path / "o")])
    assert code == 2 and "healthy generator has nothing to draw" in capsys.readouterr().err


def test_image_channels_is_set_by_generate_not_an_option(prepared_phantom, tmp_path):
    with pytest.raises(BrainhpcError, match="unknown option.*image_channels"):
        cfg_for("dcgan", prepared_phantom, tmp_path, options={"image_channels": 2})
    with pytest.raises(BrainhpcError, match="image_channels must be 1 .* or 2 .*got 3"):
        models.make_config("ddpm", 32, TINY["ddpm"], image_channels=3)


# ------------------------------------------------------------------ models and augmentation
@pytest.mark.parametrize("arch", list(models.ARCHS))
def test_two_channel_models_sample_image_and_mask(arch):
    task = models.build_task(arch, 32, {**TINY[arch], "batch_size": 4}, image_channels=2)
    net = task.models()[task.sample_model]
    out = task.sample(net, 3, torch.Generator().manual_seed(0))
    assert out.shape == (3, 2, 32, 32) and 0 <= float(out.min()) and float(out.max()) <= 1
    one = models.build_task(arch, 32, {**TINY[arch], "batch_size": 4}).models()
    two = task.models()
    for name in one:  # only the image-facing layers grow: first conv in, last conv out
        a, b = one[name].state_dict(), two[name].state_dict()
        assert a.keys() == b.keys()
        grown = sorted(k for k in a if a[k].shape != b[k].shape)
        # spectral norm's power-iteration vector of the first conv is flat: it doubles
        assert grown and all((2 in b[k].shape[:2] and 1 in a[k].shape[:2])
                             or (k.endswith("._v") and b[k].numel() == 2 * a[k].numel())
                             for k in grown)


def test_flip_and_diffaugment_move_image_and_mask_together():
    torch.manual_seed(0)
    img = torch.rand(16, 1, 32, 32) * 2 - 1
    pair = torch.cat([img, img], 1)  # a "mask" equal to the image: any split shows up
    out = dcgan.diff_augment(models.random_hflip(pair), ["translation", "cutout"])
    assert torch.equal(out[:, 0], out[:, 1]) and not torch.equal(out, pair)


def test_binarise_masks_cuts_at_the_midpoint_and_drops_specks():
    prob = np.zeros((2, 1, 16, 16), np.float32)
    prob[0, 0, 2:6, 2:6] = 0.5  # 16 px at the midpoint: kept
    prob[0, 0, 10, 10] = 0.9  # a 1-px speck: dropped
    prob[0, 0, 12:14, 12:14] = 0.49  # below the midpoint
    prob[1, 0, 8:10, 8:10] = 1.0  # exactly MASK_MIN_PIXELS (4): kept
    m = binarise_masks(prob)
    assert m.dtype == np.uint8 and set(np.unique(m)) == {0, 255}
    assert (m[0, 0] > 0).sum() == 16 and m[0, 0, 2:6, 2:6].all()
    assert (m[1, 0] > 0).sum() == MASK_MIN_PIXELS == 4
    assert (binarise_masks(prob, min_pixels=1)[0, 0] > 0).sum() == 17


def test_outline_grid_draws_red_contours_only_where_masks_are():
    imgs = np.full((2, 1, 32, 32), 100, np.uint8)
    masks = np.zeros_like(imgs)
    masks[0, 0, 8:16, 8:16] = 255
    plain = render_grid(imgs)
    assert plain.ndim == 2  # no masks: the grayscale grid as before
    grid = render_grid(imgs, masks=masks)
    assert grid.ndim == 3 and grid.shape[-1] == 3
    tiles = outline_tiles(imgs, masks)
    assert tiles.shape == (2, 128, 128, 3)  # upscaled x4 to OUTLINE_MIN_PX
    red = (tiles[..., 2] == 255) & (tiles[..., 1] == 0) & (tiles[..., 0] == 0)
    ys, xs = np.nonzero(red[0])
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (32, 63, 32, 63)  # the square's rim
    assert not red[0, 33:63, 33:63].any() and not red[1].any()
    assert (tiles[1] == 100).all()  # a tile without mask is just the image, in colour
    with pytest.raises(BrainhpcError, match="masks .* do not match images"):
        render_grid(imgs, masks=masks[:, :, :16])


# ------------------------------------------------------------------ the generate cell
@pytest.fixture(scope="module")
def syn_dir(prepared_phantom, tmp_path_factory):
    """SYN_DIR of every architecture: <arch>-tumour with masks, <arch>-healthy image-only (both
    trained 1 epoch on the 64 px phantoms), laid out as the segment stage reads them."""
    root = tmp_path_factory.mktemp("syn")
    cards = {}
    for arch in models.ARCHS:
        cards[arch] = generate(cfg_for(arch, prepared_phantom, root / f"{arch}-tumour",
                                       n_samples=20, seed=1))
        generate(cfg_for(arch, prepared_phantom, root / f"{arch}-healthy", label="healthy",
                         with_masks=False, n_samples=20, seed=1))
    return root, cards


@pytest.mark.parametrize("arch", list(models.ARCHS))
def test_every_arch_writes_masks_the_segment_stage_reads(arch, syn_dir, prepared_phantom):
    root, cards = syn_dir
    card = cards[arch]
    assert card["status"] == "done" and card["with_masks"] and card["config"]["with_masks"]
    assert card["model"]["image_channels"] == 2 and card["steps"] == 5
    data = load_split(root / f"{arch}-tumour" / "shards")
    assert data.images.shape == data.masks.shape == (20, 1, 64, 64)
    assert data.masks.dtype == np.uint8 and set(np.unique(data.masks)) <= {0, 255}
    assert data.attrs["with_masks"] and data.attrs["mask_min_pixels"] == MASK_MIN_PIXELS
    m = card["masks"]
    assert m["synthetic"]["n"] == 20 and m["real_train"]["n"] == 85
    assert m["synthetic"]["nonempty_share"] == pytest.approx(data.masks.any((1, 2, 3)).mean())
    assert m["synthetic"]["mean_area_px"] == pytest.approx((data.masks > 0).sum((1, 2, 3)).mean(),
                                                           abs=0.01)
    assert m["real_train"]["nonempty_share"] == 1.0 and m["real_train"]["mean_area_px"] > 10
    ckpt = torch.load(root / f"{arch}-tumour" / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["fingerprint"]["with_masks"] is True
    # the segment stage: tumour pairs from these shards, healthy (image-only) with empty masks
    train = training_data(f"synthetic:{arch}", prepared_phantom, root, seed=0, masks=True)
    assert len(train) == 40 and train.masks.shape == train.images.shape
    tumour = [i for i, s in enumerate(train.sources) if s.startswith(f"synthetic/{arch}/tumour")]
    order = np.argsort([train.sources[i] for i in tumour])
    assert np.array_equal(train.masks[np.array(tumour)[order]], (data.masks > 0).astype(np.uint8))
    assert not train.masks[train.labels == 0].any()


def test_segment_cell_trains_on_generated_pairs(syn_dir, prepared_phantom, tmp_path):
    root, _ = syn_dir
    m = segment(SegmentConfig(train_data="synthetic:dcgan", data=prepared_phantom,
                              synthetic_dir=root, out=tmp_path / "seg", epochs=1,
                              channels=(8, 16), strides=(2,), batch_size=8, progress=False,
                              device="cpu"))
    drawn = int(load_split(root / "dcgan-tumour" / "shards").masks.any((1, 2, 3)).sum())
    assert m["n_train"]["total"] == m["n_train"]["synthetic"] == 40
    assert m["n_train"]["tumour_slices"] == drawn  # slices whose generated mask is non-empty
    assert 0 <= m["test"]["dice_patient_mean"] <= 1 and (tmp_path / "seg" / "model.pt").exists()


def test_samples_png_shows_the_mask_outlines(syn_dir):
    root, _ = syn_dir
    out = root / "dcgan-tumour"
    data = load_split(out / "shards")
    png = cv2.imread(str(out / "samples.png"), cv2.IMREAD_UNCHANGED)
    plain = render_grid(data.images)
    assert png.ndim == 3 and png.shape[:2] != plain.shape  # colour, upscaled: not the plain grid
    assert np.array_equal(png, render_grid(data.images, masks=data.masks,
                                           title="synthetic tumour and mask outlines - dcgan, "
                                                 "step 5, seed 1"))
    red = (png[..., 2] == 255) & (png[..., 1] == 0) & (png[..., 0] == 0)
    assert red.any() == bool(data.masks.any())
    real = cv2.imread(str(out / "real.png"), cv2.IMREAD_UNCHANGED)
    assert real.ndim == 3 and ((real[..., 2] == 255) & (real[..., 1] == 0)).any()  # real masks


def test_image_only_run_is_unchanged(syn_dir):
    root, _ = syn_dir
    out = root / "vae-healthy"
    card = json.loads((out / "card.json").read_text())
    assert card["with_masks"] is False and "masks" not in card
    assert card["config"]["with_masks"] is False
    data = load_split(out / "shards")
    assert data.masks is None and "with_masks" not in data.attrs
    png = cv2.imread(str(out / "samples.png"), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(png, render_grid(data.images,
                                           title="synthetic healthy - vae, step 5, seed 1"))
    fp = torch.load(out / "checkpoints" / "last.pt", weights_only=True)["fingerprint"]
    assert fp["with_masks"] is False and "image_channels" not in fp["model"]


def test_masked_run_resumes_to_the_same_pairs(prepared_phantom, tmp_path):
    generate(cfg_for("vae", prepared_phantom, tmp_path / "ref", epochs=2))
    cfg = cfg_for("vae", prepared_phantom, tmp_path / "cut", epochs=2)
    generate(cfg_for("vae", prepared_phantom, tmp_path / "cut", epochs=1))
    (tmp_path / "cut" / "card.json").unlink()  # as if stopped there: no card, config running
    (tmp_path / "cut" / "config.json").write_text(json.dumps({"status": "running",
                                                              "config": cfg.identity()}))
    done = generate(cfg)
    assert done["resumed"] and done["steps"] == 10
    a, b = load_split(tmp_path / "ref" / "shards"), load_split(tmp_path / "cut" / "shards")
    assert np.array_equal(a.images, b.images) and np.array_equal(a.masks, b.masks)


def test_image_only_checkpoint_does_not_resume_as_masked(prepared_phantom, tmp_path):
    out = tmp_path / "o"
    generate(cfg_for("dcgan", prepared_phantom, out, with_masks=False))
    with pytest.raises(BrainhpcError, match="different config.*with_masks: False -> True"):
        generate(cfg_for("dcgan", prepared_phantom, out))
    (out / "card.json").unlink()  # the cell's records lost: the checkpoint itself must refuse
    (out / "config.json").unlink()
    with pytest.raises(BrainhpcError, match="different run.*with_masks: checkpoint False vs now "
                                            "True"):
        generate(cfg_for("dcgan", prepared_phantom, out))
