"""The schema of configs/export.yaml: gates per precision (anomaly models, detectors), INT8 calibration,
TensorRT, Core ML, Triton, FAISS."""

from __future__ import annotations

from typing import Literal

from edgeinspect.schema import Section, integer, real


class GateSection(Section):
    """The parity gate of one precision."""

    tolerance: real(0.0, 1e6) | None
    min_verdict_agreement: real(0.0, 1.0)
    max_auroc_drop: real(-1.0, 1.0) | None  # negative: the engine must beat PyTorch (forces a refusal)
    borderline_band: real(0.0, 1.0, hi_open=True)


class Int8Section(GateSection):
    """The INT8 gate plus calibration and sensitive-node retries."""

    calibration_images: integer(1, 100_000)
    calibration_method: Literal["minmax", "entropy", "percentile"]
    refit_statistics: bool
    per_channel: bool
    reduce_range: bool
    eight_bit_retry: bool
    dynamic_matmuls: bool
    exclusion_rounds: integer(0, 100)
    exclude_per_round: integer(1, 10_000)


class EngineThresholdSection(Section):
    """How an anomaly engine whose gate lets scores shift (INT8, faiss) gets its threshold."""

    rule: Literal["scaled", "recalibrated"]


class DetectionGateSection(Section):
    """The parity gate of a detector engine at one precision (export/parity.py DetectionGate)."""

    min_iou: real(0.0, 1.0)
    score_tolerance: real(0.0, 1.0) | None
    min_score: real(0.0, 1.0)
    max_unmatched: real(0.0, 1e6) | None
    min_verdict_agreement: real(0.0, 1.0)
    borderline_band: real(0.0, 1.0, hi_open=True)
    max_map50_drop: real(0.0, 1.0) | None


class DetectionGatesSection(Section):
    """The detector gates, one per precision."""

    fp32: DetectionGateSection
    fp16: DetectionGateSection
    int8: DetectionGateSection


class TensorRTSection(Section):
    """TensorRT builder settings."""

    workspace_mb: integer(1, 1 << 20)
    dla_core: Literal[0, 1] | None
    timing_cache: str | None
    calibration_method: Literal["minmax", "entropy", "percentile"]


class CoreMLSection(Section):
    """Core ML conversion settings."""

    minimum_deployment_target: Literal["macOS13", "macOS14", "macOS15", "iOS16", "iOS17", "iOS18"]
    compute_units: Literal["ALL", "CPU_AND_NE", "CPU_AND_GPU", "CPU_ONLY"]


class TritonSection(Section):
    """Triton model repository settings."""

    source: Literal["onnx", "tensorrt"]
    instance_count: integer(1, 1024)
    instance_kind: Literal["KIND_AUTO", "KIND_GPU", "KIND_CPU"]


class FaissSection(Section):
    """FAISS engines: the index over the memory bank, its search parameters, and their gate."""

    index: str
    search_parameters: str | None
    gate: GateSection


class ExportConfig(Section):
    """Configuration of export."""

    fp32: GateSection
    fp16: GateSection
    int8: Int8Section
    engine_threshold: EngineThresholdSection
    detections: DetectionGatesSection
    tensorrt: TensorRTSection
    coreml: CoreMLSection
    triton: TritonSection
    faiss: FaissSection
