"""The Qwen2 language decoder: GQA attention with q/k/v bias, SwiGLU MLP, RMSNorm.

One graph serves training (full sequences), prefill and decoding. With a KV cache, the
new tokens of each row are written at that row's own `write_index`, so rows of a batch
may sit at different lengths (the rollout engine splices inspected candidates into some
rows only). Slot order in the cache is sequence order:

    cache slots  : 0 1 2 3 4 5 6 7          (max_length = 8)
    row 0 valid  : 1 1 1 1 0 0 0 0          next write at slot 4
    row 1 valid  : 1 1 0 0 0 0 0 0          next write at slot 2

A query written at slot s attends to every valid slot <= s. Invalid slots (padding of a
prefill or of a partly filled chunk) are overwritten by the next write of that row.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from retrv_jax.models import axes
from retrv_jax.models.config import ModelConfig
from retrv_jax.models.layers import (
  DenseGeneral,
  RMSNorm,
  apply_rotary,
  constrain,
  dot_product_attention,
  dtype_of,
  remat_policy,
)


@flax.struct.dataclass
class KVCache:
  """Keys and values of every layer plus which slots hold real tokens.

  k, v: `[layers, batch, max_length, kv_heads, head_dim]`; valid: `[batch, max_length]`.
  """

  k: jax.Array
  v: jax.Array
  valid: jax.Array

  @classmethod
  def init(cls, config: ModelConfig, batch: int, max_length: int, dtype: Any = None) -> KVCache:
    dtype = dtype or dtype_of(config.dtype)
    shape = (config.num_layers, batch, max_length, config.num_kv_heads, config.head_dim)
    return cls(
        k=jnp.zeros(shape, dtype),
        v=jnp.zeros(shape, dtype),
        valid=jnp.zeros((batch, max_length), bool),
    )

  @property
  def max_length(self) -> int:
    return self.k.shape[2]


def _write_rows(buffer: jax.Array, update: jax.Array, index: jax.Array) -> jax.Array:
  """Writes `update [b, s, ...]` into `buffer [b, S, ...]` at slot `index[b]` of each row."""
  return jax.vmap(lambda buf, upd, i: jax.lax.dynamic_update_slice_in_dim(buf, upd, i, 0))(
      buffer, update, index
  )


def _lora_fields(config: ModelConfig, name: str) -> dict[str, Any]:
  """The LoRA settings of projection `name` (rank 0, no adapter, unless it is a target)."""
  rank = config.lora_rank if name in config.lora_targets else 0
  return {"lora_rank": rank, "lora_alpha": config.lora_alpha}


class Attention(nn.Module):
  """Grouped-query self-attention with rotary positions and an optional cache."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x, cos, sin, mask, cache_kv=None, write_index=None):
    cfg = self.config
    dense = lambda features, kernel_axes, name, **kw: DenseGeneral(
        features=features,
        kernel_axes=kernel_axes,
        dtype=dtype_of(cfg.dtype),
        param_dtype=dtype_of(cfg.param_dtype),
        name=name,
        **_lora_fields(cfg, name),
        **kw,
    )
    heads = (cfg.num_heads, cfg.head_dim)
    kv_heads = (cfg.num_kv_heads, cfg.head_dim)
    q = dense(heads, (axes.EMBED, axes.HEADS, axes.HEAD_DIM), "q_proj", use_bias=True)(x)
    k = dense(kv_heads, (axes.EMBED, axes.KV_HEADS, axes.HEAD_DIM), "k_proj", use_bias=True)(x)
    v = dense(kv_heads, (axes.EMBED, axes.KV_HEADS, axes.HEAD_DIM), "v_proj", use_bias=True)(x)
    q = constrain(apply_rotary(q, cos, sin), axes.ACTIVATION_HEADS)
    k = constrain(apply_rotary(k, cos, sin), axes.ACTIVATION_KV_HEADS)
    v = constrain(v, axes.ACTIVATION_KV_HEADS)
    if cache_kv is not None:
      cache_k, cache_v = cache_kv
      k = constrain(_write_rows(cache_k, k.astype(cache_k.dtype), write_index),
                                     axes.CACHE_KV)
      v = constrain(_write_rows(cache_v, v.astype(cache_v.dtype), write_index),
                                     axes.CACHE_KV)
      cache_kv = (k, v)
    out = dot_product_attention(q, k, v, mask, dtype=dtype_of(cfg.dtype))
    out = checkpoint_name(out, "attention_out")
    out = dense((cfg.hidden_size,), (axes.HEADS, axes.HEAD_DIM, axes.EMBED), "o_proj", in_dims=2)(
        out
    )
    return out, cache_kv


class MLP(nn.Module):
  """SwiGLU: down(silu(gate(x)) * up(x)), no biases; width `mlp_dim` (0: intermediate_size)."""

  config: ModelConfig
  mlp_dim: int = 0

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    width = self.mlp_dim or cfg.intermediate_size
    dense = lambda features, kernel_axes, name: DenseGeneral(
        features=(features,),
        kernel_axes=kernel_axes,
        dtype=dtype_of(cfg.dtype),
        param_dtype=dtype_of(cfg.param_dtype),
        name=name,
        **_lora_fields(cfg, name),
    )
    gate = dense(width, (axes.EMBED, axes.MLP), "gate_proj")(x)
    up = dense(width, (axes.EMBED, axes.MLP), "up_proj")(x)
    hidden = constrain(nn.silu(gate) * up, axes.ACTIVATION_MLP)
    return dense(cfg.hidden_size, (axes.MLP, axes.EMBED), "down_proj")(hidden)


class DecoderLayer(nn.Module):
  """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x, cache_kv, cos, sin, mask, write_index):
    """(carry x, scanned cache_kv, broadcast rest) -> (x, cache_kv): the nn.scan contract."""
    cfg = self.config
    norm = lambda name: RMSNorm(
        eps=cfg.rms_norm_eps,
        dtype=dtype_of(cfg.dtype),
        param_dtype=dtype_of(cfg.param_dtype),
        name=name,
    )
    attn_out, cache_kv = Attention(cfg, name="self_attn")(
        norm("input_layernorm")(x), cos, sin, mask, cache_kv, write_index
    )
    x = constrain(x + attn_out, axes.ACTIVATION_EMBED)
    x = x + MLP(cfg, name="mlp")(norm("post_attention_layernorm")(x))
    return constrain(x, axes.ACTIVATION_EMBED), cache_kv


def _layer_class(config: ModelConfig):
  if config.remat_policy == "none":
    return DecoderLayer
  return nn.remat(
      DecoderLayer, policy=remat_policy(config.remat_policy), prevent_cse=not config.scan_layers
  )


class TextDecoder(nn.Module):
  """Token embedding, the layer stack and the final norm; returns hidden states.

  The head lives in the parent model (it may be tied to `embed_tokens`).
  """

  config: ModelConfig

  def setup(self):
    cfg = self.config
    self.embed_tokens = nn.Embed(
        num_embeddings=cfg.vocab_size,
        features=cfg.hidden_size,
        dtype=dtype_of(cfg.dtype),
        param_dtype=dtype_of(cfg.param_dtype),
        embedding_init=nn.with_logical_partitioning(
            nn.initializers.normal(stddev=0.02), (axes.VOCAB, axes.EMBED)
        ),
    )
    if cfg.scan_layers:
      self.layers = nn.scan(
          _layer_class(cfg),
          variable_axes={"params": 0},
          split_rngs={"params": True},
          in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
          length=cfg.num_layers,
          metadata_params={nn.PARTITION_NAME: axes.LAYERS},
      )(cfg)
    else:
      layer = _layer_class(cfg)
      self.layer_list = [layer(cfg, name=f"layers_{i}") for i in range(cfg.num_layers)]
    self.norm = RMSNorm(
        eps=cfg.rms_norm_eps, dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype)
    )

  def embed(self, input_ids: jax.Array) -> jax.Array:
    """`[b, t]` ids -> `[b, t, d]` embeddings."""
    return self.embed_tokens(input_ids)

  def attend(self, hidden: jax.Array) -> jax.Array:
    """Tied head: `[b, t, d]` -> `[b, t, vocab]` logits via the embedding matrix."""
    return self.embed_tokens.attend(hidden)

  def __call__(
      self,
      inputs_embeds: jax.Array,
      cos: jax.Array,
      sin: jax.Array,
      mask: jax.Array,
      cache: KVCache | None = None,
      write_index: jax.Array | None = None,
  ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """Runs the stack.

    Args:
      inputs_embeds: `[b, t, d]`.
      cos, sin: `[b, t, head_dim]` rotary angles of the t tokens.
      mask: `[b, t, s]` boolean attention mask (s = t without a cache, else max_length).
      cache: the KV cache to write into, or None for a cache-free forward.
      write_index: `[b]` slot of each row's first new token (with a cache).

    Returns:
      final-normed hidden states `[b, t, d]` and the updated (k, v) stacks or None.
    """
    x = constrain(inputs_embeds, axes.ACTIVATION_EMBED)
    cache_kv = None if cache is None else (cache.k, cache.v)
    if self.config.scan_layers:
      x, cache_kv = self.layers(x, cache_kv, cos, sin, mask, write_index)
    else:
      new_k, new_v = [], []
      for i, layer in enumerate(self.layer_list):
        layer_kv = None if cache is None else (cache.k[i], cache.v[i])
        x, layer_kv = layer(x, layer_kv, cos, sin, mask, write_index)
        if layer_kv is not None:
          new_k.append(layer_kv[0])
          new_v.append(layer_kv[1])
      cache_kv = (jnp.stack(new_k), jnp.stack(new_v)) if cache is not None else None
    return self.norm(x), cache_kv
