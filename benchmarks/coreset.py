"""Time PatchCore's greedy coreset selection: `python -m benchmarks.coreset [--patches 160000]`.

The issue's target: 10 % of about 160k patches in under 60 s on a 2-core CPU. Timing does not depend
on the feature values, so random features of the real dimension (152 for Lite0 stage3 + stage5)
stand in for a bank of ~200 images x 784 patches.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from edgeinspect.train.models.patchcore import greedy_coreset


def main() -> None:
    """Parse arguments, run one selection, print the figures as JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--patches", type=int, default=160_000)
    parser.add_argument("--dim", type=int, default=152)
    parser.add_argument("--ratio", type=float, default=0.1)
    parser.add_argument("--projection-dim", type=int, default=64)
    args = parser.parse_args()
    features = torch.randn(args.patches, args.dim, generator=torch.Generator().manual_seed(0))
    n_select = int(round(args.ratio * args.patches))
    t0 = time.perf_counter()
    idx = greedy_coreset(features, n_select, args.projection_dim, progress=False)
    seconds = time.perf_counter() - t0
    print(json.dumps({"patches": args.patches, "dim": args.dim, "selected": len(idx),
                      "projection_dim": args.projection_dim, "seconds": round(seconds, 2),
                      "torch_threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
