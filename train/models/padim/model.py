"""PaDiM (Defard et al., ICPR 2021): a Gaussian per patch position over a random subset of the
multi-stage embedding, scored by Mahalanobis distance."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from itertools import accumulate

import numpy as np
import torch
from tqdm import tqdm

from edgeinspect.train.models.base import BackboneAnomalyModel, aggregate_stages
from edgeinspect.train.models.padim.config import PadimSection


class GaussianDistance(torch.nn.Module):
    """Mahalanobis distance of every patch to the Gaussian of its position (mean P x D, inverse covariance
    P x D x D). A separate module so that its batched MatMul is named ``/mahalanobis/...`` in the ONNX graph:
    the INT8 engine runs it in 8-bit integers (``dynamic_int8_modules``), which reads a quarter of the bytes of
    the inverse covariances (31 MB in float for 784 positions of 100 features) on every image."""

    def __init__(self, n_features: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(0, n_features), persistent=False)
        self.register_buffer("inv_cov", torch.zeros(0, n_features, n_features), persistent=False)

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        """N x D x H x W embedding -> N x 1 x H x W distances."""
        n, d, h, w = embedding.shape
        delta = embedding.reshape(n, d, h * w).permute(2, 0, 1) - self.mean[:, None, :]   # P x N x D
        dist_sq = (torch.bmm(delta, self.inv_cov) * delta).sum(-1)                         # P x N
        return dist_sq.clamp_min(0.0).sqrt().permute(1, 0).reshape(n, 1, h, w)


class Padim(BackboneAnomalyModel):
    """PaDiM anomaly model.

    Covariance regulariser: ``epsilon * I`` is added to every per-position covariance before it
    is inverted (epsilon = 0.01 as in the paper), so the inverse exists with few training images.
    """

    family = "padim"
    score_is_distance = True
    config_section = PadimSection
    dynamic_int8_modules = ("mahalanobis",)

    def __init__(self, backbone: str = "efficientnet_lite0", stages: Sequence[str] = ("stage3", "stage4", "stage5"),
                 input_size: Sequence[int] = (224, 224), *, n_features: int = 100, epsilon: float = 0.01,
                 smoothing_sigma: float = 4.0, seed: int = 0, pretrained: bool = True, weights: str | None = None):
        super().__init__(backbone, stages, tuple(input_size), smoothing_sigma, pretrained=pretrained,
                         weights=weights)
        total = sum(self.extractor.channels())
        if not 0 < n_features <= total:
            raise ValueError(f"n_features must be in 1..{total} for stages {list(stages)}, got {n_features}")
        self.n_features = n_features
        self.epsilon = epsilon
        self.smoothing_sigma = smoothing_sigma
        self.seed = seed
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("channel_idx", torch.randperm(total, generator=gen)[:n_features].sort().values,
                             persistent=False)
        self._pick_channels(self.channel_idx)
        self.mahalanobis = GaussianDistance(n_features)

    def _pick_channels(self, channel_idx: torch.Tensor) -> None:
        """Use ``channel_idx`` (sorted indices into the concatenated stages) as the channel subset, split into
        each stage's own channels: picked before upsampling, so nothing unused is upsampled."""
        self.channel_idx = channel_idx
        starts = [0, *accumulate(self.extractor.channels())]
        self.stage_picks = [[int(c) - lo for c in channel_idx if lo <= c < hi]
                            for lo, hi in zip(starts, starts[1:], strict=False)]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The random channel subset of the stage features, upsampled to the finest stage, concatenated (the
        subset is sorted, so this is the subset of the concatenation)."""
        stages = self.extractor(x)
        picked = [f.index_select(1, torch.as_tensor(picks, device=f.device))
                  for f, picks in zip(stages, self.stage_picks, strict=True) if picks]
        return aggregate_stages(picked, 1, stages[0].shape[-2:])

    def patch_scores(self, embedding: torch.Tensor) -> torch.Tensor:
        """Mahalanobis distance of every patch to the Gaussian of its position."""
        return self.mahalanobis(embedding)

    @torch.no_grad()
    def fit(self, batches: Iterable[torch.Tensor], progress: bool = True, *,
            holdout: Iterable[torch.Tensor] | None = None) -> None:
        """Accumulate per-position mean and covariance in float64 over all good images."""
        total = None
        count = 0
        for x in tqdm(batches, desc="features", disable=not progress, unit="batch"):
            e = self.embed(x.to(self.channel_idx.device)).cpu().double()  # float64 on the CPU (MPS has none)
            n, d, h, w = e.shape
            e = e.reshape(n, d, h * w).permute(2, 0, 1)                       # P x N x D
            if total is None:
                total = torch.zeros(h * w, d, dtype=torch.float64)
                outer = torch.zeros(h * w, d, d, dtype=torch.float64)
            total += e.sum(1)
            outer += torch.bmm(e.transpose(1, 2), e)
            count += n
        if count < 2:
            raise ValueError("PaDiM needs at least 2 training images")
        mean = total / count
        cov = (outer - count * mean[:, :, None] * mean[:, None, :]) / (count - 1)
        cov += self.epsilon * torch.eye(cov.shape[-1], dtype=torch.float64)
        self._set_stats(mean, torch.linalg.inv(cov))

    def _set_stats(self, mean: torch.Tensor, inv_cov: torch.Tensor) -> None:
        device = self.channel_idx.device
        self.mahalanobis.mean = mean.to(device=device, dtype=torch.float32).contiguous()
        self.mahalanobis.inv_cov = inv_cov.to(device=device, dtype=torch.float32).contiguous()

    def statistics(self) -> dict[str, np.ndarray]:
        """Per-position mean (P x D), inverse covariance (P x D x D) and the channel subset."""
        return {"padim_mean": self.mahalanobis.mean.cpu().numpy(),
                "padim_inv_cov": self.mahalanobis.inv_cov.cpu().numpy(),
                "padim_channel_idx": self.channel_idx.cpu().numpy()}

    def load_statistics(self, stats: dict[str, np.ndarray]) -> None:
        """Install statistics read from a bundle."""
        self._pick_channels(torch.from_numpy(stats["padim_channel_idx"]).to(self.channel_idx.device))
        self._set_stats(torch.from_numpy(stats["padim_mean"]), torch.from_numpy(stats["padim_inv_cov"]))

    def hyperparameters(self) -> dict:
        """Constructor arguments (without weights)."""
        return {"backbone": self.extractor.spec.name, "stages": self.extractor.stages,
                "input_size": list(self.input_size), "n_features": self.n_features, "epsilon": self.epsilon,
                "smoothing_sigma": self.smoothing_sigma, "seed": self.seed}
