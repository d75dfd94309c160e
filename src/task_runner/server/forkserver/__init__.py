"""The fork server's process and what it starts, each a program of its own, apart from the daemon's modules:

- `server`: the fork server (`python -m task_runner.server.forkserver`), started by the daemon before gRPC;
- `task_process`: what a task process runs once the fork server has forked it and it has become one
  (task_runner.server.sandbox.contain);
- `inits` (the init maker) and `sweeper`: tiny programs the fork server starts, which import nothing of the daemon;
- `uidledger`: the fork server's record of its task uids.

This `__init__` imports nothing, so that each of these loads only what it needs.
"""
