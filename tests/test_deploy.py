"""The container image and the Kubernetes manifests agree with the daemon (CI lints the Dockerfile with
hadolint and validates the manifests with kubernetes-validate and checkov; here, what those cannot know)."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import yaml

from task_runner.server.config import load
from tests.conftest import REPO

MANIFESTS = REPO / "deploy" / "kubernetes"


def manifests() -> dict[str, dict[str, Any]]:
    found = {}
    for path in sorted(MANIFESTS.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            found[document["kind"]] = document
    return found


def test_the_manifests_fit_the_daemon(tmp_path: Path) -> None:
    m = manifests()
    assert set(m) == {"Namespace", "ConfigMap", "Secret", "Service", "Deployment", "PodDisruptionBudget",
                      "NetworkPolicy"}
    text = m["ConfigMap"]["data"]["config.toml"]
    config = tomllib.loads(text)
    pod = m["Deployment"]["spec"]["template"]
    spec = pod["spec"]
    assert spec["terminationGracePeriodSeconds"] > config["drain_grace_s"] + 5  # the drain ends before the kill
    (container,) = spec["containers"]
    assert container["readinessProbe"]["grpc"] == {"port": 50051, "service": "task_runner.v1.TaskRunner"}
    assert container["livenessProbe"]["grpc"]["port"] == 50051
    assert config["listen"] == ["0.0.0.0:50051"] and "token_file" in config["auth"]  # token: probes stay plaintext
    mounts = {mount["name"]: mount["mountPath"] for mount in container["volumeMounts"]}
    assert config["auth"]["token_file"] == f"{mounts['secret']}/token"
    assert config["workdir_base"].startswith(mounts["work"])
    assert {"SYS_ADMIN", "NET_ADMIN", "SETUID", "SETGID"} <= set(container["securityContext"]["capabilities"]["add"])
    service = m["Service"]["spec"]
    assert service["clusterIP"] == "None"  # headless: the clients balance per call
    labels = pod["metadata"]["labels"]
    for selector in (service["selector"], m["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"],
                     m["Deployment"]["spec"]["selector"]["matchLabels"]):
        assert selector.items() <= labels.items()
    # The config is one the daemon takes (its token file aside, which the Secret provides).
    token = tmp_path / "token"
    token.write_text("x" * 32)
    local = tmp_path / "config.toml"
    local.write_text(text.replace(config["auth"]["token_file"], str(token)))
    assert load(local).auth.token_file == str(token)


def test_the_image_runs_the_daemon_as_pid_1() -> None:
    lines = [line.strip() for line in (REPO / "Dockerfile").read_text().splitlines()]
    assert 'ENTRYPOINT ["task-runner"]' in lines and "STOPSIGNAL SIGTERM" in lines  # exec form: no shell in between
    assert sum(line.startswith("FROM ") for line in lines) == 2  # multi-stage: no build tools in the image
    assert any("useradd" in line and "task-runner-tasks" in line for line in lines)
    config = manifests()["ConfigMap"]["data"]["config.toml"]
    assert 'run_as_user = "task-runner-tasks"' in config
