"""The run registry (real SQLite, parallel writer processes, a migration) and `evaluate --report`."""

from __future__ import annotations

import base64
import csv
import json
import logging
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import SYNTH_CATEGORY, running_run

from edgeinspect.cli import main
from edgeinspect.errors import DataError
from edgeinspect.registry import (
    GONE,
    RUN_KEYS,
    SCHEMA_VERSION,
    Registry,
    RegistryError,
    dataset_fingerprint,
    default_path,
    process_start,
    recorded,
)


def test_runs_round_trip_in_wal_mode(tmp_path: Path) -> None:
    data = tmp_path / "data" / "cat"
    data.mkdir(parents=True)
    (data / "a.png").write_bytes(b"x")
    with Registry.open(tmp_path / "sub" / "r.sqlite") as reg:
        assert reg.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert reg.db.execute("PRAGMA busy_timeout").fetchone()[0] > 0
        assert reg.schema_version == SCHEMA_VERSION
        a = reg.start_run("train", argv=["edgeinspect", "train", "padim"], family="padim", config={"model": {"k": 1}},
                          data_root=str(tmp_path / "data"), category="cat", bundle_path=str(tmp_path / "b"))
        b = reg.start_run("evaluate", argv=["edgeinspect", "evaluate"], family="patchcore", category="other")
        assert reg.get_run(a)["status"] == "running"
        reg.finish_run(a, metrics={"image_auroc": np.float32(0.75), "pro": float("nan"), "confusion": {"tp": 3}},
                       bundle_id="padim-x-123", engines=[{"format": "onnx", "precision": "fp32"}])
        reg.finish_run(b, status="failed", error="DataError: no such folder")
        run = reg.get_run(a[:-2])  # a unique prefix is enough
        assert list(run) == list(RUN_KEYS) and run["id"] == a
        assert run["status"] == "finished" and run["duration_s"] >= 0 and run["finished"] >= run["started"]
        assert run["metrics"] == {"image_auroc": 0.75, "pro": None, "confusion": {"tp": 3}}  # NaN -> null: JSON
        assert run["config"] == {"model": {"k": 1}} and run["argv"][1] == "train"
        assert run["dataset_fingerprint"] == dataset_fingerprint(tmp_path / "data", "cat")
        assert run["data_root"] == str((tmp_path / "data").resolve()) and run["edgeinspect_version"]
        json.dumps(run, allow_nan=False)
        assert [r["id"] for r in reg.list_runs()] == [b, a]  # newest first
        assert [r["id"] for r in reg.list_runs(family="padim")] == [a]
        assert [r["id"] for r in reg.list_runs(command="evaluate", category="other")] == [b]
        assert reg.get_run(b)["error"] == "DataError: no such folder"
        assert reg.get_run("nope") is None
        event = reg.record_event("threshold", bundle_id="padim-x-123", threshold=1.5, saved=True)
        assert reg.list_events(kind="threshold") == [
            {"id": event, "kind": "threshold", "time": reg.list_events()[0]["time"], "bundle_id": "padim-x-123",
             "threshold": 1.5, "saved": True}]


def test_default_path_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EDGEINSPECT_REGISTRY", str(tmp_path / "env.sqlite"))
    assert default_path() == tmp_path / "env.sqlite"
    monkeypatch.delenv("EDGEINSPECT_REGISTRY")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_path() == tmp_path / "xdg" / "edgeinspect" / "registry.sqlite"


def test_fingerprint_sees_added_changed_and_touched_files(tmp_path: Path) -> None:
    (tmp_path / "cat" / "train").mkdir(parents=True)
    image = tmp_path / "cat" / "train" / "a.png"
    image.write_bytes(b"123")
    (tmp_path / "cat" / "notes.txt").write_text("not data")
    first = dataset_fingerprint(tmp_path, "cat")
    assert first == dataset_fingerprint(tmp_path, "cat") and len(first) == 64
    (tmp_path / "cat" / "notes.txt").write_text("still not data")
    assert dataset_fingerprint(tmp_path, "cat") == first
    os.utime(image, ns=(1, 1))
    touched = dataset_fingerprint(tmp_path, "cat")
    (tmp_path / "cat" / "train" / "b.jpg").write_bytes(b"4")
    assert len({first, touched, dataset_fingerprint(tmp_path, "cat")}) == 3
    assert dataset_fingerprint(tmp_path / "absent") is None


def test_fingerprint_follows_symlinked_folders(tmp_path: Path) -> None:
    for name, size in (("d1", 3), ("d2", 4)):  # two datasets whose train folders are links to folders elsewhere
        (tmp_path / "store" / name).mkdir(parents=True)
        (tmp_path / "store" / name / "a.png").write_bytes(bytes(size))
        (tmp_path / name / "cat").mkdir(parents=True)
        (tmp_path / name / "cat" / "train").symlink_to(tmp_path / "store" / name)
    (tmp_path / "store" / "d1" / "loop").symlink_to(tmp_path / "d1")  # a link to a folder above: walked once
    one, two = (dataset_fingerprint(tmp_path / name, "cat") for name in ("d1", "d2"))
    assert None not in (one, two) and one != two
    (tmp_path / "store" / "d2" / "a.png").write_bytes(bytes(5))
    assert dataset_fingerprint(tmp_path / "d2", "cat") != two
    (tmp_path / "empty").mkdir()
    assert dataset_fingerprint(tmp_path / "empty") is None  # no data files: nothing to fingerprint


def test_recorded_marks_failures_and_reraises(tmp_path: Path) -> None:
    path = tmp_path / "r.sqlite"
    with pytest.raises(DataError), recorded("train", argv=["x"], registry=path, family="padim") as run:
        run.update(config={"a": 1})
        raise DataError("no images in /nowhere")
    with pytest.raises(SystemExit), recorded("export", argv=["x"], registry=path) as run:
        run.set_results(metrics={"onnx:fp32": "refused"})
        sys.exit(1)
    with pytest.raises(SystemExit), recorded("bench", argv=["x"], registry=path):
        sys.exit(0)
    with Registry.open(path) as reg:
        bench, export, train = reg.list_runs()
    assert train["status"] == "failed" and train["error"] == "DataError: no images in /nowhere"
    assert train["config"] == {"a": 1}
    assert export["status"] == "failed" and export["error"] == "exit code 1"
    assert export["metrics"] == {"onnx:fp32": "refused"}
    assert bench["status"] == "finished" and bench["error"] is None


@pytest.mark.parametrize("kind", ["parent is a file", "not a database"])
def test_an_unusable_registry_warns_and_the_command_goes_on(tmp_path: Path, kind: str,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    if kind == "parent is a file":
        (tmp_path / "file").write_text("")
        path = tmp_path / "file" / "r.sqlite"
    else:
        path = tmp_path / "r.sqlite"
        path.write_bytes(b"this is not SQLite" * 100)
    with pytest.raises(RegistryError, match=str(path.name)):
        Registry.open(path)
    done = []
    with caplog.at_level(logging.WARNING, logger="edgeinspect.registry"), \
            recorded("train", argv=["x"], registry=path) as run:
        run.update(config={"a": 1})
        run.set_results(metrics={"image_auroc": 1.0})
        done.append(True)
    assert done and run.id is None
    assert "run registry unavailable" in caplog.text


WRITER = """
import sys
from edgeinspect.registry import Registry
reg = Registry.open(sys.argv[1])
for i in range(int(sys.argv[3])):
    run = reg.start_run("train", argv=[sys.argv[2], str(i)], family="padim", category=sys.argv[2])
    reg.finish_run(run, metrics={"image_auroc": i / 100, "writer": sys.argv[2]}, bundle_id=f"{sys.argv[2]}-{i}")
    reg.record_event("threshold", bundle_id=f"{sys.argv[2]}-{i}", threshold=float(i))
reg.close()
"""


def test_parallel_writer_processes(tmp_path: Path) -> None:
    """4 processes x 20 runs into one new database at once (they also race to create the schema)."""
    path, writers, runs = tmp_path / "r.sqlite", 4, 20
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), f"w{w}", str(runs)],
                              stderr=subprocess.PIPE, text=True) for w in range(writers)]
    for proc in procs:
        assert proc.wait(timeout=120) == 0, proc.stderr.read()
    with Registry.open(path) as reg:
        assert reg.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        found = reg.list_runs(limit=1000)
        assert len(found) == writers * runs and len({r["id"] for r in found}) == writers * runs
        assert all(r["status"] == "finished" for r in found)
        for w in range(writers):
            mine = reg.list_runs(category=f"w{w}", limit=1000)
            assert sorted(r["bundle_id"] for r in mine) == sorted(f"w{w}-{i}" for i in range(runs))
            assert all(r["metrics"]["writer"] == f"w{w}" for r in mine)
        assert len(reg.list_events(limit=1000)) == writers * runs
        assert reg.db.execute("SELECT COUNT(*) FROM schema_version").fetchone()[0] == 1


V1_SCHEMA = """
CREATE TABLE schema_version (version INTEGER NOT NULL);
INSERT INTO schema_version VALUES (1);
CREATE TABLE runs (
    id TEXT PRIMARY KEY, command TEXT NOT NULL, argv TEXT NOT NULL, started TEXT NOT NULL, finished TEXT,
    duration_s REAL, status TEXT NOT NULL, error TEXT, family TEXT, category TEXT, data_root TEXT,
    dataset_fingerprint TEXT, config TEXT, bundle_id TEXT, bundle_path TEXT, metrics TEXT,
    edgeinspect_version TEXT, git_revision TEXT);
INSERT INTO runs (id, command, argv, started, finished, duration_s, status, family, metrics)
    VALUES ('20260101-000000-abcdef', 'train', '["edgeinspect", "train"]', '2026-01-01T00:00:00+00:00',
            '2026-01-01T00:01:00+00:00', 60.0, 'finished', 'padim', '{"image_auroc": 0.9}');
INSERT INTO runs (id, command, argv, started, status) VALUES ('20260101-000100-fedcba', 'export', '[]',
            '2026-01-01T00:01:00+00:00', 'running');
"""


def test_an_old_schema_is_migrated_and_a_newer_one_refused(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as db:
        db.executescript(V1_SCHEMA)
    db.close()
    with Registry.open(path) as reg:
        assert reg.schema_version == SCHEMA_VERSION == 3
        old = reg.get_run("20260101-000000-abcdef")
        assert old["metrics"] == {"image_auroc": 0.9} and old["engines"] is None and old["report_dir"] is None
        assert reg.get_run("20260101-000100-fedcba")["status"] == "running"  # no process recorded: left as it is
        new = reg.start_run("export", argv=["x"])
        reg.finish_run(new, engines=[{"format": "onnx"}], report_dir="/r")
        assert reg.get_run(new)["engines"] == [{"format": "onnx"}]
        reg.record_event("threshold", threshold=1.0)
        reg.db.execute("UPDATE schema_version SET version = 99")
    with pytest.raises(RegistryError, match="schema version 99"):
        Registry.open(path)


def test_a_killed_run_is_failed_when_listed_or_shown(tmp_path: Path) -> None:
    """A process killed with SIGKILL never records the end of its run: `runs list` / `runs show` find its process
    gone and store the run as failed."""
    path, cli = tmp_path / "r.sqlite", CliRunner()
    with running_run(path) as (proc, run_id):
        shown = cli.invoke(main, ["--registry", str(path), "runs", "show", run_id])
        run = json.loads(shown.output)
        assert run["status"] == "running" and run["pid"] == proc.pid and run["host"] == socket.gethostname()
        os.kill(proc.pid, signal.SIGKILL)
        while Path(f"/proc/{proc.pid}").exists() and Path(f"/proc/{proc.pid}/stat").read_text().split()[2] != "Z":
            time.sleep(0.05)  # until it is dead (a zombie: its parent, this test, has not reaped it yet)
        listed = cli.invoke(main, ["--registry", str(path), "runs", "list", "--json"])
        assert listed.exit_code == 0, listed.output
        (run,) = [json.loads(line) for line in listed.output.splitlines()]
        assert (run["id"], run["status"], run["error"]) == (run_id, "failed", GONE)
    shown = cli.invoke(main, ["--registry", str(path), "runs", "show", run_id])
    assert json.loads(shown.output)["status"] == "failed"
    with sqlite3.connect(path) as db:  # stored, not only shown
        assert db.execute("SELECT status, error FROM runs").fetchall() == [("failed", GONE)]
    db.close()
    failed = cli.invoke(main, ["--registry", str(path), "runs", "list", "--status", "failed"])
    assert failed.output.split()[0] == run_id


@pytest.mark.skipif(process_start(os.getpid()) is None, reason="no /proc/PID/stat here (Linux only)")
def test_only_this_hosts_ended_processes_fail(tmp_path: Path) -> None:
    ended = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                               text=True, check=True).stdout)
    with Registry.open(tmp_path / "r.sqlite") as reg:
        alive, elsewhere, reused, ended_here = (reg.start_run("train", argv=[name]) for name in "abcd")
        reg.db.execute("UPDATE runs SET pid = ? WHERE id = ?", (ended, ended_here))
        reg.db.execute("UPDATE runs SET pid = ?, host = 'another-host' WHERE id = ?", (ended, elsewhere))
        # this live pid, but another start time: the process that recorded the run ended, its pid was reused
        reg.db.execute("UPDATE runs SET process_start = process_start - 1 WHERE id = ?", (reused,))
        status = {r["id"]: (r["status"], r["error"]) for r in reg.list_runs()}
    assert status == {alive: ("running", None), elsewhere: ("running", None), reused: ("failed", GONE),
                      ended_here: ("failed", GONE)}


def _populate(path: Path) -> list[str]:
    with Registry.open(path) as reg:
        ids = []
        for family, auroc in (("padim", 0.8), ("patchcore", 0.95)):
            ids.append(reg.start_run("train", argv=["edgeinspect", "train", family], family=family,
                                     category="washer"))
            reg.finish_run(ids[-1], metrics={"image_auroc": auroc, "confusion": {"tp": 7, "fn": 1}})
            time.sleep(0.01)
    return ids


def test_runs_commands(tmp_path: Path) -> None:
    path = tmp_path / "r.sqlite"
    padim, patchcore = _populate(path)
    cli = CliRunner()

    listed = cli.invoke(main, ["--registry", str(path), "runs", "list"])
    assert listed.exit_code == 0, listed.output
    lines = listed.output.splitlines()
    assert [line.split()[0] for line in lines] == [patchcore, padim]
    assert "image_auroc 0.9500" in lines[0]
    only = cli.invoke(main, ["--registry", str(path), "runs", "list", "--family", "padim", "--json"])
    assert [json.loads(line)["id"] for line in only.output.splitlines()] == [padim]

    shown = cli.invoke(main, ["--registry", str(path), "runs", "show", padim[:-1]])
    assert shown.exit_code == 0 and json.loads(shown.output)["metrics"]["image_auroc"] == 0.8

    compared = cli.invoke(main, ["--registry", str(path), "runs", "compare", padim, patchcore])
    assert compared.exit_code == 0, compared.output
    rows = {line.split()[0]: line.split()[1:] for line in compared.output.splitlines()}
    assert rows["run"] == [padim, patchcore] and rows["family"] == ["padim", "patchcore"]
    assert rows["image_auroc"] == ["0.8000", "0.9500"] and rows["confusion.tp"] == ["7", "7"]

    out = tmp_path / "runs.csv"
    exported = cli.invoke(main, ["--registry", str(path), "runs", "export", "--csv", str(out)])
    assert exported.exit_code == 0, exported.output
    table = list(csv.DictReader(out.open()))
    assert [r["id"] for r in table] == [patchcore, padim]
    assert [float(r["metrics.image_auroc"]) for r in table] == [0.95, 0.8]
    assert json.loads(table[0]["argv"]) == ["edgeinspect", "train", "patchcore"]

    missing = cli.invoke(main, ["--registry", str(path), "runs", "show", "no-such-run"])
    assert missing.exit_code == 1 and "no run no-such-run" in missing.output
    # the environment variable moves it too
    env = cli.invoke(main, ["runs", "list", "--command", "train"], env={"EDGEINSPECT_REGISTRY": str(path)})
    assert len(env.output.splitlines()) == 2


def test_cli_records_a_failing_train_and_the_error(tmp_path: Path, synth_root: Path) -> None:
    path = tmp_path / "r.sqlite"
    result = CliRunner().invoke(main, ["--registry", str(path), "train", "padim", "--data", str(synth_root),
                                       "--category", "no_such_part", "--out", str(tmp_path / "b")])
    assert result.exit_code == 1
    with Registry.open(path) as reg:
        (run,) = reg.list_runs()
    assert run["command"] == "train" and run["status"] == "failed" and run["family"] == "padim"
    assert run["argv"][:3] == ["edgeinspect", "--registry", str(path)] and "no_such_part" in run["argv"]
    assert "no_such_part" in run["error"] and run["config"]["model"]["backbone"]
    assert run["category"] == "no_such_part" and run["data_root"] == str(synth_root.resolve())
    # an unusable registry changes nothing but a warning: same exit code, same message
    (tmp_path / "file").write_text("")
    again = CliRunner().invoke(main, ["--registry", str(tmp_path / "file" / "r.sqlite"), "train", "padim", "--data",
                                      str(synth_root), "--category", "no_such_part", "--out", str(tmp_path / "b")])
    assert again.exit_code == 1 and again.output == result.output


def _decodes(png: Path) -> bool:
    image = cv2.imdecode(np.frombuffer(png.read_bytes(), np.uint8), cv2.IMREAD_COLOR)
    return image is not None and image.shape[0] > 50 and image.shape[1] > 50


def test_evaluate_report_and_its_run(evaluated_run: dict, synth_root: Path) -> None:
    path, report = evaluated_run["registry"], evaluated_run["report"]  # evaluate --report, see conftest
    pngs = sorted(p.name for p in report.glob("*.png"))
    assert pngs == ["confusion.png", "overlays.png", "pr.png", "pro.png", "roc.png", "score_histogram.png"]
    page = (report / "report.html").read_text()
    for name in pngs:
        assert _decodes(report / name), name
        assert base64.b64encode((report / name).read_bytes()).decode() in page  # embedded: self-contained
    assert "src=\"http" not in page and "<link" not in page
    metrics = json.loads((report / "metrics.json").read_text())
    with Registry.open(path) as reg:
        (run,) = reg.list_runs()
    assert run["command"] == "evaluate" and run["status"] == "finished" and run["family"] == "patchcore"
    assert run["metrics"]["image_auroc"] == pytest.approx(metrics["image_auroc"])
    assert run["metrics"]["engine"] == "onnx:fp32" and run["report_dir"] == str(report.resolve())
    assert run["bundle_id"] == metrics["bundle_id"] and run["category"] == SYNTH_CATEGORY
    assert run["dataset_fingerprint"] == dataset_fingerprint(synth_root, SYNTH_CATEGORY)
    assert [e["format"] for e in run["engines"]] == ["onnx"]
    assert (run["pid"], run["host"]) == (os.getpid(), socket.gethostname())  # in this process (CliRunner)


def test_a_report_replaces_the_earlier_one_whole(patchcore_bundle: Path, synth_root: Path, tmp_path: Path) -> None:
    from edgeinspect.train.evaluate import run_inference
    from edgeinspect.train.report import write_report

    run = run_inference(patchcore_bundle, synth_root, SYNTH_CATEGORY, "onnx", progress=False)
    metrics = {"confusion": {"tp": 1, "fn": 0, "fp": 0, "tn": 1}}
    report = tmp_path / "report"
    report.mkdir()
    (report / "report.html").write_text("an earlier report")
    (report / "old_plot.png").write_bytes(b"a plot this report no longer has")
    assert write_report(report, run, metrics) == report / "report.html"
    written = {p.name: p.read_bytes() for p in report.iterdir()}
    assert "old_plot.png" not in written and b"edgeinspect evaluation" in written["report.html"]
    with pytest.raises(TypeError):  # a failure while writing: the report stays as it was
        write_report(report, run, {"confusion": {"tp": 0, "fn": 1, "fp": 1, "tn": 0}, "bad": object()})
    assert {p.name: p.read_bytes() for p in report.iterdir()} == written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]  # no staging folder left
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(DataError, match="not a report"):
        write_report(tmp_path / "notes", run, metrics)
    assert [p.name for p in (tmp_path / "notes").iterdir()] == ["todo.txt"]


def test_report_has_training_curves_from_a_history(patchcore_bundle: Path, synth_root: Path, tmp_path: Path) -> None:
    from edgeinspect.train.evaluate import run_inference
    from edgeinspect.train.report import ranked, report_plots

    run = run_inference(patchcore_bundle, synth_root, SYNTH_CATEGORY, "onnx", progress=False)
    run.bundle.manifest["training"] = {"history": {"loss": [1.0, 0.5, 0.25]}}
    plots = report_plots(run, {"confusion": {"tp": 1, "fn": 0, "fp": 0, "tn": 1}}, n_tiles=2)
    assert "training_curves.png" in plots and "overlays.png" in plots
    labels, scores = np.array([0, 0, 1, 1]), np.array([0.1, 0.9, 0.2, 0.8])
    best, worst = ranked(labels, scores, 0.5, 2)
    assert list(best) == [0, 3] and list(worst) == [1, 2]
