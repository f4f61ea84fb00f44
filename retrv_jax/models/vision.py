"""The Qwen2.5-VL vision tower: a ViT with 2D rotary, window attention and a patch merger.

Input contract (what `VisionTower.__call__` expects):
  pixel_values `[N, C*T*P*P]`: flattened patches as the Hugging Face image processor
    emits them, image after image; inside one image frame after frame, and inside a
    frame merge block after merge block (row-major over the `h/m x w/m` blocks), each
    block's `m x m` patches row-major. N is static and a multiple of `m*m`.
  image_grid_thw `[num_images, 3]` int: (t, h, w) patches per image, h and w multiples
    of m. It may be traced (one compile per N and num_images); a concrete grid is
    checked against N. Rows of pixel_values past `sum(t*h*w)` are padding: they attend
    to nothing, nothing attends to them, and their merged outputs are meaningless (but
    finite). A grid row of zeros is an absent image (for a static num_images).
  Frames of one entry (t > 1) attend only within themselves, as in Hugging Face.
  `fullatt_block_indexes` outside `[0, depth)` are ignored, as in Hugging Face.
Output: `[N / m^2, out_hidden_size]`, one row per merge block in input order (the
Hugging Face `pooler_output`, concatenated over images), padding blocks at the end.

Window attention is expressed as a boolean mask. Hugging Face reorders the patches window
by window, attends inside each window and restores the order; attention and the per-patch
layers are permutation-equivariant and the reorder moves whole merge blocks, so masking
"same frame and same window" in the original order is the same computation. Full-attention
blocks mask "same frame". The windowed blocks cost as much as the full ones (static shapes).

Where attention runs (`AttentionGroups`), set by `vision.max_patches_per_image` = P:
  0: over the whole sequence, `[N, N]` masks: cost and memory O(N^2) in the patches of
    all images of a call. Fine for a few small images.
  P > 0: per image. q, k, v are gathered into `[num_images, P]` slots (image i's patch j
    at slot (i, j)), attention runs inside each image with `[num_images, P, P]` masks, and
    the result is gathered back into sequence order; everything else runs on the sequence
    as above. Exact: attention never crosses images anyway. Contract: every image has
    t*h*w <= P. A concrete grid is checked (ValueError naming the image); with a traced
    grid an image's patches past the first P attend to nothing (their attention output
    is zero) and its first P patches attend only among themselves: that image's features
    are wrong, but finite, and no other image is touched.

Einsum letters as in `layers`: n patches, d vision embed, h heads, e head_dim, f mlp.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from retrv_jax.models import axes, layers
from retrv_jax.models.config import ModelConfig, VisionConfig

ROPE_THETA = 10000.0  # Fixed in Qwen2.5-VL's vision rotary (not a checkpoint field).


class PatchLayout(NamedTuple):
  """Where each patch of the flattened sequence sits; every field is `[N]` int32.

  `segment` is the global frame index (-1 on padding rows): attention never crosses it.
  `row`, `col` are the patch coordinates inside its frame; `window_row`, `window_col`
  the window holding its merge block; `image` the grid row of its entry and `offset` its
  position inside that entry (both meaningless on padding rows).
  """

  segment: jax.Array
  row: jax.Array
  col: jax.Array
  window_row: jax.Array
  window_col: jax.Array
  image: jax.Array
  offset: jax.Array


class AttentionGroups(NamedTuple):
  """Patches grouped into `[G, S]` slots; attention never leaves a group.

  Dense: one group, the whole sequence in order (G = 1, S = N), `gather` and `scatter`
  None. Per image: group i holds image i's patches at slots 0..t*h*w-1 (S = P).
  `segment`, `window_row`, `window_col` `[G, S]` int32 as in `PatchLayout`, segment -1
  on empty slots. `gather [G, S]`: the sequence row of each slot (clamped on empty ones);
  `scatter [N]`: the flat slot `g * S + s` of each row, `G * S` for rows in no slot.
  """

  segment: jax.Array
  window_row: jax.Array
  window_col: jax.Array
  gather: jax.Array | None = None
  scatter: jax.Array | None = None


def merged_window_size(vision: VisionConfig) -> int:
  """Window side in merge blocks (Hugging Face's `vit_merger_window_size`)."""
  units = vision.window_size // vision.spatial_merge_size // vision.patch_size
  if units < 1:
    raise ValueError(
        f"model.vision.window_size={vision.window_size}: must be at least "
        f"patch_size * spatial_merge_size = {vision.patch_size * vision.spatial_merge_size}"
    )
  return units


def patch_layout(
    image_grid_thw: jax.Array, num_patches: int, *, merge_size: int, window_units: int
) -> PatchLayout:
  """Per-patch frame, coordinates and window from `image_grid_thw [num_images, 3]`.

  Pure jnp on a possibly traced grid; `num_patches` is static.
  """
  grid = jnp.asarray(image_grid_thw, jnp.int32)
  t, h, w = grid[:, 0], grid[:, 1], grid[:, 2]
  sizes = t * h * w
  ends = jnp.cumsum(sizes)
  p = jnp.arange(num_patches, dtype=jnp.int32)
  # Images with no patches have end == previous end and are skipped by this count.
  image = jnp.minimum(jnp.sum(p[:, None] >= ends[None, :], axis=1), grid.shape[0] - 1)
  valid = p < ends[-1]
  local = p - (ends - sizes)[image]
  frame, within_frame = jnp.divmod(local, jnp.maximum(h * w, 1)[image])
  block, within_block = jnp.divmod(within_frame, merge_size * merge_size)
  block_row, block_col = jnp.divmod(block, jnp.maximum(w // merge_size, 1)[image])
  frames_before = jnp.cumsum(t) - t
  return PatchLayout(
      segment=jnp.where(valid, frames_before[image] + frame, -1),
      row=block_row * merge_size + within_block // merge_size,
      col=block_col * merge_size + within_block % merge_size,
      window_row=block_row // window_units,
      window_col=block_col // window_units,
      image=image,
      offset=local,
  )


def sequence_groups(layout: PatchLayout) -> AttentionGroups:
  """One group: the whole patch sequence, `[N, N]` masks."""
  return AttentionGroups(
      segment=layout.segment[None], window_row=layout.window_row[None],
      window_col=layout.window_col[None],
  )


def image_groups(
    layout: PatchLayout, image_grid_thw: jax.Array, max_patches: int
) -> AttentionGroups:
  """One group of `max_patches` slots per grid row; see the module docstring's contract."""
  grid = jnp.asarray(image_grid_thw, jnp.int32)
  num_images, num_patches = grid.shape[0], layout.segment.shape[0]
  sizes = jnp.prod(grid, axis=1)
  slot = jnp.arange(max_patches, dtype=jnp.int32)
  filled = slot[None, :] < sizes[:, None]  # [G, S]
  gather = jnp.minimum((jnp.cumsum(sizes) - sizes)[:, None] + slot[None, :], num_patches - 1)
  in_slot = (layout.segment >= 0) & (layout.offset < max_patches)
  return AttentionGroups(
      segment=jnp.where(filled, layout.segment[gather], -1),
      window_row=layout.window_row[gather],
      window_col=layout.window_col[gather],
      gather=gather,
      scatter=jnp.where(in_slot, layout.image * max_patches + layout.offset,
                        num_images * max_patches),
  )


def attention_mask(groups: AttentionGroups, is_full: jax.Array) -> jax.Array:
  """Boolean `[G, S, S]` (query, key): same frame, and same window unless `is_full`."""
  def same(field: jax.Array) -> jax.Array:
    return field[:, :, None] == field[:, None, :]

  window = same(groups.window_row) & same(groups.window_col)
  return same(groups.segment) & (groups.segment >= 0)[:, :, None] & (is_full | window)


def grouped_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, groups: AttentionGroups, is_full: jax.Array,
    *, dtype: jnp.dtype,
) -> jax.Array:
  """`q, k, v [n, h, e]` -> `[n, h, e]`, attending inside groups only; rows in no slot get 0."""
  mask = attention_mask(groups, is_full)
  if groups.gather is None:
    return layers.dot_product_attention(q[None], k[None], v[None], mask, dtype=dtype)[0]
  q, k, v = (x[groups.gather] for x in (q, k, v))  # [G, S, h, e]
  out = layers.dot_product_attention(q, k, v, mask, dtype=dtype)
  out = out.reshape(-1, *out.shape[2:])
  return jnp.take(out, groups.scatter, axis=0, mode="fill", fill_value=0)


def rotary_cos_sin(layout: PatchLayout, head_dim: int) -> tuple[jax.Array, jax.Array]:
  """Axial 2D rotary tables `[N, head_dim]` (float32): half of the pairs rotate by row,
  half by column, laid out `[row, col, row, col]` for `layers.apply_rotary`."""
  if head_dim % 4:
    raise ValueError(f"vision head_dim={head_dim}: the 2D rotary needs a multiple of 4")
  quarter = head_dim // 4
  inv_freq = 1.0 / (ROPE_THETA ** (np.arange(quarter, dtype=np.float32) * 2 / (head_dim // 2)))
  inv_freq = jnp.asarray(inv_freq, jnp.float32)
  angles = jnp.concatenate(
      [layout.row[:, None].astype(jnp.float32) * inv_freq,
       layout.col[:, None].astype(jnp.float32) * inv_freq],
      axis=-1,
  )
  angles = jnp.concatenate([angles, angles], axis=-1)
  return jnp.cos(angles), jnp.sin(angles)


def _check_grid(
    image_grid_thw: np.ndarray, num_patches: int, merge_size: int, max_patches: int
) -> None:
  """Checks a concrete grid (shape, merge multiples, patch count, `max_patches` if set)."""
  grid = np.asarray(image_grid_thw)
  if grid.ndim != 2 or grid.shape[1] != 3 or grid.shape[0] < 1:
    raise ValueError(f"image_grid_thw: expected shape [num_images>=1, 3], got {grid.shape}")
  if (grid < 0).any():
    raise ValueError(f"image_grid_thw: negative entries in {grid.tolist()}")
  odd = [i for i, (_, h, w) in enumerate(grid) if h % merge_size or w % merge_size]
  if odd:
    raise ValueError(
        f"image_grid_thw rows {odd}: h and w must be multiples of spatial_merge_size="
        f"{merge_size}, got {grid[odd].tolist()}"
    )
  total = int(np.prod(grid, axis=1).sum())
  if total > num_patches:
    raise ValueError(
        f"image_grid_thw asks for {total} patches but pixel_values has {num_patches} rows"
    )
  sizes = np.prod(grid, axis=1)
  if max_patches and (sizes > max_patches).any():
    i = int(np.argmax(sizes > max_patches))
    raise ValueError(
        f"image_grid_thw row {i}: image {i} has {sizes[i]} patches (t*h*w = "
        f"{'*'.join(map(str, grid[i]))}) but model.vision.max_patches_per_image="
        f"{max_patches}; raise it to the largest image's patch count ({sizes.max()}) or "
        "resize the image"
    )


class VisionAttention(nn.Module):
  """Bidirectional multi-head attention with fused qkv, 2D rotary, inside patch groups."""

  config: ModelConfig

  @nn.compact
  def __call__(
      self, x: jax.Array, cos: jax.Array, sin: jax.Array, groups: AttentionGroups,
      is_full: jax.Array,
  ) -> jax.Array:
    """`x [n, d]`, `cos, sin [n, e]`, `is_full []` bool -> `[n, d]`."""
    vision = self.config.vision
    dtype = layers.dtype_of(self.config.dtype)
    param_dtype = layers.dtype_of(self.config.param_dtype)
    heads, head_dim = vision.num_heads, vision.head_dim
    qkv = layers.DenseGeneral(
        features=(3, heads, head_dim),
        kernel_axes=(axes.VISION_EMBED, axes.VISION_QKV, axes.VISION_HEADS, axes.HEAD_DIM),
        use_bias=True,
        dtype=dtype,
        param_dtype=param_dtype,
        name="qkv",
    )(x)
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
    q = layers.apply_rotary(q, cos, sin)
    k = layers.apply_rotary(k, cos, sin)
    out = grouped_attention(q, k, v, groups, is_full, dtype=dtype)
    out = checkpoint_name(out, "attention_out")
    return layers.DenseGeneral(
        features=(vision.hidden_size,),
        kernel_axes=(axes.VISION_HEADS, axes.HEAD_DIM, axes.VISION_EMBED),
        in_dims=2,
        use_bias=True,
        dtype=dtype,
        param_dtype=param_dtype,
        name="proj",
    )(out)


class VisionMLP(nn.Module):
  """SwiGLU with biases: down(silu(gate(x)) * up(x))."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """`x [n, d]` -> `[n, d]`."""
    vision = self.config.vision

    def dense(features: int, kernel_axes: tuple[str, str], name: str) -> layers.DenseGeneral:
      return layers.DenseGeneral(
          features=(features,),
          kernel_axes=kernel_axes,
          use_bias=True,
          dtype=layers.dtype_of(self.config.dtype),
          param_dtype=layers.dtype_of(self.config.param_dtype),
          name=name,
      )

    up_axes = (axes.VISION_EMBED, axes.VISION_MLP)
    gate = dense(vision.intermediate_size, up_axes, "gate_proj")(x)
    up = dense(vision.intermediate_size, up_axes, "up_proj")(x)
    down_axes = (axes.VISION_MLP, axes.VISION_EMBED)
    return dense(vision.hidden_size, down_axes, "down_proj")(nn.silu(gate) * up)


class VisionBlock(nn.Module):
  """Pre-norm transformer block; `is_full` picks full or windowed attention."""

  config: ModelConfig

  @nn.compact
  def __call__(
      self,
      x: jax.Array,
      is_full: jax.Array,
      cos: jax.Array,
      sin: jax.Array,
      groups: AttentionGroups,
  ) -> tuple[jax.Array, None]:
    """`x [n, d]`, `is_full []` bool, `cos, sin [n, e]` -> (`[n, d]`, None) for `nn.scan`."""
    dtype = layers.dtype_of(self.config.dtype)
    param_dtype = layers.dtype_of(self.config.param_dtype)

    def norm(name: str) -> layers.RMSNorm:
      return layers.RMSNorm(
          eps=self.config.vision.rms_norm_eps,
          axis_name=axes.VISION_EMBED,
          dtype=dtype,
          param_dtype=param_dtype,
          name=name,
      )

    x = x + VisionAttention(self.config, name="attn")(norm("norm1")(x), cos, sin, groups, is_full)
    x = x + VisionMLP(self.config, name="mlp")(norm("norm2")(x))
    return layers.constrain(x, axes.VISION_ACTIVATION), None


class PatchMerger(nn.Module):
  """RMSNorm each patch, concatenate each m x m block, then a GELU MLP into the LM width."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """`x [n, d]` -> `[n / m^2, out_hidden_size]`."""
    vision = self.config.vision
    dtype = layers.dtype_of(self.config.dtype)
    param_dtype = layers.dtype_of(self.config.param_dtype)
    x = layers.RMSNorm(
        eps=vision.rms_norm_eps,
        axis_name=axes.VISION_EMBED,
        dtype=dtype,
        param_dtype=param_dtype,
        name="ln_q",
    )(x)
    merged = vision.hidden_size * vision.spatial_merge_size**2
    x = x.reshape(-1, merged)
    x = layers.DenseGeneral(
        features=(merged,),
        kernel_axes=(axes.VISION_EMBED, axes.VISION_MLP),
        use_bias=True,
        dtype=dtype,
        param_dtype=param_dtype,
        name="mlp_0",
    )(x)
    x = jax.nn.gelu(x, approximate=False)
    return layers.DenseGeneral(
        features=(vision.out_hidden_size,),
        kernel_axes=(axes.VISION_MLP, axes.EMBED),
        use_bias=True,
        dtype=dtype,
        param_dtype=param_dtype,
        name="mlp_2",
    )(x)


class PatchEmbed(nn.Module):
  """The stride-P Conv3d on one patch is a dense over the flattened `(C, T, P, P)` patch."""

  config: ModelConfig

  @nn.compact
  def __call__(self, pixel_values: jax.Array) -> jax.Array:
    """`[n, C*T*P*P]` -> `[n, d]`."""
    return layers.DenseGeneral(
        features=(self.config.vision.hidden_size,),
        kernel_axes=(axes.VISION_PATCH_DIM, axes.VISION_EMBED),
        dtype=layers.dtype_of(self.config.dtype),
        param_dtype=layers.dtype_of(self.config.param_dtype),
        name="proj",
    )(pixel_values)


class VisionTower(nn.Module):
  """Patch embedding, `depth` blocks, patch merger; see the module docstring for the contract."""

  config: ModelConfig

  @nn.compact
  def __call__(self, pixel_values: jax.Array, image_grid_thw: jax.Array) -> jax.Array:
    """`pixel_values [N, C*T*P*P]`, `image_grid_thw [num_images, 3]` -> `[N/m^2, out]`."""
    config, vision = self.config, self.config.vision
    merge = vision.spatial_merge_size
    if pixel_values.ndim != 2 or pixel_values.shape[1] != vision.patch_dim:
      raise ValueError(
          f"pixel_values: expected [num_patches, {vision.patch_dim}] "
          f"(C*T*P*P), got {pixel_values.shape}"
      )
    num_patches = pixel_values.shape[0]
    if num_patches % (merge * merge):
      raise ValueError(
          f"pixel_values: {num_patches} rows is not a multiple of spatial_merge_size^2 = "
          f"{merge * merge}; pad with whole merge blocks"
      )
    max_patches = vision.max_patches_per_image
    if not isinstance(image_grid_thw, jax.core.Tracer):
      _check_grid(image_grid_thw, num_patches, merge, max_patches)

    layout = patch_layout(
        image_grid_thw,
        num_patches,
        merge_size=merge,
        window_units=merged_window_size(vision),
    )
    if max_patches:
      groups = image_groups(layout, image_grid_thw, max_patches)
    else:
      groups = sequence_groups(layout)
    cos, sin = rotary_cos_sin(layout, vision.head_dim)

    x = PatchEmbed(config, name="patch_embed")(pixel_values)
    x = layers.constrain(x, axes.VISION_ACTIVATION)

    full_flags = jnp.asarray(
        [i in vision.fullatt_block_indexes for i in range(vision.depth)], jnp.bool_
    )
    block_cls = VisionBlock
    if config.remat_policy != "none":
      block_cls = nn.remat(
          block_cls,
          policy=layers.remat_policy(config.remat_policy),
          prevent_cse=not config.scan_layers,
      )
    if config.scan_layers:
      stack = nn.scan(
          block_cls,
          variable_axes={"params": 0},
          split_rngs={"params": True},
          in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
          length=vision.depth,
          metadata_params={nn.PARTITION_NAME: axes.LAYERS},
      )
      x, _ = stack(config, name="blocks")(x, full_flags, cos, sin, groups)
    else:
      for i in range(vision.depth):
        x, _ = block_cls(config, name=f"blocks_{i}")(x, full_flags[i], cos, sin, groups)
    return PatchMerger(config, name="merger")(x)

