"""The daemon's secrets, attacked: no task reads one, before or after it is rotated by a rename.

A spare task process sets its sandbox up when it is forked; each test readies spares, then rotates a
caller's token as operators and Kubernetes do (a file renamed over, a directory swapped in, a symlink
flipped), then calls more tasks than there are spares: none may see the new token (nor the old).
Tasks run as root (no run_as_user) and as nobody; the token files are world-readable, so that only
the sandbox stands between a task and them.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from task_runner.client import Client, Security, Unauthenticated, Unavailable
from tests.conftest import REPO, Daemon, open_directory, start_daemon, wait_until

HOSTILE = "tests.tasks.hostile_secrets"
SPARES = 2
OLD, NEW = "old-token-of-the-ops-caller-0001", "new-token-of-the-ops-caller-0002"
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="a root daemon's sandbox (rootless: tests/test_rootless.py)")
AS = pytest.mark.parametrize("run_as", ["root", "nobody"])


def config(run_as: str, token_file: Path | str, sandbox: str = "", tables: str = "") -> str:
    user = 'run_as_user = "nobody"\n' if run_as == "nobody" else ""
    return (f'{user}cgroup = "off"\nspare_processes = {SPARES}\n[sandbox]\n{sandbox}'
            f'[tasks.read_paths]\ntarget = "{HOSTILE}:read_paths"\n'
            f'[callers.ops]\ntoken_file = "{token_file}"\ntasks = ["*"]\n{tables}')


@pytest.fixture
def run_dir() -> Iterator[Path]:
    """A directory outside /tmp (which a task's private /tmp covers anyway) that every uid may enter."""
    with open_directory("task-runner-secrets-", 0o755, "/run") as path:
        yield path


def put(path: Path, text: str) -> Path:
    """A world-readable file, in a world-readable directory."""
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    path.write_text(text + "\n")
    path.chmod(0o644)
    return path


def hiding(daemon: Daemon, *paths: str) -> int:
    """How many mount namespaces under the daemon (its spares') have a mount on one of `paths` (its hide)."""
    namespaces = set()
    for process in psutil.Process(daemon.process.pid).children(recursive=True):
        with contextlib.suppress(OSError), open(f"/proc/{process.pid}/mountinfo") as f:
            if any(line.split()[4] in paths for line in f):
                namespaces.add(os.readlink(f"/proc/{process.pid}/ns/mnt"))
    return len(namespaces)


def spares_ready(daemon: Daemon, *paths: str) -> None:
    assert wait_until(lambda: hiding(daemon, *paths) >= SPARES, 30), daemon.log_text()


def reads(daemon: Daemon, paths: list[Path | str], times: int = SPARES + 2, token: str = OLD) -> list[dict[str, Any]]:
    """What `times` calls in a row see at `paths` (more calls than spares: every spare ready before serves)."""
    with Client(daemon.unix, security=Security(token=token)) as client:
        return [client.call("read_paths", 10_000, {"paths": [str(p) for p in paths]}).result for _ in range(times)]


def assert_no_token(seen: list[dict[str, Any]], run_as: str) -> None:
    for result in seen:
        assert (result["uid"] == 0) == (run_as == "root"), result
        text = json.dumps(result)
        assert NEW not in text and OLD not in text, result


@AS
def test_a_token_renamed_over_in_a_directory_code_is_imported_from_stays_hidden(run_dir: Path, run_as: str) -> None:
    """The token sits in a folder on the daemon's sys.path, so only the file is hidden (/dev/null over it); a
    new token renamed over it is a new file the old spares' /dev/null does not cover: they are not used."""
    app = run_dir / "app"
    token = put(app / "token", OLD)
    daemon = start_daemon(run_dir / "d", config(run_as, token), env={"PYTHONPATH": f"{REPO}:{app}"})
    try:
        spares_ready(daemon, str(token))
        os.rename(put(app / "token.new", NEW), token)
        seen = reads(daemon, [token])
    finally:
        assert daemon.stop() == 0, daemon.log_text()
    assert_no_token(seen, run_as)
    # (/dev/null on a nodev mount: it opens for none, or reads empty)
    assert all(result["seen"][str(token)].get("content", "") == "" for result in seen), seen


@AS
def test_a_secret_directory_swapped_for_a_new_one_stays_hidden(run_dir: Path, run_as: str) -> None:
    """The token's directory is hidden whole; a new directory renamed into its place (the old one renamed
    away first) is not under the old spares' tmpfs, which moved away with the old directory."""
    secrets = run_dir / "secrets"
    put(secrets / "token", OLD)
    daemon = start_daemon(run_dir / "d", config(run_as, secrets / "token"))
    try:
        spares_ready(daemon, str(secrets))
        put(run_dir / "secrets.new" / "token", NEW)
        os.rename(secrets, run_dir / "secrets.old")
        os.rename(run_dir / "secrets.new", secrets)
        seen = reads(daemon, [secrets, secrets / "token"])
    finally:
        assert daemon.stop() == 0, daemon.log_text()
    assert_no_token(seen, run_as)
    assert all(result["seen"][str(secrets)] == {"exists": True, "listing": []} for result in seen), seen


def kubernetes_volume(volume: Path, version: str, token: str) -> None:
    """A Secret volume as the kubelet writes it: the files in a directory of the version, `..data` a symlink
    to it, each key a symlink into `..data`; a new version replaces `..data` by a rename, then the old goes."""
    put(volume / version / "token", token)
    os.symlink(version, volume / "..data_tmp")
    old = os.readlink(volume / "..data") if (volume / "..data").is_symlink() else None
    os.rename(volume / "..data_tmp", volume / "..data")
    if not (volume / "token").is_symlink():
        os.symlink("..data/token", volume / "token")
    if old is not None:
        shutil.rmtree(volume / old)


@AS
def test_a_kubernetes_secret_volume_rotated_by_its_data_symlink_stays_hidden(run_dir: Path, run_as: str) -> None:
    """token -> ..data/token, ..data -> ..2024_01: the kubelet writes ..2024_02 and flips ..data to it. The
    volume's directory (where the configured path is) is hidden whole, so no spare, old or new, shows either."""
    volume = run_dir / "volume"
    kubernetes_volume(volume, "..2024_01", OLD)
    daemon = start_daemon(run_dir / "d", config(run_as, volume / "token"))
    try:
        spares_ready(daemon, str(volume), str(volume / "..2024_01"))
        kubernetes_volume(volume, "..2024_02", NEW)
        seen = reads(daemon, [volume / "token", volume, volume / "..data" / "token", volume / "..2024_02" / "token"])
    finally:
        assert daemon.stop() == 0, daemon.log_text()
    assert_no_token(seen, run_as)
    assert all(result["seen"][str(volume)] == {"exists": True, "listing": []} for result in seen), seen


@AS
def test_a_token_symlink_flipped_out_of_every_hidden_directory_gets_new_sandboxes(run_dir: Path, run_as: str) -> None:
    """app/token -> store/v1/token, flipped to store/v2/token: no hide of the spares' profiles covers v2. The
    call that finds it is refused (retry), the daemon reloads, and the new sandboxes hide store/v2."""
    app, store = run_dir / "app", run_dir / "store"
    put(store / "v1" / "token", OLD)
    app.mkdir(mode=0o755)
    os.symlink(store / "v1" / "token", app / "token")
    daemon = start_daemon(run_dir / "d", config(run_as, app / "token"))
    try:
        spares_ready(daemon, str(store / "v1"))
        put(store / "v2" / "token", NEW)
        os.symlink(store / "v2" / "token", app / "token.new")
        os.rename(app / "token.new", app / "token")
        paths = [app / "token", store / "v2" / "token", store / "v2"]
        refused = []
        # The call that finds it is refused; its retries may come after the reload, which took the new token.
        with contextlib.suppress(Unavailable, Unauthenticated):
            refused = reads(daemon, paths, times=1)
        assert daemon.wait_for("STATUS=reloaded"), daemon.log_text()
        seen = refused + reads(daemon, paths, token=NEW)  # (a reload reads the callers' tokens afresh)
        with Client(daemon.unix, security=Security(token=NEW)) as client:
            shown = next(task.sandbox for task in client.tasks() if task.name == "read_paths")
    finally:
        assert daemon.stop() == 0, daemon.log_text()
    assert "secrets moved" in daemon.log_text()
    assert_no_token(seen, run_as)
    assert shown is not None and str(store / "v2") in shown.hide, shown


@AS
def test_every_secret_the_config_names_is_hidden(run_dir: Path, run_as: str) -> None:
    """The config's, [auth]'s token's, the TLS key's, the metrics token's and every caller's directory: empty."""
    put(run_dir / "auth" / "token", "the-auth-token-of-the-daemon-0003")
    put(run_dir / "metrics" / "token", "the-metrics-scrape-token-0004")
    put(run_dir / "ops" / "token", OLD)
    put(run_dir / "billing" / "token", "the-billing-callers-token-0005")
    (run_dir / "tls").mkdir(mode=0o755)
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out",
                    "server.pem", "-days", "2", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1"],
                   cwd=run_dir / "tls", check=True, capture_output=True, timeout=60)
    (run_dir / "tls" / "server.key").chmod(0o644)
    text = config(run_as, run_dir / "ops" / "token", tables=(
        f'[callers.billing]\ntoken_file = "{run_dir / "billing" / "token"}"\ntasks = ["read_paths"]\n'
        f'[auth]\ntoken_file = "{run_dir / "auth" / "token"}"\n'
        f'[tls]\ncert_file = "{run_dir / "tls" / "server.pem"}"\nkey_file = "{run_dir / "tls" / "server.key"}"\n'))
    text = f'metrics_token_file = "{run_dir / "metrics" / "token"}"\n{text}'
    directories = [run_dir / name for name in ("d", "auth", "metrics", "ops", "billing", "tls")]
    daemon = start_daemon(run_dir / "d", text)
    try:
        seen = reads(daemon, [*directories, run_dir / "d" / "config.toml", run_dir / "tls" / "server.key"], times=2)
    finally:
        assert daemon.stop() == 0, daemon.log_text()
    assert_no_token(seen, run_as)
    for result in seen:
        for directory in directories:
            assert result["seen"][str(directory)] == {"exists": True, "listing": []}, (directory, result)
        assert not result["seen"][str(run_dir / "d" / "config.toml")]["exists"], result
        assert "PRIVATE KEY" not in json.dumps(result), result


def test_a_tasks_hide_adds_to_the_daemon_wide_one(run_dir: Path) -> None:
    """[tasks.NAME.sandbox] hide adds to [sandbox]'s: a task with a hide of its own still finds the paths
    [sandbox] hides empty, and ListTasks shows both (and the daemon's secrets), for it and for the others."""
    own = put(run_dir / "own" / "file", "hidden by the task's own hide")
    token = put(run_dir / "ops" / "token", OLD)
    text = config("nobody", token, sandbox='hide = ["/usr/share/doc"]\n', tables=(
        f'[tasks.own_hide]\ntarget = "{HOSTILE}:read_paths"\nsandbox = {{hide = ["{own.parent}"]}}\n'))
    daemon = start_daemon(run_dir / "d", text)
    try:
        with Client(daemon.unix, security=Security(token=OLD)) as client:
            shown = {task.name: task.sandbox for task in client.tasks()}
            seen = client.call("own_hide", 10_000, {"paths": ["/usr/share/doc", str(own.parent)]}).result["seen"]
            other = client.call("read_paths", 10_000, {"paths": ["/usr/share/doc", str(own.parent)]}).result["seen"]
    finally:
        assert daemon.stop() == 0, daemon.log_text()
    assert os.listdir("/usr/share/doc")  # (it is not empty on the host)
    assert seen["/usr/share/doc"] == {"exists": True, "listing": []} == seen[str(own.parent)], seen
    assert other["/usr/share/doc"]["listing"] == [] and other[str(own.parent)]["listing"] == ["file"], other
    own_sandbox, other_sandbox = shown["own_hide"], shown["read_paths"]
    assert own_sandbox is not None and other_sandbox is not None
    assert {"/usr/share/doc", str(own.parent), str(token.parent)} <= set(own_sandbox.hide), own_sandbox
    assert {"/usr/share/doc", str(token.parent)} <= set(other_sandbox.hide), other_sandbox
    assert str(own.parent) not in other_sandbox.hide
