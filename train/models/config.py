"""The part of a ``model`` section every family built on a backbone shares, checked against the
backbone registry (the backbone exists, its stages exist, a weights file is there)."""

from __future__ import annotations

from pathlib import Path

from pydantic import field_validator, model_validator

from edgeinspect.schema import Section, integer, real
from edgeinspect.train.backbones import BACKBONES, get_backbone_spec


class WeightsSection(Section):
    """A ``model`` section with an optional ``weights`` file (checked to exist); subclasses declare the
    ``weights: str | None = None`` field where it belongs in their key order."""

    @field_validator("weights", check_fields=False)
    @classmethod
    def _weights_file(cls, path: str | None) -> str | None:
        if path is not None and not Path(path).expanduser().is_file():
            raise ValueError(f"weights file not found: {path}")
        return path


class BackboneModelSection(WeightsSection):
    """``model`` keys of a family on a frozen backbone; families subclass it and add their own."""

    backbone: str
    weights: str | None = None
    stages: list[str]
    smoothing_sigma: real(0.0, 64.0)
    seed: integer(0, 2**32 - 1)

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, name: str) -> str:
        if name not in BACKBONES:
            raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)}")
        return name

    @model_validator(mode="after")
    def _known_stages(self) -> BackboneModelSection:
        have = list(get_backbone_spec(self.backbone).stages)
        unknown = [s for s in self.stages if s not in have]
        if not self.stages or unknown or len(set(self.stages)) != len(self.stages):
            raise ValueError(f"stages: {self.stages} is not a non-empty list of distinct stages of "
                             f"{self.backbone} ({', '.join(have)})")
        return self

    def channels(self) -> int:
        """Channels of the chosen stages, concatenated."""
        spec = get_backbone_spec(self.backbone)
        return sum(spec.stages[s].channels for s in self.stages)


class PatchFeatureSection(BackboneModelSection):
    """``model`` keys of a family on locally aware patch features (stage features averaged over a k x k
    neighbourhood, ``aggregate_stages``): PatchCore, GLASS."""

    neighbourhood: integer(1, 15)

    @field_validator("neighbourhood")
    @classmethod
    def _odd(cls, k: int) -> int:
        if k % 2 == 0:
            raise ValueError(f"{k} is not odd (the k x k average must be centred on its patch)")
        return k
