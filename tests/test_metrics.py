"""/metrics: on loopback unless configured otherwise, behind a bearer token where one is set, closed to tasks.

Every request here goes to 127.0.0.1; a non-loopback `metrics_listen` is only ever a config value, refused
before anything is bound.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from task_runner.server.config import ConfigError, load
from tests.conftest import REPO, Daemon, start_daemon

TOKEN = "metrics-token-0123456789abcdef"


@pytest.fixture(scope="module")
def token_file() -> Iterator[Path]:
    """The metrics token; outside /tmp where the daemon can be root, since a task's private /tmp would hide it
    whatever the daemon does: only a directory a task could otherwise see shows that the daemon hides it."""
    directory = Path(tempfile.mkdtemp(prefix="task-runner-metrics-", dir="/run" if os.geteuid() == 0 else None))
    (directory / "token").write_text(TOKEN + "\n")
    yield directory / "token"
    shutil.rmtree(directory)


@pytest.fixture(scope="module")
def metered(tmp_path_factory: pytest.TempPathFactory, token_file: Path) -> Iterator[tuple[Daemon, str]]:
    """A daemon with its metrics on an ephemeral loopback port behind a token; and their URL (from its log)."""
    d = start_daemon(tmp_path_factory.mktemp("metered"),
                     f'cgroup = "off"\nmetrics_listen = "127.0.0.1:0"\nmetrics_token_file = "{token_file}"\n',
                     args=("--task", "scrape=tests.tasks.metrics_probe:scrape"))
    found = re.search(r"metrics on http://(127\.0\.0\.1:\d+)/metrics \(bearer token", d.log_text())
    assert found, d.log_text()
    yield d, f"http://{found.group(1)}/metrics"
    assert d.stop() == 0, d.log_text()


def get(url: str, authorization: str | None = None) -> tuple[int, str, str]:
    """(status, body, WWW-Authenticate) of a GET."""
    request = urllib.request.Request(url, headers={"Authorization": authorization} if authorization else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as page:
            return page.status, page.read().decode(), page.headers.get("WWW-Authenticate", "")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(), exc.headers.get("WWW-Authenticate", "")


def task_runner(*args: str) -> subprocess.CompletedProcess[str]:
    """`task-runner ARGS`, run to its exit."""
    return subprocess.run([sys.executable, "-m", "task_runner.server.cli", *args], capture_output=True, text=True,
                          timeout=60, cwd=REPO)


def test_metrics_answer_401_without_their_token_and_200_with_it(metered: tuple[Daemon, str]) -> None:
    _, url = metered
    for wrong in (None, "Bearer wrong-token-0123456789abcdef", f"Basic {TOKEN}", f"Bearer {TOKEN}x", "Bearer",
                  f"Bearer {TOKEN[:-1]}"):
        status, body, challenge = get(url, wrong)
        assert (status, challenge) == (401, 'Bearer realm="metrics"'), wrong
        assert "task_runner_" not in body
    status, body, _ = get(url, f"Bearer {TOKEN}")
    assert status == 200 and "task_runner_tasks_running" in body
    assert get(url, f"bearer {TOKEN}")[0] == 200  # a scheme's name is case-insensitive (RFC 9110)


@pytest.mark.skipif(os.geteuid() != 0, reason="a root daemon's sandbox (rootless: tests/test_rootless.py)")
def test_a_task_on_the_hosts_network_reads_neither_the_token_nor_the_metrics(metered: tuple[Daemon, str],
                                                                            token_file: Path) -> None:
    """The attack of issue 26: a task with network = "host" (the default) scrapes its daemon's metrics port;
    it gets 401, and cannot read the token from the token file (its directory is hidden from tasks)."""
    daemon, url = metered
    with daemon.client() as client:
        answer = client.call("scrape", 20_000, {"url": url, "token_file": str(token_file)}).result
    assert answer == {"status": 401, "read_the_token": False}


@pytest.mark.parametrize("address", ["0.0.0.0:9464", "[::]:9464", "10.1.2.3:9464", "metrics.example:9464"])
def test_a_metrics_listen_off_loopback_needs_a_token_or_insecure(address: str, token_file: Path) -> None:
    with pytest.raises(ConfigError, match=r"not a loopback address.*Set metrics_token_file.*insecure = true"):
        load(None, metrics_listen=address)
    assert load(None, metrics_listen=address, metrics_token_file=str(token_file)).metrics_listen == address
    assert load(None, metrics_listen=address, insecure=True).metrics_listen == address
    for local in ("127.0.0.1:9464", "[::1]:9464", "localhost:9464"):
        assert load(None, metrics_listen=local).metrics_listen == local
    with pytest.raises(ConfigError, match="must be host:port"):
        load(None, metrics_listen="9464")


def test_serve_and_check_config_refuse_an_open_metrics_port_without_a_token(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'listen = ["unix:{tmp_path / "daemon.sock"}"]\nmetrics_listen = "0.0.0.0:9464"\n')
    for done in (task_runner("serve", "--config", str(config)), task_runner("check-config", str(config))):
        assert done.returncode == 2, done
        assert "'metrics_listen' = '0.0.0.0:9464' is not a loopback address" in done.stderr, done.stderr
        assert "Set metrics_token_file" in done.stderr and "insecure = true" in done.stderr
    assert not (tmp_path / "daemon.sock").exists()  # refused before anything was bound


@pytest.mark.parametrize(("content", "why"), [(None, "No such file"), ("short", "shorter than 16 characters")])
def test_serve_refuses_a_metrics_token_it_cannot_use(tmp_path: Path, content: str | None, why: str) -> None:
    token = tmp_path / "metrics-token"
    if content is not None:
        token.write_text(content)
    config = tmp_path / "config.toml"
    config.write_text(f'listen = ["unix:{tmp_path / "daemon.sock"}"]\ncgroup = "off"\n'
                      f'metrics_listen = "127.0.0.1:0"\nmetrics_token_file = "{token}"\n')
    serve = task_runner("serve", "--config", str(config))
    assert serve.returncode == 1, serve
    assert "metrics_token_file" in serve.stderr and why in serve.stderr, serve.stderr
