"""`python -m task_runner.server [OPTIONS]`: the same as `task-runner serve [OPTIONS]`."""

import sys

from task_runner.server.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
