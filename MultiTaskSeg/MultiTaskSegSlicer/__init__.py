"""Helpers of the 3D Slicer module, in plain Python so that pytest tests them without the Slicer
application: the widget's decisions (``controller``), dependency installation and the model card
shown by the module. Everything else lives in ``MultiTaskSegLib``."""
