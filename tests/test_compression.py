"""The information compression module: shapes, masks, what depends on what, init scale."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retrv_jax.models import compression as C
from retrv_jax.models.config import ModelConfig

CONFIG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=1,
                     num_heads=4, num_kv_heads=2, mrope_section=(1, 1, 2))
B, K, LC, TQ, D = 2, 3, 5, 7, 32


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  cands = rng.normal(size=(B, K, LC, D)).astype(np.float32) * 0.02
  cand_mask = np.arange(LC)[None, None] < rng.integers(1, LC + 1, size=(B, K, 1))
  query = rng.normal(size=(B, TQ, D)).astype(np.float32) * 0.02
  query_mask = np.zeros((B, TQ), bool)
  query_mask[0, 1:4], query_mask[1, 2:7] = True, True  # Query tokens inside a longer prompt.
  return cands, cand_mask, query, query_mask


def _run(icm_config, params, *inputs):
  return C.InformationCompression(CONFIG, icm_config).apply({"params": params}, *inputs)


@pytest.fixture(scope="module")
def params():
  return C.init_params(CONFIG, C.CompressionConfig(), jax.random.key(0))


def test_shapes_and_padding_invariance(params):
  cands, cand_mask, query, query_mask = _inputs()
  out = _run(C.CompressionConfig(), params, cands, cand_mask, query, query_mask)
  assert out.shape == (B, K, 2, D) and bool(jnp.isfinite(out).all())
  # More masked tokens (random values, and the masked slots themselves changed) on both sides.
  rng = np.random.default_rng(1)
  noise = lambda shape: rng.normal(size=shape).astype(np.float32)
  cands_pad = np.concatenate([cands, noise((B, K, 3, D))], axis=2)
  cands_pad[:, :, :LC][~cand_mask] = noise(cands.shape)[~cand_mask]
  mask_pad = np.concatenate([cand_mask, np.zeros((B, K, 3), bool)], axis=2)
  query_pad = np.concatenate([noise((B, 4, D)), query], axis=1)
  query_pad[:, 4:][~query_mask] = noise(query.shape)[~query_mask]
  qmask_pad = np.concatenate([np.zeros((B, 4), bool), query_mask], axis=1)
  padded = _run(C.CompressionConfig(), params, cands_pad, mask_pad, query_pad, qmask_pad)
  np.testing.assert_allclose(padded, out, atol=1e-6)
  # A candidate with no tokens still gives finite tokens.
  empty = _run(C.CompressionConfig(), params, cands, np.zeros_like(cand_mask), query, query_mask)
  assert bool(jnp.isfinite(empty).all())


def test_relation_depends_on_query_content_does_not(params):
  cands, cand_mask, query, query_mask = _inputs()
  out = _run(C.CompressionConfig(), params, cands, cand_mask, query, query_mask)
  other = query.copy()
  other[0, 2] += 0.05  # One real query token of example 0.
  moved = _run(C.CompressionConfig(), params, cands, cand_mask, other, query_mask)
  np.testing.assert_array_equal(moved[..., 0, :], out[..., 0, :])  # t_con.
  np.testing.assert_array_equal(moved[1], out[1])  # Example 1 has its own query.
  assert float(jnp.abs(moved[0, :, 1] - out[0, :, 1]).max(-1).min()) > 1e-4  # Every t_rel.
  # And a candidate's tokens move its own outputs only.
  cands2 = cands.copy()
  cands2[1, 2, 0] += 0.05
  moved = _run(C.CompressionConfig(), params, cands2, cand_mask, query, query_mask)
  diff = np.abs(np.asarray(moved - out)).max(axis=(2, 3))
  assert diff[1, 2] > 1e-5 and np.delete(diff.reshape(-1), 1 * K + 2).max() == 0


def test_variants_and_their_params(params):
  cands, cand_mask, query, query_mask = _inputs()
  inputs = (cands, cand_mask, query, query_mask)
  assert set(params) == {"content_query", "output_scale", "summarize", "relate"}
  full = _run(C.CompressionConfig(), params, *inputs)

  no_rel = C.CompressionConfig(use_relation=False)
  p = C.init_params(CONFIG, no_rel, jax.random.key(0))
  assert "relate" not in p
  out = _run(no_rel, p, *inputs)
  np.testing.assert_allclose(out[..., 0, :], full[..., 0, :], atol=1e-6)  # Same init key.
  assert not np.asarray(out[..., 1, :]).any()

  no_con = C.CompressionConfig(use_content=False, separate_relation_query=True)
  p = C.init_params(CONFIG, no_con, jax.random.key(0))
  assert "content_query" not in p and "relation_query" in p
  out = _run(no_con, p, *inputs)
  assert not np.asarray(out[..., 0, :]).any() and np.asarray(out[..., 1, :]).all()

  deep = C.CompressionConfig(num_layers=2, mlp_dim=16)
  p = C.init_params(CONFIG, deep, jax.random.key(0))
  assert set(p["summarize"]) >= {"attention_1", "mlp_1"}
  assert p["relate"]["mlp_0"]["gate_proj"]["kernel"].shape == (D, 16)
  assert _run(deep, p, *inputs).shape == (B, K, 2, D)

  assert C.CompressionConfig(use_content=False).candidate_slots == ("rel",)
  with pytest.raises(ValueError, match="both False"):
    C.CompressionConfig(use_content=False, use_relation=False)
  with pytest.raises(ValueError, match="num_layers"):
    C.CompressionConfig(num_layers=0)


def test_params_have_logical_axes():
  boxed = C.abstract_params(CONFIG, C.CompressionConfig(separate_relation_query=True))
  names = {
      "/".join(str(getattr(k, "key", k)) for k in path): leaf.names
      for path, leaf in jax.tree_util.tree_flatten_with_path(
          boxed, is_leaf=lambda x: hasattr(x, "names"))[0]
  }
  assert names["relation_query"] == ("embed",)
  assert names["summarize/attention_0/q_proj/kernel"] == ("embed", "heads", "head_dim")
  assert names["relate/mlp_0/down_proj/kernel"] == ("mlp", "embed")
  assert all(all(n is not None for n in v) for v in names.values())


def test_output_scale_matches_token_embeddings():
  rng = np.random.default_rng(3)
  # An embedding table with uneven dimensions, like a trained LM's.
  dim_scale = np.where(np.arange(D) < 4, 0.5, 0.01).astype(np.float32)
  table = rng.normal(size=(500, D)).astype(np.float32) * dim_scale
  p = C.init_params(CONFIG, C.CompressionConfig(), jax.random.key(0), table)
  np.testing.assert_allclose(p["output_scale"], np.sqrt((table**2).mean(0)), rtol=1e-5)
  cands = table[rng.integers(0, 500, size=(B, K, LC))]
  query = table[rng.integers(0, 500, size=(B, TQ))]
  out = np.asarray(_run(C.CompressionConfig(), p, cands, np.ones((B, K, LC), bool), query,
                        np.ones((B, TQ), bool)))
  ratio = np.sqrt((out**2).mean()) / np.sqrt((table**2).mean())
  assert 0.5 < ratio < 2.0, ratio
  big = np.abs(out[..., :4]).mean() / np.abs(out[..., 4:]).mean()
  assert big > 10  # The large dimensions stay large.
  # Uncalibrated: the random backbone's embedding scale.
  p = C.init_params(CONFIG, C.CompressionConfig(), jax.random.key(0))
  np.testing.assert_allclose(p["output_scale"], C.OUTPUT_SCALE_INIT)
  with pytest.raises(ValueError, match="does not match the ICM width"):
    C.calibrate_output_scale(p, table[:, :8])


def test_every_param_gets_a_gradient():
  icm = C.CompressionConfig(separate_relation_query=True)
  p = C.init_params(CONFIG, icm, jax.random.key(0))
  inputs = _inputs()
  loss = lambda p: jnp.sum(_run(icm, p, *inputs) ** 2)
  grads = jax.jit(jax.grad(loss))(p)
  norms = {jax.tree_util.keystr(path): float(jnp.abs(g).max())
           for path, g in jax.tree_util.tree_leaves_with_path(grads)}
  assert all(np.isfinite(v) and v > 0 for v in norms.values()), norms
