"""Building blocks shared by the vision tower and the decoder.

Einsum letters: b batch, t query length, s key length, d embed, h heads, k kv heads,
g query heads per kv head, e head_dim, f mlp.

Every param gets logical axis names where it is created; activations are constrained
with the names in `retrv_jax.models.axes`. No mesh axis name appears in model code.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from retrv_jax import parallel
from retrv_jax.models import axes

Initializer = nn.initializers.Initializer
DEFAULT_INIT = nn.initializers.normal(stddev=0.02)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Sharding constraint by logical axis names under the current mesh and rules.

  A no-op outside `jax.set_mesh` / `nn.logical_axis_rules`; dimensions the mesh axes do
  not divide stay replicated (see `retrv_jax.parallel.logical_to_spec`).
  """
  mesh = jax.sharding.get_abstract_mesh()
  rules = nn.get_logical_axis_rules()
  if mesh.empty or not rules:
    return x
  spec = parallel.logical_to_spec(names, x.shape, mesh.shape, rules)
  return jax.lax.with_sharding_constraint(x, spec)


def dtype_of(name: str) -> jnp.dtype:
  """The jnp dtype named by a config string ('float32', 'bfloat16', ...)."""
  return jnp.dtype(name)


def lora_a_init(in_dims: int) -> Initializer:
  """LoRA's A: uniform(±1/sqrt(fan_in)), the kaiming-uniform(a=√5) init PEFT uses.

  B starts at zero, so a fresh adapter leaves the model unchanged.
  """
  return nn.initializers.variance_scaling(
      1 / 3, "fan_in", "uniform", in_axis=tuple(range(in_dims)), out_axis=-1
  )


def _contract(x: jax.Array, w: jax.Array, in_dims: int) -> jax.Array:
  """Contracts the trailing `in_dims` axes of `x` with the leading `in_dims` axes of `w`."""
  x_letters = "".join(chr(ord("A") + i) for i in range(x.ndim))
  batch, contracted = x_letters[: x.ndim - in_dims], x_letters[x.ndim - in_dims :]
  out_letters = "".join(chr(ord("a") + i) for i in range(w.ndim - in_dims))
  return jnp.einsum(f"{x_letters},{contracted}{out_letters}->{batch}{out_letters}", x, w)


class DenseGeneral(nn.Module):
  """y = x · W (+ b) (+ (alpha / r) · (x · A) · B) contracting the trailing `in_dims` axes.

  Kernel shape is `in_shape + features`; `kernel_axes` names every kernel dimension
  and `bias` (if any) has shape `features` with the trailing names. With `lora_rank`
  r > 0, a low-rank update lives next to the kernel: `lora_a [*in_shape, r]` and
  `lora_b [r, *features]` (the rank axis has no logical name: it is never sharded).
  A module built with r = 0 ignores those params if they are present, which makes
  "LoRA switched off" the same weights under `config.replace(lora_rank=0)`.
  """

  features: Sequence[int]
  kernel_axes: Sequence[str]
  in_dims: int = 1
  use_bias: bool = False
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  kernel_init: Initializer = DEFAULT_INIT
  lora_rank: int = 0
  lora_alpha: float = 16.0

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = tuple(self.features)
    in_shape = tuple(x.shape[x.ndim - self.in_dims:])
    kernel_shape = in_shape + features
    if len(self.kernel_axes) != len(kernel_shape):
      raise ValueError(f"kernel_axes {self.kernel_axes} do not match shape {kernel_shape}")
    in_axes = tuple(self.kernel_axes[: self.in_dims])
    out_axes = tuple(self.kernel_axes[self.in_dims :])
    kernel = self.param(
        "kernel",
        nn.with_logical_partitioning(self.kernel_init, tuple(self.kernel_axes)),
        kernel_shape,
        self.param_dtype,
    )
    x = x.astype(self.dtype)
    y = _contract(x, kernel.astype(self.dtype), self.in_dims)
    if self.lora_rank > 0:
      lora_a = self.param(
          "lora_a",
          nn.with_logical_partitioning(lora_a_init(self.in_dims), in_axes + (None,)),
          in_shape + (self.lora_rank,),
          self.param_dtype,
      )
      lora_b = self.param(
          "lora_b",
          nn.with_logical_partitioning(nn.initializers.zeros_init(), (None,) + out_axes),
          (self.lora_rank,) + features,
          self.param_dtype,
      )
      low_rank = _contract(x, lora_a.astype(self.dtype), self.in_dims)
      scale = self.lora_alpha / self.lora_rank
      y = y + scale * _contract(low_rank, lora_b.astype(self.dtype), 1)
    if self.use_bias:
      bias = self.param(
          "bias",
          nn.with_logical_partitioning(nn.initializers.zeros_init(), out_axes),
          features,
          self.param_dtype,
      )
      y = y + bias.astype(self.dtype)
    return y


class RMSNorm(nn.Module):
  """Root-mean-square norm computed in float32, then scaled (Qwen2 convention)."""

  eps: float = 1e-6
  axis_name: str = axes.EMBED
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param(
        "scale",
        nn.with_logical_partitioning(nn.initializers.ones_init(), (self.axis_name,)),
        (x.shape[-1],),
        self.param_dtype,
    )
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    # Qwen2 casts back to the input dtype before multiplying by the weight.
    return scale.astype(self.dtype) * normed.astype(self.dtype)


def rotate_half(x: jax.Array) -> jax.Array:
  """[x1, x2] -> [-x2, x1] on the last axis (the rotary convention of Hugging Face)."""
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([-x2, x1], axis=-1)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates `x [..., T, H, E]` by angles given as `cos, sin [..., T, E]` (float32)."""
  x32 = x.astype(jnp.float32)
  out = x32 * cos[..., None, :] + rotate_half(x32) * sin[..., None, :]
  return out.astype(x.dtype)


def dot_product_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *, dtype: jnp.dtype
) -> jax.Array:
  """Masked softmax attention with grouped kv heads.

  Args:
    q: `[b, t, h, e]` queries; h must be a multiple of the kv heads.
    k: `[b, s, k, e]` keys.
    v: `[b, s, k, e]` values.
    mask: boolean, broadcastable to `[b, t, s]`; True where a query may attend.
    dtype: compute dtype of the two matmuls; softmax is always float32.

  Returns:
    `[b, t, h, e]`. A query row with no allowed key returns zeros, not NaN.
  """
  b, t, h, e = q.shape
  num_kv = k.shape[2]
  q = q.reshape(b, t, num_kv, h // num_kv, e).astype(dtype)
  logits = jnp.einsum("btkge,bske->bkgts", q, k.astype(dtype), preferred_element_type=jnp.float32)
  logits = logits * (e**-0.5)
  mask = jnp.broadcast_to(mask, (b, t, k.shape[1]))[:, None, None]
  logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1)
  probs = jnp.where(mask, probs, 0.0)
  out = jnp.einsum("bkgts,bske->btkge", probs.astype(dtype), v.astype(dtype))
  return out.reshape(b, t, h, e)


def remat_policy(name: str):
  """Maps a config remat-policy name to a `jax.checkpoint` policy (None: save nothing)."""
  policies = {
      "full": None,
      "dots": jax.checkpoint_policies.checkpoint_dots,
      "dots_with_no_batch_dims": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
      "attention_out": jax.checkpoint_policies.save_only_these_names("attention_out"),
  }
  if name not in policies:
    raise ValueError(f"remat_policy {name!r}: expected one of {sorted(policies)} or 'none'")
  return policies[name]
