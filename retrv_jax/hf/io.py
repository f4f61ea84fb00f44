"""Load and save Hugging Face Qwen2.5-VL checkpoints (safetensors only) as Flax params.

Import reads tensors lazily, one at a time, transforms them with the key table
(`retrv_jax.hf.keys`) and puts each param straight onto its target sharding; a stacked
param is assembled on the host one layer at a time, so peak host memory is one param,
not the checkpoint. Export gathers one param at a time and writes shards into a
temporary directory that is renamed into place only when complete.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util
from safetensors import safe_open
from safetensors.numpy import save_file

from retrv_jax import parallel
from retrv_jax.hf import keys as keys_lib
from retrv_jax.hf.config import model_config_from_hf, model_config_to_hf
from retrv_jax.models.config import ModelConfig

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(ValueError):
  """A checkpoint that does not match the model its config.json describes."""


# ----------------------------------------------------------------------------- reading


class _Reader:
  """Lazy access to the tensors of a single-file or sharded safetensors checkpoint.

  Keys are exposed by their hub names (`keys.hub_key`), whatever the file calls them.
  """

  def __init__(self, path: str, stack: ExitStack):
    self.path = path
    files = self._files_by_key(path)
    absent = sorted(n for n in set(files.values()) if not os.path.exists(os.path.join(path, n)))
    if absent:
      raise CheckpointError(f"{path}/{INDEX_FILE} names shard file(s) that are missing: {absent}")
    self._handles = {
        name: stack.enter_context(safe_open(os.path.join(path, name), framework="numpy"))
        for name in sorted(set(files.values()))
    }
    stored_in = {name: set(handle.keys()) for name, handle in self._handles.items()}
    self._where: dict[str, tuple[str, str]] = {}
    for stored, name in files.items():
      if stored not in stored_in[name]:
        raise CheckpointError(f"{path}/{INDEX_FILE}: key {stored} is not in {name}")
      hub = keys_lib.hub_key(stored)
      if hub in self._where:
        raise CheckpointError(
            f"{path}: {stored} and {self._where[hub][1]} are the same tensor ({hub}) twice"
        )
      self._where[hub] = (name, stored)

  @staticmethod
  def _files_by_key(path: str) -> dict[str, str]:
    index = os.path.join(path, INDEX_FILE)
    if os.path.exists(index):
      with open(index) as f:
        weight_map = json.load(f).get("weight_map")
      if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: no 'weight_map' object")
      return weight_map
    single = os.path.join(path, SINGLE_FILE)
    if os.path.exists(single):
      with safe_open(single, framework="numpy") as f:
        return {key: SINGLE_FILE for key in f.keys()}
    pickled = [n for n in os.listdir(path) if n.endswith((".bin", ".pt", ".pth", ".ckpt"))]
    hint = f" (found {pickled}; pickled checkpoints are never loaded)" if pickled else ""
    raise CheckpointError(f"{path}: neither {SINGLE_FILE} nor {INDEX_FILE}{hint}")

  def keys(self) -> set[str]:
    return set(self._where)

  def shape(self, key: str) -> tuple[int, ...]:
    name, stored = self._where[key]
    return tuple(self._handles[name].get_slice(stored).get_shape())

  def read(self, key: str) -> np.ndarray:
    """The tensor as numpy (bfloat16 comes back as `ml_dtypes.bfloat16`)."""
    name, stored = self._where[key]
    return self._handles[name].get_tensor(stored)


def _check_keys(reader: _Reader, config: ModelConfig) -> None:
  """Stops, listing every problem, unless the checkpoint holds exactly the expected tensors."""
  expected = keys_lib.hf_shapes(config)
  found = reader.keys()
  if config.tie_word_embeddings:
    found.discard(keys_lib.TIED_LM_HEAD)  # Allowed if equal to the embedding (checked later).
  problems = [
      f"missing key {k} (expected shape {list(expected[k])})" for k in expected if k not in found
  ]
  problems += [
      f"unexpected key {k} (shape {list(reader.shape(k))})" for k in sorted(found - set(expected))
  ]
  problems += [
      f"key {k}: checkpoint shape {list(reader.shape(k))}, expected {list(expected[k])}"
      for k in expected
      if k in found and reader.shape(k) != expected[k]
  ]
  if problems:
    shown = "\n  ".join(problems[:20])
    more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
    raise CheckpointError(
        f"{reader.path}: checkpoint does not match its config.json "
        f"({len(problems)} problem(s)):\n  {shown}{more}"
    )


def _check_tied_head(reader: _Reader, config: ModelConfig) -> None:
  if not config.tie_word_embeddings or keys_lib.TIED_LM_HEAD not in reader.keys():
    return
  head = reader.read(keys_lib.TIED_LM_HEAD)
  embedding = reader.read(keys_lib.TIED_EMBEDDING)
  if head.shape != embedding.shape or not np.array_equal(head, embedding):
    raise CheckpointError(
        f"{reader.path}: config.json has tie_word_embeddings=true but "
        f"{keys_lib.TIED_LM_HEAD} {list(head.shape)} differs from "
        f"{keys_lib.TIED_EMBEDDING} {list(embedding.shape)}"
    )


def _target_shardings(
    config: ModelConfig, mesh: jax.sharding.Mesh | None, rules: Any, shardings: Any
) -> dict[str, Any]:
  """'/'-path -> sharding (None: default device), from `shardings` or the model on `mesh`."""
  if shardings is not None:
    return traverse_util.flatten_dict(shardings, sep="/")
  if mesh is None:
    return {}
  from retrv_jax.models.qwen2_5_vl import abstract_params

  abstract = abstract_params(config)
  _check_model_shapes(abstract, config)
  rules = parallel.DEFAULT_RULES if rules is None else rules
  return traverse_util.flatten_dict(parallel.shardings_of(abstract, mesh, rules), sep="/")


def _check_model_shapes(abstract: Any, config: ModelConfig) -> None:
  """The key table and the Flax model must agree on every param path and shape."""
  model = {
      path: tuple(leaf.shape)
      for path, leaf in traverse_util.flatten_dict(parallel.unbox(abstract), sep="/").items()
  }
  table = keys_lib.param_shapes(config)
  if model != table:
    diff = sorted(
        f"{p}: model {model.get(p)}, key table {table.get(p)}"
        for p in set(model) | set(table)
        if model.get(p) != table.get(p)
    )
    raise AssertionError("Flax model and HF key table disagree:\n  " + "\n  ".join(diff))


def load_pretrained(
    path: str | os.PathLike,
    dtype: str = "float32",
    *,
    mesh: jax.sharding.Mesh | None = None,
    rules: Any = None,
    shardings: Any = None,
    scan_layers: bool = True,
) -> tuple[ModelConfig, dict[str, Any]]:
  """Reads a Hugging Face Qwen2.5-VL checkpoint directory into Flax params.

  Args:
    path: directory with config.json and model.safetensors (or shards plus
      model.safetensors.index.json). Hub and transformers-v5 key names are both accepted.
    dtype: storage dtype of the returned params (also `config.param_dtype`).
    mesh: if given, each param is placed on the `NamedSharding` its logical axes map to
      under `rules` (default `parallel.DEFAULT_RULES`).
    rules: logical-axis rules, `[(logical_name, mesh_axes), ...]`.
    shardings: alternatively, a pytree of shardings shaped like the params (overrides mesh).
    scan_layers: return layers stacked on a leading axis (`layers`, `blocks`) or as
      `layers_{i}`, `blocks_{i}`.

  Returns:
    `(config, params)`: the model config (with `param_dtype=dtype`, `scan_layers`) and the
    nested param dict (the contents of the `"params"` collection, unboxed).
  """
  path = os.fspath(path)
  config = model_config_from_hf(path, param_dtype=dtype, scan_layers=scan_layers)
  np_dtype = np.dtype(jax.numpy.dtype(dtype))
  targets = _target_shardings(config, mesh, rules, shardings)
  flat = {}
  with ExitStack() as stack:
    reader = _Reader(path, stack)
    _check_keys(reader, config)
    _check_tied_head(reader, config)
    for spec in keys_lib.key_table(config):
      for param_path, value in _read_param(reader, spec, np_dtype, scan_layers):
        flat[param_path] = _put(value, targets.get(param_path))
  return config, traverse_util.unflatten_dict(flat, sep="/")


def _read_param(
    reader: _Reader, spec: keys_lib.KeySpec, dtype: np.dtype, scan_layers: bool
) -> Iterator[tuple[str, np.ndarray]]:
  """Yields (param path, host array) for one table row, one param at a time."""
  if spec.num_layers and scan_layers:
    stacked = np.empty(spec.param_shape(), dtype)
    for i in range(spec.num_layers):
      stacked[i] = spec.transform.to_flax(reader.read(spec.hf_key(i)), spec.flax_shape)
    yield spec.flax, stacked
  elif spec.num_layers:
    for i in range(spec.num_layers):
      value = spec.transform.to_flax(reader.read(spec.hf_key(i)), spec.flax_shape)
      yield spec.flax_path(i, scan_layers=False), value.astype(dtype)
  else:
    yield spec.flax, spec.transform.to_flax(reader.read(spec.hf), spec.flax_shape).astype(dtype)


def _put(value: np.ndarray, sharding: Any) -> jax.Array:
  if sharding is None:
    return jax.device_put(value)
  if isinstance(sharding, jax.sharding.Sharding) and not sharding.is_fully_addressable:
    # Multi-host: every process read the same full tensor; keep its own shards.
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])
  return jax.device_put(value, sharding)


# ----------------------------------------------------------------------------- writing


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
  """Bytes in `size`: an int or a string like '2GB' (10^9) or '500MiB' (2^20)."""
  if isinstance(size, int):
    return size
  match = _SIZE.match(size)
  if not match:
    raise ValueError(f"max_shard_size {size!r}: expected bytes or e.g. '2GB', '500MB', '1GiB'")
  return int(float(match.group(1)) * _UNITS[(match.group(2) or "").upper()])


def _unwrap(params: Any) -> Any:
  params = nn.meta.unbox(params)
  return params["params"] if set(params) == {"params"} else params


def is_scanned(params: Any) -> bool:
  """Whether `params` hold their layers stacked (`layers`, `blocks`) or as `layers_{i}`."""
  parent, stack = keys_lib.TEXT_STACK.split("/")
  return stack in _unwrap(params).get(parent, {})


def _flat_params(params: Any, config: ModelConfig) -> tuple[dict[str, Any], bool]:
  """Flattened params and whether they are in the scanned layout; checks paths and shapes."""
  params = _unwrap(params)
  flat = traverse_util.flatten_dict(params, sep="/")
  scanned = is_scanned(params)
  expected = keys_lib.param_shapes(config, scan_layers=scanned)
  problems = [f"missing param {p} (expected shape {list(s)})"
              for p, s in expected.items() if p not in flat]
  problems += [f"unexpected param {p} (shape {list(np.shape(flat[p]))})"
               for p in sorted(set(flat) - set(expected))]
  problems += [f"param {p}: shape {list(np.shape(flat[p]))}, expected {list(s)}"
               for p, s in expected.items() if p in flat and tuple(np.shape(flat[p])) != s]
  if problems:
    raise CheckpointError("params do not match the config:\n  " + "\n  ".join(problems))
  return flat, scanned


def _to_host(x: Any) -> np.ndarray:
  """One param as a host numpy array, gathered across processes if needed."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils

    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(jax.device_get(x))


def _plan_shards(entries: list[tuple[str, int]], max_bytes: int) -> list[list[str]]:
  """Greedy packing of (key, bytes) in table order; a tensor larger than the limit is alone."""
  shards, current, used = [], [], 0
  for key, size in entries:
    if current and used + size > max_bytes:
      shards.append(current)
      current, used = [], 0
    current.append(key)
    used += size
  if current:
    shards.append(current)
  return shards


def save_pretrained(
    config: ModelConfig,
    params: Any,
    path: str | os.PathLike,
    *,
    max_shard_size: int | str = "2GB",
    dtype: str | None = None,
    overwrite: bool = False,
    generation_config: dict[str, Any] | None = None,
) -> None:
  """Writes a Hugging Face checkpoint transformers loads with `from_pretrained`.

  Writes config.json, model.safetensors (or numbered shards plus
  model.safetensors.index.json when more than one shard), and generation_config.json if
  given. Everything goes into a temporary sibling directory first, which replaces `path`
  only once complete. Params may be scanned or unscanned, boxed or not, sharded or not;
  they are gathered one param at a time. In multi-process runs every process must call
  this (gathers are collective); only process 0 writes.

  Args:
    config: the model config the params belong to.
    params: the `"params"` collection (or a dict holding it under "params").
    path: output directory.
    max_shard_size: upper bound per shard, bytes or a string like '2GB'.
    dtype: dtype to store the weights in (default: each param's own dtype).
    overwrite: replace an existing `path`; otherwise an existing one is an error.
    generation_config: optional contents of generation_config.json.
  """
  path = os.path.abspath(os.fspath(path))
  if os.path.exists(path) and not overwrite:
    raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
  flat, scanned = _flat_params(params, config)
  table = keys_lib.key_table(config)
  out_dtype = None if dtype is None else np.dtype(jax.numpy.dtype(dtype))

  def param_of(spec: keys_lib.KeySpec, layer: int | None) -> tuple[str, int | None]:
    if spec.num_layers and not scanned:
      return spec.flax_path(layer, scan_layers=False), None
    return spec.flax, layer

  sources = {}  # hub key -> (spec, param path, index into the stacked axis or None)
  entries = []
  for spec in table:
    for i, key in enumerate(spec.hf_keys()):
      param_path, index = param_of(spec, i if spec.num_layers else None)
      sources[key] = (spec, param_path, index)
      itemsize = (out_dtype or np.dtype(flat[param_path].dtype)).itemsize
      entries.append((key, math.prod(spec.hf_shape) * itemsize))
  shards = _plan_shards(entries, parse_size(max_shard_size))
  names = [SINGLE_FILE] if len(shards) == 1 else [
      f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))
  ]
  writer = jax.process_index() == 0
  tmp = None
  if writer:
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
  try:
    cached: tuple[str | None, np.ndarray | None] = (None, None)
    weight_map, total = {}, 0
    for name, shard_keys in zip(names, shards, strict=True):
      tensors = {}
      for key in shard_keys:
        spec, param_path, index = sources[key]
        if cached[0] != param_path:
          cached = (param_path, _to_host(flat[param_path]))
        value = cached[1] if index is None else cached[1][index]
        value = spec.transform.to_hf(value, spec.hf_shape)
        if out_dtype is not None:
          value = value.astype(out_dtype)
        tensors[key] = np.ascontiguousarray(value)
        weight_map[key] = name
        total += tensors[key].nbytes
      if writer:
        save_file(tensors, os.path.join(tmp, name), metadata={"format": "pt"})
      del tensors
    if not writer:
      return
    stored = out_dtype or np.dtype(flat[table[0].flax].dtype)
    _write_json(os.path.join(tmp, "config.json"), model_config_to_hf(config, dtype=stored.name))
    if len(shards) > 1:
      index = {"metadata": {"total_size": total}, "weight_map": weight_map}
      _write_json(os.path.join(tmp, INDEX_FILE), index)
    if generation_config is not None:
      _write_json(os.path.join(tmp, "generation_config.json"), generation_config)
    _replace_dir(tmp, path)
    tmp = None
  finally:
    if tmp is not None:
      shutil.rmtree(tmp, ignore_errors=True)


def _write_json(path: str, value: Any) -> None:
  with open(path, "w") as f:
    json.dump(value, f, indent=2, sort_keys=True)
    f.write("\n")


def _replace_dir(src: str, dst: str) -> None:
  """Moves the finished `src` to `dst`; an existing `dst` is removed only afterwards."""
  if not os.path.exists(dst):
    os.replace(src, dst)
    return
  old = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.old-", dir=os.path.dirname(dst))
  os.rmdir(old)
  os.replace(dst, old)
  os.replace(src, dst)
  shutil.rmtree(old, ignore_errors=True)
