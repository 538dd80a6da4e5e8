"""Runs a command with unshare() refused (EPERM) by a seccomp filter, as Docker's default
seccomp profile refuses it: `python3 tests/unshare_refused.py COMMAND [ARG...]`. The tests
use it to run luafcgid where threads cannot have their own working directory."""

import ctypes
import errno
import os
import platform
import struct
import sys

# unshare's system call number and the AUDIT_ARCH_* value of the machines we know
ARCHES = {"x86_64": (272, 0xC000003E), "aarch64": (97, 0xC00000B7)}

PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
LOAD_WORD = 0x20                 # BPF_LD | BPF_W | BPF_ABS
JUMP_IF_EQUAL = 0x15             # BPF_JMP | BPF_JEQ | BPF_K
RETURN = 0x06                    # BPF_RET | BPF_K
ALLOW = 0x7FFF0000
REFUSE = 0x00050000 | errno.EPERM   # SECCOMP_RET_ERRNO
ARCH_OFFSET, NR_OFFSET = 4, 0       # in struct seccomp_data


class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]


def supported():
    return platform.machine() in ARCHES


def refuse_unshare():
    number, arch = ARCHES[platform.machine()]
    program = [
        (LOAD_WORD, 0, 0, ARCH_OFFSET),
        (JUMP_IF_EQUAL, 1, 0, arch),
        (RETURN, 0, 0, ALLOW),             # another ABI: not ours to judge
        (LOAD_WORD, 0, 0, NR_OFFSET),
        (JUMP_IF_EQUAL, 0, 1, number),
        (RETURN, 0, 0, REFUSE),
        (RETURN, 0, 0, ALLOW),
    ]
    code = b"".join(struct.pack("HBBI", *instruction) for instruction in program)
    fprog = SockFprog(len(program), code)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 or \
            libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"installing the seccomp filter: {os.strerror(error)}")


if __name__ == "__main__":
    refuse_unshare()
    os.execvp(sys.argv[1], sys.argv[1:])
