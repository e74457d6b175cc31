"""Sandbox pool behaviour: statuses and messages, per-job freshness, worker replacement, the
fallback level and its warning, the static check, and the seccomp filter on its own."""

from __future__ import annotations

import concurrent.futures
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import psutil
import pytest

from rrvf_jax.env import (
  CodeLimits,
  SandboxConfig,
  Status,
  check_code,
  create_chart_pool,
  isolation_level,
  render_chart,
  render_charts,
  sandbox_metrics,
)
from rrvf_jax.env import sandbox as sandbox_module

LINE = "import matplotlib.pyplot as plt\nplt.plot([0, 1, 2], [1, 0, 2])\n"


@pytest.fixture(scope="module")
def pool():
  """A two-worker chart pool shared by the tests of this module."""
  with create_chart_pool(2, SandboxConfig(timeout_s=5.0)) as pool:
    assert pool.wait_ready(60)
    yield pool


def _zygote(pool, index: int = 0) -> psutil.Process:
  """The zygote process of worker `index` (below any bwrap processes)."""
  proc = psutil.Process(pool.worker_pids()[index])
  while proc.name() == "bwrap":
    (proc,) = proc.children()
  return proc


# ----------------------------------------------------------------------------- statuses, messages


def test_ok_returns_the_canvas_image(pool):
  result = render_chart(LINE, pool=pool)
  assert result.status == Status.OK and result.ok and result.message == ""
  assert result.image.shape == (672, 672, 3) and result.image.dtype == np.uint8


def test_runtime_error_message_points_at_the_user_line(pool):
  code = "import numpy as np\nx = np.arange(3)\ny = x.reshape(2, 2)\n"
  result = render_chart(code, pool=pool)
  assert result.status == Status.RUNTIME_ERROR
  assert 'File "<code>", line 3, in <module>' in result.message
  assert "y = x.reshape(2, 2)" in result.message
  assert result.message.rstrip().splitlines()[-1].startswith("ValueError: cannot reshape")
  assert "/opt/rrvf" not in result.message and "_sandbox_worker" not in result.message


def test_error_while_drawing_is_a_runtime_error(pool):
  # Mismatched lengths only fail when the figure is drawn, after the user code has returned.
  code = "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3], [1, 2])\n"
  result = render_chart(code, pool=pool)
  assert result.status == Status.RUNTIME_ERROR
  assert "x and y must have same first dimension" in result.message


def test_syntax_error_is_reported_without_running(pool):
  result = render_chart("import matplotlib.pyplot as plt\nplt.plot([1, 2]\n", pool=pool)
  assert result.status == Status.SYNTAX_ERROR
  assert "line 2" in result.message and "SyntaxError" in result.message
  assert result.timings == {}  # answered by the static check: no worker involved


def test_no_figure_and_blank_image(pool):
  assert render_chart("x = 1\n", pool=pool).status == Status.NO_FIGURE
  closed = LINE + "plt.close('all')\n"
  assert render_chart(closed, pool=pool).status == Status.NO_FIGURE
  blank = "import matplotlib.pyplot as plt\nplt.figure()\n"
  assert render_chart(blank, pool=pool).status == Status.BLANK_IMAGE
  axis_off = "import matplotlib.pyplot as plt\nplt.plot([1, 2])\nplt.axis('off')\n"
  assert render_chart(axis_off, pool=pool).status == Status.OK  # a line is still drawn


def test_memory_limit_is_per_job(pool):
  big = "import numpy as np\nimport matplotlib.pyplot as plt\nx = np.ones(300_000_000)\n"
  result = render_chart(big, pool=pool)  # 2.4 GB > the 2 GB address-space limit
  assert result.status == Status.MEMORY
  assert render_chart(LINE, pool=pool).ok


def test_timeout_is_enforced_and_bounded(pool):
  start = time.monotonic()
  result = render_chart("while True:\n  pass\n", pool=pool, timeout_s=1.0)
  assert result.status == Status.TIMEOUT and "1 s" in result.message
  assert time.monotonic() - start < 3.0


# ----------------------------------------------------------------------------- freshness


def test_jobs_do_not_see_each_other(pool):
  fresh = render_chart(LINE, pool=pool).image
  leaky = (
    "import matplotlib, numpy as np\nmatplotlib.rcParams['lines.linewidth'] = 25\n"
    "np.random.seed(123)\nimport matplotlib.pyplot as plt\nplt.style.use('dark_background')\n"
    "open('left_behind.txt', 'w').write('x')\nimport math\nmath.LEAK = 1\n" + LINE
  )
  # Run the leaky program on every worker, then check each worker renders as if fresh.
  render_charts([leaky] * 4, pool=pool)
  probe = "import os, math\nassert not hasattr(math, 'LEAK')\nassert os.listdir('.') == []\n" + LINE
  for result in render_charts([probe] * 4, pool=pool):
    assert result.ok, result.message
    np.testing.assert_array_equal(result.image, fresh)


def test_submit_is_thread_safe(pool):
  codes = [f"import matplotlib.pyplot as plt\nplt.bar([0, 1], [1, {i + 1}])\n" for i in range(12)]
  with concurrent.futures.ThreadPoolExecutor(6) as ex:
    results = list(ex.map(lambda c: render_chart(c, pool=pool), codes))
  assert all(r.ok for r in results)
  # Results come back for the right program: heights differ, so images differ.
  assert len({r.image.tobytes() for r in results}) == len(codes)


# ----------------------------------------------------------------------------- worker lifecycle


def test_hung_worker_is_killed_and_replaced(pool):
  restarts = sandbox_metrics()["worker_restarts"]
  zygotes = [_zygote(pool, i) for i in range(2)]
  for z in zygotes:
    z.send_signal(signal.SIGSTOP)  # a zygote that stops answering: only the host can notice
  try:
    start = time.monotonic()
    results = render_charts([LINE, LINE], pool=pool, timeout_s=1.0)
    assert [r.status for r in results] == [Status.TIMEOUT, Status.TIMEOUT]
    assert time.monotonic() - start < 1.0 + pool.config.grace_s + 2.0
  finally:
    for z in zygotes:
      if z.is_running():
        z.send_signal(signal.SIGCONT)
  _, alive = psutil.wait_procs(zygotes, timeout=5)
  assert all(z.status() == psutil.STATUS_ZOMBIE for z in alive)  # killed (maybe not yet reaped)
  assert sandbox_metrics()["worker_restarts"] >= restarts + 2
  assert all(r.ok for r in render_charts([LINE, LINE], pool=pool))


def test_dead_worker_is_restarted(pool):
  old = pool.worker_pids()
  for pid in old:
    sandbox_module.kill_process_tree(pid)
  results = render_charts([LINE] * 4, pool=pool)
  assert all(r.ok for r in results), [r.message for r in results]
  assert not set(pool.worker_pids()) & set(old)


def test_close_leaves_no_process():
  with create_chart_pool(1) as p:
    assert p.wait_ready(60)
    tops = p.worker_pids()
    assert render_chart(LINE, pool=p).ok
  for pid in tops:
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
  with pytest.raises(RuntimeError, match="closed"):
    p.submit(LINE)


# ----------------------------------------------------------------------------- isolation level


def test_fallback_is_loud_and_counted(caplog, monkeypatch):
  monkeypatch.delitem(sandbox_module._detected, "warned", raising=False)
  before = sandbox_metrics()["fallback_jobs"]
  with (
    caplog.at_level(logging.WARNING, logger="rrvf_jax.env.sandbox"),
    create_chart_pool(1, SandboxConfig(isolation="rlimit")) as p,
  ):
    assert p.isolation == "rlimit"
    assert render_chart(LINE, pool=p).ok
    info = p.worker_info()[0]
  assert any("SANDBOX DEGRADED" in r.getMessage() for r in caplog.records)
  metrics = sandbox_metrics()
  assert metrics["fallback_jobs"] == before + 1
  assert metrics["isolation"] == "rlimit"
  assert info["seccomp"] is True  # the kernel filter still applies without namespaces


def test_isolation_level_env_override(monkeypatch):
  monkeypatch.setenv("RRVF_SANDBOX_ISOLATION", "rlimit")
  assert isolation_level() == "rlimit"


def test_broken_bwrap_fails_the_self_test(monkeypatch):
  monkeypatch.setenv("RRVF_BWRAP", "/bin/false")
  reason = sandbox_module._bwrap_self_test()
  assert reason is not None and "self-test failed" in reason
  monkeypatch.setitem(sandbox_module._detected, "level", "rlimit")
  monkeypatch.setitem(sandbox_module._detected, "reason", reason)
  assert isolation_level() == "rlimit"
  with pytest.raises(RuntimeError, match="required"):
    isolation_level("bwrap")


def test_bwrap_is_used_when_it_works(monkeypatch):
  monkeypatch.delenv("RRVF_SANDBOX_ISOLATION", raising=False)
  if sandbox_module.bwrap_executable() is None:
    pytest.skip("bubblewrap is not installed here")
  reason = sandbox_module._bwrap_self_test()
  assert (isolation_level() == "bwrap") == (reason is None), reason


def test_bwrap_works_where_required():
  # CI sets RRVF_REQUIRE_BWRAP=1: there a silent fall back to the weaker level is a failure.
  if os.environ.get("RRVF_REQUIRE_BWRAP") != "1":
    pytest.skip("RRVF_REQUIRE_BWRAP is not set")
  assert sandbox_module._bwrap_self_test() is None
  assert isolation_level() == "bwrap"


def test_host_paths_under_tmp_stay_visible(tmp_path):
  # Regression: a CI clone under /tmp had its virtualenv hidden by the sandbox's tmpfs /tmp, so the
  # bwrap self-test failed and every job silently ran at the weaker 'rlimit' level.
  if isolation_level() != "bwrap":
    pytest.skip("bubblewrap is not usable here")
  assert str(tmp_path).startswith("/tmp/")
  (tmp_path / "values.txt").write_text("3 1 2")
  code = textwrap.dedent(f"""
    import matplotlib.pyplot as plt
    values = [int(v) for v in open({str(tmp_path / "values.txt")!r}).read().split()]
    plt.bar(range(3), values)
  """)
  with create_chart_pool(1, SandboxConfig(timeout_s=10.0, extra_ro_paths=(str(tmp_path),))) as p:
    result = render_chart(code, pool=p)
  assert result.status == Status.OK, result.message


# ----------------------------------------------------------------------------- static check

BENIGN_CODE = """
import os, sys, math, random, datetime, json
import numpy as np
import matplotlib
import matplotlib.pyplot as plt
from matplotlib.patches import Rectangle
data = {"a": [1, 2, 3], "b": [4.5, 5.5, 6.5]}
fig, ax = plt.subplots(figsize=(8, 5))
for k, v in data.items():
  ax.plot(v, label=k)
ax.add_patch(Rectangle((0, 0), 1, 1))
ax.set_title("Sales " + datetime.date(2024, 1, 1).isoformat())
plt.savefig(os.path.join("out", "chart.png"), dpi=300, bbox_inches="tight")
"""


def test_static_check_accepts_ordinary_chart_code():
  assert check_code(BENIGN_CODE).status is None


@pytest.mark.parametrize(
  "code, needle",
  [
    ("import socket\n", "socket"),
    ("from subprocess import run\n", "subprocess"),
    ("import os\nos.fork()\n", "os.fork"),
    ("from os import system\n", "os.system"),
    ("__import__('os')\n", "__import__"),
    ("eval('1')\n", "eval"),
    ("x = ().__class__.__mro__\n", "__mro__"),
    ("import sys\nsys.modules\n", "modules"),
    ("import matplotlib.pyplot as plt\nplt.imread('t.png')\n", "imread"),
    ("from PIL import Image\nImage.open('t.png')\n", "Image.open"),
    ("s = 'data:image/png;base64,AAAA'\n", "data URI"),
    ("s = '" + "QUJD" * 1000 + "'\n", "encoded data"),
    ("x = [" + "1," * 5000 + "]\n", "numeric literals"),
    ("x = 1\n" * 30000, "characters long"),
  ],
)
def test_static_check_forbids(code, needle):
  verdict = check_code(code)
  assert verdict.status == Status.FORBIDDEN
  assert needle in verdict.message


def test_static_check_limits_are_configurable():
  code = "x = [" + "1," * 50 + "]\n"
  assert check_code(code).status is None
  verdict = check_code(code, CodeLimits(max_literal_numbers=10))
  assert verdict.status == Status.FORBIDDEN


def test_static_check_syntax_error_format():
  verdict = check_code("x = 1\nif x\n  y = 2\n")
  assert verdict.status == Status.SYNTAX_ERROR
  assert verdict.message.splitlines()[0] == '  File "<code>", line 2'
  assert verdict.message.splitlines()[-1].startswith("SyntaxError")
  assert check_code("x = 1\0\n").status == Status.SYNTAX_ERROR


# ----------------------------------------------------------------------------- seccomp on its own

_SECCOMP_PROBE = textwrap.dedent("""
  import importlib.util, os, socket, sys, threading
  spec = importlib.util.spec_from_file_location("sc", sys.argv[1])
  sc = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(sc)
  assert sc.install()
  def denied(fn):
    try:
      fn()
    except OSError as e:
      return e.errno == 1
    return False
  t = threading.Thread(target=lambda: None)
  t.start()
  t.join()
  results = {
    "fork": denied(os.fork),
    "exec": denied(lambda: os.execv("/bin/true", ["true"])),
    "socket": denied(socket.socket),
    "kill": denied(lambda: os.kill(os.getppid(), 0)),
    "posix_spawn": denied(lambda: os.posix_spawn("/bin/true", ["true"], {})),
  }
  print(results)
  sys.exit(0 if all(results.values()) else 1)
""")


def test_seccomp_filter_denies_processes_sockets_and_signals():
  path = os.path.join(os.path.dirname(sandbox_module.__file__), "_sandbox_seccomp.py")
  proc = subprocess.run(
    [sys.executable, "-c", _SECCOMP_PROBE, path], capture_output=True, text=True, timeout=60
  )
  assert proc.returncode == 0, proc.stdout + proc.stderr
