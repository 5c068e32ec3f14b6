"""Prometheus metrics and /healthz of a real serving daemon, scraped over real HTTP on loopback."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import zmq
from conftest import SYNTH_CATEGORY, free_tcp_endpoint
from prometheus_client.parser import text_string_to_metric_families

from edgeinspect.runtime.metrics import DaemonMetrics, MetricsServer
from edgeinspect.runtime.publisher import decode_message


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _samples(text: bytes) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text.decode()) for s in family.samples}


def test_a_serving_daemon_is_scraped_and_healthy(patchcore_bundle: Path, synth_root: Path, tmp_path: Path) -> None:
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, src in enumerate(sorted((synth_root / SYNTH_CATEGORY / "test").glob("*/*.png"))[:4]):
        (folder / f"{i}.png").write_bytes(src.read_bytes())
    endpoint, port = free_tcp_endpoint(), _free_port()
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.connect(endpoint)
    sub.setsockopt_string(zmq.SUBSCRIBE, "verdict.")
    proc = subprocess.Popen([sys.executable, "-m", "edgeinspect", "-q", "serve", "--bundle", str(patchcore_bundle),
                             "--camera", str(folder), "--publish", endpoint, "--line", "L2", "--camera-id", "c9",
                             "--loop", "--wait-subscribers", "1", "--metrics-port", str(port)],
                            stderr=subprocess.PIPE, text=True)
    try:
        verdicts = []
        while len(verdicts) < 10:
            assert sub.poll(120_000), "no verdict within 120 s"
            verdicts.append(decode_message(sub.recv_multipart())[1])
        time.sleep(1.2)  # at least one heartbeat after those verdicts
        code, body = _get(f"http://127.0.0.1:{port}/healthz")
        health = json.loads(body)
        assert code == 200 and health["status"] == "ok" and health["cameras"]["c9"]["state"] == "running"
        code, text = _get(f"http://127.0.0.1:{port}/metrics")
        assert code == 200
        samples = _samples(text)
        labels = (("camera", "c9"), ("line", "L2"))
        assert samples[("edgeinspect_frames_total", labels)] >= 10
        by_kind = sum(v for (name, lab), v in samples.items() if name == "edgeinspect_verdicts_total")
        assert by_kind == samples[("edgeinspect_frames_total", labels)]
        inference = (("camera", "c9"), ("line", "L2"), ("stage", "inference"))
        assert samples[("edgeinspect_stage_latency_seconds_count", inference)] >= 10
        assert samples[("edgeinspect_up", labels)] == 1
        assert samples[("edgeinspect_dropped_stale_total", labels)] == 0  # a folder loses no frame
        engine = [lab for name, lab in samples if name == "edgeinspect_engine_info"]
        assert engine and dict(engine[0])["engine"] == "onnx:fp32"
        assert _get(f"http://127.0.0.1:{port}/nope")[0] == 404
    finally:
        sub.close(linger=0)
        proc.terminate()
        assert proc.wait(timeout=60) == 0, proc.stderr.read()


def test_health_follows_the_serve_loop() -> None:
    metrics = DaemonMetrics("L1", stale_s=0.3)
    server = MetricsServer(metrics, 0)
    url = f"http://127.0.0.1:{server.port}/healthz"
    try:
        assert _get(url)[0] == 503  # no camera serving yet
        c1, c2 = metrics.camera("c1"), metrics.camera("c2")
        status = {"state": "running", "engine": "onnx:fp32", "bundle_id": "b1", "dropped": 0, "dropped_stale": 3,
                  "reconnects": 1, "journal": {"state": "failed"}}
        c1.on_status(status)
        assert _get(url)[0] == 503  # c2 has not started
        c2.on_status({**status, "dropped_stale": 0, "reconnects": 0, "journal": {}})
        assert _get(url)[0] == 200
        time.sleep(0.4)
        c2.on_status({**status, "dropped_stale": 0, "reconnects": 0, "journal": {}})
        code, body = _get(url)  # c1 sent no heartbeat since: its loop is stuck
        assert code == 503 and json.loads(body)["cameras"]["c1"]["state"] == "running"
        c1.on_status({**status, "dropped_stale": 5, "engine": "onnx:int8"})
        samples = _samples(metrics.exposition())
        labels = (("camera", "c1"), ("line", "L1"))
        assert samples[("edgeinspect_dropped_stale_total", labels)] == 5  # running totals, not summed twice
        assert samples[("edgeinspect_reconnects_total", labels)] == 1
        assert samples[("edgeinspect_journal_failed", labels)] == 1
        engines = [dict(lab)["engine"] for name, lab in samples
                   if name == "edgeinspect_engine_info" and dict(lab)["camera"] == "c1"]
        assert engines == ["onnx:int8"]  # the swapped-out engine's series is gone
        c1.on_status({**status, "state": "failed"})
        assert _get(url)[0] == 503
    finally:
        server.close()
    with pytest.raises(Exception, match="cannot serve metrics"), socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        MetricsServer(metrics, taken.getsockname()[1])


def test_a_paused_camera_is_up_and_healthy() -> None:
    metrics = DaemonMetrics("L1")
    server = MetricsServer(metrics, 0)
    try:
        metrics.camera("c1").on_status({"state": "paused", "engine": "onnx:fp32", "bundle_id": "b1"})  # ctl pause
        code, body = _get(f"http://127.0.0.1:{server.port}/healthz")
        assert code == 200 and json.loads(body)["cameras"]["c1"]["state"] == "paused"
        assert _samples(metrics.exposition())[("edgeinspect_up", (("camera", "c1"), ("line", "L1")))] == 1
    finally:
        server.close()
