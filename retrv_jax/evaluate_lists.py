"""List choice of the backbone alone: given a test query and its K stage-I candidates in
full tokens, does the model name the positive? The skill the re-ranker's answer needs,
measured without the ICM, the chain of thought or inspections.

  python -m retrv_jax.evaluate_lists --config=configs/pretrain.py:point \\
      [--config.init_checkpoint=DIR] [--name=NAME]

Each query becomes one pointing row (`retrv_jax.stages.pointing`: the stage-I list in its
order, with the workspace if `config.pretrain.point_workspace`), and the model's greedy
answer is read (its first two tokens, as digits). Metrics, into `<workdir>/results.json`
under NAME (default `list_choice`):

  recall@1                  the answer is the positive's label (chance 1/K)
  recall@1/task{t}          per task
  recall@1/with_hard, recall@1/without_hard   queries whose list holds a hard negative or not
  wrong_hard, wrong_easy, no_label   answers naming a hard negative, an easy negative, or
                            no candidate (not a label in 1..K), as fractions of all queries
  top_answer_share          the share of the most frequent answer (a position prior: 1.0
                            answers one label whatever the list)

With tags (`pretrain.point_tag`) the model first writes a verdict after each candidate,
then answers; also:

  verdict_recall@1          the candidate whose verdict was surest of " match" is the positive
                            (and its breakdown: verdict_recall@1/task{t}, /with_hard,
                            /without_hard, verdict_wrong_hard, verdict_wrong_easy)
  verdict_one_match         lists where exactly one verdict says " match" (with parallel
                            pieces, all: " match" is written for the surest only)
  verdict_matches_per_list  verdicts saying " match", on average
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from jax.experimental import multihost_utils
from ml_collections import config_flags

from retrv_jax import evaluate, parallel
from retrv_jax.data.pipeline import make_iterator, split_host_fields
from retrv_jax.models.reranker import Reranker, encode_batch
from retrv_jax.stages import pointing, setup

ROW_KEYS = ("valid", "gt_index", "task_id", "hard_negative_mask")


def evaluate_lists(model: Reranker, params: Any, batches: Iterable[dict],
                   rows: pointing.PointRows, *, num_examples: int = 0, mesh=None
                   ) -> dict[str, float]:
  """The metrics of the module docstring over the valid rows of `batches` (pipeline eval
  batches, candidates in full tokens)."""

  @jax.jit
  def answer(params, arrays):
    inputs = encode_batch(model, params, arrays)
    shape = arrays["candidate_mask"].shape[:2]  # [B, K]: each row's stage-I list, in order.
    index = jnp.broadcast_to(jnp.arange(shape[1], dtype=jnp.int32)[None], shape)
    if rows.tags is None:
      return {"answer": rows.greedy_answer(model, params, inputs, arrays, index)}
    verdicts, margins = rows.greedy_verdicts(model, params, inputs, arrays, index)
    return {"answer": rows.greedy_answer(model, params, inputs, arrays, index, verdicts),
            "verdict_choice": jnp.argmax(margins, axis=-1).astype(jnp.int32) + 1,
            "verdict_matches": jnp.sum(verdicts == rows.verdict_words[0], axis=-1)}

  out = {key: [] for key in ("answer", "verdict_choice", "verdict_matches") + ROW_KEYS}
  with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
    for batch in batches:
      arrays, _ = split_host_fields(batch)
      device = parallel.shard_batch(arrays, mesh) if mesh is not None else arrays
      got = {**answer(params, device), **{key: device[key] for key in ROW_KEYS}}
      got = (multihost_utils.process_allgather(got, tiled=True) if jax.process_count() > 1
             else jax.device_get(got))
      for key, value in got.items():
        out[key].append(np.asarray(value))
      if num_examples and sum(int(np.sum(v)) for v in out["valid"]) >= num_examples:
        break
  table = {key: np.concatenate(value) for key, value in out.items() if value}
  keep = table["valid"] & (table["gt_index"] >= 0)
  if num_examples:
    keep &= np.cumsum(keep) <= num_examples
  if not keep.any():
    raise ValueError("evaluate_lists: the batches hold no valid row with a positive")
  return summarize({key: value[keep] for key, value in table.items()})


def summarize(table: dict[str, np.ndarray]) -> dict[str, float]:
  """Metrics from per-query `answer` (1-based label, 0: none), `gt_index`, `task_id` and
  `hard_negative_mask [N, K]`; with `verdict_choice` and `verdict_matches`, the same for
  the verdicts' choice under `verdict_`."""
  metrics = {"num_examples": float(len(table["answer"])),
             **_choice_metrics(table["answer"], table)}
  if "verdict_choice" in table:  # Tagged lists: what the written verdicts say.
    verdicts = _choice_metrics(table["verdict_choice"], table)
    metrics.update({f"verdict_{key}": value for key, value in verdicts.items()
                    if key not in ("no_label", "top_answer_share")})
    matches = table["verdict_matches"]
    metrics["verdict_one_match"] = np.mean(matches == 1)
    metrics["verdict_matches_per_list"] = np.mean(matches)
  return {key: float(value) for key, value in metrics.items()}


def _choice_metrics(answer: np.ndarray, table: dict[str, np.ndarray]) -> dict[str, float]:
  """Recall@1 of 1-based labels `answer [N]` overall, per task and with / without a hard
  negative in the list, and what the wrong ones name."""
  gt, hard = table["gt_index"], table["hard_negative_mask"]
  n, k = hard.shape
  correct = answer == gt + 1
  labelled = (answer >= 1) & (answer <= k)
  picked_hard = labelled & hard[np.arange(n), np.clip(answer - 1, 0, k - 1)]
  has_hard = hard.any(axis=1)
  metrics = {"recall@1": correct.mean(),
             "wrong_hard": np.mean(~correct & picked_hard),
             "wrong_easy": np.mean(~correct & labelled & ~picked_hard),
             "no_label": np.mean(~labelled),
             "top_answer_share": np.bincount(answer).max() / n}
  for name, rows in (("with_hard", has_hard), ("without_hard", ~has_hard)):
    if rows.any():
      metrics[f"recall@1/{name}"] = correct[rows].mean()
  for task in np.unique(table["task_id"]):
    metrics[f"recall@1/task{int(task)}"] = correct[table["task_id"] == task].mean()
  return metrics


def evaluate_lists_config(config, model: Reranker, params: Any, tokenizer, mesh
                          ) -> dict[str, float]:
  """`evaluate_lists` on `config.eval.split`, the candidates in full tokens (the prompt
  itself is read only for the query's tokens)."""
  per_process = setup.per_process(evaluate.eval_batch_size(config, mesh), "eval.batch_size")
  data = setup.pipeline_config(config, batch_size=per_process, split=config.eval.split,
                               compress_candidates=True)
  model = Reranker(setup.with_vision_blocks(model.config, data), model.compression)
  rows = pointing.PointRows.from_config(config, tokenizer, config.data.num_candidates)
  return evaluate_lists(model, params, make_iterator("eval", data, tokenizer), rows,
                        num_examples=int(config.eval.num_examples), mesh=mesh)


def main(argv: Sequence[str]) -> None:
  del argv
  evaluate.evaluate_checkpoint(flags.FLAGS.config, flags.FLAGS.name, evaluate_lists_config)


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", "configs/pretrain.py:point", "A pretraining config.")
  flags.DEFINE_string("name", "list_choice", "Key in results.json.")
  app.run(main)
