"""Every row of the format table that can run here: FP16/INT8 ONNX with their gates, Core ML, Triton,
TensorRT's refusal paths, metadata inside each engine, and engine selection in the runtime."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch
from conftest import SYNTH_CATEGORY, _train
from test_daemon import _serve_to_end

from edgeinspect.bundle import Bundle
from edgeinspect.config import load_config
from edgeinspect.errors import BundleError, ConfigError, ExportError
from edgeinspect.export.checks import AnomalyMapCheck
from edgeinspect.export.exporter import CannotBuildHere, ExportJob, _export_all, export_bundle
from edgeinspect.export.formats import AUTO_ORDER, FORMATS
from edgeinspect.export.onnx import (
    OnnxSubgraph,
    add_metadata,
    fold_zero_pads,
    quantize_dynamic_matmuls,
    read_metadata,
    sort_topologically,
    write_fp32,
)
from edgeinspect.export.parity import Gate, compare
from edgeinspect.export.tensorrt import network_source
from edgeinspect.imageio import read_image
from edgeinspect.runtime.backends import OnnxRuntimeBackend, TensorRTBackend, select_engine
from edgeinspect.runtime.backends.onnx import EXACT_PRODUCTS, WEIGHT_BITS_KEY, needs_exact_products
from edgeinspect.runtime.backends.tensorrt import check_plan_version, pack_plan, unpack_plan
from edgeinspect.runtime.predictor import Predictor
from edgeinspect.train.data import MVTecCategory
from edgeinspect.train.data.mvtec import Sample
from edgeinspect.train.models.patchcore.model import BANK_BLOCK, PrincipalSubspace
from edgeinspect.train.trainer import decide, load_model

# A gate any INT8 engine meets (and the faiss engines, INT8 features included), for the tests that need an
# INT8 engine to exist: how far INT8 features move depends on the CPU's integer kernels, and on the synthetic
# parts one flipped verdict fails the default gate. The default gate (configs/export.yaml) is exercised by
# test_int8_gate_refuses_and_retries and on real data.
LENIENT_INT8 = ["int8.min_verdict_agreement=0.0", "int8.max_auroc_drop=1.0", "int8.exclusion_rounds=0",
                "int8.calibration_images=16", "faiss.gate.min_verdict_agreement=0.0", "faiss.gate.max_auroc_drop=1.0"]


@pytest.fixture(scope="module")
def all_engines(patchcore_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list]:
    """A copy of the PatchCore bundle after `export --format all` (INT8 under a lenient gate)."""
    copy = tmp_path_factory.mktemp("engines") / "patchcore"
    shutil.copytree(patchcore_bundle, copy)
    results = export_bundle(copy, "all", "all", settings=load_config("export", overrides=LENIENT_INT8),
                            progress=False)
    return copy, results


def _status(results: list) -> dict[str, str]:
    return {f"{r.format}:{r.precision}": r.status for r in results}


def test_export_all_writes_what_this_machine_can_build(all_engines: tuple[Path, list]) -> None:
    bundle_path, results = all_engines
    status = _status(results)
    for key in ("onnx:fp32", "onnx:fp16", "onnx:int8", "triton:fp32", "triton:fp16", "triton:int8", "faiss:fp32",
                "faiss:fp16", "faiss:int8"):
        assert status[key] == "written", key
    reason = TensorRTBackend.unavailable_reason()
    for precision in ("fp32", "fp16", "int8"):
        if reason:  # no GPU here: TensorRT says why instead of building
            assert status[f"tensorrt:{precision}"] == "skipped"
            assert any("TensorRT" in r.detail and "GPU" in r.detail for r in results if r.format == "tensorrt")
        assert status[f"coreml:{precision}"] == "written"
    bundle = Bundle.open(bundle_path)  # every recorded engine (files and directories) matches its sha256
    recorded = {f"{e['format']}:{e['precision']}" for e in bundle.engines}
    assert recorded == {k for k, v in status.items() if v == "written"}
    for entry in bundle.engines:
        assert entry["bytes"] > 0 and len(entry["sha256"]) == 64
        assert entry["parity"]["status"].startswith(("passed", "not run"))


def test_zero_pads_fold_into_their_convolutions() -> None:
    """TF-style "SAME" padding (asymmetric Pad + Conv) becomes the Conv's own pads; a Pad feeding
    anything else, or padding with a non-zero value, stays; the outputs do not change."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(np.array([0, 0, 0, 0, 0, 0, 1, 1], np.int64), "same"),
             numpy_helper.from_array(np.array([0, 0, 1, 2, 0, 0, 1, 0], np.int64), "other"),
             numpy_helper.from_array(np.array(0.5, np.float32), "half")]
    nodes = [helper.make_node("Pad", ["x", "same"], ["p1"], name="pad_same"),
             helper.make_node("Conv", ["p1", "w"], ["c1"], name="conv_same", strides=[2, 2]),
             helper.make_node("Pad", ["c1", "other"], ["p2"], name="pad_other"),
             helper.make_node("Conv", ["p2", "w2"], ["c2"], name="conv_other", pads=[1, 1, 1, 1]),
             helper.make_node("Pad", ["c2", "same", "half"], ["p3"], name="pad_half"),
             helper.make_node("Conv", ["p3", "w2"], ["c3"], name="conv_half"),
             helper.make_node("Pad", ["c3", "same"], ["y"], name="pad_output")]
    inits.append(numpy_helper.from_array(rng.standard_normal((4, 4, 3, 3)).astype(np.float32), "w2"))
    graph = helper.make_graph(nodes, "pads", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 17, 17])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 10, 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.standard_normal((1, 3, 17, 17)).astype(np.float32)

    def run(m: onnx.ModelProto) -> np.ndarray:
        return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]

    before = run(model)
    assert fold_zero_pads(model.graph) == 2
    assert [n.name for n in model.graph.node if n.op_type == "Pad"] == ["pad_half", "pad_output"]
    pads = {n.name: list(next(a.ints for a in n.attribute if a.name == "pads")) for n in model.graph.node
            if n.op_type == "Conv" and n.name != "conv_half"}
    assert pads == {"conv_same": [0, 0, 1, 1], "conv_other": [2, 3, 2, 1]}
    onnx.checker.check_model(model, full_check=True)
    np.testing.assert_allclose(run(model), before, rtol=1e-5, atol=1e-5)


def dequantize_dynamic_matmuls(graph: onnx.GraphProto) -> int:
    """Undo :func:`quantize_dynamic_matmuls` (to read the matrices an INT8 engine multiplies by): each chain
    becomes a float MatMul against its dequantized int8 matrix; the number of chains."""
    initializers = {i.name: i for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    replaced: dict[int, onnx.NodeProto | None] = {}
    for node in graph.node:
        if node.op_type != "MatMulInteger" or node.input[1] not in initializers:
            continue
        quantize = producer[node.input[0]]
        (cast,) = consumers[node.output[0]]
        (mul,) = consumers[cast.output[0]]
        scales = producer[mul.input[1] if mul.input[0] == cast.output[0] else mul.input[0]]
        scale = onnx.numpy_helper.to_array(initializers[scales.input[1]])
        matrix = onnx.numpy_helper.to_array(initializers[node.input[1]]).astype(np.float32) * scale
        graph.initializer.append(onnx.numpy_helper.from_array(matrix, f"{node.name}/dequantized"))
        replaced[id(node)] = onnx.helper.make_node("MatMul", [quantize.input[0], f"{node.name}/dequantized"],
                                                   list(mul.output), name=node.name)
        replaced.update({id(cast): None, id(mul): None, id(scales): None, id(quantize): None})
    nodes = [replaced.get(id(n), n) for n in graph.node]
    del graph.node[:]
    graph.node.extend(n for n in nodes if n is not None)
    return sum(n is not None for n in replaced.values())


def engine_memory_bank(model: onnx.ModelProto) -> np.ndarray:
    """The PatchCore memory bank inside a float engine, as its search holds it (rows sorted, see :func:`by_rows`):
    in blocks of columns, each -2 b_j (an integer engine: dequantize it first)."""
    arrays = {i.name: i for i in model.graph.initializer}
    blocks = [arrays[n.input[1]] for n in model.graph.node if n.name.startswith("/search/")
              and n.op_type in ("MatMul", "Gemm") and n.input[1] in arrays]
    assert blocks and all(b.data_type == onnx.TensorProto.FLOAT for b in blocks)
    return by_rows(np.concatenate([onnx.numpy_helper.to_array(b) for b in blocks], axis=1).T / -2.0)


def engine_subspace(model: onnx.ModelProto) -> PrincipalSubspace:
    """The search subspace inside a PatchCore engine: the mean its patches are centred on, the axes they are
    projected onto."""
    arrays = {i.name: i for i in model.graph.initializer}
    (mean,), (axes,) = ([torch.tensor(onnx.numpy_helper.to_array(arrays[i])) for n in model.graph.node
                         if n.name == f"/subspace/{op}" for i in n.input if i in arrays] for op in ("Sub", "MatMul"))
    subspace = PrincipalSubspace(len(mean))
    subspace.set_axes(mean, axes)
    return subspace


def searched_bank(bundle: Bundle) -> np.ndarray:
    """The PatchCore bundle's memory bank as its search holds it: in the bank's principal subspace with the
    residual norm appended (``model.search_variance`` < 1), else as stored (the default, exact)."""
    return load_model(bundle).search.bank()


def by_rows(bank: np.ndarray) -> np.ndarray:
    """``bank`` with its rows in lexicographic order (the engine's block order is the optimizer's)."""
    return bank[np.lexsort(bank.T[::-1])]


def test_fp16_engine_meets_its_documented_gate(all_engines: tuple[Path, list]) -> None:
    bundle = Bundle.open(all_engines[0])
    path, entry = bundle.engine("onnx", "fp16")
    gate = load_config("export")["fp16"]
    assert entry["parity"]["gate"]["tolerance"] == gate["tolerance"]
    assert entry["parity"]["max_rel_score_delta"] <= gate["tolerance"]
    assert entry["parity"]["verdict_agreement"] >= gate["min_verdict_agreement"]
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    fp16_weights = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT16]
    assert fp16_weights, "the feature extractor's weights are FP16"
    # inputs and outputs stay FP32; the statistics (memory bank) stay FP32 too
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert all(o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for o in model.graph.output)
    bank = searched_bank(bundle)
    assert engine_memory_bank(model).shape == bank.shape


def test_subspace_search_exports_to_every_onnx_precision_and_faiss(synth_root: Path, tmp_path: Path) -> None:
    """``model.search_variance`` < 1: the projection into the bank's principal subspace stays float32 in every engine
    (the bundle's axes in FP32 and FP16, the INT8 engine's own, fit to its refit bank), and the faiss engines, cut after
    it, index the projected bank and score like the onnx ones."""
    copy = _train("patchcore", synth_root, tmp_path / "subspace", ["model.search_variance=0.99"])
    settings = load_config("export", overrides=[*LENIENT_INT8, "faiss.index=Flat", "faiss.search_parameters=null"])
    for fmt, precision in (("onnx", "fp32"), ("onnx", "fp16"), ("onnx", "int8"), ("faiss", "fp16"), ("faiss", "int8")):
        (result,) = export_bundle(copy, fmt, precision, settings=settings, progress=False)
        assert result.status == "written", (fmt, precision, result.detail)
    bundle = Bundle.open(copy)
    mean, axes = bundle.load_array("search_mean"), bundle.load_array("search_axes")
    assert 0 < axes.shape[1] < axes.shape[0] - 1
    for precision in ("fp32", "fp16"):
        engine = onnx.load(str(bundle.engine("onnx", precision)[0]))
        subspace = engine_subspace(engine)
        np.testing.assert_array_equal(subspace.mean.numpy(), mean)
        np.testing.assert_array_equal(subspace.axes.numpy(), axes)
        np.testing.assert_allclose(engine_memory_bank(engine), by_rows(searched_bank(bundle)), atol=1e-6)
    int8_axes = engine_subspace(onnx.load(str(bundle.engine("onnx", "int8")[0]))).axes.numpy()
    assert int8_axes.shape[0] == axes.shape[0] and not (int8_axes.shape == axes.shape and np.allclose(int8_axes, axes))
    images = [read_image(p) for p in sorted((synth_root / SYNTH_CATEGORY / "test").rglob("*.png"))[:6]]
    for precision in ("fp16", "int8"):
        onnx_engine, faiss_engine = (Predictor(copy, engine=f"{f}:{precision}") for f in ("onnx", "faiss"))
        for image in images:
            assert faiss_engine.predict(image).raw_score == pytest.approx(onnx_engine.predict(image).raw_score,
                                                                          rel=0.05)


def test_int8_engine_is_qdq_with_its_own_calibrated_decision(all_engines: tuple[Path, list]) -> None:
    bundle = Bundle.open(all_engines[0])
    path, entry = bundle.engine("onnx", "int8")
    model = onnx.load(str(path))
    ops = [n.op_type for n in model.graph.node]
    assert {"QuantizeLinear", "DequantizeLinear"} <= set(ops)
    assert entry["int8"]["calibration_images"] == 16 and entry["int8"]["per_channel"] is True
    assert entry["int8"]["weight_bits"] == 7 and all(  # int8.reduce_range: no u8 x s8 pair sum can saturate
        np.abs(onnx.numpy_helper.to_array(i)).max() <= 64 for i in model.graph.initializer
        if i.data_type == onnx.TensorProto.INT8)
    assert entry["int8"]["statistics_nodes_in_float"] > 0
    # the nearest-neighbour search runs in integers: one MatMulInteger per bank block, the patches
    # quantized once
    bank = searched_bank(bundle)
    blocks = -(-len(bank) // BANK_BLOCK)
    assert len(entry["int8"]["integer_matmuls"]) == ops.count("MatMulInteger") == blocks
    assert ops.count("DynamicQuantizeLinear") == 1
    # the memory bank inside the engine was refit on the engine's own INT8 features: its entries are not
    # the FP32 bank's within the int8 rounding (|error| <= scale / 4 per coordinate of b = -w / 2)
    assert entry["int8"]["statistics_refit_on_int8_features"] is True
    fp32_path, _ = bundle.engine("onnx", "fp32")
    np.testing.assert_allclose(engine_memory_bank(onnx.load(str(fp32_path))), by_rows(bank), atol=1e-6)
    scales = np.concatenate([onnx.numpy_helper.to_array(i) for i in model.graph.initializer
                             if i.name.endswith("/weight_scale")])
    assert dequantize_dynamic_matmuls(model.graph) == blocks
    refit = engine_memory_bank(model)
    assert refit.shape == bank.shape
    nearest_fp32_entry = torch.cdist(torch.from_numpy(refit), torch.from_numpy(bank)).amin(1).numpy()
    assert np.median(nearest_fp32_entry) > np.sqrt(bank.shape[1]) * scales.max() / 4
    decision = entry["decision"]
    assert decision["calibration"]["source"] == bundle.decision["calibration"]["source"]
    assert decision["calibration"]["n_images"] == bundle.decision["calibration"]["n_images"]
    # engine_threshold.rule: scaled (the default): the bundle's threshold times the engine's median score ratio
    ratio = decision["calibration"]["carried_over"]["score_ratio"]
    assert 0.5 < ratio < 2.0 and ratio != 1.0
    assert decision["threshold"] == pytest.approx(bundle.decision["threshold"] * ratio)
    assert decision["normalization"]["center"] == pytest.approx(decision["threshold"])
    assert bundle.engine_decision(entry) is decision
    predictor = Predictor(bundle, engine="onnx:int8")
    assert predictor.threshold == decision["threshold"] and predictor.engine == "onnx:int8"


def test_engine_threshold_is_carried_over_by_the_median_score_ratio() -> None:
    """``engine_threshold.rule: scaled`` multiplies the bundle's decision by the median engine / PyTorch score ratio of
    the good threshold images (defective ones and single outliers do not move it) where scores are distances;
    ``recalibrated``, and any model whose scores are not, applies training's threshold rule to the engine's scores."""
    good = [Sample(Path(f"g{i}.png"), 0, "good", None) for i in range(7)]
    samples = [*good, Sample(Path("d.png"), 1, "crack", Path("d_mask.png"))]
    reference = np.array([10.0, 11.0, 12.0, 9.0, 10.5, 11.5, 12.5, 40.0])
    engine = reference * 1.1
    engine[0] *= 1.5  # one good image far off, and the defective one: neither moves the median ratio
    engine[-1] = 10.0
    decision_cfg = {"threshold_rule": "mean_sd", "threshold_sd": 2.0, "threshold_quantile": 1.0,
                    "threshold_margin": 1.0, "min_region_area": 16}
    bundle_decision = decide(reference[:7], decision_cfg)
    bundle = SimpleNamespace(decision=bundle_decision, manifest={"config": {"decision": decision_cfg}})
    check = AnomalyMapCheck(SimpleNamespace(settings={"engine_threshold": {"rule": "scaled"}}, bundle=bundle,
                                            model=SimpleNamespace(score_is_distance=True)))
    check.split = SimpleNamespace(calibration=samples, labelled=False)
    check.reference_calibration_scores = reference
    scaled = check.engine_decision(engine)
    assert scaled["threshold"] == pytest.approx(1.1 * bundle_decision["threshold"])
    assert scaled["normalization"]["scale"] == pytest.approx(1.1 * bundle_decision["normalization"]["scale"])
    assert scaled["calibration"]["carried_over"]["n_images"] == 7
    check.job.settings["engine_threshold"]["rule"] = "recalibrated"
    assert check.engine_decision(engine) == decide(engine[:7], decision_cfg)
    # scores that are not distances (a probability near 0: its ratio there says nothing at the threshold)
    # recalibrate whatever the rule
    check.job.settings["engine_threshold"]["rule"] = "scaled"
    check.job.model.score_is_distance = False
    assert check.engine_decision(engine) == decide(engine[:7], decision_cfg)


def test_integer_matmuls_match_float_and_lower_back(tmp_path: Path) -> None:
    """quantize_dynamic_matmuls on a MatMul and a Gemm (bias, transposed matrix) sharing one input: one
    DynamicQuantizeLinear, 7-bit matrices (reduce_range, the default), results within their rounding on any x86
    CPU (8-bit ones saturate the u8 x s8 kernels of CPUs without VNNI: on an AVX2 EPYC this test's error was 28 %
    of the largest value), a chain ONNX Runtime fuses into MatMulIntegerToFloat; dequantize_dynamic_matmuls gives
    a float graph computing the same."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w, wt, bias = rng.normal(size=(32, 40)), rng.normal(size=(24, 32)), rng.normal(size=24) * 100
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for a, n in ((w, "w"), (wt, "wt"), (bias, "bias"))]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="/search/MatMul"),
             helper.make_node("Gemm", ["x", "wt", "bias"], ["z"], name="/search/Gemm", transB=1),
             helper.make_node("MatMul", ["x", "w"], ["kept"], name="/other/MatMul")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 32])],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, [None, c])
                               for n, c in (("y", 40), ("z", 24), ("kept", 40))],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.normal(size=(50, 32)).astype(np.float32)
    exact = [x @ w, x @ wt.T + bias, x @ w]

    assert quantize_dynamic_matmuls(model.graph, ("/search/",), (), reduce_range=True) == ["/search/MatMul",
                                                                                             "/search/Gemm"]
    ops = [n.op_type for n in model.graph.node]
    assert {int(np.abs(numpy_helper.to_array(i)).max()) for i in model.graph.initializer
            if i.name.endswith("/weight_int8")} == {63}
    assert ops.count("DynamicQuantizeLinear") == 1 and ops.count("MatMulInteger") == 2 and "Gemm" not in ops
    onnx.checker.check_model(model, full_check=True)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    y, z, kept = ort.InferenceSession(model.SerializeToString(), options,
                                      providers=["CPUExecutionProvider"]).run(None, {"x": x})
    assert [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node].count(
        "MatMulIntegerToFloat") == 2
    for got, want in ((y, exact[0]), (z, exact[1])):
        assert 0 < np.abs(got - want).max() < 0.02 * np.abs(want).max()
    np.testing.assert_allclose(kept, exact[2], rtol=1e-5, atol=1e-4)

    assert dequantize_dynamic_matmuls(model.graph) == 2
    ops = {n.op_type for n in model.graph.node}
    assert not ops & {"DynamicQuantizeLinear", "MatMulInteger", "Cast"}
    onnx.checker.check_model(model, full_check=True)
    lowered = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    for got, integer in zip(lowered, (y, z, kept), strict=True):
        np.testing.assert_allclose(got, integer, rtol=1e-2, atol=0.02 * np.abs(integer).max())


def test_batched_integer_matmul_scales_each_matrix_column(tmp_path: Path) -> None:
    """A batch of constant matrices (PaDiM's P x D x D inverse covariances): one int8 scale per matrix and
    column, so a matrix of small values keeps its precision next to one of large values."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(1)
    matrices = rng.normal(size=(6, 20, 20)) * np.logspace(-3, 3, 6)[:, None, None]
    graph = helper.make_graph([helper.make_node("MatMul", ["d", "m"], ["y"], name="/mahalanobis/MatMul")], "g",
                              [helper.make_tensor_value_info("d", TensorProto.FLOAT, [6, 1, 20])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [6, 1, 20])],
                              [numpy_helper.from_array(matrices.astype(np.float32), "m")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    d = rng.normal(size=(6, 1, 20)).astype(np.float32)
    assert quantize_dynamic_matmuls(model.graph, ("/mahalanobis/",), (), reduce_range=True) == ["/mahalanobis/MatMul"]
    scales = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name.endswith("/weight_scale")))
    assert scales.shape == (6, 1, 20)
    onnx.checker.check_model(model, full_check=True)
    (y,) = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"d": d})
    exact = d @ matrices
    for got, want in zip(y, exact, strict=True):  # each matrix within its own rounding, the smallest included
        assert 0 < np.abs(got - want).max() < 0.05 * np.abs(want).max()
    assert dequantize_dynamic_matmuls(model.graph) == 1
    (lowered,) = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"d": d})
    for got, integer in zip(lowered, y, strict=True):  # the same numbers, each matrix at its own scale
        np.testing.assert_allclose(got, integer, rtol=1e-2, atol=0.02 * np.abs(integer).max())


def _saturating_convolution(path: Path) -> np.ndarray:
    """A float convolution at ``path`` and an input whose uint8 x int8 products are all large and of one sign, the
    case where x86 CPUs without VNNI saturate their 16-bit pair sums (with 8-bit weights this output was 45 % off
    on an AVX2 EPYC)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = rng.uniform(0.9, 1.0, size=(64, 64, 3, 3)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("Conv", ["image", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])], "g",
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 64, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64, 8, 8])],
                              [numpy_helper.from_array(weight, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return rng.uniform(5.5, 6.0, size=(1, 64, 8, 8)).astype(np.float32)


def _int8_weights(path: Path) -> list[np.ndarray]:
    return [onnx.numpy_helper.to_array(i) for i in onnx.load(path).graph.initializer
            if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 4]


def test_int8_weights_take_seven_bits_so_no_cpu_saturates(tmp_path: Path) -> None:
    """The default ``int8.reduce_range``: the saturating convolution stays within quantization rounding on any CPU."""
    import onnxruntime as ort

    from edgeinspect.export.quantize import quantize_qdq

    x = _saturating_convolution(tmp_path / "float.onnx")
    reduce_range = bool(load_config("export")["int8"]["reduce_range"])
    assert reduce_range
    quantize_qdq(tmp_path / "float.onnx", tmp_path / "int8.onnx", [x], [], "minmax", True, reduce_range)
    weights = _int8_weights(tmp_path / "int8.onnx")
    assert len(weights) == 1 and np.abs(weights[0]).max() <= 64  # 2 x 255 x 64 < 32767: no pair sum saturates
    exact, got = (ort.InferenceSession(str(tmp_path / name), providers=["CPUExecutionProvider"]).run(
        None, {"image": x})[0] for name in ("float.onnx", "int8.onnx"))
    assert np.abs(got - exact).max() < 0.02 * np.abs(exact).max()


def test_eight_bit_weights_run_exact_through_the_runtime_on_any_cpu(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """An engine with 8-bit weights (the last INT8 retry, or ``int8.reduce_range: false``) says so inside its
    file, and the runtime gives it ONNX Runtime's exact uint8 x uint8 products where uint8 x int8 ones could
    saturate: the saturating convolution within rounding. The CPU check is forced on here, so that the option
    runs on every CPU; on one with VNNI it changes nothing."""
    import edgeinspect.runtime.backends.onnx as onnx_backend
    from edgeinspect.export.quantize import quantize_qdq

    x = _saturating_convolution(tmp_path / "float.onnx")
    quantize_qdq(tmp_path / "float.onnx", tmp_path / "int8.onnx", [x], [], "minmax", True, False)
    assert np.abs(_int8_weights(tmp_path / "int8.onnx")[0]).max() == 127  # pair sums up to 2 x 255 x 127 > 32767
    add_metadata(tmp_path / "int8.onnx", {WEIGHT_BITS_KEY: 8})
    monkeypatch.setattr(onnx_backend, "saturates_eight_bit_weights", lambda: True)

    def exact_products(backend: OnnxRuntimeBackend) -> bool:
        try:
            return backend.session.get_session_options().get_session_config_entry(EXACT_PRODUCTS) == "1"
        except RuntimeError:  # not set
            return False

    backend = OnnxRuntimeBackend(tmp_path / "int8.onnx")
    assert exact_products(backend)
    exact = OnnxRuntimeBackend(tmp_path / "float.onnx").run(x)[0]
    assert np.abs(backend.run(x)[0] - exact).max() < 0.02 * np.abs(exact).max()
    add_metadata(tmp_path / "int8.onnx", {WEIGHT_BITS_KEY: 7})  # 7-bit weights keep the faster products
    assert not exact_products(OnnxRuntimeBackend(tmp_path / "int8.onnx"))


def test_statistics_refit_on_the_fp32_engine_reproduce_training(padim_bundle: Path, tmp_path: Path) -> None:
    """The refit mechanism itself: the FP32 engine's extractor stands in for PyTorch's, and refitting
    on its features gives back the statistics training wrote (INT8 refits the same way on its own)."""
    shutil.copytree(padim_bundle, tmp_path / "padim")
    export_bundle(tmp_path / "padim", "onnx", "fp32", progress=False)
    bundle = Bundle.open(tmp_path / "padim")
    job = ExportJob(bundle, MVTecCategory(bundle.manifest["data"]["root"], SYNTH_CATEGORY), load_config("export"),
                    progress=False)
    path, _ = bundle.engine("onnx", "fp32")
    example = job.calibration_inputs(1)[0]
    stand_in = OnnxSubgraph(path, "/extractor/", job.model.extractor, example)
    with torch.no_grad():
        reference = job.model.extractor(torch.from_numpy(example))
    ours = stand_in(torch.from_numpy(np.concatenate([example, example])))
    assert [tuple(o.shape[1:]) for o in ours] == [tuple(r.shape[1:]) for r in reference]
    assert max(float((o[1:] - r).abs().max()) for o, r in zip(ours, reference, strict=True)) < 1e-3
    refit = job.refit_on_engine(path)
    assert refit.extractor is job.model.extractor  # the PyTorch extractor is back for tracing
    np.testing.assert_allclose(refit.mahalanobis.mean.numpy(), bundle.load_array("padim_mean"), rtol=1e-3, atol=1e-4)
    inv_cov = bundle.load_array("padim_inv_cov")
    assert np.abs(refit.mahalanobis.inv_cov.numpy() - inv_cov).max() < 1e-2 * np.abs(inv_cov).max()


def test_gate_leaves_out_borderline_images_and_splits_flips() -> None:
    labels = np.array([0, 0, 1, 1])
    reference = np.array([0.5, 0.999, 2.0, 0.9])  # threshold 1: image 1 is borderline, image 3 a missed defect
    engine = np.array([0.5, 1.001, 2.0, 1.2])     # flips: image 1 (to wrong) and image 3 (to correct)
    maps = np.zeros((4, 2, 2))
    parity = compare((maps, reference), (maps, engine), labels, 1.0, 1.0,
                     Gate(None, 0.99, None, borderline_band=0.02))
    assert parity.n_borderline == 1 and parity.verdict_agreement == pytest.approx(2 / 3)
    assert parity.verdict_agreement_all == 0.5
    assert (parity.flips_to_correct, parity.flips_to_wrong) == (1, 1)
    assert not parity.passed and "verdict agreement 66.7% < 99%" in parity.failures[0]
    strict = compare((maps, reference), (maps, engine), labels, 1.0, 1.0, Gate(None, 0.5, None))
    assert strict.n_borderline == 0 and strict.verdict_agreement == 0.5 and strict.passed


def test_gate_without_both_classes_leaves_the_auroc_unchecked_and_still_gates_verdicts() -> None:
    labels = np.zeros(4, int)  # good images only: no AUROC
    reference = np.array([0.2, 0.5, 0.7, 1.5])
    maps = np.zeros((4, 2, 2))
    gate = Gate(None, 1.0, 0.005)
    same = compare((maps, reference), (maps, 0.9 * reference), labels, 1.0, 1.0, gate)
    assert same.passed and same.image_auroc is None and same.reference_auroc is None
    assert same.auroc_not_checked == "one class in the check set"
    assert "image AUROC not checked (one class in the check set)" in same.describe()
    recorded = json.loads(json.dumps(same.to_dict(), allow_nan=False))  # what the manifest gets: null, no NaN
    assert recorded["image_auroc"] is None and recorded["auroc_not_checked"] == "one class in the check set"
    flipped = compare((maps, reference), (maps, 0.5 * reference), labels, 1.0, 1.0, gate)
    assert flipped.failures == ["verdict agreement 75.0% < 100%"]


class PasteMasks(torch.nn.Module):
    """torchvision's Mask R-CNN mask pasting (a Loop in ONNX whose carried tensor gains a row per box) on
    the boxes of ``x`` (1 x N x 4) whose x0 is not negative: a count only known at run time."""

    onnx_dynamic_axes = {"masks": {0: "detections"}}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torchvision.models.detection.roi_heads import paste_masks_in_image

        boxes = x[0][x[0, :, 0] >= 0]
        return paste_masks_in_image(torch.ones(boxes.shape[0], 1, 7, 7), boxes, (32, 32))


def test_loop_carried_sizes_are_not_fixed_by_the_trace(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    """The traced Loop declared the carried masks as 1 x 32 x 32, and ONNX Runtime logged a VerifyOutputSizes
    warning at every further detection of every frame (Mask R-CNN engines on the line)."""
    import onnxruntime as ort

    path = tmp_path / "paste.onnx"
    write_fp32(PasteMasks(), path, (1, 4, 4), ["masks"])
    [loop] = [n for n in onnx.load(str(path)).graph.node if n.op_type == "Loop"]
    carried = [o.type.tensor_type.shape for o in loop.attribute[0].g.output[1:len(loop.input) - 1]]
    assert carried and all(len(s.dim) == 3 and not any(d.HasField("dim_value") for d in s.dim) for s in carried)
    x = np.array([[[2, 2, 10, 12], [-1, 0, 0, 0], [5, 6, 20, 30], [0, 10, 8, 31]]], np.float32)
    capfd.readouterr()
    [masks] = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": x})
    assert "VerifyOutputSizes" not in capfd.readouterr().err
    with torch.no_grad():
        np.testing.assert_allclose(masks, PasteMasks()(torch.from_numpy(x)).numpy(), atol=1e-5)
    assert masks.shape == (3, 1, 32, 32) and masks.max() > 0.5


def test_nodes_are_sorted_after_the_values_their_loop_bodies_read(tmp_path: Path) -> None:
    """ONNX Runtime's quantizer appended a Cast after the Mask R-CNN Loop whose body reads it from the outer
    scope: ONNX Runtime ran the graph, the ONNX checker refused it, and with it the INT8 engine."""
    import onnxruntime as ort

    path = tmp_path / "paste.onnx"
    write_fp32(PasteMasks(), path, (1, 4, 4), ["masks"])
    model = onnx.load(str(path))
    [loop] = [n for n in model.graph.node if n.op_type == "Loop"]
    produced = {o: n for n in model.graph.node for o in n.output}
    body = loop.attribute[0].g
    inner = {i.name for i in body.input} | {o for n in body.node for o in n.output}
    outer = {i for n in body.node for i in n.input if i and i not in inner and i in produced}
    assert outer  # the body reads values of the main graph that the Loop node does not list as inputs
    moved = [produced[name] for name in sorted(outer)]
    nodes = [n for n in model.graph.node if all(n is not m for m in moved)]
    at = next(i for i, n in enumerate(nodes) if n.op_type == "Loop") + 1
    shuffled = [onnx.NodeProto.FromString(n.SerializeToString()) for n in [*nodes[:at], *moved, *nodes[at:]]]
    del model.graph.node[:]
    model.graph.node.extend(shuffled)
    with pytest.raises(onnx.checker.ValidationError, match="topologically sorted"):
        onnx.checker.check_model(model, full_check=True)
    sort_topologically(model.graph)
    onnx.checker.check_model(model, full_check=True)
    x = np.array([[[2, 2, 10, 12], [5, 6, 20, 30], [0, 10, 8, 31], [1, 1, 4, 4]]], np.float32)
    run = [ort.InferenceSession(m, providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
           for m in (str(path), model.SerializeToString())]
    np.testing.assert_array_equal(run[0], run[1])


@pytest.mark.parametrize("family", ["padim", "patchcore"])
def test_int8_gate_refuses_and_retries(family: str, request: pytest.FixtureRequest, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The first retry keeps the two most sensitive nodes in float; the next puts the integer MatMuls alone back
    in float instead (PatchCore's search, one per bank block; PaDiM's one batched Mahalanobis); the last takes
    8-bit weights, everything in INT8 again."""
    caplog.set_level(logging.WARNING, logger="edgeinspect.export.onnx")
    copy = tmp_path / family
    shutil.copytree(request.getfixturevalue(f"{family}_bundle"), copy)
    moved = 1 if family == "padim" else -(-len(Bundle.open(copy).load_array("memory_bank")) // BANK_BLOCK)
    before = (copy / "manifest.json").read_bytes()
    impossible = load_config("export", overrides=["int8.max_auroc_drop=-1.0", "int8.exclusion_rounds=2",
                                                  "int8.exclude_per_round=2", "int8.calibration_images=8"])
    integer_matmuls: list[int] = []  # per INT8 attempt checked: the engine's integer MatMuls
    check = ExportJob.check

    def counting_check(job: ExportJob, fmt: str, precision: str, path: Path) -> tuple:
        if precision == "int8":
            integer_matmuls.append(sum(n.op_type == "MatMulInteger" for n in onnx.load(str(path)).graph.node))
        return check(job, fmt, precision, path)

    monkeypatch.setattr(ExportJob, "check", counting_check)
    results = export_bundle(copy, "onnx", "all", settings=impossible, progress=False)
    status = _status(results)
    assert status == {"onnx:fp32": "written", "onnx:fp16": "written", "onnx:int8": "refused"}
    assert integer_matmuls == [moved, moved, 0, moved]  # the integer MatMuls are in float at the third attempt only
    assert "attempt 2 failed its gate (2 nodes in float, 7-bit weights)" in caplog.text
    assert f"attempt 3 failed its gate ({moved} nodes in float, 7-bit weights)" in caplog.text
    detail = next(r.detail for r in results if r.precision == "int8")
    assert "after 4 attempts (last with 0 sensitive nodes in float, 8-bit weights)" in detail
    assert "image AUROC drop" in detail and "> -1" in detail
    assert not (copy / "engines" / "model_int8.onnx").exists()
    assert not list((copy / "engines").glob(".tmp-*"))
    assert Bundle.open(copy).find_engine("onnx", "int8") is None
    assert (copy / "manifest.json").read_bytes() != before  # fp32 and fp16 were recorded
    with pytest.raises(ExportError, match="onnx:int8 refused"):
        export_bundle(copy, "onnx", "int8", settings=impossible, progress=False)


def test_a_refused_engine_is_not_built_again_for_the_formats_built_on_it(patchcore_bundle: Path, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import edgeinspect.export.onnx as onnx_export

    shutil.copytree(patchcore_bundle, tmp_path / "b")
    bundle = Bundle.open(tmp_path / "b")
    impossible = load_config("export", overrides=["int8.max_auroc_drop=-1.0", "int8.exclusion_rounds=0",
                                                  "int8.eight_bit_retry=false", "int8.calibration_images=8"])
    job = ExportJob(bundle, MVTecCategory(bundle.manifest["data"]["root"], SYNTH_CATEGORY), impossible,
                    progress=False)
    built: list[Path] = []
    write_int8 = onnx_export.write_int8

    def counting(job: ExportJob, path: Path, metadata: dict, **kwargs: bool) -> dict:
        built.append(path)
        return write_int8(job, path, metadata, **kwargs)

    monkeypatch.setattr(onnx_export, "write_int8", counting)
    results = _export_all(job, [FORMATS[f] for f in ("onnx", "triton", "faiss")], "int8", True)
    assert _status(results) == {"onnx:int8": "refused", "triton:int8": "refused", "faiss:int8": "refused"}
    assert len(built) == 1  # triton and faiss got the refusal of the onnx:int8 engine, not a second build
    refusal = results[0].detail
    for result in results[1:]:
        assert result.detail == f"needs the onnx:int8 engine, which was refused: {refusal}"


def test_sensitive_nodes_keep_their_activation_and_an_activation_its_producer(tmp_path: Path) -> None:
    """A retry moves a Conv to float with the Clip after it, and a Clip with the Conv before it: a float Clip
    after a quantized Conv would quantize the Conv's unclipped output, a coarser range than the clipped one."""
    from onnx import TensorProto, helper, numpy_helper

    from edgeinspect.export.quantize import quantize_qdq, rank_sensitive_nodes

    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.normal(0, 1, (8, c, 3, 3)).astype(np.float32), f"w{k}")
               for k, c in enumerate((3, 8, 8))]
    nodes, tensor = [], "image"
    for k in range(3):
        nodes += [helper.make_node("Conv", [tensor, f"w{k}"], [f"conv{k}"], name=f"conv{k}", pads=[1, 1, 1, 1]),
                  helper.make_node("Clip", [f"conv{k}", "lo", "hi"], [f"clip{k}"], name=f"clip{k}")]
        tensor = f"clip{k}"
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info(tensor, TensorProto.FLOAT, [1, 8, 16, 16])],
                              [*weights, numpy_helper.from_array(np.float32(0.0), "lo"),
                               numpy_helper.from_array(np.float32(6.0), "hi")])
    source, qdq = tmp_path / "float.onnx", tmp_path / "qdq.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(source))
    inputs = [rng.normal(0, 3, (1, 3, 16, 16)).astype(np.float32) for _ in range(4)]
    quantize_qdq(source, qdq, inputs, [], "minmax", True, True)
    ranked = rank_sensitive_nodes(source, qdq, inputs, [n.name for n in nodes])
    assert sorted(ranked) == sorted(n.name for n in nodes)  # each node once
    for k in range(3):  # every pair together, the Conv first, whichever of the two was measured worse
        assert ranked.index(f"clip{k}") == ranked.index(f"conv{k}") + 1


def test_int8_export_takes_eight_bit_weights_when_every_seven_bit_attempt_fails(
        padim_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The last INT8 retry: 8-bit weights, every node in INT8 again (transistor and commutator PaDiM on a Zen 5
    EPYC: refused with 7-bit weights at every attempt, written with 8); the engine and the manifest say so. Here the
    7-bit attempts are made to fail."""
    copy = tmp_path / "padim"
    shutil.copytree(padim_bundle, copy)
    check = AnomalyMapCheck.check
    bits: list[str] = []  # per gate run on an INT8 engine: its weights' bits

    def seven_bits_fail(task: AnomalyMapCheck, fmt: str, precision: str, path: Path) -> tuple:
        parity, decision, ms = check(task, fmt, precision, path)
        if precision == "int8":
            bits.append(read_metadata(path)[WEIGHT_BITS_KEY])
            if bits[-1] == "7":
                parity = dataclasses.replace(parity, failures=["made to fail"])
        return parity, decision, ms

    monkeypatch.setattr(AnomalyMapCheck, "check", seven_bits_fail)
    refit_bits: list[str | None] = []  # what the statistics refit's sessions read from the engine they run
    import edgeinspect.export.onnx as onnx_export

    def recorded(metadata: dict[str, str]) -> bool:
        refit_bits.append(metadata.get(WEIGHT_BITS_KEY))
        return needs_exact_products(metadata)

    monkeypatch.setattr(onnx_export, "needs_exact_products", recorded)
    settings = load_config("export", overrides=["int8.min_verdict_agreement=0.0", "int8.max_auroc_drop=1.0",
                                                "int8.exclusion_rounds=1", "int8.calibration_images=8"])
    written = export_bundle(copy, "onnx", "int8", settings=settings, progress=False)[0]
    assert written.status == "written" and bits == ["7", "7", "8"]  # the engine written is the one gated last
    assert refit_bits == ["7", "7", "8"]  # the refit runs the attempt's own products (exact where 8 bits saturate)
    entry = Bundle.open(copy).find_engine("onnx", "int8")
    assert (entry["int8"]["weight_bits"], entry["int8"]["attempts"], entry["int8"]["moved_to_float"]) == (8, 3, [])
    assert read_metadata(written.path)[WEIGHT_BITS_KEY] == "8"
    model = onnx.load(str(written.path))
    assert max(np.abs(onnx.numpy_helper.to_array(i)).max() for i in model.graph.initializer
               if i.data_type == onnx.TensorProto.INT8) == 127
    assert any(n.op_type == "MatMulInteger" for n in model.graph.node)  # the integer MatMuls are back


def test_int8_export_of_a_bundle_whose_fp32_engine_names_nodes_otherwise(padim_engine_bundle: Path, tmp_path: Path,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    """A bundle's FP32 engine written by an earlier version, whose statistics nodes are named otherwise (PaDiM's
    distance was not a ``/mahalanobis/`` submodule before): the INT8 export quantizes the statistics it refits,
    in a graph of this version, with that graph's own float nodes, and ranks the sensitive nodes against it; the
    retries run as on a bundle of this version."""
    from edgeinspect.bundle import sha256_path

    caplog.set_level(logging.WARNING, logger="edgeinspect.export.onnx")
    copy = tmp_path / "padim"
    shutil.copytree(padim_engine_bundle, copy)
    engine = copy / "engines" / "model_fp32.onnx"
    model = onnx.load(str(engine))
    for node in model.graph.node:  # other names for the distance's nodes and their tensors
        node.name = node.name.replace("/mahalanobis/", "/earlier/")
        node.input[:] = [name.replace("/mahalanobis/", "/earlier/") for name in node.input]
        node.output[:] = [name.replace("/mahalanobis/", "/earlier/") for name in node.output]
    for initializer in model.graph.initializer:
        initializer.name = initializer.name.replace("/mahalanobis/", "/earlier/")
    onnx.save(model, str(engine))
    manifest = json.loads((copy / "manifest.json").read_text())
    entry = next(e for e in manifest["engines"] if e["format"] == "onnx" and e["precision"] == "fp32")
    entry["sha256"], entry["bytes"] = sha256_path(engine), engine.stat().st_size
    (copy / "manifest.json").write_text(json.dumps(manifest))
    impossible = load_config("export", overrides=["int8.max_auroc_drop=-1.0", "int8.exclusion_rounds=2",
                                                  "int8.exclude_per_round=2", "int8.calibration_images=8",
                                                  "int8.eight_bit_retry=false"])
    with pytest.raises(ExportError, match=r"refused after 3 attempts \(last with 1 sensitive nodes"):
        export_bundle(copy, "onnx", "int8", settings=impossible, progress=False)
    assert "attempt 2 failed its gate (2 nodes in float, 7-bit weights)" in caplog.text  # two extractor nodes ranked
    lenient = load_config("export", overrides=["int8.min_verdict_agreement=0.0", "int8.max_auroc_drop=1.0",
                                               "int8.calibration_images=8"])
    written = export_bundle(copy, "onnx", "int8", settings=lenient, progress=False)[0]
    assert written.status == "written"
    graph = onnx.load(str(written.path)).graph
    assert [n.name for n in graph.node if n.op_type == "MatMulInteger"] == ["/mahalanobis/MatMul/MatMulInteger"]
    quantized = {n.input[0] for n in graph.node if n.op_type == "QuantizeLinear"}
    assert not any(name.startswith("/mahalanobis/") for name in quantized)  # its statistics stay float


def test_metadata_travels_inside_every_engine(all_engines: tuple[Path, list], tmp_path: Path) -> None:
    bundle = Bundle.open(all_engines[0])
    for precision in ("fp32", "fp16", "int8"):
        path, entry = bundle.engine("onnx", precision)
        meta = read_metadata(path)
        assert meta["bundle_id"] == bundle.bundle_id and meta["precision"] == precision
        # the decision the engine is run with: an INT8 engine's own, from its gate
        assert json.loads(meta["decision"]) == bundle.engine_decision(entry)
        assert (json.loads(meta["decision"]) == bundle.decision) == (precision != "int8")
        assert meta.get(WEIGHT_BITS_KEY) == (str(entry["int8"]["weight_bits"]) if precision == "int8" else None)
    coremltools = pytest.importorskip("coremltools")
    for precision in ("fp32", "fp16", "int8"):
        path, _ = bundle.engine("coreml", precision)
        spec = coremltools.utils.load_spec(str(path))
        meta = dict(spec.description.metadata.userDefined)
        assert meta["bundle_id"] == bundle.bundle_id and meta["precision"] == precision
        assert json.loads(meta["preprocess"]) == bundle.manifest["preprocess"]
        assert [i.name for i in spec.description.input] == ["image"]
        assert list(spec.description.input[0].type.multiArrayType.shape) == [1, 3, 224, 224]
        assert [o.name for o in spec.description.output] == ["anomaly_map", "score"]
    for precision in ("fp32", "fp16", "int8"):
        path, entry = bundle.engine("faiss", precision)
        spec = json.loads((path / "engine.json").read_text())
        assert spec["metadata"]["bundle_id"] == bundle.bundle_id and spec["metadata"]["precision"] == precision
        assert spec["metadata"]["decision"] == entry["decision"] != bundle.decision  # every faiss engine has its own
        for part in ("features.onnx", "head.onnx"):
            assert read_metadata(path / part)["bundle_id"] == bundle.bundle_id
            assert read_metadata(path / part).get(WEIGHT_BITS_KEY) == ("7" if precision == "int8" else None)
            assert json.loads(read_metadata(path / part)["decision"]) == entry["decision"]
    plan = pack_plan({"tensorrt_version": "10.0.1", "bundle_id": bundle.bundle_id}, b"PLAN")
    assert unpack_plan(plan) == ({"tensorrt_version": "10.0.1", "bundle_id": bundle.bundle_id}, b"PLAN")
    # the engines gated here on the GPU or the Mac take their own decision the same way, the rest of the file kept
    own = bundle.find_engine("onnx", "int8")["decision"]
    (tmp_path / "model_int8.engine").write_bytes(plan)
    FORMATS["tensorrt"].write_decision(tmp_path / "model_int8.engine", own)
    assert unpack_plan((tmp_path / "model_int8.engine").read_bytes()) == (
        {"tensorrt_version": "10.0.1", "bundle_id": bundle.bundle_id, "decision": own}, b"PLAN")
    package = shutil.copytree(bundle.engine("coreml", "int8")[0], tmp_path / "model_int8.mlpackage")
    FORMATS["coreml"].write_decision(package, own)
    meta = dict(coremltools.utils.load_spec(str(package)).description.metadata.userDefined)
    assert json.loads(meta["decision"]) == own and meta["bundle_id"] == bundle.bundle_id


def test_coreml_prediction_needs_macos(all_engines: tuple[Path, list]) -> None:
    bundle = Bundle.open(all_engines[0])
    entry = bundle.find_engine("coreml", "fp16")
    if sys.platform != "darwin":
        assert "macOS" in entry["parity"]["reason"]
        with pytest.raises(ConfigError, match="only on macOS"):
            Predictor(bundle, engine="coreml:fp16")
        pytest.skip("Core ML prediction runs only on macOS; conversion and spec are checked above")
    assert entry["parity"]["passed"]


def test_triton_config_parses_with_tritons_protobuf(all_engines: tuple[Path, list]) -> None:
    """The repository serves the gated engine with its decision: an INT8 engine's own threshold, not the bundle's."""
    model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
    from google.protobuf import text_format

    bundle = Bundle.open(all_engines[0])
    for precision in ("fp32", "int8"):
        repo, entry = bundle.engine("triton", precision)
        config = text_format.Parse((repo / entry["model_name"] / "config.pbtxt").read_text(),
                                   model_config_pb2.ModelConfig())
        model_file = repo / entry["model_name"] / "1" / "model.onnx"
        source, source_entry = bundle.engine("onnx", precision)
        assert model_file.read_bytes() == source.read_bytes()
        assert config.name == entry["model_name"] and config.platform == "onnxruntime_onnx"
        assert config.max_batch_size == 0 and config.instance_group[0].count == 1
        graph = onnx.load(str(model_file)).graph
        for tensors, declared in ((graph.input, config.input), (graph.output, config.output)):
            assert [t.name for t in tensors] == [d.name for d in declared]
            for t, d in zip(tensors, declared, strict=True):
                assert [x.dim_value for x in t.type.tensor_type.shape.dim] == list(d.dims)
                assert d.data_type == model_config_pb2.TYPE_FP32
        assert config.parameters["bundle_id"].string_value == bundle.bundle_id
        assert entry["parity"]["passed"] == source_entry["parity"]["passed"]
        assert entry.get("decision") == source_entry.get("decision") and ("decision" in entry) == (precision == "int8")
        decision = bundle.engine_decision(source_entry)
        assert bundle.engine_decision(entry) == decision
        assert json.loads(config.parameters["decision"].string_value) == decision


def test_triton_config_declares_the_data_types_of_the_engine_graph(tmp_path: Path) -> None:
    """A Mask R-CNN engine gives int64 labels beside float boxes: each tensor is declared with its graph's type."""
    model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
    from google.protobuf import text_format

    from edgeinspect.export.triton import config_pbtxt, tensor_types

    h = onnx.helper
    graph = h.make_graph([h.make_node("Identity", ["image"], ["boxes"]), h.make_node("Shape", ["image"], ["labels"])],
                         "g", [h.make_tensor_value_info("image", onnx.TensorProto.FLOAT, [1, 4])],
                         [h.make_tensor_value_info("boxes", onnx.TensorProto.FLOAT, [1, 4]),
                          h.make_tensor_value_info("labels", onnx.TensorProto.INT64, [2])])
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]), str(tmp_path / "model.onnx"))
    types = tensor_types(tmp_path / "model.onnx")
    assert types == {"image": "TYPE_FP32", "boxes": "TYPE_FP32", "labels": "TYPE_INT64"}
    text = config_pbtxt("m", "onnxruntime_onnx", {"image": ([1, 4], types["image"])},
                        {"boxes": ([-1, 4], types["boxes"]), "labels": ([-1], types["labels"])}, "KIND_AUTO", 1, {})
    config = text_format.Parse(text, model_config_pb2.ModelConfig())
    assert [(o.name, o.data_type, list(o.dims)) for o in config.output] == [
        ("boxes", model_config_pb2.TYPE_FP32, [-1, 4]), ("labels", model_config_pb2.TYPE_INT64, [-1])]


def test_tensorrt_refuses_without_gpu_and_refuses_foreign_plans(patchcore_bundle: Path, tmp_path: Path) -> None:
    header, _ = unpack_plan(pack_plan({"tensorrt_version": "8.6.1", "gpu": "Orin (sm_87)", "precision": "int8"},
                                      b"\x00" * 16))
    with pytest.raises(BundleError, match="built with TensorRT 8.6.1 on Orin.*has TensorRT 10.3.0.*re-export"):
        check_plan_version(header, "10.3.0", "model_int8.engine")
    check_plan_version(header, "8.6.1", "model_int8.engine")  # same version: accepted
    with pytest.raises(BundleError, match="not an edgeinspect TensorRT plan"):
        unpack_plan(b"\x10\x00\x00\x00not json at all!", "bad.engine")
    reason = TensorRTBackend.unavailable_reason()
    if reason is None:
        pytest.skip("TensorRT and a GPU are present: the build path runs instead (see the README)")
    copy = tmp_path / "b"
    shutil.copytree(patchcore_bundle, copy)
    with pytest.raises(CannotBuildHere, match="TensorRT engines are built on the GPU that runs them"):
        export_bundle(copy, "tensorrt", "fp16", progress=False)
    with pytest.raises(ConfigError, match="cannot run TensorRT engine"):
        TensorRTBackend(copy / "engines" / "model_fp16.engine")
    # a Triton repository around a TensorRT plan cannot be built here either: skipped, not refused
    from_plan = load_config("export", overrides=["triton.source=tensorrt"])
    with pytest.raises(CannotBuildHere, match="triton:fp32 skipped: needs the tensorrt:fp32 engine, which was skipped"):
        export_bundle(copy, "triton", "fp32", settings=from_plan, progress=False)
    settings = load_config("export", overrides=["tensorrt.dla_core=0"])
    with pytest.raises(ExportError, match="DLA runs FP16 and INT8 only"):  # refused before any GPU is looked for
        export_bundle(copy, "tensorrt", "fp32", settings=settings, progress=False)


def test_tensorrt_is_given_strongly_typed_graphs(patchcore_bundle: Path, tmp_path: Path) -> None:
    """What TensorRT's parser is given (building needs a GPU): FP16 from the gated FP16 ONNX engine, INT8 from an
    explicitly quantized graph in the form TensorRT takes, gated with ONNX Runtime first."""
    shutil.copytree(patchcore_bundle, tmp_path / "b")
    bundle = Bundle.open(tmp_path / "b")
    # the gate is the one of every INT8 engine; here only the graph's form is checked (its accuracy: README)
    relaxed = ["int8.min_verdict_agreement=0", "int8.max_auroc_drop=1", "int8.exclusion_rounds=0",
               "int8.eight_bit_retry=false"]
    job = ExportJob(bundle, MVTecCategory(bundle.manifest["data"]["root"], SYNTH_CATEGORY),
                    load_config("export", overrides=relaxed), progress=False)
    source, recorded = network_source(job, "fp16", tmp_path)
    assert source == bundle.path / "engines" / "model_fp16.onnx" and recorded == {"source_engine": source.name}
    assert bundle.find_engine("onnx", "fp16")["parity"]["status"] == "passed"  # exported with its gate on the way

    source, recorded = network_source(job, "int8", tmp_path)
    graph = onnx.load(str(source)).graph
    initializers = {i.name: i for i in graph.initializer}
    ops = [n.op_type for n in graph.node]
    qdq = [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert ops.count("QuantizeLinear") > 10 and ops.count("Conv") > 10
    # TensorRT: int8 with zero point 0 only (no uint8), no int32 bias to dequantize, no integer MatMuls
    for node in qdq:
        zero = onnx.numpy_helper.to_array(initializers[node.input[2]])
        assert zero.dtype == np.int8 and not zero.any(), node.name
        data = initializers.get(node.input[0])
        assert data is None or data.data_type == onnx.TensorProto.INT8, node.name
    assert not {"MatMulInteger", "DynamicQuantizeLinear", "QLinearConv"} & set(ops)
    # every activation is clipped to the uint8 range it was calibrated to (the quantizer dropped the ReLU6s)
    assert ops.count("Clip") >= ops.count("QuantizeLinear")
    assert recorded["int8"]["activations"] == "int8, symmetric" and recorded["int8"]["integer_matmuls"] == []
    assert recorded["int8"]["attempts"] == 1
    fp32_path, _ = bundle.engine("onnx", "fp32")
    x = job.calibration_inputs(1)[0]
    explicit, fp32 = OnnxRuntimeBackend(source).run(x), OnnxRuntimeBackend(fp32_path).run(x)
    assert [a.shape for a in explicit] == [a.shape for a in fp32]


def test_engine_selection(all_engines: tuple[Path, list], patchcore_bundle: Path) -> None:
    # the format table's order (each row's `auto` precisions, formats by `auto_rank`); faiss and triton only by name
    assert AUTO_ORDER == (("tensorrt", "int8"), ("tensorrt", "fp16"), ("tensorrt", "fp32"), ("coreml", "fp16"),
                          ("coreml", "int8"), ("coreml", "fp32"), ("onnx", "int8"), ("onnx", "fp32"))
    bundle = Bundle.open(all_engines[0])
    auto = select_engine(bundle, "auto")  # no GPU, not macOS: ONNX INT8 (its gate passed)
    if TensorRTBackend.unavailable_reason() and sys.platform != "darwin":
        assert (auto["format"], auto["precision"]) == ("onnx", "int8")
    assert select_engine(bundle, "onnx")["precision"] == "fp32"
    assert select_engine(bundle, "onnx:fp16")["precision"] == "fp16"
    assert select_engine(bundle, "faiss:int8")["file"] == "engines/faiss_int8"  # never auto, on request
    assert select_engine(Bundle.open(patchcore_bundle), "auto")["precision"] == "fp32"  # only FP32 there
    with pytest.raises(BundleError, match="no tensorrt:fp16 engine.*--format tensorrt --precision fp16"):
        select_engine(bundle, "tensorrt:fp16")
    with pytest.raises(ConfigError, match="no runtime backend"):
        select_engine(bundle, "tflite")


def test_predict_takes_an_engine_selector(all_engines: tuple[Path, list], synth_root: Path) -> None:
    bundle = all_engines[0]
    image = sorted((synth_root / SYNTH_CATEGORY / "test" / "good").glob("*.png"))[0]
    proc = subprocess.run([sys.executable, "-m", "edgeinspect", "predict", str(bundle), str(image), "--json",
                           "--engine", "onnx:int8"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "engine onnx:int8" in proc.stderr
    result = json.loads(proc.stdout)
    int8 = Predictor(bundle, engine="onnx:int8").predict(read_image(image))
    assert result["raw_score"] == pytest.approx(int8.raw_score, rel=1e-5)
    assert result["raw_threshold"] == pytest.approx(Bundle.open(bundle).find_engine("onnx", "int8")
                                                    ["decision"]["threshold"], rel=1e-6)


def test_serve_runs_the_selected_engine(all_engines: tuple[Path, list], synth_root: Path) -> None:
    folder = synth_root / SYNTH_CATEGORY / "test" / "crack"
    verdicts, statuses = _serve_to_end(all_engines[0], folder, "--engine", "onnx:int8")
    assert len(verdicts) == len(list(folder.glob("*.png"))) and {v["engine"] for v in verdicts} == {"onnx:int8"}
    assert statuses[-1]["engine"] == "onnx:int8" and statuses[-1]["state"] == "stopped"


# ------------------------------------------------------------------------------------------- faiss engines
def test_faiss_engine_with_an_exact_index_scores_like_the_onnx_engine(patchcore_bundle: Path, synth_root: Path,
                                                                      tmp_path: Path) -> None:
    """The ONNX engine cut at its search, the search a FAISS Flat index over the bank: same maps and scores."""
    copy = tmp_path / "patchcore"
    shutil.copytree(patchcore_bundle, copy)
    exact = load_config("export", overrides=["faiss.index=Flat", "faiss.search_parameters=null"])
    (result,) = export_bundle(copy, "faiss", "fp32", settings=exact, progress=False)
    assert result.status == "written" and result.parity.passed
    bundle = Bundle.open(copy)
    path, entry = bundle.engine("faiss", "fp32")
    assert sorted(p.name for p in path.iterdir()) == ["bank.faiss", "engine.json", "features.onnx", "head.onnx"]
    assert entry["faiss"]["bank_entries"] == len(bundle.load_array("memory_bank"))
    assert entry["faiss"]["index_factory"] == "Flat" and entry["decision"]["threshold"] > 0
    onnx_engine, faiss_engine = Predictor(copy, engine="onnx:fp32"), Predictor(copy, engine="faiss:fp32")
    assert faiss_engine.backend.index.ntotal == entry["faiss"]["bank_entries"]
    for image in sorted((synth_root / SYNTH_CATEGORY / "test").glob("*/*.png"))[::4]:
        a, b = onnx_engine.predict(read_image(image)), faiss_engine.predict(read_image(image))
        assert b.raw_score == pytest.approx(a.raw_score, rel=1e-4)
        np.testing.assert_allclose(b.anomaly_map, a.anomaly_map, atol=1e-4 * a.raw_threshold)


def test_faiss_engine_needs_a_memory_bank_and_passes_its_gate(padim_bundle: Path, patchcore_bundle: Path,
                                                              tmp_path: Path) -> None:
    padim = tmp_path / "padim"
    shutil.copytree(padim_bundle, padim)
    with pytest.raises(CannotBuildHere, match="padim model has none"):
        export_bundle(padim, "faiss", "fp32", progress=False)
    assert Bundle.open(padim).engines == []
    copy = tmp_path / "patchcore"
    shutil.copytree(patchcore_bundle, copy)
    impossible = load_config("export", overrides=["faiss.gate.max_auroc_drop=-1.0"])
    with pytest.raises(ExportError, match="faiss:fp32 refused: gate failed.*image AUROC drop"):
        export_bundle(copy, "faiss", "fp32", settings=impossible, progress=False)
    assert not list((copy / "engines").glob("*faiss*")) and Bundle.open(copy).find_engine("faiss", "fp32") is None
    for overrides, message in ((["faiss.index=NoSuchIndex"], "not an index FAISS can build"),
                               (["faiss.index=IVF65536,Flat"], "cannot build 'IVF65536,Flat' over a bank of"),
                               (["faiss.search_parameters=efSearch=32"], "'efSearch=32' does not apply")):
        with pytest.raises(ExportError, match=message):
            export_bundle(copy, "faiss", "fp32", settings=load_config("export", overrides=overrides), progress=False)
    assert Bundle.open(copy).find_engine("faiss", "fp32") is None


def test_faiss_backend_refuses_a_broken_engine(all_engines: tuple[Path, list], tmp_path: Path) -> None:
    from edgeinspect.runtime.backends import FaissBackend

    engine = tmp_path / "faiss_fp32"
    shutil.copytree(Bundle.open(all_engines[0]).engine("faiss", "fp32")[0], engine)
    spec = json.loads((engine / "engine.json").read_text())
    (engine / "engine.json").write_text(json.dumps({**spec, "bank_shape": [1, 1]}))
    with pytest.raises(BundleError, match="holds .* its engine.json says 1 x 1"):
        FaissBackend(engine)
    (engine / "engine.json").write_text(json.dumps({k: v for k, v in spec.items() if k != "patches"}))
    with pytest.raises(BundleError, match="no readable engine.json: KeyError"):
        FaissBackend(engine)
    (engine / "bank.faiss").write_bytes(b"not an index")
    (engine / "engine.json").write_text(json.dumps(spec))
    with pytest.raises(BundleError, match="FAISS cannot read the index"):
        FaissBackend(engine)
    (engine / "engine.json").unlink()
    with pytest.raises(BundleError, match="no readable engine.json"):
        FaissBackend(engine)


def test_split_at_module_cuts_at_the_one_varying_tensor_in_and_out() -> None:
    """A constant the module shares with the rest of the graph (an FP16 engine casts it under the name of its first
    user, outside the module or inside it) is neither an input nor an output of the cut; the two parts compose to
    the whole graph."""
    import onnxruntime as ort

    from edgeinspect.export.faiss import split_at_module

    h = onnx.helper
    two = onnx.numpy_helper.from_array(np.array(2.0, np.float16), "two_fp16")
    one = onnx.numpy_helper.from_array(np.array(1.0, np.float16), "one_fp16")
    graph = h.make_graph([
        h.make_node("Relu", ["x"], ["patches"], name="/Relu"),
        h.make_node("Cast", ["two_fp16"], ["two"], name="/extractor/Cast", to=onnx.TensorProto.FLOAT),
        h.make_node("Mul", ["patches", "two"], ["scaled"], name="/search/Mul"),
        h.make_node("Sqrt", ["scaled"], ["distances"], name="/search/Sqrt"),
        h.make_node("Cast", ["one_fp16"], ["one"], name="/search/Cast", to=onnx.TensorProto.FLOAT),
        h.make_node("Neg", ["distances"], ["negated"], name="/head/Neg"),
        h.make_node("Add", ["negated", "one"], ["y"], name="/head/Add"),
    ], "g", [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4, 3])],
        [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4, 3])], [two, one])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    features, head, patches, distances = split_at_module(model, "/search/")
    assert (patches, distances) == ("patches", "distances")
    x = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    (p,) = ort.InferenceSession(features.SerializeToString()).run(None, {"x": x})
    (y,) = ort.InferenceSession(head.SerializeToString()).run(None, {"distances": np.sqrt(2 * p)})
    np.testing.assert_allclose(y, 1 - np.sqrt(2 * np.maximum(x, 0)), rtol=1e-6)
    with pytest.raises(ExportError, match="no node of the ONNX engine is under /nothing/"):
        split_at_module(model, "/nothing/")


def test_faiss_backend_sets_its_thread_count_in_the_thread_that_searches(all_engines: tuple[Path, list]) -> None:
    """OpenMP's thread count belongs to the calling thread; the daemon's camera workers search, not the thread
    that loaded the engine."""
    import threading

    import faiss

    from edgeinspect.runtime.backends import FaissBackend

    backend = FaissBackend(Bundle.open(all_engines[0]).engine("faiss", "fp32")[0], threads=1)
    x = np.zeros(backend.features.input_shape, np.float32)
    seen: list[int] = []

    def search() -> None:
        backend.run(x)
        seen.append(faiss.omp_get_max_threads())

    worker = threading.Thread(target=search)
    worker.start()
    worker.join()
    assert seen == [1]
