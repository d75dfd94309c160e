"""`python -m task_runner.server.forkserver FD`: the fork server (task_runner.server.forkserver.server)."""

from task_runner.server.forkserver.server import main

main()
