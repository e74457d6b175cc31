"""Qwen2 / Qwen3 decoder with M-RoPE (the language model of Qwen2-VL, Qwen2.5-VL and Qwen3-VL).

Qwen3 differs by config flags only: no q/k/v biases, RMSNorm over each head of q and k before the
rope, an explicit head dim and interleaved M-RoPE. DeepStack (Qwen3-VL's visual residuals after
the first layers) enters through the optional `deepstack` argument.

Shapes: B batch, L length, S key length, E width, N query heads, K kv heads, H head dim,
F MLP width.
"""

from __future__ import annotations

import jax
from flax import nnx

from rrvf_jax import sharding
from rrvf_jax.models.qwen_vl import kv_cache, paged_kv, remat, rope
from rrvf_jax.models.qwen_vl.config import TextConfig
from rrvf_jax.models.qwen_vl.layers import Dense, RMSNorm, causal_attention, param


class Attention(nnx.Module):
  """GQA self-attention; q/k/v with bias (Qwen2) or q/k RMSNorm per head (Qwen3), o without bias."""

  def __init__(self, cfg: TextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    e, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
    bias = cfg.qkv_bias
    self.q = Dense((e,), (n, h), ("embed", "q_heads", "head_dim"), use_bias=bias, **kw)
    self.k = Dense((e,), (k, h), ("embed", "kv_heads", "head_dim"), use_bias=bias, **kw)
    self.v = Dense((e,), (k, h), ("embed", "kv_heads", "head_dim"), use_bias=bias, **kw)
    self.o = Dense((n, h), (e,), ("q_heads", "head_dim", "embed"), use_bias=False, **kw)
    norm = {"eps": cfg.rms_norm_eps, "param_dtype": param_dtype, "rngs": rngs}
    self.q_norm = RMSNorm(h, "head_dim", **norm) if cfg.qk_norm else None
    self.k_norm = RMSNorm(h, "head_dim", **norm) if cfg.qk_norm else None
    self.scale = h**-0.5

  def _rotated_qk(self, x, cos, sin):
    """Rope-rotated queries and keys `[B, T, heads, H]` (q/k-normed first where configured)."""
    # HF casts cos/sin to the activation dtype and rotates in that dtype.
    cos, sin = cos.astype(x.dtype), sin.astype(x.dtype)
    q, k = self.q(x), self.k(x)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    return rope.apply_rope(q, cos, sin), rope.apply_rope(k, cos, sin)

  def __call__(self, x_ble, cos, sin, valid_bl):
    q, k = self._rotated_qk(x_ble, cos, sin)
    q = sharding.constrain(q, ("batch", "length", "act_heads", None))
    out = causal_attention(q, k, self.v(x_ble), valid_bl, scale=self.scale)
    return self.o(out)

  def cached(self, x_bte, cos, sin, mask_bts, k_cache, v_cache, offset):
    """Attention of T new tokens over the cache; their keys/values go to slots `offset + [0, T)`."""
    q, k = self._rotated_qk(x_bte, cos, sin)
    k_cache, v_cache = kv_cache.write(k_cache, v_cache, k, self.v(x_bte), offset)
    k_cache = sharding.constrain(k_cache, kv_cache.K_AXES)
    v_cache = sharding.constrain(v_cache, kv_cache.V_AXES)
    q = sharding.constrain(q, ("batch", "length", "act_heads", None))
    out = kv_cache.cached_attention(q, k_cache, v_cache, mask_bts, scale=self.scale)
    return self.o(out), k_cache, v_cache

  def paged(self, x_bte, cos, sin, k_pages, v_pages, view: paged_kv.PageView):
    """Attention of each row's new tokens over its own pages, after writing their keys/values."""
    q, k = self._rotated_qk(x_bte, cos, sin)
    k_pages, v_pages = paged_kv.write(k_pages, v_pages, k, self.v(x_bte), view)
    k_pages = sharding.constrain(k_pages, paged_kv.PAGE_AXES)
    v_pages = sharding.constrain(v_pages, paged_kv.PAGE_AXES)
    q = sharding.constrain(q, ("batch", "length", "act_heads", None))
    out = paged_kv.attention(q, k_pages, v_pages, view, scale=self.scale)
    return self.o(out), k_pages, v_pages


class MLP(nnx.Module):
  """SwiGLU without biases."""

  def __init__(self, cfg: TextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    e, f = cfg.hidden_size, cfg.intermediate_size
    kw = {"use_bias": False, "dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
    self.gate = Dense((e,), (f,), ("embed", "mlp"), **kw)
    self.up = Dense((e,), (f,), ("embed", "mlp"), **kw)
    self.down = Dense((f,), (e,), ("mlp", "embed"), **kw)

  def __call__(self, x):
    hidden = jax.nn.silu(self.gate(x)) * self.up(x)
    return self.down(sharding.constrain(hidden, ("batch", "length", "act_mlp")))


class DecoderLayer(nnx.Module):
  """Pre-norm decoder block."""

  def __init__(self, cfg: TextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = {"eps": cfg.rms_norm_eps, "param_dtype": param_dtype, "rngs": rngs}
    self.input_norm = RMSNorm(cfg.hidden_size, "embed", **kw)
    self.attn = Attention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.post_attn_norm = RMSNorm(cfg.hidden_size, "embed", **kw)
    self.mlp = MLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x, cos, sin, valid):
    x = x + self.attn(self.input_norm(x), cos, sin, valid)
    x = x + self.mlp(self.post_attn_norm(x))
    return sharding.constrain(x, ("batch", "length", "act_embed"))

  def cached(self, x, cos, sin, mask, k_cache, v_cache, offset):
    """The block on new tokens against a cache; returns the output and the updated cache."""
    attn, k_cache, v_cache = self.attn.cached(
      self.input_norm(x), cos, sin, mask, k_cache, v_cache, offset
    )
    x = x + attn
    x = x + self.mlp(self.post_attn_norm(x))
    return sharding.constrain(x, ("batch", "length", "act_embed")), k_cache, v_cache

  def paged(self, x, cos, sin, k_pages, v_pages, view: paged_kv.PageView):
    """The block on each row's new tokens against its pages; returns the output and the pages."""
    attn, k_pages, v_pages = self.attn.paged(self.input_norm(x), cos, sin, k_pages, v_pages, view)
    x = x + attn
    x = x + self.mlp(self.post_attn_norm(x))
    return sharding.constrain(x, ("batch", "length", "act_embed")), k_pages, v_pages


class TextModel(nnx.Module):
  """Token embedding, decoder layers and final norm; `lm_head` lives in the full model."""

  def __init__(self, cfg: TextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.cfg = cfg
    self.dtype = dtype
    self.embed = param(
      rngs, jax.nn.initializers.normal(0.02), (cfg.vocab_size, cfg.hidden_size),
      ("vocab", "embed"), param_dtype,
    )  # fmt: skip
    self.layers = nnx.List(
      [
        DecoderLayer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        for _ in range(cfg.num_layers)
      ]
    )
    self.norm = RMSNorm(
      cfg.hidden_size, "embed", eps=cfg.rms_norm_eps, param_dtype=param_dtype, rngs=rngs
    )

  def embed_tokens(self, input_ids):
    return self.embed[...][input_ids].astype(self.dtype)

  def cos_sin(self, positions_3bl: jax.Array) -> tuple[jax.Array, jax.Array]:
    """M-RoPE cos/sin `[B, L, head_dim]` of positions `[3, B, L]`."""
    cfg = self.cfg
    return rope.mrope_cos_sin(
      positions_3bl,
      head_dim=cfg.head_dim,
      theta=cfg.rope_theta,
      mrope_section=cfg.mrope_section,
      interleaved=cfg.mrope_interleaved,
    )

  def __call__(self, x_ble, positions_3bl, valid_bl, deepstack=None):
    """Runs the causal decoder on embeddings; `valid_bl` is nonzero at real tokens (padding: 0).

    `deepstack` (optional) adds `deepstack.residual(i)` to the hidden states after layer i for its
    `deepstack.levels` first layers (Qwen3-VL's visual features at the image positions).
    """
    with jax.named_scope("decoder"):
      cos, sin = self.cos_sin(positions_3bl)
      layers = list(self.layers)
      levels = 0 if deepstack is None else deepstack.levels
      for i, layer in enumerate(layers[:levels]):
        x_ble = remat.call_layer(layer, x_ble, cos, sin, valid_bl)
        x_ble = x_ble + deepstack.residual(i).astype(x_ble.dtype)
      x_ble = remat.call_layers(layers[levels:], x_ble, cos, sin, valid_bl)
      return self.norm(x_ble)

  def cached(
    self, x_bte, positions_3bt, cache: kv_cache.KVCache, offset, deepstack=None
  ) -> tuple[jax.Array, kv_cache.KVCache]:
    """Runs T new tokens (slots `offset + [0, T)`, already marked in `cache.valid`) on the cache."""
    with jax.named_scope("decoder_cached"):
      cos, sin = self.cos_sin(positions_3bt)
      mask = kv_cache.attention_mask(cache, offset, x_bte.shape[1])
      ks, vs = [], []
      layers = zip(self.layers, cache.k, cache.v, strict=True)
      for i, (layer, k_cache, v_cache) in enumerate(layers):
        x_bte, k_cache, v_cache = layer.cached(x_bte, cos, sin, mask, k_cache, v_cache, offset)
        if deepstack is not None and i < deepstack.levels:
          x_bte = x_bte + deepstack.residual(i).astype(x_bte.dtype)
        ks.append(k_cache)
        vs.append(v_cache)
      return self.norm(x_bte), kv_cache.KVCache(tuple(ks), tuple(vs), cache.valid)

  def paged(
    self, x_bte, positions_3bt, k_pages: tuple, v_pages: tuple, view, deepstack=None
  ) -> tuple[jax.Array, tuple, tuple]:
    """Runs each row's new tokens on its own pages (`paged_kv`); returns hidden states and pools."""
    with jax.named_scope("decoder_paged"):
      cos, sin = self.cos_sin(positions_3bt)
      ks, vs = [], []
      layers = zip(self.layers, k_pages, v_pages, strict=True)
      for i, (layer, k_layer, v_layer) in enumerate(layers):
        x_bte, k_layer, v_layer = layer.paged(x_bte, cos, sin, k_layer, v_layer, view)
        if deepstack is not None and i < deepstack.levels:
          x_bte = x_bte + deepstack.residual(i).astype(x_bte.dtype)
        ks.append(k_layer)
        vs.append(v_layer)
      return self.norm(x_bte), tuple(ks), tuple(vs)
