"""Logging for the daemon: human-readable lines by default, JSON lines on request.

Three kinds of record carry fields of their own, under fixed names a log pipeline can index:
- every record of a call: `request_id` and `caller` (`CALL_FIELDS`, passed as `extra=`);
- the access log (the logger "task_runner.access"): one record per finished call, its fields in
  `ACCESS_FIELDS` (task_runner.server.access);
- a failed task's record: the fields in `FAILURE_FIELDS`, its traceback and stderr tail bounded
  by `TRACEBACK_MAX` and `STDERR_MAX` characters and cut only between lines (`tail_lines`).
In text form the fields follow the message as `name=value`; a traceback and output follow it as
indented lines. In JSON form each is a key of the line's object.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

CALL_FIELDS = ("request_id", "caller")  # a call's, in every log line of it (`extra=`)
ACCESS = "task_runner.access"  # the access log's logger
ACCESS_FIELDS = ("method", "request_id", "task", "peer", "caller", "status", "outcome", "error", "queue_ms",
                 "run_ms", "total_ms", "bytes_in", "bytes_out", "shared")
FAILURE_FIELDS = ("task", "kind", "error_type", "error_message", "exit_code", "signal", "limit")
LONG_FIELDS = ("traceback", "stderr", "stdout")  # multi-line: after the line in text form
TRACEBACK_MAX = 8192
STDERR_MAX = 4096


def tail_lines(text: str, limit: int) -> str:
    """`text`, or, if longer than `limit`, its last whole lines within `limit` after a line saying how
    much was left out (a traceback's first line is kept: it says what follows)."""
    if len(text) <= limit:
        return text
    head = "Traceback (most recent call last):\n" if text.startswith("Traceback (most recent call last):\n") else ""
    tail = text[len(text) - limit + len(head):]
    cut = tail.find("\n")
    tail = tail[cut + 1:] if cut >= 0 else ""
    left_out = len(text) - len(head) - len(tail)
    return f"{head}  [... {left_out} characters left out ...]\n{tail}"


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields: dict[str, Any] = {name: value for name in CALL_FIELDS if (value := getattr(record, name, None))}
    for group in ("access", "details"):
        fields.update(getattr(record, group, None) or {})
    return fields


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = _fields(record)
        long = [(name, fields.pop(name)) for name in LONG_FIELDS if fields.get(name)]
        pairs = [f"{name}={_text(value)}" for name, value in fields.items() if value not in ("", None)]
        text = " ".join((line, *pairs))
        for name, value in long:
            text += f"\n  {name}:\n" + "".join(f"    {part}\n" for part in value.rstrip("\n").split("\n")).rstrip("\n")
        return text


def _text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.1f}"
    text = str(value)
    return json.dumps(text) if not text or any(c in text for c in ' "=\n') else text


def timestamp(created: float) -> str:
    """A record's time as ISO 8601 in UTC, to the millisecond: "2025-01-31T12:00:00.123Z"."""
    return datetime.datetime.fromtimestamp(created, datetime.UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": timestamp(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(_fields(record))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure(level: str, fmt: str, access_log: bool = True) -> None:
    """Send the daemon's logs to stderr (journald picks them up under systemd); the access log at INFO
    whatever `level` is, or not at all."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger(ACCESS).setLevel(logging.INFO if access_log else logging.CRITICAL + 1)


@contextlib.contextmanager
def held_stderr() -> Iterator[list[str]]:
    """Hold back what this process writes to stderr meanwhile, C code's included (fd 2): its lines are
    in the list yielded once the block ends, for the caller to pass on (`release`) or to drop. gRPC's
    C core logs a failed bind in its own raw form (`E0101 ... add_port.cc:83] Failed to add port ...`),
    which would come before the daemon's own message."""
    held: list[str] = []
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no stderr at all: nothing to hold
        yield held
        return
    with tempfile.TemporaryFile() as file:  # (not a pipe: nothing reads it meanwhile)
        os.dup2(file.fileno(), 2)
        try:
            yield held
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            file.seek(0)
            held += file.read().decode(errors="replace").splitlines(keepends=True)


def release(held: list[str]) -> None:
    """Write what `held_stderr` held back to stderr after all."""
    if held:
        sys.stderr.write("".join(held))
        sys.stderr.flush()
