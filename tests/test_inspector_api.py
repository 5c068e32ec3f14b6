"""The inspector's REST API: a real uvicorn server on loopback, a real HTTP client (httpx)."""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import SYNTH_CATEGORY, running_run
from inspector_support import RUN_IMAGE_AUROC, copy_bundle, copy_registry, free_port, seed_registry, serving

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from edgeinspect.bundle import Bundle  # noqa: E402
from edgeinspect.imageio import read_image, read_raw  # noqa: E402
from edgeinspect.inspector.app import create_app  # noqa: E402
from edgeinspect.registry import GONE, Registry  # noqa: E402
from edgeinspect.runtime.predictor import Predictor  # noqa: E402


@pytest.fixture(scope="module")
def served(patchcore_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A copy of the PatchCore bundle served by the inspector, with a registry holding one run."""
    tmp = tmp_path_factory.mktemp("inspector")
    bundle = copy_bundle(patchcore_bundle, tmp)
    run_id = seed_registry(tmp / "registry.sqlite")
    app = create_app([bundle], registry=tmp / "registry.sqlite")
    with serving(app) as url, httpx.Client(base_url=url, timeout=120) as client:
        yield {"client": client, "bundle": bundle, "run_id": run_id, "tmp": tmp, "app": app}


def _test_images(synth_root: Path, kind: str) -> list[Path]:
    return sorted((synth_root / SYNTH_CATEGORY / "test").glob(f"{kind}/*.png"))


def _defect(synth_root: Path) -> Path:
    return next(p for p in _test_images(synth_root, "*") if p.parent.name != "good")


def _predict(client: httpx.Client, name: str, data: bytes, **fields: str) -> httpx.Response:
    return client.post("/api/predict", files={"image": (name, data, "image/png")}, data=fields)


def test_status_docs_and_predict(served: dict, synth_root: Path) -> None:
    client = served["client"]
    status = client.get("/api/status").json()
    (model,) = status["models"]
    assert model["bundle_id"] == Bundle.open(served["bundle"]).bundle_id and model["engine"] == "onnx:fp32"
    assert model["test_split"] == {"n": len(_test_images(synth_root, "*")), "error": None}
    assert client.get("/docs").status_code == 200
    paths = set(client.get("/openapi.json").json()["paths"])
    assert {"/api/predict", "/api/predict/batch", "/api/runs/{run_id}", "/api/models/{model_id}/threshold"} <= paths

    predictor = Predictor(served["bundle"])  # the runtime in this process: the API must answer the same
    for path in (_defect(synth_root), _test_images(synth_root, "good")[0]):
        reply = _predict(client, path.name, path.read_bytes())
        assert reply.status_code == 200, reply.text
        body, expected = reply.json(), predictor.predict(predictor.check(read_raw(path))[0])
        assert body["verdict"] == expected.verdict and body["raw_score"] == pytest.approx(expected.raw_score, rel=1e-5)
        assert [r["box"] for r in body["regions"]] == [list(r.box) for r in expected.regions]
        heat = cv2.imdecode(np.frombuffer(base64.b64decode(body["heatmap"]["png_base64"]), np.uint8),
                            cv2.IMREAD_UNCHANGED)
        assert heat.shape == (*expected.anomaly_map.shape, 4)
        assert body["heatmap"]["box"] == [0, 0, body["frame"]["width"], body["frame"]["height"]]

    scores = client.get(f"/api/models/{model['id']}/test-scores").json()
    assert len(scores["scores"]) == len(scores["labels"]) == model["test_split"]["n"] and scores["rule"] == ">"
    assert sum(scores["labels"]) == len(_test_images(synth_root, "*")) - len(_test_images(synth_root, "good"))


def test_bad_uploads_are_4xx_json_naming_the_problem(served: dict, synth_root: Path) -> None:
    client = served["client"]
    png = _defect(synth_root).read_bytes()
    big = b"\x89PNG\r\n\x1a\n" + bytes(21 * 1024 * 1024)
    cases = {"empty.png": (b"", 400, "empty"), "notes.txt": (b"just some text\n", 415, "not an image"),
             "cut.png": (png[: len(png) // 3], 400, "corrupt or truncated"), "big.png": (big, 413, "over the limit")}
    for name, (data, code, words) in cases.items():
        reply = _predict(client, name, data)
        assert reply.status_code == code and words in reply.json()["error"], (name, reply.status_code, reply.text)

    def chunks() -> Iterator[bytes]:  # no Content-Length: the body is counted as it arrives
        yield b"--x\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n\r\n"
        for _ in range(22):
            yield bytes(1024 * 1024)

    reply = client.post("/api/predict", content=chunks(), headers={"content-type": "multipart/form-data; boundary=x"})
    assert reply.status_code == 413 and "request body over the limit" in reply.json()["error"]
    reply = client.post("/api/predict", data={"model": "x"})
    assert reply.status_code == 422 and "image" in reply.json()["error"]
    reply = _predict(client, "a.png", png, model="no-such-model")
    assert reply.status_code == 404 and "no-such-model" in reply.json()["error"]
    huge = png[:16] + (100_000).to_bytes(4, "big") + (100_000).to_bytes(4, "big") + png[24:]  # IHDR: 10^10 pixels
    reply = _predict(client, "huge.png", huge)
    assert reply.status_code == 413 and "pixels" in reply.json()["error"]
    tiny = cv2.imencode(".png", np.zeros((8, 8, 3), np.uint8))[1].tobytes()  # refused by the frame checks
    reply = _predict(client, "tiny.png", tiny)
    assert reply.status_code == 422 and "8x8" in reply.json()["error"]


def test_batch_of_images_and_zip(served: dict, synth_root: Path) -> None:
    client = served["client"]
    defect, good = _defect(synth_root), _test_images(synth_root, "good")[0]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("parts/defect.png", defect.read_bytes())
        zf.writestr("parts/good.png", good.read_bytes())
        zf.writestr("readme.txt", "not an image")
    files = [("images", ("d.png", defect.read_bytes(), "image/png")), ("images", ("set.zip", buf.getvalue(), "x"))]
    reply = client.post("/api/predict/batch", files=files)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    names = [r["image"] for r in body["results"]]
    assert names == ["d.png", "set.zip/parts/defect.png", "set.zip/parts/good.png", "set.zip/readme.txt"]
    assert body["results"][0]["verdict"] == body["results"][1]["verdict"] == "NOK"
    assert body["results"][3]["verdict"] == "ERROR" and "not an image" in body["results"][3]["error"]
    assert sum(body["counts"].values()) == 4 and "heatmap" not in body["results"][0]
    reply = client.post("/api/predict/batch", files=[("images", ("bad.zip", b"PK\x03\x04garbage", "x"))])
    assert reply.status_code == 400 and "not a readable zip" in reply.json()["error"]


def _zip(members: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _batch(client: httpx.Client, uploads: dict[str, bytes]) -> httpx.Response:
    return client.post("/api/predict/batch", files=[("images", (n, d, "x")) for n, d in uploads.items()])


def test_batch_limits_counted_over_all_uploads_before_a_zip_is_read(served: dict) -> None:
    """Images and bytes are counted from the zips' directories, uncompressed, over every upload of the request:
    zips small enough to pass the request size limit that would each pass alone are refused together."""
    client = served["client"]
    thirty = _zip({f"{i}.png": b"x" for i in range(30)})
    reply = _batch(client, {"a.zip": thirty, "b.zip": thirty, **{f"{i}.png": b"x" for i in range(5)}})
    assert reply.status_code == 413 and "65 images" in reply.json()["error"]
    eight_mb = bytes(8 * 1024 * 1024)  # a few kB compressed
    seven, six = _zip({f"{i}.png": eight_mb for i in range(7)}), _zip({f"{i}.png": eight_mb for i in range(6)})
    assert len(seven) + len(six) < 1024 * 1024
    reply = _batch(client, {"seven.zip": seven, "six.zip": six})
    assert reply.status_code == 413 and f"{13 * len(eight_mb)} bytes" in reply.json()["error"]
    reply = _batch(client, {"one.zip": _zip({"big.png": bytes(21 * 1024 * 1024)})})
    assert reply.status_code == 413 and "one.zip: big.png" in reply.json()["error"]


def _damaged(data: bytes, *, garble_at: int | None = None, flags: int = 0, method: int | None = None) -> bytes:
    """A one-member zip of :func:`_zip` with its member's data garbled from byte ``garble_at`` on, or its
    general purpose ``flags`` (1: encrypted) or compression ``method`` set in both of its headers."""
    data, central = bytearray(data), data.rindex(b"PK\x01\x02")
    if garble_at is not None:
        start = 30 + int.from_bytes(data[26:28], "little") + garble_at  # after the local header and the name
        data[start:start + 16] = b"\xff" * 16
    for at in (6, central + 8):  # the flags; the method follows them
        data[at] |= flags
        if method is not None:
            data[at + 2:at + 4] = method.to_bytes(2, "little")
    return bytes(data)


def test_damaged_zips_are_400_naming_the_upload(served: dict, synth_root: Path) -> None:
    png = _defect(synth_root).read_bytes()
    stored = _zip({"a.png": png}, zipfile.ZIP_STORED)
    cases = {"encrypted.zip": _damaged(stored, flags=1), "method.zip": _damaged(stored, method=77),
             "crc.zip": _damaged(stored, garble_at=100),
             "deflate.zip": _damaged(_zip({"a.png": png}), garble_at=0),
             "bzip2.zip": _damaged(_zip({"a.png": png}, zipfile.ZIP_BZIP2), garble_at=0),
             "lzma.zip": _damaged(_zip({"a.png": png}, zipfile.ZIP_LZMA), garble_at=9)}  # after its own header
    for name, data in cases.items():
        reply = _batch(served["client"], {name: data})
        assert reply.status_code == 400 and f"{name}/a.png: cannot be read" in reply.json()["error"], reply.text


def test_threshold_override_then_saved_to_the_bundle(served: dict, synth_root: Path) -> None:
    client, bundle = served["client"], served["bundle"]
    model_id = client.get("/api/status").json()["models"][0]["id"]
    defect = _defect(synth_root)
    first = _predict(client, defect.name, defect.read_bytes()).json()
    assert first["verdict"] == "NOK"
    raised = first["raw_score"] * 1.5
    reply = client.put(f"/api/models/{model_id}/threshold", json={"threshold": raised})
    assert reply.status_code == 200 and reply.json()["override"] and reply.json()["recorded"]
    assert _predict(client, defect.name, defect.read_bytes()).json()["verdict"] == "OK"
    assert Bundle.open(bundle).decision["threshold"] != raised  # a session override leaves the bundle alone

    reply = client.put(f"/api/models/{model_id}/threshold", json={"threshold": None})
    assert reply.json()["threshold"] == reply.json()["bundle_threshold"] and not reply.json()["override"]
    assert _predict(client, defect.name, defect.read_bytes()).json()["verdict"] == "NOK"
    bad = client.put(f"/api/models/{model_id}/threshold", json={"threshold": "high"})
    assert bad.status_code == 422 and "threshold" in bad.json()["error"]

    reply = client.put(f"/api/models/{model_id}/threshold", json={"threshold": raised, "save": True})
    assert reply.status_code == 200 and reply.json()["bundle_threshold"] == raised
    saved = Bundle.open(bundle)  # still verifies; the runtime loading it from disk applies the new decision
    assert saved.decision["threshold"] == raised and saved.decision["set_by"] == "inspector"
    assert Predictor(bundle).predict(read_image(defect)).verdict == "OK"
    with Registry.open(served["tmp"] / "registry.sqlite") as registry:
        events = registry.list_events(kind="threshold")
    assert events and events[0]["threshold"] == raised and events[0]["saved"] is True


def test_a_refused_save_leaves_the_threshold_as_it_was(patchcore_bundle: Path, synth_root: Path,
                                                      tmp_path: Path) -> None:
    bundle, defect = copy_bundle(patchcore_bundle, tmp_path), _defect(synth_root)
    with serving(create_app([bundle])) as url, httpx.Client(base_url=url, timeout=120) as client:
        (model,) = client.get("/api/status").json()["models"]
        raised = _predict(client, defect.name, defect.read_bytes()).json()["raw_score"] * 1.5

        def save_and_check(status: int, words: str) -> None:
            reply = client.put(f"/api/models/{model['id']}/threshold", json={"threshold": raised, "save": True})
            assert reply.status_code == status and words in reply.json()["error"], reply.text
            (now,) = client.get("/api/status").json()["models"]
            assert now["threshold"] == now["bundle_threshold"] == model["threshold"] and not now["override"]
            assert _predict(client, defect.name, defect.read_bytes()).json()["verdict"] == "NOK"

        bundle.rename(tmp_path / "moved")
        save_and_check(422, "not found")
        (tmp_path / "moved").rename(bundle)
        manifest = json.loads((bundle / "manifest.json").read_text())
        (bundle / "manifest.json").write_text(json.dumps({**manifest, "bundle_id": "retrained"}))
        save_and_check(409, "load it again")
    assert json.loads((bundle / "manifest.json").read_text())["decision"] == manifest["decision"]


def test_runs_from_the_registry(served: dict, tmp_path: Path) -> None:
    client = served["client"]
    runs = client.get("/api/runs").json()["runs"]
    assert [r["id"] for r in runs] == [served["run_id"]] and runs[0]["metrics"]["image_auroc"] == RUN_IMAGE_AUROC
    assert client.get("/api/runs", params={"family": "padim"}).json()["runs"] == []
    assert client.get(f"/api/runs/{served['run_id']}").json()["command"] == "train"
    missing = client.get("/api/runs/nope")
    assert missing.status_code == 404 and "nope" in missing.json()["error"]
    with serving(create_app(registry=tmp_path)) as url:  # a directory is no database
        reply = httpx.get(f"{url}/api/runs")
    assert reply.status_code == 503 and "cannot open the run registry" in reply.json()["error"]


def _raw_get(url: str, path: str) -> tuple[int, dict]:
    """GET ``path`` exactly as written (no client-side clean-up of ``..`` or percent escapes); status, JSON body."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        conn.request("GET", path)
        reply = conn.getresponse()
        return reply.status, json.loads(reply.read())
    finally:
        conn.close()


def test_report_files_of_a_run(evaluated_run: dict, tmp_path: Path) -> None:
    """The plots `evaluate --report` wrote, served by name from the run's report folder; nothing else."""
    report, run_id = evaluated_run["report"], evaluated_run["run_id"]
    registry = copy_registry(evaluated_run["registry"], tmp_path)
    (tmp_path / "secret.png").write_bytes(b"\x89PNG\r\n\x1a\n not for the API")  # beside the report folders
    linked = tmp_path / "linked"
    shutil.copytree(report, linked)
    (linked / "evil.png").symlink_to(tmp_path / "secret.png")
    with Registry.open(registry) as reg:
        no_report = seed_registry(registry)
        copied, gone = reg.start_run("evaluate", argv=["x"]), reg.start_run("evaluate", argv=["y"])
        reg.finish_run(copied, report_dir=str(linked))
        reg.finish_run(gone, report_dir=str(tmp_path / "deleted"))
    with serving(create_app(registry=registry)) as url, httpx.Client(base_url=url, timeout=60) as client:
        listing = client.get(f"/api/runs/{run_id}/report").json()
        expected = sorted(p.name for p in report.iterdir() if p.suffix in (".png", ".html"))
        assert [f["name"] for f in listing["files"]] == expected and "report.html" in expected
        assert listing["report_dir"] == str(report.resolve())
        assert listing["html"] == f"/api/runs/{run_id}/report/report.html"
        for entry in listing["files"]:
            reply = client.get(entry["url"])
            assert reply.status_code == 200 and reply.content == (report / entry["name"]).read_bytes()
            assert entry["bytes"] == len(reply.content)
            kind = "text/html" if entry["name"].endswith(".html") else "image/png"
            assert reply.headers["content-type"].startswith(kind)
            assert "default-src 'none'" in reply.headers["content-security-policy"]
        assert client.get(f"/api/runs/{run_id[:-3]}/report").json()["run"] == run_id  # an id prefix works too

        prefix = f"/api/runs/{run_id}/report/"
        for attempt in ("metrics.json", "..", "%2E%2E", "..%2F..%2Fsecret.png", "%2E%2E%2F%2E%2E%2Fsecret.png",
                        "..%5C..%5Csecret.png", "%2Fetc%2Fpasswd", "roc.png%00", "../../secret.png",
                        f"..%2F..%2F{registry.name}"):
            status, body = _raw_get(url, prefix + attempt)
            assert status == 404 and body["error"], (attempt, status, body)
        assert [f["name"] for f in client.get(f"/api/runs/{copied}/report").json()["files"]] == expected  # no link
        status, body = _raw_get(url, f"/api/runs/{copied}/report/evil.png")
        assert status == 404 and "evil.png" in body["error"] and "secret" not in json.dumps(body)
        for run, words in ((no_report, "has no report"), (gone, "is gone"), ("no-such-run", "no run")):
            reply = client.get(f"/api/runs/{run}/report")
            assert reply.status_code == 404 and words in reply.json()["error"], reply.text
            assert client.get(f"/api/runs/{run}/report/roc.png").status_code == 404
    with serving(create_app(registry=registry, token="s3cret")) as url:  # <img> and links carry it in the query
        file_url, listing_url = f"{url}/api/runs/{run_id}/report/roc.png", f"{url}/api/runs/{run_id}/report"
        assert httpx.get(file_url).status_code == 401
        assert httpx.get(file_url, params={"access_token": "s3cret"}).content == (report / "roc.png").read_bytes()
        assert httpx.get(listing_url, params={"access_token": "s3cret"}).status_code == 401  # the API: the header
        assert httpx.get(listing_url, headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_a_killed_run_is_failed_over_the_api(tmp_path: Path) -> None:
    registry = tmp_path / "registry.sqlite"
    with running_run(registry) as (proc, run_id), serving(create_app(registry=registry)) as url:
        assert httpx.get(f"{url}/api/runs/{run_id}").json()["status"] == "running"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        runs = httpx.get(f"{url}/api/runs").json()["runs"]
        assert [(r["id"], r["status"], r["error"]) for r in runs] == [(run_id, "failed", GONE)]
        assert httpx.get(f"{url}/api/runs/{run_id}").json()["status"] == "failed"
        assert httpx.get(f"{url}/api/runs", params={"status": "running"}).json()["runs"] == []


def test_load_models_by_path(served: dict, synth_root: Path, tmp_path: Path) -> None:
    client = served["client"]
    for path in (str(tmp_path / "nothing"), f"{tmp_path}/a\x00b"):
        reply = client.post("/api/models/load", json={"path": path})
        assert reply.status_code == 422 and "not found" in reply.json()["error"], reply.text
    tampered = copy_bundle(served["bundle"], tmp_path)
    (tampered / "engines" / "model_fp32.onnx").write_bytes(b"not the engine")
    reply = client.post("/api/models/load", json={"path": str(tampered)})
    assert reply.status_code == 422 and "sha256" in reply.json()["error"]
    second = client.post("/api/models/load", json={"path": str(served["bundle"])}).json()
    models = [m["id"] for m in client.get("/api/status").json()["models"]]
    assert second["id"] == f"{models[0]}-2" and models == [models[0], second["id"]]
    defect = _defect(synth_root)
    assert _predict(client, defect.name, defect.read_bytes(), model=second["id"]).json()["model"] == second["id"]


def test_cli_token_and_bind(patchcore_bundle: Path) -> None:
    cmd = [sys.executable, "-m", "edgeinspect", "inspector", "--bundle", str(patchcore_bundle)]
    for args, code, words in ((["--host", "0.0.0.0"], 1, "--token"), (["--token", ""], 2, "--token: is empty"),
                              (["--daemon", "foo"], 1, "--daemon foo: cannot connect")):
        refused = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=120)
        assert refused.returncode == code and words in refused.stderr, refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1  # one line, no traceback
    port = free_port()
    proc = subprocess.Popen([*cmd, "--port", str(port), "--token", "s3cret"], stderr=subprocess.PIPE, text=True)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
        while True:
            try:
                reply = httpx.get(f"{url}/api/status")
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
                time.sleep(0.3)
        assert reply.status_code == 401 and "token" in reply.json()["error"]
        assert httpx.get(f"{url}/api/status", headers={"Authorization": "Bearer wrong"}).status_code == 401
        ok = httpx.get(f"{url}/api/status", headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and ok.json()["auth"] is True
        assert httpx.get(f"{url}/api/status", headers={"Authorization": "bearer s3cret"}).status_code == 200
        assert httpx.get(f"{url}/").status_code == 200  # the page itself; it asks for the token
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_inspector_never_imports_torch(patchcore_bundle: Path, synth_root: Path) -> None:
    code = f"""
import json, sys
sys.modules["torch"] = None  # any import of torch fails loudly
from edgeinspect.inspector.app import create_app
app = create_app([{str(patchcore_bundle)!r}])
model = app.state.inspector.model(None)
result = model.predict("x.png", open({str(_defect(synth_root))!r}, "rb").read())
print(json.dumps({{"verdict": result["verdict"], "n": len(model.test["scores"]),
                  "torch": [m for m, v in sys.modules.items() if m.split(".")[0] in ("torch", "torchvision")
                            and v is not None]}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result == {"verdict": "NOK", "n": len(_test_images(synth_root, "*")), "torch": []}


def test_detector_bundle_regions_without_heatmap(detector_bundle: Path, detector_coco: Path) -> None:
    image = sorted((detector_coco / "val" / "images").iterdir())[0]
    with serving(create_app([detector_bundle])) as url, httpx.Client(base_url=url, timeout=120) as client:
        (model,) = client.get("/api/status").json()["models"]
        assert model["task"] == "detections" and model["rule"] == ">="
        body = _predict(client, image.name, image.read_bytes()).json()
        expected = Predictor(detector_bundle).predict(read_image(image))
        assert body["heatmap"] is None and body["verdict"] == expected.verdict
        assert [(r["label"], r["box"]) for r in body["regions"]] == [(r.label, list(r.box)) for r in expected.regions]
        assert client.put(f"/api/models/{model['id']}/threshold", json={"threshold": 1.01}).status_code == 200
        body = _predict(client, image.name, image.read_bytes()).json()
        assert body["verdict"] == "OK" and body["regions"] == [] and body["raw_threshold"] == 1.01


def _confusion(nok: list[bool], labels: list[bool]) -> dict[str, int]:
    return {"tp": sum(n and d for n, d in zip(nok, labels, strict=True)),
            "fp": sum(n and not d for n, d in zip(nok, labels, strict=True)),
            "fn": sum(d and not n for n, d in zip(nok, labels, strict=True)),
            "tn": sum(not (n or d) for n, d in zip(nok, labels, strict=True))}


def test_detector_test_split_scores_for_the_slider(detector_bundle: Path, detector_coco: Path) -> None:
    """A detector's test split (its COCO folder's `test`, drawn by `data coco`): the runtime's top defect
    confidence per image, labels from the annotations (a defect class, not the ok class `good`), and precision /
    recall at any threshold by the bundle's rule (>=) as the server's own verdicts give them."""
    from edgeinspect.train.data.coco import CocoSplit

    split = CocoSplit(detector_coco, "test")  # pycocotools' reading of the annotations, for the expected labels
    good = split.classes.index("good") + 1
    labels = [any(a["category_id"] != good for a in split.coco.imgToAnns[i]) for i in split.image_ids]
    paths = [split.path_of(i) for i in range(len(split))]
    assert 0 < sum(labels) < len(labels)
    with serving(create_app([detector_bundle])) as url, httpx.Client(base_url=url, timeout=120) as client:
        (model,) = client.get("/api/status").json()["models"]
        assert model["test_split"] == {"n": len(paths), "error": None}
        test = client.get(f"/api/models/{model['id']}/test-scores").json()
        assert test["rule"] == ">=" and test["labels"] == labels and test["description"] == "COCO test"
        assert test["names"] == [f"test/images/{p.name}" for p in paths]
        predictor = Predictor(detector_bundle)
        expected = [predictor.predict(read_image(p)).raw_score for p in paths]
        assert test["scores"] == pytest.approx(expected, abs=1e-6)

        scores = sorted(set(test["scores"]))  # thresholds between neighbouring scores, and the bundle's own
        thresholds = [model["threshold"], *((a + b) / 2 for a, b in zip(scores, scores[1:], strict=False))]
        files = [("images", (p.name, p.read_bytes(), "image/png")) for p in paths]
        seen = set()
        for threshold in thresholds:
            reply = client.put(f"/api/models/{model['id']}/threshold", json={"threshold": threshold})
            assert reply.status_code == 200, reply.text
            verdicts = [r["verdict"] for r in client.post("/api/predict/batch", files=files).json()["results"]]
            slider = _confusion([s >= threshold for s in test["scores"]], labels)  # what the dashboard computes
            assert slider == _confusion([v == "NOK" for v in verdicts], labels)
            seen.add(tuple(slider.values()))
        assert len(seen) > 2  # the thresholds moved precision and recall
def test_live_verdicts_of_a_daemon_as_server_sent_events(tmp_path: Path) -> None:
    from conftest import free_tcp_endpoint

    from edgeinspect.runtime.publisher import VerdictPublisher

    endpoint = free_tcp_endpoint()
    with VerdictPublisher(endpoint, "line1", "cam1") as publisher:
        app = create_app(daemon=endpoint, registry=tmp_path / "r.sqlite")
        try:
            assert publisher.wait_for_subscribers(1, timeout_s=30) >= 1
            with serving(app) as url, httpx.Client(base_url=url, timeout=60) as client:
                assert client.get("/api/status").json()["daemon"] == endpoint
                events: list[tuple[str, dict]] = []
                with client.stream("GET", "/api/stream") as stream:
                    assert stream.headers["content-type"].startswith("text/event-stream")
                    lines = stream.iter_lines()
                    for line in lines:
                        if line.startswith("event: "):
                            kind = line.removeprefix("event: ")
                            events.append((kind, json.loads(next(lines).removeprefix("data: "))))
                            if kind == "hello":
                                for verdict in ("OK", "NOK", "OK"):
                                    publisher.publish_verdict({"verdict": verdict, "score": 0.7, "regions": []})
                                publisher.publish_status({"state": "running"})
                        if len(events) == 5:
                            break
                assert [k for k, _ in events] == ["hello", "verdict", "verdict", "verdict", "status"]
                assert [e["seq"] for _, e in events[1:4]] == [0, 1, 2] and events[2][1]["verdict"] == "NOK"
                summary = client.get("/api/daemon").json()
                assert summary["received"] == 4 and [v["seq"] for v in summary["last_nok"]] == [1]
                assert summary["status"]["state"] == "running"
        finally:
            app.state.inspector.daemon.close()
    with serving(create_app()) as url:
        reply = httpx.get(f"{url}/api/stream")
    assert reply.status_code == 404 and "--daemon" in reply.json()["error"]


@pytest.mark.slow
def test_inspector_extra_in_a_fresh_venv(patchcore_bundle: Path, synth_root: Path, tmp_path: Path) -> None:
    """`pip install '.[inspector]'` alone (no torch) serves the API and the dashboard."""
    repo, venv = Path(__file__).resolve().parents[1], tmp_path / "inspector-venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--no-cache-dir", f"{repo}[inspector]"], check=True,
                   timeout=900)
    assert subprocess.run([str(venv / "bin" / "python"), "-c", "import torch"], capture_output=True).returncode
    port = free_port()
    proc = subprocess.Popen([str(venv / "bin" / "edgeinspect"), "inspector", "--bundle", str(patchcore_bundle),
                             "--port", str(port)], cwd=tmp_path)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
        while True:
            try:
                status = httpx.get(f"{url}/api/status").json()
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.3)
        assert status["models"][0]["test_split"]["error"] is None
        defect = _defect(synth_root)
        reply = httpx.post(f"{url}/api/predict", files={"image": (defect.name, defect.read_bytes())}, timeout=60)
        assert reply.status_code == 200 and reply.json()["verdict"] == "NOK"
        assert "app.js" in httpx.get(f"{url}/").text and httpx.get(f"{url}/static/app.js").status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)
