"""ONNX engines: FP32 from the PyTorch graph, FP16 and INT8 (QDQ) from the FP32 engine.

Every file is ``onnx.checker`` clean, has a fixed input shape, and carries the bundle metadata
as ``metadata_props`` (values that are not strings as JSON, as Ultralytics does).
"""

from __future__ import annotations

import json
import logging
import tempfile
import warnings
from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import torch

from edgeinspect.errors import ExportError
from edgeinspect.runtime.backends.onnx import EXACT_PRODUCTS, WEIGHT_BITS_KEY, needs_exact_products

if TYPE_CHECKING:
    from edgeinspect.export.exporter import ExportJob

OPSET = 17

log = logging.getLogger(__name__)


def export_onnx(job: ExportJob, precision: str, path: Path) -> dict[str, Any]:
    """Write the ONNX engine at ``precision`` to ``path``; returns extra manifest fields."""
    metadata = job.metadata("onnx", precision)
    if precision == "fp32":
        write_fp32(job.model, path, job.input_shape, job.output_names)
        extra: dict[str, Any] = {"opset": OPSET}
    elif precision == "fp16":
        extra = write_fp16(job.source_engine("onnx", "fp32"), path, job.low_precision_prefixes())
    else:
        return write_int8(job, path, metadata)
    add_metadata(path, metadata)
    return extra


def write_fp32(model: torch.nn.Module, path: Path, input_shape: tuple[int, ...], output_names: list[str]) -> None:
    """Trace ``model`` to ONNX, fold constants with ONNX Runtime's basic (portable) optimizations, check it."""
    import onnxruntime as ort

    model = model.eval().cpu()
    with tempfile.TemporaryDirectory() as tmp:
        traced = Path(tmp) / "traced.onnx"
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                # a detector whose engine returns a variable number of detections declares those axes
                torch.onnx.export(model, (torch.zeros(input_shape),), str(traced), input_names=["image"],
                                  output_names=output_names, opset_version=OPSET, dynamo=False,
                                  do_constant_folding=True,
                                  dynamic_axes=getattr(model, "onnx_dynamic_axes", None))
        except RuntimeError as exc:
            raise ExportError(f"ONNX export of the PyTorch model failed: {exc}") from exc
        # The traced graph computes "SAME" paddings from shapes at run time; basic optimizations fold
        # them (and other constant subgraphs) into plain Pad/Conv nodes, valid for every provider.
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(path)
        ort.InferenceSession(str(traced), options, providers=["CPUExecutionProvider"])
    proto = onnx.load(str(path))
    fold_zero_pads(proto.graph)
    relax_loop_carried_shapes(proto.graph)
    onnx.save(proto, str(path))
    check(path)


def write_fp16(source: Path, path: Path, low_precision_prefixes: tuple[str, ...]) -> dict[str, Any]:
    """FP16 weights and compute for the feature extractor; statistics and map head stay FP32, as do I/O."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(source))
    keep = float_nodes(model, low_precision_prefixes)
    converted = convert_float_to_float16(model, keep_io_types=True, node_block_list=keep)
    drop_cast_round_trips(converted.graph)
    sort_topologically(converted.graph)  # the converter appends the input casts after their consumers
    onnx.save(converted, str(path))
    check(path)
    return {"kept_float": len(keep)}


def write_int8(job: ExportJob, path: Path, metadata: dict[str, Any], *, explicit: bool = False) -> dict[str, Any]:
    """Static QDQ quantization of the extractor, its statistics refit on the quantized features, the
    model's constant-matrix MatMuls in integers with dynamic activation ranges (``dynamic_int8_modules``);
    retried with more of the most sensitive extractor nodes kept in float each time, then with those MatMuls
    alone back in float instead (a failure from the quantized features does not cost the engine its integer
    MatMuls, nor one from those MatMuls its INT8 extractor), and, where the weights took 7 bits, last with
    8-bit weights, everything in INT8 again (``int8.eight_bit_retry``). Every attempt carries ``metadata`` and its
    weights' bits.

    ``explicit``: the graph a TensorRT INT8 engine is built from, gated the same way with ONNX Runtime: the
    quantized extractor in TensorRT's symmetric int8 (:func:`to_explicit_int8`) with 8-bit weights and ranges
    calibrated by ``tensorrt.calibration_method``, the statistics
    refit on its features, and no integer MatMuls (TensorRT's parser takes none; its GPU runs them in float)."""
    from edgeinspect.export.quantize import quantize_qdq, rank_sensitive_nodes

    cfg = job.settings["int8"]
    source = job.source_engine("onnx", "fp32")
    prefixes = job.low_precision_prefixes()
    model = onnx.load(str(source))
    keep = statistics_nodes(model, prefixes)
    dynamic = job.dynamic_int8_prefixes() if cfg["dynamic_matmuls"] and not explicit else ()
    label = "the TensorRT INT8 graph (ONNX Runtime)" if explicit else "onnx:int8 engine"
    inputs = job.calibration_inputs(int(cfg["calibration_images"]))
    method = job.settings["tensorrt"]["calibration_method"] if explicit else cfg["calibration_method"]
    refit = bool(cfg["refit_statistics"]) and job.model.fit_is_statistics
    # of every weight (int8.reduce_range), the last retry may take 8; a GPU adds its int8 products in 32 bits, so
    # TensorRT's graph takes 8 from the start
    bits = 7 if cfg["reduce_range"] and not explicit else 8
    moved: list[str] = []
    attempts = []
    rounds = int(cfg["exclusion_rounds"])
    eight_bit_retry = bits == 7 and bool(cfg["eight_bit_retry"])

    def quantize(float_graph: Path, keep_float: list[str]) -> None:
        """``float_graph`` quantized to ``path``, which says its weights' bits to every session that runs it: the
        refit's, the gate's, the runtime's (``needs_exact_products``)."""
        quantize_qdq(float_graph, path, inputs, keep_float, method, bool(cfg["per_channel"]),
                     bits == 7)
        if explicit:
            proto = onnx.load(str(path))
            to_explicit_int8(proto.graph)
            onnx.save(proto, str(path))
        add_metadata(path, {**metadata, WEIGHT_BITS_KEY: bits})

    with tempfile.TemporaryDirectory() as tmp:
        for attempt in range(rounds + 1 + eight_bit_retry):
            quantize(source, keep + moved)
            reference, reference_model, reference_keep = source, model, keep  # the float graph quantized last
            if refit:  # same calibration, same extractor quantization: only the float statistics change
                # written by this version: its statistics nodes may be named unlike those of a bundle's FP32
                # engine from an earlier one, so they are found in it, not in that engine
                reference = Path(tmp) / "refit.onnx"
                write_fp32(job.refit_on_engine(path), reference, job.input_shape, job.output_names)
                reference_model = onnx.load(str(reference))
                reference_keep = statistics_nodes(reference_model, prefixes)
                quantize(reference, reference_keep + moved)
            integer_matmuls: list[str] = []
            if dynamic:
                proto = onnx.load(str(path))
                integer_matmuls = quantize_dynamic_matmuls(proto.graph, dynamic, moved, bits == 7)
                onnx.save(proto, str(path))
            parity, _, _ = job.check("onnx", "int8", path)
            attempts.append(parity.describe())
            if parity.passed:
                break
            log.warning("%s attempt %d failed its gate (%d nodes in float, %d-bit weights): %s", label, attempt + 1,
                        len(moved), bits, attempts[-1])
            if attempt < rounds:  # two causes, tried apart: the quantized features first, the integer MatMuls last
                if integer_matmuls and attempt == rounds - 1:
                    moved = list(integer_matmuls)  # the MatMuls alone back in float; the extractor all INT8 again
                else:
                    candidates = [n.name for n in reference_model.graph.node if n.name not in reference_keep + moved]
                    ranked = rank_sensitive_nodes(reference, path, inputs[:8], candidates)
                    moved += ranked[:int(cfg["exclude_per_round"])]
            elif eight_bit_retry and attempt == rounds:  # the 7-bit attempts are spent: one more bit, all INT8 again
                bits, moved = 8, []
        else:
            raise ExportError(f"{label} refused after {len(attempts)} attempts (last with {len(moved)} "
                              f"sensitive nodes in float, {bits}-bit weights): "
                              + " | ".join(attempts))
    check(path)
    return {"int8": {"calibration_images": len(inputs), "calibration_method": method,
                     "per_channel": bool(cfg["per_channel"]), "weight_bits": bits,
                     "activations": "int8, symmetric" if explicit else "uint8",
                     "statistics_refit_on_int8_features": refit,
                     "attempts": len(attempts), "moved_to_float": moved,
                     "statistics_nodes_in_float": len(reference_keep), "integer_matmuls": integer_matmuls}}


class OnnxSubgraph(torch.nn.Module):
    """Stands in for a submodule of the PyTorch model: runs the nodes of an ONNX engine under
    ``prefix`` (from the input to the tensors the rest of the graph reads) with ONNX Runtime.

    Outputs come in the submodule's own order, matched on ``example`` by shape and value.
    """

    def __init__(self, engine: Path, prefix: str, module: torch.nn.Module, example: Any):
        import onnxruntime as ort

        super().__init__()
        model = onnx.load(str(engine))
        # the quantizer's Q/DQ nodes belong to the nodes they quantize, whatever their names
        outside = [n for n in model.graph.node
                   if not n.name.startswith(prefix) and n.op_type not in ("QuantizeLinear", "DequantizeLinear")]
        made_inside = {o for n in model.graph.node if n not in outside for o in n.output}
        boundary = list(dict.fromkeys(i for n in outside for i in n.input if i in made_inside))
        needed, nodes = set(boundary), []
        for node in reversed(model.graph.node):  # the nodes the boundary tensors depend on
            if needed & set(node.output):
                nodes.append(node)
                needed.update(node.input)
        del model.graph.node[:], model.graph.output[:]
        model.graph.node.extend(reversed(nodes))
        model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(t) for t in boundary)
        initializers = [t for t in model.graph.initializer if t.name in needed]
        del model.graph.initializer[:]
        model.graph.initializer.extend(initializers)
        options = ort.SessionOptions()
        if needs_exact_products({p.key: p.value for p in model.metadata_props}):  # as the runtime will run it
            options.add_session_config_entry(EXACT_PRODUCTS, "1")
        self._session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        self._input = model.graph.input[0].name
        with torch.no_grad():
            reference = module(torch.from_numpy(example))
        self._single = isinstance(reference, torch.Tensor)
        wanted = _as_list(reference)
        got = self._session.run(None, {self._input: example})
        self._order = []
        for ref in wanted:
            candidates = [k for k, g in enumerate(got) if g.shape == tuple(ref.shape) and k not in self._order]
            if not candidates:
                raise ExportError(f"the engine has no tensor under {prefix} shaped like {tuple(ref.shape)}")
            self._order.append(min(candidates, key=lambda k: float(abs(got[k] - ref.numpy()).mean())))

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """The engine's tensors for each image of ``x`` (the engine has batch size 1), batched."""
        runs = [self._session.run(None, {self._input: xi[None].cpu().numpy()}) for xi in x]
        outs = [torch.from_numpy(np.concatenate([r[k] for r in runs])).to(x.device) for k in self._order]
        return outs[0] if self._single else outs


def _as_list(value: Any) -> list[torch.Tensor]:
    return [value] if isinstance(value, torch.Tensor) else list(value)


def drop_cast_round_trips(graph: onnx.GraphProto) -> None:
    """Remove FP32 -> FP16 -> FP32 cast pairs the converter puts between two float32 nodes.

    Without this, every tensor between two kept-float nodes (Mahalanobis sums, the anomaly map) is
    rounded to FP16 on the way, and values above 65504 become infinity.
    """
    to = {n.name: next((a.i for a in n.attribute if a.name == "to"), None) for n in graph.node if n.op_type == "Cast"}
    by_output = {o: n for n in graph.node for o in n.output}
    outputs = {o.name for o in graph.output}
    rename: dict[str, str] = {}
    for node in graph.node:
        source = by_output.get(node.input[0]) if node.op_type == "Cast" and node.input else None
        if (to.get(node.name) == onnx.TensorProto.FLOAT and source is not None
                and to.get(source.name) == onnx.TensorProto.FLOAT16):
            if node.output[0] in outputs:  # a graph output keeps its name: pass the float32 tensor through
                node.op_type, node.input[0] = "Identity", source.input[0]
                del node.attribute[:]
            else:
                rename[node.output[0]] = source.input[0]
    for node in graph.node:
        for i, name in enumerate(node.input):
            node.input[i] = rename.get(name, name)
    used = {i for n in graph.node for i in n.input} | outputs
    keep = [n for n in graph.node if n.output[0] not in rename and (n.op_type != "Cast" or n.output[0] in used)]
    del graph.node[:]
    graph.node.extend(keep)


def fold_zero_pads(graph: onnx.GraphProto) -> int:
    """Fold each zero-valued constant Pad whose only consumer is a Conv into that Conv's ``pads``; the
    number folded.

    The backbones' TensorFlow-style "SAME" convolutions trace as Pad + Conv. ONNX Runtime then runs
    the Pad as its own op, and on the CPU every Pad also forces the blocked (NCHWc) layout of the
    convolutions back to NCHW and again forward around it: on EfficientNet-Lite0 the Pads and these
    reorders were about 40 % of the kernel time. A Conv's own (possibly asymmetric) padding does the
    same, in every runtime.
    """
    initializers = {i.name: i for i in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    folded = []
    for pad in graph.node:
        users = consumers.get(pad.output[0] if pad.output else "", [])
        if (pad.op_type != "Pad" or len(users) != 1 or users[0].op_type != "Conv" or pad.output[0] in outputs
                or pad.input[1] not in initializers):
            continue
        mode = next((a.s for a in pad.attribute if a.name == "mode"), b"constant")
        value = pad.input[2] if len(pad.input) > 2 else ""
        if mode != b"constant" or (value and (value not in initializers
                                              or onnx.numpy_helper.to_array(initializers[value]).any())):
            continue
        widths = onnx.numpy_helper.to_array(initializers[pad.input[1]]).tolist()
        rank = len(widths) // 2
        conv = users[0]
        auto_pad = next((a.s for a in conv.attribute if a.name == "auto_pad"), b"NOTSET")
        if auto_pad != b"NOTSET" or min(widths) < 0 or any(widths[i] for i in (0, 1, rank, rank + 1)):
            continue  # only spatial, non-negative padding, into a Conv with explicit pads
        spatial = rank - 2
        own = next((a for a in conv.attribute if a.name == "pads"), None)
        before_after = list(own.ints) if own is not None else [0] * (2 * spatial)
        merged = ([before_after[i] + widths[2 + i] for i in range(spatial)]
                  + [before_after[spatial + i] + widths[rank + 2 + i] for i in range(spatial)])
        if own is not None:
            conv.attribute.remove(own)
        conv.attribute.append(onnx.helper.make_attribute("pads", merged))
        conv.input[0] = pad.input[0]
        folded.append(pad)
    for pad in folded:
        graph.node.remove(pad)
    _drop_unused_initializers(graph)
    return len(folded)


def relax_loop_carried_shapes(graph: onnx.GraphProto) -> int:
    """Forget the traced sizes of the loop-carried values of every Loop (in subgraphs too); returns how
    many values changed.

    The tracer declares them with the sizes of its one example, but a carried value may grow from one
    iteration to the next (torchvision's Mask R-CNN pastes the masks into a tensor that gains a row per
    detection), and ONNX Runtime then logs a VerifyOutputSizes warning at every iteration of every frame.
    The rank is kept; only the sizes become unknown.
    """
    changed = 0
    for node in graph.node:
        for attr in node.attribute:
            if attr.type != onnx.AttributeProto.GRAPH:
                continue
            if node.op_type == "Loop":  # body: (iteration, condition, carried...) -> (condition, carried..., scans...)
                carried = len(node.input) - 2
                for value in [*attr.g.input[2:2 + carried], *attr.g.output[1:1 + carried]]:
                    dims = value.type.tensor_type.shape.dim
                    if any(d.HasField("dim_value") for d in dims):
                        changed += 1
                    for dim in dims:
                        dim.Clear()
            changed += relax_loop_carried_shapes(attr.g)
    return changed


def _needed(node: onnx.NodeProto) -> set[str]:
    """The values a node reads: its inputs and those its subgraphs (Loop / If bodies) take from the outer scope."""
    needed = set(node.input)
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for sub in graphs:
            inner = {i.name for i in sub.input} | {i.name for i in sub.initializer}
            for n in sub.node:
                needed |= _needed(n) - inner
                inner.update(n.output)
    return needed


def sort_topologically(graph: onnx.GraphProto) -> None:
    """Reorder ``graph.node`` so every node comes after the producers of its inputs, those its subgraphs read
    from the outer scope included (stable otherwise)."""
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    produced = {o for n in graph.node for o in n.output}
    pending, ordered = list(graph.node), []
    needs = {id(n): _needed(n) & (produced | available) for n in pending}
    while pending:
        ready = [n for n in pending if needs[id(n)] <= available]
        if not ready:
            raise ExportError(f"graph has a cycle or dangling inputs at {pending[0].name!r}")
        for node in ready:
            available.update(node.output)
        ordered += ready
        done = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in done]
    copies = [onnx.NodeProto.FromString(n.SerializeToString()) for n in ordered]
    del graph.node[:]
    graph.node.extend(copies)


def float_nodes(model: onnx.ModelProto, low_precision_prefixes: tuple[str, ...]) -> list[str]:
    """Names of the nodes outside the low-precision submodules: they stay in float.

    ExportError when no node is inside them (the model's ``low_precision_modules`` name no submodule the
    graph was traced through): the FP16 / INT8 engine would silently be the FP32 one.
    """
    names = [n.name for n in model.graph.node if not n.name.startswith(low_precision_prefixes)]
    if len(names) == len(model.graph.node):
        raise ExportError(f"no node of the ONNX graph is under {', '.join(low_precision_prefixes)} (the model's "
                          f"low_precision_modules): nothing would run in reduced precision")
    return names


def boundary_producers(model: onnx.ModelProto, float_names: list[str]) -> list[str]:
    """Low-precision nodes whose outputs feed the float part: they stay float too, so the features the
    statistics see are not rounded to 8 bits (Mahalanobis distances amplify that rounding)."""
    floats = set(float_names)
    consumed = {i for n in model.graph.node if n.name in floats for i in n.input}
    return [n.name for n in model.graph.node if n.name not in floats and consumed & set(n.output)]


def statistics_nodes(model: onnx.ModelProto, low_precision_prefixes: tuple[str, ...]) -> list[str]:
    """The nodes an INT8 engine keeps in float: those outside the low-precision submodules and the
    low-precision ones that feed them (:func:`float_nodes`, :func:`boundary_producers`)."""
    keep = float_nodes(model, low_precision_prefixes)
    return keep + boundary_producers(model, keep)


def quantize_dynamic_matmuls(graph: onnx.GraphProto, prefixes: tuple[str, ...], keep_float: Collection[str],
                             reduce_range: bool) -> list[str]:
    """Run the MatMul / Gemm nodes named under ``prefixes`` (not in ``keep_float``) whose right-hand matrix
    is a constant in 8-bit integers; the names of the nodes rewritten.

    The left-hand activations are quantized to uint8 at run time (``DynamicQuantizeLinear``, once per
    tensor, its range that of each image, so there is nothing to calibrate), the constant to int8 with a
    symmetric scale per column (per matrix and column of a batch of matrices: PaDiM's P x D x D inverse
    covariances); ``MatMulInteger``, then back to float: Cast, Mul by the two scales, the Gemm's bias added.
    Standard ONNX ops: ONNX Runtime fuses each chain into one kernel on the CPU. A column's scale is its own,
    so a bank entry with small values keeps its precision, and the bias (PatchCore's |b|^2) stays float.
    With ``reduce_range`` the constant takes 7 bits (-63..63), as the QDQ weights do (``int8.reduce_range``).
    """
    initializers = {i.name: i for i in graph.initializer}
    limit = 63 if reduce_range else 127
    quantized_inputs: dict[str, tuple[str, str, str]] = {}
    rewritten, nodes = [], []
    for node in graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        weight = initializers.get(node.input[1]) if len(node.input) > 1 else None
        plain_gemm = (node.op_type == "Gemm" and not attrs.get("transA", 0)
                      and attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0)
        if (node.op_type not in ("MatMul", "Gemm") or (node.op_type == "Gemm" and not plain_gemm)
                or not node.name.startswith(prefixes) or node.name in keep_float
                or weight is None or len(weight.dims) < 2):
            nodes.append(node)
            continue
        matrix = onnx.numpy_helper.to_array(weight).astype(np.float64)
        if attrs.get("transB", 0):
            matrix = matrix.T
        # 2-D: one scale per column (N); batched: one per matrix and column (..., 1, N), as MatMul broadcasts
        scale = np.maximum(np.abs(matrix).max(axis=-2, keepdims=matrix.ndim > 2), 1e-30) / limit
        name, source = node.name, node.input[0]
        if source not in quantized_inputs:
            quantized_inputs[source] = (f"{source}_uint8", f"{source}_scale", f"{source}_zero_point")
            nodes.append(onnx.helper.make_node("DynamicQuantizeLinear", [source], list(quantized_inputs[source]),
                                               name=f"{name}/DynamicQuantizeLinear"))
        q, q_scale, q_zero = quantized_inputs[source]
        graph.initializer.extend([
            onnx.numpy_helper.from_array(np.clip(np.round(matrix / scale), -limit, limit).astype(np.int8),
                                         f"{name}/weight_int8"),
            onnx.numpy_helper.from_array(scale.astype(np.float32), f"{name}/weight_scale"),
            onnx.numpy_helper.from_array(np.zeros(scale.shape, np.int8), f"{name}/weight_zero_point")])
        bias = node.input[2] if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] else ""
        scaled = f"{name}/scaled" if bias else node.output[0]
        nodes += [
            onnx.helper.make_node("MatMulInteger", [q, f"{name}/weight_int8", q_zero, f"{name}/weight_zero_point"],
                                  [f"{name}/int32"], name=f"{name}/MatMulInteger"),
            onnx.helper.make_node("Cast", [f"{name}/int32"], [f"{name}/float"], name=f"{name}/Cast",
                                  to=onnx.TensorProto.FLOAT),
            onnx.helper.make_node("Mul", [q_scale, f"{name}/weight_scale"], [f"{name}/scales"],
                                  name=f"{name}/MulScales"),
            onnx.helper.make_node("Mul", [f"{name}/float", f"{name}/scales"], [scaled], name=f"{name}/Mul")]
        if bias:
            nodes.append(onnx.helper.make_node("Add", [scaled, bias], [node.output[0]], name=f"{name}/AddBias"))
        rewritten.append(name)
    del graph.node[:]
    graph.node.extend(nodes)
    _drop_unused_initializers(graph)
    return rewritten


def to_explicit_int8(graph: onnx.GraphProto) -> dict[str, int]:
    """Rewrite a QDQ graph of ONNX Runtime's quantizer into the explicit quantization TensorRT's ONNX parser
    takes; what was rewritten, by kind.

    TensorRT quantizes symmetrically, in int8 with zero point 0: each uint8 Quantize/Dequantize pair of the
    activations (range ``s * (0 - z)`` to ``s * (255 - z)``) takes int8 with scale ``s * max(z, 255 - z) / 127``,
    which holds the same range, and a Clip to that range before the Quantize: the uint8 range clipped, and ONNX
    Runtime's quantizer drops the ReLU6 / ReLU whose clipping a range with ``z = 0`` does. The int32 biases'
    DequantizeLinear are folded into float constants. The int8 weights and their per-channel scales stay as they
    are.
    """
    initializers = {i.name: i for i in graph.initializer}
    symmetric: dict[tuple[str, str], tuple[str, str]] = {}
    folded: list[onnx.NodeProto] = []
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        nodes.append(node)
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        data = initializers.get(node.input[0])
        if node.op_type == "DequantizeLinear" and data is not None and data.data_type == onnx.TensorProto.INT32:
            folded.append(node)
            continue
        zero = initializers.get(node.input[2]) if len(node.input) > 2 else None
        if zero is None or zero.data_type != onnx.TensorProto.UINT8:
            continue
        scale = onnx.numpy_helper.to_array(initializers[node.input[1]]).astype(np.float64)
        z = onnx.numpy_helper.to_array(zero).astype(np.float64)
        if scale.size != 1 or z.size != 1:
            raise ExportError(f"{node.name}: an activation quantized per channel has no int8 form for TensorRT")
        key = (node.input[1], node.input[2])
        if key not in symmetric:
            symmetric[key] = (f"{node.input[1]}_symmetric", f"{node.input[2]}_int8")
            graph.initializer.extend([
                onnx.numpy_helper.from_array((scale * max(z, 255 - z) / 127).astype(np.float32), symmetric[key][0]),
                onnx.numpy_helper.from_array(np.zeros(z.shape, np.int8), symmetric[key][1])])
        if node.op_type == "QuantizeLinear":
            bounds = [f"{node.name}/clip_min", f"{node.name}/clip_max"]
            graph.initializer.extend(onnx.numpy_helper.from_array(np.array(v, np.float32).reshape(()), name)
                                     for v, name in zip((scale * -z, scale * (255 - z)), bounds, strict=True))
            nodes.insert(-1, onnx.helper.make_node("Clip", [node.input[0], *bounds], [f"{node.input[0]}/clipped"],
                                                   name=f"{node.name}/Clip"))
            node.input[0] = f"{node.input[0]}/clipped"
        node.input[1], node.input[2] = symmetric[key]
    for node in folded:
        scale = onnx.numpy_helper.to_array(initializers[node.input[1]])
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        values = onnx.numpy_helper.to_array(initializers[node.input[0]]).astype(np.float64)
        if scale.ndim == 1 and values.ndim > 1:  # per-axis scale along ``axis``
            scale = scale.reshape([-1 if d == axis % values.ndim else 1 for d in range(values.ndim)])
        graph.initializer.append(onnx.numpy_helper.from_array((values * scale).astype(np.float32), node.output[0]))
        nodes.remove(node)
    del graph.node[:]
    graph.node.extend(nodes)
    # a tensor's recorded type would still say uint8
    for info in [v for v in graph.value_info if v.type.tensor_type.elem_type == onnx.TensorProto.UINT8]:
        graph.value_info.remove(info)
    _drop_unused_initializers(graph)
    return {"activation_ranges": len(symmetric), "folded_biases": len(folded)}


def _drop_unused_initializers(graph: onnx.GraphProto) -> None:
    used = {name for node in graph.node for name in _needed(node)}
    unused = [i for i in graph.initializer if i.name not in used]
    for initializer in unused:
        graph.initializer.remove(initializer)


def check(path: Path) -> None:
    """``onnx.checker`` full check; ExportError naming the file otherwise."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"{path} fails the ONNX checker: {exc}") from exc


def add_metadata(path: Path, metadata: dict[str, Any]) -> None:
    """Store ``metadata`` in the file's ``metadata_props`` (JSON for non-strings)."""
    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value)
    onnx.save(proto, str(path))


def write_decision(path: Path, decision: dict[str, Any]) -> None:
    """Replace the decision in an ONNX engine's metadata by the one its gate gave it; the rest is kept."""
    add_metadata(path, {**read_metadata(path), "decision": decision})


def read_metadata(path: str | Path) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file, as stored."""
    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
