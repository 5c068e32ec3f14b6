"""Accuracy of PatchCore by memory-bank size, the measurement behind ``model.max_bank``:
`python -m benchmarks.bank_size BUNDLE --data ROOT --category CAT [--sizes 1024,2048,4096,8192,16384]`.

Embeds the bundle's fit images once and chooses the coreset of each size with the product's own
``greedy_coreset`` (the bundle's projection, chunks and seed), which is what ``model.max_bank = size``
keeps: the same chunks and start points, each chunk's greedy order cut shorter. Then scores the bundle's
test images with each bank in PyTorch and prints image AUROC, pixel AUROC and PRO, and the scores of the
good images training held out for the threshold (every good patch's distance grows as the bank shrinks). A size
of 0, or one above the bundle's ``coreset_ratio`` share of the patches, means that whole share.
"""

from __future__ import annotations

import numpy as np
import torch

from benchmarks.reduced_search import bundle_data_parser, embed_samples, embed_test_images
from edgeinspect.bundle import Bundle
from edgeinspect.train.data import MVTecCategory
from edgeinspect.train.metrics import image_auroc, pixel_auroc, pro
from edgeinspect.train.models.patchcore.model import PatchCore, greedy_coreset
from edgeinspect.train.trainer import bundle_split


def flat_patches(embedding: torch.Tensor) -> torch.Tensor:
    """N x D x h x w embeddings -> (N h w) x D patches."""
    return embedding.permute(0, 2, 3, 1).reshape(-1, embedding.shape[1])


@torch.no_grad()
def score(model: PatchCore, embedding: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Anomaly maps (N x H x W) and image scores of embeddings, 8 images at a time, with the model's bank."""
    maps = torch.cat([model.head(model.patch_scores(part)) for part in embedding.split(8)])
    return maps[:, 0].numpy(), model.image_score(embedding, maps).numpy()


@torch.no_grad()
def main() -> None:
    """Embed fit, held-out and test images once; refit the bank at each size and print the figures."""
    parser = bundle_data_parser(__doc__)
    parser.add_argument("--sizes", default="1024,2048,4096,8192,16384",
                        help="bank sizes, comma-separated; 0 = the whole coreset_ratio share")
    args = parser.parse_args()
    model, test_embedding, labels, masks = embed_test_images(args.bundle, args.data, args.category)
    bundle = Bundle.open(args.bundle)
    dataset = MVTecCategory(args.data, args.category)
    split = bundle_split(bundle, dataset)

    features = flat_patches(embed_samples(model, bundle, dataset, split.fit))
    good_held_out = [s for s in split.calibration if not s.label]  # a val/ split has defects too
    held_out = embed_samples(model, bundle, dataset, good_held_out)
    share = int(round(model.coreset_ratio * features.shape[0]))
    print(f"{len(split.fit)} fit images, {features.shape[0]} patches, {share} at coreset_ratio "
          f"{model.coreset_ratio}; {len(labels)} test images")
    for size in sorted({min(int(s), share) if int(s) else share for s in args.sizes.split(",")}):
        idx = greedy_coreset(features, size, model.projection_dim, model.seed, False, model.coreset_chunk)
        model.set_bank(features[idx])
        maps, scores = score(model, test_embedding)
        _, good_scores = score(model, held_out)
        print(f"bank {size:6d}: image AUROC {image_auroc(labels, scores):.4f}, pixel AUROC "
              f"{pixel_auroc(masks, maps):.4f}, PRO {pro(masks, maps):.4f}; held-out good scores mean "
              f"{good_scores.mean():.3f} sd {good_scores.std():.3f}", flush=True)


if __name__ == "__main__":
    main()
