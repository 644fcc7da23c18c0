"""The evaluate stage: saved models (classifiers and U-Nets) scored on another image set with
every rule frozen (``cell``): one model from the command line, or every finished model of a sweep
run. How one model is scored, and which images are dropped as copies of its development data:
``score``."""

from brainhpc.evaluate.cell import EvaluateConfig, evaluate

__all__ = ["EvaluateConfig", "evaluate"]
