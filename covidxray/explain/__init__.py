"""Heatmaps (CAM, Grad-CAM) and the checks of where they look."""
