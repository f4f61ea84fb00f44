"""Multimodal rotary positions (M-RoPE) of the Qwen2.5-VL decoder.

Every token has three position ids (temporal, height, width). Text tokens carry the
same value in all three; the tokens of an image carry `start + (t, h, w)` over its
merged grid, and the text after the image resumes at `start + max(h, w)`. This is what
transformers v5 `Qwen2_5_VLModel.get_rope_index` computes; here it is vectorised with
static shapes so that it runs inside `jax.jit`.

Token layout of one row (P = padding, I = image-pad tokens of one 2x2 merged grid):

    ids      : t  t  <vs> I  I  I  I  <ve> t  P  P
    temporal : 0  1  2    3  3  3  3  5    6  0  0
    height   : 0  1  2    3  3  4  4  5    6  0  0
    width    : 0  1  2    3  4  3  4  5    6  0  0
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from retrv_jax.models.config import ModelConfig


def get_rope_index(
    input_ids: jax.Array,
    attention_mask: jax.Array | None,
    image_grid_thw: jax.Array | None,
    *,
    config: ModelConfig,
) -> tuple[jax.Array, jax.Array]:
  """Position ids `[3, batch, length]` and the next position of each row `[batch]`.

  Args:
    input_ids: `[batch, length]` token ids; images appear as runs of
      `config.image_token_id`, one run of `t*h*w / merge**2` tokens per image, in the
      order of `image_grid_thw` (row-major over the batch).
    attention_mask: `[batch, length]`, 1 for real tokens; padding gets position 0 and
      does not advance the count. None means no padding.
    image_grid_thw: `[num_images, 3]` patch grids (before merging), or None.
    config: the model config (token ids, merge size).

  Returns:
    positions: `[3, batch, length]` int32.
    next_position: `[batch]` int32, the position the next generated token takes
      (HF's `rope_deltas` equal `next_position - number of real tokens`).
  """
  batch, length = input_ids.shape
  valid = jnp.ones((batch, length), bool) if attention_mask is None else attention_mask.astype(bool)
  is_image = (input_ids == config.image_token_id) & valid
  text_advance = valid.astype(jnp.int32)

  if image_grid_thw is None or image_grid_thw.shape[0] == 0:
    offsets = jnp.zeros((3, batch, length), jnp.int32)
    advance = text_advance
  else:
    merge = config.vision.spatial_merge_size
    grid = jnp.asarray(image_grid_thw, jnp.int32)
    grid_h, grid_w = grid[:, 1] // merge, grid[:, 2] // merge
    tokens_per_image = grid[:, 0] * grid_h * grid_w
    image_end = jnp.cumsum(tokens_per_image)
    image_start = image_end - tokens_per_image
    # Ordinal of each image token over the whole batch, then its image and offset.
    ordinal = jnp.cumsum(is_image.reshape(-1)).reshape(batch, length) - 1
    image = jnp.clip(jnp.searchsorted(image_end, ordinal, side="right"), 0, grid.shape[0] - 1)
    offset = ordinal - image_start[image]
    h, w = grid_h[image], grid_w[image]
    t_idx, h_idx, w_idx = offset // (h * w), (offset // w) % h, offset % w
    offsets = jnp.where(is_image[None], jnp.stack([t_idx, h_idx, w_idx]), 0)
    # An image advances the position by max(h, w), charged on its last token.
    last_of_image = is_image & (offset == tokens_per_image[image] - 1)
    advance = jnp.where(is_image, jnp.where(last_of_image, jnp.maximum(h, w), 0), text_advance)

  start = jnp.cumsum(advance, axis=-1) - advance  # Exclusive prefix sum per row.
  positions = jnp.where(valid[None], start[None] + offsets, 0).astype(jnp.int32)
  next_position = jnp.sum(advance, axis=-1).astype(jnp.int32)
  return positions, next_position


def text_positions(next_position: jax.Array, length: int) -> jax.Array:
  """Positions `[3, batch, length]` of `length` text tokens following `next_position [batch]`."""
  pos = next_position[:, None] + jnp.arange(length, dtype=jnp.int32)[None]
  return jnp.broadcast_to(pos[None], (3,) + pos.shape)


def mrope_cos_sin(positions: jax.Array, config: ModelConfig) -> tuple[jax.Array, jax.Array]:
  """Rotary `cos, sin [batch, length, head_dim]` in float32 for M-RoPE positions `[3, b, t]`.

  Frequency pair j belongs to section s (its position row) by `config.mrope_section`;
  the two halves of the head dimension share the same angles (rotate-half layout).
  """
  head_dim = config.head_dim
  inv_freq = 1.0 / (
      config.rope_theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  )
  section_of_freq = jnp.repeat(
      jnp.arange(len(config.mrope_section)) % 3,
      jnp.array(config.mrope_section),
      total_repeat_length=head_dim // 2,
  )
  pos = positions.astype(jnp.float32)[section_of_freq, :, :]  # [E/2, b, t]
  angles = jnp.moveaxis(pos, 0, -1) * inv_freq  # [b, t, E/2]
  angles = jnp.concatenate([angles, angles], axis=-1)
  return jnp.cos(angles), jnp.sin(angles)
