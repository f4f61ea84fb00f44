"""LoRA adapters on the language decoder, and param-tree surgery by path.

With `config.lora_rank = r > 0`, every decoder projection named in `config.lora_targets`
holds `lora_a [*in, r]` and `lora_b [r, *out]` beside its `kernel [*in, *out]` (scanned
layers add a leading `layers` axis to all three) and adds `(lora_alpha / r) · x·A·B`:

    language_model/layers/self_attn/q_proj/{kernel, bias, lora_a, lora_b}
    language_model/layers/mlp/down_proj/{kernel, lora_a, lora_b}

The reference policy of GRPO is the same params under `config.replace(lora_rank=0)`:
a module without LoRA ignores the adapter entries. `merge` folds the adapters into the
kernels for export (`retrv_jax.hf.save_pretrained` accepts no adapter entries) and
`unmerge` undoes it. `partition` / `combine` split any param tree by a path predicate,
so a trainer can differentiate w.r.t. the trainable subset only:

    trainable, frozen = lora.partition(params, lora.path_regex(*lora.TRAINABLE))
    grads = jax.grad(lambda t: loss(lora.combine(t, frozen)))(trainable)

Paths are tuples of names from the root of the tree given; the helpers work on any tree
holding the backbone (`Qwen25VL` params, or the reranker's `{"backbone", "icm"}`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from retrv_jax import parallel
from retrv_jax.models.config import LORA_TARGETS, ModelConfig

Path = tuple[str, ...]
Predicate = Callable[[Path], bool]

LORA_A, LORA_B = "lora_a", "lora_b"
# Regexes (on '/'-joined paths) of what the RL and SFT stages train: LoRA and the ICM.
LORA_PATTERN = r"(^|/)lora_[ab]$"
TRAINABLE = (LORA_PATTERN, r"^icm/")


def is_lora(path: Path) -> bool:
  """Whether `path` ends at a LoRA factor (`lora_a` / `lora_b`)."""
  return bool(path) and path[-1] in (LORA_A, LORA_B)


def path_regex(*patterns: str) -> Predicate:
  """A predicate true for paths whose '/'-joined form matches any pattern (`re.search`)."""
  compiled = [re.compile(p) for p in patterns]
  return lambda path: any(c.search("/".join(path)) for c in compiled)


def partition(params: Any, predicate: Predicate) -> tuple[dict, dict]:
  """Splits a nested dict into (leaves where `predicate(path)`, the rest), both nested.

  Leaves may be arrays, shape structs, boxed params or shardings; empty subtrees vanish.
  """
  flat = traverse_util.flatten_dict(params)
  selected = {p: v for p, v in flat.items() if predicate(p)}
  rest = {p: v for p, v in flat.items() if not predicate(p)}
  return traverse_util.unflatten_dict(selected), traverse_util.unflatten_dict(rest)


def combine(selected: Any, rest: Any) -> dict:
  """Inverse of `partition`: one nested dict holding the leaves of both (disjoint) trees."""
  a, b = traverse_util.flatten_dict(selected), traverse_util.flatten_dict(rest)
  both = sorted("/".join(p) for p in set(a) & set(b))
  if both:
    raise ValueError(f"combine: {len(both)} path(s) are in both trees, e.g. {both[:3]}")
  return traverse_util.unflatten_dict({**b, **a})


def lora_mask(params: Any) -> Any:
  """A tree shaped like `params` with True on `lora_a` / `lora_b` leaves, else False."""
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict({p: is_lora(p) for p in flat})


def scale(config: ModelConfig) -> float:
  """The factor the adapters' product is multiplied by, alpha / r."""
  _check_rank(config)
  return config.lora_alpha / config.lora_rank


def _check_rank(config: ModelConfig) -> None:
  if config.lora_rank <= 0:
    raise ValueError(f"model.lora_rank = {config.lora_rank}: LoRA needs a positive rank")
  unknown = sorted(set(config.lora_targets) - set(LORA_TARGETS))
  if unknown:
    raise ValueError(f"model.lora_targets: unknown {unknown}; expected names from {LORA_TARGETS}")


def _adapters(flat: dict[Path, Any]) -> dict[Path, tuple[Any, Any, Any]]:
  """Module path -> (kernel, lora_a, lora_b) for every module holding an adapter."""
  modules = {p[:-1] for p in flat if is_lora(p)}
  out = {}
  for module in sorted(modules):
    parts = [flat.get(module + (name,)) for name in ("kernel", LORA_A, LORA_B)]
    if any(part is None for part in parts):
      raise ValueError(f"{'/'.join(module)}: an adapter needs kernel, lora_a and lora_b")
    out[module] = tuple(parts)
  return out


def delta(lora_a: jax.Array, lora_b: jax.Array, kernel_ndim: int) -> jax.Array:
  """A·B shaped like the kernel, in float32 (unscaled).

  `lora_a [*lead, *in, r]`, `lora_b [*lead, r, *out]`, where `lead` (the stacked layers
  axis, if any) is shared; `kernel_ndim` = len(lead) + len(in) + len(out) fixes `lead`.
  """
  lead = lora_a.ndim + lora_b.ndim - 2 - kernel_ndim
  if lead < 0:
    raise ValueError(f"lora_a {lora_a.shape} and lora_b {lora_b.shape} cannot make a "
                     f"{kernel_ndim}-d kernel")
  letters = iter("abcdefghijklmnopqstuvwxyz")  # 'r' is the rank.
  shared = "".join(next(letters) for _ in range(lead))
  ins = "".join(next(letters) for _ in range(lora_a.ndim - lead - 1))
  outs = "".join(next(letters) for _ in range(lora_b.ndim - lead - 1))
  spec = f"{shared}{ins}r,{shared}r{outs}->{shared}{ins}{outs}"
  return jnp.einsum(spec, lora_a.astype(jnp.float32), lora_b.astype(jnp.float32),
                    precision=jax.lax.Precision.HIGHEST)


def merge(params: Any, config: ModelConfig) -> dict:
  """Params without adapters whose kernels absorb them: W + (alpha / r)·A·B.

  The result runs under `config.replace(lora_rank=0)` (the output equals the LoRA model's
  up to rounding) and exports with `retrv_jax.hf.save_pretrained`.
  """
  s = scale(config)
  flat = traverse_util.flatten_dict(nn.meta.unbox(params))
  adapters = _adapters(flat)
  if not adapters:
    raise ValueError("merge: the params hold no lora_a / lora_b entries")
  out = {p: v for p, v in flat.items() if not is_lora(p)}
  for module, (kernel, a, b) in adapters.items():
    update = s * delta(a, b, kernel.ndim)
    out[module + ("kernel",)] = (kernel.astype(jnp.float32) + update).astype(kernel.dtype)
  return traverse_util.unflatten_dict(out)


def unmerge(merged: Any, adapters: Any, config: ModelConfig) -> dict:
  """Inverse of `merge`: subtracts (alpha / r)·A·B and puts the adapters back.

  Args:
    merged: params as `merge` returns them.
    adapters: a tree holding (at least) the `lora_a` / `lora_b` leaves, e.g. the first
      output of `partition(params, is_lora)`.
    config: the config with the rank and alpha the adapters were trained with.
  """
  s = scale(config)
  flat = traverse_util.flatten_dict(nn.meta.unbox(merged))
  factors = {p: v for p, v in traverse_util.flatten_dict(nn.meta.unbox(adapters)).items()
             if is_lora(p)}
  out = dict(flat)
  for module, (kernel, a, b) in _adapters({**flat, **factors}).items():
    update = s * delta(a, b, kernel.ndim)
    out[module + ("kernel",)] = (kernel.astype(jnp.float32) - update).astype(kernel.dtype)
    out[module + (LORA_A,)], out[module + (LORA_B,)] = a, b
  return traverse_util.unflatten_dict(out)


def init_params(config: ModelConfig, rng: jax.Array, *, mesh=None, rules=None) -> dict:
  """Fresh adapters only (`lora_a` random, `lora_b` zero), in the layout of the model.

  They equal the adapter entries of a full `Qwen25VL(config).init(rng)`; only they are
  materialised (the jitted init drops every other param), so this is how LoRA is added
  to params loaded with `retrv_jax.hf.load_pretrained`:
  `params = lora.combine(lora.init_params(config, rng), params)`.
  With a mesh, each factor is created in its shards.
  """
  from retrv_jax.models import qwen2_5_vl

  _check_rank(config)

  def init(key):
    full = nn.meta.unbox(
        qwen2_5_vl.Qwen25VL(config).init(key, **qwen2_5_vl.dummy_inputs(config))["params"]
    )
    return partition(full, is_lora)[0]

  if mesh is None:
    return jax.jit(init)(rng)
  rules = parallel.DEFAULT_RULES if rules is None else rules
  abstract = partition(qwen2_5_vl.abstract_params(config), is_lora)[0]
  shardings = parallel.shardings_of(abstract, mesh, rules)
  with jax.set_mesh(mesh), parallel.with_rules(rules):
    return jax.jit(init, out_shardings=shardings)(rng)
