"""PatchCore's ``model`` section (configs/patchcore.yaml documents every key)."""

from __future__ import annotations

from edgeinspect.schema import integer, real
from edgeinspect.train.models.config import PatchFeatureSection


class PatchCoreSection(PatchFeatureSection):
    """``model`` keys of PatchCore."""

    coreset_ratio: real(0.0, 1.0, lo_open=True)
    max_bank: integer(0, 10**9)
    search_variance: real(0.0, 1.0, lo_open=True)
    projection_dim: integer(1, 4096)
    coreset_chunk: integer(0, 10**9)

