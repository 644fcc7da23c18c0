"""Tumour segmentation: the ``segment`` cell (``run``), its image+mask training data (``data``)
and its metrics (``metrics``: Dice per slice and per patient, HD95, slice detection)."""
