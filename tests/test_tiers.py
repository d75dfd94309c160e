"""The tiers tests/conftest.py gives each test by what it uses, as `pytest -m TIER` selects them."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO, TIERS

FILES = ["tests/test_systemd.py", "tests/test_callers.py", "tests/test_lifecycle.py", "tests/test_metrics.py"]
EXPECTED = {
    # the daemon fixture (through `client`), start_daemon itself, `-m task_runner.server` and `serve` by hand
    "tests/test_contract.py::test_success_round_trips_options": "daemon",
    "tests/test_systemd.py::test_watchdog_pings": "daemon",
    "tests/test_lifecycle.py::test_listen_failure_is_reported": "daemon",
    "tests/test_metrics.py::test_serve_and_check_config_refuse_an_open_metrics_port_without_a_token": "daemon",
    # a module fixture built on tests/inprocess.py, and a helper of the tests that makes one
    "tests/test_callers.py::test_each_caller_runs_only_its_tasks": "inprocess",
    "tests/test_callers.py::test_a_reload_adds_removes_and_changes_callers": "inprocess",
    # no daemon: a config loaded, a unit file read, the check-config command
    "tests/test_systemd.py::test_example_config_is_valid": "unit",
    "tests/test_callers.py::test_check_config_validates_the_callers": "unit",
    "tests/test_tiers.py::test_each_test_is_in_the_tier_of_what_it_uses": "unit",
}


def collected(tier: str) -> set[str]:
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-m", tier,
                           "tests/test_contract.py", "tests/test_tiers.py", *FILES],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    return {line for line in done.stdout.splitlines() if "::" in line}


def test_each_test_is_in_the_tier_of_what_it_uses() -> None:
    tiers = {tier: collected(tier) for tier in TIERS}
    for test, tier in EXPECTED.items():
        assert [name for name, tests in tiers.items() if test in tests] == [tier], test
    every = set().union(*tiers.values())
    assert collected("not slow") <= every  # each test has a tier ...
    assert sum(map(len, tiers.values())) == len(every)  # ... and one alone
