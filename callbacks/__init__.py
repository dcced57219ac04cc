"""Lightning callbacks of memmcl, installed as `memmcl.callbacks`."""

from memmcl.callbacks.curriculum import CurriculumSampler
from memmcl.callbacks.prediction_writer import PredictionWriter

__all__ = ["CurriculumSampler", "PredictionWriter"]
