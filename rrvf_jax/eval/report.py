"""Evaluation outputs: results.json (per item + aggregates) and a self-contained report.html.

The HTML report has no external resources: the tables are plain HTML, the score distributions are
matplotlib PNGs and the example images are PNGs, all inlined as data URLs. It shows the aggregate
table, the per-category breakdown, per-metric histograms, and target / render / code side by side
for the best, worst and failed items.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from rrvf_jax.eval.chartmimic import aggregate_chartmimic
from rrvf_jax.eval.plot2code import aggregate_plot2code
from rrvf_jax.eval.results import ItemResult
from rrvf_jax.eval.websight import aggregate_websight

RESULTS_NAME = "results.json"
REPORT_NAME = "report.html"
AGGREGATORS = {
  "chartmimic": aggregate_chartmimic,
  "plot2code": aggregate_plot2code,
  "websight": aggregate_websight,
}
# The headline columns of each benchmark, in the order its paper tables use.
HEADLINE = {
  "chartmimic": (
    "exec_rate", "text", "layout", "type", "color", "low_level_average", "judge_score", "overall",
  ),
  "plot2code": ("exec_rate", "text", "rating", "text_pass", "rating_pass"),
  "websight": (
    "exec_rate", "visual", "block", "text", "position", "color", "clip", "design2code",
    "judge_score",
  ),
}  # fmt: skip
_IMAGE_SIDE = 480
_CODE_CHARS = 8000


def aggregate(results: Sequence[ItemResult]) -> dict[str, Any]:
  """The aggregate of one benchmark's results (ValueError for an empty or mixed list)."""
  names = sorted({r.benchmark for r in results})
  if len(names) != 1:
    raise ValueError(f"aggregate needs results of exactly one benchmark, got {names or 'none'}")
  try:
    fn = AGGREGATORS[names[0]]
  except KeyError:
    raise ValueError(f"unknown benchmark {names[0]!r}; known: {sorted(AGGREGATORS)}") from None
  return fn(results)


def _clean(value: Any) -> Any:
  """JSON-safe copy: NumPy scalars/arrays to Python, non-finite floats to None."""
  if isinstance(value, Mapping):
    return {str(k): _clean(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_clean(v) for v in value]
  if isinstance(value, np.ndarray):
    return _clean(value.tolist())
  if isinstance(value, np.generic):
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def results_document(
  results: Sequence[ItemResult],
  *,
  aggregate_: Mapping[str, Any] | None = None,
  meta: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
  """The results.json content: meta, aggregate (with per-category breakdown) and items."""
  agg = dict(aggregate_) if aggregate_ is not None else aggregate(results)
  return _clean(
    {"meta": dict(meta or {}), "aggregate": agg, "items": [r.to_json() for r in results]}
  )


def write_results_json(
  results: Sequence[ItemResult],
  path: str | Path,
  *,
  aggregate_: Mapping[str, Any] | None = None,
  meta: Mapping[str, Any] | None = None,
) -> Path:
  """Writes results.json (sorted keys, stable output for equal inputs); returns its path."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  doc = results_document(results, aggregate_=aggregate_, meta=meta)
  path.write_text(json.dumps(doc, indent=1, sort_keys=True, allow_nan=False) + "\n")
  return path


# ----------------------------------------------------------------------------- HTML


def _png_data_url(image: np.ndarray, max_side: int = _IMAGE_SIDE) -> str:
  """An RGB image as an inline PNG, downscaled to `max_side`."""
  pil = Image.fromarray(np.ascontiguousarray(image[..., :3]).astype(np.uint8))
  if max(pil.size) > max_side:
    ratio = max_side / max(pil.size)
    pil = pil.resize((max(1, round(pil.width * ratio)), max(1, round(pil.height * ratio))))
  buf = io.BytesIO()
  pil.save(buf, format="PNG")
  return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _fmt(value: Any) -> str:
  """A table cell: numbers with 2 decimals, None as '–'."""
  if value is None:
    return "–"
  if isinstance(value, bool):
    return str(value)
  if isinstance(value, (int, np.integer)):
    return str(int(value))
  if isinstance(value, (float, np.floating)):
    return f"{float(value):.2f}"
  if isinstance(value, (list, tuple)):
    return html.escape(", ".join(str(v) for v in value))
  return html.escape(str(value))


def _table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
  """An HTML table."""
  head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
  body = "".join("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in row) + "</tr>" for row in rows)
  return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _distribution_png(results: Sequence[ItemResult]) -> str | None:
  """Histograms of every numeric per-item metric, one panel each, as an inline PNG."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  names = sorted({k for r in results for k, v in r.metrics.items() if v is not None})
  if not names:
    return None
  cols = min(4, len(names))
  rows = math.ceil(len(names) / cols)
  fig = Figure(figsize=(3.2 * cols, 2.4 * rows), dpi=100)
  FigureCanvasAgg(fig)
  for k, name in enumerate(names):
    ax = fig.add_subplot(rows, cols, k + 1)
    values = [float(r.metrics[name]) for r in results if r.metrics.get(name) is not None]
    ax.hist(values, bins=20, color="#4878a8")
    ax.set_title(f"{name} (n={len(values)})", fontsize=9)
    ax.tick_params(labelsize=7)
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png")
  return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _example(r: ItemResult) -> str:
  """One item: id, status, metrics, target and render images, code and judge reply."""
  images = []
  for label, image in (("target", r.target), ("render", r.render)):
    if image is None:
      images.append(
        f"<figure><div class='missing'>no {label}</div><figcaption>{label}</figcaption></figure>"
      )
    else:
      src = _png_data_url(image)
      images.append(
        f"<figure><img alt='{label}' src='{src}'><figcaption>{label}</figcaption></figure>"
      )
  metrics = ", ".join(f"{k}={_fmt(v)}" for k, v in r.metrics.items())
  code = html.escape((r.code or "")[:_CODE_CHARS])
  judge = ""
  if r.judge is not None and r.judge.raw:
    judge = (
      f"<details><summary>judge reply</summary><pre>{html.escape(r.judge.raw)}</pre></details>"
    )
  message = f"<p class='msg'>{html.escape(r.message)}</p>" if r.message else ""
  return (
    f"<div class='item'><h3>{html.escape(r.item_id)} <small>[{html.escape(r.category or '-')}] "
    f"status={html.escape(r.status)}</small></h3>{message}<p>{metrics}</p>"
    f"<div class='row'>{''.join(images)}<pre class='code'>{code}</pre></div>{judge}</div>"
  )


def pick_examples(results: Sequence[ItemResult], n: int = 3) -> dict[str, list[ItemResult]]:
  """Best and worst executed items by their primary score, and the first failed ones."""
  ranked = sorted(
    (r for r in results if r.exec_ok and r.primary is not None),
    key=lambda r: (-float(r.primary), r.item_id),
  )
  failed = [r for r in results if not r.exec_ok][:n]
  worst = list(reversed(ranked[-n:])) if ranked else []
  return {"best": ranked[:n], "worst": worst, "failed": failed}


_STYLE = """
body{font-family:sans-serif;margin:1.5em;color:#222} table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #bbb;padding:2px 8px;text-align:right;font-size:13px} th{background:#eee}
.item{border-top:1px solid #ccc;margin-top:1em} .row{display:flex;gap:10px;align-items:flex-start}
figure{margin:0} img{max-width:480px;border:1px solid #ccc} img.dist{max-width:100%}
.missing{width:200px;height:120px;
background:#f4f4f4;display:flex;align-items:center;justify-content:center}
pre.code{max-width:600px;max-height:480px;overflow:auto;background:#f8f8f8;font-size:11px}
.msg{color:#a00;white-space:pre-wrap;font-family:monospace;font-size:12px}
"""


def report_html(
  results: Sequence[ItemResult],
  *,
  aggregate_: Mapping[str, Any] | None = None,
  title: str | None = None,
  n_examples: int = 3,
) -> str:
  """The report as one self-contained HTML string."""
  agg = dict(aggregate_) if aggregate_ is not None else aggregate(results)
  name = str(agg.get("benchmark", "benchmark"))
  title = title or f"{name} evaluation"
  parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"]
  parts.append(f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>")
  headline = [k for k in HEADLINE.get(name, ()) if k in agg]
  others = [k for k, v in agg.items() if k not in headline and not isinstance(v, (dict, list))]
  parts.append("<h2>Aggregate</h2>")
  parts.append(_table([[k, agg[k]] for k in headline + others], ["metric", "value"]))
  for key in ("judge_models", "deviations"):
    if agg.get(key):
      items = "".join(f"<li>{html.escape(str(v))}</li>" for v in agg[key])
      parts.append(f"<h3>{html.escape(key)}</h3><ul>{items}</ul>")
  cats = agg.get("by_category") or {}
  if cats:
    cols = ["n_items", *headline]
    rows = [[c, *(cats[c].get(k) for k in cols)] for c in cats]
    parts.append("<h2>By category</h2>" + _table(rows, ["category", *cols]))
  plot = _distribution_png(results)
  if plot:
    parts.append(f"<h2>Score distributions</h2><img class='dist' alt='distributions' src='{plot}'>")
  for label, chosen in pick_examples(results, n_examples).items():
    parts.append(f"<h2>{label.capitalize()} items</h2>")
    parts.append("".join(_example(r) for r in chosen) or "<p>none</p>")
  parts.append("</body></html>")
  return "".join(parts)


def write_report_html(
  results: Sequence[ItemResult],
  path: str | Path,
  *,
  aggregate_: Mapping[str, Any] | None = None,
  title: str | None = None,
  n_examples: int = 3,
) -> Path:
  """Writes report.html; returns its path."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  text = report_html(results, aggregate_=aggregate_, title=title, n_examples=n_examples)
  path.write_text(text, encoding="utf-8")
  return path


def write_report(
  results: Sequence[ItemResult],
  out_dir: str | Path,
  *,
  meta: Mapping[str, Any] | None = None,
  title: str | None = None,
  n_examples: int = 3,
) -> tuple[Path, Path]:
  """Aggregates once and writes results.json and report.html into `out_dir`."""
  out_dir = Path(out_dir)
  agg = aggregate(results)
  json_path = write_results_json(results, out_dir / RESULTS_NAME, aggregate_=agg, meta=meta)
  html_path = write_report_html(
    results, out_dir / REPORT_NAME, aggregate_=agg, title=title, n_examples=n_examples
  )
  return json_path, html_path
