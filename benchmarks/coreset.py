"""Time PatchCore's greedy coreset selection: `python -m benchmarks.coreset [--patches 160000]`.

Random features of the real dimension (152 for Lite0 stage3 + stage5) stand in for a training set of
~200 images x 784 patches; ``--chunk 0`` times the single greedy pass over all patches (quadratic),
the default the chunked selection that training uses (linear in the number of patches).
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
    parser.add_argument("--chunk", type=int, default=20000, help="coreset_chunk (0 = one greedy pass)")
    args = parser.parse_args()
    features = torch.randn(args.patches, args.dim, generator=torch.Generator().manual_seed(0))
    n_select = int(round(args.ratio * args.patches))
    t0 = time.perf_counter()
    idx = greedy_coreset(features, n_select, args.projection_dim, progress=False, chunk_size=args.chunk)
    seconds = time.perf_counter() - t0
    print(json.dumps({"patches": args.patches, "dim": args.dim, "selected": len(idx),
                      "projection_dim": args.projection_dim, "chunk": args.chunk, "seconds": round(seconds, 2),
                      "torch_threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
