"""Generators that draw the tumour mask too (``generate --with-masks``): bad input, identity."""

import shutil

import numpy as np
import pytest

from brainhpc.data.shards import load_split, write_shards
from brainhpc.errors import BrainhpcError
from brainhpc.generate import GenerateConfig, generate

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {
    "vae": {"base": 8, "latent": 16, "max_channels": 32},
    "dcgan": {"g_channels": 16, "min_channels": 8, "d_channels": 8},
    "wgan-gp": {"g_channels": 16, "min_channels": 8, "d_channels": 8, "n_critic": 2},
    "ddpm": {"channels": 8, "res_blocks": 1, "timesteps": 40, "sample_steps": 4},
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


def test_identity_holds_with_masks_only_when_set(prepared_phantom, tmp_path):
    plain = cfg_for("vae", prepared_phantom, tmp_path, with_masks=False).identity()
    masked = cfg_for("vae", prepared_phantom, tmp_path).identity()
    assert "with_masks" not in plain  # finished image-only runs keep skipping as before
    assert masked == {**plain, "with_masks": True}
