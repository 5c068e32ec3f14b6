"""GLASS's ``model`` section (configs/glass.yaml documents every key)."""

from __future__ import annotations

from pydantic import model_validator

from edgeinspect.schema import integer, real
from edgeinspect.train.models.config import PatchFeatureSection


class GlassSection(PatchFeatureSection):
    """``model`` keys of GLASS."""

    feature_std: real(0.0, 1e6, lo_open=True)
    hidden_dim: integer(1, 8192)
    epochs: integer(1, 10_000)
    batch_patches: integer(2, 10**7)
    lr: real(0.0, 1.0, lo_open=True)
    adaptor_lr: real(0.0, 1.0)
    noise_std: real(0.0, 100.0, lo_open=True)
    n_step: integer(0, 1000)
    eta: real(0.0, 100.0)
    r1: real(0.0, 1e6, lo_open=True)
    r2: real(0.0, 1e6, lo_open=True)
    n_proj: integer(1, 1000)

    @model_validator(mode="after")
    def _ring(self) -> GlassSection:
        if self.r2 < self.r1:
            raise ValueError(f"r2 ({self.r2}) is below r1 ({self.r1}): the ring r1 <= |synthetic - normal| <= r2 "
                             f"is empty")
        return self
