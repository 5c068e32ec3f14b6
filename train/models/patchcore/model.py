"""PatchCore (Roth et al., CVPR 2022): locally aware patch features, a greedy-coreset memory bank
and nearest-neighbour scoring."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from itertools import accumulate

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from edgeinspect.train.models.base import BackboneAnomalyModel, aggregate_stages
from edgeinspect.train.models.patchcore.config import PatchCoreSection

log = logging.getLogger(__name__)

BANK_BLOCK = 512  # memory-bank entries per block of the nearest-neighbour MatMul (see NearestNeighbourSearch)


def greedy_coreset(features: torch.Tensor, n_select: int, projection_dim: int, seed: int = 0,
                   progress: bool = True, chunk_size: int = 0) -> torch.Tensor:
    """Indices of an approximate k-center greedy coreset of ``features`` (N x D).

    Distances are computed on a Gaussian random projection to ``projection_dim`` dimensions
    (Johnson-Lindenstrauss). With ``chunk_size > 0`` the patches are split at random into chunks of
    at most that many, each chunk gets its share of the picks by its own greedy pass, and the union
    is the coreset (a composable coreset: the union of k-center coresets of the parts covers the
    whole). The cost is then linear in N instead of quadratic (every pick scans one chunk, not all
    patches), and a chunk's working set stays in the CPU cache.
    """
    n = features.shape[0]
    n_select = max(1, min(n_select, n))
    gen = torch.Generator().manual_seed(seed)
    if 0 < projection_dim < features.shape[1]:
        proj = torch.randn(features.shape[1], projection_dim, generator=gen) / projection_dim**0.5
        reduced = features @ proj.to(features.dtype)
    else:
        reduced = features
    n_chunks = -(-n // chunk_size) if chunk_size > 0 else 1
    chunks = torch.randperm(n, generator=gen).tensor_split(n_chunks) if n_chunks > 1 else [torch.arange(n)]
    # each chunk's share of the picks, rounded so that they add up to n_select
    bounds = [0, *(round(n_select * end / n) for end in accumulate(len(c) for c in chunks))]
    shares = [max(1, b - a) for a, b in zip(bounds, bounds[1:], strict=False)]
    picks = []
    with tqdm(total=sum(shares), desc="coreset", disable=not progress, unit="pt", mininterval=1.0) as bar:
        for chunk, share in zip(chunks, shares, strict=True):
            picks.append(chunk[_greedy(reduced[chunk].contiguous(), min(share, len(chunk)), gen, bar)])
    return torch.cat(picks)


def _greedy(points: torch.Tensor, n_select: int, gen: torch.Generator, bar: tqdm) -> torch.Tensor:
    """Plain k-center greedy over ``points``: each pick is the point farthest from all picks so far."""
    n = points.shape[0]
    sq_norm = (points * points).sum(1)
    min_dist = torch.full((n,), float("inf"), dtype=points.dtype)
    dist = torch.empty_like(min_dist)
    selected = torch.empty(n_select, dtype=torch.long)
    idx = int(torch.randint(n, (1,), generator=gen))
    for step in range(n_select):
        selected[step] = idx
        # ||f - c||^2 = ||f||^2 - 2 f.c + ||c||^2, written into `dist` without allocating
        torch.addmv(sq_norm, points, points[idx], alpha=-2.0, out=dist)
        dist.add_(sq_norm[idx])
        torch.minimum(min_dist, dist, out=min_dist)
        idx = int(torch.argmax(min_dist))
        bar.update()
    return selected


class PrincipalSubspace(nn.Module):
    """Patches (P x D) in the memory bank's leading principal axes, plus the norm of their residual outside
    them as one more coordinate (P x (k + 1)); the identity until :meth:`fit_to` picks axes.

    With both the bank and the patches expressed so, |p - b|^2 = |p_in - b_in|^2 + |p_out - b_out|^2 >=
    |p_in - b_in|^2 + (|p_out| - |b_out|)^2: the search's distance is a lower bound of the exact one (equal
    when the two residuals are parallel), and a patch far off the bank's subspace keeps a large distance
    through its residual norm. The search costs (k + 1) / D of the exact one. A module of its own so that it
    stays in float in every engine (only ``/search/`` runs in integers) and a faiss engine's index holds the
    projected bank.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim), persistent=False)
        self.register_buffer("axes", torch.zeros(dim, 0), persistent=False)  # D x k; none: the identity

    def fit_to(self, bank: torch.Tensor, variance: float) -> None:
        """Keep the fewest leading principal axes of ``bank`` (M x D) that hold ``variance`` of its variance;
        none (the identity) when ``variance`` is 1 or that takes D - 1 or more of them (k + 1 coordinates would
        be no fewer than D)."""
        mean = bank.double().mean(0)
        centred = bank.double() - mean
        eigenvalues, eigenvectors = torch.linalg.eigh(centred.T @ centred)  # ascending
        eigenvalues, eigenvectors = eigenvalues.flip(0).clamp_min(0.0), eigenvectors.flip(1)
        held = eigenvalues.cumsum(0) / eigenvalues.sum().clamp_min(1e-30)
        k = int((held < variance - 1e-9).sum()) + 1 if variance < 1.0 else bank.shape[1]
        self.set_axes(mean.float(), eigenvectors[:, :k].float() if k < bank.shape[1] - 1 else None)

    def set_axes(self, mean: torch.Tensor, axes: torch.Tensor | None) -> None:
        """Project onto ``axes`` (D x k) about ``mean`` from now on; None: the identity. Both go to the module's
        device (fit computes them on the CPU)."""
        device = self.mean.device
        self.mean = mean.to(device=device, dtype=torch.float32).contiguous()
        axes = torch.zeros(mean.shape[0], 0) if axes is None else axes
        self.axes = axes.to(device=device, dtype=torch.float32).contiguous()

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """P x D patches -> P x (k + 1) coordinates (P x D unchanged without axes)."""
        if self.axes.shape[1] == 0:
            return patches
        centred = patches - self.mean
        inside = centred @ self.axes
        residual = ((centred * centred).sum(1) - (inside * inside).sum(1)).clamp_min(0.0).sqrt()
        return torch.cat([inside, residual[:, None]], dim=1)


class NearestNeighbourSearch(nn.Module):
    """Euclidean distance of each patch (P x D) to its nearest memory-bank entry, exact.

    min_j |p - b_j|^2 = |p|^2 + min_j (|b_j|^2 - 2 p.b_j): per block of :data:`BANK_BLOCK` entries one
    MatMul of the patches against the block's -2 b_j, plus the block's norms |b_j|^2, reduced to its min
    at once, so the patches x block products stay in the CPU cache instead of going through memory (on the
    2-core CPU the 10 % bottle bank's search took 11 ms instead of 18 ms unblocked); no elementwise pass
    over the patches x bank matrix. A separate module so that its MatMuls are named ``/search/...`` in the
    ONNX graph: the INT8 engine runs them in 8-bit integers (``dynamic_int8_modules``).
    """

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("minus_two_bank_t", torch.zeros(dim, 0), persistent=False)  # D x M: -2 b_j per column
        self.register_buffer("norms", torch.zeros(0), persistent=False)  # M: |b_j|^2

    def set_bank(self, bank: torch.Tensor) -> None:
        """Search ``bank`` (M x D) from now on."""
        self.minus_two_bank_t = (-2.0 * bank.T).contiguous()
        wide = bank.detach().to("cpu" if bank.device.type == "mps" else bank.device, torch.float64)  # MPS: no float64
        self.norms = (wide ** 2).sum(1).float().to(bank.device)

    def bank(self) -> np.ndarray:
        """The memory bank as searched, M x D' float32 (in the principal subspace: D' = k + 1)."""
        return (-0.5 * self.minus_two_bank_t.T).float().cpu().numpy()

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """P x D patches -> P nearest distances."""
        blocks = zip(self.minus_two_bank_t.split(BANK_BLOCK, dim=1), self.norms.split(BANK_BLOCK), strict=True)
        # each block's P x 1 minima side by side, then one min: no op per block to join them (a stack of
        # P-vectors traced to an Unsqueeze per block, 0.1 ms of the 10 % bottle engine)
        partial = torch.cat([(patches @ block + norms).amin(dim=1, keepdim=True) for block, norms in blocks], dim=1)
        nearest = partial.amin(dim=1) + (patches * patches).sum(1)
        return nearest.clamp_min(0.0).sqrt()


class PatchCore(BackboneAnomalyModel):
    """PatchCore anomaly model; the memory bank is a buffer so the exported graph carries it."""

    family = "patchcore"
    score_is_distance = True
    config_section = PatchCoreSection
    dynamic_int8_modules = ("search",)
    nearest_neighbour_module = "search"

    def __init__(self, backbone: str = "efficientnet_lite0", stages: Sequence[str] = ("stage3", "stage5"),
                 input_size: Sequence[int] = (224, 224), *, neighbourhood: int = 3, coreset_ratio: float = 0.1,
                 max_bank: int = 0, search_variance: float = 1.0, projection_dim: int = 64,
                 coreset_chunk: int = 20000, smoothing_sigma: float = 4.0, seed: int = 0, pretrained: bool = True,
                 weights: str | None = None):
        super().__init__(backbone, stages, tuple(input_size), smoothing_sigma, pretrained=pretrained,
                         weights=weights)
        self.neighbourhood = neighbourhood
        self.coreset_ratio = coreset_ratio
        self.max_bank = max_bank  # 0 here (bundles from before the cap had none); configs/patchcore.yaml sets it
        self.search_variance = search_variance  # 1.0 here (the exact search of older bundles); the config sets it
        self.projection_dim = projection_dim
        self.coreset_chunk = coreset_chunk
        self.smoothing_sigma = smoothing_sigma
        self.seed = seed
        dim = sum(self.extractor.channels())
        self.register_buffer("memory_bank", torch.zeros(0, dim), persistent=False)
        self.subspace = PrincipalSubspace(dim)
        self.search = NearestNeighbourSearch(dim)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Locally aware patch features N x D x h x w at the finest stage's resolution."""
        return aggregate_stages(self.extractor(x), self.neighbourhood)

    def patch_scores(self, embedding: torch.Tensor) -> torch.Tensor:
        """Euclidean distance of every patch to its nearest memory-bank entry (see :class:`NearestNeighbourSearch`),
        in the bank's principal subspace where ``search_variance`` < 1 (see :class:`PrincipalSubspace`)."""
        n, d, h, w = embedding.shape
        return self.search(self.subspace(embedding.permute(0, 2, 3, 1).reshape(-1, d))).reshape(n, 1, h, w)

    @torch.no_grad()
    def fit(self, batches: Iterable[torch.Tensor], progress: bool = True, *,
            holdout: Iterable[torch.Tensor] | None = None) -> None:
        """Collect patch features of all good images and keep a greedy coreset of ``coreset_ratio`` of them, at
        most ``max_bank`` (when set)."""
        chunks = []
        for x in tqdm(batches, desc="features", disable=not progress, unit="batch"):
            e = self.embed(x.to(self.memory_bank.device))
            chunks.append(e.permute(0, 2, 3, 1).reshape(-1, e.shape[1]).cpu())
        features = torch.cat(chunks)
        n_keep = int(round(self.coreset_ratio * features.shape[0]))
        if self.max_bank and n_keep > self.max_bank:
            log.info("memory bank: %d entries, the cap model.max_bank (%.0f %% of the %d training patches would be %d)",
                     self.max_bank, 100 * self.coreset_ratio, features.shape[0], n_keep)
            n_keep = self.max_bank
        idx = greedy_coreset(features, n_keep, self.projection_dim, self.seed, progress, self.coreset_chunk)
        self.set_bank(features[idx])

    def set_bank(self, bank: torch.Tensor) -> None:
        """Search ``bank`` (M x D) from now on, in its principal subspace that holds ``search_variance`` of its
        variance (see :class:`PrincipalSubspace`)."""
        self.subspace.fit_to(bank.float(), self.search_variance)
        self._set_bank(bank)

    def _set_bank(self, bank: torch.Tensor) -> None:
        """Search ``bank`` (M x D) from now on, in the subspace already set."""
        device = self.memory_bank.device
        self.memory_bank = bank.to(device=device, dtype=torch.float32).contiguous()
        self.search.set_bank(self.subspace(self.memory_bank))

    def statistics(self) -> dict[str, np.ndarray]:
        """The memory bank, M x D float32; with a principal subspace its mean (D) and axes (D x k) too."""
        stats = {"memory_bank": self.memory_bank.cpu().numpy()}
        if self.subspace.axes.shape[1]:
            stats |= {"search_mean": self.subspace.mean.cpu().numpy(), "search_axes": self.subspace.axes.cpu().numpy()}
        return stats

    def load_statistics(self, stats: dict[str, np.ndarray]) -> None:
        """Install a memory bank (and its search subspace, when it has one) read from a bundle."""
        bank = torch.from_numpy(stats["memory_bank"])
        axes = torch.from_numpy(stats["search_axes"]) if "search_axes" in stats else None
        mean = torch.from_numpy(stats["search_mean"]) if axes is not None else torch.zeros(bank.shape[1])
        self.subspace.set_axes(mean, axes)
        self._set_bank(bank)

    def hyperparameters(self) -> dict:
        """Constructor arguments (without weights)."""
        return {"backbone": self.extractor.spec.name, "stages": self.extractor.stages,
                "input_size": list(self.input_size), "neighbourhood": self.neighbourhood,
                "coreset_ratio": self.coreset_ratio, "max_bank": self.max_bank, "search_variance": self.search_variance,
                "projection_dim": self.projection_dim, "coreset_chunk": self.coreset_chunk,
                "smoothing_sigma": self.smoothing_sigma, "seed": self.seed}
