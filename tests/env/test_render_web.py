"""HTML renderer: no request leaves the page (checked against a live local server), JavaScript is
time-limited, the browser recovers from crashes, and screenshots follow the canvas rules."""

from __future__ import annotations

import base64
import concurrent.futures
import io
import socket
import threading
import time

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("playwright")

from rrvf_jax.env import HtmlRenderer, Status, render_html
from rrvf_jax.env.web import default_html_renderer, find_chromium

if find_chromium() is None:
  pytest.skip("no Chromium installed", allow_module_level=True)

TIMEOUT_S = 3.0


class _Listener:
  """Counts TCP connections and UDP datagrams to one local port (any attempt counts)."""

  def __init__(self) -> None:
    self.tcp = socket.socket()
    self.tcp.bind(("127.0.0.1", 0))
    self.tcp.listen(64)
    self.port = self.tcp.getsockname()[1]
    self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    self.udp.bind(("127.0.0.1", self.port))
    self.connections = 0
    self.datagrams = 0
    threading.Thread(target=self._accept, daemon=True).start()
    threading.Thread(target=self._receive, daemon=True).start()

  def _accept(self) -> None:
    """Accepts, answers and counts TCP connections."""
    while True:
      try:
        conn, _ = self.tcp.accept()
      except OSError:
        return
      self.connections += 1
      # Answer like a web server would, so a leaking browser would keep loading things.
      conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
      conn.close()

  def _receive(self) -> None:
    """Counts UDP datagrams."""
    while True:
      try:
        self.udp.recv(4096)
      except OSError:
        return
      self.datagrams += 1

  def close(self) -> None:
    """Closes both sockets."""
    self.tcp.close()
    self.udp.close()


@pytest.fixture(scope="module")
def renderer():
  """One renderer shared by the tests of this module."""
  with HtmlRenderer(timeout_s=TIMEOUT_S) as r:
    yield r


@pytest.fixture
def listener():
  """A fresh local listener per test."""
  lst = _Listener()
  yield lst
  lst.close()


def leaky_page(port: int) -> str:
  """A page that tries every way a page can reach a server."""
  url, host = f"http://127.0.0.1:{port}", f"http://localhost:{port}"
  return f"""<!doctype html><html><head>
<link rel="stylesheet" href="{url}/style.css">
<link rel="preconnect" href="{url}"><link rel="dns-prefetch" href="{host}">
<link rel="prefetch" href="{url}/prefetch"><link rel="icon" href="{url}/favicon.ico">
<script src="{url}/app.js"></script>
<style>
  @import url("{url}/imported.css");
  @font-face {{ font-family: Remote; src: url("{url}/font.woff2"); }}
  body {{ background-image: url("{url}/bg.png"); font-family: Remote, sans-serif; }}
</style></head><body>
<h1>Visible heading</h1><p>Some text that must render.</p>
<img src="{url}/img.png" width="50" height="50"><img srcset="{host}/hi.png 2x">
<iframe src="{url}/frame.html" width="100" height="50"></iframe>
<video src="{url}/v.mp4" autoplay muted></video><audio src="{url}/a.mp3" autoplay></audio>
<object data="{url}/o.bin"></object><embed src="{url}/e.bin">
<script>
  fetch("{url}/fetch").catch(() => {{}});
  fetch("{host}/fetch-host", {{mode: "no-cors"}}).catch(() => {{}});
  const xhr = new XMLHttpRequest(); xhr.open("GET", "{url}/xhr"); xhr.send();
  try {{ new WebSocket("ws://127.0.0.1:{port}/ws"); }} catch (e) {{}}
  try {{ new EventSource("{url}/sse"); }} catch (e) {{}}
  try {{ navigator.sendBeacon("{url}/beacon", "x"); }} catch (e) {{}}
  new Image().src = "{url}/js-image.png";
  try {{ navigator.serviceWorker.register("{url}/sw.js").catch(() => {{}}); }} catch (e) {{}}
  try {{
    const pc = new RTCPeerConnection({{iceServers: [{{urls: "stun:127.0.0.1:{port}"}}]}});
    pc.createDataChannel("x");
    pc.createOffer().then((o) => pc.setLocalDescription(o)).catch(() => {{}});
  }} catch (e) {{}}
</script></body></html>"""


def test_no_request_leaves_the_page(renderer, listener):
  blocked = renderer.stats["blocked_requests"]
  result = renderer.render(leaky_page(listener.port))
  assert result.ok, result.message
  assert (result.image < 100).any(), "the heading text should be visible"
  time.sleep(1.0)  # late attempts (timers, retries, ICE gathering) would arrive by now
  assert listener.connections == 0
  assert listener.datagrams == 0
  assert renderer.stats["blocked_requests"] - blocked >= 8  # the page really tried


def test_the_listener_sees_an_unprotected_browser(listener):
  """Control: the same page in a plain Playwright browser does reach the server."""
  from playwright.sync_api import sync_playwright

  with sync_playwright() as pw:
    browser = pw.chromium.launch(executable_path=find_chromium(), args=["--disable-gpu"])
    page = browser.new_page()
    page.set_content(leaky_page(listener.port), timeout=10_000)
    page.wait_for_timeout(500)
    browser.close()
  assert listener.connections > 0


def test_navigation_away_is_blocked(renderer, listener):
  url = f"http://127.0.0.1:{listener.port}"
  pages = [
    f"<p>redirect</p><script>location.href = '{url}/nav';</script>",
    f'<meta http-equiv="refresh" content="0; url={url}/refresh"><p>refresh</p>',
    f"<form id=f action='{url}/submit' method=post></form><script>f.submit()</script><p>x</p>",
    f"<p>popup</p><script>window.open('{url}/popup')</script>",
  ]
  for html in pages:
    result = renderer.render(html)
    assert result.status in (Status.OK, Status.BLANK_IMAGE), result.message
  time.sleep(0.5)
  assert listener.connections == 0


def test_infinite_script_times_out_and_renderer_recovers(renderer):
  for html in (
    "<p>x</p><script>while (true) {}</script>",  # blocks the load event
    "<p>x</p><script>setTimeout(() => { while (true) {} }, 0)</script>",  # hangs after load
  ):
    start = time.monotonic()
    result = renderer.render(html)
    assert result.status == Status.TIMEOUT, result.message
    assert time.monotonic() - start <= TIMEOUT_S + 2.0
    assert renderer.render("<h1>after</h1>").ok


def test_watchdog_kills_a_call_without_timeout(renderer, monkeypatch):
  """A hang inside a Playwright call that has no timeout of its own (evaluate) is cut off."""
  original = renderer._fresh_page

  def hanging_page():
    """The usual page, then a script that never returns."""
    page = original()
    page.evaluate("() => { while (true) {} }")  # never returns
    return page

  monkeypatch.setattr(renderer, "_fresh_page", hanging_page)
  kills = renderer.stats["watchdog_kills"]
  start = time.monotonic()
  result = renderer.render("<p>x</p>", timeout_s=1.0)
  assert result.status == Status.TIMEOUT
  assert time.monotonic() - start < 1.0 + 3.0 + 2.0  # the watchdog's grace is 3 s
  assert renderer.stats["watchdog_kills"] == kills + 1
  monkeypatch.undo()
  assert renderer.render("<h1>after</h1>").ok


def test_browser_crash_is_recovered(renderer):
  assert renderer.render("<h1>before</h1>").ok
  starts = renderer.stats["browser_starts"]
  pids = renderer.browser_pids()
  assert pids
  for pid in pids:
    renderer_kill(pid)
  result = renderer.render("<h1>after the crash</h1>")
  assert result.ok, result.message
  assert renderer.stats["browser_starts"] == starts + 1
  assert not set(renderer.browser_pids()) & set(pids)


def renderer_kill(pid: int) -> None:
  """Kills a browser process and its children, like a crash would."""
  from rrvf_jax.env.sandbox import kill_process_tree

  kill_process_tree(pid)


def test_blank_page_is_blank_image(renderer):
  assert renderer.render("").status == Status.BLANK_IMAGE
  assert renderer.render("<body style='background:#123456'></body>").status == Status.BLANK_IMAGE


def test_data_urls_load(renderer):
  buf = io.BytesIO()
  Image.new("RGB", (4, 4), (255, 0, 0)).save(buf, format="PNG")
  uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
  html = f"<body style='margin:0'><img src='{uri}' style='width:200px;height:200px'></body>"
  result = renderer.render(html)
  assert result.ok
  assert tuple(result.image[100, 100]) == (255, 0, 0)


def test_large_inline_image_is_forbidden(renderer):
  uri = "data:image/png;base64," + "A" * 10_000
  result = renderer.render(f"<img src='{uri}'>")
  assert result.status == Status.FORBIDDEN and "raster" in result.message


def test_viewport_and_height_limit(renderer):
  short = renderer.render("<h1>short</h1>")
  assert short.image.shape == (720, 1280, 3)
  tall = renderer.render("<div style='height:9000px;background:linear-gradient(red,blue)'></div>")
  assert tall.image.shape == (2560, 1280, 3)
  medium = renderer.render("<body style='margin:0'><div style='height:1000px'>x</div></body>")
  assert medium.image.shape == (1000, 1280, 3)


def test_renders_are_deterministic(renderer):
  html = "<h1 style='font-family:serif'>Same</h1><p>twice</p><button>ok</button>"
  a, b = renderer.render(html), renderer.render(html)
  np.testing.assert_array_equal(a.image, b.image)
  assert a.png == b.png


def test_state_does_not_carry_over_between_pages(renderer):
  leaky = (
    "<p>a</p><script>window.name = 'leak'; window.LEAK = 1;"
    "try { localStorage.setItem('k', 'v'); } catch (e) {}"
    "setInterval(() => { document.body.style.background = 'blue'; }, 1);</script>"
  )
  probe = (
    "<body style='margin:0'><div id=d style='width:100%;height:100px'></div><script>"
    "let leaked = window.name !== '' || window.LEAK !== undefined;"
    "try { leaked = leaked || localStorage.getItem('k') !== null; } catch (e) {}"
    "d.style.background = leaked ? 'red' : 'lime';</script></body>"
  )
  assert renderer.render(leaky).ok
  result = renderer.render(probe)
  assert tuple(result.image[50, 50]) == (0, 255, 0)
  assert tuple(result.image[500, 500]) == (255, 255, 255)  # no timer from the last page


def test_concurrent_callers(renderer):
  colors = [(255, 0, 0), (0, 128, 0), (0, 0, 255), (255, 165, 0)]
  pages = [
    f"<body style='margin:0'><div style='height:300px;background:rgb{c}'></div>x</body>"
    for c in colors
  ]
  with concurrent.futures.ThreadPoolExecutor(4) as ex:
    results = list(ex.map(renderer.render, pages))
  for color, result in zip(colors, results, strict=True):
    assert result.ok and tuple(result.image[10, 10]) == color


def test_render_html_works_without_setup():
  try:
    assert render_html("<h1>default</h1>").ok
  finally:
    default_html_renderer().close()
