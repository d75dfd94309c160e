"""The benchmark harness of isolated-task-runner: `python -m bench` (see bench/README.md).

The daemon's fork server imports `bench.tasks`, and so this package: keep this file empty of imports.
"""
