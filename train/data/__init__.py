"""Datasets: the MVTec AD folder layout reader and the built-in synthetic parts generator."""

from edgeinspect.train.data.mvtec import MVTecCategory, Sample
from edgeinspect.train.data.synth import DEFECT_TYPES, SYNTH_CATEGORIES, synthesize, write_video

__all__ = ["DEFECT_TYPES", "SYNTH_CATEGORIES", "MVTecCategory", "Sample", "synthesize", "write_video"]
