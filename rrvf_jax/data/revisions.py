"""Self-correction trajectories for the cold start: drafts with known defects, fixed round by round.

A trajectory shows the RRVF loop the policy should learn: look at the target and think, call the
render tool with a draft, read the render and the judge's comments, name the difference in
`<think>`, fix it, and answer. A draft is the target program with visual defects written in (a
colour, the chart or element type, a title, labels, data values, a missing element, the layout);
each feedback round fixes one, so the last draft's fix is the target program itself. Chart drafts
may also fail to run (an unclosed bracket, a misspelled call, an undefined name): the tool response
then carries the real error text and no image, as in a policy's own episodes, where it is by far
the commonest outcome of a weak policy's draft.

`plan_drafts` picks the defects (pure Python, deterministic given the RNG); the dataset builders
render and judge the drafts and `conversation` writes the turns, with the judge's real comments and
the real renders in the tool responses.

Teaching the loop without teaching the defects: a loss on a deliberately wrong draft would train
the policy to write wrong drafts. `conversation` marks the characters where a draft differs from
the program it should have been (the target), and the character right after each deletion, as
`loss: False` content: only the right parts of a draft, the reasoning and the final answer are
learned (`processing.chat` masks every token that touches such a character).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import random
import re
from collections.abc import Callable, Sequence
from typing import Any

from rrvf_jax.data import chart_gen, web_gen
from rrvf_jax.processing import chat

CHART_DEFECTS = ("color", "chart_type", "title", "labels", "data", "missing", "layout", "error")
WEB_DEFECTS = ("color", "text", "element", "layout", "missing")
# Share of examples with 0, 1 and 2 feedback rounds; and of 1-round drafts that are already right
# (the render confirms them, the answer repeats them: the loop is not only for fixing).
ROUND_WEIGHTS = (0.2, 0.5, 0.3)
CORRECT_DRAFT_SHARE = 0.4
# Chance that a draft's defect is a code error (if the program allows one), else a visual one.
ERROR_SHARE = 0.3


@dataclasses.dataclass(frozen=True)
class Defect:
  """One visual defect written into a program.

  Attributes:
    kind: one of CHART_DEFECTS / WEB_DEFECTS.
    code: the program with the defect.
    seen: what the render shows against the target, for the `<think>` that names it ('error':
      a template whose `{error}` is the render's error, filled in once it has run).
  """

  kind: str
  code: str
  seen: str


@dataclasses.dataclass(frozen=True)
class Draft:
  """A program sent to the render tool, and the defect it has (None: it is the target)."""

  code: str
  defect: Defect | None


# ---------------------------------------------------------------------------------------- helpers

_Edit = Callable[[str, random.Random], Defect | None]


def _replace_at(code: str, match: re.Match, group: int, new: str) -> str:
  """`code` with one regex group replaced."""
  return code[: match.start(group)] + new + code[match.end(group) :]


def _other(rng: random.Random, pool: Sequence[str], old: str) -> str:
  """A pool entry different from `old`."""
  return rng.choice([p for p in pool if p != old])


def _pick(rng: random.Random, matches: list[re.Match]) -> re.Match | None:
  """One match, or None."""
  return rng.choice(matches) if matches else None


def _edit_string(
  code: str,
  rng: random.Random,
  pattern: re.Pattern,
  pool: Sequence[str],
  kind: str,
  seen: str,
) -> Defect | None:
  """Replaces the quoted string of one `pattern` match (group 1) by another from `pool`."""
  match = _pick(rng, list(pattern.finditer(code)))
  if match is None:
    return None
  old = match.group(1)
  new = _other(rng, pool, old)
  draft = _replace_at(code, match, 1, new)
  return Defect(kind, draft, seen.format(new=new, old=old))


# ----------------------------------------------------------------------------------------- charts

_CHART_COLORS = tuple(dict.fromkeys(chart_gen.SIMPLE_COLORS + chart_gen.FULL_COLORS))
_COLOR_RE = re.compile("'(" + "|".join(re.escape(c) for c in _CHART_COLORS) + ")'")
_TITLE_RE = re.compile(r"(?:plt\.title|ax\.set_title|fig\.suptitle)\('([^'\n]*)'\)")
_AXIS_LABEL_RE = re.compile(r"(?:plt|ax)\.(?:set_)?[xy]label\('([^'\n]*)'\)")
_CATEGORIES_RE = re.compile(r"\[('[^'\n]*'(?:, ?'[^'\n]*')+)\]")
_NUMBERS_RE = re.compile(r"\[(\d+(?:\.\d+)?(?:, ?\d+(?:\.\d+)?){2,})\]")
# Plotting calls that take (x, y, ...) alike, and what each is called in words.
_SWAPPABLE_RE = re.compile(r"\b(plt|ax)\.(bar|plot|scatter)\(")
_KIND_WORDS = {"bar": "bar", "barh": "horizontal bar", "plot": "line", "scatter": "scatter"}
_ORIENT_RE = re.compile(r"\b(plt|ax)\.(barh?)\(")
_GRID_RE = re.compile(r"plt\.subplots\((\d), (\d)")
_LOC_RE = re.compile(r"loc='([a-z ]+)'")
# Lines a chart can lose without the program breaking, and what they draw.
_REMOVABLE_LINES = (
  (re.compile(r"^(?:plt|ax)\.legend\("), "legend"),
  (re.compile(r"^ax\.grid\("), "grid"),
  (re.compile(r"^fig\.colorbar\("), "colour bar"),
  (re.compile(r"^fig\.suptitle\("), "figure title"),
  (re.compile(r"^ax\.bar_label\("), "bar labels"),
  (re.compile(r"^(?:plt\.title|ax\.set_title)\("), "title"),
  (re.compile(r"^ax\.set_xlabel\("), "x-axis label"),
  (re.compile(r"^ax\.set_ylabel\("), "y-axis label"),
)


def _chart_color(code: str, rng: random.Random) -> Defect | None:
  """One colour literal changed."""
  return _edit_string(
    code,
    rng,
    _COLOR_RE,
    _CHART_COLORS,
    "color",
    "my render uses the colour {new} where the target uses {old}",
  )


def _chart_title(code: str, rng: random.Random) -> Defect | None:
  """One title's text changed."""
  return _edit_string(
    code,
    rng,
    _TITLE_RE,
    chart_gen.TITLES,
    "title",
    "my render's title is '{new}' where the target's is '{old}'",
  )


def _chart_labels(code: str, rng: random.Random) -> Defect | None:
  """An axis label, or a list of category labels, changed."""
  axis = list(_AXIS_LABEL_RE.finditer(code))
  cats = list(_CATEGORIES_RE.finditer(code))
  if axis and (not cats or rng.random() < 0.5):
    return _edit_string(
      code,
      rng,
      _AXIS_LABEL_RE,
      chart_gen.AXIS_LABELS,
      "labels",
      "my render's axis label is '{new}' where the target's is '{old}'",
    )
  match = _pick(rng, cats)
  if match is None:
    return None
  old = [s.strip()[1:-1] for s in match.group(1).split(",")]
  sets = [s for s in chart_gen.CATEGORY_SETS if len(s) >= len(old) and list(s[: len(old)]) != old]
  new = list(rng.choice(sets)[: len(old)])
  sep = ", " if ", " in match.group(1) else ","
  draft = _replace_at(code, match, 1, sep.join(repr(s) for s in new))
  seen = f"my render's labels are {', '.join(new)} where the target's are {', '.join(old)}"
  return Defect("labels", draft, seen)


def _chart_data(code: str, rng: random.Random) -> Defect | None:
  """One value of a literal data list changed."""
  match = _pick(rng, list(_NUMBERS_RE.finditer(code)))
  if match is None:
    return None
  sep = ", " if ", " in match.group(1) else ","
  values = [v.strip() for v in match.group(1).split(",")]
  i = rng.randrange(len(values))
  old = values[i]
  number = float(old)
  # A visible change: doubled or halved (never the same printed value).
  changed = number * 2 if number < 5 or rng.random() < 0.5 else number / 2
  new = str(int(changed)) if "." not in old and changed == int(changed) else f"{changed:.1f}"
  if new == old:
    return None
  values[i] = new
  draft = _replace_at(code, match, 1, sep.join(values))
  seen = f"my render shows the value {new} where the target shows {old}"
  return Defect("data", draft, seen)


def _chart_type(code: str, rng: random.Random) -> Defect | None:
  """A bar, line or scatter call drawn as another of the three."""
  match = _pick(rng, list(_SWAPPABLE_RE.finditer(code)))
  if match is None:
    return None
  old = match.group(2)
  new = _other(rng, ("bar", "plot", "scatter"), old)
  draft = _replace_at(code, match, 2, new)
  seen = (
    f"my render draws a {_KIND_WORDS[new]} chart where the target has a {_KIND_WORDS[old]} chart"
  )
  return Defect("chart_type", draft, seen)


def _chart_layout(code: str, rng: random.Random) -> Defect | None:
  """Subplots arranged the other way, bars turned, or a legend moved."""
  options: list[Defect] = []
  grid = _GRID_RE.search(code)
  if grid and grid.group(1) != grid.group(2):
    rows, cols = grid.group(1), grid.group(2)
    draft = code[: grid.start(1)] + f"{cols}, {rows}" + code[grid.end(2) :]
    seen = (
      f"my render arranges the subplots in {cols} rows and {rows} columns where the target has "
      f"{rows} rows and {cols} columns"
    )
    options.append(Defect("layout", draft, seen))
  orient = _ORIENT_RE.search(code)
  if orient:
    old = orient.group(2)
    new = "bar" if old == "barh" else "barh"
    draft = _replace_at(code, orient, 2, new)
    seen = f"my render's bars are {_orientation(new)} where the target's are {_orientation(old)}"
    options.append(Defect("layout", draft, seen))
  loc = _LOC_RE.search(code)
  if loc:
    new = _other(rng, chart_gen.LEGEND_LOCS, loc.group(1))
    draft = _replace_at(code, loc, 1, new)
    seen = f"my render's legend is at the {new} where the target's is at the {loc.group(1)}"
    options.append(Defect("layout", draft, seen))
  return rng.choice(options) if options else None


def _orientation(fn: str) -> str:
  return "horizontal" if fn == "barh" else "vertical"


def _chart_missing(code: str, rng: random.Random) -> Defect | None:
  """A line that draws a visible element removed."""
  lines = code.split("\n")
  found = [
    (i, what)
    for i, line in enumerate(lines)
    for pattern, what in _REMOVABLE_LINES
    if pattern.match(line)
  ]
  if not found:
    return None
  i, what = rng.choice(found)
  draft = "\n".join(lines[:i] + lines[i + 1 :])
  return Defect("missing", draft, f"my render has no {what} where the target has one")


_CLOSING_RE = re.compile(r"\]")
_CALL_RE = re.compile(r"\b(?:plt|ax)\.([a-z_]+)\(")
_COLOR_VALUE_RE = re.compile(r"color='([a-z]+):([a-z]+)'")


def _chart_error(code: str, rng: random.Random) -> Defect | None:
  """A program that does not run: an unclosed bracket, a misspelled call, an undefined name."""
  options = []
  bracket = _pick(rng, list(_CLOSING_RE.finditer(code)))
  if bracket:
    options.append(code[: bracket.start()] + code[bracket.end() :])
  call = _pick(rng, list(_CALL_RE.finditer(code)))
  if call:
    options.append(_replace_at(code, call, 1, call.group(1) + "s"))
  color = _COLOR_VALUE_RE.search(code)
  if color:
    options.append(code[: color.start()] + f"color={color.group(2)}" + code[color.end() :])
  if not options:
    return None
  return Defect("error", rng.choice(options), "the code failed with {error}")


_CHART_EDITS: dict[str, _Edit] = {
  "color": _chart_color,
  "chart_type": _chart_type,
  "title": _chart_title,
  "labels": _chart_labels,
  "data": _chart_data,
  "missing": _chart_missing,
  "layout": _chart_layout,
  "error": _chart_error,
}

# -------------------------------------------------------------------------------------------- web

_WEB_COLORS = tuple(
  dict.fromkeys(
    web_gen.SIMPLE_COLORS
    + web_gen.SIMPLE_BACKGROUNDS
    + tuple(c for palette in web_gen.PALETTES for c in palette)
  )
)
_WEB_COLOR_RE = re.compile(
  r"(?<=[:\s])(" + "|".join(re.escape(c) for c in sorted(_WEB_COLORS, key=len, reverse=True)) + r")"
  r"(?=[;\s\"}])"
)
_TEXT_RE = re.compile(r">([A-Z][^<>\n]{2,80})<")
_HEADING_RE = re.compile(r"<(/?)h([1-5])\b")
_LIST_RE = re.compile(r"<(/?)(ul|ol)\b")
_PADDING_RE = re.compile(r"padding: ?(\d+)px")
_ALIGN_RE = re.compile(r"text-align: ?(center|left|right)")
_COLUMNS_RE = re.compile(r"repeat\((\d), 1fr\)")
_REMOVABLE_ELEMENTS = re.compile(r"<(button|li|p|a|h[1-5])\b[^>]*>[^<]*</\1>")
_WEB_TEXTS = (
  web_gen.SHORT_HEADINGS
  + web_gen.SENTENCES
  + web_gen.HEADLINES
  + web_gen.BUTTONS
  + web_gen.CARD_TITLES
  + web_gen.LIST_ITEMS
)
_ELEMENT_WORDS = {"button": "button", "li": "list item", "p": "paragraph", "a": "link"}


def _web_color(code: str, rng: random.Random) -> Defect | None:
  """One CSS colour changed."""
  return _edit_string(
    code,
    rng,
    _WEB_COLOR_RE,
    _WEB_COLORS,
    "color",
    "my render uses the colour {new} where the target uses {old}",
  )


def _web_text(code: str, rng: random.Random) -> Defect | None:
  """One text run changed."""
  return _edit_string(
    code, rng, _TEXT_RE, _WEB_TEXTS, "text", "my render says '{new}' where the target says '{old}'"
  )


def _web_element(code: str, rng: random.Random) -> Defect | None:
  """A heading of another level, or a list of the other kind (both tags of the pair)."""
  headings = list(_HEADING_RE.finditer(code))
  lists = list(_LIST_RE.finditer(code))
  if headings and (not lists or rng.random() < 0.5):
    opening = [m for m in headings if not m.group(1)]
    first = rng.choice(opening)
    level = int(first.group(2))
    new = level + 1 if level < 4 else level - 1
    close = next(m for m in headings if m.group(1) and m.start() > first.start())
    draft = (
      code[: first.start(2)]
      + str(new)
      + code[first.end(2) : close.start(2)]
      + str(new)
      + code[close.end(2) :]
    )
    seen = f"my render uses a level-{new} heading where the target uses level {level}"
    return Defect("element", draft, seen)
  if not lists:
    return None
  first = next(m for m in lists if not m.group(1))
  old = first.group(2)
  new = "ol" if old == "ul" else "ul"
  close = next(m for m in lists if m.group(1) and m.start() > first.start())
  draft = (
    code[: first.start(2)] + new + code[first.end(2) : close.start(2)] + new + code[close.end(2) :]
  )
  words = {"ul": "bulleted", "ol": "numbered"}
  seen = f"my render's list is {words[new]} where the target's is {words[old]}"
  return Defect("element", draft, seen)


def _web_layout(code: str, rng: random.Random) -> Defect | None:
  """Padding, text alignment or grid columns changed."""
  options: list[Defect] = []
  pad = _pick(rng, list(_PADDING_RE.finditer(code)))
  if pad:
    old = int(pad.group(1))
    new = old * 3 if old <= 16 else max(2, old // 3)
    draft = _replace_at(code, pad, 1, str(new))
    seen = f"my render has {new}px of padding where the target has {old}px"
    options.append(Defect("layout", draft, seen))
  align = _pick(rng, list(_ALIGN_RE.finditer(code)))
  if align:
    new = _other(rng, ("center", "left", "right"), align.group(1))
    draft = _replace_at(code, align, 1, new)
    seen = f"my render aligns the text {new} where the target aligns it {align.group(1)}"
    options.append(Defect("layout", draft, seen))
  cols = _pick(rng, list(_COLUMNS_RE.finditer(code)))
  if cols:
    old = cols.group(1)
    new = _other(rng, ("1", "2", "3", "4"), old)
    draft = _replace_at(code, cols, 1, new)
    seen = f"my render's grid has {new} columns where the target's has {old}"
    options.append(Defect("layout", draft, seen))
  return rng.choice(options) if options else None


def _web_missing(code: str, rng: random.Random) -> Defect | None:
  """One small element removed."""
  match = _pick(rng, list(_REMOVABLE_ELEMENTS.finditer(code)))
  if match is None:
    return None
  tag = match.group(1)
  what = _ELEMENT_WORDS.get(tag, "heading")
  draft = code[: match.start()] + code[match.end() :]
  return Defect("missing", draft, f"my render lacks the {what} the target has")


_WEB_EDITS: dict[str, _Edit] = {
  "color": _web_color,
  "text": _web_text,
  "element": _web_element,
  "layout": _web_layout,
  "missing": _web_missing,
}
EDITS = {"chart": _CHART_EDITS, "web": _WEB_EDITS}


# ------------------------------------------------------------------------------------------- plans


def make_defect(
  code: str, task: str, rng: random.Random, exclude: Sequence[str] = ()
) -> Defect | None:
  """A defect of a random applicable kind (not in `exclude`) written into `code`, or None.

  A code error comes first with probability ERROR_SHARE; visual kinds are tried in random order.
  """
  kinds = [k for k in EDITS[task] if k not in exclude and k != "error"]
  rng.shuffle(kinds)
  if "error" in EDITS[task] and "error" not in exclude:
    kinds.insert(0 if rng.random() < ERROR_SHARE else len(kinds), "error")
  for kind in kinds:
    defect = EDITS[task][kind](code, rng)
    if defect is not None and defect.code != code:
      return defect
  return None


def draw_rounds(rng: random.Random) -> int:
  """How many feedback rounds an example shows (0, 1 or 2; ROUND_WEIGHTS)."""
  return rng.choices((0, 1, 2), weights=ROUND_WEIGHTS)[0]


def plan_drafts(code: str, task: str, rng: random.Random, rounds: int) -> list[Draft]:
  """The drafts of a `rounds`-round trajectory for target `code` (the answer is `code` itself).

  Draft i carries defects i..rounds-1 and round i fixes defect i. A 1-round trajectory's draft is
  sometimes already right (`CORRECT_DRAFT_SHARE`). Fewer drafts come back when the program has
  too few applicable defects.
  """
  if task not in EDITS:
    raise ValueError(f"unknown task {task!r}; expected one of {sorted(EDITS)}")
  if rounds == 0:
    return []
  if rounds == 1 and rng.random() < CORRECT_DRAFT_SHARE:
    return [Draft(code, None)]
  # Built backwards from the target: the last round's defect first. Defects never touch the same
  # text, so each round's fix restores exactly what its thought names.
  drafts: list[Draft] = []
  current, kinds, taken = code, [], []
  for _ in range(rounds):
    defect = make_defect(current, task, rng, exclude=kinds)
    if defect is None:
      break
    start, end, out_start, out_end = _changed(current, defect.code)
    if any(start <= e and s <= end for s, e in taken):
      break
    shift = len(defect.code) - len(current)
    taken = [(s, e) if e < start else (s + shift, e + shift) for s, e in taken]
    taken.append((out_start, out_end))
    drafts.insert(0, Draft(defect.code, defect))
    kinds.append(defect.kind)
    current = defect.code
  return drafts


def _changed(a: str, b: str) -> tuple[int, int, int, int]:
  """Where two texts differ: `[start, end)` in `a`, then in `b` (one region over all edits)."""
  ops = difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes()
  edits = [op for op in ops if op[0] != "equal"]
  return edits[0][1], edits[-1][2], edits[0][3], edits[-1][4]


# ------------------------------------------------------------------------------------ conversation


def untrained_spans(draft: str, target: str) -> list[tuple[int, int]]:
  """Character spans of `draft` not to learn from: where it differs from `target`.

  Differences a few characters apart are one span, and spans grow to whole words (a word half
  learned would teach its wrong half). A deletion (target text missing from the draft) marks the
  draft character right after it: the token written there is the one that skipped the text.
  """
  matcher = difflib.SequenceMatcher(None, draft, target, autojunk=False)
  raw = []
  for tag, i1, i2, _, _ in matcher.get_opcodes():
    if tag != "equal":
      raw.append((i1, i2 if i2 > i1 else min(i1 + 1, len(draft))))
  spans: list[tuple[int, int]] = []
  for start, end in raw:
    while start > 0 and _WORD.match(draft[start - 1]):
      start -= 1
    while end < len(draft) and _WORD.match(draft[end]):
      end += 1
    if spans and start - spans[-1][1] < _MERGE_GAP:
      spans[-1] = (spans[-1][0], max(end, spans[-1][1]))
    elif end > start:
      spans.append((start, end))
  return spans


_WORD = re.compile(r"\w")
_MERGE_GAP = 4  # differences closer than this many characters are one untrained span


def _items(text: str, spans: Sequence[tuple[int, int]]) -> list[dict[str, Any]]:
  """Text content items of `text`, with `loss: False` on the given character spans."""
  items, at = [], 0
  for start, end in spans:
    if start > at:
      items.append({"type": "text", "text": text[at:start]})
    items.append({"type": "text", "text": text[start:end], "loss": False})
    at = end
  if at < len(text):
    items.append({"type": "text", "text": text[at:]})
  return items


def _dump(value: str) -> str:
  """`value` as a JSON string, as `chat.format_tool_call` writes it."""
  return json.dumps(value, ensure_ascii=False)


def draft_message(think: str, tool_name: str, draft: str, target: str) -> dict[str, Any]:
  """An assistant turn calling the render tool on `draft` (its defects, untrained)."""
  head = f"<think>{think}</think>\n"
  call = chat.format_tool_call(tool_name, {"code": draft})
  if draft == target:
    return {"role": "assistant", "content": head + call}
  # The programs as the JSON strings written in the call: the spans are in the escaped text.
  start = len(head) + call.index(_dump(draft))
  spans = [(start + s, start + e) for s, e in untrained_spans(_dump(draft), _dump(target))]
  return {"role": "assistant", "content": _items(head + call, spans)}


def answer_message(think: str, code: str) -> dict[str, Any]:
  """The final assistant turn: a thought and the code in `<answer>`."""
  body = code.strip("\n")
  return {"role": "assistant", "content": f"<think>{think}</think>\n<answer>\n{body}\n</answer>"}


def first_thought(description: str, rounds: int) -> str:
  """The first turn's reasoning: what the target shows, and the plan."""
  plan = " I will render a draft to compare." if rounds else ""
  return f"The target is {description}.{plan}"


def fix_thought(defect: Defect | None, error: str = "") -> str:
  """The reasoning after a render: the difference seen (or the error) and the fix, or a match."""
  if defect is None:
    return "The render matches the target."
  if defect.kind == "error":
    return f"The code failed with {error or 'an error'}. I will fix it."
  return f"The render differs: {defect.seen}. I will fix it."


def error_name(message: str) -> str:
  """The last line of an error message (`NameError: name 'x' is not defined`), shortened."""
  lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
  last = lines[-1] if lines else "an error"
  return last if len(last) <= 80 else last[:77] + "..."


def conversation(
  target_code: str,
  drafts: Sequence[Draft],
  tool_messages: Sequence[dict[str, Any]],
  *,
  tool_name: str,
  description: str,
  errors: Sequence[str] = (),
) -> list[dict[str, Any]]:
  """The assistant and tool turns after the prompt: each draft, its tool response, the answer.

  `tool_messages[i]` is the tool response to draft i (`env.make_tool_response(...).to_message()`:
  the render's image item and the judge's comments, or the error text); `errors[i]` names draft
  i's error when it did not run.
  """
  if len(tool_messages) != len(drafts):
    raise ValueError(f"{len(drafts)} drafts but {len(tool_messages)} tool responses")
  errors = list(errors) + [""] * (len(drafts) - len(errors))
  messages: list[dict[str, Any]] = []
  think = first_thought(description, len(drafts))
  for draft, response, error in zip(drafts, tool_messages, errors, strict=True):
    messages.append(draft_message(think, tool_name, draft.code, target_code))
    messages.append(response)
    think = fix_thought(draft.defect, error)
  messages.append(answer_message(think, target_code))
  return messages


# ------------------------------------------------------------------------------- rendered examples

_CHART_WORDS = {
  "bar": "a bar chart",
  "grouped_bar": "a grouped bar chart",
  "line": "a line chart",
  "scatter": "a scatter plot",
  "pie": "a pie chart",
  "histogram": "a histogram",
  "area": "an area chart",
}
_PAGE_WORDS = {
  "heading": "a page with a heading and a line of text",
  "button": "a page with a heading and a button",
  "list": "a page with a heading and a list",
  "box": "a page with a coloured box of text",
}
RETRIES = 3  # new plans drawn for an example whose drafts do not render or do not differ


def describe_chart(chart_type: str, num_subplots: int) -> str:
  """What a synthetic chart shows, in a few words ('a bar chart', '2 subplots: ...')."""
  kinds = [_CHART_WORDS.get(k, f"a {k} chart") for k in chart_type.split("+")]
  if num_subplots <= 1:
    return kinds[0]
  return f"a figure of {num_subplots} subplots: " + ", ".join(kinds)


def describe_page(page_type: str) -> str:
  """What a synthetic page shows, in a few words."""
  return _PAGE_WORDS.get(page_type, f"a {page_type} page")


@dataclasses.dataclass(frozen=True)
class Example:
  """A target for which to write a trajectory: id, program, words for it, its rendered image."""

  id: str
  code: str
  description: str
  image: Any  # uint8 HxWx3


@dataclasses.dataclass(frozen=True)
class Written:
  """An example's trajectory: the turns after the prompt and the PNG of each render shown."""

  conversation: list[dict[str, Any]]
  images: list[bytes]


def _rng(seed: str, example_id: str, attempt: int) -> random.Random:
  return random.Random(f"{seed}:revisions:{example_id}:{attempt}")


def _plan(example: Example, task: str, seed: str, attempt: int) -> list[Draft]:
  rng = _rng(seed, example.id, attempt)
  return plan_drafts(example.code, task, rng, draw_rounds(_rng(seed, example.id, 0)))


def _usable(drafts: Sequence[Draft], renders: Sequence[Any], target: Any) -> bool:
  """Each defect shows: a code error fails to run; any other draft renders, and differently
  from the next state (a draft with an error before it is compared with the target)."""
  import numpy as np  # only the builders call this

  following = [r.image for r in renders[1:]] + [target]
  for draft, render, nxt in zip(drafts, renders, following, strict=True):
    failing = draft.defect is not None and draft.defect.kind == "error"
    if failing != (not render.ok):
      return False
    if failing:
      continue
    if render.image is None or nxt is None:
      return False
    if draft.defect is not None and np.array_equal(render.image, nxt):
      return False
  return True


def write_trajectories(
  examples: Sequence[Example],
  *,
  task: str,
  render: Callable[[list[str]], list[Any]],
  judge: Any,
  seed: str,
) -> list[Written]:
  """A self-correction trajectory per example, with real renders and the judge's comments.

  `render(codes)` returns `env.RenderResult`s; `judge` is an `env.Judge` (feedback mode). A plan
  is kept when every defect shows: a code error fails to run, a visual defect renders differently
  from the state it is fixed into, and the judge's comments on it are not the ones it writes for
  a render equal to the target (so comments that say the render matches always mean the answer
  repeats the draft). Otherwise the example gets a new plan, up to `RETRIES` times, then none (an
  answer-only trajectory). Deterministic given `seed` and the example ids.
  """
  from rrvf_jax import env  # the sandbox and judges load only for dataset builds

  plans = {e.id: _plan(e, task, seed, 0) for e in examples}
  kept: dict[str, list[tuple[Any, str | None]]] = {}  # renders and the judge's comments
  pending = [e for e in examples if plans[e.id]]
  for attempt in range(1, RETRIES + 2):
    codes = [d.code for e in pending for d in plans[e.id]]
    results = iter(render(codes)) if codes else iter(())
    retry = []
    for e in pending:
      got = [next(results) for _ in plans[e.id]]
      comments = _comments(judge, task, e, plans[e.id], got)
      if _usable(plans[e.id], got, e.image) and comments is not None:
        kept[e.id] = list(zip(got, comments, strict=True))
      elif attempt <= RETRIES:
        plans[e.id] = _plan(e, task, seed, attempt)
        if plans[e.id]:
          retry.append(e)
      else:
        plans[e.id] = []
    pending = retry
    if not pending:
      break
  tool = env.tool_for_kind(task)
  out = []
  for e in examples:
    drafts = plans[e.id] if e.id in kept else []
    messages, pngs, errors = [], [], []
    for draft, (result, feedback) in zip(drafts, kept.get(e.id, ()), strict=True):
      call = env.parse_tool_call(
        json.dumps({"name": tool.name, "arguments": {"code": draft.code}}), (tool,)
      )
      if result.ok:
        pngs.append(result.png)
      messages.append(env.make_tool_response(call, result, feedback).to_message())
      errors.append("" if result.ok else error_name(result.message))
    turns = conversation(
      e.code,
      drafts,
      messages,
      tool_name=tool.name,
      description=e.description,
      errors=errors,
    )
    out.append(Written(turns, pngs))
  return out


def _comments(judge, task: str, example: Example, drafts, renders) -> list[str | None] | None:
  """The judge's comments on each rendered draft; None when a visual defect does not show."""
  matching = judge.judge(example.image, example.image, kind=task, mode="feedback").feedback
  out: list[str | None] = []
  for draft, result in zip(drafts, renders, strict=True):
    if not result.ok or result.image is None:
      out.append(None)
      continue
    verdict = judge.judge(example.image, result.image, kind=task, code=draft.code, mode="feedback")
    if draft.defect is not None and verdict.feedback == matching:
      return None
    out.append(verdict.feedback)
  return out
