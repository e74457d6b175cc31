"""Hostile programs against the chart sandbox: each must end in a classified failure within the
time limit + 2 s, the test process must survive, and nothing (process, file, socket, secret) may
outlive the call or leak out of it."""

from __future__ import annotations

import dataclasses
import os
import socket
import string
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import psutil
import pytest
from PIL import Image

from rrvf_jax.env import SandboxConfig, Status, create_chart_pool, render_chart, sandbox

TIMEOUT_S = 3.0
MARKER = f"rrvf-hostile-{uuid.uuid4().hex}"  # put in the argv of anything hostile code starts
SECRET = f"sekrit-{uuid.uuid4().hex}"
DATA_SECRET = f"training-answer-{uuid.uuid4().hex}"
PROBE = f"rrvf_probe_{uuid.uuid4().hex}"
BENIGN = "import matplotlib.pyplot as plt\nplt.plot([0, 1, 2], [2, 0, 1])\nplt.title('ok')\n"
F, TO, MEM, RT, OV = (
  Status.FORBIDDEN,
  Status.TIMEOUT,
  Status.MEMORY,
  Status.RUNTIME_ERROR,
  Status.OVERSIZE_OUTPUT,
)


@dataclasses.dataclass(frozen=True)
class Case:
  """One hostile program and the statuses it may end in."""

  name: str
  code: str  # a string.Template: $target $data $outside $port $probe $marker
  expected: frozenset[Status]
  namespaces_only: bool = False  # needs the bwrap level (e.g. relies on the tmpfs size limit)


def case(name: str, code: str, *expected: Status, namespaces_only: bool = False) -> Case:
  """Builds a Case."""
  return Case(name, code, frozenset(expected), namespaces_only)


_RAW_B64 = "iVBORw0KGgo" + "QUJD" * 2000
HOSTILE = [
  # --- time
  case("infinite_loop", "while True:\n  pass\n", TO),
  case("sleep_forever", "import time\ntime.sleep(1000)\n", TO),
  case(
    "numpy_cpu_burn",
    "import numpy as np\nwhile True:\n  np.linalg.svd(np.ones((400, 400)))\n",
    TO,
  ),
  # --- processes and threads
  case("fork_bomb", "import os\nwhile True:\n  os.fork()\n", F),
  case("fork_bomb_getattr", "import os\nf = getattr(os, 'fo' + 'rk')\nwhile True:\n  f()\n", F),
  case(
    "thread_bomb",
    "import concurrent.futures as cf\nex = cf.ThreadPoolExecutor(64)\n"
    "while True:\n  ex.submit(sum, [1])\n",
    RT,  # threads are allowed; 8 MB stacks meet the address-space limit
    MEM,
    TO,
  ),
  case(
    "exec_python",
    "import os, sys\nrun = getattr(os, 'ex' + 'ecv')\n"
    "run(sys.executable, [sys.executable, '-c', 'import time; time.sleep(60)', '$marker'])\n",
    F,
  ),
  case("os_system", "import os\nos.system('sleep 60 # $marker')\n", F),
  case("os_popen_getattr", "import os\ngetattr(os, 'po' + 'pen')('sleep 60 # $marker')\n", F),
  case("subprocess_import", "import subprocess\nsubprocess.run(['sleep', '60'])\n", F),
  case("kill_parent", "import os\nos.kill(os.getppid(), 9)\n", F),
  case("killpg_getattr", "import os\ngetattr(os, 'kill' + 'pg')(0, 9)\n", F),
  case("add_audit_hook", "import sys\nsys.addaudithook(lambda *a: None)\n", F),
  # --- memory
  case("memory_bytearrays", "a = []\nwhile True:\n  a.append(bytearray(10**7))\n", MEM),
  case("memory_numpy", "import numpy as np\nx = np.ones((100000, 100000))\n", MEM),
  case("memory_string", "s = 'x' * (10**10)\n", MEM),
  case(
    "recursion_bomb",
    "import sys\nsys.setrecursionlimit(10**8)\ndef f(n):\n  return f(n + 1)\nf(0)\n",
    RT,
    MEM,
    TO,
  ),
  # --- writing where it must not
  case("write_outside_workdir", "open('$outside/pwned.txt', 'w').write('x')\n", F),
  case("write_etc_pathlib", "from pathlib import Path\nPath('/etc/$probe').write_text('x')\n", F),
  case("write_tmp_probe", "open('/tmp/$probe', 'w').write('x')\n", F),
  case("relative_traversal_write", "open('../../../../tmp/$probe', 'w').write('x')\n", F),
  case(
    "huge_file", "with open('big.bin', 'wb') as f:\n  while True:\n    f.write(b'0' * 10**6)\n", OV
  ),
  case(
    "many_files",
    "for i in range(200000):\n  open(f'f{i}.txt', 'w').write('x' * 4000)\n",
    OV,
    TO,
    namespaces_only=True,
  ),
  # --- reading the target image, training data, the host
  case(
    "read_target_imread", "import matplotlib.pyplot as plt\nplt.imshow(plt.imread('$target'))\n", F
  ),
  case(
    "read_target_pil_getattr",
    "from PIL import Image as I\nimport matplotlib.pyplot as plt\n"
    "plt.imshow(getattr(I, 'op' + 'en')('$target'))\n",
    F,
  ),
  case("read_target_raw_bytes", "raise ValueError(open('$target', 'rb').read()[:64])\n", F),
  case("read_data_file", "raise ValueError(open('$data').read())\n", F),
  case(
    "read_via_symlink",
    "import os\nos.symlink('$data', 'd')\nraise ValueError(open('d').read())\n",
    F,
  ),
  case("read_proc_parent", "raise ValueError(open('/proc/1/environ', 'rb').read())\n", F),
  case("list_proc", "import os\nraise ValueError(os.listdir('/proc'))\n", F),
  case("list_root", "import os\nraise ValueError(os.listdir('/'))\n", F),
  # --- embedding raster data to copy the target
  case("embed_base64_raster", f"import base64\nraw = base64.b64decode('{_RAW_B64}')\n", F),
  case(
    "embed_numeric_array",
    "import matplotlib.pyplot as plt\nimg = [" + ",".join(["[" + "1," * 80 + "]"] * 80) + "]\n"
    "plt.imshow(img)\n",
    F,
  ),
  # --- network
  case("socket_import", "import socket\nsocket.create_connection(('127.0.0.1', $port))\n", F),
  case(
    "socket_via_vars_sys_modules",
    "import sys\ns = vars(sys)['mod' + 'ules']['socket']\n"
    "s.create_connection(('127.0.0.1', $port))\n",
    F,
  ),
  case(
    "url_via_numpy", "import numpy as np\nnp.genfromtxt('http://127.0.0.1:$port/data.csv')\n", F
  ),
  # --- import and introspection tricks
  case("dunder_import", "__import__('os').system('id')\n", F),
  case("importlib", "import importlib\nimportlib.import_module('subprocess')\n", F),
  case("ctypes_import", "import ctypes\nctypes.CDLL(None).kill(1, 9)\n", F),
  case("ctypes_via_numpy", "import numpy as np\nnp.ctypeslib.ctypes.CDLL(None)\n", F),
  case("subclasses_escape", "print(().__class__.__base__.__subclasses__())\n", F),
  case("exec_obfuscated", "exec('imp' + 'ort os; os.system(\"id\")')\n", F),
  case("builtins_getattr", "getattr(__builtins__, '__imp' + 'ort__')('os')\n", F),
  # --- secrets in the environment
  case("env_secret", "import os\nraise ValueError(repr(dict(os.environ)))\n", RT),
  # --- output floods
  case("stdout_flood", "while True:\n  print('x' * 10000)\n", OV),
  case(
    "stdout_flood_caught",
    "import sys\nfor i in range(10**6):\n  try:\n    sys.stdout.write('y' * 10000)\n"
    "  except BaseException:\n    pass\n",
    OV,
    TO,
  ),
  case(
    "huge_figure",
    "import matplotlib.pyplot as plt\nplt.figure(figsize=(1000, 1000))\nplt.plot([1, 2])\n",
    OV,
  ),
  case(
    "huge_dpi", "import matplotlib.pyplot as plt\nplt.figure(dpi=100000)\nplt.plot([1, 2])\n", OV
  ),
  # --- tampering with the worker protocol
  case("exit_early", BENIGN + "import os\nos._exit(0)\n", RT),
  case("system_exit_code", BENIGN + "raise SystemExit(3)\n", RT),
  case("protocol_garbage", "import os\nos.write(3, b'\\xff' * 100)\nos._exit(0)\n", RT),
  case(
    "fake_ok_result",
    "import os, json, struct\n"
    "h = json.dumps({'status': 'ok', 'message': '', 'meta': {}}).encode()\n"
    "os.write(3, struct.pack('!I', len(h)) + h + struct.pack('!I', 10) + b'x' * 10)\nos._exit(0)\n",
    RT,
  ),
  case("close_result_fd", "import os\nos.close(3)\n" + BENIGN, RT),
]
FALLBACK_SUBSET = {
  "infinite_loop", "fork_bomb_getattr", "memory_bytearrays", "write_outside_workdir",
  "read_target_raw_bytes", "read_data_file", "read_proc_parent", "socket_via_vars_sys_modules",
  "killpg_getattr", "env_secret", "stdout_flood", "huge_file", "exec_python",
}  # fmt: skip


class _CountingServer:
  """A TCP server on 127.0.0.1 that counts every connection it accepts."""

  def __init__(self) -> None:
    self.sock = socket.socket()
    self.sock.bind(("127.0.0.1", 0))
    self.sock.listen(64)
    self.port = self.sock.getsockname()[1]
    self.connections = 0
    threading.Thread(target=self._accept, daemon=True).start()

  def _accept(self) -> None:
    """Accepts and counts connections until the socket closes."""
    while True:
      try:
        conn, _ = self.sock.accept()
      except OSError:
        return
      self.connections += 1
      conn.close()


@dataclasses.dataclass
class Env:
  """What the hostile programs are run against, and the bait they go for."""

  pool: object
  server: _CountingServer
  values: dict[str, str]
  host_tmp: Path

  def code(self, c: Case) -> str:
    """The program of a case with the bait's paths and port filled in."""
    return string.Template(c.code).substitute(self.values)


def _make_env(tmp_path_factory, isolation: str):
  """Host-side bait (target image, data file, server, env secret) and a pool to attack."""
  outside = tmp_path_factory.mktemp("host")
  target = outside / "target.png"
  Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(target)
  data = outside / "train.jsonl"
  data.write_text(f'{{"answer": "{DATA_SECRET}"}}\n')
  server = _CountingServer()
  os.environ["RRVF_TEST_SECRET"] = SECRET  # set before the workers start: they must not see it
  config = SandboxConfig(timeout_s=TIMEOUT_S, memory_mb=1024, isolation=isolation)
  pool = create_chart_pool(2, config)
  assert pool.wait_ready(60)
  values = {
    "target": str(target),
    "data": str(data),
    "outside": str(outside),
    "port": str(server.port),
    "probe": PROBE,
    "marker": MARKER,
  }
  return Env(pool, server, values, Path("/tmp"))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  """The attacked pool, at the best isolation level available."""
  env = _make_env(tmp_path_factory, "auto")
  yield env
  env.pool.close()
  env.server.sock.close()
  os.environ.pop("RRVF_TEST_SECRET", None)


@pytest.fixture(scope="module")
def fallback_env(tmp_path_factory):
  """The attacked pool without namespaces (rlimits, seccomp, audit hook)."""
  env = _make_env(tmp_path_factory, "rlimit")
  yield env
  env.pool.close()
  env.server.sock.close()


def _zygotes(pool) -> list[psutil.Process]:
  """The zygote of each worker: the first process below the worker's top that is not bwrap."""
  found = []
  for top in pool.worker_pids():
    proc = psutil.Process(top)
    while proc.name() == "bwrap":
      (proc,) = proc.children()
    found.append(proc)
  return found


def _temp_entries() -> set[str]:
  """Entries of the host's /tmp that the sandbox could have made."""
  return {n for n in os.listdir("/tmp") if n.startswith(("rrvf-sbx-", "rrvf_probe"))}


def assert_nothing_left(env: Env, temp_before: set[str]) -> None:
  """No job process, file or temp dir survives the call (checked right after it returns)."""
  for zygote in _zygotes(env.pool):
    assert zygote.children(recursive=True) == [], "a job process outlived its call"
    if env.pool.isolation == "bwrap":
      # The worker's private scratch (seen through its mount namespace) holds only its font cache.
      assert os.listdir(f"/proc/{zygote.pid}/root{sandbox._SCRATCH}") == ["mplconfig"]
    else:
      for jobs in Path(env.pool._base).glob("worker-*/jobs"):
        assert os.listdir(jobs) == []
  leftovers = []
  for proc in psutil.process_iter(["cmdline"]):
    if MARKER in " ".join(proc.info["cmdline"] or []):
      leftovers.append(proc)
  assert leftovers == [], "a process started by hostile code is still running"
  assert _temp_entries() == temp_before
  assert not (env.host_tmp / PROBE).exists()
  assert not Path(f"/etc/{PROBE}").exists()
  assert not (Path(env.values["outside"]) / "pwned.txt").exists()


def _attack(env: Env, c: Case) -> None:
  """Runs one hostile case and checks everything the suite promises."""
  me = psutil.Process()
  fds_before, temp_before = me.num_fds(), _temp_entries()
  start = time.monotonic()
  result = render_chart(env.code(c), pool=env.pool, timeout_s=TIMEOUT_S)
  elapsed = time.monotonic() - start
  assert result.status in c.expected, (result.status, result.message)
  assert result.image is None
  assert elapsed <= TIMEOUT_S + 2.0, f"took {elapsed:.1f} s"
  for secret in (SECRET, DATA_SECRET, "\\x89PNG", "IHDR"):
    assert secret not in result.message
  assert_nothing_left(env, temp_before)
  assert env.server.connections == 0
  assert me.num_fds() == fds_before, "a file descriptor or socket leaked into the host"
  # The worker that handled the attack is still usable.
  assert render_chart(BENIGN, pool=env.pool).ok


def test_suite_is_large_enough():
  assert len(HOSTILE) >= 25
  assert len({c.name for c in HOSTILE}) == len(HOSTILE)


@pytest.mark.parametrize("c", HOSTILE, ids=lambda c: c.name)
def test_hostile_program_is_contained(env, c):
  if c.namespaces_only and env.pool.isolation != "bwrap":
    pytest.skip("without namespaces there is no tmpfs size limit (documented fallback gap)")
  _attack(env, c)


@pytest.mark.parametrize(
  "c", [c for c in HOSTILE if c.name in FALLBACK_SUBSET], ids=lambda c: c.name
)
def test_hostile_program_is_contained_without_namespaces(fallback_env, c):
  _attack(fallback_env, c)


def test_environment_is_scrubbed(env):
  result = render_chart("import os\nraise ValueError(sorted(os.environ))\n", pool=env.pool)
  assert result.status == Status.RUNTIME_ERROR
  assert "RRVF_TEST_SECRET" not in result.message
  assert "PYTHONHASHSEED" in result.message  # the minimal environment is what the code sees


def test_host_files_do_not_exist_inside_namespaces(env):
  if env.pool.isolation != "bwrap":
    pytest.skip("only bubblewrap hides the host file system")
  # os.path.exists raises no audit event: this probes the mount namespace itself. (Parents of
  # the bound Python install exist as empty skeleton directories; their other contents do not.)
  repo = Path(__file__).resolve().parents[2]
  host_paths = [env.values["target"], env.values["data"], str(repo / "pyproject.toml")]
  host_paths += [str(repo / "tests"), "/etc/passwd", "/etc/hostname", "/var", "/home", "/run"]
  host_paths = [p for p in host_paths if os.path.exists(p)]
  code = f"import os\nseen = [p for p in {host_paths!r} if os.path.exists(p)]\n"
  code += "raise ValueError(f'visible={seen}')\n"
  result = render_chart(code, pool=env.pool)
  assert result.status == Status.RUNTIME_ERROR
  assert "visible=[]" in result.message
