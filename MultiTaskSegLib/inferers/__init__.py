"""Whole-volume inference that does not depend on the network: options, window plans, blending.

Like MONAI's ``monai.inferers``: the architectures say how one batch of windows is predicted, and
:func:`~.sliding_window.blend_windows` tiles, batches, blends, reports progress and honours cancel.
"""

from .options import CancelCheck, InferenceOptions, ProgressCallback, part_options
from .sliding_window import (WindowGrid, bfloat16_autocast, bfloat16_ready, blend_windows, inference_context,
                             prediction_autocast_type, raise_if_cancelled, report_progress)
from .windows import AxisWindows, fit_window, plan_axis_windows, plan_gaussian_windows, round_up, window_region, window_weight

__all__ = [
    "AxisWindows", "CancelCheck", "InferenceOptions", "ProgressCallback", "WindowGrid", "bfloat16_autocast", "bfloat16_ready",
    "blend_windows", "fit_window", "inference_context", "part_options", "plan_axis_windows", "plan_gaussian_windows",
    "prediction_autocast_type", "raise_if_cancelled", "report_progress", "round_up", "window_region", "window_weight",
]
