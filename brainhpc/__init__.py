"""brainhpc: batch HPC jobs for synthetic brain-MRI research.

Stages: prepare, generate, classify, aggregate.
"""

__version__ = "0.1.0"
