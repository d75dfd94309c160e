# isolated-task-runner as a container image: the daemon, and your tasks installed into it as a package.
#
#   docker build -t task-runner .
#   docker run --rm -p 50051:50051 --cap-add SYS_ADMIN --cap-add NET_ADMIN \
#       --security-opt apparmor=unconfined task-runner serve --listen 0.0.0.0:50051 --insecure
#
# The daemon is PID 1: SIGTERM (docker stop, a pod's termination) drains it (health NOT_SERVING,
# running tasks finish within drain_grace_s, then GOAWAY) and it exits 0; it reaps what its tasks
# leave, as PID 1 must. Give `docker stop -t` / terminationGracePeriodSeconds more than drain_grace_s.
#
# Privileges: the daemon starts as root only to run each task under a uid of its own (CAP_SETUID,
# CAP_SETGID; run_as_user is the image's task-runner-tasks) and to build each task's sandbox: its
# mount, pid, IPC and network namespaces (CAP_SYS_ADMIN, CAP_NET_ADMIN) and mounts, which the
# container runtime's default AppArmor profile forbids (hence apparmor=unconfined; its own seccomp
# filter stays on). Without them, the daemon says at start which sandbox parts it cannot set up and
# runs without them (a part the config asks for by name refuses the start).
#
# Per-task cgroups need a writable cgroup v2 subtree, which a container that is not privileged does not
# get: Docker and Kubernetes mount its /sys/fs/cgroup read-only, and Kubernetes cannot delegate a subtree
# to a pod. So in a container tasks have no cgroup (cgroup = "auto" finds none writable, and the start's
# "tasks run in cgroups under ..." line is missing): each task's tree is ended by its process group and
# the subreaper, and bounded by the config's [limits] (rlimits: memory_mb per process, processes per task
# uid), which deploy/kubernetes/configmap.yaml sets. docs/deployment.md ("Memory") says what that protects
# and what it does not.

# -- build: the package (and your tasks) into a virtual environment
FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src src
# Your tasks: a package of your own, installed beside the daemon, whose functions the config's [tasks]
# names. The default, deploy/mytasks, is a placeholder of one task (the ConfigMap's "hello"): build with
# yours, a folder inside the build context,
#   docker build --build-arg TASKS=path/to/yours -t task-runner .
# or build FROM this image and `RUN /opt/task-runner/bin/pip install --no-cache-dir ./yours`.
ARG TASKS=deploy/mytasks
COPY ${TASKS} tasks
RUN python -m venv /opt/task-runner \
    && /opt/task-runner/bin/pip install --no-cache-dir '.[server]' ./tasks

# -- run: the environment, libseccomp for the tasks' syscall filter, and the tasks' user
FROM python:3.11-slim-bookworm
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libseccomp2 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --no-create-home --shell /usr/sbin/nologin task-runner-tasks \
    && mkdir -p /etc/task-runner /var/lib/task-runner/work /run/isolated-task-runner/uids \
    && chmod 0700 /run/isolated-task-runner/uids
COPY --from=build /opt/task-runner /opt/task-runner
ENV PATH=/opt/task-runner/bin:$PATH PYTHONUNBUFFERED=1
EXPOSE 50051
STOPSIGNAL SIGTERM
ENTRYPOINT ["task-runner"]
# The example tasks on loopback; a real deployment gives its config (deploy/kubernetes/configmap.yaml).
CMD ["serve"]
