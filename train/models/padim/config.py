"""PaDiM's ``model`` section (configs/padim.yaml documents every key)."""

from __future__ import annotations

from pydantic import model_validator

from edgeinspect.schema import integer, real
from edgeinspect.train.models.config import BackboneModelSection


class PadimSection(BackboneModelSection):
    """``model`` keys of PaDiM."""

    n_features: integer(1, 100_000)
    epsilon: real(0.0, 1e6, lo_open=True)

    @model_validator(mode="after")
    def _features_exist(self) -> PadimSection:
        total = self.channels()
        if self.n_features > total:
            raise ValueError(f"n_features: {self.n_features} is not in [1, {total}] (the channels of stages "
                             f"{self.stages} of {self.backbone})")
        return self
