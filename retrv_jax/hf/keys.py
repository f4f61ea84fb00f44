"""The one key table between Hugging Face Qwen2.5-VL tensors and Flax params.

Each row names a hub key (`{i}` marks the layer index), a Flax param path in the
scanned layout (layers stacked on a leading axis), a transform, and the per-layer
shapes on both sides. Import and export both walk this table; nothing else knows names.

Hub files name keys `visual.*`, `model.*` and `lm_head.weight`; transformers v5 holds
them in memory as `model.visual.*`, `model.language_model.*` (`hub_key` maps those back).
A torch `Linear` stores `[out, in]`; Flax kernels store `[in..., out...]` with heads split
out, e.g. `q_proj.weight [H*E, D]` <-> `q_proj/kernel [D, H, E]`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable

import numpy as np

from retrv_jax.models.config import ModelConfig

Shape = tuple[int, ...]

VISION_STACK = "visual/blocks"
TEXT_STACK = "language_model/layers"


@dataclasses.dataclass(frozen=True)
class Transform:
  """A pair of pure numpy functions between one HF tensor and one per-layer Flax param.

  `to_flax(hf_array, flax_shape)` and `to_hf(flax_array, hf_shape)` are inverses; each
  gets the shape it must produce.
  """

  name: str
  to_flax: Callable[[np.ndarray, Shape], np.ndarray]
  to_hf: Callable[[np.ndarray, Shape], np.ndarray]


def _reshape(x: np.ndarray, shape: Shape) -> np.ndarray:
  return x.reshape(shape)


# Norm scales, embeddings, and biases whose flat `[H*E]` splits into `[H, E]`.
RESHAPE = Transform("reshape", _reshape, _reshape)
# torch Linear `[out, in]` <-> Flax `[*in, *out]` (in/out possibly split into heads).
LINEAR = Transform(
    "linear",
    to_flax=lambda x, shape: x.T.reshape(shape),
    to_hf=lambda x, shape: x.reshape(shape[::-1]).T,
)
# Conv3d `[Dv, C, T, P, P]` (stride = kernel, so a linear map of the flattened patch)
# <-> Flax `[C*T*P*P, Dv]`, flattened in the (C, T, P, P) order the processor emits.
PATCH_CONV = Transform(
    "patch_conv",
    to_flax=lambda x, shape: x.reshape(x.shape[0], -1).T.reshape(shape),
    to_hf=lambda x, shape: x.T.reshape(shape),
)


@dataclasses.dataclass(frozen=True)
class KeySpec:
  """One row of the table; shapes are per layer (no leading layer axis)."""

  hf: str
  flax: str
  transform: Transform
  flax_shape: Shape
  hf_shape: Shape
  num_layers: int = 0  # > 0: one HF tensor per layer, stacked on the Flax side.

  @property
  def stack(self) -> str | None:
    """The stacked module path this row lives under (None for unstacked params)."""
    for stack in (VISION_STACK, TEXT_STACK):
      if self.flax.startswith(stack + "/"):
        return stack
    return None

  def hf_key(self, layer: int | None = None) -> str:
    return self.hf.format(i=layer) if self.num_layers else self.hf

  def hf_keys(self) -> list[str]:
    if not self.num_layers:
      return [self.hf]
    return [self.hf_key(i) for i in range(self.num_layers)]

  def flax_path(self, layer: int | None = None, *, scan_layers: bool = True) -> str:
    """The '/'-joined param path; unscanned layers live under `layers_{i}` / `blocks_{i}`."""
    if not self.num_layers or scan_layers:
      return self.flax
    stack = self.stack
    return f"{stack}_{layer}/{self.flax[len(stack) + 1:]}"

  def param_shape(self, *, scan_layers: bool = True) -> Shape:
    """The Flax param's full shape: a leading layer axis when scanned."""
    if self.num_layers and scan_layers:
      return (self.num_layers, *self.flax_shape)
    return self.flax_shape


def _linear(hf: str, flax: str, in_shape: Shape, out_shape: Shape, layers: int = 0) -> KeySpec:
  return KeySpec(
      hf, flax, LINEAR, (*in_shape, *out_shape), (math.prod(out_shape), math.prod(in_shape)), layers
  )


def _vector(hf: str, flax: str, shape: Shape, layers: int = 0) -> KeySpec:
  return KeySpec(hf, flax, RESHAPE, shape, (math.prod(shape),), layers)


def key_table(config: ModelConfig) -> tuple[KeySpec, ...]:
  """Every tensor of a hub `Qwen2_5_VLForConditionalGeneration` checkpoint, in file order."""
  v = config.vision
  dv, hv, ev, fv, nv = v.hidden_size, v.num_heads, v.head_dim, v.intermediate_size, v.depth
  d, h, kv, e, f, n = (
      config.hidden_size,
      config.num_heads,
      config.num_kv_heads,
      config.head_dim,
      config.intermediate_size,
      config.num_layers,
  )
  merged, out = dv * v.spatial_merge_size**2, v.out_hidden_size
  vb, vs = "visual.blocks.{i}.", VISION_STACK + "/"
  tl, ts = "model.layers.{i}.", TEXT_STACK + "/"
  table = [
      KeySpec(
          "visual.patch_embed.proj.weight",
          "visual/patch_embed/proj/kernel",
          PATCH_CONV,
          (v.patch_dim, dv),
          (dv, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size),
      ),
      _vector(vb + "norm1.weight", vs + "norm1/scale", (dv,), nv),
      _linear(vb + "attn.qkv.weight", vs + "attn/qkv/kernel", (dv,), (3, hv, ev), nv),
      _vector(vb + "attn.qkv.bias", vs + "attn/qkv/bias", (3, hv, ev), nv),
      _linear(vb + "attn.proj.weight", vs + "attn/proj/kernel", (hv, ev), (dv,), nv),
      _vector(vb + "attn.proj.bias", vs + "attn/proj/bias", (dv,), nv),
      _vector(vb + "norm2.weight", vs + "norm2/scale", (dv,), nv),
      _linear(vb + "mlp.gate_proj.weight", vs + "mlp/gate_proj/kernel", (dv,), (fv,), nv),
      _vector(vb + "mlp.gate_proj.bias", vs + "mlp/gate_proj/bias", (fv,), nv),
      _linear(vb + "mlp.up_proj.weight", vs + "mlp/up_proj/kernel", (dv,), (fv,), nv),
      _vector(vb + "mlp.up_proj.bias", vs + "mlp/up_proj/bias", (fv,), nv),
      _linear(vb + "mlp.down_proj.weight", vs + "mlp/down_proj/kernel", (fv,), (dv,), nv),
      _vector(vb + "mlp.down_proj.bias", vs + "mlp/down_proj/bias", (dv,), nv),
      _vector("visual.merger.ln_q.weight", "visual/merger/ln_q/scale", (dv,)),
      _linear("visual.merger.mlp.0.weight", "visual/merger/mlp_0/kernel", (merged,), (merged,)),
      _vector("visual.merger.mlp.0.bias", "visual/merger/mlp_0/bias", (merged,)),
      _linear("visual.merger.mlp.2.weight", "visual/merger/mlp_2/kernel", (merged,), (out,)),
      _vector("visual.merger.mlp.2.bias", "visual/merger/mlp_2/bias", (out,)),
      KeySpec(
          "model.embed_tokens.weight",
          "language_model/embed_tokens/embedding",
          RESHAPE,
          (config.vocab_size, d),
          (config.vocab_size, d),
      ),
      _vector(tl + "input_layernorm.weight", ts + "input_layernorm/scale", (d,), n),
      _linear(tl + "self_attn.q_proj.weight", ts + "self_attn/q_proj/kernel", (d,), (h, e), n),
      _vector(tl + "self_attn.q_proj.bias", ts + "self_attn/q_proj/bias", (h, e), n),
      _linear(tl + "self_attn.k_proj.weight", ts + "self_attn/k_proj/kernel", (d,), (kv, e), n),
      _vector(tl + "self_attn.k_proj.bias", ts + "self_attn/k_proj/bias", (kv, e), n),
      _linear(tl + "self_attn.v_proj.weight", ts + "self_attn/v_proj/kernel", (d,), (kv, e), n),
      _vector(tl + "self_attn.v_proj.bias", ts + "self_attn/v_proj/bias", (kv, e), n),
      _linear(tl + "self_attn.o_proj.weight", ts + "self_attn/o_proj/kernel", (h, e), (d,), n),
      _vector(tl + "post_attention_layernorm.weight", ts + "post_attention_layernorm/scale",
              (d,), n),
      _linear(tl + "mlp.gate_proj.weight", ts + "mlp/gate_proj/kernel", (d,), (f,), n),
      _linear(tl + "mlp.up_proj.weight", ts + "mlp/up_proj/kernel", (d,), (f,), n),
      _linear(tl + "mlp.down_proj.weight", ts + "mlp/down_proj/kernel", (f,), (d,), n),
      _vector("model.norm.weight", "language_model/norm/scale", (d,)),
  ]
  if not config.tie_word_embeddings:
    table.append(_linear("lm_head.weight", "lm_head/kernel", (d,), (config.vocab_size,)))
  return tuple(table)


TIED_LM_HEAD = "lm_head.weight"
TIED_EMBEDDING = "model.embed_tokens.weight"

# transformers v5 in-memory names -> hub names (what `save_pretrained` writes).
_IN_MEMORY_PREFIXES = (
    (re.compile(r"^model\.visual\."), "visual."),
    (re.compile(r"^model\.language_model\."), "model."),
)


def hub_key(name: str) -> str:
  """Maps a checkpoint key to its hub name; hub names pass through unchanged."""
  for pattern, replacement in _IN_MEMORY_PREFIXES:
    if pattern.match(name):
      return pattern.sub(replacement, name, count=1)
  return name


def hf_shapes(config: ModelConfig) -> dict[str, Shape]:
  """Hub key -> tensor shape for every tensor the checkpoint of `config` holds."""
  return {key: spec.hf_shape for spec in key_table(config) for key in spec.hf_keys()}


def param_shapes(config: ModelConfig, *, scan_layers: bool | None = None) -> dict[str, Shape]:
  """'/'-joined Flax param path -> shape, in the scanned or unscanned layout.

  `scan_layers=None` follows `config.scan_layers`.
  """
  scan = config.scan_layers if scan_layers is None else scan_layers
  shapes = {}
  for spec in key_table(config):
    if spec.num_layers and not scan:
      for i in range(spec.num_layers):
        shapes[spec.flax_path(i, scan_layers=False)] = spec.flax_shape
    else:
      shapes[spec.flax] = spec.param_shape(scan_layers=scan)
  return shapes
