"""Hostile tasks against the syscall filter: every refused call through every ABI, and vsock without a network.

Registered by the tests that use them (tests/test_seccomp.py), not by the shared daemon; the tests also run
`refused_calls` in a fresh filtered interpreter of their own.
"""

import ctypes
import mmap
import os

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
BAD = 1  # an address nothing is mapped at: a call that copies from it fails with EFAULT before doing anything
AF_UNIX, AF_VSOCK, SOCK_STREAM = 1, 40, 1
SYS_SOCKET = 1  # socketcall's first argument: which socket call it multiplexes

# Arguments each call fails with before any effect, should the filter ever let it through (as root, with
# every capability: checked so, unfiltered, natively and through i386): an invalid pointer (EFAULT), flag or
# count (EINVAL) or descriptor (EBADF). Anything not named gets zeros (vhangup takes none and has no terminal
# to hang up: a task has a session of its own).
HARMLESS_ARGS = {
    "ptrace": (2, 0, 0, 0),  # PTRACE_PEEKDATA of pid 0: ESRCH; zero would be PTRACE_TRACEME
    "process_vm_readv": (0, 0, 0, 0, 0, 1),  # flags must be 0: EINVAL
    "process_vm_writev": (0, 0, 0, 0, 0, 1),
    "mount": (BAD, BAD, BAD, 0, 0),
    "umount": (BAD,),
    "umount2": (BAD, 0),
    "pivot_root": (BAD, BAD),
    "chroot": (BAD,),
    "fsopen": (BAD, 0),
    "fsconfig": (-1, 0, 0, 0, 0),
    "fsmount": (-1, 0, 0),
    "fspick": (-1, BAD, 0),
    "move_mount": (-1, BAD, -1, BAD, 0),
    "open_tree": (-1, BAD, 0),
    "mount_setattr": (-1, BAD, 0, 0, 0),
    "unshare": (1,),  # a bit of CSIGNAL, no namespace: EINVAL; zero would succeed
    "setns": (-1, 0),
    "bpf": (-1, 0, 0),  # no such command: EINVAL
    "perf_event_open": (BAD, 0, -1, -1, 0),
    "kexec_load": (0, 1000, 0, 0),  # over KEXEC_SEGMENT_MAX; zero segments would unload a loaded kernel
    "kexec_file_load": (-1, -1, 0, 0, 0),
    "init_module": (BAD, 0, BAD),  # shorter than an ELF header: ENOEXEC
    "finit_module": (-1, BAD, 0),
    "delete_module": (BAD, 0),
    "keyctl": (-1, 0, 0, 0, 0),  # no such command: EOPNOTSUPP
    "add_key": (BAD, BAD, BAD, 0, 0),
    "request_key": (BAD, BAD, BAD, 0),
    "userfaultfd": (2,),  # not a flag of it: EINVAL; zero would make one
    "io_uring_setup": (0, BAD),
    "io_uring_enter": (-1, 0, 0, 0, 0, 0),
    "io_uring_register": (-1, 0, 0, 0),
    "reboot": (0, 0, 0, 0),  # no magic number: EINVAL
    "swapon": (BAD, 0),
    "swapoff": (BAD,),
    "acct": (BAD,),  # NULL would turn accounting off
    "quotactl": (0, BAD, 0, 0),
    "quotactl_fd": (-1, 0, 0, 0),
    "_sysctl": (BAD,),
    "open_by_handle_at": (-1, BAD, 0),
    "name_to_handle_at": (-1, BAD, BAD, BAD, 0),
    "lookup_dcookie": (0, BAD, 0),
    "uselib": (BAD,),
    "iopl": (4,),  # over 3: EINVAL; the current level would succeed
    "ioperm": (0, 0, 0),  # no port: EINVAL
    "syslog": (-1, 0, 0),  # no such action: EINVAL; 0 would succeed, 5 clear the log
    "vm86old": (BAD,),
    "vm86": (0, BAD),
    "settimeofday": (BAD, BAD),  # NULL, NULL would succeed, doing nothing
    "stime": (BAD,),
    "clock_settime": (0, BAD),
    "clock_settime64": (0, BAD),
    "clock_adjtime": (0, BAD),
    "clock_adjtime64": (0, BAD),
    "adjtimex": (BAD,),
    "sethostname": (BAD, 1),  # NULL, 0 would empty the name
    "setdomainname": (BAD, 1),
}

# push rbx; push rbp; mov eax, [rdi]; mov ebx, [rdi+4]; mov ecx, [rdi+8]; mov edx, [rdi+12];
# mov esi, [rdi+16]; mov ebp, [rdi+24]; mov edi, [rdi+20]; int 0x80; pop rbp; pop rbx; ret:
# the i386 call regs[0](regs[1], ..., regs[6]), its raw answer (-errno on failure). int 0x80 from 64-bit
# code enters the kernel as i386, with i386's numbers and 32-bit registers: the standard trick.
_INT80 = bytes.fromhex("53 55 8b07 8b5f04 8b4f08 8b570c 8b7710 8b6f18 8b7f14 cd80 5d 5b c3")
_Regs = ctypes.c_uint32 * 7
_int80 = None


def i386_call(nr, *args):
    """The i386 system call `nr`: its result, or -errno. Killed by SIGSEGV where the kernel runs no i386."""
    global _int80
    if _int80 is None:
        code = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        code.write(_INT80)
        address = ctypes.addressof(ctypes.c_char.from_buffer(code))
        _int80 = (code, ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(_Regs))(address))
    regs = _Regs(nr, *(arg & 0xFFFF_FFFF for arg in args), *(0,) * (6 - len(args)))
    return _int80[1](regs)


def native_call(nr, *args):
    """The system call `nr` of this process's own ABI (x32's too: their numbers have bit 30 set): its
    result, or -errno."""
    ctypes.set_errno(0)
    result = _libc.syscall(ctypes.c_long(nr), *(ctypes.c_long(arg) for arg in args))
    return -ctypes.get_errno() if result == -1 else result


def _call(abi, nr, *args):
    return i386_call(nr, *args) if abi == "i386" else native_call(nr, *args)


def refused_calls(options):
    """Each call of options["numbers"] (ABI -> name -> number) with its harmless arguments: the errno it
    gave (0 for success), by ABI and name; and whether getpid (options["getpid"]: ABI -> number) still works."""
    gave = {"seccomp_mode": _seccomp_mode()}
    for abi, numbers in options["numbers"].items():
        gave[abi] = {name: -min(_call(abi, nr, *HARMLESS_ARGS.get(name, (0,) * 6)), 0)
                     for name, nr in numbers.items()}
    for abi, nr in options["getpid"].items():
        gave[f"{abi} getpid"] = _call(abi, nr) == os.getpid()
    return True, gave


def vsock(options):
    """What making a vsock socket gives (the errno, 0 for a socket), natively, with garbage in the upper
    half of the family's register (the kernel reads an int), through i386's socket and socketcall if
    options names their numbers; and a unix socket, natively and through i386, for comparison."""
    socket_nr = options["socket"]
    gave = {"seccomp_mode": _seccomp_mode(),
            "vsock": _errno_of_socket(native_call(socket_nr, AF_VSOCK, SOCK_STREAM, 0)),
            "vsock, upper half set": _errno_of_socket(native_call(socket_nr, 1 << 32 | AF_VSOCK, SOCK_STREAM, 0)),
            "unix": _errno_of_socket(native_call(socket_nr, AF_UNIX, SOCK_STREAM, 0))}
    if "i386_socket" in options:
        gave["i386 vsock"] = _errno_of_socket(i386_call(options["i386_socket"], AF_VSOCK, SOCK_STREAM, 0))
        gave["i386 unix"] = _errno_of_socket(i386_call(options["i386_socket"], AF_UNIX, SOCK_STREAM, 0))
        # The arguments are in memory, at an address that is not mapped: EFAULT if the kernel is reached.
        gave["i386 socketcall(SYS_SOCKET)"] = -min(i386_call(options["i386_socketcall"], SYS_SOCKET, BAD), 0)
    return True, gave


def _errno_of_socket(result):
    if result >= 0:
        os.close(result)
        return 0
    return -result


def _seccomp_mode():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Seccomp:"))
