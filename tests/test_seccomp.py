"""The seccomp filter: what it refuses, on every ABI a process can call the kernel through, and that ordinary
work still runs under it.

A filter cannot be taken off again, so each filtered test runs in a fresh interpreter: it receives the program
and the system call numbers (both from libseccomp, here), installs the filter, makes sure it is installed
before trying anything, and reports what the kernel answered as JSON. This process is never filtered. The
attacks are also made by hostile tasks (tests/tasks/hostile_abi.py) of a real daemon, as root.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import json
import os
import platform
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from task_runner.server.sandbox import seccomp
from tests.conftest import REPO
from tests.inprocess import InProcessDaemon

SCMP_ARCH_X86 = 0x40000003
SCMP_ARCH_X32 = 0x4000003E
SCMP_ARCH_X86_64 = 0xC000003E
SCMP_ARCH_ARM = 0x40000028
SCMP_ARCH_AARCH64 = 0xC00000B7
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
PTRACE_PEEKDATA = 2  # with pid 0 the kernel answers ESRCH; zero would be PTRACE_TRACEME
ADDR_NO_RANDOMIZE = 0x0040000
# Calls that must be refused whatever the list says: every way to set the host's clock or unmount on any ABI
# (i386 has stime, clock_settime64, clock_adjtime64 and a one-argument umount), the attacks.
ATTACKED = ("settimeofday", "stime", "clock_settime", "clock_settime64", "clock_adjtime", "clock_adjtime64",
            "adjtimex", "umount", "umount2")
# i386's own socket call (Linux 4.3): libseccomp names socket there by its socketcall form, a negative number.
I386_SOCKET = 359


def _libseccomp() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libseccomp.so.2")
    except OSError:
        return None


LIBSECCOMP = _libseccomp()
needs_libseccomp = pytest.mark.skipif(LIBSECCOMP is None, reason="libseccomp.so.2 is not installed (Debian: "
                                      "apt-get install libseccomp2), so no filter can be built")
x86_64_only = pytest.mark.skipif(platform.machine() != "x86_64", reason="the 32-bit ABIs tried are x86's")
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="a root daemon's sandbox (rootless: tests/test_rootless.py)")
HOSTILE = "tests.tasks.hostile_abi"

# Sets no_new_privs, installs the program and checks it is installed before the body runs (the body makes
# calls that must never reach the kernel); vhangup is harmless only because the child has no terminal.
PRELUDE = """\
import ctypes, json, os, sys
from task_runner.server.sandbox import seccomp
data = json.loads(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long

def call(nr, *args):
    ctypes.set_errno(0)
    result = libc.syscall(ctypes.c_long(nr), *(ctypes.c_long(arg) for arg in args))
    return [result, ctypes.get_errno() if result == -1 else 0]

{before}
if libc.prctl(38, 1, 0, 0, 0) != 0:
    raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
seccomp.load(bytes.fromhex(data["program"]))
with open("/proc/self/status") as status:
    if "Seccomp:\\t2\\n" not in status.read():
        sys.exit("no filter installed after load(): nothing else is tried")
out = {{}}
{body}
print(json.dumps(out))
"""


def resolve(name: str, arch: int | None = None) -> int:
    """`name`'s number from libseccomp: the native one, or `arch`'s (negative if that ABI lacks it)."""
    assert LIBSECCOMP is not None
    if arch is None:
        resolve_native = LIBSECCOMP.seccomp_syscall_resolve_name
        resolve_native.argtypes = (ctypes.c_char_p,)
        return int(resolve_native(name.encode()))
    resolve_arch = LIBSECCOMP.seccomp_syscall_resolve_name_arch
    resolve_arch.argtypes = (ctypes.c_uint32, ctypes.c_char_p)
    return int(resolve_arch(arch, name.encode()))


def run_child(body: str, before: str = "", **data: Any) -> subprocess.CompletedProcess[str]:
    script = PRELUDE.format(before=textwrap.dedent(before), body=textwrap.dedent(body))
    argument = json.dumps({"program": seccomp.program().hex(), **data})
    # A session of its own: no controlling terminal for vhangup to hang up.
    return subprocess.run([sys.executable, "-c", script, argument], capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL, start_new_session=True, cwd=REPO)


def filtered(body: str, **data: Any) -> dict[str, Any]:
    """What `body` put in `out`, run under the filter in a fresh interpreter."""
    ran = run_child(body, **data)
    assert ran.returncode == 0, ran.stderr
    report: dict[str, Any] = json.loads(ran.stdout.splitlines()[-1])
    return report


def test_load_refuses_a_program_that_is_not_whole_instructions() -> None:
    for program in (b"", b"1234567", b"12345678" * 4096 + b"1", b"12345678" * 4097):
        with pytest.raises(ValueError, match="instructions"):
            seccomp.load(program)


def test_without_libseccomp_the_filter_is_unavailable_and_says_what_to_install(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str, *args: object, **kwargs: object) -> ctypes.CDLL:
        raise OSError(f"{name}: cannot open shared object file: No such file or directory")

    monkeypatch.setattr(ctypes, "CDLL", missing)
    with pytest.raises(seccomp.SeccompUnavailable, match="install libseccomp2"):
        seccomp.program()


@needs_libseccomp
def test_the_program_is_whole_instructions_within_the_kernels_limit() -> None:
    for no_vsock in (False, True):
        program = seccomp.program(no_vsock=no_vsock)
        assert program and len(program) % 8 == 0 and len(program) // 8 <= seccomp.BPF_MAXINSNS
        assert program == seccomp.program(no_vsock=no_vsock)


@needs_libseccomp
def test_importing_the_module_loads_no_libseccomp() -> None:
    """The fork server imports it, and every task process it forks pays for what it holds."""
    script = "import task_runner.server.sandbox.seccomp\nprint('libseccomp' in open('/proc/self/maps').read())"
    ran = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert ran.stdout.strip() == "False", ran.stderr


@functools.cache
def abis() -> dict[str, int]:
    """The ABIs a task here can call the kernel through, by name, with their libseccomp architecture: the
    native one; on x86-64 x32 (its calls reach the filter whether or not the kernel has x32) and i386, if
    this kernel runs i386 code (CONFIG_IA32_EMULATION, not turned off by ia32_emulation=)."""
    assert LIBSECCOMP is not None
    LIBSECCOMP.seccomp_arch_native.restype = ctypes.c_uint32
    found = {"native": int(LIBSECCOMP.seccomp_arch_native())}
    if found["native"] == SCMP_ARCH_X86_64:
        found["x32"] = SCMP_ARCH_X32
        getpid = resolve("getpid", SCMP_ARCH_X86)
        probe = f"import os\nfrom {HOSTILE} import i386_call\nprint(i386_call({getpid}) == os.getpid())"
        ran = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, cwd=REPO)
        if ran.stdout.strip() == "True":
            found["i386"] = SCMP_ARCH_X86
    return found


def refused_numbers() -> dict[str, dict[str, int]]:
    """Each ABI's number of each call the list refuses, and of each of ATTACKED, from libseccomp's tables:
    a name an ABI lacks is not there (libseccomp answers a negative number for it)."""
    names = dict.fromkeys([*seccomp.REFUSED, *ATTACKED])
    numbers = {abi: {name: resolve(name, arch) for name in names} for abi, arch in abis().items()}
    return {abi: {name: nr for name, nr in of_abi.items() if nr >= 0} for abi, of_abi in numbers.items()}


def getpid_numbers() -> dict[str, int]:
    """getpid's number for each ABI where it must work under the filter (not x32: the kernel may lack it)."""
    return {abi: resolve("getpid", arch) for abi, arch in abis().items() if abi != "x32"}


@needs_libseccomp
def test_every_name_the_filter_refuses_is_a_call_libseccomp_knows() -> None:
    """A misspelt name would be skipped as a call no ABI has, and its effect left open."""
    arches = (SCMP_ARCH_X86_64, SCMP_ARCH_X86, SCMP_ARCH_X32, SCMP_ARCH_AARCH64, SCMP_ARCH_ARM)
    unknown = [name for name in seccomp.REFUSED if all(resolve(name, arch) < 0 for arch in arches)]
    assert not unknown
    assert len(set(seccomp.REFUSED)) == len(seccomp.REFUSED)


@needs_libseccomp
def test_every_refused_call_of_every_abi_is_answered_eperm() -> None:
    """In a child of this process: without the filter each call, even made with every capability, fails
    otherwise (EFAULT, EINVAL, ESRCH, ENOSYS...) or does nothing; with it, EPERM on every ABI."""
    numbers = refused_numbers()
    assert {"ptrace", "mount", "adjtimex"} <= numbers["native"].keys(), numbers
    if "i386" in numbers:
        assert {"stime", "clock_settime64", "clock_adjtime64", "umount"} <= numbers["i386"].keys(), numbers
    body = """
    from tests.tasks import hostile_abi
    out.update(hostile_abi.refused_calls(data)[1])
    """
    answers = filtered(body, numbers=numbers, getpid=getpid_numbers())
    assert answers.pop("seccomp_mode") == 2
    assert answers == {**{abi: dict.fromkeys(of_abi, errno.EPERM) for abi, of_abi in numbers.items()},
                       **{f"{abi} getpid": True for abi in getpid_numbers()}}


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessDaemon]:
    """A daemon whose tasks run as root (no run_as_user) with every part of the sandbox on: what a missing
    capability would refuse reaches the kernel unless the filter refuses it."""
    tables = (f'[tasks.refused_calls]\ntarget = "{HOSTILE}:refused_calls"\n'
              f'[tasks.vsock_without_network]\ntarget = "{HOSTILE}:vsock"\n'
              f'[tasks.vsock_with_network]\ntarget = "{HOSTILE}:vsock"\n'
              '[tasks.vsock_with_network.sandbox]\nnetwork = "host"\n')
    text = ('cgroup = "off"\n[sandbox]\nfilesystem = "private"\nnetwork = "none"\nprocesses = "private"\n'
            f'syscalls = "default"\n{tables}')
    with InProcessDaemon(Path(tmp_path_factory.mktemp("seccomp")), text) as d:
        yield d


@needs_libseccomp
@root_only
def test_a_root_task_gets_eperm_from_every_refused_call_of_every_abi(hostile: InProcessDaemon) -> None:
    """The i386 clock calls included, which reached the kernel before the filter refused calls by effect."""
    numbers = refused_numbers()
    with hostile.client() as client:
        gave = client.call("refused_calls", 10_000, {"numbers": numbers, "getpid": getpid_numbers()}).result
    assert gave.pop("seccomp_mode") == 2
    assert gave == {**{abi: dict.fromkeys(of_abi, errno.EPERM) for abi, of_abi in numbers.items()},
                    **{f"{abi} getpid": True for abi in getpid_numbers()}}


def vsock_options() -> dict[str, int]:
    options = {"socket": resolve("socket")}
    if "i386" in abis():
        options |= {"i386_socket": I386_SOCKET, "i386_socketcall": resolve("socketcall", SCMP_ARCH_X86)}
    return options


@needs_libseccomp
@root_only
def test_a_task_without_a_network_makes_no_vsock_socket(hostile: InProcessDaemon) -> None:
    """vsock is not namespaced: through it a task of network = "none" would reach the hypervisor. On i386,
    socketcall(SYS_SOCKET) is refused whole: its arguments are in memory, where the filter cannot look."""
    with hostile.client() as client:
        gave = client.call("vsock_without_network", 10_000, vsock_options()).result
    assert gave.pop("seccomp_mode") == 2
    expected = {"vsock": errno.EPERM, "vsock, upper half set": errno.EPERM, "unix": 0}
    if "i386" in abis():
        expected |= {"i386 vsock": errno.EPERM, "i386 unix": 0, "i386 socketcall(SYS_SOCKET)": errno.EPERM}
    assert gave == expected


@needs_libseccomp
@root_only
def test_a_task_with_the_network_is_not_refused_vsock_by_the_filter(hostile: InProcessDaemon) -> None:
    with hostile.client() as client:
        gave = client.call("vsock_with_network", 10_000, vsock_options()).result
    assert gave.pop("seccomp_mode") == 2
    # A socket where the kernel has vsock (a virtual machine's guest), EAFNOSUPPORT where it has not.
    assert gave["vsock"] != errno.EPERM and gave["unix"] == 0, gave
    if "i386" in abis():
        assert gave["i386 socketcall(SYS_SOCKET)"] == errno.EFAULT, gave


@needs_libseccomp
def test_no_namespace_can_be_made() -> None:
    flags = {"CLONE_NEWUSER": CLONE_NEWUSER, "CLONE_NEWNET": CLONE_NEWNET,
             **{f"bit {bit}": 1 << bit for bit in range(32) if seccomp.NAMESPACE_FLAGS >> bit & 1}}
    body = """
    for name, flag in data["flags"].items():
        result = call(data["clone"], flag | 17, 0, 0, 0, 0)  # SIGCHLD; no stack: the child would run on ours
        if result[0] == 0:
            os._exit(0)  # the filter let it through: the child must not report too
        if result[0] > 0:
            os.waitpid(result[0], 0)
        out[name] = result
    ctypes.set_errno(0)
    out["unshare"] = [libc.unshare(0x00020000), ctypes.get_errno()]  # CLONE_NEWNS
    """
    answers = filtered(body, clone=resolve("clone"), flags=flags)
    assert answers == {name: [-1, errno.EPERM] for name in [*flags, "unshare"]}


@needs_libseccomp
def test_clone3_is_answered_enosys_so_that_glibc_falls_back_to_clone() -> None:
    answers = filtered('out["clone3"] = call(data["clone3"], 0, 0)', clone3=resolve("clone3"))
    assert answers == {"clone3": [-1, errno.ENOSYS]}


@needs_libseccomp
def test_personality_can_be_read_but_not_changed() -> None:
    body = """
    out["query"] = call(data["nr"], 0xFFFFFFFF)
    out["no_randomize"] = call(data["nr"], data["no_randomize"])
    """
    answers = filtered(body, nr=resolve("personality"), no_randomize=ADDR_NO_RANDOMIZE)
    assert answers["query"][0] >= 0 and answers["query"][1] == 0, answers
    assert answers["no_randomize"] == [-1, errno.EPERM]


@needs_libseccomp
def test_ordinary_work_runs_under_the_filter() -> None:
    body = """
    import socket, subprocess, tempfile, threading, time
    pid = os.fork()
    if pid == 0:
        os._exit(7)
    out["fork"] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    ran = []
    thread = threading.Thread(target=ran.append, args=("ran",))
    thread.start()
    thread.join()
    out["thread"] = ran
    out["true"] = subprocess.run(["true"]).returncode
    status = subprocess.run(["cat", "/proc/self/status"], capture_output=True, text=True).stdout
    out["inherited"] = [line for line in status.splitlines() if line.startswith("Seccomp:")]
    left, right = socket.socketpair()
    left.sendall(b"ping")
    out["socketpair"] = right.recv(4).decode()
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "file")
        with open(path, "w") as f:
            f.write("written")
        with open(path) as f:
            out["file"] = f.read()
    start = time.monotonic()
    time.sleep(0.01)
    out["slept"] = time.monotonic() - start >= 0.01
    """
    assert filtered(body) == {"fork": 7, "thread": ["ran"], "true": 0, "inherited": ["Seccomp:\t2"],
                              "socketpair": "ping", "file": "written", "slept": True}


@needs_libseccomp
def test_load_raises_oserror_when_the_kernel_refuses_the_program() -> None:
    # One instruction, not ending in a return: the kernel's checker refuses it, so nothing is installed.
    body = """
    try:
        seccomp.load(bytes(8))
    except OSError as exc:
        out["errno"] = exc.errno
    """
    assert filtered(body) == {"errno": errno.EINVAL}


@needs_libseccomp
@x86_64_only
def test_x32_calls_are_filtered_not_killed() -> None:
    """An x32 call reaches the filter even where the kernel has no x32 support (it would answer ENOSYS)."""
    body = """
    out["ptrace"] = call(data["ptrace"], 2, 0, 0, 0)
    out["getpid"] = call(data["getpid"])
    out["pid"] = os.getpid()
    """
    answers = filtered(body, ptrace=resolve("ptrace", SCMP_ARCH_X32), getpid=resolve("getpid", SCMP_ARCH_X32))
    assert answers["ptrace"] == [-1, errno.EPERM]
    assert answers["getpid"] in ([answers["pid"], 0], [-1, errno.ENOSYS]), answers


@needs_libseccomp
@x86_64_only
def test_i386_calls_are_filtered_not_killed() -> None:
    """int 0x80 from a 64-bit process enters the kernel as i386, with i386's numbers."""
    before = """
    import mmap
    code = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    # push rbx; mov eax, edi; mov ebx, esi; xor ecx, ecx; xor edx, edx; xor esi, esi; xor edi, edi;
    # int 0x80; pop rbx; ret: the i386 call edi(esi, 0, 0, 0, 0), its raw answer (-errno on failure).
    code.write(bytes.fromhex("53 89f8 89f3 31c9 31d2 31f6 31ff cd80 5b c3"))
    address = ctypes.addressof(ctypes.c_char.from_buffer(code))
    int80 = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_int)(address)
    assert int80(data["getpid"], 0) == os.getpid()
    print("int 0x80 works", flush=True)
    """
    body = """
    out["ptrace"] = int80(data["ptrace"], 2)
    out["getpid"] = int80(data["getpid"], 0) == os.getpid()
    """
    ran = run_child(body, before, ptrace=resolve("ptrace", SCMP_ARCH_X86), getpid=resolve("getpid", SCMP_ARCH_X86))
    if ran.returncode == -signal.SIGSEGV and "int 0x80 works" not in ran.stdout:
        pytest.skip("this kernel has no 32-bit emulation (CONFIG_IA32_EMULATION, ia32_emulation=)")
    assert ran.returncode == 0, ran.stderr
    assert json.loads(ran.stdout.splitlines()[-1]) == {"ptrace": -errno.EPERM, "getpid": True}
