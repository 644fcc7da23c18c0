"""Metrics, one module per kind of output: ``classification`` (balanced accuracy, ROC-AUC and
the trivial baselines), ``segmentation`` (Dice per slice and patient, HD95, detection) and
``realism`` (FID/KID in the project's feature space, memorisation) of synthetic images."""
