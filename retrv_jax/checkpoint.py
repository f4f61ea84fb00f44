"""Training checkpoints (orbax), preemption handling and the non-finite guard.

One checkpoint is one step directory holding four orbax items:

    <directory>/<step>/state   the array pytree: trainable params, optimizer state, RNG
                               key(s) (stored as `jax.random.key_data`), anything else
    <directory>/<step>/extra   JSON written by process 0: stage name, curriculum state
    <directory>/<step>/data    JSON per process: its data-iterator state (grain)
    <directory>/<step>/meta    JSON: the step and the PRNG implementation of each key

Saves are asynchronous: `maybe_save` returns once the arrays are copied to host memory,
so the caller may donate them to the next step; files are written in a background thread
into `<step>.orbax-checkpoint-tmp-*` and renamed into place when complete, so a crash
leaves no step directory that `restore_latest` would pick up. The last `max_to_keep`
steps are kept, and optionally the `keep_best` best by a metric.

The loop, with every process running the same calls:

    checkpoint.install_sigterm_handler()
    ckpt = checkpoint.Checkpointer.from_config(workdir / "checkpoints", config.checkpoint)
    restored = ckpt.restore_latest(abstract_state, shardings)   # None on a fresh start
    for step in range(start, total):
      state, metrics = train_step(state, batch, rng)
      stop = checkpoint.should_stop()
      ckpt.maybe_save(step + 1, state, {"stage": ..., "curriculum": ...},
                      data_state=iterator.get_state(), force=stop)
      if stop:
        break
    ckpt.wait_until_finished()
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import threading
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

STATE, EXTRA, DATA, META = "state", "extra", "data", "meta"
FORMAT_VERSION = 1


# ------------------------------------------------------------------ per-process JSON item


class ProcessJsonHandler(ocp.CheckpointHandler):
  """Writes one JSON file per process (`process_<i>-of-<n>.json`), e.g. iterator states.

  Each host reads a different slice of the data, so each saves and restores its own.
  """

  def _path(self, directory: epath.Path) -> epath.Path:
    return directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"

  def save(self, directory: epath.Path, args: ProcessJsonSave) -> None:
    self._path(directory).write_text(json.dumps(args.item))

  def restore(self, directory: epath.Path, args: ProcessJsonRestore | None = None) -> Any:
    path = self._path(directory)
    if not path.exists():
      found = sorted(p.name for p in directory.iterdir())
      raise FileNotFoundError(f"{path} does not exist (found {found}); a checkpoint restores "
                              "only with the process count it was saved with")
    return json.loads(path.read_text())

  def metadata(self, directory: epath.Path) -> None:
    return None


@ocp.args.register_with_handler(ProcessJsonHandler, for_save=True)
@dataclasses.dataclass
class ProcessJsonSave(ocp.args.CheckpointArgs):
  item: Any


@ocp.args.register_with_handler(ProcessJsonHandler, for_restore=True)
@dataclasses.dataclass
class ProcessJsonRestore(ocp.args.CheckpointArgs):
  item: Any = None


# ------------------------------------------------------------------ PRNG keys


def _is_key(x: Any) -> bool:
  return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _encode_keys(state: Any) -> tuple[Any, dict[str, str]]:
  """Typed PRNG keys -> their uint32 data, plus {keystr path: implementation name}."""
  impls = {}

  def one(path, x):
    if _is_key(x):
      impls[jax.tree_util.keystr(path)] = str(jax.random.key_impl(x))
      return jax.random.key_data(x)
    return x

  return jax.tree_util.tree_map_with_path(one, state), impls


# ------------------------------------------------------------------ the checkpointer


class RestoreError(ValueError):
  """A checkpoint that does not fit the state it is restored into."""


@dataclasses.dataclass(frozen=True)
class Restored:
  """What `restore_latest` / `restore` return."""

  step: int
  state: Any  # Shaped, typed and sharded like the abstract target.
  extra: dict[str, Any]  # The `extra_json` saved with it.
  data_state: Any  # This process's data-iterator state (None if none was saved).


def default_config() -> ml_collections.ConfigDict:
  """The `checkpoint` section with its defaults."""
  c = ml_collections.ConfigDict()
  c.save_every_steps = 500  # Save when step % save_every_steps == 0 (0: only forced saves).
  c.max_to_keep = 3  # The most recent checkpoints kept.
  c.best_metric = ""  # Also keep the best by this metric (passed to maybe_save); '' = off.
  c.best_mode = "max"  # 'max' or 'min': which value of best_metric is best.
  c.keep_best = 1  # How many best checkpoints are kept besides the most recent ones.
  c.async_save = True  # Write files in a background thread.
  return c


class Checkpointer:
  """Saves and restores training state with an orbax `CheckpointManager`.

  Every process must make the same calls (saves and restores are collective).
  """

  def __init__(
      self,
      directory: str | os.PathLike,
      *,
      save_every_steps: int,
      max_to_keep: int = 3,
      best_metric: str = "",
      best_mode: str = "max",
      keep_best: int = 1,
      async_save: bool = True,
  ):
    if save_every_steps < 0 or max_to_keep < 1 or keep_best < 0:
      raise ValueError(
          f"checkpoint: save_every_steps={save_every_steps} (>= 0), "
          f"max_to_keep={max_to_keep} (>= 1), keep_best={keep_best} (>= 0) out of range")
    if best_mode not in ("max", "min"):
      raise ValueError(f"checkpoint.best_mode = {best_mode!r}: expected 'max' or 'min'")
    self.directory = epath.Path(os.path.abspath(os.fspath(directory)))
    self.save_every_steps = save_every_steps
    self.best_metric = best_metric
    self.best_mode = best_mode
    policies = [ocp.checkpoint_managers.LatestN(n=max_to_keep)]
    best_fn = None
    if best_metric and keep_best:
      best_fn = lambda metrics: metrics[best_metric]
      policies.append(ocp.checkpoint_managers.BestN(
          get_metric_fn=best_fn,
          reverse=best_mode == "min",
          n=keep_best,
          keep_checkpoints_without_metrics=False,
      ))
    options = ocp.CheckpointManagerOptions(
        # The policy decides what is kept; best_fn only makes orbax write the metrics.
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
        best_fn=best_fn,
        best_mode=best_mode,
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,
        create=True,
    )
    self._manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=(STATE, EXTRA, DATA, META)
    )

  @classmethod
  def from_config(cls, directory: str | os.PathLike,
                  section: Mapping[str, Any]) -> Checkpointer:
    """A checkpointer from the config's `checkpoint` section (see `default_config`)."""
    known = set(default_config())
    unknown = sorted(set(section) - known)
    if unknown:
      raise ValueError(f"config.checkpoint: unknown field(s) {unknown}; known: {sorted(known)}")
    return cls(directory, **{k: section[k] for k in section})

  # ---------------------------------------------------------------- queries

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def best_step(self) -> int | None:
    """The best step by `best_metric` among those kept (the latest if no metric is set)."""
    if not self.best_metric:
      return self._manager.latest_step()
    scored = []
    for step in self._manager.all_steps():
      metrics = self._manager.metrics(step) or {}
      if self.best_metric in metrics:
        scored.append((metrics[self.best_metric], step))
    if not scored:
      return None
    return (min(scored) if self.best_mode == "min" else max(scored))[1]

  # ---------------------------------------------------------------- saving

  def should_save(self, step: int, force: bool = False) -> bool:
    """Whether `maybe_save(step, ...)` would write (not yet on disk, due or forced)."""
    if step in self._manager.all_steps():
      return False
    return force or (self.save_every_steps > 0 and step % self.save_every_steps == 0)

  def maybe_save(
      self,
      step: int,
      state: Any,
      extra_json: Mapping[str, Any] | None = None,
      *,
      data_state: Any = None,
      metrics: Mapping[str, float] | None = None,
      force: bool = False,
  ) -> bool:
    """Starts an asynchronous save if `step` is due (every `save_every_steps`) or `force`.

    Args:
      step: the number of optimizer steps the state has taken.
      state: pytree of jax arrays (params, optimizer state, typed PRNG keys, ...).
      extra_json: JSON-able dict (stage name, curriculum state), written by process 0.
      data_state: this process's JSON-able data-iterator state (`iterator.get_state()`).
      metrics: scalars stored with the checkpoint; `best_metric` must be among them for
        the checkpoint to compete for "best".
      force: save even if not due (SIGTERM, end of training). A step already on disk is
        never written twice.

    Returns:
      Whether a save was started.
    """
    step = int(step)
    if not self.should_save(step, force):
      return False
    encoded, impls = _encode_keys(state)
    extra = _json_checked(dict(extra_json or {}), "extra_json")
    data = _json_checked(data_state, "data_state")
    metrics = None if metrics is None else {k: float(v) for k, v in metrics.items()}
    meta = {"format": FORMAT_VERSION, "step": int(step), "prng_impls": impls}
    args = ocp.args.Composite(**{
        STATE: ocp.args.StandardSave(encoded),
        EXTRA: ocp.args.JsonSave(extra),
        DATA: ProcessJsonSave(data),
        META: ocp.args.JsonSave(meta),
    })
    saved = self._manager.save(step, args=args, metrics=metrics, force=True)
    if saved:
      logging.info("checkpoint: saving step %d to %s", step, self.directory)
    return saved

  def wait_until_finished(self) -> None:
    """Blocks until every started save is on disk (call before exiting)."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  # ---------------------------------------------------------------- restoring

  def restore_latest(self, abstract_state: Any, shardings: Any = None) -> Restored | None:
    """The latest complete checkpoint restored into the target, or None if there is none."""
    self._manager.reload()
    step = self._manager.latest_step()
    return None if step is None else self.restore(step, abstract_state, shardings)

  def restore(self, step: int, abstract_state: Any, shardings: Any = None) -> Restored:
    """Restores `step` into an abstract, sharded target.

    Args:
      step: a step in `all_steps()`.
      abstract_state: pytree shaped like the saved state, of `jax.ShapeDtypeStruct`s
        (e.g. from `jax.eval_shape`) or arrays; typed PRNG key leaves come back as keys.
      shardings: matching pytree of `jax.sharding.Sharding`s; None takes each leaf's own
        `.sharding` (leaves without one go to the default device).

    Returns:
      A `Restored` whose arrays are created directly in their target shards.
    """
    if step not in self._manager.all_steps():
      raise RestoreError(f"{self.directory}: no checkpoint for step {step}; "
                         f"found {self.all_steps()}")
    meta = self._manager.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))
    impls = meta[META].get("prng_impls", {})
    target = _restore_target(abstract_state, shardings)
    args = ocp.args.Composite(**{
        STATE: ocp.args.StandardRestore(target),
        EXTRA: ocp.args.JsonRestore(),
        DATA: ProcessJsonRestore(),
    })
    try:
      restored = self._manager.restore(step, args=args)
    except (ValueError, KeyError, TypeError) as e:
      raise RestoreError(f"{self.directory}/{step}: the checkpoint does not fit the target "
                         f"state: {e}") from e
    state = _decode_keys(restored[STATE], abstract_state, impls)
    return Restored(step=step, state=state, extra=restored[EXTRA], data_state=restored[DATA])


def _json_checked(value: Any, name: str) -> Any:
  try:
    json.dumps(value)
  except (TypeError, ValueError) as e:
    raise TypeError(f"checkpoint {name} must be JSON-serialisable: {e}") from e
  return value


def _restore_target(abstract_state: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs with shardings; key leaves replaced by their uint32 data shape."""
  leaves, treedef = jax.tree.flatten(abstract_state)
  if shardings is None:
    sharding_leaves = [getattr(x, "sharding", None) for x in leaves]
  else:
    sharding_leaves = treedef.flatten_up_to(shardings)
  default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  out = []
  for leaf, sharding in zip(leaves, sharding_leaves, strict=True):
    shape_dtype = jax.eval_shape(jax.random.key_data, leaf) if _is_key(leaf) else leaf
    out.append(jax.ShapeDtypeStruct(shape_dtype.shape, shape_dtype.dtype,
                                    sharding=sharding or default))
  return treedef.unflatten(out)


def _decode_keys(state: Any, abstract_state: Any, impls: Mapping[str, str]) -> Any:
  """Wraps the uint32 data of leaves that are keys in the target back into typed keys."""

  def one(path, restored, target):
    if not _is_key(target):
      return restored
    impl = impls.get(jax.tree_util.keystr(path))  # None: the default implementation.
    return jax.random.wrap_key_data(restored, impl=impl)

  return jax.tree_util.tree_map_with_path(one, state, abstract_state)


# ------------------------------------------------------------------ preemption


_STOP = threading.Event()


def install_sigterm_handler() -> None:
  """On SIGTERM (TPU maintenance, spot preemption) set the flag `should_stop` reports.

  The loop then saves with `force=True`, waits for the save and exits normally. Call
  from the main thread. A previously installed Python handler still runs.
  """
  previous = signal.getsignal(signal.SIGTERM)

  def handler(signum, frame):
    logging.warning("SIGTERM received: saving a checkpoint and stopping after this step")
    _STOP.set()
    if callable(previous):
      previous(signum, frame)

  signal.signal(signal.SIGTERM, handler)


def should_stop() -> bool:
  """Whether any process received SIGTERM. Collective with several processes: call it at
  the same steps on all of them, so that they all save and stop together."""
  local = _STOP.is_set()
  if jax.process_count() == 1:
    return local
  from jax.experimental import multihost_utils

  return bool(np.any(multihost_utils.process_allgather(np.array(local))))


# ------------------------------------------------------------------ non-finite guard


class NonFiniteError(FloatingPointError):
  """The loss or gradient norm of a step is NaN or infinite."""

  def __init__(self, step: int, values: Mapping[str, float]):
    self.step = step
    self.values = dict(values)
    bad = ", ".join(f"{k}={v}" for k, v in self.values.items())
    super().__init__(f"step {step}: non-finite training values ({bad}); the last checkpoint "
                     "holds the last good state")


def check_finite(step: int, loss: Any, grad_norm: Any) -> None:
  """Raises `NonFiniteError` naming the step if `loss` or `grad_norm` is NaN or infinite.

  Pass host values (after `jax.device_get`) to keep the loop free of implicit transfers.
  """
  values = {"loss": float(loss), "grad_norm": float(grad_norm)}
  if not all(math.isfinite(v) for v in values.values()):
    raise NonFiniteError(step, values)
