"""The Triton backend against a real gRPC server on loopback that speaks Triton's inference protocol
(its own service protobufs from tritonclient) and runs the repository's model with ONNX Runtime: the
request building, the tensors' round trip and a server that goes away."""

from __future__ import annotations

import shutil
import subprocess
import sys
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from conftest import SYNTH_CATEGORY
from tritonclient.grpc import service_pb2, service_pb2_grpc

from edgeinspect.camera import Frame
from edgeinspect.errors import ConfigError, EngineError
from edgeinspect.imageio import read_image
from edgeinspect.runtime.backends.triton import read_model_config
from edgeinspect.runtime.daemon import verdict_fields
from edgeinspect.runtime.predictor import Predictor


class TritonStandIn(service_pb2_grpc.GRPCInferenceServiceServicer):
    """ModelReady and ModelInfer of Triton's gRPC service for the one model of a repository."""

    def __init__(self, repository: Path):
        self.name = read_model_config(repository).name
        self.session = ort.InferenceSession(str(next(repository.glob("*/1/model.onnx"))))
        self.requests = 0

    def ModelReady(self, request, context):  # noqa: N802 (the service's method names)
        return service_pb2.ModelReadyResponse(ready=request.name == self.name)

    def ModelInfer(self, request, context):  # noqa: N802
        self.requests += 1
        tensor = request.inputs[0]
        x = np.frombuffer(request.raw_input_contents[0], np.float32).reshape(list(tensor.shape))
        names = [o.name for o in request.outputs]
        response = service_pb2.ModelInferResponse(model_name=request.model_name)
        for name, out in zip(names, self.session.run(names, {tensor.name: x}), strict=True):
            meta = response.outputs.add(name=name, datatype="FP32")
            meta.shape.extend(out.shape)
            response.raw_output_contents.append(np.ascontiguousarray(out, np.float32).tobytes())
        return response


@pytest.fixture(scope="module")
def triton_bundle(patchcore_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from edgeinspect.export.exporter import export_bundle

    out = tmp_path_factory.mktemp("triton") / "patchcore"
    shutil.copytree(patchcore_bundle, out)
    export_bundle(out, "triton", "fp32", progress=False)
    return out


def test_a_triton_engine_scores_like_the_local_one_and_survives_a_server_going_away(
        triton_bundle: Path, synth_root: Path) -> None:
    stand_in = TritonStandIn(triton_bundle / "engines" / "triton_fp32")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(stand_in, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        remote = Predictor(triton_bundle, engine="triton", remote=f"127.0.0.1:{port}")
        local = Predictor(triton_bundle, engine="onnx:fp32")
        assert remote.engine == "triton:fp32" and "Triton Inference Server" in remote.backend.description
        images = sorted((synth_root / SYNTH_CATEGORY / "test").glob("*/*.png"))[::5]
        for path in images:
            rgb = read_image(path)
            a, b = remote.predict(rgb), local.predict(rgb)
            assert a.verdict == b.verdict and abs(a.raw_score - b.raw_score) <= 1e-5 * max(1.0, abs(b.raw_score))
        assert stand_in.requests == len(images)
        cli = subprocess.run([sys.executable, "-m", "edgeinspect", "-q", "predict", str(triton_bundle),
                              str(images[0]), "--engine", "triton:fp32", "--triton-url", f"127.0.0.1:{port}"],
                             capture_output=True, text=True)
        expected = local.predict(read_image(images[0])).verdict
        assert cli.returncode == 0 and cli.stdout.startswith(f"{images[0]}: {expected}"), cli.stderr
    finally:
        server.stop(grace=None).wait()
    # the server is gone: the frame gets an ERROR verdict with the reason, the daemon goes on
    frame = Frame(0, read_image(images[0]), 0.0, "0.png")
    with pytest.raises(EngineError, match="Triton inference"):
        remote.predict(frame.image)
    body = verdict_fields(frame, remote)
    assert body["verdict"] == "ERROR" and "Triton inference" in body["error"]


def test_a_server_address_is_needed_and_only_for_triton(triton_bundle: Path) -> None:
    with pytest.raises(ConfigError, match="--triton-url"):
        Predictor(triton_bundle, engine="triton")
    with pytest.raises(ConfigError, match="only for engines that run on a server"):
        Predictor(triton_bundle, engine="onnx", remote="127.0.0.1:8001")
    with pytest.raises(Exception, match="cannot reach the Triton server"):
        Predictor(triton_bundle, engine="triton", remote="127.0.0.1:9")
