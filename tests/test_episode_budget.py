"""Every preset gives each episode room for all `max_turns - 1` feedback rounds, worst case."""

import pytest

from configs import chart, web
from rrvf_jax import components
from rrvf_jax.testing import tokenizer as tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
  # The tiny BPE spends more tokens on the prompt's text than Qwen's (151k entries): an upper bound.
  return tiny_tokenizer.build_tiny_tokenizer()


@pytest.mark.parametrize("module", [chart, web], ids=["chart", "web"])
@pytest.mark.parametrize("preset", ["paper", "demo"])
def test_the_worst_case_episode_fits_the_budget(tok, module, preset):
  config = module.get_config(preset)
  g = config.grpo
  budget = components.episode_budget(config, tok, components.image_processor_config(config))
  # Worst case: max_turns turns of max_new_tokens, each call answered by a response of
  # max_response_tokens, then the forced answer after the last call.
  assert budget.tokens > g.max_turns * g.max_new_tokens + (g.max_turns - 1) * g.max_response_tokens
  assert budget.tokens <= g.max_total_tokens, (
    f"{module.__name__}:{preset}: an episode may need {budget.tokens} tokens, "
    f"grpo.max_total_tokens is {g.max_total_tokens}"
  )
  assert budget.cache_slots >= budget.tokens  # the lock-step cache pads appends to buckets


def test_the_paper_preset_follows_the_method_notes():
  # Per-turn budgets of the research notes (4096 tokens of chart code, 6144 of HTML), 5 turns.
  assert chart.get_config().grpo.max_new_tokens == 4096
  assert web.get_config().grpo.max_new_tokens == 6144
  assert chart.get_config().grpo.max_turns == web.get_config().grpo.max_turns == 5
