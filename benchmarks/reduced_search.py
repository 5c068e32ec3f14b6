"""Accuracy of PatchCore's nearest-neighbour search in fewer dimensions, the measurement behind
``model.search_variance``: `python -m benchmarks.reduced_search BUNDLE --data ROOT --category CAT
[--dims 16,32,48,64] [--plain]`.

Patches and memory bank are expressed in the bank's leading k principal axes (centred on the bank's
mean). By default the norm of each vector's residual outside those axes is one more coordinate
(``PrincipalSubspace``, as the product searches), so the (k + 1)-dim distance is a lower bound of the exact
one (exact when the two residuals are parallel); ``--plain`` adds both residual norms instead (the search in
k dims with full norms). Prints, per k, the share of the bank's variance its axes hold, the image AUROC, pixel
AUROC and PRO of the bundle's test images scored with that search in PyTorch, and the relative error of the
nearest distances, next to the exact search over the bundle's whole bank.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from edgeinspect.bundle import Bundle
from edgeinspect.train.data import MVTecCategory
from edgeinspect.train.data.batches import Batches
from edgeinspect.train.metrics import image_auroc, pixel_auroc, pro
from edgeinspect.train.models.patchcore.model import PrincipalSubspace
from edgeinspect.train.trainer import bundle_split, load_model, test_masks

CHUNK = 4096  # patches per distance matrix (4096 x a 15k-entry bank: 250 MB)


def nearest_distance(patches: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """Euclidean distance of each patch to its nearest bank row, in chunks of patches."""
    return torch.cat([torch.cdist(part, bank).amin(1) for part in patches.split(CHUNK)])


def bundle_data_parser(description: str) -> argparse.ArgumentParser:
    """An argument parser for a PatchCore bundle scored on ``--data ROOT --category CAT`` (the offline
    search benchmarks: this one, ``int8_search``, ``bank_size``)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("bundle")
    parser.add_argument("--data", required=True)
    parser.add_argument("--category", required=True)
    return parser


@torch.no_grad()
def embed_samples(model: torch.nn.Module, bundle: Bundle, dataset: MVTecCategory, samples: list) -> torch.Tensor:
    """Embeddings (N x D x h x w) of ``samples`` under the bundle's preprocessing, 8 images at a time."""
    return torch.cat([model.embed(x) for x in Batches(dataset, samples, bundle.preprocess, 8)])


@torch.no_grad()
def embed_test_images(bundle_dir: str, data: str, category: str) -> tuple[torch.nn.Module, torch.Tensor,
                                                                          np.ndarray, np.ndarray]:
    """The PatchCore bundle's model, the embeddings of its test images (N x D x h x w), their labels and
    ground-truth masks."""
    bundle = Bundle.open(bundle_dir)
    model = load_model(bundle)
    dataset = MVTecCategory(data, category)
    samples = bundle_split(bundle, dataset).test
    embedding = embed_samples(model, bundle, dataset, samples)
    labels = np.array([s.label for s in samples])
    return model, embedding, labels, test_masks(dataset, samples, bundle.preprocess)


@torch.no_grad()
def main() -> None:
    """Embed the test images once, score them with the exact and each reduced search, print the figures."""
    parser = bundle_data_parser(__doc__)
    parser.add_argument("--dims", default="16,32,48,64")
    parser.add_argument("--plain", action="store_true", help="full residual norms added instead of a coordinate")
    args = parser.parse_args()
    model, embedding, labels, masks = embed_test_images(args.bundle, args.data, args.category)
    n, d, h, w = embedding.shape
    patches = embedding.permute(0, 2, 3, 1).reshape(-1, d)
    bank = model.memory_bank
    mean = bank.mean(0)
    _, singular, axes_t = torch.linalg.svd(bank - mean, full_matrices=False)
    explained = (singular**2).cumsum(0) / (singular**2).sum()
    exact = nearest_distance(patches, bank)
    print(f"bank {tuple(bank.shape)}, {n} test images x {h * w} patches")
    for k in [d, *(int(k) for k in args.dims.split(","))]:
        if k >= d:
            nearest = exact
        else:
            axes = axes_t[:k].T
            if args.plain:  # |p - b|^2 in the axes plus both residual norms (no cross term)
                a, b = (patches - mean) @ axes, (bank - mean) @ axes
                resid_p = ((patches - mean) ** 2).sum(1) - (a * a).sum(1)
                resid_b = ((bank - mean) ** 2).sum(1) - (b * b).sum(1)
                nearest = torch.cat([(torch.cdist(part, b) ** 2 + rp[:, None] + resid_b[None]).amin(1)
                                     for part, rp in zip(a.split(CHUNK), resid_p.split(CHUNK), strict=True)])
                nearest = nearest.clamp_min(0.0).sqrt()
            else:
                subspace = PrincipalSubspace(d)
                subspace.set_axes(mean, axes)
                nearest = nearest_distance(subspace(patches), subspace(bank))
        amap = model.head(nearest.reshape(n, 1, h, w))
        maps, scores = amap[:, 0].numpy(), amap.flatten(1).amax(1).numpy()
        error = (nearest - exact).abs() / exact.clamp_min(1e-6)
        print(f"k {k:3d} (variance {float(explained[min(k, d) - 1]):.4f}): image AUROC "
              f"{image_auroc(labels, scores):.4f}, pixel AUROC {pixel_auroc(masks, maps):.4f}, PRO "
              f"{pro(masks, maps):.4f}, nearest-distance relative error mean {float(error.mean()):.4f} "
              f"p99 {float(error.quantile(0.99)):.4f}", flush=True)


if __name__ == "__main__":
    main()
