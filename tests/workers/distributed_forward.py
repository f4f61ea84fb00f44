"""One process of the multi-process test: 4 CPU devices, its local half of the batch.

Usage: python distributed_forward.py PORT PROCESS_ID OUT.npy
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.config.update("jax_default_matmul_precision", "highest")

import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from retrv_jax import parallel  # noqa: E402
from retrv_jax.models import qwen2_5_vl  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
from test_sharding import CONFIG, _batch  # noqa: E402


def main(port: str, process_id: str, out_path: str) -> None:
  pid = int(process_id)
  parallel.maybe_initialize_distributed(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
  assert jax.device_count() == 8 and jax.local_device_count() == 4
  mesh = parallel.create_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  rules = parallel.DEFAULT_RULES
  params = qwen2_5_vl.init_params(CONFIG, jax.random.key(0), mesh=mesh, rules=rules)
  ids, mask, pixels, grid = _batch()
  half = slice(4 * pid, 4 * pid + 4)  # This process feeds only its own rows.
  ids_g, mask_g = parallel.shard_batch((ids[half], mask[half]), mesh)
  model = qwen2_5_vl.Qwen25VL(CONFIG)
  with jax.set_mesh(mesh), parallel.with_rules(rules):
    logits = jax.jit(lambda p, i, m: model.apply({"params": p}, i, pixels, grid, m))(
        params, ids_g, mask_g
    )
  gathered = multihost_utils.process_allgather(logits, tiled=True)
  if pid == 0:
    np.save(out_path, np.asarray(gathered))
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(*sys.argv[1:])
