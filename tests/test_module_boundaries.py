"""Import boundaries between modules, read from the source with `ast` (imports in functions too)."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "rrvf_jax"


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(
  source: str, module: str, is_package: bool = False, *, functions_only: bool = False
) -> set[str]:
  """The modules that `module`'s source imports (`from X import name` as X.name too).

  Everywhere in the source, or with `functions_only` only in function bodies (lazy imports).
  """
  package = module if is_package else module.rpartition(".")[0]
  tree = ast.parse(source)
  roots = [tree]
  if functions_only:
    roots = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
  found = set()
  for node in (n for root in roots for n in ast.walk(root)):
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


def _module_imports(path: pathlib.Path, functions_only: bool = False) -> set[str]:
  return _imports(
    path.read_text(),
    _module_name(path),
    is_package=path.name == "__init__.py",
    functions_only=functions_only,
  )


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
  top_level = "import os\nfrom rrvf_jax import models\n"
  lazy = _imports(top_level + source, "rrvf_jax.eval.probe", functions_only=True)
  assert "rrvf_jax.pipeline" in lazy and not {"os", "rrvf_jax.models"} & lazy


def test_production_code_does_not_import_the_test_helpers():
  testing = PACKAGE / "testing"
  offenders = {
    _module_name(path): sorted(n for n in _module_imports(path) if _within(n, "rrvf_jax.testing"))
    for path in sorted(PACKAGE.rglob("*.py"))
    if testing not in path.parents
  }
  assert len(offenders) > 50  # the scan saw the package
  assert {m: names for m, names in offenders.items() if names} == {}


def test_the_eval_stage_does_not_import_the_pipeline():
  # The stage builds what it needs from rrvf_jax.components; the pipeline runs the stage.
  imported = _module_imports(PACKAGE / "eval" / "stage.py")
  assert not [n for n in imported if _within(n, "rrvf_jax.pipeline")]
  assert "rrvf_jax.components" in imported


def test_the_pipeline_imports_the_eval_stage_only_at_module_level():
  # A lazy import would only be needed to hide an import cycle between the two.
  path = PACKAGE / "pipeline.py"
  assert "rrvf_jax.eval.stage" in _module_imports(path)
  lazy = _module_imports(path, functions_only=True)
  assert not [n for n in lazy if _within(n, "rrvf_jax.eval") or _within(n, "rrvf_jax.components")]
