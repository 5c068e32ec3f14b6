"""What the inspector's API and browser tests share: a real uvicorn server on a free loopback port in a background
thread, and a run registry with one run in it (the real ``edgeinspect.registry`` when this installation has it, else
a minimal in-memory stand-in of its interface, installed only for these tests)."""

from __future__ import annotations

import itertools
import shutil
import socket
import sys
import threading
import time
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import uvicorn


def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(app: Any) -> Iterator[str]:
    """Serve ``app`` with uvicorn on 127.0.0.1 in a background thread; yields its base URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning",
                                          timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def copy_bundle(bundle: Path, into: Path) -> Path:
    """A copy of a session bundle the test may change (saved thresholds)."""
    out = into / bundle.name
    shutil.copytree(bundle, out)
    return out


# ------------------------------------------------------------------------------ the run registry
class _StandInRegistry:
    """The REGISTRY.md interface kept in memory per path (only where edgeinspect.registry does not exist yet)."""

    _stores: dict[str, dict[str, list | dict]] = {}
    _ids = itertools.count(1)

    def __init__(self, path: Path):
        self.path = path
        self._store = self._stores.setdefault(str(path), {"runs": {}, "events": []})

    @classmethod
    def open(cls, path: str | Path | None = None) -> _StandInRegistry:
        path = Path(path or "default")
        if path.is_dir():
            raise OSError(f"{path} is a directory")
        return cls(path)

    def start_run(self, command: str, *, argv: list[str], **fields: Any) -> str:
        run_id = f"run{next(self._ids)}"
        self._store["runs"][run_id] = {"id": run_id, "command": command, "argv": argv, "status": "running", **fields}
        return run_id

    def finish_run(self, run_id: str, *, status: str = "finished", **fields: Any) -> None:
        self._store["runs"][run_id].update(status=status, **fields)

    def record_event(self, kind: str, **fields: Any) -> str:
        self._store["events"].append({"kind": kind, **fields})
        return str(len(self._store["events"]))

    def list_events(self, *, kind: str | None = None, **_: Any) -> list[dict]:
        return [e for e in self._store["events"] if kind in (None, e["kind"])][::-1]

    def list_runs(self, *, family: str | None = None, category: str | None = None, command: str | None = None,
                  limit: int = 50) -> list[dict]:
        runs = [r for r in self._store["runs"].values() if family in (None, r.get("family"))
                and category in (None, r.get("category")) and command in (None, r["command"])]
        return runs[::-1][:limit]

    def get_run(self, run_id: str) -> dict | None:
        return self._store["runs"].get(run_id)

    def close(self) -> None:
        pass


@contextmanager
def registry_module() -> Iterator[Any]:
    """``edgeinspect.registry`` (the stand-in, for the duration, where the real module is missing)."""
    try:
        from edgeinspect import registry

        yield registry
        return
    except ImportError:
        pass
    module = types.ModuleType("edgeinspect.registry")
    module.Registry = _StandInRegistry
    sys.modules["edgeinspect.registry"] = module
    try:
        yield module
    finally:
        sys.modules.pop("edgeinspect.registry", None)


def seed_registry(registry: Any, path: Path) -> str:
    """Record one finished training run; its id."""
    reg = registry.Registry.open(path)
    try:
        run_id = reg.start_run("train", argv=["edgeinspect", "train", "patchcore"], family="patchcore",
                               category="washer")
        reg.finish_run(run_id, metrics={"image_auroc": 0.9375, "pixel_auroc": 0.95})
    finally:
        reg.close()
    return run_id
