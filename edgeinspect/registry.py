"""The run registry: a SQLite database that remembers every ``train``, ``evaluate``, ``export`` and ``bench`` run.

Standard library only (``sqlite3``), no torch: the runtime and the inspector import it. One row per run in
``runs`` (command line, config, data and its fingerprint, bundle, metrics, engines, duration, status, version,
git revision), free-form ``events`` (e.g. a threshold set from the inspector). The schema is versioned
(``schema_version`` table, :data:`MIGRATIONS` applied in order); the database runs in WAL mode with a busy
timeout, so several processes (two trainings at once, the inspector reading) can use it together. A run records
its process (pid, host, start time): a ``running`` run of this host whose process has ended (SIGKILL never lets
it record its end) is shown, and stored, as ``failed`` with the error :data:`GONE`.

Where it lives: ``--registry PATH`` (the CLI), else ``$EDGEINSPECT_REGISTRY``, else
``$XDG_DATA_HOME/edgeinspect/registry.sqlite`` (``~/.local/share/edgeinspect/registry.sqlite``).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import secrets
import socket
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any, TextIO

from edgeinspect import __version__
from edgeinspect.errors import EdgeInspectError
from edgeinspect.jsonready import json_ready

log = logging.getLogger(__name__)

ENV_VAR = "EDGEINSPECT_REGISTRY"
BUSY_TIMEOUT_S = 30.0
# files the dataset fingerprint covers: images and masks, and the annotation files of COCO / VOC folders
FINGERPRINT_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".json", ".xml")
STATUSES = ("running", "finished", "failed")
GONE = "process gone (killed?)"  # the error of a running run whose process no longer exists on its host
JSON_COLUMNS = ("argv", "config", "metrics", "engines")


def _enable_wal(db: sqlite3.Connection) -> bool:
    """Switch ``db`` to WAL; whether it took. SQLite answers "database is locked" at once, without waiting
    for the busy timeout, while another process is switching the same new file, so that is retried until
    ``BUSY_TIMEOUT_S``."""
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    while True:
        try:
            return db.execute("PRAGMA journal_mode = WAL").fetchone()[0].lower() == "wal"
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class RegistryError(EdgeInspectError):
    """The registry cannot be opened, migrated or written."""


def default_path() -> Path:
    """``$EDGEINSPECT_REGISTRY``, else ``$XDG_DATA_HOME/edgeinspect/registry.sqlite`` (XDG default
    ``~/.local/share``)."""
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    data_home = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(data_home) / "edgeinspect" / "registry.sqlite"


# ------------------------------------------------------------------------------------------- schema
def _v1_runs(db: sqlite3.Connection) -> None:
    """Version 1: the runs table."""
    db.execute("""CREATE TABLE runs (
        id TEXT PRIMARY KEY, command TEXT NOT NULL, argv TEXT NOT NULL, started TEXT NOT NULL, finished TEXT,
        duration_s REAL, status TEXT NOT NULL, error TEXT, family TEXT, category TEXT, data_root TEXT,
        dataset_fingerprint TEXT, config TEXT, bundle_id TEXT, bundle_path TEXT, metrics TEXT,
        edgeinspect_version TEXT, git_revision TEXT)""")


def _v2_engines_reports_events(db: sqlite3.Connection) -> None:
    """Version 2: the engines and report directory of a run, events (thresholds...), indexes for the filters."""
    db.execute("ALTER TABLE runs ADD COLUMN engines TEXT")
    db.execute("ALTER TABLE runs ADD COLUMN report_dir TEXT")
    db.execute("""CREATE TABLE events (
        id TEXT PRIMARY KEY, kind TEXT NOT NULL, time TEXT NOT NULL, bundle_id TEXT, run_id TEXT,
        fields TEXT NOT NULL)""")
    for column in ("started", "family", "category", "command", "bundle_id"):
        db.execute(f"CREATE INDEX runs_{column} ON runs ({column})")
    db.execute("CREATE INDEX events_kind_time ON events (kind, time)")


def _v3_process(db: sqlite3.Connection) -> None:
    """Version 3: the process that runs a run (pid, host, start time), so a killed run can be told from a running
    one; an index on the status for finding running runs."""
    db.execute("ALTER TABLE runs ADD COLUMN pid INTEGER")
    db.execute("ALTER TABLE runs ADD COLUMN host TEXT")
    db.execute("ALTER TABLE runs ADD COLUMN process_start INTEGER")
    db.execute("CREATE INDEX runs_status ON runs (status)")


# Applied in order: database version N has run MIGRATIONS[:N]. Append, never edit a released one.
MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [_v1_runs, _v2_engines_reports_events, _v3_process]
SCHEMA_VERSION = len(MIGRATIONS)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def _new_id() -> str:
    """Sortable and unique across processes: UTC time to the second and 6 random hex digits."""
    return f"{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def _dumps(value: Any) -> str | None:
    return None if value is None else json.dumps(json_ready(value), allow_nan=False)


def dataset_fingerprint(data_root: str | Path, category: str | None = None) -> str | None:
    """sha256 over the sorted relative paths, sizes and modification times (ns) of the data folder's image,
    mask and annotation files (:data:`FINGERPRINT_SUFFIXES`), one ``path\\0size\\0mtime_ns\\n`` line each.

    The folder is ``data_root/category`` when it exists, else ``data_root``. It changes when a file is added,
    removed, renamed, resized or touched (a copy with new times is a new fingerprint); symlinked folders are
    followed (each folder once); None when there is no such folder or no such file in it. Reads no file contents,
    so it costs one ``stat`` per file.
    """
    root = Path(data_root)
    folder = root / category if category and (root / category).is_dir() else root
    if not folder.is_dir():
        return None
    files: list[Path] = []
    seen: set[tuple[int, int]] = set()  # (device, inode) of the folders walked
    for top, dirs, names in os.walk(folder, followlinks=True):
        st = os.stat(top)
        if (st.st_dev, st.st_ino) in seen:  # a folder linked twice, or a link to a folder above it
            dirs.clear()
            continue
        seen.add((st.st_dev, st.st_ino))
        dirs.sort()  # the same folder is the one kept, whatever the listing order
        files += [p for n in names if (p := Path(top, n)).suffix.lower() in FINGERPRINT_SUFFIXES and p.is_file()]
    if not files:
        return None
    digest = hashlib.sha256()
    for path in sorted(files):
        st = path.stat()
        digest.update(f"{path.relative_to(folder).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


@lru_cache(maxsize=1)
def git_revision() -> str | None:
    """The commit of the git checkout edgeinspect runs from (``+dirty`` with uncommitted changes to tracked
    files), None for an installed package or without git."""
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=5,
                              check=True).stdout.strip()
    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() != root:  # an enclosing repository, not ours
            return None
        revision = git("rev-parse", "HEAD")
        return revision + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return None


# ---------------------------------------------------------------------------------------- processes
def _proc_stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/PID/stat`` after the command name (the state first), or None (no such process, or no
    /proc: not Linux)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()


def process_start(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks after boot (``/proc/PID/stat`` field 22), or None where /proc
    does not tell. With the pid it names one process: a pid is reused, its start time is not."""
    stat = _proc_stat(pid)
    return int(stat[19]) if stat else None


def process_gone(pid: int, started: int | None) -> bool:
    """Whether process ``pid`` of this host has ended: no such process, a zombie (dead, not reaped yet), or a
    different process under that pid (its start time is not ``started``, where /proc tells). False where it
    cannot be told (not POSIX)."""
    if os.name != "posix" or pid <= 0:
        return False
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # it exists, owned by another user
    stat = _proc_stat(pid)
    if stat is None:  # no /proc (macOS), or it ended a moment ago: the next look tells
        return False
    return stat[0] == "Z" or (started is not None and int(stat[19]) != started)


# ----------------------------------------------------------------------------------------- registry
class Registry:
    """One connection to a registry database. Use :meth:`open`; every write is its own short transaction."""

    def __init__(self, db: sqlite3.Connection, path: Path):
        self.db = db
        self.path = path
        self._lock = threading.RLock()  # one statement at a time when threads share the connection (a web server)

    def _query(self, sql: str, params: tuple | list = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self.db.execute(sql, params).fetchall()

    @classmethod
    def open(cls, path: str | Path | None = None) -> Registry:
        """Open (create, migrate) the registry at ``path`` (default :func:`default_path`); RegistryError
        naming the file when it cannot be."""
        path = Path(path).expanduser() if path else default_path()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
        except (OSError, sqlite3.Error) as exc:
            raise RegistryError(f"cannot open the run registry {path}: {exc}") from exc
        try:
            db.row_factory = sqlite3.Row
            db.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            if not _enable_wal(db):
                log.warning("run registry %s: WAL mode is not available here; concurrent writers wait longer", path)
            db.execute("PRAGMA synchronous = NORMAL")  # durable across a crash of the process, WAL-safe
            registry = cls(db, path)
            registry._migrate()
        except sqlite3.Error as exc:
            db.close()
            raise RegistryError(f"cannot open the run registry {path}: {exc} (is it an edgeinspect registry, "
                                f"on a writable local disk?)") from exc
        return registry

    def _migrate(self) -> None:
        """Apply the migrations this database lacks, in one exclusive transaction (another process that
        migrates at the same time waits, then finds nothing left to do)."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            self.db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = self.db.execute("SELECT version FROM schema_version").fetchone()
            version = row[0] if row else 0
            if version > SCHEMA_VERSION:
                raise RegistryError(f"the run registry {self.path} has schema version {version}, newer than this "
                                    f"edgeinspect ({__version__}, version {SCHEMA_VERSION}); upgrade edgeinspect")
            for migration in MIGRATIONS[version:]:
                migration(self.db)
            if row is None:
                self.db.execute("INSERT INTO schema_version VALUES (?)", (SCHEMA_VERSION,))
            elif version != SCHEMA_VERSION:
                self.db.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    @property
    def schema_version(self) -> int:
        """The schema version of the open database."""
        return self._query("SELECT version FROM schema_version")[0][0]

    def _write(self, sql: str, params: tuple | list) -> None:
        try:
            with self._lock:
                self.db.execute(sql, params)
        except sqlite3.Error as exc:
            raise RegistryError(f"cannot write the run registry {self.path}: {exc}") from exc

    def start_run(self, command: str, *, argv: list[str], config: dict | None = None, family: str | None = None,
                  data_root: str | None = None, category: str | None = None, bundle_path: str | None = None) -> str:
        """Record a run as ``running`` (with the dataset fingerprint of ``data_root``/``category``, and this
        process: pid, host name, start time); its id."""
        run_id = _new_id()
        data_root = str(Path(data_root).resolve()) if data_root else None
        pid = os.getpid()
        self._write(
            "INSERT INTO runs (id, command, argv, started, status, family, category, data_root, dataset_fingerprint,"
            " config, bundle_path, edgeinspect_version, git_revision, pid, host, process_start)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (run_id, command, _dumps(list(argv)), _now(), "running", family, category, data_root,
             dataset_fingerprint(data_root, category) if data_root else None, _dumps(config),
             str(Path(bundle_path).resolve()) if bundle_path else None, __version__, git_revision(),
             pid, socket.gethostname(), process_start(pid)))
        return run_id

    def update_run(self, run_id: str, **fields: Any) -> None:
        """Set columns of a run (``family``, ``category``, ``config``, ``bundle_id``, ...); None values are
        left as they are."""
        fields = {k: v for k, v in fields.items() if v is not None}
        unknown = set(fields) - set(RUN_KEYS)
        if unknown:
            raise ValueError(f"unknown run fields {sorted(unknown)}")
        if fields:
            values = [_dumps(v) if k in JSON_COLUMNS else v for k, v in fields.items()]
            self._write(f"UPDATE runs SET {', '.join(f'{k} = ?' for k in fields)} WHERE id = ?", [*values, run_id])

    def finish_run(self, run_id: str, *, status: str = "finished", metrics: dict | None = None,
                   bundle_id: str | None = None, bundle_path: str | None = None, engines: list | None = None,
                   error: str | None = None, **fields: Any) -> None:
        """Close a run: ``finished`` or ``failed`` (with ``error``), its results, the time and duration."""
        if status not in STATUSES[1:]:
            raise ValueError(f"status must be finished or failed, not {status!r}")
        row = next(iter(self._query("SELECT started FROM runs WHERE id = ?", (run_id,))), None)
        finished = _now()
        duration = ((datetime.fromisoformat(finished) - datetime.fromisoformat(row["started"])).total_seconds()
                    if row else None)
        self.update_run(run_id, status=status, finished=finished, duration_s=duration, metrics=metrics,
                        bundle_id=bundle_id, bundle_path=bundle_path, engines=engines, error=error, **fields)

    def record_event(self, kind: str, **fields: Any) -> str:
        """Record an event (e.g. ``kind="threshold", bundle_id=..., threshold=..., saved=True``); its id."""
        event_id = _new_id()
        self._write("INSERT INTO events (id, kind, time, bundle_id, run_id, fields) VALUES (?,?,?,?,?,?)",
                    (event_id, kind, _now(), fields.get("bundle_id"), fields.get("run_id"), _dumps(fields)))
        return event_id

    def list_events(self, *, kind: str | None = None, bundle_id: str | None = None, limit: int = 50
                    ) -> list[dict[str, Any]]:
        """Events, newest first: ``{"id", "kind", "time", **fields}``."""
        where, params = _where(kind=kind, bundle_id=bundle_id)
        rows = self._query(f"SELECT * FROM events {where} ORDER BY time DESC, rowid DESC LIMIT ?", [*params, limit])
        return [{"id": r["id"], "kind": r["kind"], "time": r["time"], **json.loads(r["fields"])} for r in rows]

    def fail_gone_runs(self) -> set[str]:
        """Mark the runs of this host that are ``running`` but whose process has ended (killed: SIGKILL, a crash of
        the machine's power...) as ``failed`` with the error :data:`GONE`; their ids. Runs of other hosts are left
        as they are. Listing and showing runs call it first."""
        rows = self._query("SELECT id, pid, process_start FROM runs WHERE status = 'running' AND host = ?",
                           (socket.gethostname(),))
        gone = {r["id"] for r in rows if r["pid"] is not None and process_gone(r["pid"], r["process_start"])}
        for run_id in gone:
            try:
                self._write("UPDATE runs SET status = 'failed', error = ? WHERE id = ? AND status = 'running'",
                            (GONE, run_id))
            except RegistryError as exc:  # a read-only registry: still reported as failed, not stored
                log.warning("run %s: its process is gone, not stored as failed: %s", run_id, exc)
        return gone

    def list_runs(self, *, family: str | None = None, category: str | None = None, command: str | None = None,
                  status: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        """Runs, newest first, each a JSON-ready dict (:data:`RUN_KEYS`); runs whose process is gone are failed
        (:meth:`fail_gone_runs`)."""
        gone = self.fail_gone_runs()
        where, params = _where(family=family, category=category, command=command, status=status)
        rows = self._query(f"SELECT * FROM runs {where} ORDER BY started DESC, rowid DESC LIMIT ?", [*params, limit])
        return [_run_dict(r, gone) for r in rows]

    def get_run(self, run_id: str) -> dict[str, Any] | None:
        """The run with this id, or with this unique id prefix; None when there is none. A run whose process is
        gone is failed (:meth:`fail_gone_runs`)."""
        gone = self.fail_gone_runs()
        row = next(iter(self._query("SELECT * FROM runs WHERE id = ?", (run_id,))), None)
        if row is None:
            pattern = run_id.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            rows = self._query("SELECT * FROM runs WHERE id LIKE ? ESCAPE '\\' LIMIT 2", (pattern,))
            if len(rows) > 1:
                raise RegistryError(f"run id prefix {run_id!r} is ambiguous; give more of the id")
            row = rows[0] if rows else None
        return _run_dict(row, gone) if row else None

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self.db.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


RUN_KEYS = ("id", "command", "argv", "started", "finished", "duration_s", "status", "error", "family", "category",
            "data_root", "dataset_fingerprint", "config", "bundle_id", "bundle_path", "metrics", "engines",
            "report_dir", "edgeinspect_version", "git_revision", "pid", "host")


def _where(**filters: str | None) -> tuple[str, list[str]]:
    given = {k: v for k, v in filters.items() if v is not None}
    return ("WHERE " + " AND ".join(f"{k} = ?" for k in given) if given else ""), list(given.values())


def _run_dict(row: sqlite3.Row, gone: set[str]) -> dict[str, Any]:
    run = {key: row[key] for key in RUN_KEYS}
    for key in JSON_COLUMNS:
        run[key] = json.loads(run[key]) if run[key] is not None else None
    if run["id"] in gone and run["status"] == "running":  # not stored (read-only registry): reported all the same
        run.update(status="failed", error=GONE)
    return run


# ------------------------------------------------------------------------------ recording a command
_warned: set[str] = set()


def _warn_once(path: Path | str | None, exc: BaseException) -> None:
    key = str(path)
    if key not in _warned:
        _warned.add(key)
        log.warning("run registry unavailable, this run is not recorded: %s", " ".join(str(exc).split()))


class RunHandle:
    """What a command reports about its run while it works; written when the run ends. ``id`` is None when
    the registry is unavailable (then everything is a no-op)."""

    def __init__(self, registry: Registry | None, run_id: str | None):
        self.registry, self.id = registry, run_id
        self.results: dict[str, Any] = {}

    def update(self, **fields: Any) -> None:
        """Set run fields now (``family``, ``category``, ``config``, ``data_root``...)."""
        if self.registry is None or self.id is None:
            return
        if "data_root" in fields and fields["data_root"] is not None:
            fields["data_root"] = str(Path(fields["data_root"]).resolve())
            fields.setdefault("dataset_fingerprint", dataset_fingerprint(fields["data_root"], fields.get("category")))
        try:
            self.registry.update_run(self.id, **fields)
        except RegistryError as exc:
            _warn_once(self.registry.path, exc)

    def set_results(self, **results: Any) -> None:
        """Results written at the end: ``metrics``, ``bundle_id``, ``bundle_path``, ``engines``, ``report_dir``."""
        self.results.update({k: v for k, v in results.items() if v is not None})


@contextmanager
def recorded(command: str, *, argv: list[str], registry: str | Path | None = None,
             **fields: Any) -> Iterator[RunHandle]:
    """Record the run of ``command`` around the block: ``running`` at the start, ``finished`` at the end, or
    ``failed`` with the error (an exception, a non-zero ``sys.exit``, Ctrl-C), which is re-raised.

    ``fields`` are :meth:`Registry.start_run`'s (``config``, ``family``, ``data_root``, ``category``,
    ``bundle_path``). A registry that cannot be opened or written logs one warning and the command goes on.
    """
    reg: Registry | None = None
    run_id = None
    try:
        reg = Registry.open(registry)
        run_id = reg.start_run(command, argv=argv, **fields)
    except (RegistryError, OSError, sqlite3.Error) as exc:
        _warn_once(registry or default_path(), exc)
    handle = RunHandle(reg if run_id else None, run_id)
    status, error = "finished", None
    try:
        yield handle
    except SystemExit as exc:
        if exc.code not in (None, 0):
            status, error = "failed", f"exit code {exc.code}"
        raise
    except KeyboardInterrupt:
        status, error = "failed", "interrupted (KeyboardInterrupt)"
        raise
    except BaseException as exc:
        status, error = "failed", " ".join(f"{type(exc).__name__}: {exc}".split())
        raise
    finally:
        if reg is not None:
            try:
                if run_id:
                    reg.finish_run(run_id, status=status, error=error, **handle.results)
            except (RegistryError, sqlite3.Error, ValueError) as exc:
                _warn_once(reg.path, exc)
            finally:
                reg.close()


# ----------------------------------------------------------------------------------- tables of runs
def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one level, keys joined with dots (``{"confusion": {"tp": 3}}`` -> ``confusion.tp``)."""
    if not isinstance(value, dict):
        return {prefix: value}
    flat: dict[str, Any] = {}
    for key, item in value.items():
        flat.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def cell(value: Any) -> str:
    """A value as a table cell: 4 decimals for floats, - for None, JSON for lists and dicts."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if 1e-3 <= abs(value) < 1e4 else f"{value:.4g}"
    return value if isinstance(value, str) else json.dumps(value)


COMPARE_FIELDS = ("command", "family", "category", "status", "started", "duration_s", "bundle_id",
                  "dataset_fingerprint")


def compare_table(runs: list[dict[str, Any]]) -> list[list[str]]:
    """Rows of a side-by-side comparison: a header of run ids, the runs' fields, then every metric any of them
    has (flattened, in first-seen order), ``-`` where a run lacks it."""
    metrics = [flatten(run.get("metrics") or {}) for run in runs]
    keys = list(dict.fromkeys(k for m in metrics for k in m))
    rows = [["run", *(run["id"] for run in runs)]]
    for field in COMPARE_FIELDS:
        rows.append([field, *(cell(run[field][:12] if field == "dataset_fingerprint" and run[field] else
                                    run[field][:19] if field == "started" else run[field]) for run in runs)])
    rows += [[key, *(cell(m.get(key)) for m in metrics)] for key in keys]
    return rows


def write_csv(runs: list[dict[str, Any]], out: TextIO) -> None:
    """One CSV row per run: :data:`RUN_KEYS` (argv, config and engines as JSON), then ``metrics.<key>`` for every
    flattened metric any run has."""
    metrics = [flatten(run.get("metrics") or {}) for run in runs]
    keys = list(dict.fromkeys(k for m in metrics for k in m))
    writer = csv.writer(out)
    fields = [k for k in RUN_KEYS if k != "metrics"]
    writer.writerow([*fields, *(f"metrics.{k}" for k in keys)])
    for run, flat in zip(runs, metrics, strict=True):
        writer.writerow([*(json.dumps(run[f]) if f in ("argv", "config", "engines") and run[f] is not None
                           else "" if run[f] is None else run[f] for f in fields),
                         *("" if flat.get(k) is None else flat[k] if not isinstance(flat[k], list | dict)
                           else json.dumps(flat[k]) for k in keys)])
