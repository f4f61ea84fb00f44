"""Does a stage's training step, or the evaluation run after each stage, compile for a Cloud
TPU slice and fit its HBM? On any machine.

  python -m retrv_jax.tpu_fit --config=configs/sft.py:7b --topology=v5p:2x2x4 \\
      [--stage=sft|eval] [--bucket=4096] [--config.mesh.tensor=4 --config.sft.micro_batch_size=16]

Needs `pip install libtpu`: the devices are libtpu's description of the slice
(`jax.experimental.topologies`), so XLA compiles for the TPU while no TPU is present
(JAX_PLATFORMS=cpu is fine). The step is the trainer's own (`retrv_jax.train.train_stage`:
the stage's `make_step`, jitted with the state donated and its shardings kept) and it is
lowered with abstract arguments only: params from `jax.eval_shape` in the shardings the
mesh rules give them, the optimizer state in its params' shardings, and
`batch_size / micro_batch_size` micro-batches of the pipeline's static shapes, sharded on
their first axis as `parallel.shard_batch` does. No weights, no data. `--stage=eval` lowers
`evaluate.eval_step` instead, on one batch of `config.eval.batch_size` rows (greedy rollout
with inspections, then every candidate's answer log-prob; adapters included).

The batch shapes are those of the pipeline's own padding row (`pipeline.padding_batch`),
with the micro-batch size put on the first axis and `pixel_values` given the rows the
config implies (every image at `data.max_pixels`). The prompt length is the first
bucket, or `--bucket`. The tokenizer is the config's (the embedded tiny one by default,
also for the 3b/7b presets, whose Qwen tokenizer is not needed offline): the step takes
only a few special and digit ids from it, all below 4096 and so within the real
vocabularies, and the constant prompts of align's 'self' targets are a few tokens longer
or shorter than with Qwen's tokenizer.

Prints the compile time, XLA's memory analysis per device and the total against the
device's HBM; exits 1 when it does not fit (also when the TPU compiler itself refuses the
program for HBM, which it does when its temporaries alone exceed it). Arguments include
every micro-batch of the step: the trainer passes them all at once. libtpu allows one
process at a time (its lockfile): run one check after another.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time

import jax
import ml_collections
import numpy as np
import optax
from absl import app, flags
from jax.sharding import NamedSharding, PartitionSpec

from retrv_jax import config as config_lib
from retrv_jax import evaluate, optim, parallel, train
from retrv_jax.data import pipeline
from retrv_jax.models import lora, reranker
from retrv_jax.models.reranker import Reranker
from retrv_jax.stages import grpo, setup, trainer

# --config is retrv_jax.train's own flag: the same config files and overrides.
_TOPOLOGY = flags.DEFINE_string("topology", "v5p:2x2x1", "A TPU slice, e.g. v5e:4x4, v5p:2x2x4.")
_STAGE = flags.DEFINE_string("stage", "", "align, sft, grpo or eval (the evaluation after each "
                             "stage); '' = the last of config.stages.")
_BUCKET = flags.DEFINE_integer("bucket", 0, "Prompt length T; 0 = the first prompt bucket.")
_HBM_GIB = flags.DEFINE_float("hbm_gib", 0.0, "HBM per device; 0 = by device kind.")

# Per device (libtpu's compile-only devices do not report it). libtpu describes v4:2x2x1
# (4 chips of 32 GiB) as 8 devices, one per TensorCore: there pass --hbm_gib=16.
HBM_GIB = {"TPU v4": 32, "TPU v5 lite": 16, "TPU v5": 95, "TPU v6 lite": 32}
STAGES = ("align", "sft", "grpo", "eval")


@dataclasses.dataclass
class Fit:
  """The compiled step's memory per device, in bytes, against the device's HBM; or the
  TPU compiler's refusal (it fails a program whose temporaries alone exceed HBM)."""

  lower_s: float
  compile_s: float
  hbm: int
  argument: int = 0
  output: int = 0
  alias: int = 0
  temp: int = 0
  code: int = 0
  error: str = ""  # The compiler's RESOURCE_EXHAUSTED message.

  @property
  def total(self) -> int:
    """Peak use: arguments and outputs (donated arguments counted once), temps and code."""
    return self.argument + self.output - self.alias + self.temp + self.code

  @property
  def fits(self) -> bool:
    return not self.error and self.total <= self.hbm


@contextlib.contextmanager
def _on(mesh, config: ml_collections.ConfigDict):
  """The mesh and sharding rules a step is lowered and compiled under (only there: an eager
  op under a mesh of libtpu's compile-only devices would try to run on them)."""
  with jax.set_mesh(mesh), parallel.with_rules(tuple(config.mesh.rules)):
    yield


def _placed(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def abstract_batch(config: ml_collections.ConfigDict, pipeline_stage: str, size: int,
                   bucket: int, tokenizer, mesh) -> dict:
  """`size` rows of a pipeline stage's batches, as sharded ShapeDtypeStructs."""
  buckets = tuple(config.data.prompt_buckets)
  if bucket and bucket not in buckets:
    raise config_lib.ConfigError(f"--bucket={bucket}: expected one of config.data."
                                 f"prompt_buckets {buckets}")
  one = setup.pipeline_config(config, batch_size=1, max_patches=1,
                              prompt_buckets=(bucket or buckets[0],))
  arrays, _ = pipeline.split_host_fields(
      pipeline.padding_batch(pipeline_stage, one, tokenizer, 1))
  rows = setup.pipeline_config(config, batch_size=size).num_patches()
  shapes = {k: (rows if k == "pixel_values" else size,) + np.shape(v)[1:]
            for k, v in arrays.items()}
  return {k: jax.ShapeDtypeStruct(shapes[k], np.asarray(v).dtype,
                                  sharding=parallel.batch_sharding(mesh, len(shapes[k])))
          for k, v in arrays.items()}


def _abstract_params(config: ml_collections.ConfigDict, model_config, mesh) -> tuple:
  """The re-ranker, sized to the data's images, and its params as sharded structs."""
  icm = setup.compression_config(config)
  boxed = reranker.abstract_params(model_config, icm)
  params = _placed(parallel.unbox(boxed),
                   parallel.shardings_of(boxed, mesh, tuple(config.mesh.rules)))
  model = Reranker(setup.with_vision_blocks(model_config, setup.pipeline_config(
      config, batch_size=1)), icm)
  return model, params


def _lower_train_step(config: ml_collections.ConfigDict, stage: str, bucket: int, tokenizer,
                      mesh):
  """The trainer's step of `stage`, lowered as `train.train_stage` jits it."""
  module, section = train.STAGE_MODULES[stage], config[stage]
  micro = setup.micro_batch_size(config, stage, mesh)
  model_config = config_lib.model_config(config)
  if stage not in train.LORA_STAGES:
    model_config = model_config.replace(lora_rank=0)
  model, params = _abstract_params(config, model_config, mesh)
  trainable, frozen = lora.partition(params, lora.path_regex(*module.TRAINABLE))
  if stage == "grpo":  # Its frozen copy of the ICM (`grpo.frozen_extras`), same shardings.
    frozen[grpo.REFERENCE_ICM] = params["icm"]

  # The state as `trainer.init_state` lays it out: moments in their params' shardings.
  tx = optim.make_optimizer(optim.for_stage(section))
  replicated = NamedSharding(mesh, PartitionSpec())
  opt_shape = jax.eval_shape(tx.init, trainable)
  opt_shardings = optax.tree_map_params(
      tx, lambda _, s: s, opt_shape, jax.tree.map(lambda x: x.sharding, trainable),
      transform_non_params=lambda _: replicated)
  state = trainer.TrainState(
      step=jax.ShapeDtypeStruct((), np.int32, sharding=replicated), trainable=trainable,
      opt_state=_placed(opt_shape, opt_shardings),
      rng=jax.ShapeDtypeStruct((), jax.eval_shape(jax.random.key, 0).dtype, sharding=replicated))
  batch = abstract_batch(config, module.PIPELINE_STAGE, micro, bucket, tokenizer, mesh)
  micro_batches = (batch,) * (int(section.batch_size) // micro)
  with _on(mesh, config):
    step_fn = jax.jit(module.make_step(model, config, tokenizer, tx), donate_argnums=(0,),
                      out_shardings=(trainer.shardings_of(state), None))
    return step_fn.lower(state, frozen, micro_batches)


def _lower_eval_step(config: ml_collections.ConfigDict, bucket: int, tokenizer, mesh):
  """`evaluate.eval_step` on one eval batch, as `evaluate.evaluate_config` runs it after
  each stage: greedy rollout with inspections, then every candidate's answer log-prob; the
  params with the config's LoRA adapters (the sft and grpo outputs keep them)."""
  model, params = _abstract_params(config, config_lib.model_config(config), mesh)
  size = evaluate.eval_batch_size(config, mesh)
  batch = abstract_batch(config, "eval", size, bucket, tokenizer, mesh)
  batch = {k: batch[k] for k in reranker.ENCODE_KEYS + evaluate.ROW_KEYS}
  continuations = evaluate.continuation_ids(tokenizer, config.data.num_candidates)
  sampling = setup.sampling_params(config, tokenizer, temperature=0.0,
                                   max_new_tokens=int(config.eval.max_new_tokens))
  with _on(mesh, config):
    return evaluate.eval_step.lower(model, params, batch, *continuations, None,
                                    sampling=sampling, answer_start_id=tokenizer.answer_start,
                                    candidate_chunk=int(config.eval.candidate_chunk))


def check(config: ml_collections.ConfigDict, devices, stage: str = "", bucket: int = 0,
          hbm_gib: float = 0.0) -> Fit:
  """Compiles `stage`'s training step, or the evaluation step ('eval'), for `devices` (a TPU
  topology's) on config.mesh."""
  config = config.copy_and_resolve_references()
  stage = stage or setup.stage_names(config)[-1]
  if stage not in STAGES:
    raise config_lib.ConfigError(f"stage {stage!r}: expected one of {STAGES}")
  with config.unlocked():
    config.data.data_dir = config.data.data_dir or "unused"  # Never read; never generated.
  config_lib.validate_mesh(config, len(devices))
  mesh = parallel.create_mesh({a: config.mesh[a] for a in parallel.MESH_AXES}, devices)
  tokenizer = setup.tokenizer(config)
  hbm = int((hbm_gib or HBM_GIB.get(devices[0].device_kind, 0)) * 2**30)
  if not hbm:
    raise ValueError(f"HBM of {devices[0].device_kind!r} unknown: pass --hbm_gib")

  start = time.perf_counter()
  if stage == "eval":
    lowered = _lower_eval_step(config, bucket, tokenizer, mesh)
  else:
    lowered = _lower_train_step(config, stage, bucket, tokenizer, mesh)
  lower_s, start = time.perf_counter() - start, time.perf_counter()
  with _on(mesh, config):
    try:
      memory = lowered.compile().memory_analysis()
    except jax.errors.JaxRuntimeError as e:
      if "RESOURCE_EXHAUSTED" not in str(e):
        raise
      return Fit(lower_s=lower_s, compile_s=time.perf_counter() - start, hbm=hbm, error=str(e))
  return Fit(lower_s=lower_s, compile_s=time.perf_counter() - start, hbm=hbm,
             argument=memory.argument_size_in_bytes, output=memory.output_size_in_bytes,
             alias=memory.alias_size_in_bytes, temp=memory.temp_size_in_bytes,
             code=memory.generated_code_size_in_bytes)


def main(argv):
  del argv
  from jax.experimental import topologies  # noqa: PLC0415

  config = flags.FLAGS.config
  devices = topologies.get_topology_desc(topology_name=_TOPOLOGY.value, platform="tpu").devices
  stage = _STAGE.value or setup.stage_names(config)[-1]
  fit = check(config, devices, stage, _BUCKET.value, _HBM_GIB.value)
  gib = lambda n: f"{n / 2**30:.2f} GiB"
  mesh = dict(zip(parallel.MESH_AXES, config_lib.validate_mesh(config, len(devices)),
                  strict=True))
  print(f"{stage} step of {config.model_preset} on {_TOPOLOGY.value} ({len(devices)} x "
        f"{devices[0].device_kind}), mesh {mesh}")
  print(f"lower: {fit.lower_s:.1f} s, compile: {fit.compile_s:.1f} s")
  if fit.error:
    print(f"the TPU compiler ran out of HBM: {fit.error}\nDOES NOT FIT")
  else:
    print(f"per device: arguments {gib(fit.argument)}, outputs {gib(fit.output)}, aliased "
          f"{gib(fit.alias)}, temporaries {gib(fit.temp)}, code {gib(fit.code)}")
    print(f"total {gib(fit.total)} of {gib(fit.hbm)} HBM: "
          f"{'FITS' if fit.fits else 'DOES NOT FIT'} ({100 * fit.total / fit.hbm:.0f}%)")
  sys.exit(0 if fit.fits else 1)


if __name__ == "__main__":
  app.run(main)
