"""Sharded forward passes equal the single-device result; logical rules map as documented."""

import os
import subprocess
import sys

import jax
import numpy as np
import portpicker
import pytest
from jax.sharding import PartitionSpec
from test_kv_cache import CONFIG

from retrv_jax import parallel
from retrv_jax.models import qwen2_5_vl


def _batch():
  rng = np.random.default_rng(0)
  ids = rng.integers(3, 59, size=(8, 12)).astype(np.int32)
  ids[0, 2:10] = [60] + [63] * 4 + [61] + [5, 6]
  mask = np.ones_like(ids)
  mask[3, 9:] = 0
  grid = np.array([[1, 4, 4]], np.int32)
  pixels = rng.normal(size=(16, CONFIG.vision.patch_dim)).astype(np.float32)
  return ids, mask, pixels, grid


@pytest.fixture(scope="module")
def reference():
  params = qwen2_5_vl.init_params(CONFIG, jax.random.key(0))
  ids, mask, pixels, grid = _batch()
  logits = qwen2_5_vl.Qwen25VL(CONFIG).apply({"params": params}, ids, pixels, grid, mask)
  return params, np.asarray(logits)


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 2, 2), (1, 2, 4)])
def test_sharded_forward_equals_single_device(reference, shape):
  params, expected = reference
  mesh = parallel.create_mesh(dict(zip(parallel.MESH_AXES, shape, strict=True)))
  rules = parallel.DEFAULT_RULES
  shardings = parallel.shardings_of(qwen2_5_vl.abstract_params(CONFIG), mesh, rules)
  sharded_params = jax.device_put(params, shardings)
  ids, mask, pixels, grid = _batch()
  ids_g, mask_g = parallel.shard_batch((ids, mask), mesh)
  model = qwen2_5_vl.Qwen25VL(CONFIG)
  with jax.set_mesh(mesh), parallel.with_rules(rules):
    logits = jax.jit(lambda p, i, m: model.apply({"params": p}, i, pixels, grid, m))(
        sharded_params, ids_g, mask_g
    )
  assert logits.sharding.shard_shape(logits.shape)[0] == 8 // (shape[0] * shape[1])
  np.testing.assert_allclose(np.asarray(logits), expected, atol=2e-5, rtol=1e-5)
  # The params really are split: q_proj heads over `tensor`, embed over `fsdp`.
  q_kernel = sharded_params["language_model"]["layers"]["self_attn"]["q_proj"]["kernel"]
  layers, embed, heads, head_dim = q_kernel.shape
  assert q_kernel.sharding.shard_shape(q_kernel.shape) == (
      layers, embed // shape[1], heads // shape[2], head_dim)


def test_rules_replicate_what_does_not_divide():
  sizes = {"data": 1, "fsdp": 2, "tensor": 4}
  rules = parallel.DEFAULT_RULES
  # 2 kv heads cannot split 4 ways; 6 embed rows split 2 ways.
  spec = parallel.logical_to_spec(("embed", "kv_heads", "head_dim"), (6, 2, 8), sizes, rules)
  assert spec == PartitionSpec("fsdp", None, None)
  spec = parallel.logical_to_spec(("batch", "length"), (4, 3), sizes, rules)
  assert spec == PartitionSpec(("data", "fsdp"), None)
  spec = parallel.logical_to_spec(("batch", "length"), (3, 3), sizes, rules)
  assert spec == PartitionSpec(None, None)


def test_mesh_shape_resolves_the_rest_and_names_bad_sizes():
  assert parallel.mesh_shape({"data": 1, "fsdp": -1, "tensor": 2}, 8) == (1, 4, 2)
  with pytest.raises(ValueError, match="do not divide 8 devices"):
    parallel.mesh_shape({"data": 3, "fsdp": -1, "tensor": 1}, 8)
  with pytest.raises(ValueError, match="at most one axis may be -1"):
    parallel.mesh_shape({"data": -1, "fsdp": -1, "tensor": 1}, 8)
  with pytest.raises(ValueError, match="use 4 of 8 devices"):
    parallel.mesh_shape({"data": 2, "fsdp": 2, "tensor": 1}, 8)


def test_two_processes_feeding_local_halves_equal_one_process(reference, tmp_path):
  """2 processes x 4 CPU devices joined over 127.0.0.1 (gloo) give the 1-process logits."""
  _, expected = reference
  port = portpicker.pick_unused_port()
  out = tmp_path / "logits.npy"
  worker = os.path.join(os.path.dirname(__file__), "workers", "distributed_forward.py")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  procs = [
      subprocess.Popen([sys.executable, worker, str(port), str(i), str(out)], env=env,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)
  ]
  logs = [p.communicate(timeout=300)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
  np.testing.assert_allclose(np.load(out), expected, atol=2e-5, rtol=1e-5)
