"""Qwen2.5-VL in Flax: vision tower, merged image features, M-RoPE decoder, head.

`Qwen25VL(config).apply({"params": params}, input_ids, pixel_values=..., image_grid_thw=...,
attention_mask=...)` takes what the Hugging Face processor produces and returns logits
`[batch, length, vocab]` in float32. `decode` is the cached path the rollout engine uses,
and `embed` / `forward_embeds` let the compression module feed input embeddings directly.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from retrv_jax import parallel
from retrv_jax.models import axes
from retrv_jax.models.config import ModelConfig
from retrv_jax.models.decoder import KVCache, TextDecoder
from retrv_jax.models.layers import DenseGeneral, constrain, dtype_of
from retrv_jax.models.rope import get_rope_index, mrope_cos_sin
from retrv_jax.models.vision import VisionTower


def causal_mask(attention_mask: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
  """`[b, t, t]` boolean: query i sees valid keys j <= i.

  segment_ids `[b, t]` (optional): 0 for shared slots, n > 0 for the slots of parallel
  piece n, which sees the shared slots before it and its own slots only (a shared slot
  after the pieces sees them all). The pieces are then computed as if each stood alone.
  """
  t = attention_mask.shape[-1]
  mask = jnp.tril(jnp.ones((t, t), bool))[None] & attention_mask.astype(bool)[:, None, :]
  if segment_ids is None:
    return mask
  query, key = segment_ids[:, :, None], segment_ids[:, None, :]
  return mask & ((query == 0) | (key == 0) | (query == key))


def cached_mask(valid: jax.Array, write_index: jax.Array, num_new: int) -> jax.Array:
  """`[b, num_new, max_length]`: new token i (at slot write_index + i) sees valid slots <= it."""
  slots = jnp.arange(valid.shape[-1])
  query_slot = write_index[:, None] + jnp.arange(num_new)[None]
  return (slots[None, None, :] <= query_slot[:, :, None]) & valid[:, None, :]


class Qwen25VL(nn.Module):
  """The full model. Params: `visual`, `language_model`, and `lm_head` when untied."""

  config: ModelConfig

  def setup(self):
    cfg = self.config
    self.visual = VisionTower(cfg)
    self.language_model = TextDecoder(cfg)
    if not cfg.tie_word_embeddings:
      self.lm_head = DenseGeneral(
          features=(cfg.vocab_size,),
          kernel_axes=(axes.EMBED, axes.VOCAB),
          dtype=dtype_of(cfg.dtype),
          param_dtype=dtype_of(cfg.param_dtype),
      )

  def embed(
      self,
      input_ids: jax.Array,
      pixel_values: jax.Array | None = None,
      image_grid_thw: jax.Array | None = None,
  ) -> jax.Array:
    """Token embeddings `[b, t, d]` with merged image features at the image-pad tokens.

    Image features fill the image-pad tokens in order, row-major over the batch, as in
    transformers' `masked_scatter`.
    """
    cfg = self.config
    x = self.language_model.embed(input_ids)
    if pixel_values is None:
      return x
    features = self.visual(pixel_values, image_grid_thw).astype(x.dtype)
    is_image = input_ids == cfg.image_token_id
    _check_image_token_count(is_image, image_grid_thw, cfg)
    ordinal = jnp.cumsum(is_image.reshape(-1)).reshape(is_image.shape) - 1
    gathered = features[jnp.clip(ordinal, 0, features.shape[0] - 1)]
    return jnp.where(is_image[..., None], gathered, x)

  def logits(self, hidden: jax.Array) -> jax.Array:
    """`[b, t, d]` final hidden states -> `[b, t, vocab]` float32 logits."""
    if self.config.tie_word_embeddings:
      out = self.language_model.attend(hidden)
    else:
      out = self.lm_head(hidden)
    return constrain(out.astype(jnp.float32), axes.ACTIVATION_VOCAB)

  def forward_embeds(
      self,
      inputs_embeds: jax.Array,
      position_ids: jax.Array,
      attention_mask: jax.Array,
      *,
      return_hidden: bool = False,
      segment_ids: jax.Array | None = None,
  ) -> jax.Array:
    """Cache-free forward from embeddings `[b, t, d]` and M-RoPE positions `[3, b, t]`;
    `segment_ids [b, t]` mark parallel pieces (`causal_mask`).

    Returns logits `[b, t, vocab]`, or final hidden states `[b, t, d]` if `return_hidden`.
    """
    cos, sin = mrope_cos_sin(position_ids, self.config)
    hidden, _ = self.language_model(inputs_embeds, cos, sin,
                                    causal_mask(attention_mask, segment_ids))
    return hidden if return_hidden else self.logits(hidden)

  def __call__(
      self,
      input_ids: jax.Array,
      pixel_values: jax.Array | None = None,
      image_grid_thw: jax.Array | None = None,
      attention_mask: jax.Array | None = None,
      *,
      position_ids: jax.Array | None = None,
      return_hidden: bool = False,
  ) -> jax.Array:
    """Logits `[b, t, vocab]` for Hugging Face processor outputs.

    Args:
      input_ids: `[b, t]` int token ids with image-pad runs.
      pixel_values: `[num_patches, C*T*P*P]` flattened patches of all images, or None.
      image_grid_thw: `[num_images, 3]` patch grids.
      attention_mask: `[b, t]`, 1 for real tokens, 0 for padding (left or right).
      position_ids: `[3, b, t]`; computed with `get_rope_index` when None. Padding does
        not advance positions (as in Hugging Face generation).
      return_hidden: return final hidden states `[b, t, d]` instead of logits.
    """
    if attention_mask is None:
      attention_mask = jnp.ones(input_ids.shape, jnp.int32)
    if position_ids is None:
      position_ids, _ = get_rope_index(
          input_ids, attention_mask, image_grid_thw, config=self.config
      )
    inputs_embeds = self.embed(input_ids, pixel_values, image_grid_thw)
    return self.forward_embeds(
        inputs_embeds, position_ids, attention_mask, return_hidden=return_hidden
    )

  def decode(
      self,
      inputs_embeds: jax.Array,
      position_ids: jax.Array,
      token_mask: jax.Array,
      cache: KVCache,
      write_index: jax.Array,
      *,
      return_hidden: bool = False,
  ) -> tuple[jax.Array, KVCache]:
    """Runs new tokens against the cache: prefill (t = prompt) or decode (t >= 1).

    Args:
      inputs_embeds: `[b, t, d]` embeddings of the new tokens (see `embed`).
      position_ids: `[3, b, t]` their M-RoPE positions.
      token_mask: `[b, t]` which new tokens are real (a row may add fewer than t).
      cache: the KV cache; slots `write_index[b] .. write_index[b] + t` must exist.
      write_index: `[b]` int slot of each row's first new token.
      return_hidden: return final hidden states `[b, t, d]` instead of logits (a caller
        that needs the logits of a few positions only applies `logits` to those).

    Returns:
      logits `[b, t, vocab]` float32 (or hidden states) and the updated cache.
    """
    valid = _write_valid(cache.valid, token_mask.astype(bool), write_index)
    mask = cached_mask(valid, write_index, inputs_embeds.shape[1])
    cos, sin = mrope_cos_sin(position_ids, self.config)
    hidden, (k, v) = self.language_model(inputs_embeds, cos, sin, mask, cache, write_index)
    out = hidden if return_hidden else self.logits(hidden)
    return out, KVCache(k=k, v=v, valid=valid)


def _write_valid(valid: jax.Array, token_mask: jax.Array, write_index: jax.Array) -> jax.Array:
  return jax.vmap(lambda row, upd, i: jax.lax.dynamic_update_slice_in_dim(row, upd, i, 0))(
      valid, token_mask, write_index
  )


def _check_image_token_count(is_image, image_grid_thw, config: ModelConfig) -> None:
  """Stops with both counts when image-pad tokens and image features disagree (eager only)."""
  if isinstance(is_image, jax.core.Tracer) or isinstance(image_grid_thw, jax.core.Tracer):
    return
  grid = np.asarray(image_grid_thw)
  expected = int(np.sum(np.prod(grid, axis=-1)) // config.vision.spatial_merge_size**2)
  found = int(np.sum(np.asarray(is_image)))
  if found != expected:
    raise ValueError(
        f"input_ids hold {found} image-pad tokens (id {config.image_token_id}) but "
        f"image_grid_thw {grid.tolist()} gives {expected} merged image features"
    )


def dummy_inputs(config: ModelConfig) -> dict[str, jax.Array]:
  """The smallest inputs that touch every param: 4 text tokens and one 1x(2m)x(2m) image."""
  merge = config.vision.spatial_merge_size
  grid = np.array([[1, 2 * merge, 2 * merge]], np.int32)
  num_image_tokens = 4
  ids = np.array([[1] * 4 + [config.image_token_id] * num_image_tokens], np.int32)
  pixels = np.zeros((4 * merge * merge, config.vision.patch_dim), np.float32)
  return {"input_ids": ids, "pixel_values": pixels, "image_grid_thw": grid}


def init_params(config: ModelConfig, rng: jax.Array, *, mesh=None, rules=None) -> dict:
  """Random params; with a mesh, created directly in their shards (never whole on one host)."""
  init = lambda key: nn.meta.unbox(Qwen25VL(config).init(key, **dummy_inputs(config))["params"])
  if mesh is None:
    return init(rng)
  shardings = parallel.shardings_of(abstract_params(config), mesh, rules)
  with jax.set_mesh(mesh), parallel.with_rules(rules):
    return jax.jit(init, out_shardings=shardings)(rng)


def abstract_params(config: ModelConfig):
  """Param shapes and logical-axis boxes, with no memory allocated."""
  return jax.eval_shape(
      lambda rng: Qwen25VL(config).init(rng, **dummy_inputs(config))["params"],
      jax.random.key(0),
  )
