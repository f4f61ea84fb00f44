"""Parity of `retrv_jax.models.vision.VisionTower` with the Hugging Face Qwen2.5-VL tower.

Oracle: a tiny random `Qwen2_5_VisionTransformerPretrainedModel` (tests/hf_oracle.py) in
float32, compared on its `pooler_output`. Patches are 2x2 with two frames and three
channels (patch_dim 24), merge size 2, so a 12x10-patch image is 6x5 merge blocks and a
2-block window leaves partial windows at the right and bottom edges. Every parity case
runs twice: attention over the whole sequence, and per image (`max_patches_per_image`).
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import hf_oracle
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.vision_utils import get_vision_position_ids

from retrv_jax import config as config_lib
from retrv_jax.models import vision as vision_lib
from retrv_jax.models.config import ModelConfig, VisionConfig, qwen2_5_vl_7b

TOL = 1e-4

_BASE = VisionConfig(
    depth=2,
    hidden_size=32,
    intermediate_size=48,
    num_heads=2,
    in_channels=3,
    out_hidden_size=24,
    patch_size=2,
    temporal_patch_size=2,
    spatial_merge_size=2,
    window_size=11,  # 11 // 2 // 2 = 2 merge blocks per window side.
    fullatt_block_indexes=(1,),
)
CONFIGS = {
    "win2_full1_depth2_heads2": _BASE,
    "win3_fullnone_depth3_heads4": dataclasses.replace(
        _BASE, depth=3, hidden_size=48, num_heads=4, intermediate_size=64, out_hidden_size=40,
        window_size=12, fullatt_block_indexes=(),
    ),
    "win1_fullall_depth4_heads4": dataclasses.replace(
        _BASE, depth=4, num_heads=4, intermediate_size=40, out_hidden_size=16, window_size=4,
        fullatt_block_indexes=(0, 1, 2, 3),
    ),
    "win4_full02_depth4_heads2": dataclasses.replace(
        _BASE, depth=4, window_size=16, fullatt_block_indexes=(0, 2),
    ),
}
ONE_IMAGE = np.array([[1, 12, 10]])
# Three entries of different sizes; the last has two frames (attention stays per frame).
MANY_IMAGES = np.array([[1, 12, 10], [1, 6, 8], [2, 4, 6]])
LARGEST = 120  # Patches of the largest image above: the tightest per-image bound.


def _model_config(vision: VisionConfig, max_patches: int = 0, **changes) -> ModelConfig:
  vision = dataclasses.replace(vision, max_patches_per_image=max_patches)
  return ModelConfig(vision=vision, **changes)


def _params_from_torch(state_dict: dict, vision: VisionConfig, *, scan: bool) -> dict:
  """Minimal HF -> Flax mapping for these tests (the project converter replaces it)."""
  sd = {k: v.detach().numpy() for k, v in state_dict.items()}
  d, h, e = vision.hidden_size, vision.num_heads, vision.head_dim

  def linear(prefix: str) -> dict:
    return {"kernel": sd[f"{prefix}.weight"].T, "bias": sd[f"{prefix}.bias"]}

  def block(i: int) -> dict:
    p = f"blocks.{i}"
    return {
        "norm1": {"scale": sd[f"{p}.norm1.weight"]},
        "norm2": {"scale": sd[f"{p}.norm2.weight"]},
        "attn": {
            "qkv": {
                "kernel": sd[f"{p}.attn.qkv.weight"].T.reshape(d, 3, h, e),
                "bias": sd[f"{p}.attn.qkv.bias"].reshape(3, h, e),
            },
            "proj": {
                "kernel": sd[f"{p}.attn.proj.weight"].T.reshape(h, e, d),
                "bias": sd[f"{p}.attn.proj.bias"],
            },
        },
        "mlp": {name: linear(f"{p}.mlp.{name}") for name in ("gate_proj", "up_proj", "down_proj")},
    }

  tree = {
      "patch_embed": {"proj": {"kernel": sd["patch_embed.proj.weight"].reshape(d, -1).T}},
      "merger": {
          "ln_q": {"scale": sd["merger.ln_q.weight"]},
          "mlp_0": linear("merger.mlp.0"),
          "mlp_2": linear("merger.mlp.2"),
      },
  }
  blocks = [block(i) for i in range(vision.depth)]
  if scan:
    tree["blocks"] = jax.tree.map(lambda *xs: np.stack(xs), *blocks)
  else:
    tree.update({f"blocks_{i}": b for i, b in enumerate(blocks)})
  return {"params": tree}


@functools.cache
def _oracle(name: str):
  """(HF model, scanned params, unscanned params) for a config, built once."""
  vision = CONFIGS[name]
  model = hf_oracle.hf_vision_model(vision, seed=len(name))
  state = model.state_dict()
  return (
      model,
      _params_from_torch(state, vision, scan=True),
      _params_from_torch(state, vision, scan=False),
  )


def _jitted_apply(config: ModelConfig):
  return jax.jit(vision_lib.VisionTower(config).apply)


def _max_diff(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def test_patch_layout_matches_hf_positions():
  layout = vision_lib.patch_layout(MANY_IMAGES, 216, merge_size=2, window_units=2)
  expected = get_vision_position_ids(torch.as_tensor(MANY_IMAGES), 2).numpy()
  np.testing.assert_array_equal(np.stack([layout.row, layout.col], axis=-1), expected)
  # Segments are frames: 1 + 1 + 2 of them, in order.
  sizes = [120, 48, 24, 24]
  np.testing.assert_array_equal(layout.segment, np.repeat(np.arange(4), sizes))


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("grid", [ONE_IMAGE, MANY_IMAGES], ids=["one_image", "many_images"])
def test_matches_hf(name, grid):
  vision = CONFIGS[name]
  model, params, _ = _oracle(name)
  pixels = hf_oracle.random_pixel_values(grid, vision, seed=1)
  expected = hf_oracle.hf_vision_forward(model, pixels, grid)
  dense = _jitted_apply(_model_config(vision))(params, pixels, grid)
  per_image = _jitted_apply(_model_config(vision, LARGEST))(params, pixels, grid)
  assert dense.shape == per_image.shape == expected.shape
  assert expected.shape == (len(pixels) // 4, vision.out_hidden_size)
  assert np.abs(expected).max() > 0.1  # The oracle is not trivially small.
  diffs = _max_diff(dense, expected), _max_diff(per_image, expected)
  print(f"\n{name} {len(grid)} image(s): max|delta| vs HF dense {diffs[0]:.2e}, "
        f"per image {diffs[1]:.2e}")
  assert max(diffs) <= TOL
  assert _max_diff(per_image, dense) <= 1e-5


@pytest.mark.parametrize(
    ("remat_policy", "max_patches"),
    [("none", 0), ("full", 0), ("attention_out", 0), ("full", LARGEST), ("attention_out", 128)],
)
def test_scanned_equals_unscanned(remat_policy, max_patches):
  name = "win4_full02_depth4_heads2"
  vision = CONFIGS[name]
  _, scanned, unscanned = _oracle(name)
  pixels = hf_oracle.random_pixel_values(MANY_IMAGES, vision, seed=2)
  out_scan = _jitted_apply(_model_config(vision, max_patches, remat_policy=remat_policy))(
      scanned, pixels, MANY_IMAGES
  )
  out_loop = _jitted_apply(_model_config(vision, max_patches, scan_layers=False))(
      unscanned, pixels, MANY_IMAGES
  )
  assert _max_diff(out_scan, out_loop) <= 1e-5  # Same math, different fusion.


def test_per_image_gradients_equal_dense():
  name = "win2_full1_depth2_heads2"
  vision = CONFIGS[name]
  _, params, _ = _oracle(name)
  pixels = hf_oracle.random_pixel_values(MANY_IMAGES, vision, seed=7)

  def grads(max_patches: int) -> dict:
    tower = vision_lib.VisionTower(_model_config(vision, max_patches))
    loss = lambda p: jnp.sum(tower.apply(p, pixels, MANY_IMAGES) ** 2)
    return jax.jit(jax.grad(loss))(params)

  dense, per_image = grads(0), grads(128)
  scale = max(float(np.abs(np.asarray(g)).max()) for g in jax.tree.leaves(dense))
  assert scale > 0.1
  diff = max(jax.tree.leaves(jax.tree.map(_max_diff, per_image, dense)))
  assert diff <= 1e-5 * scale


@pytest.mark.parametrize("max_patches", [0, LARGEST])
def test_jit_with_traced_grid_equals_eager_and_hf(max_patches):
  name = "win2_full1_depth2_heads2"
  vision = CONFIGS[name]
  model, params, _ = _oracle(name)
  tower = vision_lib.VisionTower(_model_config(vision, max_patches))
  traces = []

  @jax.jit
  def run(params, pixels, grid):
    traces.append(grid)
    return tower.apply(params, pixels, grid)

  pixels = hf_oracle.random_pixel_values(MANY_IMAGES, vision, seed=3)
  eager = tower.apply(params, pixels, MANY_IMAGES)
  assert _max_diff(run(params, pixels, jnp.asarray(MANY_IMAGES)), eager) <= 1e-6
  # Same patch count, other images: no retrace, and still equal to HF.
  other = np.array([[1, 6, 8], [2, 4, 6], [1, 10, 12]])
  got = run(params, pixels, jnp.asarray(other))
  assert len(traces) == 1
  assert _max_diff(got, hf_oracle.hf_vision_forward(model, pixels, other)) <= TOL


@pytest.mark.parametrize("max_patches", [0, 128])
def test_padding_rows_and_absent_images_leave_real_outputs_unchanged(max_patches):
  name = "win4_full02_depth4_heads2"
  vision = CONFIGS[name]
  _, params, _ = _oracle(name)
  pixels = hf_oracle.random_pixel_values(MANY_IMAGES, vision, seed=4)
  rng = np.random.default_rng(5)
  padded = np.concatenate([pixels, 100 * rng.standard_normal((32, vision.patch_dim))], axis=0)
  padded = padded.astype(np.float32)
  # Absent images (zero rows) first, between and after the real ones, as `Reranker.encode`
  # sends them.
  zero = np.zeros((1, 3), np.int64)
  padded_grid = np.concatenate(
      [zero, MANY_IMAGES[:1], zero, zero, MANY_IMAGES[1:], zero], axis=0
  )
  real = _jitted_apply(_model_config(vision))(params, pixels, MANY_IMAGES)
  out = _jitted_apply(_model_config(vision, max_patches))(params, padded, padded_grid)
  assert out.shape == (real.shape[0] + 8, vision.out_hidden_size)
  assert _max_diff(out[: real.shape[0]], real) <= 1e-5
  assert np.isfinite(np.asarray(out)).all()


def test_traced_image_past_max_patches_touches_no_other_image():
  name = "win2_full1_depth2_heads2"
  vision = CONFIGS[name]
  _, params, _ = _oracle(name)
  grid = np.array([[1, 6, 8], [1, 12, 10], [2, 4, 6]])  # 48, 120 and 48 patches.
  pixels = hf_oracle.random_pixel_values(grid, vision, seed=8)
  dense = _jitted_apply(_model_config(vision))(params, pixels, grid)
  # 64 < 120: the middle image overflows; a traced grid cannot be checked.
  out = _jitted_apply(_model_config(vision, 64))(params, pixels, jnp.asarray(grid))
  assert np.isfinite(np.asarray(out)).all()
  first, middle = slice(0, 12), slice(12, 42)
  assert _max_diff(out[first], dense[first]) <= 1e-5
  assert _max_diff(out[42:], dense[42:]) <= 1e-5
  assert _max_diff(out[middle], dense[middle]) > 1e-2  # Truncated attention, as documented.


def test_image_past_max_patches_is_an_error_when_the_grid_is_concrete():
  vision = CONFIGS["win2_full1_depth2_heads2"]
  tower = vision_lib.VisionTower(_model_config(vision, 64))
  grid = np.array([[1, 6, 8], [1, 12, 10], [0, 0, 0]])
  pixels = jnp.zeros((168, vision.patch_dim))
  message = r"image 1 has 120 patches \(t\*h\*w = 1\*12\*10\).*max_patches_per_image=64"
  with pytest.raises(ValueError, match=message):
    tower.init(jax.random.key(0), pixels, grid)


@pytest.mark.parametrize("value", [-1, 2.5, True])
def test_bad_max_patches_per_image_names_the_field(value):
  model = ModelConfig(vision=dataclasses.replace(VisionConfig(), max_patches_per_image=value))
  with pytest.raises(config_lib.ConfigError, match=r"model\.vision\.max_patches_per_image"):
    config_lib.validate_model(model)
  config_lib.validate_model(model.replace(vision=VisionConfig(max_patches_per_image=1024)))


def test_bfloat16_close_to_float32():
  name = "win2_full1_depth2_heads2"
  vision = CONFIGS[name]
  _, params, _ = _oracle(name)
  pixels = hf_oracle.random_pixel_values(MANY_IMAGES, vision, seed=6)
  f32 = _jitted_apply(_model_config(vision))(params, pixels, MANY_IMAGES)
  bf16 = _jitted_apply(_model_config(vision, dtype="bfloat16"))(params, pixels, MANY_IMAGES)
  assert bf16.dtype == jnp.bfloat16
  scale = float(np.abs(np.asarray(f32)).max())
  diff = _max_diff(bf16, f32)
  print(f"\nbfloat16 vs float32: max|delta| = {diff:.3e}, max|f32| = {scale:.3f}")
  assert diff <= 0.05 * scale


def _expected_shapes(vision: VisionConfig, *, scan: bool) -> dict[str, tuple[int, ...]]:
  d, h, e, f = vision.hidden_size, vision.num_heads, vision.head_dim, vision.intermediate_size
  merged = 4 * d
  block = {
      "norm1/scale": (d,),
      "norm2/scale": (d,),
      "attn/qkv/kernel": (d, 3, h, e),
      "attn/qkv/bias": (3, h, e),
      "attn/proj/kernel": (h, e, d),
      "attn/proj/bias": (d,),
      "mlp/gate_proj/kernel": (d, f),
      "mlp/gate_proj/bias": (f,),
      "mlp/up_proj/kernel": (d, f),
      "mlp/up_proj/bias": (f,),
      "mlp/down_proj/kernel": (f, d),
      "mlp/down_proj/bias": (d,),
  }
  shapes = {
      "patch_embed/proj/kernel": (vision.patch_dim, d),
      "merger/ln_q/scale": (d,),
      "merger/mlp_0/kernel": (merged, merged),
      "merger/mlp_0/bias": (merged,),
      "merger/mlp_2/kernel": (merged, vision.out_hidden_size),
      "merger/mlp_2/bias": (vision.out_hidden_size,),
  }
  if scan:
    shapes.update({f"blocks/{k}": (vision.depth, *v) for k, v in block.items()})
  else:
    for i in range(vision.depth):
      shapes.update({f"blocks_{i}/{k}": v for k, v in block.items()})
  return shapes


def _flat(tree) -> dict:
  return {
      "/".join(str(k.key) for k in path): leaf
      for path, leaf in jax.tree_util.tree_leaves_with_path(
          tree, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)
      )
  }


@pytest.mark.parametrize("max_patches", [0, LARGEST])
@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unscanned"])
def test_param_tree_and_logical_axes(scan, max_patches):
  vision = CONFIGS["win3_fullnone_depth3_heads4"]
  tower = vision_lib.VisionTower(_model_config(vision, max_patches, scan_layers=scan))
  grid = np.array([[1, 4, 4]])
  variables = jax.eval_shape(
      tower.init, jax.random.key(0), jnp.zeros((16, vision.patch_dim)), grid
  )
  shapes = {k: v.shape for k, v in _flat(nn.unbox(variables)["params"]).items()}
  assert shapes == _expected_shapes(vision, scan=scan)
  specs = _flat(nn.get_partition_spec(variables)["params"])
  qkv = "blocks/attn/qkv/kernel" if scan else "blocks_0/attn/qkv/kernel"
  layer_axis = ("layers",) if scan else ()
  assert tuple(specs[qkv]) == (
      *layer_axis, "vision_embed", "vision_qkv", "vision_heads", "head_dim"
  )
  assert tuple(specs["patch_embed/proj/kernel"]) == ("vision_patch_dim", "vision_embed")
  assert tuple(specs["merger/mlp_2/kernel"]) == ("vision_mlp", "embed")
  # The torch mapping produces exactly this tree.
  _, scanned, unscanned = _oracle("win3_fullnone_depth3_heads4")
  mapped = scanned if scan else unscanned
  assert {k: v.shape for k, v in _flat(mapped["params"]).items()} == shapes


def test_full_size_shapes():
  config = qwen2_5_vl_7b()
  tower = vision_lib.VisionTower(config)
  grid = np.array([[1, 8, 8], [1, 4, 4]])
  pixels = jnp.zeros((80, config.vision.patch_dim))
  variables = jax.eval_shape(tower.init, jax.random.key(0), pixels, grid)
  out = jax.eval_shape(tower.apply, variables, pixels, grid)
  assert out.shape == (20, 3584)
  qkv = nn.unbox(variables)["params"]["blocks"]["attn"]["qkv"]["kernel"]
  assert qkv.shape == (32, 1280, 3, 16, 80)


@pytest.mark.parametrize(
    ("vision_changes", "pixels_shape", "grid", "message"),
    [
        ({}, (16, 23), [[1, 4, 4]], "expected \\[num_patches, 24\\]"),
        ({}, (18, 24), [[1, 3, 6]], "not a multiple of spatial_merge_size"),
        ({}, (24, 24), [[1, 3, 8]], "multiples of spatial_merge_size"),
        ({}, (16, 24), [[1, 4, 8]], "asks for 32 patches"),
        ({"window_size": 3}, (16, 24), [[1, 4, 4]], "window_size=3"),
    ],
)
def test_bad_input_names_the_problem(vision_changes, pixels_shape, grid, message):
  vision = dataclasses.replace(_BASE, **vision_changes)
  tower = vision_lib.VisionTower(_model_config(vision))
  with pytest.raises(ValueError, match=message):  # Raised before any computation.
    tower.init(jax.random.key(0), jnp.zeros(pixels_shape), np.array(grid))
