"""FAISS indexes for a faiss engine's memory bank, the search alone, against an exact search:
`python -m benchmarks.faiss_index BUNDLE [--precision int8] [--index "IVF{lists},Flat:nprobe=8" ...]
[--threads 2] [--rounds 3]`.

The bundle's faiss engine (``edgeinspect export BUNDLE --format faiss --precision P``) gives the features
graph and the bank. Its ``features.onnx`` embeds the test images of the bundle's dataset; each index is
built over the bank and searched for every image's patches. Prints per index: build seconds, the p50 ms
of one image's search (interleaved rounds), the share of good-image patches whose neighbour is not the
nearest ("off") and the largest such error, and the largest error of an image's maximum, both as a
fraction of the engine's threshold.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import faiss
import numpy as np

from edgeinspect.bundle import Bundle
from edgeinspect.export.faiss import build_index
from edgeinspect.runtime.backends.faiss import FaissBackend
from edgeinspect.train.data import MVTecCategory

DEFAULT_INDEXES = ("IVF{lists},Flat:nprobe=4", "IVF{lists},Flat:nprobe=8", "HNSW32:efSearch=32")


def nearest(index: faiss.Index, patches: np.ndarray) -> np.ndarray:
    """Euclidean distance of each patch to the entry ``index`` returns."""
    return np.sqrt(np.maximum(index.search(patches, 1)[0][:, 0], 0.0))


def main() -> None:
    """Embed the test images with the engine's features graph, then build, time and check each index."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("bundle")
    parser.add_argument("--precision", default="int8")
    parser.add_argument("--index", action="append", help="FACTORY[:SEARCH_PARAMETERS] (repeatable)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    bundle = Bundle.open(args.bundle)
    path, entry = bundle.engine("faiss", args.precision)
    engine = FaissBackend(path, threads=args.threads)
    data = bundle.manifest["data"]
    dataset = MVTecCategory(Path(data["root"]), data["category"])
    samples = dataset.test_samples()
    patches = [engine.features.run(bundle.preprocess(dataset.load_image(s)))[0] for s in samples]
    good = [s.label == 0 for s in samples]
    stored = engine.index
    if not hasattr(stored, "storage"):
        stored.make_direct_map()  # inverted lists: entries can be read back by id
    bank = stored.reconstruct_n(0, stored.ntotal)
    exact_index = faiss.IndexFlatL2(bank.shape[1])
    exact_index.add(bank)
    exact = [nearest(exact_index, p) for p in patches]
    threshold = bundle.engine_decision(entry)["threshold"]
    print(f"{bundle.bundle_id}: {len(bank)} entries x {bank.shape[1]}, {len(samples)} test images "
          f"({sum(good)} good), threshold {threshold:.4g}, {args.threads} threads")
    for spec in args.index or DEFAULT_INDEXES:
        factory, _, params = spec.partition(":")
        t0 = time.perf_counter()
        index = build_index(bank, factory)
        build = time.perf_counter() - t0
        if params:
            faiss.ParameterSpace().set_index_parameters(index, params)
        times = []
        for _ in range(args.rounds):
            for p in patches:
                t0 = time.perf_counter()
                index.search(p, 1)
                times.append(time.perf_counter() - t0)
        found = [nearest(index, p) for p in patches]
        err = np.concatenate([(f - e) / threshold for f, e, g in zip(found, exact, good, strict=True) if g])
        image_err = max(abs(f.max() - e.max()) / threshold for f, e in zip(found, exact, strict=True))
        print(f"{spec:28s} build {build:5.2f} s, search p50 {1e3 * np.median(times):6.2f} ms; good patches off "
              f"{100 * np.mean(err > 1e-4):5.2f} %, max {err.max():.3f}; image max error {image_err:.3f} "
              f"(fractions of the threshold)", flush=True)


if __name__ == "__main__":
    main()
