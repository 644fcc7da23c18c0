"""Metrics, one module per kind of output: ``classification`` (balanced accuracy, ROC-AUC and
the trivial baselines), ``segmentation`` (Dice per slice and patient, HD95, detection) and
``realism`` of synthetic images (C2ST, precision/recall/density/coverage, KID and FID, spectral
distance, each beside its real-vs-real floor; memorisation; see docs/realism.md) with its parts
``c2st``, ``prdc``, ``spectrum`` and ``features`` (the fixed random-init feature net), and
``bootstrap`` and ``predictions`` (group-bootstrap intervals from per-image predictions)."""
