"""Evaluate the re-ranker on a held-out split: Recall@k, inspections, format errors.

  python -m retrv_jax.evaluate --config=configs/eval.py --config.init_checkpoint=DIR \
      [--name=NAME]

Each eval batch runs one jitted function: encode (vision tower, ICM) -> greedy rollout with
inspections spliced in -> the log-likelihood of every candidate's answer. The host parses
each response (`prompts.parse_response`) and ranks the candidates (PAPER.md §4, ours): the
chosen index first, the others by log p(`i</answer>` | response up to `<answer>`), ties by
stage-I order (lower index first). Recall@1 is the parsed answer alone (no answer: wrong);
Recall@k, k > 1, is whether the positive is among the first k of that ranking.

Candidate answers are scored with one prefill and one multi-token decode (never a forward of
the whole sequence per candidate); `learner.rebuild` lays out the prefix as the sampler saw it:

    prefix   [ prompt (T, padded) | g0 g1 <is> 3 <ie> B B B g5 .. <answer> | . . ]  S slots
    cache    prefilled once per row, then repeated for the K candidates (rows r*K + i)
    decode   digits(i) </answer> at slots S.., positions after <answer>; pad masked
    score    log p(first token | <answer>) + the decode's next-token log-probs

Results go to `<workdir>/results.json` as `{name: {metric: value}}` (merged, atomic).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from jax.experimental import multihost_utils
from ml_collections import config_flags

from retrv_jax import config as config_lib
from retrv_jax import parallel
from retrv_jax.data import prompts
from retrv_jax.data.pipeline import make_iterator, split_host_fields
from retrv_jax.data.tokenizer import Tokenizer
from retrv_jax.models.decoder import KVCache
from retrv_jax.models.qwen2_5_vl import Qwen25VL
from retrv_jax.models.reranker import ENCODE_KEYS, Reranker, RerankInputs, encode_batch
from retrv_jax.models.rope import text_positions
from retrv_jax.rl import learner, sampler
from retrv_jax.rl.sampler import SamplingParams, Trajectory
from retrv_jax.stages import outputs, setup

RECALL_AT = (1, 5)
RESULTS_FILE = "results.json"
# The figures a one-line summary shows.
HEADLINE = ("recall@1", "recall@5", "mean_inspections", "format_error_rate")
ROW_KEYS = ("valid", "gt_index", "task_id")  # What the metrics read from a batch.


# ------------------------------------------------------------------ answer log-likelihoods


def continuation_ids(tokenizer: Tokenizer, num_candidates: int) -> tuple[np.ndarray, np.ndarray]:
  """`digits(i) </answer>` for i = 1..K as `[K, L]` int32 ids (pad-filled) and their mask."""
  rows = [tokenizer.encode(str(i), allow_special=False) + [tokenizer.answer_end]
          for i in range(1, num_candidates + 1)]
  length = max(len(r) for r in rows)
  ids = np.full((num_candidates, length), tokenizer.pad, np.int32)
  mask = np.zeros((num_candidates, length), bool)
  for i, row in enumerate(rows):
    ids[i, :len(row)], mask[i, :len(row)] = row, True
  return ids, mask


def answer_prefix(trajectory: Trajectory, answer_start_id: int,
                  stop_ids: Sequence[int]) -> Trajectory:
  """Each response up to and including its first `<answer>`, where answers are scored.

  A response without one is cut before its stop token and gets `<answer>` appended (over
  its last token when the budget is full). Insertions after the prefix are dropped. Tokens
  past the new `lengths` are left as they were (nothing reads them).
  """
  tokens, lengths = jnp.asarray(trajectory.tokens), jnp.asarray(trajectory.lengths)
  rows, budget = tokens.shape
  j = jnp.arange(budget)
  is_answer = (tokens == answer_start_id) & (j[None] < lengths[:, None])
  last = tokens[jnp.arange(rows), jnp.maximum(lengths - 1, 0)]
  cut = jnp.minimum(lengths - jnp.isin(last, jnp.asarray(stop_ids)), budget - 1)
  length = jnp.where(is_answer.any(-1), jnp.argmax(is_answer, -1), cut) + 1
  steps, candidates = jnp.asarray(trajectory.insert_step), jnp.asarray(trajectory.insert_candidate)
  keep = (candidates >= 0) & (steps < length[:, None] - 1)
  return trajectory.replace(
      tokens=jnp.where(j[None] == length[:, None] - 1, answer_start_id, tokens),
      lengths=length.astype(jnp.int32),
      insert_step=jnp.where(keep, steps, -1),
      insert_candidate=jnp.where(keep, candidates, -1),
  )


def answer_logprobs(
    model: Qwen25VL,
    params: Any,
    inputs: RerankInputs,
    trajectory: Trajectory,
    continuations: jax.Array,
    continuation_mask: jax.Array,
    *,
    answer_start_id: int,
    stop_ids: Sequence[int],
    candidate_chunk: int = 0,
) -> jax.Array:
  """log p(`i</answer>` | prompt, response up to `<answer>`) `[R, K]`, one row per prompt.

  Args:
    model: the backbone (static); params: its params.
    inputs: the prompts the trajectory answers (group size 1: row r answers prompt r).
    trajectory: the sampled responses `[R, N]` with their insertion record.
    continuations, continuation_mask: `[K, L]` from `continuation_ids`.
    answer_start_id: `<answer>`; stop_ids: the sampler's stop tokens.
    candidate_chunk: candidates decoded per call (the cache is repeated this many times
      per row); 0 = all K in one call.
  """
  config = model.config
  apply = lambda method, *a, **kw: model.apply({"params": params}, *a, method=method, **kw)
  prefix = answer_prefix(trajectory, answer_start_id, stop_ids)
  seq = learner.rebuild(inputs, prefix, apply(Qwen25VL.embed, prefix.tokens), group_size=1)
  rows, slots = seq.mask.shape
  num_candidates, length = continuations.shape
  cache = KVCache.init(config, rows, slots + length)
  hidden, cache = apply(Qwen25VL.decode, seq.embeds, seq.positions, seq.mask, cache,
                        jnp.zeros(rows, jnp.int32), return_hidden=True)
  banned = sampler.banned_mask(config)
  log_softmax = lambda h: jax.nn.log_softmax(
      sampler.policy_logits(apply(Qwen25VL.logits, h), banned, 1.0), axis=-1)
  row = jnp.arange(rows)
  answer_slot = slots - 1 - jnp.argmax(seq.mask[:, ::-1], axis=-1)  # The last real slot.
  first_logp = log_softmax(hidden[row, answer_slot][:, None])[:, 0]  # [R, V]
  next_position = seq.positions[0, row, answer_slot] + 1

  chunk = min(candidate_chunk or num_candidates, num_candidates)
  num_chunks = math.ceil(num_candidates / chunk)
  pad = num_chunks * chunk - num_candidates
  ids = jnp.pad(continuations, ((0, pad), (0, 0))).reshape(num_chunks, chunk, length)
  mask = jnp.pad(continuation_mask, ((0, pad), (0, 0))).reshape(num_chunks, chunk, length)

  def score(args):
    """`[R, C]` log-likelihoods of C candidates: rows r*C + c of one decode call."""
    chunk_ids, chunk_mask = args  # [C, L]
    tiled_ids, tiled_mask = jnp.tile(chunk_ids, (rows, 1)), jnp.tile(chunk_mask, (rows, 1))
    repeated = KVCache(k=jnp.repeat(cache.k, chunk, axis=1), v=jnp.repeat(cache.v, chunk, axis=1),
                       valid=jnp.repeat(cache.valid, chunk, axis=0))
    out, _ = apply(Qwen25VL.decode, apply(Qwen25VL.embed, tiled_ids),
                   text_positions(jnp.repeat(next_position, chunk), length), tiled_mask,
                   repeated, jnp.full(rows * chunk, slots, jnp.int32), return_hidden=True)
    later = jnp.take_along_axis(log_softmax(out[:, :-1]), tiled_ids[:, 1:, None], -1)[..., 0]
    later = jnp.sum(jnp.where(tiled_mask[:, 1:], later, 0.0), axis=-1).reshape(rows, chunk)
    return later + jnp.where(chunk_mask[:, 0], first_logp[:, chunk_ids[:, 0]], 0.0)

  scores = jax.lax.map(score, (ids, mask))  # [chunks, R, C]
  return scores.transpose(1, 0, 2).reshape(rows, -1)[:, :num_candidates]


# ------------------------------------------------------------------ ranking and metrics


def ranking(chosen: np.ndarray, scores: np.ndarray) -> np.ndarray:
  """Candidate order `[B, K]`: `chosen [B]` (0-based, -1: none) first, then by `scores
  [B, K]` descending, ties by index ascending."""
  index = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
  not_chosen = index != np.asarray(chosen)[:, None]
  return np.lexsort((index, -np.asarray(scores), not_chosen), axis=-1)


def recall_hits(chosen: np.ndarray, scores: np.ndarray, gt_index: np.ndarray,
                ks: Sequence[int] = RECALL_AT) -> dict[int, np.ndarray]:
  """`{k: [B] bool}`: the positive (`gt_index`, 0-based, -1: none) is among the first k.

  k = 1 is the chosen answer alone: a response with no answer is wrong there, even though
  its likelihood ranking has a first candidate.
  """
  chosen, gt_index = np.asarray(chosen), np.asarray(gt_index)
  order = ranking(chosen, scores)
  found = order == gt_index[:, None]
  rank = np.where(found.any(-1), np.argmax(found, -1), scores.shape[1])
  return {k: (rank < k) & ((chosen >= 0) | (k > 1)) for k in ks}


def _summarize(rows: Mapping[str, np.ndarray], ks: Sequence[int]) -> dict[str, float]:
  """Means over the scored rows, overall and per task."""
  out = {f"recall@{k}": float(np.mean(rows[f"hit@{k}"])) for k in ks}
  for task in np.unique(rows["task_id"]):
    of_task = rows["task_id"] == task
    out.update({f"recall@{k}/task{task}": float(np.mean(rows[f"hit@{k}"][of_task])) for k in ks})
  out["mean_inspections"] = float(np.mean(rows["inspections"]))
  out["format_error_rate"] = 1.0 - float(np.mean(rows["well_formed"]))
  out["mean_response_tokens"] = float(np.mean(rows["response_tokens"]))
  out["num_examples"] = float(len(rows["task_id"]))
  return out


def _score_rows(out: Mapping[str, Any], tokenizer: Tokenizer, *, max_inspections: int,
                ks: Sequence[int]) -> dict[str, np.ndarray]:
  """Per-row results of one batch (valid rows only) from `eval_step`'s outputs on the host."""
  keep = np.flatnonzero(out["valid"])
  traj = out["trajectory"]
  num_candidates = out["scores"].shape[1]
  parsed = [prompts.parse_response(traj.tokens[r, :traj.lengths[r]].tolist(), tokenizer,
                                   num_candidates=num_candidates,
                                   max_inspections=max_inspections) for r in keep]
  chosen = np.array([-1 if p.answer_index is None else p.answer_index - 1 for p in parsed],
                    np.int32)
  hits = recall_hits(chosen, out["scores"][keep], out["gt_index"][keep], ks)
  return {
      **{f"hit@{k}": v for k, v in hits.items()},
      "task_id": out["task_id"][keep],
      "inspections": np.sum(traj.insert_candidate[keep] >= 0, axis=-1),
      "well_formed": np.array([p.well_formed for p in parsed], bool),
      "response_tokens": traj.lengths[keep],
  }


# ------------------------------------------------------------------ the evaluation loop


@functools.partial(jax.jit, static_argnames=("model", "sampling", "answer_start_id",
                                             "candidate_chunk"))
def eval_step(
    model: Reranker,
    params: Any,
    batch: Mapping[str, jax.Array],
    continuations: jax.Array,
    continuation_mask: jax.Array,
    forced_tokens: jax.Array | None = None,
    *,
    sampling: SamplingParams,
    answer_start_id: int,
    candidate_chunk: int = 0,
) -> dict[str, Any]:
  """One eval batch: encode, rollout (inspections spliced), candidates' answer log-probs.

  Args:
    model: the re-ranker (static); params: its params.
    batch: `ENCODE_KEYS` and `valid`, `gt_index`, `task_id` of a pipeline eval batch.
    continuations, continuation_mask: `[K, L]` from `continuation_ids`.
    forced_tokens: `[B, F]` optional response prefix (`sampler.rollout`).
    sampling, answer_start_id, candidate_chunk: as in `evaluate` / `answer_logprobs`.

  Returns:
    trajectory (`Trajectory`, B rows), scores `[B, K]`, and the batch's valid, gt_index,
    task_id.
  """
  backbone = Qwen25VL(model.config)
  inputs = encode_batch(model, params, batch)
  traj = sampler.rollout(backbone, params["backbone"], inputs, jax.random.key(0),
                         sampling=sampling, forced_tokens=forced_tokens)
  scores = answer_logprobs(backbone, params["backbone"], inputs, traj, continuations,
                           continuation_mask, answer_start_id=answer_start_id,
                           stop_ids=sampling.stop_token_ids or (model.config.eos_token_id,),
                           candidate_chunk=candidate_chunk)
  return {"trajectory": traj, "scores": scores, **{k: batch[k] for k in ROW_KEYS}}


def evaluate(
    model: Reranker,
    params: Any,
    batches: Iterable[dict],
    tokenizer: Tokenizer,
    sampling: SamplingParams,
    *,
    num_examples: int = 0,
    mesh=None,
    rules=None,
    candidate_chunk: int = 0,
    forced_tokens: np.ndarray | None = None,
) -> dict[str, float]:
  """Greedy re-ranking of eval batches; the metrics over every valid row.

  Args:
    model: the re-ranker (vision blocks sized to the data); params: its params.
    batches: pipeline eval batches (numpy, host fields included); rows with valid=False
      are dropped.
    tokenizer: parses the responses and spells the candidate indices.
    sampling: decoding rules; must be greedy (temperature 0).
    num_examples: stop once this many valid rows are scored (in batch order); 0 = all.
    mesh, rules: shard batches over the mesh (every process reads all rows back).
    candidate_chunk: see `answer_logprobs`.
    forced_tokens: `[B, F]` response prefix forced on every batch (-1: drawn), e.g. an
      opening `<think>`; None: none.

  Returns:
    `recall@k` for k in RECALL_AT and per task `recall@k/task{t}`, `mean_inspections`
    (candidates inserted per response), `format_error_rate`, `mean_response_tokens`
    (stop token included), `seconds_per_query` (wall time of the batches after the first,
    which compiles) and `num_examples`.
  """
  if sampling.temperature != 0:
    raise ValueError(f"evaluate decodes greedily: sampling.temperature must be 0, got "
                     f"{sampling.temperature}")
  rules = parallel.DEFAULT_RULES if rules is None else tuple(rules)
  max_inspections = sampling.max_inspections if sampling.inspection else 0
  step = functools.partial(eval_step, model, sampling=sampling,
                           answer_start_id=tokenizer.answer_start, candidate_chunk=candidate_chunk)
  continuations, rows, scored, timings = None, [], 0, []
  with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext(), \
       parallel.with_rules(rules):
    for batch in batches:
      arrays, _ = split_host_fields(batch)
      missing = sorted(set(ENCODE_KEYS + ROW_KEYS) - set(arrays))
      if missing:
        raise ValueError(f"evaluate: an eval batch lacks {missing}; expected the pipeline's "
                         f"'eval' batches (retrv_jax.data.pipeline.make_iterator)")
      arrays = {k: arrays[k] for k in ENCODE_KEYS + ROW_KEYS}
      if continuations is None:
        continuations = continuation_ids(tokenizer, arrays["splice_ids"].shape[1])
      if mesh is not None:
        arrays = parallel.shard_batch(arrays, mesh)
      # Every process reads every row: gathered across processes, or copied to the host.
      start = time.perf_counter()
      out = step(params, arrays, *continuations, forced_tokens)
      if jax.process_count() > 1:
        out = multihost_utils.process_allgather(out, tiled=True)
      else:
        out = jax.device_get(out)
      timings.append((time.perf_counter() - start, int(np.sum(out["valid"]))))
      if num_examples:
        out["valid"] = out["valid"] & (np.cumsum(out["valid"]) <= num_examples - scored)
      rows.append(_score_rows(out, tokenizer, max_inspections=max_inspections, ks=RECALL_AT))
      scored += int(np.sum(out["valid"]))
      if num_examples and scored >= num_examples:
        break
  if not scored:
    raise ValueError("evaluate: the eval batches hold no valid rows (an empty split?)")
  metrics = _summarize({k: np.concatenate([r[k] for r in rows]) for k in rows[0]}, RECALL_AT)
  # Wall time per query of the batches after the first (which compiles), where there are.
  timed = timings[1:] or timings
  metrics["seconds_per_query"] = sum(t for t, _ in timed) / max(sum(n for _, n in timed), 1)
  return metrics


def read_results(workdir: str) -> dict[str, dict[str, float]]:
  """`<workdir>/results.json` as `{name: metrics}`; {} when there is none yet."""
  path = os.path.join(os.path.abspath(workdir), RESULTS_FILE)
  if not os.path.exists(path):
    return {}
  try:
    with open(path) as f:
      results = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"{path}: not readable JSON ({e}); move it away to start afresh") from e
  if not isinstance(results, dict):
    raise ValueError(f"{path}: expected a JSON object {{name: metrics}}, got "
                     f"{type(results).__name__}")
  return results


def write_results(workdir: str, name: str, metrics: Mapping[str, float]) -> str:
  """Merges `{name: metrics}` into `<workdir>/results.json` (process 0, atomic); its path."""
  path = os.path.join(os.path.abspath(workdir), RESULTS_FILE)
  if jax.process_index() != 0:
    return path
  results = read_results(workdir)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  results[name] = {k: float(v) for k, v in metrics.items()}
  outputs.write_json(path, results)
  return path


def eval_batch_size(config: ml_collections.ConfigDict, mesh) -> int:
  """`config.eval.batch_size` rounded up to a multiple of the mesh's batch shards."""
  shards = parallel.batch_shards(mesh) if mesh is not None else 1
  return math.ceil(int(config.eval.batch_size) / shards) * shards


def evaluate_config(config: ml_collections.ConfigDict, model: Reranker, params: Any,
                    tokenizer: Tokenizer, mesh) -> dict[str, float]:
  """`evaluate` on `config.eval.split` with the run's data, sampling and mesh settings.

  The eval batch is rounded up to a multiple of the mesh's batch shards (the pipeline pads
  the last batch with invalid rows).
  """
  section = config.eval
  per_process = setup.per_process(eval_batch_size(config, mesh), "eval.batch_size")
  data = setup.pipeline_config(config, batch_size=per_process, split=section.split)
  model = Reranker(setup.with_vision_blocks(model.config, data), model.compression)
  sampling = setup.sampling_params(config, tokenizer, temperature=0.0,
                                   max_new_tokens=int(section.max_new_tokens))
  return evaluate(model, params, make_iterator("eval", data, tokenizer), tokenizer, sampling,
                  num_examples=int(section.num_examples), mesh=mesh,
                  rules=tuple(config.mesh.rules),
                  candidate_chunk=int(section.get("candidate_chunk", 0)))


# ------------------------------------------------------------------ command line


def default_name(init_checkpoint: str) -> str:
  """The results key of a checkpoint: its stage (a stage output), else its directory name."""
  if not init_checkpoint:
    return "random_init"
  if outputs.is_stage_output(init_checkpoint):
    return str(outputs.read_info(init_checkpoint)["stage"])
  return os.path.basename(os.path.normpath(init_checkpoint))


def evaluate_checkpoint(config: ml_collections.ConfigDict, name: str = "",
                        evaluate_fn=None) -> dict[str, float]:
  """Evaluates `config.init_checkpoint` on the run's mesh with `evaluate_fn(config, model,
  params, tokenizer, mesh)` (default `evaluate_config`), merges the metrics into
  `results.json` under `name` ('': `default_name`) and prints them."""
  parallel.maybe_initialize_distributed(**config.distributed)
  config_lib.validate_mesh(config, jax.device_count())
  mesh = parallel.create_mesh({axis: config.mesh[axis] for axis in parallel.MESH_AXES})
  tokenizer = setup.tokenizer(config)
  with jax.set_mesh(mesh), parallel.with_rules(tuple(config.mesh.rules)):
    model, params = setup.reranker_and_params(config, config.init_checkpoint, mesh=mesh)
    metrics = (evaluate_fn or evaluate_config)(config, model, params, tokenizer, mesh)
  name = name or default_name(config.init_checkpoint)
  path = write_results(config.workdir, name, metrics)
  if jax.process_index() == 0:
    print(f"{name} -> {path}")
    for key in sorted(metrics):
      print(f"  {key:32s} {metrics[key]:.4f}")
  return metrics


def main(argv: Sequence[str]) -> None:
  del argv
  evaluate_checkpoint(flags.FLAGS.config, flags.FLAGS.name)


if __name__ == "__main__":
  # Flags only when run as a program: train.py imports this module and has its own.
  config_flags.DEFINE_config_file("config", "configs/eval.py", "Evaluation config.")
  flags.DEFINE_string("name", "", "Key in results.json; '' = the checkpoint's stage (a stage "
                      "output), its directory name, or 'random_init'.")
  app.run(main)
