"""The Information Compression Module (ICM): each candidate becomes two LM input tokens.

PAPER.md §2. With T_c the candidate's full tokens (text embeddings and merged image
features, in the LM's embedding space) and T_q the query's tokens:

    t_con = ATT1(Q = e_con, K = V = T_c)        content: what the candidate is
    R     = ATT2(Q = T_c,   K = V = T_q)        each candidate token, seen from the query
    t_rel = ATT1(Q = e_con, K = V = R)          relation: the candidate against the query

ATT1 and e_con are shared by both outputs (`separate_relation_query` gives t_rel its own
learnable query e_rel). Each ATT is `num_layers` pre-norm blocks: the queries attend to
the normed context (multi-head, LM width and heads, no positions: the context is a set),
then a SwiGLU MLP, both residual. t_con and t_rel are RMS-normalised and multiplied by
one learnable `output_scale [D]`, the only thing that sets their size. It starts at 0.02
(the backbone's embedding init stddev, right for a random backbone); `init_params` with
the LM's embedding table, or `calibrate_output_scale`, sets it to the per-dimension RMS
of the token embeddings, so at step 0 the compressed tokens have the size of the tokens
the LM was trained on. e_con (and e_rel) start as N(0, 0.02) like token embeddings; the
pre-norm makes their scale irrelevant to the first attention.

Einsum letters as in `layers`: b batch, t query length, s context length, d embed,
h heads, e head_dim, f mlp. Candidates `[B, K, Lc, D]` are folded to `[B*K, Lc, D]`
(batch-major, so a batch sharding carries over).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from retrv_jax.models import axes
from retrv_jax.models.config import ModelConfig
from retrv_jax.models.decoder import MLP
from retrv_jax.models.layers import (
  DEFAULT_INIT,
  DenseGeneral,
  RMSNorm,
  constrain,
  dot_product_attention,
  dtype_of,
)

OUTPUT_SCALE_INIT = 0.02  # Before calibration: the backbone's embedding init stddev.


@dataclasses.dataclass(frozen=True)
class CompressionConfig:
  """How candidates enter the prompt."""

  enabled: bool = True  # False: full candidate tokens in the prompt (the "without ICM" run).
  num_layers: int = 1  # Blocks per ATT.
  separate_relation_query: bool = False  # t_rel gets its own learnable query e_rel.
  use_content: bool = True  # t_con in the prompt ("without t_con" ablation: False).
  use_relation: bool = True  # t_rel in the prompt ("without t_rel" ablation: False).
  mlp_dim: int = 0  # Hidden width of each block's MLP; 0: the LM's intermediate_size.
  # ATT2 reads the query's tokens packed into this many slots instead of the whole prompt
  # (cost K*Lc x max_query_tokens rather than K*Lc x T); 0: the whole prompt, masked.
  # Every query must fit (checked when the batch is concrete).
  max_query_tokens: int = 0

  def __post_init__(self):
    if self.num_layers < 1:
      raise ValueError(f"compression.num_layers must be >= 1, got {self.num_layers}")
    if self.mlp_dim < 0:
      raise ValueError(f"compression.mlp_dim must be >= 0, got {self.mlp_dim}")
    if self.max_query_tokens < 0:
      raise ValueError(f"compression.max_query_tokens must be >= 0, got {self.max_query_tokens}")
    if self.enabled and not (self.use_content or self.use_relation):
      raise ValueError("compression: use_content and use_relation are both False; "
                       "set enabled=False for prompts with full candidate tokens")

  @property
  def candidate_slots(self) -> tuple[str, ...]:
    """The matching `PromptConfig.candidate_slots`."""
    return tuple(n for n, on in (("con", self.use_content), ("rel", self.use_relation)) if on)

  def replace(self, **changes: Any) -> CompressionConfig:
    return dataclasses.replace(self, **changes)


class CrossAttention(nn.Module):
  """Multi-head attention of queries `[b, t, d]` over a context `[b, s, d]`; no positions."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array, mask: jax.Array) -> jax.Array:
    """`mask` broadcastable to `[b, t, s]`, True where a query may attend; -> `[b, t, d]`."""
    cfg = self.config
    heads = (cfg.num_heads, cfg.head_dim)
    in_axes = (axes.EMBED, axes.HEADS, axes.HEAD_DIM)
    dense = lambda features, kernel_axes, name, **kw: DenseGeneral(
        features=features,
        kernel_axes=kernel_axes,
        dtype=dtype_of(cfg.dtype),
        param_dtype=dtype_of(cfg.param_dtype),
        name=name,
        **kw,
    )
    q = constrain(dense(heads, in_axes, "q_proj")(x), axes.ACTIVATION_HEADS)
    k = constrain(dense(heads, in_axes, "k_proj")(context), axes.ACTIVATION_HEADS)
    v = constrain(dense(heads, in_axes, "v_proj")(context), axes.ACTIVATION_HEADS)
    out = dot_product_attention(q, k, v, mask, dtype=dtype_of(cfg.dtype))
    return dense((cfg.hidden_size,), (axes.HEADS, axes.HEAD_DIM, axes.EMBED), "o_proj",
                 in_dims=2)(out)


class CrossAttentionStack(nn.Module):
  """One ATT: `num_layers` pre-norm blocks; the queries change, the context does not.

  Block: x += attn(norm(x), norm(context)); x += mlp(norm(x)).
  """

  config: ModelConfig
  num_layers: int
  mlp_dim: int

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array, mask: jax.Array) -> jax.Array:
    """`x [b, t, d]`, `context [b, s, d]`, `mask` broadcastable to `[b, t, s]` -> `[b, t, d]`."""
    cfg = self.config
    norm = lambda name: RMSNorm(eps=cfg.rms_norm_eps, dtype=dtype_of(cfg.dtype),
                                param_dtype=dtype_of(cfg.param_dtype), name=name)
    for i in range(self.num_layers):
      attended = CrossAttention(cfg, name=f"attention_{i}")(
          norm(f"query_norm_{i}")(x), norm(f"context_norm_{i}")(context), mask)
      x = constrain(x + attended, axes.ACTIVATION_EMBED)
      # The ICM is trained in full: no LoRA adapters on its projections.
      mlp = MLP(cfg.replace(lora_rank=0), self.mlp_dim, name=f"mlp_{i}")
      x = x + mlp(norm(f"mlp_norm_{i}")(x))
      x = constrain(x, axes.ACTIVATION_EMBED)
    return x


class InformationCompression(nn.Module):
  """Candidates `[B, K, Lc, D]` and the query's tokens -> compressed tokens `[B, K, 2, D]`.

  Params: `content_query` (e_con), `relation_query` (e_rel, if separate), `summarize`
  (ATT1), `relate` (ATT2, if `use_relation`), `output_scale`.
  """

  config: ModelConfig
  compression: CompressionConfig

  @nn.compact
  def __call__(
      self,
      candidates: jax.Array,
      candidate_mask: jax.Array,
      query: jax.Array,
      query_mask: jax.Array,
  ) -> jax.Array:
    """Compresses every candidate against its example's query.

    Args:
      candidates: `[B, K, Lc, D]` T_c, full tokens of each candidate (embeddings with
        image features).
      candidate_mask: `[B, K, Lc]` bool, the real tokens of each candidate.
      query: `[B, Tq, D]` tokens holding T_q (e.g. the whole prompt).
      query_mask: `[B, Tq]` bool, which of them are the query's.

    Returns:
      `[B, K, 2, D]`: (t_con, t_rel) per candidate; zeros for a part the config leaves
      out. Masked tokens do not change the result.
    """
    cfg, icm = self.config, self.compression
    b, k, lc, d = candidates.shape
    dtype, param_dtype = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
    mlp_dim = icm.mlp_dim or cfg.intermediate_size
    learned = lambda name: self.param(
        name, nn.with_logical_partitioning(DEFAULT_INIT, (axes.EMBED,)), (d,), param_dtype)
    stack = lambda name: CrossAttentionStack(cfg, icm.num_layers, mlp_dim, name=name)
    summarize = stack("summarize")
    output_scale = self.param(
        "output_scale",
        nn.with_logical_partitioning(nn.initializers.constant(OUTPUT_SCALE_INIT), (axes.EMBED,)),
        (d,),
        param_dtype,
    )
    mask = candidate_mask.reshape(b * k, 1, lc).astype(bool)

    def pool(learned_query: jax.Array, context: jax.Array) -> jax.Array:
      """ATT1 from one learned query over `context [B*K, Lc, D]`, normed -> `[B*K, D]`."""
      x = jnp.broadcast_to(learned_query.astype(dtype), (b * k, 1, d))
      x = summarize(x, context, mask)[:, 0]
      return output_scale.astype(dtype) * rms_normalize(x, cfg.rms_norm_eps).astype(dtype)

    shared = icm.use_content or not icm.separate_relation_query
    content_query = learned("content_query") if shared else None
    zeros = jnp.zeros((b * k, d), dtype)
    t_con, t_rel = zeros, zeros
    if icm.use_content:
      tokens = candidates.reshape(b * k, lc, d).astype(dtype)
      t_con = pool(content_query, constrain(tokens, axes.ACTIVATION_EMBED))
    if icm.use_relation:
      # ATT2 runs per example: all K*Lc candidate tokens attend to that example's query.
      seen = stack("relate")(
          constrain(candidates.reshape(b, k * lc, d).astype(dtype), axes.ACTIVATION_EMBED),
          query.astype(dtype),
          query_mask.astype(bool)[:, None, :],
      )
      relation_query = learned("relation_query") if icm.separate_relation_query else content_query
      t_rel = pool(relation_query, constrain(seen.reshape(b * k, lc, d), axes.ACTIVATION_EMBED))
    return jnp.stack([t_con, t_rel], axis=1).reshape(b, k, 2, d)


def rms_normalize(x: jax.Array, eps: float) -> jax.Array:
  """x / rms(x) over the last axis, in float32 (an RMSNorm without its scale)."""
  x32 = x.astype(jnp.float32)
  return x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)


def dummy_inputs(config: ModelConfig) -> tuple[jax.Array, ...]:
  """The smallest inputs that touch every param: one candidate token, one query token."""
  d = config.hidden_size
  return (jnp.zeros((1, 1, 1, d)), jnp.ones((1, 1, 1), bool), jnp.zeros((1, 1, d)),
          jnp.ones((1, 1), bool))


def init_params(config: ModelConfig, compression: CompressionConfig, rng: jax.Array,
                embedding: jax.Array | None = None) -> dict:
  """Random ICM params; with the LM's `embedding [V, D]` table, `output_scale` fits it."""
  module = InformationCompression(config, compression)
  params = nn.meta.unbox(module.init(rng, *dummy_inputs(config))["params"])
  if embedding is not None:
    params = calibrate_output_scale(params, embedding)
  return params


def calibrate_output_scale(params: dict, embedding: jax.Array) -> dict:
  """Sets `output_scale` to the per-dimension RMS of the LM's `embedding [V, D]` table.

  The normalised outputs have unit RMS, so t_con / t_rel then match the token embeddings'
  size dimension by dimension (a trained LM's embeddings have a few large dimensions).
  """
  rms = jnp.sqrt(jnp.mean(jnp.square(embedding.astype(jnp.float32)), axis=0))
  scale = params["output_scale"]
  if rms.shape != scale.shape:
    raise ValueError(f"embedding table of shape {embedding.shape} does not match the ICM "
                     f"width {scale.shape[0]}")
  return {**params, "output_scale": rms.astype(scale.dtype)}


def abstract_params(config: ModelConfig, compression: CompressionConfig):
  """ICM param shapes with their logical-axis boxes, no memory allocated."""
  module = InformationCompression(config, compression)
  return jax.eval_shape(lambda rng: module.init(rng, *dummy_inputs(config))["params"],
                        jax.random.key(0))
