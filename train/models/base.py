"""What every anomaly model shares: the map head (upsample a patch-score grid to the input size,
Gaussian smoothing, image score = max of the map) and the fit/bundle contract; and, for the families
on a frozen feature extractor with a statistics-based scorer, :class:`BackboneAnomalyModel`.

``forward`` is exactly what is exported to an engine: NCHW float32 in, ``(anomaly_map, score)`` out,
with the scoring (nearest neighbour / Mahalanobis / reconstruction error) inside the graph (see
ARCHITECTURE.md for why).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgeinspect.schema import Section
from edgeinspect.train.backbones import FeatureExtractor, get_backbone_spec
from edgeinspect.train.data.split import DataSplit, one_class_split

if TYPE_CHECKING:
    from edgeinspect.train.data.batches import Batches
    from edgeinspect.train.data.mvtec import MVTecCategory


def gaussian_kernel(sigma: float) -> torch.Tensor:
    """Normalised 1-D Gaussian of radius ``round(4 sigma)`` (at least 1)."""
    radius = max(1, int(4.0 * sigma + 0.5))
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    return kernel / kernel.sum()


def upsample_blur_matrix(n_in: int, n_out: int, sigma: float) -> torch.Tensor:
    """``n_out x n_in`` matrix of one axis of the map head: bilinear upsampling (align_corners False)
    followed by Gaussian smoothing with reflect padding. Both are linear and separable, so the 2-D
    head is ``rows @ patch_map @ cols.T``, computed exactly (to float rounding) by two small MatMuls."""
    basis = torch.eye(n_in, dtype=torch.float64).reshape(n_in, 1, n_in, 1)
    up = F.interpolate(basis, size=(n_out, 1), mode="bilinear", align_corners=False)
    if sigma > 0:
        kernel = gaussian_kernel(sigma)
        r = kernel.numel() // 2
        up = F.conv2d(F.pad(up, (0, 0, r, r), mode="reflect"), kernel.view(1, 1, -1, 1))
    return up.reshape(n_in, n_out).T.float().contiguous()


class MapHead(nn.Module):
    """Patch-score grid N x 1 x h x w -> anomaly map N x 1 x H x W: bilinear upsampling then Gaussian
    smoothing (reflect borders), as one matrix product per axis (no Resize/Pad/Conv in the engine)."""

    def __init__(self, grid: tuple[int, int], out_size: tuple[int, int], sigma: float):
        super().__init__()
        self.register_buffer("rows", upsample_blur_matrix(grid[0], out_size[0], sigma), persistent=False)
        self.register_buffer("cols_t", upsample_blur_matrix(grid[1], out_size[1], sigma).T.contiguous(),
                             persistent=False)

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        """rows @ scores @ cols^T over the last two axes."""
        return torch.matmul(torch.matmul(self.rows, scores), self.cols_t)


class AnomalyModel(nn.Module):
    """Base class: subclasses implement :meth:`embed`, :meth:`patch_scores`, :meth:`fit`, the statistics
    I/O (when they have statistics), :meth:`normalization` and the manifest fields
    (:meth:`hyperparameters`, :meth:`weights_source`, :meth:`tag`)."""

    family: str = ""
    # what the bundle serves (DetectorModel: "detections"); selects the config schema, trainer and runtime
    task: str = "anomaly_map"
    # The family's ``model`` config section (declared beside it, in <family>/config.py).
    config_section: type[Section] = Section
    # Submodules whose operations may run in FP16/INT8 engines; everything else (the statistics,
    # nearest-neighbour / Mahalanobis scoring and the map head) stays in float32, except the MatMuls of
    # ``dynamic_int8_modules`` below in the ONNX INT8 engine.
    low_precision_modules: tuple[str, ...] = ("extractor",)
    # Submodules of that float part whose MatMuls against constant matrices the ONNX INT8 engine runs in
    # 8-bit integers, the activations quantized per image at run time instead of calibrated
    # (export/onnx.py quantize_dynamic_matmuls; PatchCore's nearest-neighbour search, PaDiM's Mahalanobis products).
    # The INT8 gate checks them.
    dynamic_int8_modules: tuple[str, ...] = ()
    # The submodule (if any) that finds each patch's nearest memory-bank entry (P x D patches -> P distances,
    # with a ``bank()`` method): a ``faiss`` engine runs it as a FAISS index over that bank (export/faiss.py).
    nearest_neighbour_module: str | None = None
    # fit() only gathers statistics over the outputs of the frozen low-precision modules, so an INT8
    # engine can have them refit on its own (quantized) features in seconds, without training.
    fit_is_statistics: bool = True
    # Scores are distances to fitted statistics (zero at the training data, growing with the deviation), so an
    # engine that shifts them scales them: its threshold is the bundle's times its median score ratio
    # (configs/export.yaml engine_threshold). Not for probabilities or softplus logits near 0, whose ratio
    # there says nothing about the ratio at the threshold: those engines recalibrate.
    score_is_distance: bool = False

    def __init__(self, input_size: tuple[int, int], grid: tuple[int, int], smoothing_sigma: float):
        """``grid``: the h x w of :meth:`patch_scores`' output, upsampled and smoothed to ``input_size``."""
        super().__init__()
        self.input_size = tuple(input_size)
        self.head = MapHead(tuple(grid), self.input_size, smoothing_sigma)
        # per-epoch training curves (name -> values) of the gradient-trained families; written to the
        # bundle's manifest and plotted into reports/training_curves.png
        self.history: dict[str, list[float]] = {}

    @classmethod
    def normalization(cls, model_config: dict) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(mean, std) the preprocessing normalises images with, from the ``model`` config section."""
        raise NotImplementedError

    def weights_source(self) -> str:
        """Where the weights came from, for the manifest (a backbone's source, or trained here)."""
        raise NotImplementedError

    def tag(self) -> str:
        """Short name of the architecture, the middle part of the bundle id (the backbone's name)."""
        raise NotImplementedError

    @classmethod
    def data_split(cls, dataset: MVTecCategory, config: dict[str, Any]) -> DataSplit:
        """The images this family is fit on, calibrated on and tested on, from its validated ``config``.

        Default (one-class): fit on train/good less a held-out part (all of it when there is a labelled
        val/ split), test on test/. A family that splits the data itself returns a ``description``.
        """
        return one_class_split(dataset, config["train"])

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patch embeddings N x D x h x w (subclasses choose how stage features are combined)."""
        raise NotImplementedError

    def patch_scores(self, embedding: torch.Tensor) -> torch.Tensor:
        """Per-patch anomaly scores N x 1 x h x w from embeddings."""
        raise NotImplementedError

    def fit(self, batches: Batches | Iterable[torch.Tensor], progress: bool = True, *,
            holdout: Batches | None = None) -> None:
        """Build the model from batches of good images.

        ``batches`` can be iterated once (statistics families) or per epoch with
        ``batches.epoch(i)`` (gradient-trained families). ``holdout`` holds the images the threshold
        is calibrated on (labelled when the dataset has a ``val/`` split, else good only): a family
        may use it to choose its checkpoint; it never sees the test split.
        """
        raise NotImplementedError

    def statistics(self) -> dict[str, np.ndarray]:
        """Model statistics to store in the bundle as plain arrays (besides the weights; default: none,
        for families whose whole state is their trained weights)."""
        return {}

    def load_statistics(self, stats: dict[str, np.ndarray]) -> None:
        """Restore the statistics written by :meth:`statistics` (default: there are none)."""

    def hyperparameters(self) -> dict:
        """Everything needed (with the statistics) to rebuild this model."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images N x 3 x H x W -> (anomaly map N x 1 x H x W, image score N)."""
        embedding = self.embed(x)
        amap = self.head(self.patch_scores(embedding))
        return amap, self.image_score(embedding, amap)

    def image_score(self, embedding: torch.Tensor, amap: torch.Tensor) -> torch.Tensor:
        """Image score N from the embeddings and the anomaly map (default: the map's maximum)."""
        return amap.flatten(1).amax(dim=1)


class BackboneAnomalyModel(AnomalyModel):
    """A family on a frozen feature extractor: the patch grid is the finest stage's."""

    def __init__(self, backbone: str, stages: Sequence[str], input_size: tuple[int, int],
                 smoothing_sigma: float, *, pretrained: bool = True, weights: str | None = None):
        extractor = FeatureExtractor(backbone, stages, pretrained=pretrained, weights=weights)
        with torch.no_grad():  # the patch grid: the finest stage, where every family's scores live
            grid = tuple(extractor(torch.zeros(1, 3, *input_size))[0].shape[-2:])
        super().__init__(input_size, grid, smoothing_sigma)
        self.extractor = extractor
        self.weights = weights

    @classmethod
    def normalization(cls, model_config: dict) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """The backbone's mean and std (what its weights were trained on)."""
        spec = get_backbone_spec(model_config["backbone"])
        return spec.mean, spec.std

    def weights_source(self) -> str:
        """The weights file given, else the backbone's own source."""
        return self.weights or self.extractor.spec.weights_source

    def tag(self) -> str:
        """The backbone's name."""
        return self.extractor.spec.name


def aggregate_stages(features: list[torch.Tensor], neighbourhood: int,
                     size: tuple[int, int] | torch.Size | None = None) -> torch.Tensor:
    """Average each stage over a k x k neighbourhood, upsample to ``size`` (default: the first stage's, the
    finest), concatenate.

    The average counts the zero padding at the image border (``count_include_pad=True``): a border
    patch's feature shrinks towards zero, so border patches stay apart from interior ones and find
    their nearest neighbours among the training images' border patches. Averaging over only the
    neighbours that exist made border patches look like noisy interior patches; they then carried
    the image score of good parts (PatchCore image AUROC, 10 % bank: KolektorSDD 0.676 -> 0.844,
    MVTec transistor 0.942 -> 1.000; ARCHITECTURE.md, "The models").
    """
    size = size or features[0].shape[-2:]
    out = []
    for f in features:
        if neighbourhood > 1:
            f = F.avg_pool2d(f, neighbourhood, stride=1, padding=neighbourhood // 2, count_include_pad=True)
        if f.shape[-2:] != size:
            f = F.interpolate(f, size=size, mode="bilinear", align_corners=False)
        out.append(f)
    return torch.cat(out, dim=1)


