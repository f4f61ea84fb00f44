"""Stage 0, for the embedded tiny model only: caption-and-compare pretraining, so that the
tiny VLM stands in for a pretrained Qwen2.5-VL before the Retrv-R1 stages.

The whole backbone learns, from random init, to describe a candidate from its full
tokens and to say how it relates to the query (`sequences` rows with the full block),
plus plain language modelling of the prompt templates (the system prompt, the phase
headings, the teacher instruction), so the words of the response format are not new to
it. Once the captions are learned, 'relate' (the relation rows alone) teaches the
comparison the describe mix leaves at background level. After the `vision` stage,
`config.pretrain.train_vision=False` would keep the tower as trained there (the shipped
model lets it tune: see the README). The real presets start from Qwen2.5-VL and skip it.

The shipped model (`retrv_jax.stages.assets.TINY_PRETRAINED`) is this stage's output, by
the commands in configs/pretrain.py's docstring.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from retrv_jax.data import prompts
from retrv_jax.data.tokenizer import Tokenizer
from retrv_jax.models import lora
from retrv_jax.models.reranker import Reranker, encode_batch
from retrv_jax.stages import lists, pointing, sequences, trainer

TRAINABLE = (r"^backbone/",)
TRAINABLE_WITHOUT_VISION = (r"^backbone/(?!visual/)",)
PIPELINE_STAGE = "align"
# 'describe' (content and relation rows) or 'relate' (relation rows only: how a candidate
# differs from the query's target, once the captions are learned), 'template' (LM on the
# format texts), 'point' (name the candidate of a numbered list that fits the query; the
# lists follow `pretrain.point_curriculum`, see retrv_jax/stages/lists.py).
TASKS = ("describe", "relate", "template", "point")


def trainable_patterns(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  return TRAINABLE if config.pretrain.train_vision else TRAINABLE_WITHOUT_VISION


def template_ids(tokenizer: Tokenizer, num_candidates: int) -> np.ndarray:
  """Every fixed text of the prompt and response formats, as one token sequence."""
  ids = []
  for text in prompts.template_texts(num_candidates):
    ids += tokenizer.encode(text + "\n", allow_special=True)
  return np.asarray(ids, np.int32)


def make_step(model: Reranker, config: ml_collections.ConfigDict, tokenizer: Tokenizer, tx):
  if model.compression.enabled:
    raise ValueError("pretrain trains the backbone alone: set config.compression.enabled=False")
  rows = sequences.DescribeRows(tokenizer, config.compression.max_query_tokens)
  per_example = min(int(config.pretrain.candidates_per_example), config.data.num_candidates)
  template = template_ids(tokenizer, config.data.num_candidates)
  tasks = [t.strip() for t in str(config.pretrain.tasks).split(",") if t.strip()]
  unknown = sorted(set(tasks) - set(TASKS))
  if unknown or ("describe" in tasks) == ("relate" in tasks):
    raise ValueError(f"config.pretrain.tasks = {config.pretrain.tasks!r}: expected one of "
                     f"'describe' or 'relate' and any of {TASKS[2:]}, comma-separated")
  content = "describe" in tasks
  k = config.data.num_candidates
  rungs = lists.parse(config.pretrain.point_curriculum or f"{k}:all", num_candidates=k,
                      steps=int(config.pretrain.steps), field="config.pretrain.point_curriculum")
  point = pointing.PointRows.from_config(config, tokenizer, max(r.size for r in rungs))
  verdict_weight = float(config.pretrain.point_verdict_weight)

  def sample(rung: lists.Rung):
    def draw(stacked, key):
      """This step's lists, drawn over the whole step (so micro-batching leaves them
      unchanged): `point_index [n, B, size]` and `point_target [n, B]`."""
      shape = stacked["gt_index"].shape
      index, target = lists.sample(key, stacked["gt_index"].reshape(-1),
                                   stacked["hard_negative_mask"].reshape(-1, k), rung.size,
                                   rung.hard)
      return dict(stacked, point_index=index.reshape(*shape, rung.size),
                  point_target=target.reshape(shape))
    return draw

  def template_loss(params):
    apply = lambda fn, *a, **kw: model.apply({"params": params}, *a, method=fn, **kw)
    ids = jnp.asarray(template)[None]
    hidden = apply(lambda m, i: m.backbone(i, return_hidden=True), ids)
    logits = apply(lambda m, h: m.backbone.logits(h), hidden[:, :-1]).astype(jnp.float32)
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits), ids[:, 1:, None], axis=-1)
    return -jnp.sum(logp), jnp.float32(ids.shape[1] - 1)

  def denominator(stacked):
    total = sequences.described_tokens(stacked, per_example, content=content)
    if "template" in tasks:
      total += stacked["gt_index"].size * (len(template) - 1)
    # The pointing answers are averaged per list on their own, so the descriptions'
    # hundreds of tokens do not drown them (chance: ln of the list's size).
    return jnp.stack([total, jnp.sum(stacked["gt_index"] >= 0, dtype=jnp.float32)])

  def loss_fn(trainable, frozen, batch, denom, rng):
    del rng
    params = lora.combine(trainable, frozen)
    inputs = encode_batch(model, params, batch)
    loss, pairs = sequences.describe_loss(model, rows, params, batch, denom[0], inputs=inputs,
                                          per_example=per_example, compressed=False,
                                          content=content)
    if "template" in tasks:
      # Once per example, so that micro-batching leaves the loss unchanged.
      examples = batch["gt_index"].shape[0]
      lm_loss, lm_count = (x * examples for x in template_loss(params))
      pairs["template_loss"] = (lm_loss, lm_count)
      loss += lm_loss / denom[0]
    if "point" in tasks:
      point_pairs = point.loss(model, params, inputs, batch, batch["point_index"],
                               batch["point_target"])
      pairs.update(point_pairs)
      lists_count = point_pairs["point_loss"][1]
      size = jnp.float32(batch["point_index"].shape[-1])
      pairs["point_list_size"] = (size * lists_count, lists_count)
      loss += point_pairs["point_loss"][0] / denom[1]
      if verdict_weight:
        loss += verdict_weight * point_pairs["point_verdict_loss"][0] / denom[1]
    return loss, pairs

  if "point" not in tasks:
    return trainer.supervised_step(loss_fn, denominator, tx)
  # One complete step per rung, chosen by the step count: a switch around the gradient, not
  # inside it (differentiating a switch would build every rung's residuals at every step).
  steps = [trainer.supervised_step(loss_fn, denominator, tx, sample=sample(r)) for r in rungs]
  if len(steps) == 1:
    return steps[0]

  def step(state, frozen, micro_batches):
    return jax.lax.switch(lists.rung_index(rungs, state.step), steps, state, frozen,
                          micro_batches)

  return step
