"""The quick-start notebook: stored clean, and runs top to bottom with the outputs it promises."""

import json
import os
import pathlib
import re
import sys

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"
KERNEL = "rrvf-quickstart-test"


def _kernel_env(workdir: pathlib.Path) -> dict[str, str]:
  """The kernel's environment: one CPU device (as the README demo), offline, the demo workdir."""
  env = dict(os.environ)
  env.pop("MPLBACKEND", None)  # the notebook's inline backend must draw its figures
  env.update(
    {
      "JAX_PLATFORMS": "cpu",
      "XLA_FLAGS": "",  # not conftest's 8 fake devices: the demo config runs on one
      "HF_HUB_OFFLINE": "1",
      "RRVF_DEMO_WORKDIR": str(workdir),
      "PYDEVD_DISABLE_FILE_VALIDATION": "1",
    }
  )
  return env


def _install_kernel(path: pathlib.Path) -> pathlib.Path:
  """A kernelspec running this interpreter, so no other installed 'python3' kernel is picked."""
  spec_dir = path / "kernels" / KERNEL
  spec_dir.mkdir(parents=True)
  spec = {
    "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
    "display_name": "rrvf_jax test kernel",
    "language": "python",
  }
  (spec_dir / "kernel.json").write_text(json.dumps(spec))
  return path


def _cell(nb, cell_id: str):
  matches = [c for c in nb.cells if c.get("id") == cell_id]
  assert len(matches) == 1, f"notebook has no single cell with id {cell_id!r}"
  return matches[0]


def _text(cell) -> str:
  """Everything the cell printed (streams and text results)."""
  parts = []
  for out in cell.outputs:
    if out.output_type == "stream" and out.name == "stdout":
      parts.append(out.text)
    elif out.output_type in ("execute_result", "display_data"):
      parts.append(out.data.get("text/plain", ""))
  return "".join(parts)


def _pngs(cell) -> int:
  return sum(
    "image/png" in out.get("data", {})
    for out in cell.outputs
    if out.output_type in ("display_data", "execute_result")
  )


def test_notebook_is_stored_valid_and_without_outputs():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  assert nb.nbformat == 4
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert code, "the notebook has no code cells"
  for cell in code:
    assert cell.outputs == [], f"cell {cell.get('id')} is stored with outputs"
    assert cell.execution_count is None, f"cell {cell.get('id')} is stored with a count"
  for cell in nb.cells:
    assert "execution" not in cell.metadata, f"cell {cell.get('id')} is stored with timings"
  assert sum(c.cell_type == "markdown" for c in nb.cells) >= len(code) // 2


@pytest.fixture(scope="module")
def jupyter_path(tmp_path_factory):
  """JUPYTER_PATH holding the test kernelspec, set for the module's tests."""
  path = _install_kernel(tmp_path_factory.mktemp("jupyter"))
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("JUPYTER_PATH", str(path))
    yield path


def _execute(nb, workdir: pathlib.Path) -> None:
  """Runs the notebook's cells in a fresh kernel at the repository root; raises if a cell does."""
  client = NotebookClient(
    nb, timeout=300, kernel_name=KERNEL, resources={"metadata": {"path": str(ROOT)}}
  )
  client.execute(env=_kernel_env(workdir))  # CellExecutionError names the failing cell


@pytest.fixture(scope="module")
def executed(jupyter_path, tmp_path_factory):
  """The notebook run top to bottom; (notebook, demo workdir)."""
  workdir = tmp_path_factory.mktemp("demo_workdir")
  nb = nbformat.read(NOTEBOOK, as_version=4)
  _execute(nb, workdir)
  return nb, workdir


def test_every_cell_ran_without_errors(executed):
  nb, _ = executed
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert cell.execution_count is not None, f"cell {cell.get('id')} did not run"
      assert not [o for o in cell.outputs if o.output_type == "error"]


def test_builds_the_tiny_model_on_cpu(executed):
  nb, _ = executed
  assert "on [CpuDevice(id=0)]" in _text(_cell(nb, "imports"))
  text = _text(_cell(nb, "build-model"))
  match = re.search(
    r"model: 2 text layers of width \d+, \d+ vision layers, ([\d,]+) parameters", text
  )
  assert match, text
  assert int(match.group(1).replace(",", "")) > 100_000


def test_shows_the_target(executed):
  nb, _ = executed
  cell = _cell(nb, "target")
  assert "plt.bar(" in _text(cell)
  assert _pngs(cell) == 1


def test_random_policy_episode_prints_two_rewarded_episodes(executed):
  nb, _ = executed
  text = _text(_cell(nb, "random-episode"))
  assert "=== episode 0:" in text and "=== episode 1:" in text
  assert "=== episode 2:" not in text
  assert len(re.findall(r"^  reward [+-]\d\.\d{3} = 1\.0 x R_vision", text, re.M)) == 2


def test_scripted_episode_shows_tool_call_feedback_error_and_reward(executed):
  nb, _ = executed
  text = _text(_cell(nb, "scripted-episode"))
  episodes = text.split("=== episode ")[1:]
  assert len(episodes) == 2, text
  good, bad = episodes
  assert good.startswith("0: 2 turn(s), ended by 'answer'")
  assert "turn 0 [tool_call]" in good and "turn 1 [answer]" in good
  feedback = r"tool: render ok; the render goes back with the judge's feedback \(score 0\.\d\d\):"
  assert re.search(feedback + r"\n      \S", good), good
  assert "no response appended" not in text  # the whole loop fits the episodes' token budget
  # The exact code renders the target itself: R_vision 1 and the tool bonus.
  assert "reward +1.200 = 1.0 x R_vision 1.000 + 0.2 x R_format +0 + 0.2 x R_tool 1" in good
  assert "tool: render runtime_error, the policy is told: NameError" in bad
  match = re.search(
    r"reward \+(\d\.\d{3}) = 1\.0 x R_vision \1 \+ 0\.2 x R_format \+0 \+ 0\.2 x R_tool 0", bad
  )
  assert match and 0.0 < float(match.group(1)) < 1.0, bad
  # Target, tool render and final render for each row; the failed call has no image.
  images = _cell(nb, "scripted-images")
  assert _pngs(images) == 2


def test_plots_the_short_demo_run(executed):
  nb, workdir = executed
  assert f"no metrics in {workdir}: a short demo run into {workdir / 'notebook_run'}" in _text(
    _cell(nb, "run-demo")
  )
  for stage in ("sft", "grpo"):
    assert (workdir / "notebook_run" / stage / "metrics.jsonl").is_file()
  assert not (workdir / "sft").exists()  # the README demo's stage directories stay untouched
  plot = _cell(nb, "plot-metrics")
  text = _text(plot)
  assert re.search(r"^sft/loss: 8 logged steps, first \d+\.\d{3}, last \d+\.\d{3}$", text, re.M)
  assert re.search(r"^grpo/reward: 2 logged steps", text, re.M)
  assert re.search(r"^grpo/exec_rate: 2 logged steps", text, re.M)
  assert _pngs(plot) == 1


def test_plots_an_existing_demo_run_without_running_one(jupyter_path, tmp_path):
  # A workdir the README's demo wrote: its metrics are plotted as they are.
  for stage, records in {
    "sft": [{"step": s, "sft/loss": 3.0 - 0.1 * s} for s in (10, 20, 30)],
    "grpo": [{"step": s, "grpo/reward": 0.25 * s, "grpo/exec_rate": 0.5} for s in (1, 2, 3, 4)],
  }.items():
    (tmp_path / stage).mkdir()
    lines = [json.dumps(r) + "\n" for r in records]
    (tmp_path / stage / "metrics.jsonl").write_text("".join(lines))
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nb.cells = [
    c for c in nb.cells if c.get("id") in ("setup", "imports", "run-demo", "plot-metrics")
  ]
  assert len(nb.cells) == 4
  _execute(nb, tmp_path)
  assert _text(_cell(nb, "run-demo")) == ""
  assert not (tmp_path / "notebook_run").exists()
  text = _text(_cell(nb, "plot-metrics"))
  assert "sft/loss: 3 logged steps, first 2.000, last 0.000" in text
  assert "grpo/reward: 4 logged steps, first 0.250, last 1.000" in text
  assert "grpo/exec_rate: 4 logged steps, first 0.500, last 0.500" in text
