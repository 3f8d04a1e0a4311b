"""Helpers that only make sense inside the 3D Slicer application: dependency installation and the
model card shown by the module. Everything else lives in ``MultiTaskSegLib``."""
