"""The generate stage: one generator per label trained on the prepared train split, synthetic
shards, sample grids, realism and memorisation (``cell``); synthetic tumour masks (``masks``)."""

from brainhpc.generate.cell import GenerateConfig, generate

__all__ = ["GenerateConfig", "generate"]
