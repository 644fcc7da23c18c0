"""The segment stage: a MONAI U-Net trained on real, synthetic or mixed image+mask pairs, its
rule chosen on real validation, scored on real test patients (``cell``)."""

from brainhpc.segment.cell import SegmentConfig, segment

__all__ = ["SegmentConfig", "segment"]
