"""ONNX engine: export of the full model graph (features, scoring, map head) with metadata."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import onnx
import torch

from edgeinspect.errors import ExportError

OPSET = 17


def export_onnx(model: torch.nn.Module, path: str | Path, input_shape: tuple[int, int, int, int],
                metadata: dict[str, object]) -> Path:
    """Write ``model`` as an ONNX file with a fixed input shape, check it and embed ``metadata``.

    Inputs/outputs are named ``image`` -> ``anomaly_map``, ``score``. Metadata values that are
    not strings are stored as JSON, as Ultralytics does, so any consumer of the bare .onnx file
    can still tell what it is.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval().cpu()
    dummy = torch.zeros(input_shape, dtype=torch.float32)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (dummy,), str(tmp), input_names=["image"],
                              output_names=["anomaly_map", "score"], opset_version=OPSET, dynamo=False,
                              do_constant_folding=True)
        proto = onnx.load(str(tmp))
        onnx.checker.check_model(proto, full_check=True)
        for key, value in metadata.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value)
        onnx.save(proto, str(tmp))
        tmp.replace(path)
    except (RuntimeError, onnx.checker.ValidationError, OSError) as exc:
        tmp.unlink(missing_ok=True)
        raise ExportError(f"ONNX export to {path} failed: {exc}") from exc
    return path
