"""PatchCore: nearest-neighbour scoring against a coreset memory bank of patch features."""

from edgeinspect.train.models.patchcore.model import PatchCore, greedy_coreset

__all__ = ["PatchCore", "greedy_coreset"]
