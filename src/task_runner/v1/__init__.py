"""Code generated from task_runner/v1/task_runner.proto: never edit by hand."""
