"""MultiTaskSegLib: multi-task medical image segmentation, usable with or without 3D Slicer.

The library knows nothing of Qt. Everything here runs headless: models, data handling,
training, inference and evaluation. The Slicer module is a thin layer on top.
"""

__version__ = "0.1.0"
