"""Zygote for the sandbox pool: a warm Python that forks one fresh, locked-down child per job.

Runs as a script inside the sandbox (stdlib only; never imported by the host). Start-up imports the
driver (e.g. matplotlib) once; each job is then a `fork()` of this warm process, so it starts with
clean, identical state in milliseconds. The child, before running any model-written code: starts
its own session, closes every inherited file descriptor, moves into a fresh working directory,
sets rlimits (CPU, address space, file size, processes, open files, no core dumps), drops to
`nobody` where the zygote is root without namespaces (if the Python install stays readable),
installs a seccomp filter (no fork/exec/socket/kill) and a Python audit hook (no image reads, no
writes outside the working directory, no processes, sockets or ctypes). The zygote
enforces the wall-clock deadline, kills what is left, removes the working directory and wipes the
shared scratch space, so nothing from one job reaches the next.

Protocol (stdin/stdout of the zygote, both pipes): frames of a 4-byte big-endian length and a body.
Request: one JSON frame. Reply: a JSON header frame, then a payload frame (raw bytes).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import gc
import importlib.util
import json
import linecache
import os
import random
import resource
import select
import shutil
import signal
import struct
import sys
import tempfile
import time
import traceback

_FRAME = struct.Struct("!I")
_MAX_REQUEST = 64 << 20
_HEADER_LIMIT = 1 << 20
_MESSAGE_LIMIT = 4000
_NOBODY = 65534
_CODE_NAME = "<code>"
_STATUSES = (
  "ok", "syntax_error", "runtime_error", "timeout", "memory", "no_figure", "blank_image",
  "oversize_output", "forbidden",
)  # fmt: skip
_IMAGE_EXTS = (
  ".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff", ".ico", ".ppm", ".pgm",
  ".pbm", ".pnm", ".npy", ".npz", ".pkl", ".pickle", ".h5", ".hdf5", ".svg", ".pdf", ".eps",
  ".jfif", ".avif", ".heic", ".exr", ".tga", ".dds", ".pcx", ".xbm", ".xpm", ".jp2",
)  # fmt: skip
_ALWAYS_FORBIDDEN = {
  "os.system": "run a shell command",
  "os.exec": "exec a program",
  "os.posix_spawn": "spawn a process",
  "os.spawn": "spawn a process",
  "os.fork": "fork a process",
  "os.forkpty": "fork a process",
  "os.kill": "send a signal",
  "os.killpg": "send a signal",
  "subprocess.Popen": "start a subprocess",
  "pty.spawn": "spawn a process",
  "socket.__new__": "open a socket",
  "socket.connect": "connect a socket",
  "socket.bind": "bind a socket",
  "socket.getaddrinfo": "resolve a host name",
  "socket.gethostbyname": "resolve a host name",
  "urllib.Request": "make a network request",
  "webbrowser.open": "open a web browser",
  "sys.addaudithook": "add an audit hook",
  "sys.settrace": "install a tracer",
  "sys.setprofile": "install a profiler",
  "gc.get_objects": "inspect the garbage collector",
  "gc.get_referrers": "inspect the garbage collector",
  "gc.get_referents": "inspect the garbage collector",
  "sqlite3.connect": "open a database",
}
_WRITE_EVENTS = {  # event -> indexes of path arguments that get modified
  "os.mkdir": (0,),
  "os.remove": (0,),
  "os.rmdir": (0,),
  "os.rename": (0, 1),
  "os.link": (0, 1),
  "os.symlink": (1,),
  "os.chmod": (0,),
  "os.chown": (0,),
  "os.truncate": (0,),
  "os.utime": (0,),
  "os.chflags": (0,),
  "os.mkfifo": (0,),
  "os.mknod": (0,),
  "shutil.rmtree": (0,),
}
_READ_EVENTS = {"os.listdir": (0,), "os.scandir": (0,), "os.chdir": (0,)}
_OPEN_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


# ----------------------------------------------------------------------------- framing


def _write_all(fd: int, data: bytes) -> None:
  """Writes all bytes to a file descriptor."""
  view = memoryview(data)
  while view:
    view = view[os.write(fd, view) :]


def write_frame(fd: int, body: bytes) -> None:
  """Writes one length-prefixed frame."""
  _write_all(fd, _FRAME.pack(len(body)) + body)


def _read_exact(fd: int, n: int) -> bytes | None:
  """Reads exactly n bytes, or returns None at end of file."""
  chunks, got = [], 0
  while got < n:
    chunk = os.read(fd, min(n - got, 1 << 20))
    if not chunk:
      return None
    chunks.append(chunk)
    got += len(chunk)
  return b"".join(chunks)


def read_frame(fd: int, limit: int) -> bytes | None:
  """Reads one frame (None at end of file); raises ValueError beyond `limit` bytes."""
  head = _read_exact(fd, _FRAME.size)
  if head is None:
    return None
  (size,) = _FRAME.unpack(head)
  if size > limit:
    raise ValueError(f"frame of {size} bytes exceeds {limit}")
  return _read_exact(fd, size) if size else b""


def split_frames(buf: bytes, limit: int) -> tuple[dict, bytes] | None:
  """Parses a child's output (header frame + payload frame); None when malformed."""
  try:
    (hlen,) = _FRAME.unpack_from(buf, 0)
    if hlen > _HEADER_LIMIT:
      return None
    header = json.loads(buf[_FRAME.size : _FRAME.size + hlen])
    off = _FRAME.size + hlen
    (plen,) = _FRAME.unpack_from(buf, off)
    payload = buf[off + _FRAME.size : off + _FRAME.size + plen]
  except (struct.error, ValueError):
    return None
  ok = isinstance(header, dict) and header.get("status") in _STATUSES
  if not ok or len(payload) != plen or plen > limit:
    return None
  return header, bytes(payload)


# ----------------------------------------------------------------------------- job side


class _OutputOverflow(BaseException):
  """Raised when the program prints more than it may (BaseException: `except Exception` misses)."""


class _CappedSink:
  """Stands in for sys.stdout/sys.stderr: discards text but counts it, and stops a flood."""

  def __init__(self, limit: int) -> None:
    self.limit = limit
    self.count = 0
    self.overflowed = False

  def write(self, text: str) -> int:
    """Counts printed text; raises _OutputOverflow past the limit."""
    self.count += len(text)
    if self.count > self.limit:
      self.overflowed = True
      raise _OutputOverflow(f"the program printed more than {self.limit} characters")
    return len(text)

  def flush(self) -> None:
    """Nothing to flush: the text is discarded."""
    pass

  def isatty(self) -> bool:
    """Not a terminal."""
    return False

  def fileno(self) -> int:
    """There is no descriptor behind the sink."""
    raise OSError("stdout is not a file in the sandbox")


class _AuditPolicy:
  """The audit hook: ends the job as `forbidden` on any disallowed event, before it happens."""

  def __init__(self, out_fd: int, read_roots: list[str], write_roots: list[str]) -> None:
    self.out_fd = out_fd
    self.read_roots = [r.rstrip("/") or "/" for r in read_roots]
    self.write_roots = [r.rstrip("/") or "/" for r in write_roots]
    self.busy = False

  def __call__(self, event: str, args: tuple) -> None:
    """Checks one audit event; ends the job on a violation."""
    if self.busy:
      return  # our own checks (realpath) may raise events; they are not the program's
    if event == "open":
      return self._check_open(args)
    why = _ALWAYS_FORBIDDEN.get(event)
    if why is None and event.startswith("ctypes."):
      why = "use ctypes"
    if why is not None:
      self.deny(why, event)
    if event in _WRITE_EVENTS:
      for i in _WRITE_EVENTS[event]:
        self._check_path(args[i] if len(args) > i else None, write=True)
    elif event in _READ_EVENTS:
      self._check_path(args[0] if args else None, write=False)

  def _check_open(self, args: tuple) -> None:
    """Checks an `open` event (read or write, from mode or flags)."""
    path, mode, flags = ((*tuple(args), None, None, None))[:3]
    if isinstance(mode, str):
      write = any(c in mode for c in "wax+")
    else:
      write = bool((flags or 0) & _OPEN_WRITE_FLAGS)
    self._check_path(path, write=write)

  def _check_path(self, path: object, *, write: bool) -> None:
    """Denies image reads, reads outside the read roots and writes outside the workdir."""
    if path is None or isinstance(path, int):
      return  # an already-open descriptor (or the current directory)
    self.busy = True
    try:
      text = os.fsdecode(path)
      real = os.path.realpath(text)
    except (TypeError, ValueError, OSError):
      self.deny("use an unusual path", repr(path)[:200])
    finally:
      self.busy = False
    if not write and (text.lower().endswith(_IMAGE_EXTS) or real.lower().endswith(_IMAGE_EXTS)):
      self.deny("read an image or data file", text)
    roots = self.write_roots if write else self.read_roots + self.write_roots
    if not any(real == r or real.startswith(r + "/") or r == "/" for r in roots):
      self.deny("write outside its working directory" if write else "read a file", text)

  def deny(self, why: str, detail: str) -> None:
    """Reports the job as forbidden and ends it at once (nothing can catch this)."""
    message = f"Forbidden: the program tried to {why} ({detail[:300]})."
    header = json.dumps({"status": "forbidden", "message": message, "meta": {}}).encode()
    try:
      write_frame(self.out_fd, header)
      write_frame(self.out_fd, b"")
    finally:
      os._exit(0)


def format_user_error(exc: BaseException) -> str:
  """Formats an exception for the policy: user-code frames, then the library frame that raised."""
  tb = traceback.TracebackException.from_exception(exc, capture_locals=False)
  frames = list(tb.stack)
  user = [f for f in frames if f.filename == _CODE_NAME]
  lines = []
  if frames:
    lines.append("Traceback (most recent call last):")
    shown = user + ([frames[-1]] if frames[-1].filename != _CODE_NAME else [])
    for f in shown:
      name = f.filename if f.filename == _CODE_NAME else _short_path(f.filename)
      lines.append(f'  File "{name}", line {f.lineno}, in {f.name}')
      if f.line:
        lines.append(f"    {f.line.strip()}")
  lines.extend(part.rstrip("\n") for part in tb.format_exception_only())
  return _clip("\n".join(lines))


def _short_path(path: str) -> str:
  """Shortens a library path to its package-relative tail (site-packages/... -> ...)."""
  for marker in ("site-packages/", "dist-packages/", "/lib/python"):
    if marker in path:
      return path.split(marker, 1)[1]
  return os.path.basename(path)


def _clip(text: str) -> str:
  """Keeps a message within the size limit, keeping the end (where the error is)."""
  return text if len(text) <= _MESSAGE_LIMIT else "...\n" + text[-_MESSAGE_LIMIT:]


class _Job:
  """One job inside the forked child: limits, isolation, run the code, report the result."""

  def __init__(self, zygote: Zygote, request: dict, out_fd: int, workdir: str) -> None:
    self.z = zygote
    self.request = request
    self.out_fd = out_fd
    self.workdir = workdir
    self.limits = request.get("limits", {})
    self.options = request.get("options", {})
    self.sink = _CappedSink(int(self.limits.get("max_stdout_chars", 1 << 20)))
    self.clock = [("start", time.perf_counter())]  # stage timestamps, reported as timings

  def _tick(self, stage: str) -> None:
    """Records the end of a stage (for the timings in the result)."""
    self.clock.append((stage, time.perf_counter()))

  def run(self) -> None:
    """Runs the job to completion and exits the process (never returns)."""
    try:
      self._isolate()
      self._tick("isolate")
      status, message, meta, payload = self._execute()
    except MemoryError:
      status, message, meta, payload = "memory", "MemoryError: out of memory.", {}, b""
    except BaseException as e:  # a failure of the sandbox itself, reported rather than hidden
      status, message, meta, payload = "runtime_error", f"sandbox error: {e!r}", {}, b""
    if self.sink.overflowed:
      status, message, payload = "oversize_output", self._overflow_message(), b""
    self._report(status, message, meta, payload)

  def _isolate(self) -> None:
    """Applies everything that must hold before model code runs."""
    os.setsid()
    self._reset_fds()
    os.chdir(self.workdir)
    self._set_rlimits()
    if self.z.drop_to_nobody:
      os.setgroups([])
      os.setgid(_NOBODY)
      os.setuid(_NOBODY)
    if self.z.seccomp is not None and not self.z.seccomp():
      raise RuntimeError("seccomp filter could not be installed")
    sys.stdout = sys.stderr = self.sink  # type: ignore[assignment]
    random.seed(0)

  def _reset_fds(self) -> None:
    """Points stdio at /dev/null and closes every other inherited descriptor."""
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
      os.dup2(null, fd)
    os.dup2(self.out_fd, 3)
    self.out_fd = 3
    os.closerange(4, resource.getrlimit(resource.RLIMIT_NOFILE)[0])

  def _set_rlimits(self) -> None:
    """Caps CPU time, address space, file size, processes, open files and core dumps."""
    cpu = int(float(self.request.get("timeout_s", 10.0))) + 1
    mem = int(self.limits.get("memory_mb", 2048)) << 20
    fsize = int(self.limits.get("max_file_mb", 16)) << 20
    settings = {
      resource.RLIMIT_CPU: (cpu, cpu + 1),
      resource.RLIMIT_AS: (mem, mem),
      resource.RLIMIT_FSIZE: (fsize, fsize),
      resource.RLIMIT_NPROC: (int(self.limits.get("max_processes", 16)),) * 2,
      resource.RLIMIT_NOFILE: (int(self.limits.get("max_open_files", 64)),) * 2,
      resource.RLIMIT_CORE: (0, 0),
      resource.RLIMIT_MEMLOCK: (0, 0),
      resource.RLIMIT_MSGQUEUE: (0, 0),
    }
    for which, value in settings.items():
      resource.setrlimit(which, value)

  def _execute(self) -> tuple[str, str, dict, bytes]:
    """Prepares the driver, runs the user code under the audit hook, then collects the output."""
    driver = self.z.driver
    driver.prepare(self.options)
    code = str(self.request.get("code", ""))
    linecache.cache[_CODE_NAME] = (len(code), None, code.splitlines(True), _CODE_NAME)
    sys.addaudithook(_AuditPolicy(self.out_fd, self.z.read_roots, [self.workdir, os.devnull]))
    try:
      compiled = compile(code, _CODE_NAME, "exec", dont_inherit=True)
    except (SyntaxError, ValueError) as e:
      return "syntax_error", _clip("".join(traceback.format_exception_only(e))), {}, b""
    self._tick("prepare")
    failure = self._run_user_code(compiled)
    self._tick("exec")
    if failure is not None:
      return failure
    try:
      return driver.collect(self.options)
    except MemoryError:
      return "memory", "MemoryError: out of memory while drawing the figure.", {}, b""
    except _OutputOverflow:
      return "oversize_output", self._overflow_message(), {}, b""
    except Exception as e:
      return "runtime_error", "Error while rendering the output:\n" + format_user_error(e), {}, b""

  def _run_user_code(self, compiled: object) -> tuple[str, str, dict, bytes] | None:
    """Executes the program; returns a failure tuple, or None when it finished normally."""
    scope = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
      exec(compiled, scope)  # the program runs here, under rlimits, seccomp and the audit hook
    except SystemExit as e:
      if e.code not in (None, 0):
        return "runtime_error", f"The program exited with status {e.code!r}.", {}, b""
    except MemoryError as e:
      return "memory", format_user_error(e), {}, b""
    except _OutputOverflow:
      return "oversize_output", self._overflow_message(), {}, b""
    except OSError as e:
      if e.errno in (errno.EFBIG, errno.ENOSPC):  # RLIMIT_FSIZE (Python ignores SIGXFSZ) or tmpfs
        return "oversize_output", f"The program wrote more to files than allowed ({e}).", {}, b""
      return "runtime_error", format_user_error(e), {}, b""
    except BaseException as e:
      return "runtime_error", format_user_error(e), {}, b""
    return None

  def _overflow_message(self) -> str:
    """The message for a job that printed too much."""
    return f"The program printed more than {self.sink.limit} characters of output."

  def _report(self, status: str, message: str, meta: dict, payload: bytes) -> None:
    """Sends the result to the zygote and exits."""
    self._tick("collect")
    stages = {b[0]: b[1] - a[1] for a, b in zip(self.clock, self.clock[1:], strict=False)}
    meta = {**meta, "timings": stages}
    try:
      header = json.dumps({"status": status, "message": _clip(message), "meta": meta}).encode()
      write_frame(self.out_fd, header)
      write_frame(self.out_fd, payload)
    finally:
      os._exit(0)


# ----------------------------------------------------------------------------- zygote side


class Zygote:
  """The warm parent: loads the driver once, forks a child per job and supervises it."""

  def __init__(self, args: argparse.Namespace) -> None:
    self.jobs_root = args.jobs_root
    self.scratch = [args.jobs_root, *(args.scratch or [])]
    self.keep = set(args.keep or [])
    self.driver = _load_module("_rrvf_driver", args.driver)
    self.seccomp = _load_seccomp(args.seccomp)
    self.read_roots = _read_roots(args.read_root or [])
    self.drop_to_nobody = os.geteuid() == 0 and args.mode == "rlimit" and _nobody_can_run()
    self.jobs = 0

  def info(self) -> dict:
    """What the host needs to know about this worker."""
    return {
      "ready": True,
      "pid": os.getpid(),
      "seccomp": self.seccomp is not None,
      "uid": os.geteuid(),
      "job_uid": _NOBODY if self.drop_to_nobody else os.geteuid(),
      "python": sys.version.split()[0],
    }

  def run(self, request: dict) -> tuple[dict, bytes]:
    """Runs one job in a forked child; returns the reply header and payload."""
    start = time.monotonic()
    timeout = float(request.get("timeout_s", 10.0))
    limit = int(request.get("limits", {}).get("max_output_bytes", 32 << 20))
    workdir = tempfile.mkdtemp(prefix="job-", dir=self.jobs_root)
    if self.drop_to_nobody:
      os.chown(workdir, _NOBODY, _NOBODY)
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
      os.close(read_fd)
      try:
        _Job(self, request, write_fd, workdir).run()
      finally:
        os._exit(70)
    os.close(write_fd)
    try:
      buf, why, exited = _supervise(read_fd, pid, start + timeout, limit)
    finally:
      os.close(read_fd)
      # Nothing of the job outlives the reply: the child is killed (if still there) and reaped.
      status, usage = _finish(pid, exited)
      self._cleanup(workdir)
    header, payload = _classify(buf, why, status, usage, request, limit)
    header["timings"] = {"run": time.monotonic() - start}
    self.jobs += 1
    return header, payload

  def _cleanup(self, workdir: str) -> None:
    """Kills leftovers (without seccomp a job could fork) and wipes its files and the scratch."""
    if self.seccomp is None:
      _kill_descendants()
    shutil.rmtree(workdir, ignore_errors=True)
    for base in self.scratch:
      _wipe_dir(base, keep=self.keep)


def _supervise(fd: int, pid: int, deadline: float, limit: int) -> tuple[bytes, str | None, tuple]:
  """Collects the child's output until it exits, the deadline passes, or it writes too much."""
  buf = bytearray()
  eof, exited = False, None
  pidfd = _pidfd_open(pid)
  try:
    while not (eof and exited is not None):
      now = time.monotonic()
      if now >= deadline:
        return bytes(buf), "timeout", exited
      watch = ([] if eof else [fd]) + ([pidfd] if pidfd is not None and exited is None else [])
      wait = deadline - now if pidfd is not None else min(deadline - now, 0.005)
      ready, _, _ = select.select(watch, [], [], wait)
      if fd in ready:
        chunk = os.read(fd, 1 << 16)
        eof = not chunk
        buf += chunk
        if len(buf) > limit + _HEADER_LIMIT:
          return bytes(buf), "oversize", exited
        if _frames_complete(buf):
          return bytes(buf), None, exited  # the child has reported; it is killed and reaped next
      if exited is None and (pidfd is None or pidfd in ready):
        got, status, usage = os.wait4(pid, os.WNOHANG)
        if got == pid:
          exited = (status, usage)
          deadline = min(deadline, time.monotonic() + 0.5)  # a stray holder of the pipe
  finally:
    if pidfd is not None:
      os.close(pidfd)
  return bytes(buf), None, exited


def _frames_complete(buf: bytes | bytearray) -> bool:
  """Whether a child's output holds a whole header frame and a whole payload frame."""
  if len(buf) < _FRAME.size:
    return False
  (hlen,) = _FRAME.unpack_from(buf, 0)
  off = _FRAME.size + hlen
  if hlen > _HEADER_LIMIT or len(buf) < off + _FRAME.size:
    return False
  (plen,) = _FRAME.unpack_from(buf, off)
  return len(buf) >= off + _FRAME.size + plen


def _pidfd_open(pid: int) -> int | None:
  """Returns a pollable descriptor for the child's exit (Linux 5.3+), or None to poll instead."""
  try:
    return os.pidfd_open(pid)
  except (AttributeError, OSError):
    return None


def _finish(pid: int, exited: tuple | None) -> tuple[int, object]:
  """Makes sure the child is dead and reaped; returns its wait status and resource usage."""
  if exited is not None:
    return exited
  with contextlib.suppress(ProcessLookupError):
    os.kill(pid, signal.SIGKILL)
  _, status, usage = os.wait4(pid, 0)
  return status, usage


def _classify(buf: bytes, why: str | None, status: int, usage: object, request: dict, limit: int):
  """Turns what the child did into a reply (header dict, payload)."""
  timeout = float(request.get("timeout_s", 10.0))
  if why == "timeout":
    return _reply("timeout", f"Execution timed out after {timeout:g} s.")
  if why == "oversize":
    return _reply("oversize_output", f"The program wrote more than {limit} bytes of output.")
  parsed = split_frames(buf, limit) if buf else None
  if parsed is not None:
    header, payload = parsed
    return _reply(header["status"], str(header.get("message", "")), header.get("meta"), payload)
  if os.WIFSIGNALED(status):
    return _classify_signal(os.WTERMSIG(status), usage, request)
  code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else -1
  return _reply("runtime_error", f"The program ended (exit status {code}) without a result.")


def _classify_signal(sig: int, usage: object, request: dict) -> tuple[dict, bytes]:
  """Classifies a child killed by a signal (CPU limit, file size limit, or a crash)."""
  timeout = float(request.get("timeout_s", 10.0))
  cpu = getattr(usage, "ru_utime", 0.0) + getattr(usage, "ru_stime", 0.0)
  if sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu >= int(timeout)):
    return _reply("timeout", f"Execution used more than {timeout:g} s of CPU time.")
  if sig == signal.SIGXFSZ:
    return _reply("oversize_output", "The program wrote a file larger than allowed.")
  mem_limit = int(request.get("limits", {}).get("memory_mb", 2048)) << 20
  if getattr(usage, "ru_maxrss", 0) * 1024 >= 0.8 * mem_limit:
    return _reply("memory", "The program ran out of memory.")
  name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
  return _reply("runtime_error", f"The program crashed ({name}).")


def _reply(status: str, message: str, meta: object = None, payload: bytes = b"") -> tuple:
  """Builds a reply header and payload."""
  meta = meta if isinstance(meta, dict) else {}
  return {"status": status, "message": _clip(message), "meta": meta}, payload


def _kill_descendants() -> None:
  """SIGKILLs every descendant of this process (orphans come back to us: we are a subreaper)."""
  me = os.getpid()
  for _ in range(100):
    kids = [pid for pid, ppid in _process_table() if ppid == me]
    if not kids:
      return
    for pid in kids:
      try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
      except (ProcessLookupError, ChildProcessError):
        pass


def _process_table() -> list[tuple[int, int]]:
  """Lists (pid, parent pid) of all visible processes, from /proc."""
  table = []
  for name in os.listdir("/proc"):
    if not name.isdigit():
      continue
    try:
      with open(f"/proc/{name}/stat", "rb") as f:
        stat = f.read()
    except OSError:
      continue
    fields = stat[stat.rfind(b")") + 2 :].split()
    table.append((int(name), int(fields[1])))
  return table


def _wipe_dir(path: str, keep: set[str]) -> None:
  """Removes everything in a directory except the names in `keep`."""
  try:
    names = os.listdir(path)
  except OSError:
    return
  for name in names:
    if name in keep:
      continue
    full = os.path.join(path, name)
    if os.path.isdir(full) and not os.path.islink(full):
      shutil.rmtree(full, ignore_errors=True)
    else:
      with contextlib.suppress(OSError):
        os.unlink(full)


def _load_module(name: str, path: str):
  """Imports a module from a file path under a private name (no sys.path changes)."""
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module
  spec.loader.exec_module(module)
  return module


def _load_seccomp(path: str | None):
  """Builds the seccomp filter once; returns its installer if it works (tried in a child)."""
  if not path:
    return None
  install = _load_module("_rrvf_seccomp", path).prepare()
  if install is None:
    return None
  pid = os.fork()
  if pid == 0:
    os._exit(0 if install() else 1)
  _, status = os.waitpid(pid, 0)
  return install if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0 else None


def _nobody_can_run() -> bool:
  """Whether a child switched to `nobody` can still read the Python install (probed in a fork)."""
  pid = os.fork()
  if pid == 0:
    try:
      os.setgroups([])
      os.setgid(_NOBODY)
      os.setuid(_NOBODY)
      os.listdir(os.path.dirname(os.__file__))
      with open(os.__file__, "rb"):
        pass
      os._exit(0)
    except BaseException:
      os._exit(1)
  _, status = os.waitpid(pid, 0)
  return os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def _read_roots(extra: list[str]) -> list[str]:
  """Directories the program may read: the Python install, fonts, configuration, the driver."""
  import site

  roots = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
  roots.update(site.getsitepackages())
  roots.update(["/usr/share/fonts", "/usr/local/share/fonts", "/etc/fonts", "/usr/share/zoneinfo"])
  roots.add(os.path.dirname(os.path.abspath(__file__)))
  roots.add(os.environ.get("MPLCONFIGDIR", "/nonexistent"))
  roots.update(extra)
  return sorted(os.path.realpath(r) for r in roots if r)


def _prepare_process(args: argparse.Namespace) -> tuple[int, int]:
  """Moves the protocol pipes off stdio, and makes this process non-dumpable and a subreaper."""
  proto_in, proto_out = os.dup(0), os.dup(1)
  null = os.open(os.devnull, os.O_RDONLY)
  os.dup2(null, 0)
  os.dup2(2, 1)  # stray prints from libraries must not corrupt the protocol
  libc = ctypes.CDLL(None, use_errno=True)
  libc.prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE=0: jobs cannot read or write our memory via /proc
  libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: orphans of a job come back to us
  os.makedirs(args.jobs_root, exist_ok=True)
  return proto_in, proto_out


def _serve(zygote: Zygote, proto_in: int, proto_out: int) -> None:
  """Answers requests until the host closes the pipe."""
  write_frame(proto_out, json.dumps(zygote.info()).encode())
  while True:
    body = read_frame(proto_in, _MAX_REQUEST)
    if body is None:
      return
    header, payload = zygote.run(json.loads(body))
    write_frame(proto_out, json.dumps(header).encode())
    write_frame(proto_out, payload)


def main() -> None:
  """Entry point: python _sandbox_worker.py --driver DRIVER.py --jobs-root DIR [...]."""
  parser = argparse.ArgumentParser()
  parser.add_argument("--driver", required=True)
  parser.add_argument("--jobs-root", required=True)
  parser.add_argument("--mode", choices=("bwrap", "rlimit"), required=True)
  parser.add_argument("--seccomp", default=None)
  parser.add_argument("--scratch", action="append", help="more directories wiped after each job")
  parser.add_argument("--keep", action="append", help="names in scratch dirs that survive wiping")
  parser.add_argument("--read-root", action="append")
  args = parser.parse_args()
  proto_in, proto_out = _prepare_process(args)
  zygote = Zygote(args)
  zygote.driver.warmup()
  # Move everything warm into the permanent GC generation: a collection in a job would otherwise
  # touch every object, copying the zygote's whole heap page by page (copy-on-write).
  gc.collect()
  gc.freeze()
  _serve(zygote, proto_in, proto_out)


if __name__ == "__main__":
  main()
