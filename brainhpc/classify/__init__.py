"""Classifiers of real, synthetic and mixed training data: BrainCNN and the BrainCVAE anomaly
detector (models), its error-map techniques (techniques), training-data specs (data) and the
metrics every cell reports (metrics)."""
