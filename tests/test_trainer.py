"""The loop every stage runs (`retrv_jax.stages.trainer`): gradient accumulation is exact,
a SIGTERM-stopped run resumes to the uninterrupted result, a non-finite step keeps the
last good state, and the state keeps its shardings from step to step."""

import dataclasses
import json
import os
import signal
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec
from tiny_bench import make_bench

from retrv_jax import checkpoint, optim, parallel
from retrv_jax.data.pipeline import PipelineConfig, make_iterator, split_host_fields
from retrv_jax.data.tokenizer import load_tokenizer
from retrv_jax.metrics import JSONL_NAME
from retrv_jax.models import lora
from retrv_jax.models.compression import CompressionConfig
from retrv_jax.models.config import ModelConfig, tiny
from retrv_jax.models.reranker import Reranker
from retrv_jax.stages import outputs, pretrain, sft, trainer

K = 4
STEPS = 4


def _mesh(devices: int):
  return parallel.create_mesh({"data": 1, "fsdp": devices, "tensor": 1},
                              devices=jax.devices()[:devices])


def _small_model(**changes) -> ModelConfig:
  """The tiny preset (its tokenizer's vocabulary) at 1 layer and width 64."""
  base = tiny()
  vision = dataclasses.replace(base.vision, depth=1, fullatt_block_indexes=(0,), hidden_size=32,
                               intermediate_size=64, num_heads=2, out_hidden_size=64)
  return base.replace(num_layers=1, hidden_size=64, intermediate_size=128, num_heads=2,
                      num_kv_heads=1, mrope_section=(4, 6, 6), vision=vision, **changes)


def _section(steps: int, save_every: int) -> ml_collections.ConfigDict:
  section = ml_collections.ConfigDict()
  section.steps = steps
  section.log_every = 1
  section.optim = optim.default_config()
  section.optim.total_steps = steps
  section.optim.warmup_steps = 0
  section.checkpoint = checkpoint.default_config()
  section.checkpoint.save_every_steps = save_every
  section.checkpoint.max_to_keep = 5
  return section


def _leaves(tree) -> list[np.ndarray]:
  """Leaves as numpy arrays (PRNG keys as their data)."""
  is_key = lambda x: jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
  return [np.asarray(jax.random.key_data(x) if is_key(x) else x) for x in jax.tree.leaves(tree)]


def _assert_close(actual, expected, **tolerance):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, b in zip(_leaves(actual), _leaves(expected), strict=True):
    np.testing.assert_allclose(a, b, **tolerance)


def _jsonl(directory: str) -> list[dict]:
  with open(os.path.join(directory, JSONL_NAME)) as f:
    return [json.loads(line) for line in f]


# ------------------------------------------------------------------ the SFT stage's step


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """A tiny re-ranker with non-zero LoRA B, its SFT step (jitted once) and pipeline."""
  root = make_bench(tmp_path_factory, k=K, num_train=3, num_val=1, num_test=1)
  tok = load_tokenizer()
  data = PipelineConfig(data_dir=root, source="mbeir", batch_size=2, num_candidates=K,
                        prompt_buckets=(256,), max_candidate_tokens=32, max_response_tokens=192)
  model_config = _small_model(lora_rank=4, lora_alpha=8.0)
  icm = CompressionConfig()
  params = jax.jit(lambda key: outputs.load_params("", model_config, icm, key))(jax.random.key(0))
  flat = traverse_util.flatten_dict(params)
  for i, path in enumerate(sorted(flat)):
    if path[-1] == lora.LORA_B:  # So that lora_a gets gradients too.
      flat[path] = 0.05 * jax.random.normal(jax.random.key(i), flat[path].shape)
  trainable, frozen = lora.partition(traverse_util.unflatten_dict(flat),
                                     lora.path_regex(*sft.TRAINABLE))
  # SGD with momentum: the first update is linear in the gradient, and there is an
  # optimizer state to restore.
  tx = optax.sgd(0.05, momentum=0.9)
  step = jax.jit(sft.make_step(Reranker(model_config, icm), None, tok, tx))
  return types.SimpleNamespace(tok=tok, data=data, trainable=trainable, frozen=frozen, tx=tx,
                               step=step, mesh=_mesh(1))


def _batches(setup, batch_size: int, count: int, stage: str = "sft"
             ) -> tuple[tuple[dict, ...], list[str]]:
  """The first `count` batches of `batch_size` (unshuffled) and their qids."""
  data = dataclasses.replace(setup.data, batch_size=batch_size, shuffle=False)
  iterator = make_iterator(stage, data, setup.tok)
  micro, qids = [], []
  for _ in range(count):
    arrays, host = split_host_fields(next(iterator))
    micro.append(parallel.shard_batch(arrays, setup.mesh))
    qids += list(host["qid"])
  return tuple(micro), qids


def test_accumulated_micro_batches_equal_one_large_batch(setup):
  two, qids_two = _batches(setup, 2, 2)
  one, qids_one = _batches(setup, 4, 1)
  assert qids_two == qids_one  # The same four examples.
  state = trainer.init_state(setup.trainable, setup.tx, jax.random.key(1))

  after_two, out_two = setup.step(state, setup.frozen, two)
  after_one, out_one = setup.step(state, setup.frozen, one)

  assert bool(out_two["finite"]) and bool(out_one["finite"])
  np.testing.assert_allclose(out_two["loss"], out_one["loss"], rtol=1e-5)
  np.testing.assert_allclose(out_two["grad_norm"], out_one["grad_norm"], rtol=1e-5)
  _assert_close(out_two["pairs"]["nll"], out_one["pairs"]["nll"], rtol=1e-5)
  # The momentum trace after one step is the gradient itself.
  grads_two = optax.tree_utils.tree_get(after_two.opt_state, "trace")
  grads_one = optax.tree_utils.tree_get(after_one.opt_state, "trace")
  _assert_close(grads_two, grads_one, rtol=1e-4, atol=1e-7)
  _assert_close(after_two.trainable, after_one.trainable, rtol=0, atol=1e-6)
  assert int(after_two.step) == int(after_one.step) == 1
  # Every trainable group gets a gradient: the ICM and both LoRA factors.
  flat = traverse_util.flatten_dict(grads_one, sep="/")
  for group in ("icm/", "lora_a", "lora_b"):
    norms = [float(jnp.linalg.norm(v)) for k, v in flat.items() if group in k]
    assert norms and max(norms) > 0, group


def _pretrain_config(tasks: str, curriculum: str = "", workspace: bool = False,
                     tag: bool = False, verdict_weight: float = 0.0, parallel: bool = False
                     ) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "compression": {"max_query_tokens": 64}, "data": {"num_candidates": K},
      "pretrain": {"candidates_per_example": 2, "tasks": tasks, "steps": STEPS,
                   "point_curriculum": curriculum, "point_workspace": workspace,
                   "point_tag": tag, "point_verdict_weight": verdict_weight,
                   "point_parallel": parallel}})


@pytest.mark.parametrize("tasks,tag", [("describe,template,point", False),
                                       ("relate,template", False), ("relate,point", True)])
def test_pretrain_accumulation_equals_one_large_batch(setup, tasks, tag):
  """The template LM term of `pretrain` must not weigh more with more micro-batches, nor
  the pointing verdicts."""
  model_config = _small_model()
  icm = CompressionConfig(enabled=False)
  params = jax.jit(lambda key: outputs.load_params("", model_config, icm, key))(jax.random.key(0))
  trainable, frozen = lora.partition(params, lora.path_regex(*pretrain.TRAINABLE))
  config = _pretrain_config(tasks, tag=tag, verdict_weight=1.0 if tag else 0.0)
  tx = optax.sgd(0.05)
  step = jax.jit(pretrain.make_step(Reranker(model_config, icm), config, setup.tok, tx))
  two, _ = _batches(setup, 2, 2, stage="align")
  one, _ = _batches(setup, 4, 1, stage="align")
  state = trainer.init_state(trainable, tx, jax.random.key(1))

  after_two, out_two = step(state, frozen, two)
  after_one, out_one = step(state, frozen, one)

  np.testing.assert_allclose(out_two["loss"], out_one["loss"], rtol=1e-5)
  np.testing.assert_allclose(out_two["grad_norm"], out_one["grad_norm"], rtol=1e-4)
  _assert_close(after_two.trainable, after_one.trainable, rtol=0, atol=1e-7)
  # 'relate' scores the relation rows alone.
  assert "relation_loss" in out_one["pairs"]
  assert ("content_loss" in out_one["pairs"]) == tasks.startswith("describe")
  assert ("point_verdict_loss" in out_one["pairs"]) == tag
  if tag:
    np.testing.assert_allclose(out_two["pairs"]["point_verdict_loss"],
                               out_one["pairs"]["point_verdict_loss"], rtol=1e-5)


@pytest.mark.parametrize("tag,weight", [(True, -1.0), (False, 0.5)])
def test_a_bad_verdict_weight_is_named(setup, tag, weight):
  config = _pretrain_config("relate,point", tag=tag, verdict_weight=weight)
  with pytest.raises(ValueError, match=r"config\.pretrain\.point_verdict_weight"):
    pretrain.make_step(Reranker(_small_model(), CompressionConfig(enabled=False)), config,
                       setup.tok, optax.sgd(0.05))


def test_parallel_pieces_without_tags_are_named(setup):
  config = _pretrain_config("relate,point", parallel=True)
  with pytest.raises(ValueError, match=r"config\.pretrain\.point_parallel"):
    pretrain.make_step(Reranker(_small_model(), CompressionConfig(enabled=False)), config,
                       setup.tok, optax.sgd(0.05))


def test_pretrain_point_lists_follow_the_curriculum_step_by_step(setup):
  """Rungs of 2 (easy), 3 and 4 candidates: each step scores lists of its rung's size."""
  model_config = _small_model()
  icm = CompressionConfig(enabled=False)
  params = jax.jit(lambda key: outputs.load_params("", model_config, icm, key))(jax.random.key(0))
  trainable, frozen = lora.partition(params, lora.path_regex(*pretrain.TRAINABLE))
  config = _pretrain_config("relate,point", curriculum="2:easy:1,3:all:1,4:all",
                            workspace=True)
  config.pretrain.steps = 3
  tx = optax.sgd(0.05)
  step = jax.jit(pretrain.make_step(Reranker(model_config, icm), config, setup.tok, tx))
  batch, _ = _batches(setup, 2, 1, stage="align")
  state = trainer.init_state(trainable, tx, jax.random.key(1))
  sizes, losses = [], []
  for _ in range(4):  # The last rung goes on past the stage's steps.
    state, out = step(state, frozen, batch)
    total, lists_count = out["pairs"]["point_list_size"]
    sizes.append(float(total / lists_count))
    losses.append(float(out["pairs"]["point_loss"][0] / lists_count))
  assert sizes == [2.0, 3.0, 4.0, 4.0]
  assert all(np.isfinite(losses))


@pytest.mark.parametrize("tasks", ["template", "describe,relate", "describe,caption"])
def test_pretrain_rejects_bad_tasks(setup, tasks):
  icm = CompressionConfig(enabled=False)
  with pytest.raises(ValueError, match="config.pretrain.tasks"):
    pretrain.make_step(Reranker(_small_model(), icm), _pretrain_config(tasks), setup.tok,
                       optax.sgd(0.1))


def _job(setup, directory: str, step_fn, *, save_every: int = 2) -> trainer.Job:
  data = dataclasses.replace(setup.data, shuffle=True, seed=3)
  return trainer.Job(name="sft", section=_section(STEPS, save_every), directory=directory,
                     iterator=make_iterator("sft", data, setup.tok), micro_batches=2,
                     step_fn=step_fn, frozen=setup.frozen, mesh=setup.mesh)


@pytest.fixture
def sigterm_flag():
  """The project's SIGTERM handler for one test, on top of the default action."""
  previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
  checkpoint._STOP.clear()
  checkpoint.install_sigterm_handler()
  yield
  signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
  checkpoint._STOP.clear()


def test_sigterm_saves_and_resume_equals_uninterrupted(setup, tmp_path, sigterm_flag):
  fresh = lambda: trainer.init_state(setup.trainable, setup.tx, jax.random.key(2))
  dir_a, dir_b = str(tmp_path / "a"), str(tmp_path / "b")
  final_a, stopped = trainer.run_loop(_job(setup, dir_a, setup.step), fresh())
  assert not stopped and int(final_a.step) == STEPS

  calls = []

  def terminated_at_third_call(state, frozen, micro):
    calls.append(int(state.step))
    if len(calls) == 3:
      os.kill(os.getpid(), signal.SIGTERM)  # Arrives while step 3 runs.
    return setup.step(state, frozen, micro)

  stopped_state, stopped = trainer.run_loop(_job(setup, dir_b, terminated_at_third_call),
                                            fresh())
  assert stopped and int(stopped_state.step) == 3 and calls == [0, 1, 2]
  # Step 3 is not due (every 2): only the SIGTERM save wrote it.
  with checkpoint.Checkpointer(os.path.join(dir_b, "checkpoints"), save_every_steps=2) as ckpt:
    assert ckpt.all_steps() == [2, 3]

  checkpoint._STOP.clear()
  calls.clear()
  final_b, stopped = trainer.run_loop(_job(setup, dir_b, terminated_at_third_call), fresh())
  assert not stopped and calls == [3]  # Resumed at step 3, not restarted.
  _assert_close(final_b.as_dict(), final_a.as_dict(), rtol=0, atol=1e-6)
  lines_a, lines_b = _jsonl(dir_a), _jsonl(dir_b)
  assert [r["step"] for r in lines_a] == [1, 2, 3, 4]
  assert [r["step"] for r in lines_b] == [1, 2, 3, 4]
  for a, b in zip(lines_a, lines_b, strict=True):
    np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-6)


# ------------------------------------------------------------------ a toy model


class _Batches:
  """An iterator of `{"x": [1, 2]}` batches with grain's `get_state` / `set_state`."""

  def __init__(self, values):
    self.values, self.index = list(values), 0

  def __next__(self) -> dict:
    x = np.full((1, 2), self.values[self.index], np.float32)
    self.index += 1
    return {"x": x, "qid": np.array(["q"], object), "dataset": np.array(["d"], object),
            "num_skipped": 0}

  def get_state(self) -> dict:
    return {"index": self.index}

  def set_state(self, state: dict) -> None:
    self.index = state["index"]


def _quadratic_step(tx):
  """loss = mean over rows of |w - x|^2."""

  def loss_fn(trainable, frozen, batch, denominator, rng):
    del frozen, rng
    total = jnp.sum(jnp.square(trainable["w"] - batch["x"]))
    return total / denominator, {"squared": (total, denominator)}

  rows = lambda stacked: jnp.float32(stacked["x"].shape[0] * stacked["x"].shape[1])
  return trainer.supervised_step(loss_fn, rows, tx)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_step_keeps_the_last_good_state(tmp_path, bad):
  step = jax.jit(_quadratic_step(optax.adam(0.1)))
  outs = []

  def recorded(state, frozen, micro):
    outs.append(step(state, frozen, micro))
    return outs[-1]

  job = trainer.Job(name="toy", section=_section(STEPS, save_every=0), directory=str(tmp_path),
                    iterator=_Batches([1.0, 2.0, bad, 3.0]), micro_batches=1, step_fn=recorded,
                    frozen={}, mesh=_mesh(1))
  state = trainer.init_state({"w": jnp.zeros(2)}, optax.adam(0.1), jax.random.key(0))

  with pytest.raises(checkpoint.NonFiniteError, match="step 3") as error:
    trainer.run_loop(job, state)

  assert error.value.step == 3 and len(outs) == 3
  good, after_bad = outs[1][0], outs[2][0]
  assert int(good.step) == int(after_bad.step) == 2
  _assert_close(after_bad.trainable, good.trainable, rtol=0, atol=0)
  _assert_close(after_bad.opt_state, good.opt_state, rtol=0, atol=0)
  assert not np.allclose(good.trainable["w"], 0.0)  # The good steps did move it.
  with checkpoint.Checkpointer(tmp_path / "checkpoints", save_every_steps=0) as ckpt:
    assert ckpt.all_steps() == [2]
    restored = ckpt.restore_latest(state.as_dict())
  _assert_close(restored.state["trainable"], good.trainable, rtol=0, atol=0)
  assert [r["step"] for r in _jsonl(str(tmp_path))] == [1, 2]


def test_state_keeps_its_shardings_from_step_to_step():
  """Moments live in their params' shards, and a step returns the state in the shardings
  it took, so the jitted step compiles once (not again at step 2)."""
  mesh = _mesh(2)
  w = jax.device_put(jnp.arange(8.0).reshape(4, 2), NamedSharding(mesh, PartitionSpec("fsdp")))
  tx = optax.adam(0.1)
  state = trainer.init_state({"w": w}, tx, jax.random.key(0), mesh)
  for moment in ("mu", "nu"):
    leaf = optax.tree_utils.tree_get(state.opt_state, moment)["w"]
    assert leaf.sharding.is_equivalent_to(w.sharding, w.ndim), (moment, leaf.sharding)

  step = jax.jit(_quadratic_step(tx), out_shardings=(trainer.shardings_of(state), None))
  batch = parallel.shard_batch({"x": np.ones((4, 2), np.float32)}, mesh)
  first, _ = step(state, {}, (batch,))
  second, _ = step(first, {}, (batch,))
  jax.block_until_ready(second)
  for before, after in zip(jax.tree.leaves(state), jax.tree.leaves(first), strict=True):
    assert after.sharding.is_equivalent_to(before.sharding, after.ndim), (before.sharding,
                                                                          after.sharding)
  assert step._cache_size() == 1
