"""The verdict journal: real files, a real daemon process killed with SIGKILL, a real file-size limit,
real ZeroMQ replay on loopback."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import zmq
from conftest import SYNTH_CATEGORY, free_tcp_endpoint

from edgeinspect.runtime.journal import JournalError, VerdictJournal, journal_files, read_journal
from edgeinspect.runtime.publisher import decode_message


def _record(seq: int) -> dict:
    return {"schema": 1, "seq": seq, "line": "L1", "camera": "c1", "verdict": "OK", "score": 0.25}


def test_records_survive_reopening_and_a_torn_last_record_is_cut(tmp_path: Path) -> None:
    journal = VerdictJournal(tmp_path)
    assert journal.next_seq == 0
    for seq in range(5):
        assert journal.append(_record(seq))
    journal.close()
    (path,) = journal_files(tmp_path)
    complete = path.read_bytes()
    with path.open("ab") as f:  # what a kill -9 in the middle of a write leaves
        f.write(b'{"schema":1,"seq":5,"line":"L1","verd')
    reopened = VerdictJournal(tmp_path)
    assert reopened.next_seq == 5  # the torn record was never published: its seq is the next one
    assert path.read_bytes() == complete
    assert reopened.append(_record(5))
    reopened.close()
    assert [r["seq"] for r in read_journal(tmp_path)] == list(range(6))
    with pytest.raises(JournalError, match="does not follow"):
        reopened.append(_record(9))


def test_rotation_keeps_the_newest_files_and_reads_across_them(tmp_path: Path) -> None:
    line_bytes = len(json.dumps(_record(10), separators=(",", ":"))) + 1
    journal = VerdictJournal(tmp_path, rotate_bytes=3 * line_bytes, keep_files=3, fsync="always")
    for seq in range(20):
        assert journal.append(_record(seq))
    journal.close()
    files = journal_files(tmp_path)
    assert [f.name for f in files] == ["journal-000000000012.jsonl", "journal-000000000015.jsonl",
                                       "journal-000000000018.jsonl"]
    assert [r["seq"] for r in read_journal(tmp_path)] == list(range(12, 20))
    assert [r["seq"] for r in read_journal(tmp_path, since=14, until=18)] == [14, 15, 16, 17, 18]
    assert VerdictJournal(tmp_path).next_seq == 20  # after a restart, seq goes on


def test_an_unusable_journal_folder_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(JournalError, match="cannot use journal folder"):
        VerdictJournal(blocker / "journal")
    with pytest.raises(JournalError, match="holds no journal files"):
        list(read_journal(tmp_path))
    with pytest.raises(JournalError, match="fsync policy"):
        VerdictJournal(tmp_path / "j", fsync="sometimes")


# ------------------------------------------------------------------------------------- the daemon
def _frames(synth_root: Path, tmp_path: Path, n: int) -> Path:
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, src in enumerate(sorted((synth_root / SYNTH_CATEGORY / "test").glob("*/*.png"))[:n]):
        (folder / f"{i:03d}.png").write_bytes(src.read_bytes())
    return folder


def _subscriber(endpoint: str) -> zmq.Socket:
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.connect(endpoint)
    sub.setsockopt_string(zmq.SUBSCRIBE, "")
    return sub


def _serve(bundle: Path, camera: Path, endpoint: str, journal: Path, *extra: str, **popen: object
           ) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "edgeinspect", "-q", "serve", "--bundle", str(bundle),
                             "--camera", str(camera), "--publish", endpoint, "--line", "L1", "--camera-id", "c1",
                             "--wait-subscribers", "1", "--journal", str(journal), *extra],
                            stderr=subprocess.PIPE, text=True, **popen)


def _receive(sub: zmq.Socket, until_state: str | None = None, n_verdicts: int | None = None
             ) -> tuple[list[dict], list[dict]]:
    verdicts, statuses = [], []
    while True:
        assert sub.poll(120_000), "no message from the daemon within 120 s"
        topic, payload = decode_message(sub.recv_multipart())
        (verdicts if topic.startswith("verdict.") else statuses).append(payload)
        if n_verdicts is not None and len(verdicts) >= n_verdicts:
            return verdicts, statuses
        if until_state and statuses and statuses[-1]["state"] == until_state:
            return verdicts, statuses


def test_kill_9_loses_no_published_verdict_and_seq_continues_after_restart(
        patchcore_bundle: Path, synth_root: Path, tmp_path: Path) -> None:
    frames = _frames(synth_root, tmp_path, 6)
    journal = tmp_path / "journal"
    endpoint = free_tcp_endpoint()
    sub = _subscriber(endpoint)
    proc = _serve(patchcore_bundle, frames, endpoint, journal, "--loop")
    try:
        published, _ = _receive(sub, n_verdicts=15)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    records = list(read_journal(journal / "L1.c1"))
    seqs = [r["seq"] for r in records]
    assert seqs == list(range(len(seqs))) and len(seqs) >= 15
    by_seq = {r["seq"]: r for r in records}
    for verdict in published:  # journalled before it was sent: every received verdict is there, as sent
        assert by_seq[verdict["seq"]] == verdict

    proc = _serve(patchcore_bundle, frames, endpoint, journal)  # restart on the same journal
    try:
        after, statuses = _receive(sub, until_state="stopped")
    finally:
        sub.close(linger=0)
        assert proc.wait(timeout=60) == 0, proc.stderr.read()
    assert [v["seq"] for v in after] == list(range(seqs[-1] + 1, seqs[-1] + 1 + 6))  # never reused
    assert statuses[-1]["journal"]["state"] == "ok" and statuses[-1]["journal"]["next_seq"] == seqs[-1] + 7
    assert [r["seq"] for r in read_journal(journal / "L1.c1")] == list(range(seqs[-1] + 7))


def test_a_full_disk_stops_the_journal_loudly_but_not_the_inspection(
        patchcore_bundle: Path, synth_root: Path, tmp_path: Path) -> None:
    frames = _frames(synth_root, tmp_path, 8)
    journal = tmp_path / "journal"
    endpoint = free_tcp_endpoint()
    sub = _subscriber(endpoint)
    limit = 3000  # bytes per file: room for a few verdict records only

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    proc = _serve(patchcore_bundle, frames, endpoint, journal, preexec_fn=small_files, env=env)
    try:
        verdicts, statuses = _receive(sub, until_state="stopped")
    finally:
        sub.close(linger=0)
        code = proc.wait(timeout=60)
    stderr = proc.stderr.read()
    assert code == 0, stderr
    assert [v["seq"] for v in verdicts] == list(range(8))  # every frame judged and published
    final = statuses[-1]["journal"]
    assert final["state"] == "failed" and "too large" in final["error"].lower()
    assert "JOURNAL STOPPED" in stderr
    records = list(read_journal(journal / "L1.c1"))
    assert 0 < len(records) < 8 and final["records"] == len(records)
    assert records == verdicts[:len(records)]  # what it holds is exactly what was published


def test_replay_resends_a_range_as_it_was(tmp_path: Path) -> None:
    journal = VerdictJournal(tmp_path / "L1.c1")
    for seq in range(10):
        journal.append(_record(seq))
    journal.close()
    printed = subprocess.run([sys.executable, "-m", "edgeinspect", "journal", "replay", str(tmp_path / "L1.c1"),
                              "--since", "7"], capture_output=True, text=True, check=True)
    assert [json.loads(line)["seq"] for line in printed.stdout.splitlines()] == [7, 8, 9]

    endpoint = free_tcp_endpoint()
    sub = _subscriber(endpoint)
    proc = subprocess.Popen([sys.executable, "-m", "edgeinspect", "journal", "replay", str(tmp_path / "L1.c1"),
                             "--since", "3", "--until", "6", "--publish", endpoint], stderr=subprocess.PIPE, text=True)
    try:
        replayed = []
        while len(replayed) < 4:
            assert sub.poll(60_000), "no replayed verdict within 60 s"
            topic, payload = decode_message(sub.recv_multipart())
            assert topic == "verdict.L1.c1"
            replayed.append(payload)
    finally:
        sub.close(linger=0)
        assert proc.wait(timeout=60) == 0, proc.stderr.read()
    assert replayed == [{**_record(seq), "replayed": True} for seq in range(3, 7)]
    assert "replayed 4 verdicts (seq 3..6)" in proc.stderr.read()

    missing = subprocess.run([sys.executable, "-m", "edgeinspect", "journal", "replay", str(tmp_path / "nope")],
                             capture_output=True, text=True)
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1 and "does not exist" in missing.stderr
