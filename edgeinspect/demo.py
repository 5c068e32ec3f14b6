"""`make demo`: the whole path on the built-in synthetic parts, through the real CLI.

synthesise -> train PatchCore -> export ONNX (with parity) -> serve a video over ZeroMQ, while a
real SUB socket in this process prints every verdict it receives -> summary.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import zmq

from edgeinspect.runtime.publisher import decode_message

OUT = Path("demo_out")
ENDPOINT = "tcp://127.0.0.1:5557"


def _run(*args: str) -> None:
    cmd = [sys.executable, "-m", "edgeinspect", *args]
    print(f"\n$ edgeinspect {' '.join(args)}", flush=True)
    subprocess.run(cmd, check=True)


def main() -> int:
    """Run the demo; returns the process exit code."""
    t_start = time.perf_counter()
    data, bundle, video = OUT / "data", OUT / "bundle_patchcore", OUT / "washer_test.avi"
    _run("data", "synth", "--out", str(data), "--category", "washer", "--seed", "0")
    _run("train", "patchcore", "--data", str(data), "--category", "washer", "--out", str(bundle), "--overwrite",
         "--device", "cpu")
    _run("export", str(bundle), "--format", "onnx")
    _run("data", "video", str(data / "washer" / "test"), "--out", str(video), "--fps", "10")

    ctx = zmq.Context.instance()
    sub = ctx.socket(zmq.SUB)
    sub.connect(ENDPOINT)
    sub.setsockopt_string(zmq.SUBSCRIBE, "verdict.")
    sub.setsockopt_string(zmq.SUBSCRIBE, "status.")
    serve_cmd = ["serve", "--bundle", str(bundle), "--camera", str(video), "--publish", ENDPOINT,
                 "--line", "demo", "--camera-id", "cam0", "--wait-subscribers", "1"]
    print(f"\n$ edgeinspect {' '.join(serve_cmd)}   (a ZeroMQ subscriber in this process prints each verdict)",
          flush=True)
    daemon = subprocess.Popen([sys.executable, "-m", "edgeinspect", "--quiet", *serve_cmd])
    verdicts: list[dict] = []
    final: dict = {}
    try:
        while True:
            if not sub.poll(60_000):
                print("no message from the daemon for 60 s", file=sys.stderr)
                return 1
            topic, payload = decode_message(sub.recv_multipart())
            if topic.startswith("status."):
                if payload["state"] in ("stopped", "failed"):
                    final = payload
                    break
                continue
            verdicts.append(payload)
            regions = ", ".join(str(r["box"]) for r in payload["regions"][:2])
            print(f"  seq {payload['seq']:3d}  frame {payload['frame_index']:3d}  {payload['verdict']:<4} "
                  f"score {payload['score']:.3f}  {payload['latency_ms'].get('inference', 0):6.1f} ms"
                  f"{'  regions ' + regions if regions else ''}", flush=True)
    finally:
        sub.close(linger=0)
        code = daemon.wait(timeout=60)
    manifest = json.loads((bundle / "manifest.json").read_text())
    engine = manifest["engines"][0]
    seqs = [v["seq"] for v in verdicts]
    inference = np.array([v["latency_ms"]["inference"] for v in verdicts])
    total = np.array([v["latency_ms"]["total"] for v in verdicts])
    size_mb = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file()) / 1e6
    print("\n=== summary ===")
    print(f"test set        image AUROC {manifest['metrics']['image_auroc']:.4f}   "
          f"pixel AUROC {manifest['metrics']['pixel_auroc']:.4f}   F1 {manifest['metrics']['f1']:.4f} "
          f"({manifest['metrics']['n_images']} images, PyTorch at training time)")
    print(f"onnx parity     {engine['parity']['verdict_agreement'] * 100:.0f}% verdict agreement, "
          f"max |d score| {engine['parity']['max_abs_score_delta']:.2e}")
    print(f"daemon          {len(verdicts)} verdicts received, seq {seqs[0]}..{seqs[-1]} "
          f"{'gap-free' if seqs == list(range(seqs[0], seqs[0] + len(seqs))) else 'WITH GAPS'}; "
          f"{sum(v['verdict'] == 'NOK' for v in verdicts)} NOK; final state {final.get('state')}: "
          f"{final.get('end_reason')}")
    print(f"latency         inference median {np.median(inference):.1f} ms, p95 {np.percentile(inference, 95):.1f} ms;"
          f" capture->publish median {np.median(total):.1f} ms (ONNX Runtime, CPU)")
    print(f"bundle          {bundle} ({size_mb:.1f} MB)   wall time {time.perf_counter() - t_start:.0f} s")
    return code


if __name__ == "__main__":
    sys.exit(main())
