"""The classify stage: BrainCNN or the VAE anomaly detector trained on real, synthetic or mixed
data, thresholds chosen on real validation, scored on real test (``cell``); the trainer's tasks
(``tasks``) and the detector's report (``report``)."""

from brainhpc.classify.cell import ClassifyConfig, classify

__all__ = ["ClassifyConfig", "classify"]
