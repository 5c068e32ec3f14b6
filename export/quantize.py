"""INT8 static quantization with ONNX Runtime's tools, and the sensitivity ranking behind its retries."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

from edgeinspect.errors import ConfigError
from edgeinspect.export.onnx import sort_topologically

CALIBRATION_METHODS = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                       "percentile": CalibrationMethod.Percentile}


class _Inputs(CalibrationDataReader):
    """Feeds preprocessed images to ONNX Runtime's calibrators (and to the activation collector)."""

    def __init__(self, inputs: Sequence[np.ndarray], name: str = "image"):
        self._items = iter([{name: x} for x in inputs])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._items, None)


def quantize_qdq(source: Path, path: Path, inputs: Sequence[np.ndarray], keep_float: Sequence[str], method: str,
                 per_channel: bool, reduce_range: bool) -> None:
    """QDQ model of ``source``: uint8 activations, int8 (per-channel) weights, ``keep_float`` nodes untouched;
    its nodes in topological order.

    With ``reduce_range`` (``int8.reduce_range`` in configs/export.yaml) the weights take 7 bits: x86 CPUs without
    VNNI (AVX2, AVX-512F) add pairs of uint8 x int8 products in 16-bit integers, which 8-bit weights saturate.
    """
    if method not in CALIBRATION_METHODS:
        raise ConfigError(f"int8.calibration_method: {method!r} is not one of {sorted(CALIBRATION_METHODS)}")
    quantize_static(str(source), str(path), _Inputs(inputs), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=per_channel,
                    reduce_range=reduce_range, nodes_to_exclude=list(keep_float),
                    calibrate_method=CALIBRATION_METHODS[method])
    # the quantizer appends nodes after their consumers, those read from inside a Loop body included (which
    # ONNX Runtime tolerates and the ONNX checker does not)
    model = onnx.load(str(path))
    sort_topologically(model.graph)
    onnx.save(model, str(path))


def rank_sensitive_nodes(source: Path, qdq: Path, inputs: Sequence[np.ndarray], candidates: Sequence[str]
                         ) -> list[str]:
    """``candidates`` ordered by how much quantizing their output loses (lowest SQNR first), each
    followed by the Clip/Relu that consumes its output, or, for a Clip/Relu, preceded by the node it clips.

    ONNX Runtime's ``qdq_loss_debug`` runs the float and QDQ models on ``inputs`` and compares each
    activation before and after its quantize/dequantize pair (``qdq_err``, in dB); the node that
    produces the worst-represented activation is the first to keep in float.
    """
    from onnxruntime.quantization.qdq_loss_debug import (
        collect_activations,
        compute_activation_error,
        create_activation_matching,
        modify_model_output_intermediate_tensors,
    )

    graph = onnx.load(str(source)).graph
    producer = {out: n.name for n in graph.node for out in n.output}
    # a node and the activation right after it go together: ONNX Runtime folds Clip/Relu into the producer's
    # quantization range, so a float producer followed by a quantized Clip would lose its clipping, and a float
    # Clip after a quantized producer quantizes that producer's unclipped output, a coarser range than before
    leader = {n.name: producer[n.input[0]] for n in graph.node
              if n.op_type in ("Clip", "Relu") and n.input and n.input[0] in producer}
    follower = {node: activation for activation, node in leader.items()}
    wanted = set(candidates)
    with tempfile.TemporaryDirectory() as tmp:
        float_aug, qdq_aug = Path(tmp) / "float.onnx", Path(tmp) / "qdq.onnx"
        modify_model_output_intermediate_tensors(str(source), str(float_aug))
        modify_model_output_intermediate_tensors(str(qdq), str(qdq_aug))
        float_acts = collect_activations(str(float_aug), _Inputs(inputs))
        qdq_acts = collect_activations(str(qdq_aug), _Inputs(inputs))
    errors = compute_activation_error(create_activation_matching(qdq_acts, float_acts))
    ranked = sorted((err["qdq_err"], producer[name]) for name, err in errors.items()
                    if producer.get(name) in wanted and np.isfinite(err["qdq_err"]))
    seen: list[str] = []
    for _, node in ranked:
        for name in (leader.get(node), node, follower.get(node)):
            if name and name not in seen:
                seen.append(name)
    return seen
