"""The access log: one record per finished call, on the logger "task_runner.access" (so that it can be
routed apart from the diagnostic log), with the fields of task_runner.server.logs.ACCESS_FIELDS:

- `method` (Perform, PerformStream, Watch, Cancel, ListTasks), `request_id`, `task`, `peer` (gRPC's
  form: "ipv4:127.0.0.1:5000", "unix:..."), `caller`;
- `status`: the gRPC status code's name (OK, or why the call was refused; CANCELLED: the caller left);
- `outcome` ("true", "false") or `error` (the TaskError kind) of the task, when it ended;
- `queue_ms` (waiting for a slot), `run_ms` (the task's own time), `total_ms` (from the call's arrival
  to its answer, both of those included), all ≥ 0; `bytes_in` (the request), `bytes_out` (the answer,
  or every event of a stream);
- `shared`: true when the call got the answer of an execution it did not start (a repeat of a
  request id, or a Watch): `queue_ms` and `run_ms` are then that execution's, not the call's.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from task_runner.server.logs import ACCESS, ACCESS_FIELDS

log = logging.getLogger(ACCESS)


@dataclass(slots=True)
class Entry:
    """One call's access record, filled in as it goes; `write` once, as it ends."""

    method: str
    peer: str
    caller: str
    bytes_in: int
    started: float  # time.monotonic() at its arrival
    request_id: str = ""
    task: str = ""
    status: str = "OK"
    outcome: str = ""
    error: str = ""
    queue_ms: float = 0.0
    run_ms: float = 0.0
    bytes_out: int = 0
    shared: bool = False

    def write(self) -> None:
        if not log.isEnabledFor(logging.INFO):
            return
        total_ms = (time.monotonic() - self.started) * 1e3
        fields: dict[str, Any] = {name: getattr(self, name) for name in ACCESS_FIELDS if name != "total_ms"}
        fields.update(queue_ms=round(self.queue_ms, 3), run_ms=round(self.run_ms, 3), total_ms=round(total_ms, 3))
        log.info("%s %s", self.method, self.status, extra={"access": fields})


def peer_of(context: Any) -> str:
    """The peer of a call, as gRPC names it ("" if it cannot say)."""
    try:
        return str(context.peer() or "")
    except Exception:  # a context whose call has already gone
        return ""
