"""Policy losses against a float64 reference; clipping, gradients, aggregation, accumulation."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rrvf_jax.rl import losses

AGG_MODES = ["token-mean", "seq-mean", "seq-sum-norm"]
MAX_LENGTH = 16


def _reference(
  new,
  old,
  adv,
  mask,
  *,
  surrogate,
  clip_low,
  clip_high,
  agg,
  max_length=None,
  ref=None,
  kl_coef=0.0,
  clip_c=None,
):
  """float64 loops: (loss_sum, weight, {metric: sum}) as the module doc defines them."""
  rows = []
  for b in range(new.shape[0]):
    idx = np.flatnonzero(mask[b] > 0)
    lr = new[b, idx] - old[b, idx]
    if surrogate == "gspo":
      r = np.full(len(idx), np.exp(lr.mean()) if len(idx) else 1.0)
    else:
      r = np.exp(lr)
    a = adv[b]
    obj = np.minimum(r * a, np.clip(r, 1 - clip_low, 1 + clip_high) * a)
    tok = -obj
    if clip_c is not None and a < 0:
      tok = np.minimum(tok, -a * clip_c)
    if kl_coef:
      d = ref[b, idx] - new[b, idx]
      tok = tok + kl_coef * (np.exp(d) - d - 1)
    rows.append(
      dict(
        n=len(idx),
        loss=tok,
        pg=-obj if clip_c is None or a >= 0 else np.minimum(-obj, -a * clip_c),
        low=(a < 0) & (r < 1 - clip_low),
        high=(a > 0) & (r > 1 + clip_high),
        ratio=r,
        approx=(np.exp(lr) - 1) - lr,
        dual=(a < 0) & (r > (clip_c or np.inf)),
      )
    )
  live = [row for row in rows if row["n"] > 0]
  if agg == "token-mean":
    total = lambda key: sum(np.sum(row[key]) for row in live)
    weight = sum(row["n"] for row in live)
    loss_sum, pg = total("loss"), total("pg")
  else:
    total = lambda key: sum(np.mean(row[key]) for row in live)
    weight = len(live)
    if agg == "seq-mean":
      loss_sum, pg = total("loss"), total("pg")
    else:
      loss_sum = sum(np.sum(row["loss"]) for row in live) / max_length
      pg = sum(np.sum(row["pg"]) for row in live) / max_length
  metrics = {
    "pg_loss": pg,
    "clip_frac_low": total("low"),
    "clip_frac_high": total("high"),
    "ratio_mean": total("ratio"),
    "approx_kl": total("approx"),
  }
  if clip_c is not None:
    metrics["clip_frac_dual"] = total("dual")
  return loss_sum, weight, metrics


def _batch(seed=0, batch=6, length=MAX_LENGTH, spread=0.3):
  """Random log-probs (ratios spread around 1), advantages, and masks of different lengths."""
  rng = np.random.default_rng(seed)
  new = rng.normal(-1.5, 0.5, size=(batch, length))
  old = new + rng.normal(0, spread, size=new.shape)
  ref = new + rng.normal(0, spread, size=new.shape)
  adv = rng.normal(size=batch)
  mask = np.zeros((batch, length))
  for b in range(batch):
    start = rng.integers(0, 4)
    mask[b, start : start + rng.integers(2, length - 4)] = 1
  mask[-1] = 0  # a row with no policy tokens
  return new, old, ref, adv, mask


def _call(new, old, adv, mask, **kw):
  f32 = lambda x: None if x is None else jnp.asarray(x, jnp.float32)
  ref = kw.pop("ref_logprobs", None)
  return losses.policy_loss(
    f32(new), f32(old), f32(adv), f32(mask), ref_logprobs=f32(ref), max_length=MAX_LENGTH, **kw
  )


@pytest.mark.parametrize(
  "surrogate,agg,kl_coef", list(itertools.product(["ppo_clip", "gspo"], AGG_MODES, [0.0, 0.1]))
)
def test_matches_float64_reference(surrogate, agg, kl_coef):
  new, old, ref, adv, mask = _batch()
  loss_sum, weight, aux = _call(
    new,
    old,
    adv,
    mask,
    ref_logprobs=ref,
    surrogate=surrogate,
    clip_low=0.1,
    clip_high=0.15,
    loss_agg=agg,
    kl_coef=kl_coef,
  )
  want_sum, want_weight, want_aux = _reference(
    new,
    old,
    adv,
    mask,
    surrogate=surrogate,
    clip_low=0.1,
    clip_high=0.15,
    agg=agg,
    max_length=MAX_LENGTH,
    ref=ref,
    kl_coef=kl_coef,
  )
  assert float(weight) == want_weight
  np.testing.assert_allclose(float(loss_sum), want_sum, rtol=1e-5, atol=1e-6)
  for key, value in want_aux.items():
    np.testing.assert_allclose(float(aux[key]), value, rtol=1e-5, atol=1e-6, err_msg=key)
  # The batch really exercises both clips (otherwise the comparison proves little).
  if surrogate == "ppo_clip":
    assert want_aux["clip_frac_low"] > 0 and want_aux["clip_frac_high"] > 0
  assert ("kl" in aux) == (kl_coef > 0)


@pytest.mark.parametrize("agg", AGG_MODES)
def test_dual_clip_matches_float64_reference(agg):
  new, old, _, adv, mask = _batch(seed=3, spread=1.0)
  kw = dict(clip_low=0.2, clip_high=0.28, clip_c=2.0)
  loss_sum, weight, aux = _call(
    new, old, adv, mask, loss_agg=agg, clip_ratio_c=2.0, clip_low=0.2, clip_high=0.28
  )
  want_sum, want_weight, want_aux = _reference(
    new, old, adv, mask, surrogate="ppo_clip", agg=agg, max_length=MAX_LENGTH, **kw
  )
  assert float(weight) == want_weight
  np.testing.assert_allclose(float(loss_sum), want_sum, rtol=1e-5, atol=1e-6)
  for key, value in want_aux.items():
    np.testing.assert_allclose(float(aux[key]), value, rtol=1e-5, atol=1e-6, err_msg=key)
  assert want_aux["clip_frac_dual"] > 0  # the cap binds somewhere in this batch


def test_kl_metric_matches_k3_reference():
  new, old, ref, adv, mask = _batch(seed=4)
  _, weight, aux = _call(new, old, adv, mask, ref_logprobs=ref, kl_coef=0.5)
  d = (ref - new)[mask > 0]
  np.testing.assert_allclose(float(aux["kl"] / weight), np.mean(np.exp(d) - d - 1), rtol=1e-5)
  _, _, aux1 = _call(new, old, adv, mask, ref_logprobs=ref, kl_coef=0.5, kl_estimator="k1")
  np.testing.assert_allclose(float(aux1["kl"] / weight), np.mean(-d), rtol=1e-5, atol=1e-7)


def test_kl_is_not_computed_at_coef_zero():
  new, old, _, adv, mask = _batch()
  poisoned = np.full_like(new, np.nan)
  loss_sum, _, aux = _call(new, old, adv, mask, ref_logprobs=poisoned, kl_coef=0.0)
  assert np.isfinite(float(loss_sum)) and "kl" not in aux
  with pytest.raises(ValueError, match="needs ref_logprobs"):
    _call(new, old, adv, mask, kl_coef=0.1)


def test_ratio_one_gives_minus_mean_advantage_and_no_clipping():
  rng = np.random.default_rng(5)
  new = rng.normal(-2, 1, size=(4, 8))
  adv = np.array([1.5, -0.5, 2.0, -1.0])
  mask = np.ones((4, 8))
  loss_sum, weight, aux = _call(new, new, adv, mask)
  np.testing.assert_allclose(float(loss_sum / weight), -adv.mean(), rtol=1e-6)
  assert float(aux["clip_frac_low"]) == 0 and float(aux["clip_frac_high"]) == 0
  np.testing.assert_allclose(float(aux["ratio_mean"] / weight), 1.0, rtol=1e-6)
  np.testing.assert_allclose(float(aux["approx_kl"]), 0.0, atol=1e-7)
  # Token-mean weights sequences by their token counts.
  mask[0, 2:] = 0
  loss_sum, weight, _ = _call(new, new, adv, mask)
  counts = mask.sum(1)
  np.testing.assert_allclose(
    float(loss_sum / weight), -(adv * counts).sum() / counts.sum(), rtol=1e-6
  )


# (ratio, advantage, clip_low, clip_high) -> (per-token loss, clipped low, clipped high)
CLIP_CASES = [
  (1.5, 1.0, 0.2, 0.28, -1.28, 0, 1),  # A > 0, above 1 + clip_high: capped
  (1.25, 1.0, 0.2, 0.28, -1.25, 0, 0),  # inside the clip-higher range
  (1.25, 1.0, 0.2, 0.2, -1.2, 0, 1),  # same ratio, symmetric clip: capped
  (1.5, -1.0, 0.2, 0.28, 1.5, 0, 0),  # A < 0, above: not clipped (pessimistic branch)
  (0.5, 1.0, 0.2, 0.28, -0.5, 0, 0),  # A > 0, below: not clipped
  (0.5, -1.0, 0.2, 0.28, 0.8, 1, 0),  # A < 0, below 1 - clip_low: capped
  (0.75, -2.0, 0.2, 0.28, 1.6, 1, 0),  # clipped at 0.8, times |A| = 2
  (0.75, -2.0, 0.3, 0.28, 1.5, 0, 0),  # wider low clip: inside
]


@pytest.mark.parametrize("ratio,adv,low,high,loss,clip_lo,clip_hi", CLIP_CASES)
def test_clipping_at_known_ratios(ratio, adv, low, high, loss, clip_lo, clip_hi):
  old = np.array([[-1.0]])
  new = old + np.log(ratio)
  loss_sum, weight, aux = _call(
    new, old, np.array([adv]), np.ones((1, 1)), clip_low=low, clip_high=high
  )
  np.testing.assert_allclose(float(loss_sum / weight), loss, rtol=1e-5)
  assert float(aux["clip_frac_low"]) == clip_lo and float(aux["clip_frac_high"]) == clip_hi


def test_gradient_is_zero_exactly_where_clipped():
  ratios = np.array([[1.5, 1.1, 0.5, 0.9], [1.5, 1.1, 0.5, 0.9]])
  adv = np.array([1.0, -1.0])
  old = np.full(ratios.shape, -2.0)
  mask = np.ones(ratios.shape)

  def mean_loss(new):
    s, w, _ = losses.policy_loss(
      new,
      jnp.asarray(old, jnp.float32),
      jnp.asarray(adv, jnp.float32),
      jnp.asarray(mask, jnp.float32),
    )
    return s / w

  grad = np.asarray(jax.grad(mean_loss)(jnp.asarray(old + np.log(ratios), jnp.float32)))
  # Row 0 (A > 0): ratio 1.5 is clipped. Row 1 (A < 0): ratio 0.5 is clipped.
  clipped = np.array([[1, 0, 0, 0], [0, 0, 1, 0]], bool)
  assert np.all(grad[clipped] == 0.0)
  # Elsewhere d(-r A / n)/d log pi = -r A / n.
  want = -ratios * adv[:, None] / mask.sum()
  np.testing.assert_allclose(grad[~clipped], want[~clipped], rtol=1e-5)


def test_dual_clip_caps_negative_advantages():
  old = np.full((1, 3), -1.0)
  new = old + np.log([[5.0, 2.0, 1.0]])

  def mean_loss(new):
    s, w, aux = losses.policy_loss(
      new, jnp.asarray(old, jnp.float32), jnp.asarray([-1.0]), jnp.ones((1, 3)), clip_ratio_c=3.0
    )
    return s / w, aux

  (value, aux), grad = jax.value_and_grad(mean_loss, has_aux=True)(jnp.asarray(new, jnp.float32))
  np.testing.assert_allclose(float(value), (3.0 + 2.0 + 1.0) / 3, rtol=1e-5)
  assert float(aux["clip_frac_dual"]) == 1.0 and float(grad[0, 0]) == 0.0
  assert float(grad[0, 1]) != 0.0


def test_gspo_uses_the_sequence_mean_log_ratio():
  old = np.full((2, 4), -2.0)
  # Sequence 0: log-ratios 0.05 and 0.15 on two tokens (mean 0.1), the rest padding.
  new = old.copy()
  new[0, :2] += [0.05, 0.15]
  new[1, :] += [0.4, -0.4, 0.2, 0.0]  # mean 0.05
  mask = np.array([[1, 1, 0, 0], [1, 1, 1, 1]], float)
  adv = np.array([1.0, -1.0])
  kw = dict(surrogate="gspo", clip_low=0.2, clip_high=0.2, loss_agg="seq-mean")
  loss_sum, weight, aux = _call(new, old, adv, mask, **kw)
  s0, s1 = np.exp(0.1), np.exp(0.05)
  np.testing.assert_allclose(float(loss_sum / weight), (-s0 + s1) / 2, rtol=1e-5)
  np.testing.assert_allclose(float(aux["ratio_mean"] / weight), (s0 + s1) / 2, rtol=1e-5)
  # Only the mean matters: the same mean spread differently over tokens gives the same loss.
  new2 = old.copy()
  new2[0, :2] += 0.1
  new2[1, :] += 0.05
  np.testing.assert_allclose(
    float(_call(new2, old, adv, mask, **kw)[0]), float(loss_sum), rtol=1e-5
  )
  # A sequence ratio outside the clip range gets zero gradient on all its tokens.
  new3 = old.copy()
  new3[0, :2] += [0.5, 0.3]  # s = e^0.4 = 1.49 > 1.2 with A > 0: clipped
  grad = jax.grad(lambda x: _call(x, old, adv, mask, **kw)[0])(jnp.asarray(new3, jnp.float32))
  assert np.all(np.asarray(grad[0]) == 0.0) and np.all(np.asarray(grad[1]) != 0.0)
  # d(-A s)/d log pi_t = -A s / n for each of its n tokens (s = 1, A = -1, n = 4).
  np.testing.assert_allclose(np.asarray(grad[1]), np.full(4, 1.0 / 4), rtol=1e-5)


def test_aggregation_modes_on_sequences_of_different_lengths():
  """Per-token losses -A: sequence 0 has one token at -1, sequence 1 three tokens at +1."""
  new = np.full((2, 4), -1.0)
  mask = np.array([[1, 0, 0, 0], [1, 1, 1, 0]], float)
  adv = np.array([1.0, -1.0])
  got = {}
  for agg in AGG_MODES:
    loss_sum, weight, _ = _call(new, new, adv, mask, loss_agg=agg)
    got[agg] = (float(loss_sum), float(weight))
  assert got["token-mean"] == (2.0, 4.0)  # (-1 + 3) / 4 = 0.5
  assert got["seq-mean"] == (0.0, 2.0)  # (-1 + 1) / 2 = 0
  assert got["seq-sum-norm"] == (2.0 / MAX_LENGTH, 2.0)  # (-1 + 3) / 16 / 2
  with pytest.raises(ValueError, match="seq-sum-norm' needs max_length"):
    losses.policy_loss(*map(jnp.asarray, (new, new, adv, mask)), loss_agg="seq-sum-norm")


@pytest.mark.parametrize("surrogate,agg", list(itertools.product(["ppo_clip", "gspo"], AGG_MODES)))
def test_micro_batch_accumulation_is_exact(surrogate, agg):
  """sum(loss_sum) / sum(weight) over two halves equals the whole batch, in value and gradient."""
  new, old, ref, adv, mask = _batch(seed=7, batch=8)
  kw = dict(surrogate=surrogate, loss_agg=agg, max_length=MAX_LENGTH, kl_coef=0.05)
  args = [jnp.asarray(x, jnp.float32) for x in (old, adv, mask, ref)]

  def parts(new, sl):
    o, a, m, r = (x[sl] for x in args)
    s, w, _ = losses.policy_loss(new[sl], o, a, m, ref_logprobs=r, **kw)
    return s, w

  def whole(new):
    s, w = parts(new, slice(None))
    return s / w

  def halves(new):
    (s0, w0), (s1, w1) = parts(new, slice(0, 4)), parts(new, slice(4, 8))
    return (s0 + s1) / (w0 + w1)

  x = jnp.asarray(new, jnp.float32)
  np.testing.assert_allclose(float(halves(x)), float(whole(x)), rtol=1e-6)
  np.testing.assert_allclose(
    np.asarray(jax.grad(halves)(x)), np.asarray(jax.grad(whole)(x)), rtol=1e-5, atol=1e-8
  )
  # While a mean of the halves' means is not the same thing (the halves hold different weights).
  s0, w0 = parts(x, slice(0, 4))
  s1, w1 = parts(x, slice(4, 8))
  if float(w0) != float(w1):
    assert abs(float((s0 / w0 + s1 / w1) / 2 - whole(x))) > 1e-4


@pytest.mark.parametrize("garbage", [-np.inf, np.nan])
def test_masked_positions_never_matter(garbage):
  new, old, ref, adv, mask = _batch(seed=9)
  poisoned = [np.where(mask > 0, x, garbage) for x in (new, old, ref)]
  kw = dict(kl_coef=0.1, loss_agg="seq-mean")
  clean = _call(new, old, adv, mask, ref_logprobs=ref, **kw)[0]
  dirty = _call(*poisoned[:2], adv, mask, ref_logprobs=poisoned[2], **kw)[0]
  np.testing.assert_allclose(float(dirty), float(clean), rtol=1e-6)
  grad = jax.grad(lambda x: _call(x, poisoned[1], adv, mask, ref_logprobs=poisoned[2], **kw)[0])(
    jnp.asarray(poisoned[0], jnp.float32)
  )
  assert np.all(np.isfinite(np.asarray(grad))) and np.all(np.asarray(grad)[mask == 0] == 0)


def test_entropy_metric():
  new, old, _, adv, mask = _batch(seed=11)
  entropy = np.random.default_rng(0).uniform(0, 3, size=new.shape)
  for agg in ("token-mean", "seq-mean"):
    _, weight, aux = _call(new, old, adv, mask, entropy=jnp.asarray(entropy), loss_agg=agg)
    live = mask.sum(1) > 0
    if agg == "token-mean":
      want = entropy[mask > 0].mean()
    else:
      want = np.mean([entropy[b][mask[b] > 0].mean() for b in np.flatnonzero(live)])
    np.testing.assert_allclose(float(aux["entropy"] / weight), want, rtol=1e-5)


def test_bad_inputs_are_errors():
  new, old, _, adv, mask = _batch()
  with pytest.raises(ValueError, match=r"unknown policy loss 'ppo'; known: \['gspo', 'ppo_clip'\]"):
    _call(new, old, adv, mask, surrogate="ppo")
  with pytest.raises(ValueError, match="advantages must be one per sequence"):
    _call(new, old, np.zeros((6, 1)), mask)
  with pytest.raises(ValueError, match="loss_mask has shape"):
    _call(new, old, adv, mask[:, :3])
  with pytest.raises(ValueError, match="unknown loss aggregation 'mean'"):
    _call(new, old, adv, mask, loss_agg="mean")
  with pytest.raises(ValueError, match="clip_ratio_c must be > 1"):
    _call(new, old, adv, mask, clip_ratio_c=0.5)
