"""Training: the one shared loop (``Trainer``, ``run_training``), process groups
(``distributed``), precision and threads (``precision``), batch augmentation (``augment``) and
throughput measurement (``throughput``)."""

from brainhpc.train.distributed import DistInfo, init_distributed, teardown
from brainhpc.train.trainer import Task, TrainConfig, Trainer, run_training

__all__ = ["DistInfo", "Task", "TrainConfig", "Trainer", "init_distributed", "run_training",
           "teardown"]
