"""Convolutional autoencoder: trained from scratch on good images; what it cannot reconstruct is anomalous.

Architecture (``c`` = ``base_channels``, input H x W divisible by 16):

- encoder: 4 blocks of Conv 3x3 stride 2, BatchNorm, ReLU; c, 2c, 4c, 8c channels, H/16 x W/16 out;
- bottleneck, dense on a squeezed map: Conv 1x1 to 16 channels + ReLU, flatten (16 x H/16 x W/16),
  Linear to the ``latent`` vector, Linear back + ReLU, Conv 1x1 to 8c channels, BatchNorm, ReLU;
- decoder: 4 blocks of ConvTranspose 4x4 stride 2 (2c... then 3 channels); BatchNorm and ReLU after
  all but the last, whose output is the reconstruction in normalised-image units.

Why this bottleneck: a dense 512-vector straight from the 8c x H/16 x W/16 map (256 x 16 x 16 at
256 px) costs 2 x 33.6M weights; a conv bottleneck with ``latent`` channels keeps a spatial map
(16 x 16 x 512 values, more than the 256 x 256 x 3 image's information) and barely compresses, so
the network learns to copy defects too. Squeezing to 16 channels first (4096 values at 256 px)
keeps a true ``latent``-vector bottleneck for 4.2M weights. With c = 32 and latent 512 the whole
model has 5,286,643 parameters at 256 px (389k encoder, 4.21M bottleneck, 690k decoder) and
2,137,843 at the CPU default of 128 px (1.06M bottleneck).

Scoring: per-pixel squared reconstruction error, mean over the colour channels, at full input
resolution (the map head's "patch grid" is the error image itself), Gaussian-smoothed by the map
head; the image score is the maximum of the smoothed map (the shared :class:`AnomalyModel` head).
The map is always the squared error, whatever ``loss`` training used.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from edgeinspect.errors import ConfigError
from edgeinspect.train.backbones import IMAGENET_MEAN, IMAGENET_STD
from edgeinspect.train.data.batches import Batches
from edgeinspect.train.models.autoencoder.config import AutoencoderSection
from edgeinspect.train.models.base import AnomalyModel, gaussian_kernel

log = logging.getLogger(__name__)

# Channels of the squeezed map the dense bottleneck reads (see the module docstring).
SQUEEZE_CHANNELS = 16
# The encoder halves the resolution four times.
DOWNSAMPLING = 16


def ssim(a: torch.Tensor, b: torch.Tensor, sigma: float = 1.5, data_range: float = 1.0) -> torch.Tensor:
    """Mean structural similarity of two N x C x H x W batches (Wang et al. 2004): Gaussian window of
    ``sigma`` (radius 4 sigma, valid positions only), K1 = 0.01, K2 = 0.03, per channel."""
    kernel = gaussian_kernel(sigma).to(device=a.device, dtype=a.dtype)
    channels, taps = a.shape[1], kernel.numel()
    rows = kernel.view(1, 1, taps, 1).expand(channels, 1, taps, 1)
    cols = kernel.view(1, 1, 1, taps).expand(channels, 1, 1, taps)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(t, rows, groups=channels), cols, groups=channels)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return ssim_map.mean()


def _down(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


def _up(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True)]


class Bottleneck(nn.Module):
    """C x h x w map -> ``latent`` vector -> C x h x w map, dense on a map squeezed to 16 channels."""

    def __init__(self, channels: int, grid: tuple[int, int], latent: int):
        super().__init__()
        self.grid = grid
        flat = SQUEEZE_CHANNELS * grid[0] * grid[1]
        self.squeeze = nn.Conv2d(channels, SQUEEZE_CHANNELS, 1)
        self.encode = nn.Linear(flat, latent)
        self.decode = nn.Linear(latent, flat)
        self.expand = nn.Sequential(nn.Conv2d(SQUEEZE_CHANNELS, channels, 1, bias=False), nn.BatchNorm2d(channels),
                                    nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Encode to the latent vector and decode back to the map."""
        z = self.encode(F.relu(self.squeeze(x)).flatten(1))
        y = F.relu(self.decode(z)).reshape(-1, SQUEEZE_CHANNELS, *self.grid)
        return self.expand(y)


class Autoencoder(AnomalyModel):
    """Convolutional autoencoder anomaly model (architecture and scoring: see the module docstring).

    Training: Adam at ``learning_rate`` for ``epochs`` epochs on ``loss`` (``mse``; ``ssim`` = 1 - SSIM
    on the un-normalised [0, 1] images; ``mse_ssim`` = their sum). After every epoch the same loss is
    measured on the hold-out's good images (BatchNorm in eval mode); the weights of the epoch with the
    lowest hold-out loss are kept (the last epoch's when there is no hold-out).
    """

    family = "autoencoder"
    config_section = AutoencoderSection
    # the reconstruction may run in FP16/INT8; the residual, its channel mean and the map head stay float
    low_precision_modules = ("encoder", "bottleneck", "decoder")
    fit_is_statistics = False

    def __init__(self, input_size: Sequence[int] = (128, 128), *, latent: int = 512, base_channels: int = 32,
                 loss: str = "mse", learning_rate: float = 1e-3, epochs: int = 15, smoothing_sigma: float = 4.0,
                 seed: int = 0, pretrained: bool = False):
        """``pretrained`` is accepted for the shared constructor call and ignored (no pretrained weights)."""
        input_size = tuple(input_size)
        if any(side % DOWNSAMPLING for side in input_size):
            raise ConfigError(f"preprocess.input_size: the autoencoder needs sides divisible by {DOWNSAMPLING}, "
                              f"got {list(input_size)}")
        if loss not in ("mse", "ssim", "mse_ssim"):
            raise ConfigError(f"model.loss: {loss!r} is not one of mse, ssim, mse_ssim")
        super().__init__(input_size, input_size, smoothing_sigma)
        self.latent, self.base_channels, self.loss = latent, base_channels, loss
        self.learning_rate, self.epochs = learning_rate, epochs
        self.smoothing_sigma, self.seed = smoothing_sigma, seed
        c = base_channels
        widths = (3, c, 2 * c, 4 * c, 8 * c)
        grid = (input_size[0] // DOWNSAMPLING, input_size[1] // DOWNSAMPLING)
        with torch.random.fork_rng(devices=[]):  # the initial weights depend on the seed only
            torch.manual_seed(seed)
            self.encoder = nn.Sequential(*(m for i in range(4) for m in _down(widths[i], widths[i + 1])))
            self.bottleneck = Bottleneck(8 * c, grid, latent)
            self.decoder = nn.Sequential(*(m for i in range(4, 1, -1) for m in _up(widths[i], widths[i - 1])),
                                         nn.ConvTranspose2d(c, 3, 4, stride=2, padding=1))
        mean, std = self.normalization({})
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def normalization(cls, model_config: dict) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """ImageNet mean and std (no backbone: any fixed normalisation would do; this one is common)."""
        return IMAGENET_MEAN, IMAGENET_STD

    def weights_source(self) -> str:
        """Trained here."""
        return "trained from scratch (no pretrained weights)"

    def tag(self) -> str:
        """``ae`` and the latent size."""
        return f"ae{self.latent}"

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """The autoencoder's reconstruction of normalised images x."""
        return self.decoder(self.bottleneck(self.encoder(x)))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Per-pixel squared reconstruction error N x 3 x H x W."""
        return (x - self.reconstruct(x)) ** 2

    def patch_scores(self, embedding: torch.Tensor) -> torch.Tensor:
        """Mean over the colour channels: N x 1 x H x W (the full-resolution "patch grid")."""
        return embedding.mean(dim=1, keepdim=True)

    def objective(self, x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        """The training loss of ``loss`` (a scalar)."""
        value = x.new_zeros(())
        if self.loss in ("mse", "mse_ssim"):
            value = value + F.mse_loss(recon, x)
        if self.loss in ("ssim", "mse_ssim"):
            mean, std = self.pixel_mean, self.pixel_std
            value = value + 1.0 - ssim(recon * std + mean, x * std + mean)
        return value

    def fit(self, batches: Batches | Iterable[torch.Tensor], progress: bool = True, *,
            holdout: Batches | None = None) -> None:
        """Adam on the reconstruction loss; keeps the epoch with the lowest hold-out (good images) loss."""
        device = next(self.parameters()).device
        optimizer = torch.optim.Adam(self.parameters(), lr=self.learning_rate)
        self.history = {"train_loss": [], "holdout_loss": []}
        best, best_loss, best_epoch = None, float("inf"), self.epochs - 1
        bar = tqdm(range(self.epochs), desc="epochs", disable=not progress, unit="epoch")
        for epoch in bar:
            self.train()
            total, count = 0.0, 0
            for x in _epoch(batches, epoch):
                x = x.to(device)
                loss = self.objective(x, self.reconstruct(x))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total, count = total + loss.item() * len(x), count + len(x)
            self.history["train_loss"].append(total / max(count, 1))
            self.eval()
            held = self._holdout_loss(holdout, device) if holdout is not None else None
            if held is not None:
                self.history["holdout_loss"].append(held)
                if held < best_loss:
                    best_loss, best_epoch = held, epoch
                    best = {k: v.detach().clone() for k, v in self.state_dict().items()}
            bar.set_postfix(train=f"{self.history['train_loss'][-1]:.4g}",
                            holdout="-" if held is None else f"{held:.4g}")
        if not self.history["holdout_loss"]:
            del self.history["holdout_loss"]
        if best is not None:
            self.load_state_dict(best)
        log.info("autoencoder: kept epoch %d of %d (hold-out loss %.4g)", best_epoch + 1, self.epochs, best_loss)
        self.eval()

    @torch.no_grad()
    def _holdout_loss(self, holdout: Batches, device: torch.device) -> float | None:
        """Mean loss over the hold-out's good images (None when it has none)."""
        total, count = 0.0, 0
        for x, labels in holdout.epoch(0):
            x = x[labels == 0].to(device)
            if len(x):
                total, count = total + float(self.objective(x, self.reconstruct(x))) * len(x), count + len(x)
        return total / count if count else None

    def hyperparameters(self) -> dict:
        """Constructor arguments (without weights)."""
        return {"input_size": list(self.input_size), "latent": self.latent, "base_channels": self.base_channels,
                "loss": self.loss, "learning_rate": self.learning_rate, "epochs": self.epochs,
                "smoothing_sigma": self.smoothing_sigma, "seed": self.seed}


def _epoch(batches: Batches | Iterable[torch.Tensor], index: int) -> Iterator[torch.Tensor]:
    """Image batches of one epoch: shuffled by :meth:`Batches.epoch`, or a plain iterable as it comes."""
    if isinstance(batches, Batches):
        yield from (x for x, _ in batches.epoch(index))
    else:
        yield from batches
