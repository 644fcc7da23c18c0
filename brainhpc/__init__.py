"""brainhpc: batch HPC jobs for synthetic brain-MRI research.

Stages (``brainhpc.stages``, each a plain function of a typed config run through one cell
lifecycle, ``brainhpc.cell``): prepare -> generate -> classify and segment -> evaluate ->
aggregate. ``brainhpc.sweep`` runs them as SLURM arrays (or locally); what the stages share lives
in ``data``, ``train``, ``models``, ``metrics``, ``anomaly`` and ``predictors``.
"""

__version__ = "0.1.0"
