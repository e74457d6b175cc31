"""A real OpenAI-compatible /v1/chat/completions server on loopback, for testing judge clients.

It decodes the two images of each request (reference, then render) and answers a ChartMimic-style
reply whose score is 100 x (1 - mean absolute pixel difference), so identical images get 100.

Behaviour is chosen per server (`server.mode = 'slow'`) or per request (header `X-Fake-Judge-Mode`,
or a model name `fake-judge/<mode>`):

- 'good': answer at once;
- 'slow': sleep `delay_s`, then answer (to exceed a client timeout);
- 'error': HTTP 500 for the first `fail_first` requests of this mode, then answer (None: always
  500);
- 'malformed': HTTP 200 with a body that is not JSON;
- 'unparsable': a well-formed completion whose text has no score;
- 'reject': HTTP 400 (a client error retrying cannot fix).

The server records every request and the largest number handled at once (`max_concurrent`), so tests
can check retries, caching and concurrency limits from the server's side.

    with FakeJudgeServer() as server:
      judge = make_judge("openai", base_url=server.url, model="m")
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import threading
import time
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
from PIL import Image

MODES = ("good", "slow", "error", "malformed", "unparsable", "reject")
# How the final score line is written; cycled per answer to exercise the client's parser.
SCORE_FORMATS = (
  "Score: {s}",
  "**Score**: {s}/100",
  "Final score: [[{s}]]",
  "Score: {s} out of 100",
)


@dataclasses.dataclass(frozen=True)
class RecordedRequest:
  """What the server saw in one request."""

  mode: str
  model: str
  n_images: int
  prompt: str
  authorization: str | None
  body: dict[str, Any]


def _decode_image(url: str) -> np.ndarray:
  """Decode a data:image/...;base64 URL into an RGB uint8 array."""
  data = base64.b64decode(url.split(",", 1)[1])
  return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def similarity_score(images: Sequence[np.ndarray]) -> int:
  """100 x (1 - mean |a - b| / 255) after resizing the render to the reference size."""
  if len(images) < 2:
    return 0
  ref, gen = images[0], images[1]
  if gen.shape != ref.shape:
    gen = np.asarray(Image.fromarray(gen).resize((ref.shape[1], ref.shape[0])))
  diff = np.abs(ref.astype(np.float64) - gen.astype(np.float64)).mean() / 255.0
  return round(100 * (1.0 - diff))


def _reply_text(score: int, score_format: str, kind_hint: str) -> str:
  """A ChartMimic-style reply with per-aspect comments and a final score line."""
  sub = max(0, min(10, round(score / 10)))
  return (
    "Comments:\n"
    f"- Chart Types: the {kind_hint} types match, {2 * sub}/20\n"
    f"- Layout: arrangement is similar, {sub}/10\n"
    f"- Text Content: titles and labels compared, {2 * sub}/20\n"
    f"- Data: trends compared, {2 * sub}/20\n"
    f"- Style: colours compared, {2 * sub}/20\n"
    f"- Clarity: clear, {sub}/10\n\n" + score_format.format(s=score)
  )


class FakeJudgeServer:
  """A ThreadingHTTPServer on 127.0.0.1 (ephemeral port) answering chat completions."""

  def __init__(
    self,
    mode: str = "good",
    *,
    delay_s: float = 1.0,
    fail_first: int | None = 2,
    api_key: str | None = None,
  ) -> None:
    if mode not in MODES:
      raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    self.mode = mode
    self.delay_s = delay_s
    self.fail_first = fail_first
    self.api_key = api_key
    self.requests: list[RecordedRequest] = []
    self.max_concurrent = 0
    self._active = 0
    self._errors_sent = 0
    self._answers = 0
    self._lock = threading.Lock()
    self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
    self._httpd.daemon_threads = True
    self._thread = threading.Thread(
      target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )

  @property
  def url(self) -> str:
    """Base URL of the API ('http://127.0.0.1:<port>/v1')."""
    host, port = self._httpd.server_address[:2]
    return f"http://{host}:{port}/v1"

  def start(self) -> FakeJudgeServer:
    """Start serving in a background thread."""
    self._thread.start()
    return self

  def stop(self) -> None:
    """Stop serving and close the socket (handler threads still sleeping are daemons)."""
    self._httpd.shutdown()
    self._httpd.server_close()
    self._thread.join(timeout=5)

  def __enter__(self) -> FakeJudgeServer:
    return self.start()

  def __exit__(self, *exc: object) -> None:
    self.stop()

  def reset(self) -> None:
    """Forget recorded requests and counters (the mode stays)."""
    with self._lock:
      self.requests.clear()
      self.max_concurrent = 0
      self._errors_sent = 0

  def wait_idle(self, timeout_s: float = 10.0) -> bool:
    """Wait until no request is being handled (e.g. slow ones a client gave up on)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
      with self._lock:
        if self._active == 0:
          return True
      time.sleep(0.01)
    return False

  def count(self, mode: str | None = None) -> int:
    """Number of requests received (of one mode, or all)."""
    with self._lock:
      return sum(1 for r in self.requests if mode is None or r.mode == mode)

  # -- request handling ----------------------------------------------------------------------------

  def _handler_class(self) -> type[BaseHTTPRequestHandler]:
    """Build the handler class bound to this server object."""
    server = self

    class Handler(BaseHTTPRequestHandler):
      protocol_version = "HTTP/1.1"

      def log_message(self, format: str, *args: Any) -> None:
        """Silence the default stderr access log."""

      def do_POST(self) -> None:
        """Handle one chat-completions request."""
        self.fake_active = True
        with server._lock:
          server._active += 1
          server.max_concurrent = max(server.max_concurrent, server._active)
        try:
          server._handle(self)
        except (BrokenPipeError, ConnectionResetError):
          pass  # the client gave up (timeout): nothing to answer
        finally:
          server._leave(self)

    return Handler

  def _leave(self, handler: BaseHTTPRequestHandler) -> None:
    """Stop counting a request as active (once)."""
    with self._lock:
      if getattr(handler, "fake_active", False):
        handler.fake_active = False
        self._active -= 1

  def _send(self, handler: BaseHTTPRequestHandler, status: int, body: bytes, ctype: str) -> None:
    """Write one HTTP response.

    The request stops counting as active before the response is written: the client may send its
    next request as soon as it has read this one, before this thread gets to run again.
    """
    self._leave(handler)
    handler.send_response(status)
    handler.send_header("Content-Type", ctype)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)

  def _handle(self, handler: BaseHTTPRequestHandler) -> None:
    """Record the request, then answer according to its mode."""
    length = int(handler.headers.get("Content-Length", "0"))
    body = json.loads(handler.rfile.read(length) or b"{}")
    model = str(body.get("model", ""))
    mode = handler.headers.get("X-Fake-Judge-Mode") or (
      model.split("/", 1)[1] if model.startswith("fake-judge/") else self.mode
    )
    content = body.get("messages", [{}])[-1].get("content", [])
    urls = [p["image_url"]["url"] for p in content if p.get("type") == "image_url"]
    prompt = "".join(p.get("text", "") for p in content if p.get("type") == "text")
    auth = handler.headers.get("Authorization")
    with self._lock:
      self.requests.append(RecordedRequest(mode, model, len(urls), prompt, auth, body))
    if handler.path.rstrip("/") != "/v1/chat/completions":
      self._send(handler, 404, b'{"error": "not found"}', "application/json")
      return
    if self.api_key is not None and auth != f"Bearer {self.api_key}":
      self._send(handler, 401, b'{"error": "unauthorized"}', "application/json")
      return
    if mode == "reject":
      self._send(handler, 400, b'{"error": "bad request"}', "application/json")
      return
    if mode == "error":
      with self._lock:
        fail = self.fail_first is None or self._errors_sent < self.fail_first
        self._errors_sent += fail
      if fail:
        self._send(handler, 500, b'{"error": "internal"}', "application/json")
        return
    if mode == "malformed":
      self._send(handler, 200, b'{"choices": [{"message": {"content": "trunc', "application/json")
      return
    if mode == "slow":
      time.sleep(self.delay_s)
    if mode == "unparsable":
      text = "Comments:\n- Chart Types: hard to say.\n\nI cannot decide on a number."
    else:
      score = similarity_score([_decode_image(u) for u in urls])
      with self._lock:
        fmt = SCORE_FORMATS[self._answers % len(SCORE_FORMATS)]
        self._answers += 1
      text = _reply_text(score, fmt, "chart")
    reply = {
      "id": f"fake-{len(self.requests)}",
      "object": "chat.completion",
      "model": model,
      "choices": [
        {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
      ],
      "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
    }
    self._send(handler, 200, json.dumps(reply).encode(), "application/json")
