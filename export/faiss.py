"""FAISS engines: the ONNX engine of a precision cut at its nearest-neighbour search, the search itself a
FAISS index over the memory bank.

``engines/faiss_<precision>/`` holds ``features.onnx`` (image -> the P x D patches the search reads),
``bank.faiss`` (the index), ``head.onnx`` (the P nearest distances -> anomaly map and score) and
``engine.json`` (what connects them, the index's search parameters and the bundle metadata; both ONNX
files carry that metadata too). The runtime backend (``runtime/backends/faiss.py``) runs the three in
turn. For memory banks too large for the in-graph search to be fast: the exact search in the graph
costs time in proportion to the bank, an inverted-file index (the default) about its square root
(each patch scans the lists nearest it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from edgeinspect.errors import ConfigError, ExportError
from edgeinspect.export.onnx import add_metadata, check
from edgeinspect.export.onnx import write_decision as write_onnx_decision
from edgeinspect.runtime.backends.onnx import WEIGHT_BITS_KEY

if TYPE_CHECKING:
    from edgeinspect.export.exporter import ExportJob

def export_faiss(job: ExportJob, precision: str, path: Path) -> dict[str, Any]:
    """Write the FAISS engine at ``precision`` into the directory ``path``; returns extra manifest fields."""
    import faiss

    from edgeinspect.export.exporter import CannotBuildHere

    module = getattr(job.model, "nearest_neighbour_module", None)
    if not module:
        raise CannotBuildHere(f"a faiss engine runs a memory bank's nearest-neighbour search; the "
                              f"{job.bundle.family} model has none (PatchCore has)")
    cfg = job.settings["faiss"]
    source = job.source_engine("onnx", precision)
    source_entry = job.bundle.find_engine("onnx", precision)
    features, head, patches, distances = split_at_module(onnx.load(str(source)), f"/{module}/")
    # the bank of the source engine: an INT8 engine's was refit on its INT8 features (as its manifest entry
    # records); refit again on the same engine and the same images
    refit = bool(source_entry.get("int8", {}).get("statistics_refit_on_int8_features"))
    model = job.refit_on_engine(source) if refit else job.model
    bank = np.ascontiguousarray(getattr(model, module).bank(), np.float32)
    factory = index_factory_string(cfg["index"], len(bank))
    index = build_index(bank, factory, cfg["search_parameters"])
    path.mkdir(parents=True)
    metadata = job.metadata("faiss", precision)
    bits = source_entry.get("int8", {}).get("weight_bits")
    if bits:  # its parts run the source's INT8 weights: the runtime reads their bits (needs_exact_products)
        metadata[WEIGHT_BITS_KEY] = bits
    for name, graph in (("features.onnx", features), ("head.onnx", head)):
        onnx.save(graph, str(path / name))
        check(path / name)
        add_metadata(path / name, metadata)
    faiss.write_index(index, str(path / "bank.faiss"))
    spec = {"features": "features.onnx", "patches": patches, "index": "bank.faiss", "head": "head.onnx",
            "distances": distances, "index_factory": factory, "search_parameters": cfg["search_parameters"],
            "bank_shape": list(bank.shape), "faiss_version": faiss.__version__, "metadata": metadata}
    (path / "engine.json").write_text(json.dumps(spec, indent=1))
    return {"faiss": {"index_factory": factory, "search_parameters": cfg["search_parameters"],
                      "bank_entries": int(bank.shape[0]), "source_engine": source_entry["file"],
                      "bank_refit_on_int8_features": refit, "faiss_version": faiss.__version__}}


def write_decision(path: Path, decision: dict[str, Any]) -> None:
    """Replace the decision in the engine's metadata (``engine.json`` and both ONNX parts) by the one its gate
    gave it."""
    spec = json.loads((path / "engine.json").read_text())
    spec["metadata"]["decision"] = decision
    for part in (spec["features"], spec["head"]):
        write_onnx_decision(path / part, decision)
    (path / "engine.json").write_text(json.dumps(spec, indent=1))


def index_factory_string(factory: str, bank_entries: int) -> str:
    """``factory`` with ``{lists}`` replaced by the power of two nearest to the square root of the bank size
    (the number of inverted lists that balances finding the lists against scanning them)."""
    lists = 2 ** max(0, round(np.log2(max(bank_entries, 1)) / 2))
    return factory.replace("{lists}", str(lists))


def build_index(bank: np.ndarray, factory: str, search_parameters: str | None = None) -> Any:
    """A FAISS index (L2) built by ``faiss.index_factory(D, factory)`` (``{lists}``: see
    :func:`index_factory_string`), trained on the bank where it needs to be, holding every entry of it, with
    ``search_parameters`` applied (ConfigError naming the bank when FAISS refuses any of it)."""
    import faiss

    factory = index_factory_string(factory, len(bank))
    try:
        index = faiss.index_factory(bank.shape[1], factory, faiss.METRIC_L2)
    except RuntimeError as exc:
        raise ConfigError(f"faiss.index: {factory!r} is not an index FAISS can build: {exc}") from exc
    try:
        if not index.is_trained:
            index.train(bank)
        index.add(bank)
    except RuntimeError as exc:
        raise ConfigError(f"faiss.index: FAISS cannot build {factory!r} over a bank of {len(bank)} x "
                          f"{bank.shape[1]}: {exc}") from exc
    if search_parameters:
        try:
            faiss.ParameterSpace().set_index_parameters(index, search_parameters)
        except RuntimeError as exc:
            raise ConfigError(f"faiss.search_parameters: {search_parameters!r} does not apply to a {factory!r} "
                              f"index: {exc}") from exc
    return index


def split_at_module(model: onnx.ModelProto, prefix: str) -> tuple[onnx.ModelProto, onnx.ModelProto, str, str]:
    """Cut ``model`` around the nodes named under ``prefix``: (graph from the inputs to the one tensor those
    nodes read, graph from the one tensor they give to the outputs, the two tensor names)."""
    inside = [n for n in model.graph.node if n.name.startswith(prefix)]
    if not inside:
        raise ExportError(f"no node of the ONNX engine is under {prefix}: nothing to replace by a FAISS index")
    made_inside = {o for n in inside for o in n.output}
    # values computed from the image: not constants (some exporters list them as inputs too), nor casts of
    # constants as an FP16 engine has them
    varying = {i.name for i in model.graph.input} - {t.name for t in model.graph.initializer}
    for node in model.graph.node:
        if varying & set(node.input):
            varying.update(node.output)
    reads = list(dict.fromkeys(i for n in inside for i in n.input if i in varying and i not in made_inside))
    read_outside = {i for n in model.graph.node if n not in inside for i in n.input} | {o.name for o in
                                                                                         model.graph.output}
    # likewise only values computed from the image: a constant the exporter shares with a node outside (a
    # clamp's 0, cast by the FP16 converter under the first user's name) is no output of the search
    gives = list(dict.fromkeys(o for n in inside for o in n.output if o in read_outside and o in varying))
    if len(reads) != 1 or len(gives) != 1:
        raise ExportError(f"the nodes under {prefix} read {reads} and give {gives}; a FAISS engine needs one "
                          f"tensor of patches in and one of distances out")
    # shapes of the cut tensors: the traced graph computes its Reshape targets, so propagate values too
    extractor = onnx.utils.Extractor(onnx.shape_inference.infer_shapes(model, data_prop=True))
    inputs, outputs = [i.name for i in model.graph.input], [o.name for o in model.graph.output]
    return extractor.extract_model(inputs, reads), extractor.extract_model(gives, outputs), reads[0], gives[0]
