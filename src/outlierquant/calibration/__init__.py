"""Calibration: stream per-channel activation statistics through onnxruntime."""

from outlierquant.calibration.stats import ActivationStats, ChannelStats

__all__ = ["ActivationStats", "ChannelStats", "collect_statistics", "quantizable_targets"]


def __getattr__(name):  # lazy: collecting pulls in onnxruntime
    if name in ("collect_statistics", "quantizable_targets", "CalibrationTarget"):
        from outlierquant.calibration import collect

        return getattr(collect, name)
    raise AttributeError(name)
