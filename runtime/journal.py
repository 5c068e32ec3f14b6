"""The verdict journal: every verdict is appended to local JSON-lines files before it is published.

One journal per camera publisher, in its own folder: ``journal-<first seq, 12 digits>.jsonl`` files,
one JSON object per line (the published payload, with its ``seq``), a new file when the current one
passes ``rotate_bytes``, the oldest deleted beyond ``keep_files``.

Durability (``fsync`` policy): every record is written and flushed to the operating system before the
verdict is sent, so a crash or ``kill -9`` of the daemon loses no record it published. ``interval``
(default) also fsyncs at most every ``fsync_interval_s`` (a power cut loses at most that much; the
daemon's heartbeats call :meth:`VerdictJournal.sync_if_due`, so this holds after the last verdict too);
``always`` fsyncs every record (the slowest, nothing lost on power loss); ``never`` leaves it to the
operating system. On opening, a torn last line (a record cut by a crash) is cut off, and ``seq``
continues after the last complete record: a seq is never reused.

A journal that cannot write (full disk, file-size limit, read-only folder) stops journalling loudly:
an ERROR log, ``status()["state"] == "failed"`` with the reason (the daemon puts it in every
heartbeat) and ``append`` returning False; inspection and publishing go on.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edgeinspect.errors import EdgeInspectError

log = logging.getLogger(__name__)

FSYNC_POLICIES = ("interval", "always", "never")
_PREFIX, _SUFFIX = "journal-", ".jsonl"


class JournalError(EdgeInspectError):
    """The journal folder cannot be used, or its files are not a journal."""


def journal_files(directory: str | Path) -> list[Path]:
    """The journal's files, oldest first (their names carry their first seq)."""
    files = [(first_seq(path), path) for path in Path(directory).glob(f"{_PREFIX}*{_SUFFIX}")]
    return [path for seq, path in sorted(files) if seq is not None]


def first_seq(path: Path) -> int | None:
    """The first seq of a journal file, from its name (None: not a journal file name)."""
    digits = path.name[len(_PREFIX):-len(_SUFFIX)]
    return int(digits) if path.name.startswith(_PREFIX) and digits.isdigit() else None


def _complete_records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(byte offset after the line, record) of each complete, parsable line of one file."""
    offset = 0
    with path.open("rb") as f:
        for line in f:
            if not line.endswith(b"\n"):  # a record torn by a crash: never published
                return
            offset += len(line)
            try:
                record = json.loads(line)
            except (UnicodeDecodeError, json.JSONDecodeError):
                log.warning("journal %s: unreadable line ending at byte %d skipped", path, offset)
                continue
            if isinstance(record, dict) and isinstance(record.get("seq"), int):
                yield offset, record


def read_journal(directory: str | Path, since: int = 0, until: int | None = None) -> Iterator[dict[str, Any]]:
    """The records of the journal in ``directory`` with ``since <= seq <= until``, in order."""
    directory = Path(directory)
    if not directory.is_dir():
        raise JournalError(f"journal folder {directory} does not exist; give the --journal folder of the daemon "
                           f"(one sub-folder per line.camera)")
    files = journal_files(directory)
    if not files:
        raise JournalError(f"{directory} holds no journal files ({_PREFIX}*{_SUFFIX}); give the folder of one "
                           f"camera (<journal>/<line>.<camera>)")
    for i, path in enumerate(files):
        if i + 1 < len(files) and first_seq(files[i + 1]) <= since:
            continue  # every record of this file is older than `since`
        for _, record in _complete_records(path):
            seq = record["seq"]
            if until is not None and seq > until:
                return
            if seq >= since:
                yield record


class VerdictJournal:
    """Append-only verdict records in ``directory`` (created if missing); see the module docstring."""

    def __init__(self, directory: str | Path, *, fsync: str = "interval", fsync_interval_s: float = 1.0,
                 rotate_bytes: int = 64 * 2**20, keep_files: int | None = 100):
        if fsync not in FSYNC_POLICIES:
            raise JournalError(f"unknown journal fsync policy {fsync!r}; choose one of {list(FSYNC_POLICIES)}")
        if rotate_bytes < 1 or (keep_files is not None and keep_files < 1):
            raise JournalError("journal rotate_bytes and keep_files must be >= 1")
        self.directory = Path(directory)
        self.fsync, self.fsync_interval_s = fsync, fsync_interval_s
        self.rotate_bytes, self.keep_files = rotate_bytes, keep_files
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self.next_seq = self._recover()
        except OSError as exc:
            raise JournalError(f"cannot use journal folder {self.directory}: {exc.strerror or exc}; choose a "
                               f"writable folder (--journal)") from exc
        self.records = 0
        self.error: str | None = None
        self._file = None
        self._path: Path | None = None
        self._last_sync = time.monotonic()
        self._unsynced = False  # records written since the last fsync
        log.info("journal %s: next seq %d (fsync %s)", self.directory, self.next_seq, fsync)

    def _recover(self) -> int:
        """Cut a torn last record off the newest file; the seq after the last complete record."""
        files = journal_files(self.directory)
        while files:
            last = files[-1]
            end, seq = 0, None
            for offset, record in _complete_records(last):
                end, seq = offset, record["seq"]
            size = last.stat().st_size
            if end < size:
                with last.open("r+b") as f:  # bytes after the last complete record never made a verdict
                    f.truncate(end)
                log.warning("journal %s: cut %d bytes of a torn record after seq %s", last, size - end, seq)
            if seq is not None:
                return seq + 1
            if end == 0 and len(files) > 1:  # an empty newest file: the seq comes from the one before
                last.unlink()
                files.pop()
                continue
            return first_seq(last)
        return 0

    def append(self, payload: dict[str, Any]) -> bool:
        """Write one verdict record (its ``seq`` must be :attr:`next_seq`); False once the journal failed."""
        if self.error is not None:
            return False
        seq = payload.get("seq")
        if seq != self.next_seq:
            raise JournalError(f"journal {self.directory}: record seq {seq} does not follow {self.next_seq - 1}")
        line = (json.dumps(payload, separators=(",", ":"), allow_nan=False, ensure_ascii=False) + "\n").encode()
        try:
            if self._file is None or self._file.tell() + len(line) > self.rotate_bytes and self._file.tell():
                self._rotate(seq)
            self._file.write(line)
            self._file.flush()
            self._unsynced = True
            if self.fsync == "always" or self._sync_due():
                self._sync()
        except OSError as exc:
            self._fail(exc)
            return False
        self.next_seq += 1
        self.records += 1
        return True

    def sync_if_due(self) -> None:
        """With the ``interval`` policy, fsync the records written since the last fsync once
        ``fsync_interval_s`` has passed; called with every heartbeat, so the last records of a burst reach
        the disk while no verdict follows."""
        if self._file is None or not self._sync_due():
            return
        try:
            self._sync()
        except OSError as exc:
            self._fail(exc)

    def _sync_due(self) -> bool:
        return (self.fsync == "interval" and self._unsynced
                and time.monotonic() - self._last_sync >= self.fsync_interval_s)

    def _sync(self) -> None:
        os.fsync(self._file.fileno())
        self._unsynced, self._last_sync = False, time.monotonic()

    def _rotate(self, seq: int) -> None:
        """Continue in the newest file if there is room, else start ``journal-<seq>.jsonl``; drop the oldest."""
        if self._file is not None:
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
        files = journal_files(self.directory)
        if files and files[-1] != self._path and files[-1].stat().st_size < self.rotate_bytes:
            self._path = files[-1]  # reopening after a restart: append to the newest file
        else:
            self._path = self.directory / f"{_PREFIX}{seq:012d}{_SUFFIX}"
            files.append(self._path)
        self._file = self._path.open("ab")
        if self.keep_files is not None:
            for old in files[:-self.keep_files]:
                old.unlink(missing_ok=True)
                log.info("journal %s: removed %s (keep_files %d)", self.directory, old.name, self.keep_files)

    def _fail(self, exc: OSError) -> None:
        self.error = f"{exc.strerror or exc} writing {self._path or self.directory}"
        log.error("JOURNAL STOPPED at seq %d: %s; verdicts are still published but no longer journalled",
                  self.next_seq, self.error)
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass  # the same full disk: the reason is already recorded
            self._file = None

    def status(self) -> dict[str, Any]:
        """For heartbeats: state (``ok`` / ``failed``), folder, next seq, records written, the error."""
        return {"state": "failed" if self.error else "ok", "dir": str(self.directory), "next_seq": self.next_seq,
                "records": self.records, "fsync": self.fsync, **({"error": self.error} if self.error else {})}

    def close(self) -> None:
        """Flush, fsync and close; idempotent."""
        if self._file is not None:
            try:
                self._file.flush()
                os.fsync(self._file.fileno())
                self._file.close()
            except OSError as exc:
                self._fail(exc)
            self._file = None
