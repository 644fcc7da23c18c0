"""The VAE anomaly detector's parts that need no training: what it looks at (``residuals``:
standardised brains, brain-limited residual maps, localisation, the intensity baseline) and how
residual maps become decisions (``techniques``: GIAEM, DBSCAN, single-image and global KMeans).
"""

TECHNIQUES = ("giaem", "dbscan", "kmeans-single", "kmeans-global")  # brainhpc.anomaly.techniques
