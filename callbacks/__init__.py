"""Lightning callbacks of memmcl, installed as `memmcl.callbacks`."""

from memmcl.callbacks.prediction_writer import PredictionWriter

__all__ = ["PredictionWriter"]
