"""The inspector's REST API (FastAPI) and the dashboard it serves (static files, no build step).

Every error is JSON ``{"error": "..."}`` with a 4xx status naming the problem (a corrupt upload is never a 500).
With a token every ``/api`` request needs ``Authorization: Bearer TOKEN``; the dashboard asks for it once.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import platform
import re
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qs, quote

from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from edgeinspect import __version__
from edgeinspect.errors import EdgeInspectError
from edgeinspect.inspector.models import (
    MAX_BATCH_BYTES,
    MAX_BATCH_IMAGES,
    MAX_IMAGE_BYTES,
    MAX_PIXELS,
    Model,
    UploadError,
    batch_images,
)
from edgeinspect.registry import Registry

log = logging.getLogger(__name__)
STATIC = Path(__file__).with_name("static")
FORM_OVERHEAD = 64 * 1024  # multipart boundaries and the other fields of a one-image request
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
# what browsers open without headers (an EventSource, <img> and links to report files) may carry the token as
# ?access_token=TOKEN
QUERY_TOKEN_PATHS = re.compile(r"/api/stream|/api/runs/[^/]+/report/[^/]+")
REPORT_TYPES = {".png": "image/png", ".html": "text/html; charset=utf-8"}  # the report files served
# a report page may show its embedded images and use its own style, nothing else (no script, no requests)
REPORT_HEADERS = {"Content-Security-Policy": "default-src 'none'; img-src data: 'self'; style-src 'unsafe-inline'",
                  "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}


def check_bind(host: str, token: str | None) -> None:
    """Refuse to listen beyond this machine without a token (EdgeInspectError naming the fix)."""
    if not token and host not in LOCAL_HOSTS and not host.startswith("127."):
        raise EdgeInspectError(f"--host {host} is reachable from other machines: give --token (every /api request "
                               f"then needs 'Authorization: Bearer TOKEN'), or bind 127.0.0.1")


class _TooLarge(HTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"request body over the limit of {limit} bytes (one image: {MAX_IMAGE_BYTES} bytes, "
                              f"a batch: {MAX_BATCH_BYTES} bytes)")


class _Guard:
    """ASGI middleware: the bearer token on /api, and the request body size limit (Content-Length checked before
    anything is read; a body without one is counted as it arrives)."""

    def __init__(self, app: Any, token: str | None):
        self.app, self.token = app, token

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path: str = scope["path"]
        headers = dict(scope["headers"])
        if self.token and path.startswith("/api"):
            scheme, _, given = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
            if not scheme and QUERY_TOKEN_PATHS.fullmatch(path):
                query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
                scheme, given = "bearer", query.get("access_token", [""])[0]
            # the scheme is case-insensitive (RFC 7235), the token is not
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token.encode()):
                return await _json(send, 401, "missing or wrong token: send 'Authorization: Bearer TOKEN'",
                                   [(b"www-authenticate", b"Bearer")])
        limit = MAX_BATCH_BYTES if path.endswith("/batch") else MAX_IMAGE_BYTES + FORM_OVERHEAD
        length = headers.get(b"content-length", b"").decode("latin-1")
        if length.isdigit() and int(length) > limit:
            return await _json(send, 413, str(_TooLarge(limit).detail))
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                raise _TooLarge(limit)
            return message

        await self.app(scope, counted, send)


async def _json(send: Any, status: int, error: str, extra: list | None = None) -> None:
    body = json.dumps({"error": error}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(extra or [])]})
    await send({"type": "http.response.body", "body": body})


def report_files(folder: Path) -> dict[str, Path]:
    """The PNG and HTML files of a report folder by name, sorted: plain files only (no folders, links or hidden
    files); OSError when the folder is gone."""
    entries = sorted(os.scandir(folder), key=lambda e: e.name)
    return {e.name: Path(e.path) for e in entries if e.is_file(follow_symlinks=False) and not e.name.startswith(".")
            and Path(e.name).suffix.lower() in REPORT_TYPES}


class LoadRequest(BaseModel):
    """``POST /api/models/load``."""

    path: str = Field(description="Bundle directory on the server (opened and every file's sha256 verified).")
    engine: str = Field("auto", description="Engine selector: auto, onnx, onnx:int8, ...")


class ThresholdRequest(BaseModel):
    """``PUT /api/models/{id}/threshold``."""

    threshold: float | None = Field(description="Decision threshold in model units (like raw_threshold); "
                                                "null: back to the bundle's.", allow_inf_nan=False)
    save: bool = Field(False, description="Write it into the bundle as its new decision (else: this session only).")


class Inspector:
    """The loaded models and where runs are read from."""

    def __init__(self, registry: str | Path | None, engine: str, convert_frames: bool, daemon: str | None = None):
        self.registry_path = registry
        self.daemon = None
        if daemon:
            from edgeinspect.inspector.stream import DaemonStream

            self.daemon = DaemonStream(daemon)
        self.engine, self.convert_frames = engine, convert_frames
        self.models: dict[str, Model] = {}
        self._lock = threading.Lock()

    def load(self, path: str | Path, engine: str | None = None) -> Model:
        """Open, verify and load a bundle (engine, test-split scores); its id is the bundle id (+ -2, -3 ...)."""
        from edgeinspect.bundle import Bundle

        bundle_id = Bundle.open(path).bundle_id
        with self._lock:
            model_id = next(i for n in range(1, len(self.models) + 2)
                            if (i := bundle_id if n == 1 else f"{bundle_id}-{n}") not in self.models)
            self.models[model_id] = None  # reserved while it loads
        try:
            model = Model(model_id, path, engine=engine or self.engine, convert_frames=self.convert_frames)
        except BaseException:
            del self.models[model_id]
            raise
        self.models[model_id] = model
        return model

    def model(self, model_id: str | None) -> Model:
        """A loaded model by id, or the first one."""
        loaded = {k: m for k, m in list(self.models.items()) if m is not None}  # a snapshot: loads may add
        if not loaded:
            raise HTTPException(409, "no model loaded: POST /api/models/load with a bundle path first")
        if model_id is None:
            return next(iter(loaded.values()))
        if model_id not in loaded:
            raise HTTPException(404, f"no model {model_id!r} (loaded: {', '.join(loaded)})")
        return loaded[model_id]

    def registry(self) -> Registry:
        """The run registry, opened; 503 when it cannot be opened."""
        try:
            return Registry.open(self.registry_path)
        except Exception as exc:  # noqa: BLE001  (any failure to open it is reported, never a 500)
            raise HTTPException(503, f"cannot open the run registry at {self.registry_path or 'its default path'}: "
                                     f"{' '.join(str(exc).split())}") from None

    def run(self, run_id: str) -> dict[str, Any]:
        """A run of the registry by id (or unique prefix); 404 when there is none."""
        registry = self.registry()
        try:
            found = registry.get_run(run_id)
        except Exception as exc:  # noqa: BLE001  (an ambiguous prefix, a registry error: named, never a 500)
            raise HTTPException(400, " ".join(str(exc).split())) from None
        finally:
            registry.close()
        if found is None:
            raise HTTPException(404, f"no run {run_id!r} in the registry")
        return found

    def report(self, run_id: str) -> tuple[dict[str, Any], dict[str, Path]]:
        """A run and the files of its report folder (:func:`report_files`); 404 when it has no report or the
        folder is gone."""
        found = self.run(run_id)
        if not found.get("report_dir"):
            raise HTTPException(404, f"run {found['id']} has no report (evaluate --report DIR writes one)")
        try:
            return found, report_files(Path(found["report_dir"]))
        except OSError as exc:
            raise HTTPException(404, f"the report folder of run {found['id']} is gone: {found['report_dir']} "
                                     f"({exc.strerror or exc})") from None

    def record(self, kind: str, **fields: Any) -> bool:
        """Record an event in the registry; False (with a warning) when it cannot."""
        try:
            registry = self.registry()
            try:
                registry.record_event(kind, **fields)
            finally:
                registry.close()
        except Exception as exc:  # noqa: BLE001  (a registry problem never breaks the request)
            log.warning("not recorded in the run registry: %s", getattr(exc, "detail", exc))
            return False
        return True


def _judge_all(model: Model, files: list[tuple[str, bytes]]) -> list[dict[str, Any]]:
    """Verdicts of a batch (without heatmaps); an image that cannot be judged gets ``ERROR`` and the reason."""
    results = []
    for name, data in files:
        try:
            result = model.predict(name, data)
            result.pop("heatmap")  # a batch answers verdicts; /api/predict gives one image's heatmap
        except EdgeInspectError as exc:
            result = {"image": name, "verdict": "ERROR", "error": " ".join(str(exc).split())}
        results.append(result)
    return results


def create_app(bundles: Sequence[str | Path] = (), *, registry: str | Path | None = None, token: str | None = None,
               engine: str = "auto", convert_frames: bool = False, daemon: str | None = None) -> FastAPI:
    """The inspector application with ``bundles`` loaded (each verified); with ``daemon`` (a ``serve --publish``
    endpoint) its live verdicts are streamed to the dashboard."""
    state = Inspector(registry, engine, convert_frames, daemon)
    for path in bundles:
        state.load(path)
    app = FastAPI(title="edgeinspect inspector", version=__version__,
                  description="Try bundles on images, tune their threshold, browse the run registry. "
                              f"Uploads: one image up to {MAX_IMAGE_BYTES} bytes and {MAX_PIXELS} pixels (PNG, JPEG, "
                              f"BMP, TIFF); a batch up to {MAX_BATCH_IMAGES} images or a zip, {MAX_BATCH_BYTES} bytes.")
    app.state.inspector = state
    app.add_middleware(_Guard, token=token)

    @app.exception_handler(StarletteHTTPException)  # FastAPI's and the router's own (no such path: 404)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        return JSONResponse({"error": f"invalid request: {problems}"}, status_code=422)

    @app.exception_handler(UploadError)
    async def _upload_error(request: Request, exc: UploadError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    @app.exception_handler(EdgeInspectError)
    async def _refused(request: Request, exc: EdgeInspectError) -> JSONResponse:
        return JSONResponse({"error": " ".join(str(exc).split())}, status_code=422)

    @app.get("/", include_in_schema=False)
    def dashboard() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> Response:  # asked by a browser tab showing a report file: no icon, and no 404 either
        return Response(status_code=204)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/api/status", summary="Loaded models, engines, versions, limits")
    def status() -> dict[str, Any]:
        import onnxruntime

        return {"edgeinspect": __version__, "python": platform.python_version(),
                "onnxruntime": onnxruntime.__version__, "auth": bool(token),
                "models": [m.summary() for m in list(state.models.values()) if m is not None],
                "registry": str(state.registry_path) if state.registry_path else None,
                "daemon": state.daemon.endpoint if state.daemon else None,
                "limits": {"image_bytes": MAX_IMAGE_BYTES, "batch_bytes": MAX_BATCH_BYTES,
                           "batch_images": MAX_BATCH_IMAGES, "pixels": MAX_PIXELS}}

    @app.post("/api/models/load", summary="Load a bundle by its path on the server (verified)")
    def load(request: LoadRequest) -> dict[str, Any]:
        return state.load(request.path, request.engine).summary()

    @app.get("/api/models/{model_id}/test-scores", summary="Raw scores and labels of the bundle's test split")
    def test_scores(model_id: str) -> dict[str, Any]:
        model = state.model(model_id)
        return {"id": model.id, "rule": model.summary()["rule"], **model.test}

    @app.put("/api/models/{model_id}/threshold", summary="Session threshold override, or save it to the bundle")
    def threshold(model_id: str, request: ThresholdRequest) -> dict[str, Any]:
        model = state.model(model_id)
        if request.save and request.threshold is None:
            raise HTTPException(422, "save needs a threshold (null only resets the session override)")
        change = model.set_threshold(request.threshold, save=request.save)
        recorded = state.record("threshold", bundle_id=model.bundle.bundle_id, bundle_path=str(model.path),
                                engine=model.predictor.engine, **change)
        return {**model.summary(), "change": change, "recorded": recorded}

    @app.post("/api/predict", summary="Verdict, scores, regions and heatmap (base64 PNG) of one image")
    async def predict(image: Annotated[UploadFile, File(description="PNG, JPEG, BMP or TIFF")],
                      model: Annotated[str | None, Form(description="Model id (default: the first loaded)")] = None
                      ) -> dict[str, Any]:
        data = await image.read()
        return await run_in_threadpool(state.model(model).predict, image.filename or "image", data)

    @app.post("/api/predict/batch", summary="Verdicts of several images (repeat the field) or of a zip's images")
    def predict_batch(images: Annotated[list[UploadFile], File(description="Images, or zip files of images")],
                      model: Annotated[str | None, Form()] = None) -> dict[str, Any]:  # in a worker thread
        chosen = state.model(model)
        files = batch_images([(upload.filename or "image", upload.file.read()) for upload in images])
        results = _judge_all(chosen, files)
        counts = {v: sum(r["verdict"] == v for r in results) for v in ("OK", "NOK", "ERROR")}
        return {"model": chosen.id, "results": results, "counts": counts}

    def daemon_stream() -> Any:
        if state.daemon is None:
            raise HTTPException(404, "no daemon: start the inspector with --daemon tcp://HOST:PORT (serve --publish)")
        return state.daemon

    @app.get("/api/daemon", summary="The daemon's last status and last NOK verdicts")
    def daemon() -> dict[str, Any]:
        return daemon_stream().summary()

    @app.get("/api/stream", summary="The daemon's verdicts and status messages as server-sent events")
    async def stream(request: Request) -> StreamingResponse:
        source = daemon_stream()

        async def events() -> Any:
            index = source.received
            yield f"event: hello\ndata: {json.dumps(source.summary())}\n\n"
            idle = 0.0
            while not await request.is_disconnected():
                messages = source.since(index)
                for _, topic, payload in messages:
                    kind = "status" if topic.startswith("status.") else "verdict"
                    yield f"event: {kind}\ndata: {json.dumps({'topic': topic, **payload})}\n\n"
                if messages:
                    index = messages[-1][0] + 1
                idle = 0.0 if messages else idle + 0.2
                if idle >= 15:  # a comment line keeps proxies from closing a quiet stream
                    idle = 0.0
                    yield ": keep-alive\n\n"
                await asyncio.sleep(0.2)

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.get("/api/runs", summary="Runs of the registry, newest first")
    def runs(family: str | None = None, category: str | None = None, command: str | None = None,
             status: str | None = None, limit: int = 50) -> dict[str, Any]:
        registry = state.registry()
        try:
            return {"runs": registry.list_runs(family=family, category=category, command=command, status=status,
                                               limit=max(1, min(limit, 1000)))}
        finally:
            registry.close()

    @app.get("/api/runs/{run_id}", summary="One run of the registry")
    def run(run_id: str) -> dict[str, Any]:
        return state.run(run_id)

    @app.get("/api/runs/{run_id}/report", summary="The PNG and HTML files of a run's report (evaluate --report)")
    def report(run_id: str) -> dict[str, Any]:
        found, files = state.report(run_id)
        base = f"/api/runs/{found['id']}/report"
        listed = [{"name": name, "bytes": path.stat().st_size, "url": f"{base}/{quote(name)}"}
                  for name, path in files.items()]
        return {"run": found["id"], "report_dir": found["report_dir"], "files": listed,
                "html": next((f["url"] for f in listed if f["name"].endswith(".html")), None)}

    @app.get("/api/runs/{run_id}/report/{name}", summary="One file of a run's report (a plain name it lists)")
    def report_file(run_id: str, name: str) -> FileResponse:
        found, files = state.report(run_id)
        if name not in files:  # only the names the folder lists: no paths, no other files
            raise HTTPException(404, f"no report file {name!r} for run {found['id']} "
                                     f"(it has: {', '.join(files) or 'none'})")
        return FileResponse(files[name], media_type=REPORT_TYPES[files[name].suffix.lower()], headers=REPORT_HEADERS)

    return app
