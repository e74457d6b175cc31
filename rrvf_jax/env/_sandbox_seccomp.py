"""Seccomp filter for sandboxed jobs: the kernel refuses process creation, exec, sockets, signals
to other processes, SysV/POSIX IPC, mounts, ptrace and friends.

Runs inside the sandbox (stdlib only; loaded by path, never imported by the host). The filter is
a deny list on top of namespaces and rlimits: even code that escapes the Python-level audit hook
cannot fork (threads are still allowed), exec a program, open a socket or signal the zygote.
"""

from __future__ import annotations

import ctypes
import errno
import platform

_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2
_RET_ALLOW = 0x7FFF0000
_RET_KILL_PROCESS = 0x80000000
_RET_ERRNO = 0x00050000
_LD_ABS_W = 0x20  # BPF_LD | BPF_W | BPF_ABS
_JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
_JGE_K = 0x35  # BPF_JMP | BPF_JGE | BPF_K
_JSET_K = 0x45  # BPF_JMP | BPF_JSET | BPF_K
_RET_K = 0x06  # BPF_RET | BPF_K
_CLONE_THREAD = 0x00010000
_X32_BIT = 0x40000000

# (audit arch, clone nr, clone3 nr, denied syscall numbers) per machine.
_ARCHES = {
  "x86_64": (
    0xC000003E, 56, 435,
    (
      57, 58, 59, 322,  # fork vfork execve execveat
      62, 200, 234, 129, 297, 424,  # kill and friends
      41, 53,  # socket socketpair
      29, 30, 31, 64, 65, 66, 68, 69, 70, 71, 240,  # SysV shm/sem/msg, mq_open
      101, 310, 311,  # ptrace process_vm_readv/writev
      165, 166, 155, 161, 272, 308,  # mount umount2 pivot_root chroot unshare setns
      428, 429, 430, 431, 432, 433, 442,  # new mount API
      321, 298, 323, 425, 426, 427,  # bpf perf_event_open userfaultfd io_uring_*
      248, 249, 250, 246, 320, 175, 313, 176, 169, 167, 168, 163,  # keys kexec modules reboot...
      164, 227, 170, 171, 303, 304, 300, 179, 103, 153, 135,  # clocks hostname handles fanotify ...
    ),
  ),
  "aarch64": (
    0xC00000B7, 220, 435,
    (
      221, 281,  # execve execveat
      129, 130, 131, 138, 240, 424,  # kill and friends
      198, 199,  # socket socketpair
      186, 187, 188, 189, 190, 191, 192, 193, 194, 195, 196, 197, 180,  # SysV IPC, mq_open
      117, 270, 271,  # ptrace process_vm_readv/writev
      40, 39, 41, 51, 97, 268,  # mount umount2 pivot_root chroot unshare setns
      428, 429, 430, 431, 432, 433, 442,  # new mount API
      280, 241, 282, 425, 426, 427,  # bpf perf_event_open userfaultfd io_uring_*
      217, 218, 219, 104, 294, 105, 273, 106, 142, 224, 225, 89,  # keys kexec modules reboot...
      170, 112, 161, 162, 264, 265, 262, 60, 116, 58, 92,  # clocks hostname handles fanotify ...
    ),
  ),
}  # fmt: skip


class _SockFilter(ctypes.Structure):
  """struct sock_filter: one BPF instruction."""

  _fields_ = [
    ("code", ctypes.c_ushort),
    ("jt", ctypes.c_ubyte),
    ("jf", ctypes.c_ubyte),
    ("k", ctypes.c_uint32),
  ]


class _SockFprog(ctypes.Structure):
  """struct sock_fprog: a BPF program."""

  _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


def build_program(machine: str) -> list[tuple[int, int, int, int]]:
  """Returns the BPF program (code, jt, jf, k) for this machine, or raises KeyError."""
  audit_arch, clone_nr, clone3_nr, denied = _ARCHES[machine]
  deny = _RET_ERRNO | errno.EPERM
  prog = [
    (_LD_ABS_W, 0, 0, 4),  # seccomp_data.arch
    (_JEQ_K, 1, 0, audit_arch),
    (_RET_K, 0, 0, _RET_KILL_PROCESS),  # a foreign syscall ABI (e.g. int 0x80) is never legitimate
    (_LD_ABS_W, 0, 0, 0),  # seccomp_data.nr
  ]
  if machine == "x86_64":
    prog += [(_JGE_K, 0, 1, _X32_BIT), (_RET_K, 0, 0, deny)]
  for nr in denied:
    prog += [(_JEQ_K, 0, 1, nr), (_RET_K, 0, 0, deny)]
  # clone is how threads are made too: allow it only with CLONE_THREAD (args[0], low word).
  prog += [
    (_JEQ_K, 0, 4, clone_nr),
    (_LD_ABS_W, 0, 0, 16),
    (_JSET_K, 0, 1, _CLONE_THREAD),
    (_RET_K, 0, 0, _RET_ALLOW),
    (_RET_K, 0, 0, deny),
  ]
  # clone3 hides its flags behind a pointer; ENOSYS makes glibc fall back to clone for threads.
  prog += [(_JEQ_K, 0, 1, clone3_nr), (_RET_K, 0, 0, _RET_ERRNO | errno.ENOSYS)]
  prog.append((_RET_K, 0, 0, _RET_ALLOW))
  return prog


def prepare():
  """Builds the filter once (e.g. in the zygote); returns a function installing it, or None."""
  machine = platform.machine()
  if machine not in _ARCHES:
    return None
  prog = build_program(machine)
  filters = (_SockFilter * len(prog))(*[_SockFilter(*ins) for ins in prog])
  fprog = _SockFprog(len(prog), filters)
  prctl = ctypes.CDLL(None, use_errno=True).prctl

  def install_prepared() -> bool:
    """Installs the prebuilt filter on the calling process (irreversible)."""
    if prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
      return False
    return prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) == 0

  install_prepared.keep_alive = (filters, fprog)  # the kernel reads them at install time
  return install_prepared


def install() -> bool:
  """Installs the filter on the calling process; returns False where unsupported."""
  installer = prepare()
  return installer is not None and installer()
