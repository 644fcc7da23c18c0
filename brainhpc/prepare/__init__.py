"""The prepare stage: a labelled MRI folder (or phantom data) -> a split, prepared HDF5 dataset
(``cell``). What it reads and how it splits live in ``brainhpc.data``."""

from brainhpc.prepare.cell import PrepareConfig, prepare

__all__ = ["PrepareConfig", "prepare"]
