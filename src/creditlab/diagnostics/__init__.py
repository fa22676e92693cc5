"""Diagnostics the field reports: per-layer angle of an algorithm's update to backprop's on
the same batch, relaxation traces, and feedback-weight alignment."""

from creditlab.diagnostics.angles import angle_deg, backprop_grads, layer_angles, layer_groups, rel_error
from creditlab.diagnostics.feedback import feedback_alignment

__all__ = ["angle_deg", "backprop_grads", "layer_angles", "layer_groups", "rel_error", "feedback_alignment"]
