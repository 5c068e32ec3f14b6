"""What the inspector's API and browser tests share: a real uvicorn server on a free loopback port in a background
thread, copies of session bundles and registries, a registry with one run in it."""

from __future__ import annotations

import shutil
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import uvicorn

from edgeinspect.registry import Registry

RUN_IMAGE_AUROC = 0.9375  # the image AUROC of the run seed_registry records


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
def copy_registry(source: Path, into: Path) -> Path:
    """A copy of a session's registry database the test may add runs to (SQLite's backup: complete, WAL included)."""
    out = into / source.name
    with sqlite3.connect(source) as src, sqlite3.connect(out) as dst:
        src.backup(dst)
    src.close()
    dst.close()
    return out


def seed_registry(path: Path) -> str:
    """Record one finished training run; its id."""
    with Registry.open(path) as reg:
        run_id = reg.start_run("train", argv=["edgeinspect", "train", "patchcore"], family="patchcore",
                               category="washer")
        reg.finish_run(run_id, metrics={"image_auroc": RUN_IMAGE_AUROC, "pixel_auroc": 0.95})
    return run_id
