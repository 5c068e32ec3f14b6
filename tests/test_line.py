"""`serve --config line.yaml`: several cameras on one box, over real ZeroMQ on loopback, real folders
and a real video as cameras; and the validation of the line config."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
from collections.abc import Callable
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
import zmq
from conftest import SYNTH_CATEGORY, free_tcp_endpoint

from edgeinspect.errors import ConfigError
from edgeinspect.imageio import read_image
from edgeinspect.runtime.line import line_config
from edgeinspect.runtime.publisher import decode_message
from edgeinspect.train.data import write_video


def _serve_line(config: dict, tmp_path: Path, n_cameras: int, *, exit_code: int = 0,
                on_status: Callable[[dict], None] | None = None) -> tuple[dict[str, list], dict[str, list], str]:
    """Serve ``config`` until its ``n_cameras`` cameras have ended: (verdicts, statuses by camera, stderr);
    ``on_status`` sees every status message as it comes."""
    path = tmp_path / "line.yaml"
    path.write_text(yaml.safe_dump(config))
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.connect(config["publish"])
    sub.setsockopt_string(zmq.SUBSCRIBE, "")
    proc = subprocess.Popen([sys.executable, "-m", "edgeinspect", "serve", "--config", str(path)],
                            stderr=subprocess.PIPE, text=True)
    verdicts: dict[str, list] = {}
    statuses: dict[str, list] = {}
    try:
        while sum(s[-1]["state"] in ("stopped", "failed") for s in statuses.values() if s) < n_cameras:
            assert sub.poll(120_000), "no message from the line within 120 s"
            topic, payload = decode_message(sub.recv_multipart())
            target = verdicts if topic.startswith("verdict.") else statuses
            target.setdefault(payload["camera"], []).append(payload)
            if on_status is not None and target is statuses:
                on_status(payload)
    finally:
        sub.close(linger=0)
        code = proc.wait(timeout=60)
    stderr = proc.stderr.read()
    assert code == exit_code, stderr
    return verdicts, statuses, stderr


def test_three_cameras_two_bundles_one_endpoint(patchcore_bundle: Path, padim_engine_bundle: Path,
                                                synth_root: Path, tmp_path: Path) -> None:
    images = sorted((synth_root / SYNTH_CATEGORY / "test").glob("*/*.png"))
    folder = tmp_path / "folder"
    folder.mkdir()
    for i, src in enumerate(images[:5]):
        (folder / f"{i}.png").write_bytes(src.read_bytes())
    video = write_video(images[5:12], tmp_path / "cam2.avi", fps=25)
    # camera 3 sees the part at (40, 30) inside a larger grey frame; its ROI cuts the part out
    wide = tmp_path / "wide"
    wide.mkdir()
    defective = [p for p in images if p.parent.name != "good"][:3]
    h, w = read_image(defective[0]).shape[:2]
    for i, src in enumerate(defective):
        canvas = np.full((h + 60, w + 80, 3), 128, np.uint8)
        canvas[30:30 + h, 40:40 + w] = cv2.imread(str(src))
        cv2.imwrite(str(wide / f"{i}.png"), canvas)
    config = {"line": "L3", "publish": free_tcp_endpoint(), "wait_subscribers": 1, "journal": str(tmp_path / "j"),
              "cameras": [{"id": "cam1", "source": str(folder), "bundle": str(patchcore_bundle)},
                          {"id": "cam2", "source": str(video), "bundle": str(patchcore_bundle)},
                          {"id": "cam3", "source": str(wide), "bundle": str(padim_engine_bundle),
                           "roi": [40, 30, 40 + w, 30 + h], "fps": 5}]}
    verdicts, statuses, stderr = _serve_line(config, tmp_path, 3)

    counts = {"cam1": 5, "cam2": 7, "cam3": 3}
    for camera, n in counts.items():  # recorded sources: every frame, each camera its own seq from 0
        assert [v["seq"] for v in verdicts[camera]] == list(range(n)), camera
        assert all(v["line"] == "L3" and v["verdict"] in ("OK", "NOK") for v in verdicts[camera])
        assert statuses[camera][-1]["state"] == "stopped" and statuses[camera][-1]["frames"] == n
        assert statuses[camera][-1]["journal"]["next_seq"] == n
    assert {v["bundle_id"] for v in verdicts["cam1"] + verdicts["cam2"]} == {verdicts["cam1"][0]["bundle_id"]}
    assert verdicts["cam3"][0]["bundle_id"] != verdicts["cam1"][0]["bundle_id"]
    # cameras with the same bundle share one engine session: two bundles, two engines loaded
    assert len(re.findall(r"engine onnx:fp32 .* selected by --engine auto", stderr)) == 2
    # the ROI: every defect region lies inside it, in frame pixels
    boxes = [r["box"] for v in verdicts["cam3"] for r in v["regions"]]
    assert boxes and all(40 <= x0 < x1 <= 40 + w and 30 <= y0 < y1 <= 30 + h for x0, y0, x1, y1 in boxes)
    # the fps cap paces a recorded source: 5 frames a second at most
    stamps = [v["capture_ts"] for v in verdicts["cam3"]]
    assert min(np.diff(stamps)) >= 0.18


def test_line_config_errors_name_their_keys(patchcore_bundle: Path, tmp_path: Path) -> None:
    camera = {"id": "c1", "source": "x", "bundle": str(patchcore_bundle)}
    cases = [({"line": "L1", "cameras": []}, "cameras"),
             ({"line": "L1", "cameras": [camera, camera]}, "used more than once"),
             ({"line": "L1", "cameras": [{**camera, "roi": [10, 10, 5, 20]}]}, "roi"),
             ({"line": "L1", "camras": [camera]}, "camras"),
             ({"line": "L 1", "cameras": [camera]}, "line"),
             ({"line": "L1", "cameras": [{**camera, "fps": 0}]}, "fps")]
    for data, key in cases:
        with pytest.raises(ConfigError, match=re.escape(key)):
            line_config(data)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"line": "L1", "cameras": [{**camera, "fsp": 5}]}))
    result = subprocess.run([sys.executable, "-m", "edgeinspect", "serve", "--config", str(bad)], capture_output=True,
                            text=True)
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and "fsp" in result.stderr
    both = subprocess.run([sys.executable, "-m", "edgeinspect", "serve", "--config", str(bad), "--bundle",
                           str(patchcore_bundle)], capture_output=True, text=True)
    assert both.returncode == 2 and "drop --bundle" in both.stderr
    neither = subprocess.run([sys.executable, "-m", "edgeinspect", "serve"], capture_output=True, text=True)
    assert neither.returncode == 2 and "--config" in neither.stderr


def test_the_example_line_config_is_valid() -> None:
    example = yaml.safe_load((Path(__file__).resolve().parents[1] / "deploy" / "line.example.yaml").read_text())
    config = line_config(example)
    assert [c.id for c in config.cameras] == ["cam1", "cam2"] and config.cameras[1].roi == (100, 50, 740, 530)


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


def test_a_camera_that_drops_out_comes_back_and_one_that_fails_does_not_stop_the_line(
        patchcore_bundle: Path, synth_root: Path, tmp_path: Path) -> None:
    images = sorted((synth_root / SYNTH_CATEGORY / "test").glob("*/*.png"))
    write_video(images[:6], tmp_path / "www" / "cam.avi", fps=25)
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietHandler, directory=str(tmp_path / "www")))
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    folder = tmp_path / "folder"
    folder.mkdir()
    for i, src in enumerate(images[:12]):
        (folder / f"{i:02d}.png").write_bytes(src.read_bytes())
    config = {"line": "L4", "publish": free_tcp_endpoint(), "wait_subscribers": 1, "cameras": [
        # a network camera whose stream ends every 6 frames (it drops out), reopened after 0.05 s
        {"id": "net", "source": f"http://127.0.0.1:{server.server_address[1]}/cam.avi", "bundle": str(patchcore_bundle),
         "reconnect_attempts": 1, "reconnect_delay_s": 0.05},
        {"id": "rec", "source": str(folder), "bundle": str(patchcore_bundle), "fps": 2}]}

    def net_goes_away(status: dict) -> None:
        if status["camera"] == "net" and status["reconnects"] >= 2 and server.socket.fileno() != -1:
            server.shutdown()  # the camera came back twice; now it goes away for good
            server.server_close()

    verdicts, statuses, stderr = _serve_line(config, tmp_path, 2, exit_code=1, on_status=net_goes_away)
    final = {camera: s[-1] for camera, s in statuses.items()}
    assert final["net"]["state"] == "failed" and "disconnected" in final["net"]["error"]
    assert final["net"]["reconnects"] >= 2 and final["net"]["frames"] >= 12
    assert final["rec"]["state"] == "stopped" and final["rec"]["frames"] == 12 == len(verdicts["rec"])  # not stopped
    last = stderr.strip().splitlines()[-1]  # after the reconnect warnings: one error line naming the camera
    assert last.startswith("Error: ") and "camera net" in last


def test_a_camera_offline_at_startup_fails_alone_after_its_reconnect_attempts(
        patchcore_bundle: Path, synth_root: Path, tmp_path: Path) -> None:
    folder = tmp_path / "folder"
    folder.mkdir()
    for i, src in enumerate(sorted((synth_root / SYNTH_CATEGORY / "test").glob("*/*.png"))[:4]):
        (folder / f"{i}.png").write_bytes(src.read_bytes())
    offline = free_tcp_endpoint().replace("tcp://", "rtsp://") + "/cam"  # nothing listens there
    config = {"line": "L5", "publish": free_tcp_endpoint(), "wait_subscribers": 1, "cameras": [
        {"id": "net", "source": offline, "bundle": str(patchcore_bundle), "reconnect_attempts": 2,
         "reconnect_delay_s": 0.05},
        {"id": "rec", "source": str(folder), "bundle": str(patchcore_bundle)}]}
    _, statuses, stderr = _serve_line(config, tmp_path, 2, exit_code=1)
    final = {camera: s[-1] for camera, s in statuses.items()}
    reason = f"cannot open camera {offline} (after 2 reconnect attempts)"
    assert final["net"]["state"] == "failed" and final["net"]["error"] == reason
    assert final["rec"]["state"] == "stopped" and final["rec"]["frames"] == 4  # the line went on without it
    assert stderr.strip().splitlines()[-1] == f"Error: camera net: {reason}"
