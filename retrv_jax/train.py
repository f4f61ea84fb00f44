"""Train the Retrv-R1 re-ranker: the stages the config names, in order, then evaluation.

  python -m retrv_jax.train --config=configs/grpo.py              # align -> sft -> grpo
  python -m retrv_jax.train --config=configs/grpo.py:7b --config.init_checkpoint=DIR

Every stage writes under `<workdir>/<stage>/`: `checkpoints/` (resume), TensorBoard and
`metrics.jsonl`, and `output/` when it is done (its params; the next stage starts from
it). Rerunning the command skips finished stages and resumes the running one from its
latest checkpoint. The first stage starts from `config.init_checkpoint`. With
`config.eval.after_each_stage`, the model is evaluated before the first stage
('untrained') and after each one, into `<workdir>/results.json`; a GRPO run also writes
`<workdir>/grpo_curves.png`. SIGTERM saves a checkpoint and exits; a non-finite loss
stops the run naming the step, with the last good state saved.
"""

from __future__ import annotations

import dataclasses
import json
import logging as std_logging
import os
from collections.abc import Sequence

import jax
import ml_collections
from absl import app, logging
from jax.sharding import NamedSharding, PartitionSpec
from ml_collections import config_flags

from retrv_jax import checkpoint, evaluate, optim, parallel, plots
from retrv_jax import config as config_lib
from retrv_jax.data.pipeline import make_iterator
from retrv_jax.data.tokenizer import Tokenizer
from retrv_jax.models import lora
from retrv_jax.models.reranker import Reranker
from retrv_jax.stages import align, grpo, outputs, pretrain, setup, sft, trainer, vision

_CONFIG = config_flags.DEFINE_config_file("config", "configs/grpo.py", "Training config.")

# A stage's data seed is config.seed + its place here: `vision`, added last, keeps the
# others' seeds (and the shipped tiny model reproducible).
STAGE_MODULES = {"pretrain": pretrain, "align": align, "sft": sft, "grpo": grpo,
                 "vision": vision}
LORA_STAGES = ("sft", "grpo")  # The stages whose model carries LoRA adapters.
# The tiny model's own pretraining: no re-ranker to evaluate before or after them.
PRETRAINING_STAGES = ("vision", "pretrain")
CURVES_FILE = "grpo_curves.png"


def stage_dir(config: ml_collections.ConfigDict, name: str) -> str:
  return os.path.join(os.path.abspath(config.workdir), name)


def output_dir(config: ml_collections.ConfigDict, name: str) -> str:
  return os.path.join(stage_dir(config, name), "output")


def load_model(config, init: str, mesh, *, stage: str) -> tuple[Reranker, dict]:
  """The model of `stage` and its starting params, vision attention sized to the data."""
  model, params = setup.reranker_and_params(config, init, mesh=mesh, merge_lora=stage == "grpo",
                                            lora=stage in LORA_STAGES)
  data = setup.pipeline_config(config, batch_size=1)
  return Reranker(setup.with_vision_blocks(model.config, data), model.compression), params


def train_stage(config: ml_collections.ConfigDict, name: str, init: str, mesh,
                tokenizer: Tokenizer) -> tuple[Reranker, dict] | None:
  """Runs one stage to its end (or resumes it); None if stopped by SIGTERM."""
  module = STAGE_MODULES[name]
  section = config[name]
  model, params = load_model(config, init, mesh, stage=name)
  extra = getattr(module, "EXTRA_PARAMS", ())  # Stage-only params, dropped from the output.
  if extra:
    replicated = NamedSharding(mesh, PartitionSpec())
    params = {**params, **jax.device_put(
        module.extra_params(config, jax.random.key(config.seed + 2)), replicated)}
  patterns = (module.trainable_patterns(config) if hasattr(module, "trainable_patterns")
              else module.TRAINABLE)
  trainable, frozen = lora.partition(params, lora.path_regex(*patterns))
  if name == "grpo":
    frozen.update(grpo.frozen_extras(params))
  tx = optim.make_optimizer(optim.for_stage(section))
  state = trainer.init_state(trainable, tx, jax.random.key(config.seed + 1), mesh)
  micro = setup.micro_batch_size(config, name, mesh)
  # Pretraining reads only the query's tokens from the prompt: the short, compressed layout.
  layout = {"compress_candidates": True} if name == "pretrain" else {}
  local_micro = setup.per_process(micro, f"{name}.batch_size")
  data = setup.pipeline_config(config, batch_size=local_micro,
                               split="train", seed_offset=list(STAGE_MODULES).index(name),
                               **layout)
  if hasattr(module, "make_iterator"):  # A stage with its own data (vision).
    iterator = module.make_iterator(config, local_micro)
  else:
    iterator = make_iterator(module.PIPELINE_STAGE, data, tokenizer)
  step_fn = jax.jit(module.make_step(model, config, tokenizer, tx), donate_argnums=(0,),
                    out_shardings=(trainer.shardings_of(state), None))
  job = trainer.Job(
      name=name, section=section, directory=stage_dir(config, name), iterator=iterator,
      micro_batches=int(section.batch_size) // micro, step_fn=step_fn, frozen=frozen,
      mesh=mesh, extra_json=lambda step: {"stage": name, "curriculum_step": step})
  state, stopped = trainer.run_loop(job, state)
  if stopped:
    return None
  frozen.pop(grpo.REFERENCE_ICM, None)
  params = lora.combine(state.trainable, frozen)
  for key in extra:
    params.pop(key)
  saved_model = model.config.replace(vision=dataclasses.replace(
      model.config.vision, max_patches_per_image=0))
  outputs.save(output_dir(config, name), params, stage=name, step=int(state.step),
               model_config=saved_model, compression=model.compression)
  return model, params


def evaluate_into_results(config, name: str, model: Reranker, params, tokenizer, mesh) -> None:
  """Evaluates into `results.json` under `name`."""
  scores = evaluate.evaluate_config(config, model, params, tokenizer, mesh)
  evaluate.write_results(config.workdir, name, scores)
  if jax.process_index() == 0:
    headline = "  ".join(f"{k}={scores[k]:.3f}" for k in evaluate.HEADLINE if k in scores)
    print(f"[eval {name}] {headline}", flush=True)


def run(config: ml_collections.ConfigDict) -> bool:
  """Runs the configured stages; returns False if stopped early (SIGTERM)."""
  names = setup.stage_names(config)
  config_lib.validate_mesh(config, jax.device_count())
  mesh = parallel.create_mesh({axis: config.mesh[axis] for axis in parallel.MESH_AXES})
  tokenizer = setup.tokenizer(config)
  workdir = os.path.abspath(config.workdir)
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    outputs.write_json(os.path.join(workdir, "config.json"),
                       json.loads(config.to_json_best_effort()))
  init = config.init_checkpoint
  with jax.set_mesh(mesh), parallel.with_rules(tuple(config.mesh.rules)):
    # Evaluations already in results.json (a resumed run) are not repeated.
    evaluated = set(evaluate.read_results(workdir)) if config.eval.after_each_stage else set()
    if (config.eval.after_each_stage and names[0] not in PRETRAINING_STAGES
        and "untrained" not in evaluated):
      model, params = load_model(config, init, mesh, stage=names[0])
      evaluate_into_results(config, "untrained", model, params, tokenizer, mesh)
    for name in names:
      done = output_dir(config, name)
      if outputs.is_stage_output(done):
        logging.info("%s: finished earlier (%s)", name, done)
        result = None
      else:
        result = train_stage(config, name, init, mesh, tokenizer)
        if result is None:
          logging.warning("%s: stopped by SIGTERM after saving; rerun to resume", name)
          return False
      init = done
      if (config.eval.after_each_stage and name not in PRETRAINING_STAGES
          and name not in evaluated):
        # A stage finished by an earlier run that stopped before its evaluation: its output.
        model, params = result or load_model(config, done, mesh, stage=name)
        evaluate_into_results(config, name, model, params, tokenizer, mesh)
  if "grpo" in names and jax.process_index() == 0:
    plots.plot_curves(stage_dir(config, "grpo"), os.path.join(workdir, CURVES_FILE))
  return True


def log_to_file(workdir: str) -> str:
  """Sends INFO logs (orbax, grain, the readers) to `<workdir>/train.log` (process i > 0:
  `train.<i>.log`); the console keeps warnings, progress bars and results. Its path."""
  logging.get_absl_handler().setLevel(std_logging.WARNING)  # First: JAX's start-up lines.
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  index = jax.process_index()
  path = os.path.join(workdir, "train.log" if index == 0 else f"train.{index}.log")
  handler = std_logging.FileHandler(path)
  handler.setFormatter(logging.PythonFormatter())
  handler.setLevel(std_logging.INFO)
  root = std_logging.getLogger()
  root.addHandler(handler)
  root.setLevel(std_logging.INFO)  # Python loggers (orbax, jax) below absl's own.
  logging.set_verbosity(logging.INFO)
  return path


def print_results(config: ml_collections.ConfigDict) -> None:
  """The evaluations of the run (`results.json`) as a table, and where its curves are."""
  results = evaluate.read_results(config.workdir)
  if results:
    # In the order they ran: before training, then the stages.
    order = ["untrained", *setup.stage_names(config)]
    names = sorted(results, key=lambda n: (order.index(n) if n in order else len(order), n))
    keys = [k for k in evaluate.HEADLINE if any(k in row for row in results.values())]
    width = max(map(len, results))
    print("\n" + " " * width + "".join(f"{k:>20s}" for k in keys))
    for name in names:
      row = results[name]
      print(f"{name:{width}s}" + "".join(f"{row[k]:>20.3f}" if k in row else " " * 20
                                         for k in keys))
    print(f"({os.path.join(os.path.abspath(config.workdir), evaluate.RESULTS_FILE)})")
  curves = os.path.join(os.path.abspath(config.workdir), CURVES_FILE)
  if os.path.exists(curves):
    print(f"GRPO curves: {curves}")


def main(argv: Sequence[str]) -> None:
  del argv
  config = _CONFIG.value
  parallel.maybe_initialize_distributed(**config.distributed)
  checkpoint.install_sigterm_handler()
  log = log_to_file(config.workdir)
  if jax.process_index() == 0:
    print(f"logs: {log}", flush=True)
  if run(config) and jax.process_index() == 0:
    print_results(config)


if __name__ == "__main__":
  app.run(main)
