"""Errors a user sees.

Every failure caused by the user's input (a missing or corrupt file, an opset we cannot
handle, empty or non-finite calibration data) is raised as an :class:`OutlierQuantError`
whose message is one line naming the problem. The CLI prints that line and exits non-zero;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class OutlierQuantError(Exception):
    """Base class: a problem with the user's input, reported as one line."""

    exit_code = 2


class InputError(OutlierQuantError):
    """A file is missing, unreadable, corrupt, or of the wrong kind."""


class UnsupportedModelError(OutlierQuantError):
    """The model is valid ONNX but uses something we cannot handle (e.g. its opset)."""


class CalibrationError(OutlierQuantError):
    """Calibration data is empty, does not match the model, or produces NaN/Inf."""


class RecipeError(OutlierQuantError):
    """A recipe name or field is unknown or has a bad value."""
