"""``python -m benchmarks.kernel_split``: the backbone's kernel time by kind of operator, FP32 against INT8."""

from __future__ import annotations

from pathlib import Path

from benchmarks.kernel_split import KINDS, kernel_split
from edgeinspect.bench import bundle_test_images, load_images
from edgeinspect.bundle import Bundle


def test_every_int8_convolution_takes_the_kind_of_its_fp32_one(padim_bundle: Path) -> None:
    bundle = Bundle.open(padim_bundle)
    paths = bundle_test_images(bundle).paths[:4]
    tensors = [bundle.preprocess(rgb) for rgb in load_images(paths)]
    split = kernel_split(bundle, tensors, runs=3, rounds=2, threads=1)
    assert set(split) == {*KINDS, "total"}
    for fp32, int8 in split.values():
        assert len(fp32) == len(int8) == 2  # one figure per round
    # Lite0: one stem, then depthwise and 1x1 convolutions only; the INT8 graph's are matched to them in order
    for kind in ("stem", "depthwise", "pointwise 1x1"):
        assert all(us > 0 for us in split[kind][0] + split[kind][1]), kind
    assert split["other convolutions"] == ([0.0, 0.0], [0.0, 0.0])
    assert all(us > 0 for us in split["everything else"][1])  # at least the input's QuantizeLinear
    for i in (0, 1):
        for r in range(2):
            assert abs(split["total"][i][r] - sum(split[k][i][r] for k in KINDS)) < 1e-6
