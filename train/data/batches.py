"""Preprocessed image batches of a list of samples, for fitting models: one pass in order for the
statistics families, seeded shuffled epochs (images kept in memory) for the gradient-trained ones."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from edgeinspect.preprocess import Preprocess
from edgeinspect.train.data.mvtec import MVTecCategory, Sample

# Epochs keep the preprocessed images in memory when they fit in this many bytes, else re-read them.
MAX_CACHE_BYTES = 2 * 1024**3


class Batches:
    """Batches (NCHW float32 tensors) of ``samples``, re-iterable.

    ``for x in batches`` reads the images in sample order (nothing is kept). :meth:`epoch` yields
    ``(x, labels)`` in an order shuffled by ``(seed, epoch)``, from memory after the first epoch.
    """

    def __init__(self, dataset: MVTecCategory, samples: Sequence[Sample], preprocess: Preprocess,
                 batch_size: int, *, seed: int = 0):
        self.dataset = dataset
        self.samples = list(samples)
        self.preprocess = preprocess
        self.batch_size = batch_size
        self.seed = seed
        self._cache: np.ndarray | None = None

    def __len__(self) -> int:
        """Number of batches in one pass."""
        return -(-len(self.samples) // self.batch_size)

    @property
    def labels(self) -> np.ndarray:
        """0 (good) / 1 (defective) per sample, in sample order."""
        return np.array([s.label for s in self.samples], dtype=np.int64)

    def _load(self, idx: Sequence[int]) -> np.ndarray:
        if self._cache is not None:
            return self._cache[np.asarray(idx)]
        return self.preprocess.batch([self.dataset.load_image(self.samples[i]) for i in idx])

    def __iter__(self) -> Iterator[torch.Tensor]:
        for start in range(0, len(self.samples), self.batch_size):
            yield torch.from_numpy(self._load(range(start, min(start + self.batch_size, len(self.samples)))))

    def epoch(self, index: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One shuffled pass of ``(images, labels)``; the order depends only on ``seed`` and ``index``."""
        if self._cache is None and self.samples:
            h, w = self.preprocess.input_size
            if len(self.samples) * 3 * h * w * 4 <= MAX_CACHE_BYTES:
                self._cache = np.concatenate([b.numpy() for b in self])
        order = np.random.default_rng([self.seed, index]).permutation(len(self.samples))
        labels = torch.from_numpy(self.labels)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            yield torch.from_numpy(self._load(idx)), labels[idx]
