"""How long the sharded parameter plan of a real preset takes to build, with no weights.

  python benchmarks/param_plan.py --preset 7b --mesh 1,4,4 [--topology v5e:4x4]

`jax.eval_shape` of the model's init gives every param's shape and logical axes; the
rules then give its sharding on the mesh. With `--topology` (needs `pip install libtpu`)
the mesh is made of the devices of that TPU slice, described by libtpu on this machine;
otherwise of fake CPU devices. Prints the time of each step, the parameter count and the
largest per-device share of the params.
"""

from __future__ import annotations

import math
import os
import time

from absl import app, flags

_PRESET = flags.DEFINE_string("preset", "7b", "tiny, 3b or 7b.")
_MESH = flags.DEFINE_list("mesh", ["1", "4", "4"], "data,fsdp,tensor sizes.")
_TOPOLOGY = flags.DEFINE_string("topology", "", "A TPU slice, e.g. v5e:4x4; '' = CPU devices.")


def main(argv):
  del argv
  sizes = dict(zip(("data", "fsdp", "tensor"), map(int, _MESH.value), strict=True))
  if not _TOPOLOGY.value:
    count = math.prod(sizes.values())
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={count}"
  import jax  # noqa: PLC0415 (device count must be set first)

  from retrv_jax import parallel
  from retrv_jax.models import qwen2_5_vl
  from retrv_jax.models.config import PRESETS

  if _TOPOLOGY.value:
    from jax.experimental import topologies  # noqa: PLC0415

    devices = topologies.get_topology_desc(topology_name=_TOPOLOGY.value, platform="tpu").devices
  else:
    devices = jax.devices("cpu")
  config = PRESETS[_PRESET.value]()
  start = time.perf_counter()
  abstract = qwen2_5_vl.abstract_params(config)
  shaped = time.perf_counter()
  mesh = parallel.create_mesh(sizes, devices)
  shardings = parallel.shardings_of(abstract, mesh, parallel.DEFAULT_RULES)
  planned = time.perf_counter()

  leaves = jax.tree.leaves(abstract, is_leaf=lambda x: hasattr(x, "names"))
  shard_leaves = jax.tree.leaves(shardings)
  count = sum(math.prod(leaf.value.shape) for leaf in leaves)
  per_device = sum(math.prod(s.shard_shape(leaf.value.shape)) * 4
                   for leaf, s in zip(leaves, shard_leaves, strict=True))
  print(f"preset {_PRESET.value}: {count / 1e9:.3f}B params on mesh {dict(mesh.shape)} "
        f"of {devices[0].platform} devices ({_TOPOLOGY.value or 'fake CPU'})")
  print(f"eval_shape of init: {shaped - start:.2f} s; shardings: {planned - shaped:.3f} s")
  print(f"float32 params per device: {per_device / 2**30:.2f} GiB "
        f"(of {count * 4 / 2**30:.1f} GiB in all)")


if __name__ == "__main__":
  app.run(main)
