"""Checkpoints: exact round trip (sharded too), retention, SIGTERM, crashes, the NaN guard."""

import os
import shutil
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from retrv_jax import checkpoint, optim, parallel
from retrv_jax.checkpoint import Checkpointer


def _state(seed: int = 0):
  """Trainable params (LoRA-like + ICM-like), AdamW state after one update, two RNG keys."""
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  params = {
      "backbone": {"q_proj": {"lora_a": jax.random.normal(k1, (8, 4)),
                              "lora_b": jax.random.normal(k2, (4, 2, 8))}},
      "icm": {"output_scale": jax.random.normal(k3, (8,)), "norm": {"scale": jnp.ones(8)}},
  }
  tx = optim.make_optimizer(optim.for_stage({"steps": 1000, "optim": optim.default_config()}))
  opt_state = tx.init(params)
  _, opt_state = tx.update(jax.tree.map(jnp.ones_like, params), opt_state, params)
  return {"params": params, "opt_state": opt_state, "rng": jax.random.key(seed + 1),
          "rbg_rng": jax.random.key(seed + 2, impl="rbg"), "step": jnp.array(7, jnp.int32)}


def _assert_same(restored, expected):
  assert jax.tree.structure(restored) == jax.tree.structure(expected)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(restored), jax.tree.leaves(expected),
                          strict=True):
    assert a.dtype == b.dtype, jax.tree_util.keystr(path)
    if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
      a, b = jax.random.key_data(a), jax.random.key_data(b)
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


def test_save_then_restore_is_exact(tmp_path):
  state = _state()
  extra = {"stage": "grpo", "curriculum": {"lambda": 0.25, "phase": 2}}
  data_state = {"parent": {"next_index": 17, "epoch": 1}}
  with Checkpointer(tmp_path, save_every_steps=10) as ckpt:
    assert ckpt.restore_latest(jax.eval_shape(lambda: state)) is None
    assert not ckpt.maybe_save(5, state, extra, data_state=data_state)  # Not due.
    assert ckpt.maybe_save(10, state, extra, data_state=data_state)
    ckpt.wait_until_finished()
  with Checkpointer(tmp_path, save_every_steps=10) as ckpt:
    restored = ckpt.restore_latest(jax.eval_shape(lambda: state))
  assert restored.step == 10
  assert restored.extra == extra and restored.data_state == data_state
  _assert_same(restored.state, state)
  assert str(jax.random.key_impl(restored.state["rbg_rng"])) == "rbg"
  draw = lambda key: jax.random.normal(jax.random.fold_in(key, 3), (4,))
  np.testing.assert_array_equal(draw(restored.state["rng"]), draw(state["rng"]))


def test_restore_into_a_sharded_mesh_target(tmp_path):
  state = _state(1)
  with Checkpointer(tmp_path, save_every_steps=1) as ckpt:
    ckpt.maybe_save(3, state, {"stage": "sft"})
    ckpt.wait_until_finished()
  mesh = parallel.create_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  abstract = jax.eval_shape(lambda: state)

  def spec_of(leaf):
    if leaf.ndim >= 2 and leaf.shape[0] % 4 == 0:
      return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), "tensor"))
    if leaf.ndim == 1 and leaf.shape[0] % 2 == 0:
      return NamedSharding(mesh, PartitionSpec("tensor"))
    return NamedSharding(mesh, PartitionSpec())

  shardings = jax.tree.map(spec_of, abstract)
  with Checkpointer(tmp_path, save_every_steps=1) as ckpt:
    restored = ckpt.restore_latest(abstract, shardings)
  _assert_same(restored.state, state)
  lora_a = restored.state["params"]["backbone"]["q_proj"]["lora_a"]
  assert lora_a.sharding == shardings["params"]["backbone"]["q_proj"]["lora_a"]
  assert len({s.device for s in lora_a.addressable_shards}) == 8
  assert lora_a.addressable_shards[0].data.shape == (2, 2)  # Created in its shards.
  # A save from the sharded arrays restores onto a single device just as well.
  with Checkpointer(tmp_path, save_every_steps=1) as ckpt:
    ckpt.maybe_save(4, restored.state)
    ckpt.wait_until_finished()
    again = ckpt.restore(4, abstract)
  _assert_same(again.state, state)
  assert again.extra == {} and again.data_state is None


def test_keeps_the_last_n_and_the_best(tmp_path):
  accuracy = {1: 0.1, 2: 0.9, 3: 0.3, 4: 0.2, 5: 0.4}
  with Checkpointer(tmp_path, save_every_steps=1, max_to_keep=2, best_metric="accuracy",
                    keep_best=1) as ckpt:
    for step, acc in accuracy.items():
      assert ckpt.maybe_save(step, {"w": jnp.full(2, step)}, metrics={"accuracy": acc})
      ckpt.wait_until_finished()
    assert ckpt.all_steps() == [2, 4, 5]
    assert ckpt.best_step() == 2
    assert ckpt.maybe_save(6, {"w": jnp.full(2, 6)}, force=True)  # No metric: recency only.
    ckpt.wait_until_finished()
    assert ckpt.all_steps() == [2, 5, 6]
  assert sorted(n for n in os.listdir(tmp_path) if n.isdigit()) == ["2", "5", "6"]
  with Checkpointer(tmp_path, save_every_steps=1, max_to_keep=2, best_metric="accuracy",
                    keep_best=1) as ckpt:  # After a restart the metrics are read back.
    assert ckpt.best_step() == 2
    ckpt.maybe_save(7, {"w": jnp.full(2, 7)}, metrics={"accuracy": 0.5})
    ckpt.wait_until_finished()
    assert ckpt.all_steps() == [2, 6, 7]


def test_keep_last_n_without_a_metric(tmp_path):
  with Checkpointer(tmp_path, save_every_steps=2, max_to_keep=2) as ckpt:
    for step in range(1, 9):
      ckpt.maybe_save(step, {"w": jnp.full(2, step)})
    ckpt.wait_until_finished()
    assert ckpt.all_steps() == [6, 8]
    assert not ckpt.maybe_save(8, {"w": jnp.zeros(2)}, force=True)  # Already on disk.
    restored = ckpt.restore_latest(jax.eval_shape(lambda: {"w": jnp.zeros(2, jnp.int32)}))
  np.testing.assert_array_equal(restored.state["w"], [8, 8])


def test_half_written_checkpoint_is_ignored(tmp_path):
  with Checkpointer(tmp_path, save_every_steps=10) as ckpt:
    ckpt.maybe_save(10, {"w": jnp.full(3, 10.0)})
    ckpt.wait_until_finished()
    # A crash in the middle of writing step 20 leaves orbax's temporary directory behind.
    crashed = tmp_path / "20.orbax-checkpoint-tmp"
    shutil.copytree(tmp_path / "10", crashed)
    shutil.rmtree(crashed / "state")
    restored = ckpt.restore_latest({"w": jax.ShapeDtypeStruct((3,), jnp.float32)})
    assert restored.step == 10 and ckpt.all_steps() == [10]
  with Checkpointer(tmp_path, save_every_steps=10) as ckpt:
    assert ckpt.restore_latest({"w": jax.ShapeDtypeStruct((3,), jnp.float32)}).step == 10
    ckpt.maybe_save(20, {"w": jnp.full(3, 20.0)})  # Step 20 is written again, complete.
    ckpt.wait_until_finished()
    assert ckpt.all_steps() == [10, 20] and not crashed.exists()


def test_restore_into_a_wrong_target_names_the_step(tmp_path):
  with Checkpointer(tmp_path, save_every_steps=1) as ckpt:
    ckpt.maybe_save(1, {"w": jnp.zeros(3)})
    ckpt.wait_until_finished()
    with pytest.raises(checkpoint.RestoreError, match=r"/1: the checkpoint does not fit"):
      ckpt.restore(1, {"w": jax.ShapeDtypeStruct((3,), jnp.float32),
                       "v": jax.ShapeDtypeStruct((2,), jnp.float32)})
    with pytest.raises(checkpoint.RestoreError, match=r"no checkpoint for step 2; found \[1\]"):
      ckpt.restore(2, {"w": jax.ShapeDtypeStruct((3,), jnp.float32)})
    with pytest.raises(TypeError, match="extra_json must be JSON-serialisable"):
      ckpt.maybe_save(2, {"w": jnp.zeros(3)}, {"bad": object()})


def test_from_config_names_unknown_fields(tmp_path):
  section = checkpoint.default_config()
  ckpt = Checkpointer.from_config(tmp_path, section)
  assert ckpt.save_every_steps == section.save_every_steps
  ckpt.close()
  with pytest.raises(ValueError, match=r"unknown field\(s\) \['every'\]"):
    Checkpointer.from_config(tmp_path, {**section.to_dict(), "every": 3})
  with pytest.raises(ValueError, match="best_mode = 'median'"):
    Checkpointer(tmp_path, save_every_steps=1, best_mode="median")


_TOY_LOOP = textwrap.dedent("""
    import sys, time
    import jax.numpy as jnp
    from retrv_jax import checkpoint

    checkpoint.install_sigterm_handler()
    ckpt = checkpoint.Checkpointer(sys.argv[1], save_every_steps=1000)
    step = 0
    while True:
      step += 1
      state = {"w": jnp.full((3,), step, jnp.int32)}
      if step == 3:
        print("READY", flush=True)
      stop = checkpoint.should_stop()
      ckpt.maybe_save(step, state, {"stage": "toy"}, data_state={"step": step}, force=stop)
      if stop:
        break
      if step > 10_000:
        sys.exit(3)  # The signal never arrived.
      time.sleep(0.01)
    ckpt.wait_until_finished()
    ckpt.close()
    print("SAVED", step, flush=True)
""")


def test_sigterm_saves_and_exits_cleanly(tmp_path):
  script = tmp_path / "loop.py"
  script.write_text(_TOY_LOOP)
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "ckpt")], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    assert proc.stdout.readline().strip() == "READY"
    os.kill(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
  finally:
    proc.kill()
  assert proc.returncode == 0, err[-2000:]
  saved_step = int(out.split()[-1])
  assert saved_step >= 3
  with Checkpointer(tmp_path / "ckpt", save_every_steps=1000) as ckpt:
    restored = ckpt.restore_latest({"w": jax.ShapeDtypeStruct((3,), jnp.int32)})
  assert restored.step == saved_step
  np.testing.assert_array_equal(restored.state["w"], [saved_step] * 3)
  assert restored.extra == {"stage": "toy"} and restored.data_state == {"step": saved_step}


def test_should_stop_is_false_without_a_signal():
  assert not checkpoint.should_stop()


def test_check_finite_names_the_step():
  checkpoint.check_finite(4, 1.5, 0.3)
  with pytest.raises(checkpoint.NonFiniteError, match=r"step 12: .*loss=nan") as info:
    checkpoint.check_finite(12, float("nan"), 1.0)
  assert info.value.step == 12
  with pytest.raises(checkpoint.NonFiniteError, match=r"grad_norm=inf"):
    checkpoint.check_finite(13, np.float32(1.0), jnp.inf)
