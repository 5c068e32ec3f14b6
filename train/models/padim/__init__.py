"""PaDiM: per-position Gaussians of patch embeddings, Mahalanobis scoring."""

from edgeinspect.train.models.padim.model import Padim

__all__ = ["Padim"]
