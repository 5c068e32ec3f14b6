"""Convolutional autoencoder: trained from scratch on good images, scored by reconstruction error."""

from edgeinspect.train.models.autoencoder.model import Autoencoder, ssim

__all__ = ["Autoencoder", "ssim"]
