"""Self-correction trajectories: defects that show, masks that hide them, real renders and judge."""

from __future__ import annotations

import random

import numpy as np
import pytest

from rrvf_jax import data, env
from rrvf_jax.data import chart_gen, revisions, web_gen
from rrvf_jax.env import ChartCanvas, render_charts


def _text(message) -> str:
  content = message["content"]
  return content if isinstance(content, str) else "".join(i["text"] for i in content)


@pytest.mark.parametrize(
  "task, complexity", [("chart", "simple"), ("chart", "full"), ("web", "simple"), ("web", "full")]
)
def test_each_round_fixes_one_named_defect(task, complexity):
  generate = chart_gen.generate_chart if task == "chart" else web_gen.generate_page
  kinds, two_rounds = set(), 0
  for seed in range(40):
    target = generate(random.Random(seed), complexity).code
    drafts = revisions.plan_drafts(target, task, random.Random(seed), rounds=2)
    states = [d.code for d in drafts] + [target]
    for draft, following in zip(drafts, states[1:], strict=True):
      if draft.defect is None:
        assert draft.code == target
        continue
      assert draft.code != following and draft.defect.code == draft.code
      assert draft.defect.kind in revisions.EDITS[task] and draft.defect.seen
      kinds.add(draft.defect.kind)
    assert len({d.defect.kind for d in drafts if d.defect}) == len(drafts)  # distinct kinds
    two_rounds += len(drafts) == 2
  assert two_rounds >= 30  # most programs have two applicable defects
  assert len(kinds) >= 4


def test_untrained_spans_cover_what_differs_and_the_token_after_a_deletion():
  assert revisions.untrained_spans("color='tab:red'", "color='tab:blue'") == [(11, 14)]
  assert revisions.untrained_spans("[3,14,2]", "[3,7,2]") == [(3, 5)]  # the whole number
  draft, target = "plt.bar(x)\nplt.show()", "plt.bar(x)\nplt.title('A')\nplt.show()"
  (span,) = revisions.untrained_spans(draft, target)
  assert draft[span[0] : span[1]] == "show"  # "plt." then show, where the target has title
  assert revisions.untrained_spans(target, target) == []


def test_draft_message_is_the_tool_call_text_with_the_defect_untrained():
  target = "import matplotlib.pyplot as plt\nplt.bar(['A','B'],[3,4],color='tab:blue')\n"
  draft = target.replace("tab:blue", "tab:red")
  message = revisions.draft_message("A bar chart.", "render_chart", draft, target)
  text = _text(message)
  turn = env.parse_turn(text, "chart")
  assert turn.tool_calls[0].ok and turn.tool_calls[0].code == draft.strip()
  untrained = "".join(i["text"] for i in message["content"] if i.get("loss") is False)
  assert untrained == "red"
  right = revisions.draft_message("A bar chart.", "render_chart", target, target)
  assert right["content"] == text.replace("tab:red", "tab:blue")  # plain text: all learned


@pytest.fixture(scope="module")
def pool():
  with env.create_chart_pool(num_workers=2) as p:
    yield p


def _written(pool, seed: str, n: int = 8):
  canvas = ChartCanvas(112, 84, dpi=48)
  charts = [chart_gen.generate_chart(random.Random(i), "simple") for i in range(n)]
  images = [r.image for r in render_charts([c.code for c in charts], canvas=canvas, pool=pool)]
  examples = [
    revisions.Example(f"train-{i}", c.code, revisions.describe_chart(c.chart_type, 1), image)
    for i, (c, image) in enumerate(zip(charts, images, strict=True))
  ]

  def render(codes):
    return render_charts(codes, canvas=canvas, pool=pool)

  written = revisions.write_trajectories(
    examples, task="chart", render=render, judge=env.LocalJudge(), seed=seed
  )
  return examples, written


def test_written_trajectories_show_real_renders_and_comments(pool):
  examples, written = _written(pool, "s0")
  rounds = [len(w.images) for w in written]
  assert sum(rounds) > 0
  for example, w in zip(examples, written, strict=True):
    turns = w.conversation
    assert turns[-1]["role"] == "assistant"
    assert env.parse_turn(turns[-1]["content"], "chart").answer.code == example.code.strip()
    tools = [t for t in turns if t["role"] == "tool"]
    shown = [t for t in tools if t["content"][0] == {"type": "image"}]
    assert len(shown) == len(w.images)
    for i, tool in enumerate(turns):
      if tool["role"] != "tool":
        continue
      text, reply = tool["content"][-1]["text"], _text(turns[i + 1])
      if tool in shown:  # the render and the judge's comments on it
        assert text.startswith("---Comments:")
        # Comments that say the render matches come only with a draft that is right.
        matches = reply.startswith("<think>The render matches the target.")
        assert ("closely matches" in text) == matches, (text, reply)
      else:  # a draft with a code error: the error text, no image
        assert text.startswith("Execution failed") and "The code failed with" in reply
    calls = [t for t in turns if t["role"] == "assistant"][:-1]
    pngs = iter(w.images)
    for call, tool in zip(calls, tools, strict=True):
      code = env.parse_turn(_text(call), "chart").tool_calls[0].code
      (render,) = render_charts([code], canvas=ChartCanvas(112, 84, dpi=48), pool=pool)
      assert render.ok == (tool in shown)
      if render.ok:
        np.testing.assert_array_equal(render.image, data.decode_image(next(pngs), example.id))
  again = _written(pool, "s0")[1]
  assert [w.conversation for w in again] == [w.conversation for w in written]
  other = _written(pool, "s1")[1]
  assert [w.conversation for w in other] != [w.conversation for w in written]
