"""What a task process's user namespace costs: `python -m bench.userns` (as root or an ordinary user).

Forks a child that exits at once (the baseline, in the same run), one that makes a user namespace of its own
as a task process does (task_runner.server.sandbox.users.task_user_namespace), and one that also empties its new
bounding set (lock_privileges(anew=True)); prints the median CPU per child (the child's own and the kernel's,
teardown included) over 5 rounds of 300.
"""

from __future__ import annotations

import os
import resource
import statistics
from collections.abc import Callable

from task_runner.server.sandbox import users

FORKS, ROUNDS = 300, 5


def _cpu_per_child(step: Callable[[], None]) -> float:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    for _ in range(FORKS):
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                step()
            except BaseException:
                code = 1
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        if status != 0:
            raise SystemExit("the step failed: this machine refuses a user namespace")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ((after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)) / FORKS * 1e3


def _locked() -> None:
    users.task_user_namespace()
    users.lock_privileges(anew=True)


def main() -> None:
    steps: dict[str, Callable[[], None]] = {"fork alone": lambda: None, "+ user namespace": users.task_user_namespace,
                                            "+ user namespace, bounding set emptied": _locked}
    seen: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(ROUNDS):
        for name, step in steps.items():
            seen[name].append(_cpu_per_child(step))
    base = statistics.median(seen["fork alone"])
    for name, figures in seen.items():
        median = statistics.median(figures)
        print(f"{name:40} {median:6.3f} ms CPU a child  (+{median - base:.3f} ms over fork alone)")


if __name__ == "__main__":
    main()
