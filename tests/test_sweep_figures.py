"""The aggregate's cross-cell figure: real slices and every generator's samples, one row each."""
import cv2
import numpy as np

from brainhpc.data.shards import LABELS, write_shards
from brainhpc.fsio import write_json
from brainhpc.sweep.figures import side_by_side


def _fake_generator(run, cell: str, arch: str, data, value: int, masks: bool = True) -> None:
    """A finished generate cell whose 10 samples are all ``value`` (masks: a square)."""
    folder = run / "generate" / cell
    images = np.full((10, 1, 64, 64), value, np.uint8)
    mask = np.zeros_like(images)
    mask[:, :, 20:40, 20:40] = 255
    write_shards(folder / "shards", images, np.full(10, LABELS["tumour"]),
                 [f"s/{i}" for i in range(10)], masks=mask if masks else None)
    write_json(folder / "card.json", {"status": "done", "arch": arch, "label": "tumour",
                                      "data": str(data), "with_masks": masks,
                                      "shards": str(folder / "shards")})


def test_side_by_side_puts_real_then_each_generator_in_rows(tmp_path, prepared_phantom):
    run = tmp_path / "run"
    _fake_generator(run, "ph/f0/ldm-tumour", "ldm", prepared_phantom, 40)
    _fake_generator(run, "ph/f0/vae-tumour", "vae", prepared_phantom, 220)
    (run / "generate" / "ph/f0/dcgan-tumour").mkdir(parents=True)  # not finished: no row
    plan = {"generate": [{"id": "ph/f0/ldm-tumour"}, {"id": "ph/f0/vae-tumour"},
                         {"id": "ph/f0/dcgan-tumour"}]}
    made = side_by_side(run, plan, tmp_path / "out")
    assert made == ["figures/generate/ph-f0-tumour-side-by-side.png"]
    grid = cv2.imread(str(tmp_path / "out" / made[0]))
    assert grid.shape[1] > 8 * 64  # eight tiles a row, upscaled
    # three bands of tiles: real, then ldm (value 40), then vae (value 220), masks outlined red
    grey = grid[..., 0].astype(int)
    rows = [r for r in range(grid.shape[0]) if (grey[r] == 220).sum() > 100]
    assert rows and min(rows) > grid.shape[0] * 0.6  # the vae's bright tiles are the last row
    dark = [r for r in range(grid.shape[0]) if (grey[r] == 40).sum() > 100]
    assert dark and max(dark) < min(rows)  # ldm's row above it
    assert ((grid[..., 2] > 200) & (grid[..., 0] < 50)).any()  # red outlines


def test_side_by_side_leaves_out_a_group_it_cannot_read(tmp_path, prepared_phantom):
    run = tmp_path / "run"
    _fake_generator(run, "ph/f0/vae-tumour", "vae", tmp_path / "missing", 100)
    assert side_by_side(run, {"generate": [{"id": "ph/f0/vae-tumour"}]}, tmp_path / "o") == []
