"""The container image and the Kubernetes manifests agree with the daemon (CI lints the Dockerfile with
hadolint and validates the manifests with kubernetes-validate and checkov; here, what those cannot know)."""

from __future__ import annotations

import errno
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import yaml

from task_runner.server.config import load
from task_runner.server.security import is_loopback
from tests.conftest import REPO, required_tool

MANIFESTS = REPO / "deploy" / "kubernetes"
# What the daemon itself may hold in the pod besides its tasks: its own process and queued requests
# (max_queued_bytes, 256 MiB, at up to 1.5 x), the fork server and the spare task processes.
DAEMON_MIB = 1536
CONTEXT_MAX_BYTES = 10 << 20  # the build context without what .dockerignore leaves out


def manifests() -> dict[tuple[str, str], dict[str, Any]]:
    """Every manifest, by (kind, name)."""
    found = {}
    for path in sorted(MANIFESTS.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            found[document["kind"], document["metadata"]["name"]] = document
    return found


def configmap_text() -> str:
    text: str = manifests()["ConfigMap", "task-runner"]["data"]["config.toml"]
    return text


def local_copy(tmp_path: Path) -> Path:
    """The ConfigMap's config as this machine can check it: its tokens (which the Secrets provide) in files
    here, and without run_as_user (the image's user, which this machine need not have)."""
    text = configmap_text()
    config = tomllib.loads(text)
    for secret in (config["auth"]["token_file"], config["metrics_token_file"]):
        token = tmp_path / Path(secret).parent.name / "token"
        token.parent.mkdir()
        token.write_text("x" * 32)
        text = text.replace(f'"{secret}"', f'"{token}"')
    local = tmp_path / "config.toml"
    local.write_text(text.replace(f'run_as_user = "{config["run_as_user"]}"\n', ""))
    return local


def mebibytes(quantity: str) -> int:
    number, unit = re.fullmatch(r"(\d+)(Mi|Gi)", quantity).groups()  # type: ignore[union-attr]
    return int(number) << (10 if unit == "Gi" else 0)


def test_the_manifests_fit_the_daemon(tmp_path: Path) -> None:
    m = manifests()
    assert {kind for kind, _ in m} == {"Namespace", "ConfigMap", "Secret", "Service", "Deployment",
                                       "PodDisruptionBudget", "NetworkPolicy"}
    text = configmap_text()
    config = tomllib.loads(text)
    pod = m["Deployment", "task-runner"]["spec"]["template"]
    spec = pod["spec"]
    assert spec["terminationGracePeriodSeconds"] > config["drain_grace_s"] + 5  # the drain ends before the kill
    (container,) = spec["containers"]
    assert container["readinessProbe"]["grpc"] == {"port": 50051, "service": "task_runner.v1.TaskRunner"}
    assert container["livenessProbe"]["grpc"]["port"] == 50051
    assert config["listen"] == ["0.0.0.0:50051"] and "token_file" in config["auth"]  # token: probes stay plaintext
    mounts = {mount["name"]: mount["mountPath"] for mount in container["volumeMounts"]}
    assert config["auth"]["token_file"] == f"{mounts['secret']}/token"
    assert config["workdir_base"].startswith(mounts["work"])
    assert set(container["securityContext"]["capabilities"]["add"]) == {"SETUID", "SETGID", "SETFCAP"}
    first, _, last = config["task_uids"].partition("-")
    assert 0 < int(first) <= int(last) < 65534 and spec["hostUsers"] is False  # within the pod's 65,536 uids
    service = m["Service", "task-runner"]["spec"]
    assert service["clusterIP"] == "None"  # headless: the clients balance per call
    labels = pod["metadata"]["labels"]
    for selector in (service["selector"], m["PodDisruptionBudget", "task-runner"]["spec"]["selector"]["matchLabels"],
                     m["Deployment", "task-runner"]["spec"]["selector"]["matchLabels"]):
        assert selector.items() <= labels.items()
    # The config is one the daemon takes (its tokens aside, which the Secrets provide).
    assert load(local_copy(tmp_path)).auth.token_file.startswith(str(tmp_path))  # type: ignore[union-attr]


def test_the_configmap_serves_only_its_own_tasks_within_limits_that_fit_the_pod() -> None:
    config = tomllib.loads(configmap_text())
    assert config["entry_points"] is False  # not the package's example tasks
    limits = config["limits"]
    assert set(limits) == {"memory_mb", "cpu_s", "processes", "open_files", "file_size_mb"}
    assert all(isinstance(value, int) and value > 0 for value in limits.values())
    # No cgroup per task in a pod: the tasks' limits must fit in the pod's with the daemon. A private /tmp
    # is a tmpfs, memory too, which no RLIMIT_AS counts.
    (container,) = manifests()["Deployment", "task-runner"]["spec"]["template"]["spec"]["containers"]
    per_task = limits["memory_mb"] + config["sandbox"]["tmp_mb"]
    assert config["max_running"] * per_task + DAEMON_MIB <= mebibytes(container["resources"]["limits"]["memory"])
    assert config["tasks"], "a [tasks] table showing how to register one's own"


def test_check_config_accepts_the_configmap_with_the_image_s_placeholder_tasks(tmp_path: Path) -> None:
    """The [tasks] placeholder is one check-config accepts: its target imports where the image installs
    deploy/mytasks (here: on PYTHONPATH), and it is all the daemon serves."""
    local = local_copy(tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "deploy" / "mytasks"), str(REPO)])}
    done = subprocess.run([sys.executable, "-m", "task_runner.server.cli", "check-config", str(local)], env=env,
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    tasks = tomllib.loads(configmap_text())["tasks"]
    assert f"OK ({len(tasks)} tasks" in done.stdout
    assert list(load(local).catalogue) == sorted(tasks)
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "ARG TASKS=deploy/mytasks" in dockerfile and "./tasks" in dockerfile  # the image installs them


def test_the_metrics_need_the_token_prometheus_is_given(tmp_path: Path) -> None:
    m = manifests()
    config = tomllib.loads(configmap_text())
    pod = m["Deployment", "task-runner"]["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    port = int(config["metrics_listen"].rpartition(":")[2])
    assert not is_loopback(config["metrics_listen"]) and config["metrics_token_file"]  # scraped on the pod's IP
    assert {"name": "metrics", "containerPort": port} in container["ports"]
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(port)
    assert {"name": "metrics", "port": port, "targetPort": "metrics"} in m["Service", "task-runner"]["spec"]["ports"]
    mounts = {mount["name"]: mount["mountPath"] for mount in container["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in pod["spec"]["volumes"]}
    directory, _, key = config["metrics_token_file"].rpartition("/")
    (name,) = (name for name, path in mounts.items() if path == directory)
    secret = m["Secret", volumes[name]["secret"]["secretName"]]
    assert key in secret["stringData"] and secret["metadata"]["name"] != "task-runner"  # Prometheus gets it alone
    assert load(local_copy(tmp_path)).metrics_token_file


def test_the_image_runs_the_daemon_as_pid_1() -> None:
    lines = [line.strip() for line in (REPO / "Dockerfile").read_text().splitlines()]
    assert 'ENTRYPOINT ["task-runner"]' in lines and "STOPSIGNAL SIGTERM" in lines  # exec form: no shell in between
    assert sum(line.startswith("FROM ") for line in lines) == 2  # multi-stage: no build tools in the image
    assert any("useradd" in line and "task-runner-tasks" in line for line in lines)
    assert 'run_as_user = "task-runner-tasks"' in configmap_text()


def dockerignore() -> list[tuple[bool, re.Pattern[str]]]:
    """.dockerignore's rules, in order: (an exception "!...", the path they match), as Docker reads them
    (moby/patternmatcher): relative to the context, `*` and `?` within a segment, `**` across segments."""
    rules = []
    for line in (REPO / ".dockerignore").read_text().splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        exception = pattern.startswith("!")
        pattern = os.path.normpath(pattern.removeprefix("!").strip()).lstrip("/")
        regex = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        regex = regex.replace(r"\?", "[^/]").replace(r"\[", "[").replace(r"\]", "]")
        rules.append((exception, re.compile(regex)))
    return rules


def excluded(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether .dockerignore leaves `path` (relative to the context) out: the last rule matching it or a
    folder above it decides."""
    parts = path.split("/")
    out = False
    for exception, regex in rules:
        if any(regex.fullmatch("/".join(parts[:end])) for end in range(1, len(parts) + 1)):
            out = not exception
    return out


def copied_sources() -> list[str]:
    """The context paths the Dockerfile COPYs (its ARGs' defaults put in)."""
    text = (REPO / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.MULTILINE))
    sources = []
    for line in re.findall(r"^COPY (.+)$", text, re.MULTILINE):
        words = shlex.split(line)
        if not any(word.startswith("--from") for word in words):
            sources += [re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], word) for word in words[:-1]]
    return sources


def test_the_build_context_holds_what_the_image_copies_and_not_the_heavy_rest() -> None:
    rules = dockerignore()
    sources = copied_sources()
    assert {"pyproject.toml", "README.md", "src", "deploy/mytasks"} <= set(sources)
    tracked = subprocess.run(["git", "ls-files", "--", *sources], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.split()
    assert len(tracked) > 20 and not [path for path in tracked if excluded(path, rules)]
    heavy = [".git", ".venv/bin/python", ".venv-deploy/lib/x.py", ".venv-other/x", "tests/node/node_modules/x/y.js",
             "server/__pycache__/config.cpython-311.pyc", "deploy/mytasks/mytasks/__pycache__/x.pyc", ".mypy_cache/x",
             ".pytest_cache/x", ".ruff_cache/x", "bench/out/run.json", "build/lib/x.py", "x.egg-info/PKG-INFO"]
    assert [path for path in heavy if not excluded(path, rules)] == []
    # What a build here would send, this checkout's venvs and caches included.
    assert not any(exception for exception, _ in rules)  # (so an excluded folder's files are all excluded)
    size = 0
    for top, folders, files in os.walk(REPO):
        here = "" if Path(top) == REPO else os.path.relpath(top, REPO).replace(os.sep, "/") + "/"
        folders[:] = [f for f in folders if not excluded(here + f, rules)]
        size += sum(os.lstat(os.path.join(top, f)).st_size for f in files if not excluded(here + f, rules))
    assert size < CONTEXT_MAX_BYTES, size


# Pod Security Standards, "baseline" (kubernetes.io/docs/concepts/security/pod-security-standards), as of
# Kubernetes 1.33: what a pod may add, and where it may not go.
BASELINE_CAPABILITIES = {"AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD",
                         "NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT"}
BASELINE_SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}
BASELINE_SYSCTLS = {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
                    "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                    "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
                    "net.ipv4.tcp_keepalive_probes"}


def baseline_violations(pod: dict[str, Any]) -> list[str]:
    """What in a pod template breaks Pod Security "baseline", each as the field and its value."""
    spec, found = pod["spec"], []
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(field):
            found.append(f"spec.{field}: true")
    containers = [*spec.get("containers", []), *spec.get("initContainers", []), *spec.get("ephemeralContainers", [])]
    contexts = [("spec.securityContext", spec.get("securityContext") or {})] + [
        (f"container {c['name']}", c.get("securityContext") or {}) for c in containers]
    for where, context in contexts:
        if (context.get("windowsOptions") or {}).get("hostProcess"):
            found.append(f"{where}.windowsOptions.hostProcess")
        if context.get("privileged"):
            found.append(f"{where}.privileged")
        if added := set((context.get("capabilities") or {}).get("add", [])) - BASELINE_CAPABILITIES:
            found.append(f"{where}.capabilities.add: {sorted(added)}")
        for profile in ("seccompProfile", "appArmorProfile"):
            if (context.get(profile) or {}).get("type") == "Unconfined":
                found.append(f"{where}.{profile}: Unconfined")
        selinux = context.get("seLinuxOptions") or {}
        if selinux.get("type", "") not in BASELINE_SELINUX_TYPES or selinux.get("user") or selinux.get("role"):
            found.append(f"{where}.seLinuxOptions: {selinux}")
        # Unmasked only where the pod has a user namespace of its own.
        if context.get("procMount", "Default") != "Default" and spec.get("hostUsers", True):
            found.append(f"{where}.procMount: {context['procMount']} without hostUsers: false")
    for sysctl in (spec.get("securityContext") or {}).get("sysctls", []):
        if sysctl["name"] not in BASELINE_SYSCTLS:
            found.append(f"sysctl {sysctl['name']}")
    found += [f"hostPath volume {v['name']}" for v in spec.get("volumes", []) if "hostPath" in v]
    found += [f"hostPort {p['hostPort']}" for c in containers for p in c.get("ports", []) if p.get("hostPort")]
    for key, value in (pod.get("metadata", {}).get("annotations") or {}).items():
        if key.startswith("container.apparmor.security.beta.kubernetes.io/") and not (
                value == "runtime/default" or value.startswith("localhost/")):
            found.append(f"annotation {key}: {value}")
    return found


def test_the_deployment_is_within_pod_security_baseline() -> None:
    pod = manifests()["Deployment", "task-runner"]["spec"]["template"]
    assert baseline_violations(pod) == []
    # ... and the checker sees what the Deployment had before (SYS_ADMIN, NET_ADMIN, an Unconfined AppArmor).
    before = {"spec": {"containers": [{"name": "old", "securityContext": {
        "capabilities": {"add": ["SETUID", "SYS_ADMIN", "NET_ADMIN"]}, "appArmorProfile": {"type": "Unconfined"},
        "procMount": "Unmasked"}}], "hostPID": True, "volumes": [{"name": "root", "hostPath": {"path": "/"}}]}}
    assert baseline_violations(before) == [
        "spec.hostPID: true", "container old.capabilities.add: ['NET_ADMIN', 'SYS_ADMIN']",
        "container old.appArmorProfile: Unconfined", "container old.procMount: Unmasked without hostUsers: false",
        "hostPath volume root"]


def test_the_nodes_seccomp_profile_refuses_what_the_tasks_filter_does_but_the_sandboxs_calls() -> None:
    """The pod's profile is the daemon's filter for its tasks less what a sandbox is made of: it never allows
    the daemon a call its tasks' filter refuses for another reason, nor forgets one added there."""
    from task_runner.server.sandbox import seccomp

    profile = json.loads((REPO / "deploy" / "node" / "seccomp" / "task-runner.json").read_text())
    assert profile["defaultAction"] == "SCMP_ACT_ALLOW"
    (refused,) = profile["syscalls"]
    assert refused["action"] == "SCMP_ACT_ERRNO" and refused["errnoRet"] == errno.EPERM
    sandbox_calls = {"mount", "move_mount", "open_tree", "mount_setattr", "unshare", "setns"}
    assert set(refused["names"]) == set(seccomp.REFUSED) - sandbox_calls
    pod = manifests()["Deployment", "task-runner"]["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    for context in (pod["spec"]["securityContext"], container["securityContext"]):
        assert context["seccompProfile"] == {"type": "Localhost", "localhostProfile": "profiles/task-runner.json"}
    assert container["securityContext"]["appArmorProfile"] == {"type": "Localhost", "localhostProfile": "task-runner"}


def test_the_nodes_apparmor_profile_parses() -> None:
    parser = required_tool("apparmor_parser", "apparmor")
    path = REPO / "deploy" / "node" / "apparmor" / "task-runner"
    # -Q: parse and compile, load nothing into the kernel.
    done = subprocess.run([parser, "-Q", "-K", str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "\n  mount,\n" in path.read_text() and "profile task-runner " in path.read_text()
