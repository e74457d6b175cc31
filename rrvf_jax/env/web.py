"""HTML renderer: HTML -> screenshot in headless Chromium (Playwright), with no network at all.

One dedicated thread owns Playwright (its sync API is bound to the thread that started it); any
thread may call `render_html`, which queues a job and waits. The browser, a context and a page are
reused across renders (a new renderer process per page would cost ~100 ms): before each render
the page navigates to about:blank, which gives a fresh document and JavaScript global (window.name,
which survives navigation, is cleared); storage is unusable on these opaque-origin pages and the
network is closed, so nothing carries over (tested).
The context is replaced every `recycle_every` pages and after any timeout or error, and the browser
is restarted after a crash or a hang.

No request leaves the page: every request that reaches the network layer is aborted by route
interception (only `data:` URLs, which never reach it, load), WebSockets are closed, service
workers are blocked, the context is offline, DNS resolves nothing and all traffic is pointed at a
dead proxy. Where bubblewrap works, Chromium itself runs inside it with no network namespace
access, a read-only /usr and its own sandbox enabled (`isolation == "bwrap"`); otherwise it is
launched directly (as root that needs `--no-sandbox`).

Time: page load and screenshot share the job's timeout; a watchdog kills the browser if a job
overruns it (e.g. JavaScript stuck in a loop), and the next job starts a fresh browser.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import dataclasses
import io
import logging
import os
import queue
import re
import shutil
import tempfile
import threading
import time
import uuid
import weakref
from pathlib import Path

import numpy as np

from rrvf_jax.env import sandbox
from rrvf_jax.env.types import RenderResult, Status, is_blank

log = logging.getLogger(__name__)

_CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# Distribution launchers are shell scripts; the real binaries live here.
_REAL_BINARIES = (
  "/usr/lib/chromium/chromium",
  "/usr/lib/chromium-browser/chromium-browser",
  "/opt/google/chrome/chrome",
)
_LAUNCH_ARGS = (
  "--headless",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--no-default-browser-check",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
  "--disable-extensions",
  "--disable-default-apps",
  "--disable-domain-reliability",
  "--disable-client-side-phishing-detection",
  "--dns-prefetch-disable",
  "--mute-audio",
  "--hide-scrollbars",
  "--force-color-profile=srgb",
  "--font-render-hinting=none",
  "--host-resolver-rules=MAP * ~NOTFOUND",
  "--proxy-server=http://127.0.0.1:9",  # belt and braces: anything that escapes routing dies here
  "--proxy-bypass-list=<-loopback>",
  "--force-webrtc-ip-handling-policy=disable_non_proxied_udp",
)
_DATA_URI = re.compile(r"data:image/[a-z0-9.+-]+;base64,([A-Za-z0-9+/=\s]+)", re.IGNORECASE)
_WATCHDOG_GRACE_S = 3.0
_RECYCLE_EVERY = 100  # pages per browser context


@dataclasses.dataclass(frozen=True)
class WebCanvas:
  """Viewport of the page and the largest screenshot height (full page, cropped)."""

  width: int = 1280
  height: int = 720  # viewport height; the screenshot is at least this tall
  max_height: int = 2560  # the full-page screenshot is cropped to this
  max_html_chars: int = 1_000_000
  max_data_uri_chars: int = 4096  # a longer inline image looks like a copied raster: forbidden


def find_chromium() -> str | None:
  """Chromium to launch: $RRVF_CHROMIUM, else the first of chromium/chrome found on PATH."""
  override = os.environ.get("RRVF_CHROMIUM")
  if override:
    return override
  for name in _CHROMIUM_NAMES:
    path = shutil.which(name)
    if path:
      return _real_binary(path)
  return next((p for p in _REAL_BINARIES if os.access(p, os.X_OK)), None)


def _real_binary(path: str) -> str:
  """Resolves a distribution's shell-script launcher to the browser binary it starts."""
  try:
    is_script = Path(path).read_bytes()[:2] == b"#!"
  except OSError:
    return path
  if is_script:
    return next((p for p in _REAL_BINARIES if os.access(p, os.X_OK)), path)
  return path


def check_html(html: str, canvas: WebCanvas) -> RenderResult | None:
  """Static check: returns a `forbidden` result for oversized HTML or embedded raster copies."""
  if len(html) > canvas.max_html_chars:
    message = f"Forbidden: the HTML is {len(html)} characters long (limit {canvas.max_html_chars})."
    return RenderResult(Status.FORBIDDEN, None, message)
  for match in _DATA_URI.finditer(html):
    if len(match.group(1)) > canvas.max_data_uri_chars:
      message = (
        f"Forbidden: an inline image of {len(match.group(1))} base64 characters "
        f"(limit {canvas.max_data_uri_chars}); embedding raster data is not allowed."
      )
      return RenderResult(Status.FORBIDDEN, None, message)
  return None


def _bwrap_wrapper(directory: str, chromium: str, marker: str) -> str:
  """Writes a launcher that runs Chromium inside bubblewrap; returns its path."""
  bwrap = sandbox.bwrap_executable() or "bwrap"
  binds = " ".join(f"--ro-bind-try {p} {p}" for p in ("/etc/fonts", "/etc/ld.so.cache"))
  env = "--setenv HOME /tmp --setenv TMPDIR /tmp --setenv LANG C.UTF-8 --setenv TZ UTC"
  links = " ".join(sandbox._root_links())
  script = f"""#!/bin/sh
# Runs Chromium in new namespaces (no network at all), read-only /usr, private /tmp.
udd=/nonexistent
for a in "$@"; do case "$a" in --user-data-dir=*) udd="${{a#--user-data-dir=}}";; esac; done
exec {bwrap} --unshare-all --unshare-user --uid 65534 --gid 65534 --cap-drop ALL \\
  --die-with-parent --new-session --clearenv {env} \\
  --ro-bind /usr /usr {links} {binds} \\
  --proc /proc --dev /dev --tmpfs /dev/shm --tmpfs /tmp --bind "$udd" "$udd" \\
  {chromium} {marker} "$@"
"""
  path = os.path.join(directory, "chromium-bwrap")
  Path(path).write_text(script)
  os.chmod(path, 0o700)
  return path


_live_renderers: weakref.WeakSet[HtmlRenderer] = weakref.WeakSet()


class HtmlRenderer:
  """Renders HTML to screenshots with one long-lived headless Chromium (thread-safe).

  Args:
    canvas: viewport and screenshot limits.
    timeout_s: default time limit of one page (load + JavaScript + screenshot).
    chromium: browser binary (default: `find_chromium()`).
    isolation: "auto" (bubblewrap when it works), "bwrap" (required) or "plain".
  """

  def __init__(
    self,
    canvas: WebCanvas = WebCanvas(),
    *,
    timeout_s: float = 10.0,
    chromium: str | None = None,
    isolation: str = "auto",
  ) -> None:
    self.canvas = canvas
    self.timeout_s = timeout_s
    self.chromium = chromium or find_chromium()
    if self.chromium is None:
      raise RuntimeError("No Chromium found: install `chromium` or set $RRVF_CHROMIUM.")
    wanted = "rlimit" if isolation == "plain" else isolation
    self.isolation = "bwrap" if sandbox.isolation_level(wanted) == "bwrap" else "plain"
    self._may_fall_back = isolation == "auto"
    self.marker = f"--rrvf-renderer={uuid.uuid4().hex}"  # finds our browser among processes
    self.stats = {"pages": 0, "blocked_requests": 0, "browser_starts": 0, "watchdog_kills": 0}
    self._queue: queue.Queue = queue.Queue()
    self._lock = threading.Lock()
    self._thread: threading.Thread | None = None
    self._tmp: str | None = None
    self._browser = None
    self._context = None
    self._page = None
    self._page_uses = 0
    self._busy_until: float | None = None  # deadline of the job in progress (for the watchdog)
    self._killed = False
    self._closed = False
    _live_renderers.add(self)

  # ------------------------------------------------------------------- public API

  def submit(
    self, html: str, *, timeout_s: float | None = None
  ) -> concurrent.futures.Future[RenderResult]:
    """Queues a page; the future resolves to a RenderResult."""
    future: concurrent.futures.Future[RenderResult] = concurrent.futures.Future()
    verdict = check_html(html, self.canvas)
    if verdict is not None:
      future.set_result(verdict)
      return future
    self._start()
    self._queue.put((html, float(timeout_s or self.timeout_s), future, time.monotonic()))
    return future

  def render(self, html: str, *, timeout_s: float | None = None) -> RenderResult:
    """Renders one page and waits for the result."""
    return self.submit(html, timeout_s=timeout_s).result()

  def browser_pids(self) -> list[int]:
    """Host pids of this renderer's browser processes (those started with its marker)."""
    pids = []
    for pid in sandbox._descendants(os.getpid()):
      try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
      except OSError:
        continue
      if self.marker.encode() in cmdline:
        pids.append(pid)
    return pids

  def close(self) -> None:
    """Stops the browser thread and the browser, and removes temporary files."""
    with self._lock:
      if self._closed:
        return
      self._closed = True
      thread = self._thread
    if thread is not None:
      self._queue.put(None)
      thread.join(timeout=30)
    for pid in self.browser_pids():
      sandbox.kill_process_tree(pid)
    if self._tmp:
      shutil.rmtree(self._tmp, ignore_errors=True)

  def __enter__(self) -> HtmlRenderer:
    return self

  def __exit__(self, *exc: object) -> None:
    self.close()

  # ------------------------------------------------------------------- browser thread

  def _start(self) -> None:
    """Starts the browser thread and the watchdog on first use."""
    with self._lock:
      if self._closed:
        raise RuntimeError("HtmlRenderer is closed")
      if self._thread is not None:
        return
      self._tmp = tempfile.mkdtemp(prefix="rrvf-web-")
      self._thread = threading.Thread(target=self._loop, name="html-renderer", daemon=True)
      self._thread.start()
      threading.Thread(target=self._watchdog, name="html-watchdog", daemon=True).start()

  def _loop(self) -> None:
    """Owns Playwright: serves jobs until close()."""
    try:
      from playwright.sync_api import sync_playwright  # optional dependency, loaded on first use

      manager = sync_playwright().start()
    except Exception as e:
      self._fail_all(RuntimeError(f"Playwright is unavailable: {e}"))
      return
    try:
      while (item := self._queue.get()) is not None:
        html, timeout, future, queued = item
        if future.set_running_or_notify_cancel():
          result = self._render_with_recovery(manager, html, timeout)
          result.timings["total"] = time.monotonic() - queued
          future.set_result(result)
    finally:
      self._stop_browser()
      manager.stop()

  def _fail_all(self, error: Exception) -> None:
    """Fails every queued job (the renderer cannot work at all)."""
    while (item := self._queue.get()) is not None:
      item[2].set_exception(error)

  def _watchdog(self) -> None:
    """Kills the browser when a job overruns its deadline (a hang Playwright cannot time out)."""
    while not self._closed:
      time.sleep(0.25)
      deadline = self._busy_until
      if deadline is None or time.monotonic() <= deadline + _WATCHDOG_GRACE_S:
        continue
      with self._lock:
        if self._busy_until != deadline:  # that job finished meanwhile
          continue
        log.warning("HTML renderer: page exceeded its time limit; killing the browser")
        self._killed = True
        self.stats["watchdog_kills"] += 1
        for pid in self.browser_pids():
          sandbox.kill_process_tree(pid)
        self._busy_until = None

  def _render_with_recovery(self, manager, html: str, timeout: float) -> RenderResult:
    """Renders a page; restarts the browser after a crash (retrying once) or a hang."""
    from playwright.sync_api import Error as PlaywrightError

    for attempt in range(2):
      self._killed = False
      try:
        self._ensure_browser(manager)
        return self._render_page(html, timeout)
      except PlaywrightError as e:
        killed = self._killed
        self._stop_browser()
        if killed:
          return RenderResult(Status.TIMEOUT, None, f"Rendering timed out after {timeout:g} s.")
        if attempt == 1:
          return RenderResult(Status.RUNTIME_ERROR, None, f"The browser failed: {e.message}")
        log.warning("HTML renderer: browser failure (%s); restarting it", e.message)
    raise AssertionError("unreachable")

  def _ensure_browser(self, manager) -> None:
    """Launches the browser if it is not running."""
    if self._browser is not None and self._browser.is_connected():
      return
    self._stop_browser()
    try:
      self._browser = self._launch(manager)
    except Exception as e:
      if self.isolation != "bwrap" or not self._may_fall_back:
        raise
      log.warning(
        "HTML renderer DEGRADED: Chromium did not start inside bubblewrap (%s); launching it "
        "directly (network blocked by routing and flags only, no namespace).",
        e,
      )
      self.isolation = "plain"
      self._browser = self._launch(manager)
    self.stats["browser_starts"] += 1

  def _launch(self, manager):
    """Starts Chromium (inside bubblewrap when isolation is "bwrap")."""
    bwrap = self.isolation == "bwrap"
    executable = _bwrap_wrapper(self._tmp, self.chromium, self.marker) if bwrap else self.chromium
    return manager.chromium.launch(
      executable_path=executable,
      args=[*_LAUNCH_ARGS] + ([] if bwrap else [self.marker]),
      # Chromium's own sandbox works inside bubblewrap (unprivileged uid); as root outside it can't.
      chromium_sandbox=bwrap or os.geteuid() != 0,
      env={"HOME": self._tmp, "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "TZ": "UTC"},
      timeout=60_000,
    )

  def _stop_browser(self) -> None:
    """Closes (or, if that fails, kills) the browser."""
    self._context = self._page = None
    browser, self._browser = self._browser, None
    if browser is None:
      return
    try:
      browser.close()
    except Exception:  # already dead or wedged: make sure no process is left
      for pid in self.browser_pids():
        sandbox.kill_process_tree(pid)

  def _render_page(self, html: str, timeout: float) -> RenderResult:
    """Loads the HTML into a fresh context and takes the screenshot."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    start = time.monotonic()
    self._busy_until = start + timeout
    try:
      page = self._fresh_page()
      page.set_content(html, wait_until="load", timeout=self._ms_left())
      # Playwright trims the clip to the page: the result is the full page, at most max_height.
      clip = {"x": 0, "y": 0, "width": self.canvas.width, "height": self.canvas.max_height}
      png = page.screenshot(
        full_page=True, clip=clip, timeout=self._ms_left(), animations="disabled", caret="hide"
      )
    except PlaywrightTimeout:
      self._discard_context()  # its renderer may be stuck in the page's JavaScript
      return RenderResult(Status.TIMEOUT, None, f"Rendering timed out after {timeout:g} s.")
    except BaseException:
      self._discard_context()
      raise
    finally:
      with self._lock:
        self._busy_until = None
    self.stats["pages"] += 1
    return _result_from_png(png, {"render": time.monotonic() - start})

  def _fresh_page(self):
    """The reusable page, navigated to about:blank (a new document and JavaScript global)."""
    if self._page is not None and self._page_uses >= _RECYCLE_EVERY:
      self._discard_context()
    if self._page is None:
      self._context = self._new_context()
      self._page = self._context.new_page()
      self._page_uses = 0
    elif self._page_uses:
      self._page.goto("about:blank", timeout=self._ms_left())
      self._page.evaluate("() => { window.name = ''; }")  # the one thing a navigation keeps
    self._page_uses += 1
    return self._page

  def _discard_context(self) -> None:
    """Closes the current context (and its page); the next render opens a new one."""
    context, self._context, self._page = self._context, None, None
    if context is not None:
      self._close_context(context)

  def _new_context(self):
    """A fresh browser context with every network path closed."""
    context = self._browser.new_context(
      viewport={"width": self.canvas.width, "height": self.canvas.height},
      device_scale_factor=1,
      offline=True,
      service_workers="block",
      reduced_motion="reduce",
      accept_downloads=False,
    )
    context.route("**/*", self._block)
    context.route_web_socket("**/*", lambda ws: ws.close())
    return context

  def _block(self, route) -> None:
    """Aborts a request (data: URLs never get here; everything else must not leave)."""
    self.stats["blocked_requests"] += 1
    route.abort("blockedbyclient")

  def _ms_left(self) -> float:
    """Milliseconds until the current job's deadline (at least 1)."""
    deadline = self._busy_until or time.monotonic()
    return max(1.0, 1000.0 * (deadline - time.monotonic()))

  def _close_context(self, context) -> None:
    """Closes a context, tolerating a browser that is already gone."""
    try:
      context.close()
    except Exception as e:  # the browser died under it; the next job restarts it
      log.debug("closing a browser context failed: %s", e)


def _result_from_png(png: bytes, timings: dict[str, float]) -> RenderResult:
  """Decodes a screenshot into a RenderResult (blank pages are `blank_image`)."""
  from PIL import Image

  image = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
  if is_blank(image):
    return RenderResult(Status.BLANK_IMAGE, None, "The page is blank (a single uniform colour).")
  return RenderResult(Status.OK, image, "", timings, _png=png)


_default: HtmlRenderer | None = None
_default_lock = threading.Lock()


def default_html_renderer() -> HtmlRenderer:
  """The shared renderer behind `render_html` (created on first use, closed at exit)."""
  global _default
  with _default_lock:
    if _default is None or _default._closed:
      _default = HtmlRenderer()
    return _default


def render_html(
  html: str, *, timeout_s: float | None = None, renderer: HtmlRenderer | None = None
) -> RenderResult:
  """Renders an HTML page to an RGB screenshot (no network; JavaScript time-limited)."""
  return (renderer or default_html_renderer()).render(html, timeout_s=timeout_s)


@atexit.register
def _close_all_renderers() -> None:
  """Stops every browser at interpreter exit."""
  for renderer in list(_live_renderers):
    renderer.close()
