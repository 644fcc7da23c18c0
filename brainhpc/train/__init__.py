"""Training: the one shared loop (``Trainer``) and process-group handling (``distributed``)."""

from brainhpc.train.distributed import DistInfo, init_distributed, teardown
from brainhpc.train.trainer import Task, TrainConfig, Trainer

__all__ = ["DistInfo", "Task", "TrainConfig", "Trainer", "init_distributed", "teardown"]
