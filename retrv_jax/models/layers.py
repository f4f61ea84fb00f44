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


class DenseGeneral(nn.Module):
  """y = x · W (+ b) contracting the trailing `in_dims` axes of x into `features`.

  Kernel shape is `in_shape + features`; `kernel_axes` names every kernel dimension
  and `bias` (if any) has shape `features` with the trailing names.
  """

  features: Sequence[int]
  kernel_axes: Sequence[str]
  in_dims: int = 1
  use_bias: bool = False
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  kernel_init: Initializer = DEFAULT_INIT

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = tuple(self.features)
    in_shape = x.shape[x.ndim - self.in_dims:]
    kernel_shape = tuple(in_shape) + features
    if len(self.kernel_axes) != len(kernel_shape):
      raise ValueError(f"kernel_axes {self.kernel_axes} do not match shape {kernel_shape}")
    kernel = self.param(
        "kernel",
        nn.with_logical_partitioning(self.kernel_init, tuple(self.kernel_axes)),
        kernel_shape,
        self.param_dtype,
    )
    x_letters = "".join(chr(ord("A") + i) for i in range(x.ndim))
    batch, contracted = x_letters[: x.ndim - self.in_dims], x_letters[x.ndim - self.in_dims :]
    out_letters = "".join(chr(ord("a") + i) for i in range(len(features)))
    spec = f"{x_letters},{contracted}{out_letters}->{batch}{out_letters}"
    y = jnp.einsum(spec, x.astype(self.dtype), kernel.astype(self.dtype))
    if self.use_bias:
      bias = self.param(
          "bias",
          nn.with_logical_partitioning(
              nn.initializers.zeros_init(), tuple(self.kernel_axes[self.in_dims:])
          ),
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
