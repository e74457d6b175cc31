"""Static checks on model-written Python before it is run: syntax, and obvious reward hacks.

This is a first, cheap filter that gives a clear `forbidden` verdict for the common cases (loading
an image file, embedding raster data, spawning processes, opening sockets, introspection escapes).
It is not the security boundary: the sandbox (namespaces, seccomp, rlimits, an audit hook) is.
"""

from __future__ import annotations

import ast
import dataclasses
import re

from rrvf_jax.env.types import Status

# Modules chart code has no business importing: processes, network, raw memory, dynamic imports.
FORBIDDEN_MODULES = frozenset({
  "_ctypes", "_posixsubprocess", "_socket", "asyncio", "cffi", "ctypes", "ftplib", "http",
  "importlib", "mmap", "multiprocessing", "pty", "requests", "resource", "signal", "smtplib",
  "socket", "socketserver", "ssl", "subprocess", "telnetlib", "urllib",
  "urllib3", "httpx", "webbrowser", "xmlrpc", "gc", "inspect", "code", "codeop", "builtins",
  "pickle", "marshal", "shelve",
})  # fmt: skip
# `os.<name>` calls that start processes, send signals or change identity.
FORBIDDEN_OS_ATTRS = frozenset({
  "system", "popen", "fork", "forkpty", "kill", "killpg", "setsid", "setuid", "setgid",
  "posix_spawn", "posix_spawnp", "execv", "execve", "execl", "execle", "execlp", "execlpe",
  "execvp", "execvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve",
  "spawnvp", "spawnvpe", "startfile", "pidfd_open", "chroot",
})  # fmt: skip
FORBIDDEN_BUILTINS = frozenset({"__import__", "eval", "exec", "compile", "breakpoint"})
# Attributes that lead from any object to the interpreter's internals.
FORBIDDEN_ATTRS = frozenset({
  "__subclasses__", "__globals__", "__builtins__", "__code__", "__closure__", "__bases__",
  "__base__", "__mro__", "__loader__", "__spec__", "__import__", "__getattribute__",
  "f_globals", "f_locals", "f_back", "f_builtins", "gi_frame", "cr_frame", "tb_frame",
  "func_globals", "modules", "_getframe",
})  # fmt: skip
# Calls that load an image from a file (the target would be the obvious one to load).
IMAGE_LOADERS = frozenset({"imread", "get_sample_data", "open_image", "load_img", "imopen"})
_BASE64ISH = re.compile(r"^[A-Za-z0-9+/=_\-\s]*$")
_HEXISH = re.compile(r"^[0-9a-fA-Fx,\s\\]*$")


@dataclasses.dataclass(frozen=True)
class CodeLimits:
  """Thresholds for the static check."""

  max_code_chars: int = 100_000
  max_literal_numbers: int = 4096  # numeric constants in the whole program
  max_encoded_chars: int = 2048  # one string literal that looks like base64/hex data


@dataclasses.dataclass(frozen=True)
class CodeVerdict:
  """Result of the static check: `status` is None when the code may run."""

  status: Status | None
  message: str = ""


def check_code(code: str, limits: CodeLimits = CodeLimits()) -> CodeVerdict:
  """Checks model-written Python statically: syntax errors and forbidden constructs."""
  if len(code) > limits.max_code_chars:
    return _forbidden(f"code is {len(code)} characters long (limit {limits.max_code_chars})")
  try:
    tree = ast.parse(code, filename="<code>")
  except SyntaxError as e:
    return CodeVerdict(Status.SYNTAX_ERROR, format_syntax_error(e))
  except (ValueError, RecursionError, MemoryError) as e:
    return CodeVerdict(Status.SYNTAX_ERROR, f"SyntaxError: {type(e).__name__}: {e}")
  return _check_tree(tree, limits)


def format_syntax_error(e: SyntaxError) -> str:
  """Formats a SyntaxError like Python does, with the offending line and a caret."""
  lines = [f'  File "<code>", line {e.lineno}']
  if e.text:
    text = e.text.rstrip("\n")
    stripped = text.lstrip()
    lines.append("    " + stripped)
    if e.offset:
      caret_at = max(0, e.offset - 1 - (len(text) - len(stripped)))
      lines.append("    " + " " * caret_at + "^")
  lines.append(f"{type(e).__name__}: {e.msg}")
  return "\n".join(lines)


def _forbidden(reason: str, node: ast.AST | None = None) -> CodeVerdict:
  """Builds a `forbidden` verdict that names the line."""
  where = f" (line {node.lineno})" if node is not None and hasattr(node, "lineno") else ""
  return CodeVerdict(Status.FORBIDDEN, f"Forbidden: {reason}{where}.")


def _check_tree(tree: ast.AST, limits: CodeLimits) -> CodeVerdict:
  """Walks the syntax tree once and returns the first violation found."""
  numbers = 0
  for node in ast.walk(tree):
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float | complex):
      numbers += not isinstance(node.value, bool)
    reason = _node_violation(node, limits)
    if reason:
      return _forbidden(reason, node)
  if numbers > limits.max_literal_numbers:
    return _forbidden(
      f"the code embeds {numbers} numeric literals (limit {limits.max_literal_numbers}); "
      "embedding raster data is not allowed"
    )
  return CodeVerdict(None)


def _node_violation(node: ast.AST, limits: CodeLimits) -> str | None:
  """Returns why one syntax node is forbidden, or None."""
  if isinstance(node, ast.Import | ast.ImportFrom):
    return _import_violation(node)
  if isinstance(node, ast.Name) and node.id in FORBIDDEN_BUILTINS | {"__builtins__"}:
    return f"use of `{node.id}`"
  if isinstance(node, ast.Attribute):
    return _attribute_violation(node)
  if isinstance(node, ast.Constant) and isinstance(node.value, str | bytes):
    return _literal_violation(node.value, limits)
  return None


def _import_violation(node: ast.Import | ast.ImportFrom) -> str | None:
  """Returns why an import is forbidden, or None."""
  names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
  for name in names:
    if name.split(".")[0] in FORBIDDEN_MODULES:
      return f"import of module `{name}`"
  if isinstance(node, ast.ImportFrom):
    for alias in node.names:
      if alias.name in FORBIDDEN_OS_ATTRS and node.module in ("os", "posix"):
        return f"import of `{node.module}.{alias.name}`"
      if alias.name in IMAGE_LOADERS:
        return f"import of image loader `{alias.name}`"
  return None


def _attribute_violation(node: ast.Attribute) -> str | None:
  """Returns why an attribute access is forbidden, or None."""
  if node.attr in FORBIDDEN_ATTRS:
    return f"access to `.{node.attr}`"
  if node.attr in IMAGE_LOADERS:
    return f"loading an image file with `.{node.attr}`"
  base = node.value.id if isinstance(node.value, ast.Name) else None
  if base in ("os", "posix") and node.attr in FORBIDDEN_OS_ATTRS:
    return f"call of `{base}.{node.attr}`"
  if node.attr == "open" and base in ("Image", "PIL"):
    return "loading an image file with `Image.open`"
  return None


def _literal_violation(value: str | bytes, limits: CodeLimits) -> str | None:
  """Returns why a string literal is forbidden (encoded raster data), or None."""
  text = value.decode("latin-1") if isinstance(value, bytes) else value
  if "data:image/" in text and "base64," in text:
    return "a base64 data URI of an image"
  if len(text) <= limits.max_encoded_chars:
    return None
  if isinstance(value, bytes) or _BASE64ISH.match(text) or _HEXISH.match(text):
    return f"a {len(text)}-character encoded data literal (looks like embedded raster data)"
  return None
