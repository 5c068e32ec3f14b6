"""deploy/install-runtime.sh (the container images' install step: `.[runtime]` in a fresh virtualenv, no
torch) gives a runtime that predicts and serves a bundle."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import zmq
from conftest import SYNTH_CATEGORY, free_tcp_endpoint

from edgeinspect.runtime.publisher import decode_message

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_runtime_extra_alone_predicts_and_serves(patchcore_bundle: Path, synth_root: Path, tmp_path: Path) -> None:
    venv = tmp_path / "runtime-venv"
    py, cli = venv / "bin" / "python", venv / "bin" / "edgeinspect"
    subprocess.run(["sh", str(REPO / "deploy" / "install-runtime.sh"), str(venv), str(REPO)], check=True,
                   timeout=900, env={**os.environ, "PIP_ARGS": "-q"})
    no_torch = subprocess.run([str(py), "-c", "import torch"], capture_output=True)
    assert no_torch.returncode != 0, "torch must not be installed by the runtime extra"

    images = sorted((synth_root / SYNTH_CATEGORY / "test").glob("*/*.png"))[::6]
    out = subprocess.run([str(cli), "-q", "predict", str(patchcore_bundle), *map(str, images), "--json"],
                         capture_output=True, text=True, check=True, cwd=tmp_path)
    verdicts = [json.loads(line) for line in out.stdout.splitlines()]
    assert [v["image"] for v in verdicts] == [str(p) for p in images]
    assert all(v["verdict"] in ("OK", "NOK") for v in verdicts)

    folder = tmp_path / "frames"
    folder.mkdir()
    for i, image in enumerate(images):
        (folder / f"{i:03d}.png").write_bytes(image.read_bytes())
    endpoint = free_tcp_endpoint()
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.connect(endpoint)
    sub.setsockopt_string(zmq.SUBSCRIBE, "")
    proc = subprocess.Popen([str(cli), "-q", "serve", "--bundle", str(patchcore_bundle), "--camera", str(folder),
                             "--publish", endpoint, "--wait-subscribers", "1"], cwd=tmp_path)
    received = []
    try:
        while sub.poll(60_000):
            topic, payload = decode_message(sub.recv_multipart())
            if topic.startswith("verdict."):
                received.append(payload)
            elif payload["state"] in ("stopped", "failed"):
                break
    finally:
        sub.close(linger=0)
        assert proc.wait(timeout=60) == 0
    assert [v["seq"] for v in received] == list(range(len(images)))
    # same engine, same images: the installed runtime agrees with the predict command
    assert [v["verdict"] for v in received] == [v["verdict"] for v in verdicts]
