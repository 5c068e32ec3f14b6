"""PatchCore's ``model`` section (configs/patchcore.yaml documents every key)."""

from __future__ import annotations

from pydantic import field_validator

from edgeinspect.schema import integer, real
from edgeinspect.train.models.config import BackboneModelSection


class PatchCoreSection(BackboneModelSection):
    """``model`` keys of PatchCore."""

    neighbourhood: integer(1, 15)
    coreset_ratio: real(0.0, 1.0, lo_open=True)
    projection_dim: integer(1, 4096)
    coreset_chunk: integer(0, 10**9)

    @field_validator("neighbourhood")
    @classmethod
    def _odd(cls, k: int) -> int:
        if k % 2 == 0:
            raise ValueError(f"{k} is not odd (the k x k average must be centred on its patch)")
        return k
