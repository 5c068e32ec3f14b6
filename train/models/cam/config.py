"""CAM's ``model`` section (configs/cam.yaml documents every key)."""

from __future__ import annotations

from pydantic import model_validator

from edgeinspect.schema import integer, real
from edgeinspect.train.models.config import BackboneModelSection


class CamSection(BackboneModelSection):
    """``model`` keys of CAM: the classifier's fine-tuning and its own train/test split."""

    trainable_convs: integer(1, 1000)
    epochs: integer(1, 10_000)
    learning_rate: real(0.0, 1.0, lo_open=True)
    class_weights: tuple[real(0.0, 1e6, lo_open=True), real(0.0, 1e6, lo_open=True)]
    target_accuracy: real(0.0, 1.0, lo_open=True)
    test_fraction: real(0.0, 1.0, lo_open=True, hi_open=True)

    @model_validator(mode="after")
    def _one_stage(self) -> CamSection:
        if len(self.stages) != 1:
            raise ValueError(f"stages: {self.stages} must name exactly one stage (the conv layer the class "
                             f"activation map is taken from)")
        return self
