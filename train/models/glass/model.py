"""GLASS (Chen et al., ECCV 2024, arXiv 2407.09359, "A Unified Anomaly Synthesis Strategy with Gradient
Ascent"): a linear adaptor and an MLP discriminator on frozen patch features, trained to tell normal
patch features from anomalies synthesised around them.

Only the global anomaly synthesis (GAS) branch is built: Gaussian noise on the adapted normal features,
then ``n_step`` steps of normalised gradient ascent on the discriminator's loss, each ``n_proj`` steps
projected back into the ring ``r1 <= |synthetic - normal| <= r2``. The local branch (LAS: Perlin masks
blended with DTD textures at image level) needs the Describable Textures Dataset, which is not available
offline, so it is left out; GAS alone is the part of GLASS that needs no external data.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from edgeinspect.train.metrics import image_auroc
from edgeinspect.train.models.base import BackboneAnomalyModel, aggregate_stages
from edgeinspect.train.models.glass.config import GlassSection

if TYPE_CHECKING:
    from edgeinspect.train.data.batches import Batches

log = logging.getLogger(__name__)


def project_to_ring(synthetic: torch.Tensor, normal: torch.Tensor, r1: float, r2: float) -> torch.Tensor:
    """Truncated projection: move each row of ``synthetic`` along its offset from ``normal`` so that
    ``r1 <= |synthetic - normal| <= r2`` (offsets already in the ring are kept)."""
    offset = synthetic - normal
    length = offset.norm(dim=1, keepdim=True)
    return normal + offset * (length.clamp(r1, r2) / length.clamp_min(1e-12))


def synthesize_anomalies(normal: torch.Tensor, discriminator: nn.Module, *, noise_std: float, n_step: int,
                         eta: float, r1: float, r2: float, n_proj: int,
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """GLASS's global anomaly synthesis on P x D adapted normal features: Gaussian noise, then ``n_step``
    normalised gradient-ascent steps of size ``eta`` on the discriminator's loss for the synthetic
    features (labelled anomalous, so ascent moves them towards what it calls normal), projected into the
    ring [r1, r2] around their normal feature every ``n_proj`` steps and once more at the end.

    The discriminator is evaluated on normal and synthetic features together (its batch norm sees the
    same batch as in training); only the synthetic features get gradients. Returns them detached.
    """
    normal = normal.detach()
    noise = torch.randn(normal.shape, generator=generator, device=generator.device if generator else "cpu")
    synthetic = normal + noise_std * noise.to(normal.device)
    for step in range(n_step):
        synthetic.requires_grad_(True)
        logits = discriminator(torch.cat([normal, synthetic]))[len(normal):]
        loss = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))
        (grad,) = torch.autograd.grad(loss, synthetic)
        with torch.no_grad():
            synthetic = synthetic + eta * grad / grad.norm(dim=1, keepdim=True).clamp_min(1e-12)
            if (step + 1) % n_proj == 0:
                synthetic = project_to_ring(synthetic, normal, r1, r2)
    return project_to_ring(synthetic.detach(), normal, r1, r2)


def _patches(features: torch.Tensor) -> torch.Tensor:
    """N x D x h x w -> (N h w) x D."""
    return features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])


class GLASS(BackboneAnomalyModel):
    """GLASS anomaly model (GAS branch): frozen extractor -> locally aware patch features -> linear
    adaptor -> MLP discriminator -> softplus of its logit per patch -> map head.

    Features: Lite0 ``stage3`` (/8) and ``stage5`` (/16) averaged over 3 x 3 and concatenated at the /8
    grid (152 ch), the same mid-level pair as PatchCore's default and the counterpart of the paper's
    WRN50 layer2 + layer3. The adaptor starts as a per-channel standardisation of the fit features to
    std ``feature_std`` (the ring radii are absolute distances, and Lite0's raw features are ~70 in norm).
    With ``adaptor_lr`` 0 (the default) it stays there: on a budget of a few CPU epochs, training it
    jointly (the paper's choice, ``adaptor_lr`` = ``lr``) collapsed the synthetic washer set's image
    AUROC to 0.33-0.58, frozen it reached 0.84-0.89 (docs/commands.md, GLASS).

    Training runs on features extracted once (the backbone is frozen), in steps of ``batch_patches``
    patch features drawn at random from all fit images (the paper steps on all patches of 8 images;
    on a CPU the number of steps is what limits the discriminator). The checkpoint kept is the
    epoch with the best :meth:`selection_score` on the holdout images only (never the test split): the
    image AUROC when the holdout is labelled (a ``val/`` split), else minus the discriminator's loss on
    held-out good features against ring anomalies made from them with fixed noise and no gradient
    ascent: the training objective on images it never saw, on one fixed set of anomalies for every
    epoch, so it compares epochs and falls when the discriminator overfits the fit images. (The patch
    AUROC of the same pairs was tried first: it reaches 1.0 in the first epoch on bottle and then
    cannot tell epochs apart; the held-out good images' max score alone rewards a discriminator that
    calls everything normal.) Ties go to the later epoch.
    """

    family = "glass"
    config_section = GlassSection
    low_precision_modules = ("extractor",)
    fit_is_statistics = False

    def __init__(self, backbone: str = "efficientnet_lite0", stages: Sequence[str] = ("stage3", "stage5"),
                 input_size: Sequence[int] = (224, 224), *, neighbourhood: int = 3, feature_std: float = 0.1,
                 hidden_dim: int = 128, epochs: int = 8, batch_patches: int = 512, lr: float = 2e-4,
                 adaptor_lr: float = 0.0, noise_std: float = 0.1, n_step: int = 5, eta: float = 0.1, r1: float = 1.0,
                 r2: float = 2.0, n_proj: int = 1, smoothing_sigma: float = 4.0, seed: int = 0,
                 pretrained: bool = True, weights: str | None = None):
        super().__init__(backbone, stages, tuple(input_size), smoothing_sigma, pretrained=pretrained,
                         weights=weights)
        self.neighbourhood = neighbourhood
        self.feature_std = feature_std
        self.hidden_dim = hidden_dim
        self.epochs = epochs
        self.batch_patches = batch_patches
        self.lr = lr
        self.adaptor_lr = adaptor_lr
        self.noise_std = noise_std
        self.n_step = n_step
        self.eta = eta
        self.r1 = r1
        self.r2 = r2
        self.n_proj = n_proj
        self.smoothing_sigma = smoothing_sigma
        self.seed = seed
        dim = sum(self.extractor.channels())
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.adaptor = nn.Linear(dim, dim)
            self.discriminator = nn.Sequential(nn.Linear(dim, hidden_dim), nn.BatchNorm1d(hidden_dim),
                                               nn.LeakyReLU(0.2), nn.Linear(hidden_dim, 1, bias=False))
            for layer in (self.adaptor, self.discriminator[0], self.discriminator[3]):
                nn.init.xavier_normal_(layer.weight)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Locally aware patch features N x D x h x w at the finest stage's resolution."""
        return aggregate_stages(self.extractor(x), self.neighbourhood)

    def patch_scores(self, embedding: torch.Tensor) -> torch.Tensor:
        """Anomaly score of every adapted patch feature, N x 1 x h x w: softplus of the discriminator's
        logit, i.e. -log(1 - p), its loss for calling the patch normal.

        Not the probability p: that saturates at 1.0 (confident patches tie, and a threshold of mean
        + k sd of the held-out good scores can pass 1.0). Not the raw logit: it puts the threshold
        near 0, where the export gates' tolerance (a fraction of the threshold) means nothing. The
        softplus is positive, unbounded and monotonic in the logit.
        """
        n, _, h, w = embedding.shape
        return F.softplus(self.discriminator(self.adaptor(_patches(embedding)))).reshape(n, 1, h, w)

    def synthesize(self, normal: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """:func:`synthesize_anomalies` with this model's settings and discriminator."""
        return synthesize_anomalies(normal, self.discriminator, noise_std=self.noise_std, n_step=self.n_step,
                                    eta=self.eta, r1=self.r1, r2=self.r2, n_proj=self.n_proj, generator=generator)

    @torch.no_grad()
    def _features(self, batches: Iterable[torch.Tensor], progress: bool, desc: str) -> torch.Tensor:
        """Patch features N x D x h x w of every image of ``batches``, in order (the frozen part, once)."""
        device = self.head.rows.device
        return torch.cat([self.embed(x.to(device)) for x in tqdm(batches, desc=desc, disable=not progress,
                                                                  unit="batch")])

    @torch.no_grad()
    def _standardise_adaptor(self, patches: torch.Tensor) -> None:
        """Adaptor := per-channel standardisation of ``patches`` (P x D) to std ``feature_std``."""
        mean, std = patches.mean(0), patches.std(0)
        std = std.clamp_min(1e-3 * float(std.mean()) + 1e-12) / self.feature_std  # no blow-up of flat channels
        self.adaptor.weight.copy_(torch.diag(1.0 / std))
        self.adaptor.bias.copy_(-mean / std)

    @torch.no_grad()
    def image_scores(self, features: torch.Tensor, chunk: int = 16) -> np.ndarray:
        """Image scores (max of the anomaly map) of cached patch features N x D x h x w."""
        return torch.cat([self.head(self.patch_scores(features[i:i + chunk])).flatten(1).amax(1)
                          for i in range(0, len(features), chunk)]).cpu().numpy()

    @torch.no_grad()
    def selection_score(self, features: torch.Tensor, labels: np.ndarray) -> float:
        """Checkpoint score (higher is better) from holdout features only (see the class docstring)."""
        was_training = self.training
        self.eval()
        try:
            if 0 < labels.sum() < len(labels):
                return image_auroc(labels, self.image_scores(features))
            good = self.adaptor(_patches(features[torch.from_numpy(labels == 0)]))
            gen = torch.Generator().manual_seed(self.seed + 1)  # the same anomalies every epoch
            noise = torch.randn(good.shape, generator=gen).to(good.device)
            synthetic = project_to_ring(good + self.noise_std * noise, good, self.r1, self.r2)
            logits = self.discriminator(torch.cat([good, synthetic]))[:, 0]
            targets = torch.cat([torch.zeros(len(good)), torch.ones(len(good))]).to(logits.device)
            return -float(F.binary_cross_entropy_with_logits(logits, targets))
        finally:
            self.train(was_training)

    def fit(self, batches: Batches | Iterable[torch.Tensor], progress: bool = True, *,
            holdout: Batches | Iterable[torch.Tensor] | None = None) -> None:
        """Train adaptor and discriminator for ``epochs`` on the features of ``batches`` (extracted once),
        keeping the epoch with the best :meth:`selection_score` on ``holdout`` (the last one without)."""
        features = self._features(batches, progress, "features")
        hold = self._features(holdout, progress, "holdout features") if holdout is not None else None
        hold_labels = (np.asarray(getattr(holdout, "labels", np.zeros(len(hold), dtype=np.int64)))
                       if hold is not None else None)
        patches = _patches(features)
        self._standardise_adaptor(patches)
        groups = [{"params": self.discriminator.parameters(), "lr": self.lr}]
        if self.adaptor_lr > 0:
            groups.append({"params": self.adaptor.parameters(), "lr": self.adaptor_lr})
        optimizer = torch.optim.Adam(groups)
        gen = torch.Generator().manual_seed(self.seed)
        self.history = {"loss_normal": [], "loss_synthetic": [], "selection_score": []}
        best, best_score, best_epoch = None, -math.inf, self.epochs - 1
        self.train()
        bar = tqdm(range(self.epochs), desc="epochs", disable=not progress, unit="epoch")
        for epoch in bar:
            order = torch.randperm(len(patches), generator=gen)
            sums = np.zeros(2)
            for start in range(0, len(order), self.batch_patches):
                with torch.set_grad_enabled(self.adaptor_lr > 0):
                    adapted = self.adaptor(patches[order[start:start + self.batch_patches]])
                # the synthetic features follow the adaptor: a fixed offset from the adapted normal ones
                synthetic = adapted + (self.synthesize(adapted, gen) - adapted.detach())
                logits = self.discriminator(torch.cat([adapted, synthetic]))[:, 0]
                loss_normal = F.binary_cross_entropy_with_logits(logits[:len(adapted)],
                                                                 torch.zeros_like(logits[:len(adapted)]))
                loss_synthetic = F.binary_cross_entropy_with_logits(logits[len(adapted):],
                                                                    torch.ones_like(logits[len(adapted):]))
                optimizer.zero_grad()
                (loss_normal + loss_synthetic).backward()
                optimizer.step()
                sums += (loss_normal.item(), loss_synthetic.item())
            n_batches = -(-len(order) // self.batch_patches)
            self.history["loss_normal"].append(float(sums[0] / n_batches))
            self.history["loss_synthetic"].append(float(sums[1] / n_batches))
            score = self.selection_score(hold, hold_labels) if hold is not None and len(hold) else math.nan
            self.history["selection_score"].append(score)
            if not score < best_score:  # ties and NaN (no holdout) keep the later epoch
                best_score, best_epoch = score, epoch
                best = copy.deepcopy((self.adaptor.state_dict(), self.discriminator.state_dict()))
            bar.set_postfix(normal=f"{sums[0] / n_batches:.3f}", synthetic=f"{sums[1] / n_batches:.3f}",
                            selection=f"{score:.4f}")
        self.adaptor.load_state_dict(best[0])
        self.discriminator.load_state_dict(best[1])
        self.eval()
        log.info("GLASS: kept epoch %d of %d (selection score %.4f)", best_epoch + 1, self.epochs, best_score)

    def hyperparameters(self) -> dict:
        """Constructor arguments (without weights)."""
        return {"backbone": self.extractor.spec.name, "stages": self.extractor.stages,
                "input_size": list(self.input_size), "neighbourhood": self.neighbourhood,
                "feature_std": self.feature_std, "hidden_dim": self.hidden_dim, "epochs": self.epochs,
                "batch_patches": self.batch_patches, "lr": self.lr,
                "adaptor_lr": self.adaptor_lr, "noise_std": self.noise_std,
                "n_step": self.n_step, "eta": self.eta, "r1": self.r1, "r2": self.r2, "n_proj": self.n_proj,
                "smoothing_sigma": self.smoothing_sigma, "seed": self.seed}
