"""One Apply of the Slicer module: the inputs frozen at start, a background job, the write at the end.

A segmentation takes seconds to minutes; meanwhile the user may select another series, tick the
uncertainty box or close the scene. The result must still land on the volume it was computed from,
with the settings chosen at Apply, or not at all: :class:`SegmentationRun` keeps those inputs, and
writes only when that volume is still in the scene and the result (computed on its grid at the
start) still lies on its voxels. Needs only MRML, so it is tested headless.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

from . import background, mrml
from .errors import InputError


@dataclass(frozen=True)
class RunInputs:
    """What the user chose when pressing Apply."""

    volume_node: object
    model: object  # a loaded SegmentationModel
    tasks: tuple[str, ...] = ()
    device: str = "auto"
    segmentation_node: object = None  # None: a new segmentation node
    with_uncertainty: bool = False
    uncertainty_kind: str = "entropy"
    channel_nodes: tuple = ()  # further channels of a multi-channel task, in its order


class SegmentationRun:
    """A segmentation of frozen inputs, computed off the GUI thread and written on request.

    ``python`` is the interpreter for a subprocess worker (``PythonSlicer`` in Slicer); None runs
    the work in a thread of this process.
    """

    def __init__(self, inputs: RunInputs, python: str | os.PathLike | None = None,
                 environment: dict[str, str] | None = None) -> None:
        self.inputs = inputs
        image = mrml.channel_images(inputs.volume_node, inputs.channel_nodes)
        tasks = list(inputs.tasks) or None
        if python:
            self.job = background.SubprocessJob(inputs.model, image, tasks, inputs.device, inputs.with_uncertainty,
                                                python=python, environment=environment)
        else:
            self.job = background.segment_in_thread(inputs.model, image, tasks, inputs.device, inputs.with_uncertainty)

    @property
    def running(self) -> bool:
        return not self.job.poll().finished

    def poll(self) -> background.JobStatus:
        return self.job.poll()

    def cancel(self) -> None:
        self.job.cancel()

    def wait(self, timeout: float | None = None) -> background.JobStatus:
        return self.job.wait(timeout)

    def segments_replaced(self) -> list[str]:
        """Names of segments of the chosen segmentation that this result would replace."""
        return mrml.segments_replaced_by(self.job.result, self._live_segmentation_node())

    def edited_segments(self) -> list[str]:
        """Names of those segments that were corrected by hand since they were written."""
        node = self._live_segmentation_node()
        return mrml.edited_segments_replaced_by(self.job.result, node) if node is not None else []

    def write(self, existing: str = "replace") -> tuple[mrml.SegmentationWrite, object, list[str]]:
        """Write the finished result onto the volume chosen at start; returns the write (for undo),
        the uncertainty volume node (or None) and the warnings."""
        result = self.job.result
        volume = self.inputs.volume_node
        if volume.GetScene() is None:
            raise InputError(f"volume '{volume.GetName()}' was removed from the scene during the run; nothing was written")
        if not mrml.on_volume_grid(result.labels, volume):
            raise InputError(
                f"volume '{volume.GetName()}' changed its size, spacing, origin or orientation during the run; "
                "the result no longer fits it, nothing was written: press Apply again"
            )
        written = mrml.write_segmentation(result, volume, self._live_segmentation_node(), existing,
                                          self.inputs.uncertainty_kind if self.inputs.with_uncertainty else None)
        return written, written.uncertainty_node, list(result.warnings)

    def _live_segmentation_node(self):
        """The chosen segmentation, or None (a new one) if it left the scene during the run."""
        node = self.inputs.segmentation_node
        return node if node is not None and node.GetScene() is not None else None


def start_run(volume_node, model, tasks: Sequence[str] = (), device: str = "auto", segmentation_node=None,
              with_uncertainty: bool = False, uncertainty_kind: str = "entropy", python=None,
              environment=None, channel_nodes: Sequence = ()) -> SegmentationRun:
    """Freeze the inputs and start segmenting them."""
    if segmentation_node is not None:
        mrml.check_labelmap_segmentation(segmentation_node)
    inputs = RunInputs(volume_node, model, tuple(tasks), device, segmentation_node, with_uncertainty, uncertainty_kind,
                       tuple(channel_nodes))
    return SegmentationRun(inputs, python, environment)
