"""The seccomp filter every sandboxed task process loads: which system calls it refuses, built and installed.

The filter is built with libseccomp, the maintained library Docker, systemd and podman build theirs with:
it knows every architecture's system call numbers and emits the architecture checks that a hand-written
BPF program gets wrong. It is called through ctypes because the only PyPI bindings are unmaintained since
2021 and the calls needed are a dozen. The daemon builds the program once (`program`) and sends its bytes
to the fork server, which installs them in each task process (`load`) without ever loading libseccomp:
this module is imported by the fork server, so at import it needs nothing but ctypes (and the sandbox's
ctypes layer, task_runner.server.sandbox.libc).
"""

from __future__ import annotations

import ctypes
import errno
import os

from task_runner.server.sandbox.libc import (
    CLONE_NEWCGROUP,
    CLONE_NEWIPC,
    CLONE_NEWNET,
    CLONE_NEWNS,
    CLONE_NEWPID,
    CLONE_NEWTIME,
    CLONE_NEWUSER,
    CLONE_NEWUTS,
    PR_SET_SECCOMP,
    SECCOMP_MODE_FILTER,
    check,
    libc,
)

# Refused with EPERM, by what a call does. Each effect names every call that has it on any ABI the kernel
# runs (x86-64, i386 and x32; arm64 and arm): i386 sets the clock by stime and clock_settime64 as x86-64
# does by settimeofday and clock_settime. libseccomp resolves each name per ABI, and skips it on an ABI
# that lacks it: what the kernel has no number for cannot be called.
REFUSED_BY_EFFECT: dict[str, tuple[str, ...]] = {
    "another process's memory: reading or steering a neighbour sharing our uid":
        ("ptrace", "process_vm_readv", "process_vm_writev"),
    # umount is i386's old one-argument umount2.
    "the mount table, old and new API: a private filesystem view is only private while it cannot be remade":
        ("mount", "umount", "umount2", "pivot_root", "chroot",
         "fsopen", "fsconfig", "fsmount", "fspick", "move_mount", "open_tree", "mount_setattr"),
    "namespaces: leaving or remaking the sandbox (clone's namespace flags are refused below)": ("unshare", "setns"),
    "code run in the kernel, and the kernel's view of other processes": ("bpf", "perf_event_open"),
    "replacing or extending the kernel":
        ("kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module"),
    "the kernel keyring, which is not namespaced: keys would be shared with the host and other tasks":
        ("keyctl", "add_key", "request_key"),
    "pausing the kernel on a page fault at a time of the caller's choosing: the lever of many exploits":
        ("userfaultfd",),
    "system calls this filter never sees (io_uring performs them), and a frequent source of kernel bugs":
        ("io_uring_setup", "io_uring_enter", "io_uring_register"),
    # _sysctl is the binary way to write /proc/sys, gone since Linux 5.5.
    "the whole machine's state": ("reboot", "swapon", "swapoff", "acct", "quotactl", "quotactl_fd", "_sysctl"),
    "opening a file by handle, which bypasses the path walk, so that any mount's file can be reached":
        ("open_by_handle_at", "name_to_handle_at"),
    # vm86 and vm86old are i386's virtual 8086 mode.
    "obsolete or hardware-level calls no task needs":
        ("lookup_dcookie", "uselib", "iopl", "ioperm", "syslog", "vhangup", "vm86", "vm86old"),
    # The *64 are 32-bit ABIs' calls with a 64-bit time; stime is i386's settimeofday to the second;
    # adjtimex is clock_adjtime of the realtime clock (and reading it: glibc reads it through clock_adjtime).
    "the host's clock, which no namespace here separates":
        ("settimeofday", "stime", "clock_settime", "clock_settime64", "clock_adjtime", "clock_adjtime64",
         "adjtimex"),
    "the host's names, which the sandbox's namespaces do not separate": ("sethostname", "setdomainname"),
}
REFUSED: tuple[str, ...] = tuple(name for names in REFUSED_BY_EFFECT.values() for name in names)
AF_VSOCK = 40

NAMESPACE_FLAGS: int = (CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER
                        | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWTIME)

PERSONALITY_QUERY = 0xFFFFFFFF  # personality(0xffffffff) reads the persona and changes nothing
BPF_MAXINSNS = 4096  # the kernel's limit on one filter's instructions
SOCK_FILTER_SIZE = 8  # struct sock_filter: u16 code, u8 jt, u8 jf, u32 k

# From libseccomp's seccomp.h (2.5).
SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_ARCH_X86 = 0x40000003
SCMP_ARCH_X86_64 = 0xC000003E
SCMP_ARCH_X32 = 0x4000003E
SCMP_ARCH_ARM = 0x40000028
SCMP_ARCH_AARCH64 = 0xC00000B7
SCMP_CMP_NE = 1
SCMP_CMP_MASKED_EQ = 7
INT_MASK = 0xFFFFFFFF  # the kernel reads an int argument from the low half of its register
NR_SCMP_ERROR = -1  # what seccomp_syscall_resolve_name answers for a name it does not know
# The 32-bit ABIs a process of the native architecture can still call the kernel through.
COMPAT_ARCHES = {SCMP_ARCH_X86_64: (SCMP_ARCH_X86, SCMP_ARCH_X32), SCMP_ARCH_AARCH64: (SCMP_ARCH_ARM,)}


class SeccompUnavailable(RuntimeError):
    """The filter cannot be built here: libseccomp is missing, too old, or refused a call."""


class _ArgCmp(ctypes.Structure):
    """struct scmp_arg_cmp."""

    _fields_ = (("arg", ctypes.c_uint), ("op", ctypes.c_int),
                ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64))


class _SockFprog(ctypes.Structure):
    """struct sock_fprog."""

    _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.c_void_p))


def _act_errno(code: int) -> int:
    """libseccomp's SCMP_ACT_ERRNO(code): the call fails with `code` and never reaches the kernel."""
    return 0x00050000 | (code & 0x0000FFFF)


def program(no_vsock: bool = False) -> bytes:
    """Build the filter: refuse the calls of REFUSED, namespaces by clone, clone3, and changing personality.

    Everything else is allowed. The native architecture's 32-bit ABIs are filtered by the same rules, so
    that a task cannot step around the filter by calling the kernel the 32-bit way (nor is it killed for
    doing so).

    Args:
        no_vsock: also refuse making a vsock socket, for a task without a network: vsock is not namespaced,
            and leads to the hypervisor (and through it, often, the host).

    Returns:
        The filter as raw BPF: an array of struct sock_filter, 8 bytes each, for `load`.

    Raises:
        SeccompUnavailable: libseccomp.so.2 is missing, too old to know clone3, or refused a call (the
            message names the call and the errno).
    """
    lib = _libseccomp()
    ctx = lib.seccomp_init(SCMP_ACT_ALLOW)
    if not ctx:
        raise SeccompUnavailable("seccomp_init failed (libseccomp gives no errno: out of memory?)")
    try:
        native = lib.seccomp_arch_native()
        for arch in COMPAT_ARCHES.get(native, ()):
            rc = lib.seccomp_arch_add(ctx, arch)
            if rc != -errno.EEXIST:
                _scmp_check(rc, f"seccomp_arch_add({arch:#x})")
        eperm = _act_errno(errno.EPERM)
        for name in REFUSED:
            nr = _resolve(lib, name)
            if nr != NR_SCMP_ERROR:
                _scmp_check(lib.seccomp_rule_add_array(ctx, eperm, nr, 0, None), f"seccomp_rule_add_array({name})")
        clone = _resolve(lib, "clone")
        # One rule per flag: the comparisons of one rule are ANDed, separate rules ORed. CLONE_NEWTIME
        # lies in clone's exit-signal byte, where no valid signal sets it: only unshare and clone3 could
        # ask for it.
        for flag in (1 << bit for bit in range(32) if NAMESPACE_FLAGS >> bit & 1):
            _rule(lib, ctx, eperm, clone, "clone", _ArgCmp(0, SCMP_CMP_MASKED_EQ, flag, flag))
        # clone3 passes its flags in memory, which a filter cannot read. ENOSYS makes glibc fall back to
        # clone, whose flags it can read: Docker's default profile does the same.
        clone3 = _resolve(lib, "clone3")
        if clone3 == NR_SCMP_ERROR:
            raise SeccompUnavailable("this libseccomp does not know clone3, so namespaces could be made through it: "
                                     "install a newer libseccomp (2.5 knows it)")
        _scmp_check(lib.seccomp_rule_add_array(ctx, _act_errno(errno.ENOSYS), clone3, 0, None),
               "seccomp_rule_add_array(clone3)")
        # A persona can turn off address space randomisation (ADDR_NO_RANDOMIZE) or make data executable
        # (READ_IMPLIES_EXEC) for what the task execs; only the query is answered.
        _rule(lib, ctx, eperm, _resolve(lib, "personality"), "personality",
              _ArgCmp(0, SCMP_CMP_NE, PERSONALITY_QUERY, 0))
        if no_vsock:
            # i386's socketcall(SYS_SOCKET, args) has socket's arguments in memory, which a filter cannot
            # read: libseccomp refuses it whole, for every family, and compares the family of i386's own
            # socket call (Linux 4.3), as of every other ABI's.
            _rule(lib, ctx, eperm, _resolve(lib, "socket"), "socket",
                  _ArgCmp(0, SCMP_CMP_MASKED_EQ, INT_MASK, AF_VSOCK))
        return _export(lib, ctx)
    finally:
        lib.seccomp_release(ctx)


def load(program: bytes) -> None:
    """Install `program` on the calling thread, and so on every thread and process it later creates.

    The filter cannot be removed once installed. The caller must have set no_new_privs (or hold
    CAP_SYS_ADMIN); installing on a process whose no_new_privs is already set is the usual case.

    Args:
        program: raw BPF from `program()`.

    Raises:
        ValueError: `program` is not a whole number of instructions, between 1 and the kernel's limit.
        OSError: the kernel refused the filter (a SandboxError; EACCES: no no_new_privs; EINVAL: not a valid program).
    """
    count, rest = divmod(len(program), SOCK_FILTER_SIZE)
    if rest or not 0 < count <= BPF_MAXINSNS:
        raise ValueError(f"a seccomp program is 1 to {BPF_MAXINSNS} instructions of {SOCK_FILTER_SIZE} bytes, "
                         f"not {len(program)} bytes")
    # The kernel copies the program during the call; `buffer` must stay alive until it returns.
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(count, ctypes.addressof(buffer))
    check(libc.prctl(PR_SET_SECCOMP, ctypes.c_ulong(SECCOMP_MODE_FILTER), ctypes.byref(fprog), ctypes.c_ulong(0),
                     ctypes.c_ulong(0)), "prctl(PR_SET_SECCOMP)")


def _libseccomp() -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL("libseccomp.so.2")
    except OSError as exc:
        raise SeccompUnavailable(f"libseccomp.so.2 cannot be loaded ({exc}): install libseccomp2 (Debian, "
                                 "Ubuntu) or libseccomp (Fedora, Arch, Alpine)") from exc
    lib.seccomp_init.argtypes = (ctypes.c_uint32,)
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_release.argtypes = (ctypes.c_void_p,)
    lib.seccomp_release.restype = None
    lib.seccomp_arch_native.argtypes = ()
    lib.seccomp_arch_native.restype = ctypes.c_uint32
    lib.seccomp_arch_add.argtypes = (ctypes.c_void_p, ctypes.c_uint32)
    lib.seccomp_syscall_resolve_name.argtypes = (ctypes.c_char_p,)
    lib.seccomp_rule_add_array.argtypes = (ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                                           ctypes.POINTER(_ArgCmp))
    lib.seccomp_export_bpf.argtypes = (ctypes.c_void_p, ctypes.c_int)
    return lib


def _scmp_check(rc: int, call: str) -> None:
    """libseccomp answers -errno on failure (not libc's -1 and errno: libc.check is not for it)."""
    if rc < 0:
        name = errno.errorcode.get(-rc, str(-rc))
        raise SeccompUnavailable(f"libseccomp: {call} failed: {name} ({os.strerror(-rc)})")


def _resolve(lib: ctypes.CDLL, name: str) -> int:
    """The native number of `name`; negative for a call only other architectures have (libseccomp maps
    it to theirs), NR_SCMP_ERROR for a name it does not know."""
    nr: int = lib.seccomp_syscall_resolve_name(name.encode())
    return nr


def _rule(lib: ctypes.CDLL, ctx: int, action: int, nr: int, name: str, comparison: _ArgCmp) -> None:
    if nr == NR_SCMP_ERROR:
        raise SeccompUnavailable(f"libseccomp does not know {name}")
    _scmp_check(lib.seccomp_rule_add_array(ctx, action, nr, 1, ctypes.byref(comparison)),
                f"seccomp_rule_add_array({name})")


def _export(lib: ctypes.CDLL, ctx: int) -> bytes:
    """The BPF, through a memfd: libseccomp exports only to a file descriptor."""
    try:
        fd = os.memfd_create("seccomp-bpf", os.MFD_CLOEXEC)
    except OSError as exc:
        raise SeccompUnavailable(f"memfd_create failed, so the filter cannot be exported: {exc}") from exc
    try:
        _scmp_check(lib.seccomp_export_bpf(ctx, fd), "seccomp_export_bpf")
        size = os.fstat(fd).st_size
        bpf = os.pread(fd, size, 0)
    except OSError as exc:
        raise SeccompUnavailable(f"reading back the exported filter failed: {exc}") from exc
    finally:
        os.close(fd)
    if len(bpf) != size or not bpf or size % SOCK_FILTER_SIZE:
        raise SeccompUnavailable(f"seccomp_export_bpf wrote {size} bytes, not whole instructions")
    return bpf
