"""The autoencoder's ``model`` section (configs/autoencoder.yaml documents every key)."""

from __future__ import annotations

from typing import Literal

from edgeinspect.schema import Section, integer, real


class AutoencoderSection(Section):
    """``model`` keys of the convolutional autoencoder (no backbone: it trains its own network)."""

    latent: integer(1, 65536)
    base_channels: integer(1, 512)
    loss: Literal["mse", "ssim", "mse_ssim"]
    learning_rate: real(0.0, 1.0, lo_open=True)
    epochs: integer(1, 100_000)
    smoothing_sigma: real(0.0, 64.0)
    seed: integer(0, 2**32 - 1)
