"""The line daemon under load: ``python -m benchmarks.line BUNDLE [BUNDLE ...] [--cameras 4] [--fps 10]
[--seconds 600] [--json OUT] [--markdown OUT]``. The bundles need an ONNX engine.

Two measurements, one run, the real daemon code (``serve`` / ``run_line``) and a real ZeroMQ subscriber:

1. **Live latency** (each bundle in turn): one camera, a live-paced source (a frame every 1/fps whether
   it is read or not, as a camera delivers them; latest frame wins), ``--latency-frames`` frames.
   Reported: capture -> publish (each verdict's ``latency_ms.total``) p50 / p90 / p99 against the engine's own p50
   (``latency_ms.inference``), and the difference of the p50s.
2. **Soak** (the first bundle): ``--cameras`` cameras, each a recorded video looped and paced at ``--fps``,
   for ``--seconds``, on one endpoint. Reported per camera: frames expected (fps x seconds), published, received by the
   subscriber, seq gaps, achieved fps, capture -> publish p50 / p99.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import zmq

from edgeinspect.bench import device_info
from edgeinspect.bundle import Bundle
from edgeinspect.camera import FrameSource
from edgeinspect.runtime.daemon import run_line, serve
from edgeinspect.runtime.line import line_config
from edgeinspect.runtime.predictor import Predictor
from edgeinspect.runtime.publisher import VerdictPublisher, decode_message
from edgeinspect.train.data import write_video


class PacedLiveCamera(FrameSource):
    """A live camera stand-in: the given frames, one every 1/fps seconds, read or not."""

    live = True

    def __init__(self, frames: list[np.ndarray], fps: float, count: int):
        super().__init__(f"paced live camera ({fps:g} fps)")
        self.frames, self.period, self.count = frames, 1.0 / fps, count

    def _items(self) -> Iterator[tuple]:
        start = time.monotonic()
        for i in range(self.count):
            time.sleep(max(0.0, start + i * self.period - time.monotonic()))
            yield self._checked(self.frames[i % len(self.frames)], "")
        self.end_reason = f"{self.count} frames delivered"

    def _release(self) -> None:
        pass


class Subscriber:
    """Counts verdicts per camera in a thread and checks that each camera's seq has no gap."""

    def __init__(self, endpoint: str):
        self.socket = zmq.Context.instance().socket(zmq.SUB)
        self.socket.connect(endpoint)
        self.socket.setsockopt_string(zmq.SUBSCRIBE, "verdict.")
        self.received: dict[str, int] = {}
        self.gaps: dict[str, int] = {}
        self._last: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        time.sleep(0.5)  # let the subscription reach the publisher before the first frame

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.socket.poll(100):
                _, payload = decode_message(self.socket.recv_multipart())
                camera, seq = payload["camera"], payload["seq"]
                self.received[camera] = self.received.get(camera, 0) + 1
                if camera in self._last and seq != self._last[camera] + 1:
                    self.gaps[camera] = self.gaps.get(camera, 0) + 1
                self._last[camera] = seq

    def close(self, settle_s: float = 2.0) -> None:
        time.sleep(settle_s)
        self._stop.set()
        self._thread.join()
        self.socket.close(linger=0)


def _percentiles(values: list[float]) -> dict[str, float]:
    arr = np.asarray(values, np.float64)
    return {f"p{q}": round(float(np.percentile(arr, q)), 2) for q in (50, 90, 99)} if len(arr) else {}


def live_latency(bundle: Path, frames: list[np.ndarray], fps: float, count: int, endpoint: str) -> dict:
    """Capture -> publish against the engine on a live-paced camera (measurement 1)."""
    predictor = Predictor(bundle)
    verdicts: list[dict] = []
    subscriber = Subscriber(endpoint)
    with VerdictPublisher(endpoint, "bench", "live") as publisher:
        time.sleep(0.5)
        source = PacedLiveCamera(frames, fps, count)
        source.check = predictor.check
        serve(predictor, source, publisher, on_verdict=verdicts.append)
    subscriber.close()
    judged = [v for v in verdicts[3:] if v["verdict"] != "ERROR"]  # the first frames warm the engine
    total = [v["latency_ms"]["total"] for v in judged]
    engine = [v["latency_ms"]["inference"] for v in judged]
    result = {"bundle_id": predictor.bundle.bundle_id, "fps": fps, "frames_delivered": count, "verdicts": len(verdicts),
              "received": subscriber.received.get("live", 0), "engine": predictor.engine,
              "capture_to_publish_ms": _percentiles(total), "engine_ms": _percentiles(engine),
              "preprocess_p50_ms": _percentiles([v["latency_ms"]["preprocess"] for v in judged]).get("p50"),
              "postprocess_p50_ms": _percentiles([v["latency_ms"]["postprocess"] for v in judged]).get("p50")}
    if total:
        result["p50_difference_ms"] = round(result["capture_to_publish_ms"]["p50"] - result["engine_ms"]["p50"], 2)
    return result


def soak(bundle: Path, video: Path, cameras: int, fps: float, seconds: float, endpoint: str) -> dict:
    """N recorded cameras at ``fps`` for ``seconds`` on one endpoint (measurement 2)."""
    per_camera = int(round(fps * seconds))
    ids = [f"cam{i + 1}" for i in range(cameras)]
    config = line_config({"line": "bench", "publish": endpoint, "wait_subscribers": 1, "cameras": [
        {"id": cid, "source": str(video), "bundle": str(bundle), "loop": True, "fps": fps, "max_frames": per_camera}
        for cid in ids]})
    totals: dict[str, list[float]] = {cid: [] for cid in ids}
    subscriber = Subscriber(endpoint)
    t0 = time.monotonic()
    stats = run_line(config, on_verdict=lambda v: totals[v["camera"]].append(v["latency_ms"].get("total", 0.0)))
    wall = time.monotonic() - t0
    subscriber.close()
    rows = {}
    for cid in ids:
        rows[cid] = {"expected": per_camera, "published": stats[cid].frames, "errors": stats[cid].errors,
                     "received": subscriber.received.get(cid, 0), "seq_gaps": subscriber.gaps.get(cid, 0),
                     "fps": round(stats[cid].frames / wall, 2), "capture_to_publish_ms": _percentiles(totals[cid])}
    return {"cameras": cameras, "fps_each": fps, "seconds": seconds, "wall_s": round(wall, 1), "per_camera": rows,
            "lost": sum(r["expected"] - r["received"] for r in rows.values())}


def markdown(report: dict) -> str:
    """The figures as a Markdown section."""
    s = report["soak"]
    lines = ["### Line daemon", "", "Live-paced camera, one bundle at a time:", "",
             "| bundle | engine | fps | frames | capture->publish p50 / p90 / p99 ms | engine p50 ms | "
             "difference of the p50s ms | preprocess p50 ms | post-processing p50 ms |",
             "|---|---|---|---|---|---|---|---|---|"]
    for live in report["live"]:
        c = live["capture_to_publish_ms"]
        lines.append(f"| {live['bundle_id']} | {live['engine']} | {live['fps']:g} | {live['frames_delivered']} | "
                     f"{c.get('p50')} / {c.get('p90')} / {c.get('p99')} | {live['engine_ms'].get('p50')} | "
                     f"{live.get('p50_difference_ms')} | {live['preprocess_p50_ms']} | {live['postprocess_p50_ms']} |")
    lines += ["", f"Soak ({report['bundle_id']}): {s['cameras']} recorded cameras at {s['fps_each']:g} fps each "
              f"for {s['seconds']:g} s (wall {s['wall_s']} s), frames lost: {s['lost']}.", "",
              "| camera | expected | published | received | seq gaps | fps | capture->publish p50 / p99 ms |",
              "|---|---|---|---|---|---|---|"]
    for cid, r in s["per_camera"].items():
        c = r["capture_to_publish_ms"]
        lines.append(f"| {cid} | {r['expected']} | {r['published']} | {r['received']} | {r['seq_gaps']} | "
                     f"{r['fps']} | {c.get('p50')} / {c.get('p99')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    """Parse arguments, run both measurements, print (and write) the report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundles", type=Path, nargs="+", help="live latency for each; the soak runs the first")
    parser.add_argument("--cameras", type=int, default=4)
    parser.add_argument("--fps", type=float, default=10.0)
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--latency-frames", type=int, default=300)
    parser.add_argument("--port", type=int, default=5599, help="loopback port the benchmark publishes on")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    bundle = Bundle.open(args.bundles[0])
    data = bundle.manifest["data"]
    images = sorted(Path(data["root"], data["category"], "test").glob("*/*.png"))
    frames = [cv2.imread(str(p), cv2.IMREAD_UNCHANGED) for p in images]
    endpoint = f"tcp://127.0.0.1:{args.port}"
    with tempfile.TemporaryDirectory() as tmp:
        video = write_video(images, Path(tmp) / "line.avi", fps=args.fps)
        report = {"bundle_id": bundle.bundle_id, "device": device_info(),
                  "live": [live_latency(b, frames, args.fps, args.latency_frames, endpoint) for b in args.bundles],
                  "soak": soak(args.bundles[0], video, args.cameras, args.fps, args.seconds, endpoint)}
    print(markdown(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.markdown:
        args.markdown.write_text(markdown(report))


if __name__ == "__main__":
    main()
