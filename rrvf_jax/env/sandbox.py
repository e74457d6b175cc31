"""Sandbox for model-written Python: a pool of warm, isolated worker processes.

Isolation, outermost first:

* **bubblewrap** (`isolation_level() == "bwrap"`): each worker lives in new user, mount, PID, IPC,
  UTS, cgroup and network namespaces (no network at all), as uid 65534 with no capabilities and no
  further user namespaces. Its file system is a read-only view of only the Python install, the
  virtualenv, /usr/lib, fonts and a few files under /etc, plus a size-capped scratch tmpfs
  (`/rrvf-scratch`, the only writable place; /tmp is read-only) and a read-only /dev with
  null/zero/random. The host's files (target images, training data, the repo)
  do not exist inside. Everything dies with the pool (`--die-with-parent`).
* **per job** (see `_sandbox_worker.py`): a fork of the warm zygote, in its own session, with a
  fresh working directory, rlimits (CPU, address space, file size, processes, open files, no core),
  a seccomp filter (no fork/exec/socket/kill/IPC/mount/ptrace) and an audit hook (no image reads, no
  reads outside the Python install/fonts, no writes outside the working directory, no processes,
  sockets or ctypes; threads are allowed, bounded by the address-space limit). The wall-clock
  deadline is enforced by the zygote (SIGKILL), and by the host as a backstop (kill and replace the
  whole worker). Before the result is returned the job's process is reaped and its working
  directory and the scratch are wiped, so nothing from one job reaches the next.
* **fallback** (`"rlimit"`), only where bubblewrap is missing or fails its self-test: the same
  per-job measures without namespaces, with a loud warning and a counter (`sandbox_metrics()`).

Outcomes are classified into the statuses of `rrvf_jax.env.types.Status`; a static check
(`codecheck.py`) answers `syntax_error` and obvious `forbidden` cases without running anything.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import os
import queue
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Iterable
from pathlib import Path

from rrvf_jax.env.codecheck import CodeLimits, check_code
from rrvf_jax.env.types import Status

log = logging.getLogger(__name__)

ISOLATION_BWRAP = "bwrap"
ISOLATION_RLIMIT = "rlimit"
_HERE = Path(__file__).resolve().parent
_WORKER = _HERE / "_sandbox_worker.py"
_SECCOMP = _HERE / "_sandbox_seccomp.py"
_INSIDE = "/opt/rrvf"  # where the worker scripts appear inside the sandbox
# The jobs' writable scratch inside the sandbox. Not /tmp: the host's Python or virtualenv may live
# under /tmp (a CI clone, say), and its read-only bind must neither be hidden by a tmpfs nor be
# walked by the after-job wipe.
_SCRATCH = "/rrvf-scratch"
_SANDBOX_UID = 65534
_FRAME = struct.Struct("!I")
_REPLY_HEADER_LIMIT = 1 << 20
_TEMP_PREFIX = "rrvf-sbx-"


@dataclasses.dataclass(frozen=True)
class SandboxConfig:
  """Limits and isolation settings of a sandbox pool."""

  timeout_s: float = 10.0  # wall-clock limit of one job (CPU limit: the same, rounded up, +1 s)
  memory_mb: int = 2048  # address-space limit of a job (the warm interpreter uses ~0.4 GB of it)
  max_file_mb: int = 16  # largest file a job may write
  # RLIMIT_NPROC; the kernel does not apply it to uid 0, which bwrap-as-root maps the sandbox to;
  # seccomp forbids fork in any case and the address-space limit bounds threads.
  max_processes: int = 16
  max_open_files: int = 64
  tmp_size_mb: int = 64  # size of the worker's scratch tmpfs (bwrap only; /tmp is read-only)
  max_output_bytes: int = 32 << 20  # largest result a job may send back
  max_stdout_chars: int = 1 << 20  # printing more than this ends the job as oversize_output
  code_limits: CodeLimits = dataclasses.field(default_factory=CodeLimits)
  isolation: str = "auto"  # "auto" (bwrap when it works), "bwrap" (required) or "rlimit"
  seccomp: bool = True
  startup_timeout_s: float = 60.0
  grace_s: float = 1.5  # the host kills a worker that has not answered by timeout + grace
  extra_ro_paths: tuple[str, ...] = ()  # more host paths the code may read (e.g. a conda prefix)

  def limits(self) -> dict[str, int]:
    """The per-job limits sent to the worker."""
    names = ("memory_mb", "max_file_mb", "max_processes", "max_open_files", "max_output_bytes")
    return {n: getattr(self, n) for n in names} | {"max_stdout_chars": self.max_stdout_chars}


@dataclasses.dataclass
class SandboxResult:
  """Outcome of one job: status, a message for the policy, the driver's payload and metadata."""

  status: Status
  message: str = ""
  payload: bytes = b""
  meta: dict = dataclasses.field(default_factory=dict)
  timings: dict[str, float] = dataclasses.field(default_factory=dict)


# ----------------------------------------------------------------------------- isolation level

_lock = threading.Lock()
_detected: dict[str, str | None] = {}  # "level" -> level, "reason" -> why bwrap is unusable
_metrics = {
  "jobs": 0,
  "fallback_jobs": 0,
  "worker_starts": 0,
  "worker_restarts": 0,
  "fallback_workers": 0,
}


def bwrap_executable() -> str | None:
  """Path of bubblewrap: $RRVF_BWRAP, else `bwrap` on PATH."""
  return os.environ.get("RRVF_BWRAP") or shutil.which("bwrap")


def isolation_level(requested: str = "auto") -> str:
  """Returns "bwrap" or "rlimit": what a pool created with `requested` isolation will use.

  "auto" honours $RRVF_SANDBOX_ISOLATION, then uses bubblewrap if its self-test passes. Falling
  back is never silent: it logs a warning (once) and is counted in `sandbox_metrics()`.
  """
  requested = requested if requested != "auto" else os.environ.get("RRVF_SANDBOX_ISOLATION", "auto")
  if requested not in ("auto", ISOLATION_BWRAP, ISOLATION_RLIMIT):
    raise ValueError(f"unknown sandbox isolation {requested!r} (auto, bwrap or rlimit)")
  if requested == ISOLATION_RLIMIT:
    return ISOLATION_RLIMIT
  with _lock:
    if "level" not in _detected:
      reason = _bwrap_self_test()
      _detected["level"] = ISOLATION_BWRAP if reason is None else ISOLATION_RLIMIT
      _detected["reason"] = reason
  if _detected["level"] == ISOLATION_BWRAP:
    return ISOLATION_BWRAP
  if requested == ISOLATION_BWRAP:
    raise RuntimeError(f"bubblewrap isolation was required but is unusable: {_detected['reason']}")
  return ISOLATION_RLIMIT


def sandbox_metrics() -> dict[str, object]:
  """Counters for logging: jobs, jobs run without namespaces, worker (re)starts, isolation level.

  `isolation` is the level of the most recently created pool (else the detected one);
  `fallback_jobs` counts jobs that ran without namespaces ("rlimit").
  """
  with _lock:
    out: dict[str, object] = dict(_metrics)
    out["isolation"] = _detected.get("last_pool") or _detected.get("level")
    out["bwrap_unusable_reason"] = _detected.get("reason")
  return out


def _count(name: str, n: int = 1) -> None:
  """Increments a metric."""
  with _lock:
    _metrics[name] += n


def _bwrap_self_test() -> str | None:
  """Runs a trivial Python program under the exact bwrap arguments; returns why it failed."""
  exe = bwrap_executable()
  if exe is None:
    return "bwrap not found (install the `bubblewrap` package)"
  probe = "import sys, numpy; print('ok')"
  argv = [*_bwrap_argv(exe, SandboxConfig(), binds=[]), sys.executable, "-s", "-P", "-c", probe]
  try:
    proc = subprocess.run(argv, capture_output=True, timeout=60, env=_host_env(), check=False)
  except (OSError, subprocess.TimeoutExpired) as e:
    return f"bwrap could not run: {e}"
  if proc.returncode != 0 or proc.stdout.strip() != b"ok":
    return f"bwrap self-test failed (exit {proc.returncode}): {proc.stderr.decode()[-500:]}"
  return None


def _warn_fallback() -> None:
  """Logs, once per process, that jobs run without namespace isolation."""
  with _lock:
    if _detected.get("warned"):
      return
    _detected["warned"] = "yes"
  log.warning(
    "SANDBOX DEGRADED: model-written code runs WITHOUT namespace isolation (rlimits, seccomp and "
    "an audit hook only; the host file system and network are reachable in principle). Reason: "
    "%s. Install bubblewrap and allow user namespaces to fix this.",
    _detected.get("reason") or "isolation='rlimit' was requested",
  )


# ----------------------------------------------------------------------------- command lines


def _sandbox_env(home: str, mplconfig: str) -> dict[str, str]:
  """The complete environment of a worker: nothing is inherited from the host."""
  return {
    "PATH": "/usr/bin:/bin",
    "HOME": home,
    "TMPDIR": home,
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "TZ": "UTC",
    "MPLBACKEND": "Agg",
    "MPLCONFIGDIR": mplconfig,
    "PYTHONHASHSEED": "0",
    "PYTHONDONTWRITEBYTECODE": "1",
    "PYTHONIOENCODING": "utf-8",
    "PYTHONNOUSERSITE": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "NUMEXPR_NUM_THREADS": "1",
  }


def _host_env() -> dict[str, str]:
  """Environment for launching bwrap itself (it clears it again inside)."""
  return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"}


def _python_paths(config: SandboxConfig) -> list[str]:
  """Host paths the sandboxed Python needs, read-only: install prefix, virtualenv, executable."""
  paths = {sys.base_prefix, sys.prefix, sys.exec_prefix, sys.base_exec_prefix}
  paths.discard("/usr")  # a system Python: /usr/lib is bound below, the binary on its own
  paths.add(os.path.realpath(sys.executable))
  paths.update(config.extra_ro_paths)
  return sorted(p for p in paths if p and os.path.exists(p))


def _bwrap_argv(exe: str, config: SandboxConfig, binds: list[tuple[str, str]]) -> list[str]:
  """bwrap arguments up to (not including) the command; `binds` are extra (host, inside) files."""
  argv = [exe, "--unshare-all", "--unshare-user", "--uid", str(_SANDBOX_UID)]
  argv += ["--gid", str(_SANDBOX_UID), "--cap-drop", "ALL", "--disable-userns"]
  argv += ["--die-with-parent", "--hostname", "sandbox", "--clearenv"]
  for key, value in _sandbox_env(_SCRATCH, f"{_SCRATCH}/mplconfig").items():
    argv += ["--setenv", key, value]
  # /tmp first, so that binds of host paths under /tmp land inside it; made read-only below.
  argv += ["--size", str(1 << 20), "--tmpfs", "/tmp"]
  argv += ["--ro-bind", "/usr/lib", "/usr/lib"]
  argv += _root_links()
  for path in _python_paths(config):
    argv += ["--ro-bind", path, path]
  for path in ("/usr/lib64", "/usr/lib32", "/usr/share/fonts", "/usr/local/share/fonts"):
    argv += ["--ro-bind-try", path, path]
  for path in ("/etc/fonts", "/etc/ld.so.cache", "/usr/share/zoneinfo"):
    argv += ["--ro-bind-try", path, path]
  argv += ["--remount-ro", "/tmp"]
  argv += ["--size", str(config.tmp_size_mb << 20), "--tmpfs", _SCRATCH]
  argv += ["--size", str(1 << 20), "--tmpfs", "/dev"]
  for dev in ("null", "zero", "random", "urandom"):
    argv += ["--dev-bind", f"/dev/{dev}", f"/dev/{dev}"]
  argv += ["--remount-ro", "/dev", "--proc", "/proc"]
  for host, inside in binds:
    argv += ["--ro-bind", host, inside]
  return [*argv, "--chdir", _SCRATCH]


def _root_links() -> list[str]:
  """Recreates /lib, /lib64, /bin... as on the host (symlinks into /usr, or bound directories)."""
  argv = []
  for name in ("/lib", "/lib64", "/lib32", "/bin"):
    if os.path.islink(name):
      argv += ["--symlink", os.readlink(name), name]
    elif os.path.isdir(name) and name != "/bin":
      argv += ["--ro-bind", name, name]
  return argv


def _worker_argv(driver: Path, config: SandboxConfig, mode: str, home: str | None) -> list[str]:
  """Full command line of one worker (zygote); `home` is its private directory without bwrap."""
  python = [sys.executable, "-s", "-P", "-B"]
  if mode == ISOLATION_BWRAP:
    worker, driver_path, seccomp = (f"{_INSIDE}/{n}.py" for n in ("worker", "driver", "seccomp"))
    files = [(str(_WORKER), worker), (str(driver), driver_path), (str(_SECCOMP), seccomp)]
    argv = [*_bwrap_argv(bwrap_executable() or "bwrap", config, files), *python, worker]
    argv += ["--jobs-root", _SCRATCH, "--keep", "mplconfig"]
  else:
    worker, driver_path, seccomp = str(_WORKER), str(driver), str(_SECCOMP)
    argv = [*python, worker, "--jobs-root", os.path.join(home or "/nonexistent", "jobs")]
  argv += ["--mode", mode, "--driver", driver_path]
  for path in config.extra_ro_paths:
    argv += ["--read-root", path]
  return argv + (["--seccomp", seccomp] if config.seccomp else [])


# ----------------------------------------------------------------------------- host I/O


class _WorkerGone(Exception):
  """The worker process closed its pipe (it died)."""


class _Deadline(Exception):
  """The worker did not answer in time."""


def _read_exact(fd: int, n: int, deadline: float) -> bytes:
  """Reads exactly n bytes from a pipe before the deadline."""
  chunks, got = [], 0
  while got < n:
    remaining = deadline - time.monotonic()
    if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
      raise _Deadline
    chunk = os.read(fd, min(n - got, 1 << 20))
    if not chunk:
      raise _WorkerGone
    chunks.append(chunk)
    got += len(chunk)
  return b"".join(chunks)


def _read_frame(fd: int, deadline: float, limit: int) -> bytes:
  """Reads one length-prefixed frame before the deadline."""
  (size,) = _FRAME.unpack(_read_exact(fd, _FRAME.size, deadline))
  if size > limit:
    raise _WorkerGone(f"worker sent a {size}-byte frame")
  return _read_exact(fd, size, deadline) if size else b""


def _write_frame(fd: int, body: bytes) -> None:
  """Writes one length-prefixed frame."""
  view = memoryview(_FRAME.pack(len(body)) + body)
  while view:
    view = view[os.write(fd, view) :]


def _descendants(root: int) -> list[int]:
  """Pids of all descendants of a process, from /proc."""
  children: dict[int, list[int]] = {}
  for name in os.listdir("/proc"):
    if not name.isdigit():
      continue
    try:
      stat = Path(f"/proc/{name}/stat").read_bytes()
    except OSError:
      continue
    ppid = int(stat[stat.rfind(b")") + 2 :].split()[1])
    children.setdefault(ppid, []).append(int(name))
  out, stack = [], [root]
  while stack:
    for kid in children.get(stack.pop(), []):
      out.append(kid)
      stack.append(kid)
  return out


def kill_process_tree(pid: int) -> None:
  """SIGKILLs a process and all its descendants."""
  for target in [*_descendants(pid), pid]:
    with contextlib.suppress(ProcessLookupError):
      os.kill(target, signal.SIGKILL)


# ----------------------------------------------------------------------------- workers and pool


class _Worker:
  """One zygote process and the host thread that feeds it jobs from the pool's queue."""

  def __init__(self, pool: SandboxPool, index: int) -> None:
    self.pool = pool
    self.index = index
    self.proc: subprocess.Popen | None = None
    self.info: dict = {}
    self.ready = threading.Event()
    # The worker is started from this thread: --die-with-parent is tied to the spawning thread.
    self.thread = threading.Thread(target=self._loop, name=f"sandbox-worker-{index}", daemon=True)
    self.thread.start()

  def _loop(self) -> None:
    """Serves jobs until the pool puts None in the queue."""
    try:
      self._spawn()
    except Exception:
      log.exception("sandbox worker %d failed to start (will retry on the next job)", self.index)
    self.ready.set()
    while (item := self.pool._queue.get()) is not None:
      request, future, queued_at = item
      if not future.set_running_or_notify_cancel():
        continue
      start = time.monotonic()
      try:
        result = self._run(request)
      except Exception as e:  # the pool must answer every job, whatever happened
        log.exception("sandbox worker %d failed", self.index)
        result = SandboxResult(Status.RUNTIME_ERROR, f"Sandbox failure: {e}")
      result.timings |= {"queue": start - queued_at, "total": time.monotonic() - queued_at}
      future.set_result(result)
    self.stop()

  def _spawn(self) -> None:
    """Starts the zygote and waits for its ready message."""
    self.stop()
    argv, env, cwd = self.pool._command(self.index)
    # Unlinked at once, so it is never left behind; closed in stop().
    stderr = tempfile.TemporaryFile(prefix=_TEMP_PREFIX)  # noqa: SIM115
    self.proc = subprocess.Popen(
      argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, env=env, cwd=cwd,
      close_fds=True, start_new_session=True,
    )  # fmt: skip
    self.stderr = stderr
    _count("worker_starts")
    try:
      deadline = time.monotonic() + self.pool.config.startup_timeout_s
      self.info = json.loads(_read_frame(self.proc.stdout.fileno(), deadline, 1 << 16))
    except (_Deadline, _WorkerGone, ValueError) as e:
      tail = self._stderr_tail()
      self.stop()
      raise RuntimeError(f"sandbox worker did not start ({type(e).__name__}): {tail}") from e

  def _stderr_tail(self) -> str:
    """The last lines the zygote wrote to stderr (for error reports)."""
    try:
      self.stderr.seek(0)
      return self.stderr.read()[-2000:].decode(errors="replace")
    except (OSError, ValueError, AttributeError):
      return ""

  def _run(self, request: dict) -> SandboxResult:
    """Runs one job; a zygote that died (e.g. killed from outside) is replaced and the job retried.

    Jobs cannot kill their zygote (seccomp denies kill; namespaces hide it), so a dead zygote is
    almost always the host's doing, not the job's; a job that did it anyway fails on the retry.
    """
    if self.pool.isolation == ISOLATION_RLIMIT:
      _count("fallback_jobs")
    _count("jobs")
    for attempt in range(2):
      result = self._run_once(request)
      if result is not None:
        return result
      log.warning("sandbox worker %d died during a job (attempt %d)", self.index, attempt + 1)
    return SandboxResult(Status.RUNTIME_ERROR, "The sandbox worker died while running the code.")

  def _run_once(self, request: dict) -> SandboxResult | None:
    """Runs one job on the zygote; None when the zygote died under it."""
    if self.proc is None or self.proc.poll() is not None:
      if self.proc is not None:
        _count("worker_restarts")
      self._spawn()
    timeout = float(request["timeout_s"])
    deadline = time.monotonic() + timeout + self.pool.config.grace_s
    try:
      _write_frame(self.proc.stdin.fileno(), json.dumps(request).encode())
      fd = self.proc.stdout.fileno()
      header = json.loads(_read_frame(fd, deadline, _REPLY_HEADER_LIMIT))
      payload = _read_frame(fd, deadline, self.pool.config.max_output_bytes)
    except _Deadline:
      self._replace()
      return SandboxResult(Status.TIMEOUT, f"Execution timed out after {timeout:g} s.")
    except (_WorkerGone, OSError, ValueError) as e:
      log.debug("sandbox worker %d: %r %s", self.index, e, self._stderr_tail())
      self._replace()
      return None
    return _result_from_reply(header, payload)

  def _replace(self) -> None:
    """Kills a misbehaving zygote; the next job starts a fresh one."""
    _count("worker_restarts")
    self.stop()

  def stop(self) -> None:
    """Kills the zygote (and anything below it) and releases its pipes."""
    proc, self.proc = self.proc, None
    if proc is None:
      return
    kill_process_tree(proc.pid)
    proc.wait()
    for stream in (proc.stdin, proc.stdout):
      stream.close()
    self.stderr.close()


def _result_from_reply(header: dict, payload: bytes) -> SandboxResult:
  """Builds a SandboxResult from the zygote's reply, distrusting its fields."""
  try:
    status = Status(header.get("status"))
  except ValueError:
    return SandboxResult(Status.RUNTIME_ERROR, "The sandbox returned an invalid status.")
  meta = dict(header.get("meta")) if isinstance(header.get("meta"), dict) else {}
  stages = meta.pop("timings", None)
  timings = {k: float(v) for k, v in (header.get("timings") or {}).items()}
  if isinstance(stages, dict):  # the job's own stage times, measured inside the sandbox
    timings |= {f"job_{k}": float(v) for k, v in stages.items()}
  return SandboxResult(status, str(header.get("message", "")), payload, meta, timings)


_live_pools: weakref.WeakSet[SandboxPool] = weakref.WeakSet()


class SandboxPool:
  """A pool of warm sandboxed workers running a driver (e.g. the chart renderer) on model code.

  Thread-safe: `submit` may be called from any thread; each worker has its own host thread.

  Args:
    driver: path of the driver module run inside the sandbox (see `_chart_driver.py`).
    num_workers: worker processes (default: CPU count).
    config: limits and isolation settings.
  """

  def __init__(
    self, driver: str | Path, num_workers: int | None = None, config: SandboxConfig | None = None
  ) -> None:
    self.driver = Path(driver).resolve()
    self.config = config or SandboxConfig()
    self.isolation = isolation_level(self.config.isolation)
    with _lock:
      _detected["last_pool"] = self.isolation
    self._base = None
    if self.isolation == ISOLATION_RLIMIT:
      _warn_fallback()
      self._base = tempfile.mkdtemp(prefix=_TEMP_PREFIX)
    self._queue: queue.Queue = queue.Queue()
    self._closed = False
    n = num_workers or os.cpu_count() or 1
    self._workers = [_Worker(self, i) for i in range(n)]
    if self.isolation == ISOLATION_RLIMIT:
      _count("fallback_workers", n)
    _live_pools.add(self)

  def _command(self, index: int) -> tuple[list[str], dict[str, str], str | None]:
    """Command line, environment and working directory of worker `index`."""
    if self.isolation == ISOLATION_BWRAP:
      return _worker_argv(self.driver, self.config, self.isolation, None), _host_env(), None
    # Without namespaces each worker needs its own directory: a zygote wipes its scratch space
    # after every job, which must not touch another worker's job in flight.
    home = os.path.join(self._base, f"worker-{index}")
    os.makedirs(os.path.join(home, "jobs"), exist_ok=True)
    argv = _worker_argv(self.driver, self.config, self.isolation, home)
    return argv, _sandbox_env(home, os.path.join(home, "mplconfig")), home

  def wait_ready(self, timeout: float | None = None) -> bool:
    """Blocks until every worker has started (or failed to); returns whether all are ready."""
    end = None if timeout is None else time.monotonic() + timeout
    for w in self._workers:
      left = None if end is None else max(0.0, end - time.monotonic())
      if not w.ready.wait(left):
        return False
    return all(w.proc is not None for w in self._workers)

  def submit(
    self, code: str, *, timeout_s: float | None = None, options: dict | None = None
  ) -> concurrent.futures.Future[SandboxResult]:
    """Queues one program; the future resolves to its SandboxResult (never raises for bad code)."""
    if self._closed:
      raise RuntimeError("SandboxPool is closed")
    future: concurrent.futures.Future[SandboxResult] = concurrent.futures.Future()
    verdict = check_code(code, self.config.code_limits)
    if verdict.status is not None:
      future.set_result(SandboxResult(verdict.status, verdict.message))
      return future
    request = {
      "code": code,
      "timeout_s": float(timeout_s if timeout_s is not None else self.config.timeout_s),
      "options": options or {},
      "limits": self.config.limits(),
    }
    self._queue.put((request, future, time.monotonic()))
    return future

  def run(self, code: str, **kwargs) -> SandboxResult:
    """Runs one program and waits for its result."""
    return self.submit(code, **kwargs).result()

  def map(self, codes: Iterable[str], **kwargs) -> list[SandboxResult]:
    """Runs many programs across the workers; results are in input order."""
    futures = [self.submit(code, **kwargs) for code in codes]
    return [f.result() for f in futures]

  def worker_pids(self) -> list[int]:
    """Host pids of the live worker processes (bwrap, or the zygote in fallback mode)."""
    return [w.proc.pid for w in self._workers if w.proc is not None]

  def worker_info(self) -> list[dict]:
    """What each worker reported at start-up (seccomp active, uid of jobs, ...)."""
    return [dict(w.info) for w in self._workers]

  def close(self) -> None:
    """Stops all workers and removes the pool's temporary files."""
    if self._closed:
      return
    self._closed = True
    for _ in self._workers:
      self._queue.put(None)
    for w in self._workers:
      w.thread.join(timeout=10)
      w.stop()
    if self._base:
      shutil.rmtree(self._base, ignore_errors=True)

  def __enter__(self) -> SandboxPool:
    return self

  def __exit__(self, *exc: object) -> None:
    self.close()


@atexit.register
def _close_all_pools() -> None:
  """Stops every pool at interpreter exit (no worker or temp dir outlives the host)."""
  for pool in list(_live_pools):
    pool.close()
