"""A task's sandbox, one module per concern, behind one sequence (contain.become_task_process).

libc (the one ctypes layer: the libc handle, its check, the kernel's constants), profile (what a kind of task
process sets up), mounts, network, pids, users (users and capabilities, the daemon's own user namespace too),
seccomp, cgroups, probe (what this machine allows) and contain (the steps, in order). This `__init__` imports
nothing: the init maker imports libc alone, the daemon what it needs, and the fork server stays small.
"""
