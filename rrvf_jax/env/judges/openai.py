"""A judge behind any OpenAI-compatible /v1/chat/completions endpoint with image inputs.

For example vLLM serving Qwen2.5-VL-72B-Instruct. The reference image and the render are sent as
base64 PNG data URLs (reference first), followed by the prompt from `prompts.py`.

Robustness, all visible in `metrics()`:
- per-request timeout, retries with exponential backoff (and jitter) on timeouts, connection errors,
  HTTP 5xx/408/429 and malformed response bodies;
- a concurrency limit (a semaphore around each HTTP request, shared by all threads);
- a cache keyed by sha256(model, mode, prompt, sampling settings, image bytes); identical requests
  in flight at the same time are sent once;
- a policy for when the service is down: 'wait' (the default: retry up to `max_wait_s`, logging
  as it waits, then raise), 'fail' (raise after `max_retries`), or 'fallback_local' (answer with
  the local judge, counted as a fallback; its scores are on another scale, so a training run must
  not use it: one group's rewards would mix two judges). After `circuit_after` consecutive
  failures, 'fail'/'fallback_local' skip the network for `circuit_cooldown_s`;
- robust score parsing ('Score: 85', '**Score**: 85/100', '[[85]]', '85 out of 100'); an unparsable
  reply is an explicit parse failure handled by `on_parse_failure`.

Other HTTP 4xx replies are not retried. 401/403/404 mean a wrong key, URL or model and always raise
JudgeUnavailableError, whatever the policy: a fallback must not hide a misconfiguration for a run.

The API key is read from the environment variable named in the config and is never logged. Standard
library HTTP only (urllib); host-only, no JAX.
"""

from __future__ import annotations

import base64
import collections
import concurrent.futures
import dataclasses
import hashlib
import http.client
import io
import json
import os
import random
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
from absl import logging
from PIL import Image

from rrvf_jax.env.judges import prompts
from rrvf_jax.env.judges.base import (
  Judge,
  JudgeResult,
  JudgeUnavailableError,
  Kind,
  Mode,
  check_image,
  register_judge,
)
from rrvf_jax.env.judges.local import LocalJudge

OnUnavailable = Literal["wait", "fail", "fallback_local"]
OnParseFailure = Literal["zero", "fallback_local", "raise"]


@dataclasses.dataclass(frozen=True)
class OpenAIJudgeConfig:
  """Settings of the OpenAI-compatible judge (no secrets: the key comes from `api_key_env`)."""

  base_url: str = "http://127.0.0.1:8000/v1"
  model: str = "Qwen/Qwen2.5-VL-72B-Instruct"
  api_key_env: str | None = "OPENAI_API_KEY"
  temperature: float = 0.0
  max_tokens: int = 1024
  timeout_s: float = 120.0
  max_retries: int = 4
  backoff_initial_s: float = 1.0
  backoff_max_s: float = 30.0
  backoff_multiplier: float = 2.0
  backoff_jitter: float = 0.1  # +- this fraction of each delay, so workers do not retry in lockstep
  max_concurrency: int = 8
  on_unavailable: OnUnavailable = "wait"
  max_wait_s: float = 600.0  # 'wait' gives up after this long
  circuit_after: int = 5
  circuit_cooldown_s: float = 30.0
  on_parse_failure: OnParseFailure = "zero"
  parse_retries: int = 1  # ask again this many times when a reply has no readable score
  cache_size: int = 4096
  include_code: bool = False  # show the render's code to the judge (feedback can then cite lines)
  max_image_side: int | None = None  # downscale images before sending (None: as they are)
  use_env_proxy: bool = False  # judges usually sit on a private network; ignore http_proxy
  extra_body: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  extra_headers: Mapping[str, str] = dataclasses.field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# Score parsing.

_NUM = r"(\d+(?:\.\d+)?)"
_DEN = r"(?:\s*(?:/|out\s+of)\s*(\d+(?:\.\d+)?))?"
_DECOR = r"[\s*_`~]*"
# 'Score: 85', '**Final Score**: 85/100', '## Score - 85 out of 100' at the start of a line.
_LINE_START = r"^[ \t>#*_`~-]*(?:final\s+|overall\s+|total\s+)?score"
_SCORE_LINE_RE = re.compile(
  rf"{_LINE_START}{_DECOR}[:：=\-]?{_DECOR}{_NUM}{_DECOR}{_DEN}", re.IGNORECASE | re.MULTILINE
)
_BRACKET_RE = re.compile(rf"\[\[\s*{_NUM}\s*(?:/\s*(\d+(?:\.\d+)?))?\s*\]\]")
_SCORE_ANY_RE = re.compile(
  rf"score{_DECOR}(?:is|of|[:：=])?{_DECOR}{_NUM}{_DECOR}{_DEN}", re.IGNORECASE
)
_OUT_OF_100_RE = re.compile(rf"{_NUM}\s*(?:/|out\s+of)\s*100\b", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class ParsedScore:
  """A score read from judge text, normalised to [0, 1], or the reason it could not be read."""

  value: float | None
  error: str | None = None


def parse_score(text: str) -> ParsedScore:
  """Read the final score from judge text; denominators are honoured, the default scale is 100."""
  for pattern, default_den in (
    (_SCORE_LINE_RE, 100.0),
    (_BRACKET_RE, 100.0),
    (_SCORE_ANY_RE, 100.0),
    (_OUT_OF_100_RE, None),
  ):
    matches = pattern.findall(text)
    if not matches:
      continue
    last = matches[-1]
    num, den = (last, None) if isinstance(last, str) else (last[0], last[1] or None)
    value = float(num)
    denominator = float(den) if den else (default_den or 100.0)
    if denominator <= 0 or value < 0 or value > denominator:
      return ParsedScore(None, f"score {num} out of range for /{denominator:g}")
    return ParsedScore(value / denominator)
  return ParsedScore(None, "no score found in the judge's reply")


def parse_aspects(text: str, rubric: Mapping[str, int]) -> dict[str, float]:
  """Read per-aspect subscores ('- Layout: … 8/10') into [0, 1]; aspects not found are left out."""
  out: dict[str, float] = {}
  for name, points in rubric.items():
    line = re.search(rf"^[\s>*_`~-]*{re.escape(name)}[\s*_`~]*[:：-](.*)$", text, re.I | re.M)
    if not line:
      continue
    fractions = re.findall(r"(\d+(?:\.\d+)?)\s*(?:/|out\s+of)\s*(\d+(?:\.\d+)?)", line.group(1))
    if fractions:
      num, den = (float(x) for x in fractions[-1])
    else:
      bare = re.findall(r"(?:subscore|score|points?)\D{0,3}(\d+(?:\.\d+)?)", line.group(1), re.I)
      if not bare:
        continue
      num, den = float(bare[-1]), float(points)
    if den > 0 and 0 <= num <= den:
      out[_aspect_key(name)] = num / den
  return out


def _aspect_key(name: str) -> str:
  """'Text Content' -> 'text_content'."""
  return name.lower().replace(" ", "_")


_SCORE_WHOLE_LINE_RE = re.compile(
  r"^[ \t>#*_`~-]*(?:final\s+|overall\s+|total\s+)?score\b.*(?:\n|$)", re.IGNORECASE | re.MULTILINE
)


def strip_scores(text: str) -> str:
  """Remove score lines so feedback shown to the policy does not reveal the reward."""
  return _SCORE_WHOLE_LINE_RE.sub("", text).strip()


# --------------------------------------------------------------------------------------------------
# Errors inside the client.


class _RetriableError(Exception):
  """A failure worth retrying (timeout, connection, 5xx/408/429, malformed body)."""

  def __init__(self, message: str, counter: str) -> None:
    super().__init__(message)
    self.counter = counter


class _FatalError(Exception):
  """A failure that retrying will not fix (e.g. 400, 401, 404)."""

  def __init__(self, message: str, config_error: bool) -> None:
    super().__init__(message)
    self.config_error = config_error


class _Unavailable(Exception):
  """The service could not produce a reply (retries exhausted, fatal error, or circuit open)."""

  def __init__(self, message: str, config_error: bool = False) -> None:
    super().__init__(message)
    self.config_error = config_error


# A wrong key, model route or URL: no fallback should hide these for a whole run.
_CONFIG_ERROR_CODES = frozenset({401, 403, 404})


class JudgeParseError(RuntimeError):
  """The judge replied but no score could be read, and the policy is 'raise'."""


# --------------------------------------------------------------------------------------------------
# Helpers.


def chat_completions_url(base_url: str) -> str:
  """Normalise 'http://h:8000', '…/v1' or '…/v1/chat/completions' to the completions URL."""
  url = base_url.rstrip("/")
  if url.endswith("/chat/completions"):
    return url
  if url.endswith("/v1"):
    return url + "/chat/completions"
  return url + "/v1/chat/completions"


def image_digest(image: np.ndarray) -> str:
  """sha256 of an image's shape, dtype and pixels (the cache key part for images)."""
  h = hashlib.sha256(f"{image.shape}|{image.dtype}|".encode())
  h.update(np.ascontiguousarray(image).tobytes())
  return h.hexdigest()


def png_data_url(image: np.ndarray, max_side: int | None = None) -> str:
  """Encode an RGB uint8 image as a base64 PNG data URL, optionally downscaled."""
  pil = Image.fromarray(image)
  if max_side and max(pil.size) > max_side:
    scale = max_side / max(pil.size)
    size = (max(1, round(pil.width * scale)), max(1, round(pil.height * scale)))
    pil = pil.resize(size, Image.Resampling.LANCZOS)
  buf = io.BytesIO()
  pil.save(buf, format="PNG")
  return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _reply_text(body: bytes) -> str:
  """Pull choices[0].message.content out of a completions response body."""
  try:
    data = json.loads(body)
    content = data["choices"][0]["message"]["content"]
  except (ValueError, KeyError, IndexError, TypeError) as e:
    raise _RetriableError(f"malformed response body ({type(e).__name__})", "bad_responses") from e
  if isinstance(content, list):  # some servers return content parts
    content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
  if not isinstance(content, str):
    raise _RetriableError("response content is not text", "bad_responses")
  return content


# --------------------------------------------------------------------------------------------------
# The judge.


@register_judge("openai")
class OpenAIJudge(Judge):
  """MLLM judge over an OpenAI-compatible API (see the module docstring)."""

  name = "openai"

  def __init__(
    self,
    config: OpenAIJudgeConfig | None = None,
    *,
    fallback: Judge | None = None,
    **overrides: Any,
  ) -> None:
    cfg = config or OpenAIJudgeConfig()
    if overrides:
      cfg = dataclasses.replace(cfg, **overrides)
    if cfg.on_unavailable not in ("wait", "fail", "fallback_local"):
      raise ValueError(f"on_unavailable must be 'wait', 'fail' or 'fallback_local': {cfg!r}")
    if cfg.on_parse_failure not in ("zero", "fallback_local", "raise"):
      raise ValueError(f"on_parse_failure must be 'zero', 'fallback_local' or 'raise': {cfg!r}")
    if cfg.max_concurrency < 1:
      raise ValueError("max_concurrency must be >= 1")
    self.config = cfg
    self.max_workers = cfg.max_concurrency
    self._url = chat_completions_url(cfg.base_url)
    # Read once; kept out of the config, repr and every message.
    self.__api_key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
    handlers = [] if cfg.use_env_proxy else [urllib.request.ProxyHandler({})]
    self._opener = urllib.request.build_opener(*handlers)
    self._semaphore = threading.BoundedSemaphore(cfg.max_concurrency)
    self._lock = threading.Lock()
    self._counts: collections.Counter[str] = collections.Counter()
    self._cache: collections.OrderedDict[str, JudgeResult] = collections.OrderedDict()
    self._inflight: dict[str, concurrent.futures.Future[JudgeResult]] = {}
    self._consecutive_failures = 0
    self._circuit_open_until = 0.0
    self._fallback = fallback
    self._rng = random.Random(0)

  def __repr__(self) -> str:
    return f"OpenAIJudge(url={self._url!r}, model={self.config.model!r})"

  # -- public API ----------------------------------------------------------------------------------

  def judge(
    self,
    target: np.ndarray,
    render: np.ndarray,
    *,
    kind: Kind = "chart",
    code: str | None = None,
    mode: Mode = "score",
  ) -> JudgeResult:
    """Ask the model to score (mode='score') or comment on (mode='feedback') the render."""
    target = check_image(target, "target")
    render = check_image(render, "render")
    cfg = self.config
    prompt = prompts.build_prompt(kind, mode, code if cfg.include_code else None)
    key = self._cache_key(mode, prompt, target, render)
    self._count("calls")
    with self._lock:
      hit = self._cache.get(key)
      if hit is not None:
        self._cache.move_to_end(key)
        self._counts["cache_hits"] += 1
        return dataclasses.replace(hit, cached=True)
      future = self._inflight.get(key)
      owner = future is None
      if owner:
        future = concurrent.futures.Future()
        self._inflight[key] = future
      else:
        self._counts["deduplicated"] += 1
    if not owner:
      return dataclasses.replace(future.result(), cached=True)
    try:
      result = self._judge_uncached(target, render, kind=kind, code=code, mode=mode, prompt=prompt)
    except BaseException as e:
      future.set_exception(e)
      raise
    finally:
      with self._lock:
        self._inflight.pop(key, None)
    future.set_result(result)
    if result.source == "openai" and result.parse_ok:
      with self._lock:
        self._cache[key] = result
        while len(self._cache) > cfg.cache_size:
          self._cache.popitem(last=False)
    return result

  def metrics(self) -> dict[str, int]:
    """Counters: calls, requests, cache_hits, deduplicated, retries, timeouts, connection_errors,
    http_errors, bad_responses, failures, fallbacks, parse_failures, short_circuits."""
    names = (
      "calls",
      "requests",
      "cache_hits",
      "deduplicated",
      "retries",
      "timeouts",
      "connection_errors",
      "http_errors",
      "bad_responses",
      "failures",
      "fallbacks",
      "parse_failures",
      "short_circuits",
    )
    with self._lock:
      return {n: self._counts[n] for n in names}

  # -- internals -----------------------------------------------------------------------------------

  def _count(self, name: str, n: int = 1) -> None:
    """Increment a metrics counter (thread-safe)."""
    with self._lock:
      self._counts[name] += n

  def _cache_key(self, mode: str, prompt: str, target: np.ndarray, render: np.ndarray) -> str:
    """sha256 over everything that changes the reply: model, mode, prompt, sampling, images."""
    cfg = self.config
    parts = [
      cfg.model,
      mode,
      prompt,
      f"{cfg.temperature}|{cfg.max_tokens}|{cfg.max_image_side}",
      json.dumps(dict(cfg.extra_body), sort_keys=True, default=str),
      image_digest(target),
      image_digest(render),
    ]
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()

  def _payload(self, prompt: str, target: np.ndarray, render: np.ndarray) -> bytes:
    """Build the request body: reference image, render, then the prompt text."""
    cfg = self.config
    content = [
      {"type": "image_url", "image_url": {"url": png_data_url(target, cfg.max_image_side)}},
      {"type": "image_url", "image_url": {"url": png_data_url(render, cfg.max_image_side)}},
      {"type": "text", "text": prompt},
    ]
    body = {
      "model": cfg.model,
      "messages": [{"role": "user", "content": content}],
      "temperature": cfg.temperature,
      "max_tokens": cfg.max_tokens,
      **dict(cfg.extra_body),
    }
    return json.dumps(body).encode()

  def _post_once(self, payload: bytes) -> str:
    """Send one HTTP request (under the concurrency limit) and return the reply text."""
    headers = {"Content-Type": "application/json", **dict(self.config.extra_headers)}
    if self.__api_key:
      headers["Authorization"] = f"Bearer {self.__api_key}"
    request = urllib.request.Request(self._url, data=payload, headers=headers, method="POST")
    with self._semaphore:
      self._count("requests")
      try:
        with self._opener.open(request, timeout=self.config.timeout_s) as response:
          body = response.read()
      except urllib.error.HTTPError as e:
        e.close()
        if e.code >= 500 or e.code in (408, 429):
          raise _RetriableError(f"HTTP {e.code}", "http_errors") from None
        raise _FatalError(f"HTTP {e.code} {e.reason}", e.code in _CONFIG_ERROR_CODES) from None
      except TimeoutError as e:
        raise _RetriableError(f"timed out after {self.config.timeout_s:g}s", "timeouts") from e
      except urllib.error.URLError as e:
        if isinstance(e.reason, TimeoutError):
          raise _RetriableError(f"timed out after {self.config.timeout_s:g}s", "timeouts") from e
        raise _RetriableError(f"connection error: {e.reason}", "connection_errors") from e
      except (ConnectionError, http.client.HTTPException, OSError) as e:
        raise _RetriableError(f"connection error: {type(e).__name__}", "connection_errors") from e
    return _reply_text(body)

  def _delay(self, attempt: int) -> float:
    """Exponential backoff with jitter for retry number `attempt` (1-based)."""
    cfg = self.config
    base = min(cfg.backoff_max_s, cfg.backoff_initial_s * cfg.backoff_multiplier ** (attempt - 1))
    with self._lock:
      jitter = self._rng.uniform(-cfg.backoff_jitter, cfg.backoff_jitter)
    return max(0.0, base * (1.0 + jitter))

  def _request(self, payload: bytes) -> str:
    """Send with retries according to the policy; raise _Unavailable when giving up."""
    cfg = self.config
    waiting = cfg.on_unavailable == "wait"
    if not waiting and time.monotonic() < self._circuit_open_until:
      self._count("short_circuits")
      raise _Unavailable("judge marked down after repeated failures (circuit open)")
    start = time.monotonic()
    attempt = 0
    while True:
      try:
        text = self._post_once(payload)
      except _FatalError as e:
        self._note_failure()
        raise _Unavailable(str(e), e.config_error) from None
      except _RetriableError as e:
        self._count(e.counter)
        attempt += 1
        delay = self._delay(attempt)
        if waiting:
          give_up = time.monotonic() - start + delay > cfg.max_wait_s
        else:
          give_up = attempt > cfg.max_retries
        if give_up:
          self._note_failure()
          raise _Unavailable(f"{e} (after {attempt} attempts)") from None
        self._count("retries")
        if waiting:
          logging.log_every_n_seconds(
            logging.WARNING,
            "judge at %s: %s; waiting (attempt %d, %.0f s so far, at most %.0f s)",
            10,
            self._url,
            e,
            attempt,
            time.monotonic() - start,
            cfg.max_wait_s,
          )
        time.sleep(delay)
        continue
      with self._lock:
        self._consecutive_failures = 0
      return text

  def _note_failure(self) -> None:
    """Record a call that could not be served; open the circuit after too many in a row."""
    with self._lock:
      self._consecutive_failures += 1
      if self._consecutive_failures >= self.config.circuit_after:
        self._circuit_open_until = time.monotonic() + self.config.circuit_cooldown_s

  def _local(self) -> Judge:
    """The fallback judge, built on first use."""
    with self._lock:
      if self._fallback is None:
        self._fallback = LocalJudge()
      return self._fallback

  def _fallback_result(
    self, target: np.ndarray, render: np.ndarray, kind: Kind, mode: Mode, reason: str
  ) -> JudgeResult:
    """Answer with the local judge, marked as a fallback."""
    self._count("fallbacks")
    local = self._local().judge(target, render, kind=kind, mode=mode)
    return dataclasses.replace(local, source="fallback_local", error=reason)

  def _judge_uncached(
    self,
    target: np.ndarray,
    render: np.ndarray,
    *,
    kind: Kind,
    code: str | None,
    mode: Mode,
    prompt: str,
  ) -> JudgeResult:
    """One judgement without the cache: request, parse, and apply the failure policies."""
    del code  # already in `prompt` when include_code is set
    cfg = self.config
    payload = self._payload(prompt, target, render)
    rubric = prompts.RUBRICS[kind]
    for _ in range(1 + (cfg.parse_retries if mode == "score" else 0)):
      try:
        text = self._request(payload)
      except _Unavailable as e:
        self._count("failures")
        if cfg.on_unavailable == "fallback_local" and not e.config_error:
          return self._fallback_result(target, render, kind, mode, f"judge unavailable: {e}")
        raise JudgeUnavailableError(f"judge at {self._url} unavailable: {e}") from None
      aspects = parse_aspects(text, rubric)
      if mode == "feedback":
        return JudgeResult(
          score=None, aspects=aspects, feedback=strip_scores(text), raw=text, source="openai"
        )
      parsed = parse_score(text)
      if parsed.value is not None:
        return JudgeResult(
          score=parsed.value,
          aspects=aspects,
          feedback=strip_scores(text),
          raw=text,
          source="openai",
        )
      self._count("parse_failures")
    reason = f"unparsable judge reply: {parsed.error}"
    if cfg.on_parse_failure == "raise":
      raise JudgeParseError(reason)
    if cfg.on_parse_failure == "fallback_local":
      return self._fallback_result(target, render, kind, mode, reason)
    return JudgeResult(
      score=0.0,
      aspects=aspects,
      feedback=strip_scores(text),
      raw=text,
      source="openai",
      parse_ok=False,
      error=reason,
    )
