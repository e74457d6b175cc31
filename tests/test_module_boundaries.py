"""Import boundaries between modules, read from the source with `ast` (imports in functions too)."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "rrvf_jax"


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(source: str, module: str, is_package: bool = False) -> set[str]:
  """Every module that `module`'s source imports anywhere, `from X import name` as X.name too."""
  package = module if is_package else module.rpartition(".")[0]
  found = set()
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      found.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parts = package.split(".")
        anchor = ".".join(parts[: len(parts) - node.level + 1])
        base = f"{anchor}.{base}" if base else anchor
      found.add(base)
      # `from rrvf_jax import testing` names the submodule only as an imported name.
      found.update(f"{base}.{alias.name}" for alias in node.names)
    elif (
      isinstance(node, ast.Call)
      and getattr(node.func, "attr", getattr(node.func, "id", None))
      in ("import_module", "__import__")
      and node.args
      and isinstance(node.args[0], ast.Constant)
      and isinstance(node.args[0].value, str)
    ):
      found.add(node.args[0].value)
  return found


def _module_imports(path: pathlib.Path) -> set[str]:
  return _imports(path.read_text(), _module_name(path), is_package=path.name == "__init__.py")


def _within(name: str, module: str) -> bool:
  return name == module or name.startswith(module + ".")


def test_the_scan_finds_lazy_relative_and_dynamic_imports():
  source = (
    "def f():\n"
    "  from rrvf_jax import testing\n"
    "  from .. import pipeline\n"
    "  from .stage import run\n"
    "  importlib.import_module('rrvf_jax.testing.scripted')\n"
  )
  found = _imports(source, "rrvf_jax.eval.probe")
  assert {
    "rrvf_jax.testing",
    "rrvf_jax.pipeline",
    "rrvf_jax.eval.stage",
    "rrvf_jax.testing.scripted",
  } <= found


def test_production_code_does_not_import_the_test_helpers():
  testing = PACKAGE / "testing"
  offenders = {
    _module_name(path): sorted(n for n in _module_imports(path) if _within(n, "rrvf_jax.testing"))
    for path in sorted(PACKAGE.rglob("*.py"))
    if testing not in path.parents
  }
  assert len(offenders) > 50  # the scan saw the package
  assert {m: names for m, names in offenders.items() if names} == {}
