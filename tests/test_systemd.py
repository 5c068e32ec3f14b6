"""systemd's notify protocol spoken by a real serving daemon to a real Unix datagram socket."""

from __future__ import annotations

import configparser
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from conftest import SYNTH_CATEGORY, free_tcp_endpoint

from edgeinspect.runtime.systemd import SystemdNotifier

REPO = Path(__file__).resolve().parents[1]


def _messages(sock: socket.socket, until: str, limit: int = 200) -> list[str]:
    got = []
    for _ in range(limit):
        got.append(sock.recv(4096).decode())
        if got[-1].startswith(until):
            return got
    raise AssertionError(f"no {until} in {got}")


def test_a_daemon_under_systemd_says_ready_pings_the_watchdog_and_says_stopping(
        patchcore_bundle: Path, synth_root: Path, tmp_path: Path) -> None:
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, src in enumerate(sorted((synth_root / SYNTH_CATEGORY / "test" / "good").glob("*.png"))[:3]):
        (folder / f"{i}.png").write_bytes(src.read_bytes())
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    notify.settimeout(120)
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "10000000"}
    proc = subprocess.Popen([sys.executable, "-m", "edgeinspect", "-q", "serve", "--bundle", str(patchcore_bundle),
                             "--camera", str(folder), "--publish", free_tcp_endpoint(), "--loop"],
                            env=env, stderr=subprocess.PIPE, text=True)
    try:
        ready = _messages(notify, "READY=1")
        assert len(ready) == 1 and "STATUS=1 of 1 cameras running; cam0: running" in ready[0]  # nothing before
        assert _messages(notify, "WATCHDOG=1")[-1].split("\n")[1].startswith("STATUS=1 of 1 cameras running")
        proc.send_signal(signal.SIGTERM)
        assert "STATUS=0 of 1 cameras running; cam0: stopped" in _messages(notify, "STOPPING=1")[-2]
    finally:
        notify.close()
        assert proc.wait(timeout=60) == 0, proc.stderr.read()


def test_abstract_socket_addresses_and_no_socket_at_all() -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"edgeinspect-test-{os.getpid()}"
    listener.bind("\0" + name)
    listener.settimeout(5)
    try:
        notifier = SystemdNotifier(["a", "b"], {"NOTIFY_SOCKET": "@" + name})
        notifier.on_status({"camera": "a", "state": "running", "frames": 0, "fps": 0})
        notifier.on_status({"camera": "b", "state": "running", "frames": 0, "fps": 0})  # every camera: ready
        assert listener.recv(4096).decode().startswith("READY=1\nSTATUS=2 of 2 cameras running; b: running")
        notifier.on_status({"camera": "a", "state": "running", "frames": 5, "fps": 2.5})
        assert listener.recv(4096).decode() == "STATUS=2 of 2 cameras running; a: running, 5 frames, 2.5 fps"
        notifier.close()  # (no WATCHDOG=1 above: no watchdog was asked for)
    finally:
        listener.close()
    outside = SystemdNotifier(["a"], {})
    assert outside.notify("READY=1") is False  # outside systemd: nothing, no error
    gone = SystemdNotifier(["a"], {"NOTIFY_SOCKET": "/nonexistent/notify.sock", "WATCHDOG_USEC": "1000000"})
    assert gone.watchdog_s == 1.0 and gone.notify("WATCHDOG=1") is False  # logged, never raised


def test_a_paused_camera_keeps_the_watchdog_fed(tmp_path: Path) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(tmp_path / "notify.sock"))
    listener.settimeout(5)
    try:
        notifier = SystemdNotifier(["a"], {"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "10000000"})
        notifier.on_status({"camera": "a", "state": "running", "frames": 3, "fps": 1.0})
        assert listener.recv(4096).decode().startswith("READY=1\n")
        for _ in range(2):  # `edgeinspect ctl pause`: the loop goes on sending heartbeats, systemd must not kill it
            notifier.on_status({"camera": "a", "state": "paused", "frames": 3, "fps": 0})
            message = listener.recv(4096).decode()
            assert message == "WATCHDOG=1\nSTATUS=0 of 1 cameras running; a: paused, 3 frames, 0 fps"
        notifier.close()
    finally:
        listener.close()


def test_the_unit_file_is_type_notify_with_a_watchdog_and_real_serve_options() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str
    unit.read(REPO / "deploy" / "systemd" / "edgeinspect@.service")
    service = unit["Service"]
    assert service["Type"] == "notify" and int(service["WatchdogSec"]) > 1
    options = [word for word in service["ExecStart"].split() if word.startswith("--")]
    serve_help = subprocess.run([sys.executable, "-m", "edgeinspect", "serve", "--help"], capture_output=True,
                                text=True, check=True).stdout
    assert options and all(option in serve_help for option in options)
    example = (REPO / "deploy" / "systemd" / "cam.env.example").read_text().splitlines()
    env_keys = {line.split("=")[0] for line in example if line and not line.startswith("#")}
    used = {word[2:-1] for word in service["ExecStart"].split() if word.startswith("${")}
    assert used <= env_keys
