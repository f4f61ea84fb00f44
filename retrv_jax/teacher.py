"""Activation data (PAPER.md §5.2): a teacher writes the four-phase chains of thought.

  python -m retrv_jax.teacher --config=configs/base.py:7b --config.model.param_dtype=bfloat16 \
      --config.hf_checkpoint=/path/to/Qwen2.5-VL-72B-Instruct --config.data.data_dir=DIR \
      --out=cots.jsonl [--split=train --samples=4 --temperature=0.7 --max_new_tokens=1024 \
      --num_examples=0 --batch_size=8]

and the SFT stage trains on the result with `--config.data.cot_file=cots.jsonl`. Any
Qwen2.5-VL size works (the model's sizes come from the checkpoint; the preset gives the
data layout and numerics).

The teacher sees each query of the split with its K candidates in full (the re-ranker's
prompt without the ICM) and the ground truth (`prompts.teacher_instruction` ends the user
turn), and samples `--samples` responses with our jitted rollout, one group per query. The
first response that is well formed, answers the ground truth and fits the SFT stage
(`max_response_tokens` with its inspections spliced) becomes the query's CoT, one line of
`--out`:

  {"qid", "dataset", "task_id", "reference_cot", "num_inspections"}

`reference_cot` is the response as the SFT stage reads it: `<think>...</think><answer>k</answer>`,
inspections as tags, no spliced blocks, no `<|im_end|>`; `num_inspections` counts the
distinct candidates it inspects. A query whose samples are all rejected goes to
`<out>.tried`, one qid a line. Both files are appended and flushed after every batch; a
restart skips the qids in either (a last line cut short by a crash is cut off) and goes on.

A Hugging Face checkpoint reads its prompt with its own tokenizer: the Retrv-R1 tokens it
has never seen (`<think>`, `<inspection-index-start>`...) stay text that it can read and
write, and responses are parsed as text. Without `hf_checkpoint` the teacher is the tiny
model of `init_checkpoint` (a stage output; random when ''). One process; its devices
form the mesh of `config.mesh`.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import os
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from retrv_jax import config as config_lib
from retrv_jax import hf, parallel
from retrv_jax.data import mbeir, pipeline, prompts
from retrv_jax.data.tokenizer import Tokenizer, add_retrv_tokens, load_tokenizer
from retrv_jax.models.qwen2_5_vl import Qwen25VL
from retrv_jax.models.reranker import ENCODE_KEYS, Reranker
from retrv_jax.rl import sampler
from retrv_jax.stages import setup

# Where a response ends: the chat end, or Qwen's end of text.
_RESPONSE_END = re.compile(re.escape(prompts.RESPONSE_END) + r"|<\|endoftext\|>")


@dataclasses.dataclass(frozen=True)
class Options:
  """What the command line adds to the run config."""

  out: str  # The jsonl of kept CoTs; `<out>.tried` lists the queries all rejected.
  split: str = "train"
  samples: int = 4  # G: responses per query (one rollout group).
  temperature: float = 0.7  # 0 = greedy (then samples > 1 are identical).
  max_new_tokens: int = 1024  # Generated tokens per response.
  num_examples: int = 0  # The first N queries of the split, in pipeline order; 0 = all.
  batch_size: int = 8  # Queries per rollout; a multiple of the mesh's data x fsdp.

  def __post_init__(self):
    for name in ("samples", "max_new_tokens", "batch_size"):
      if getattr(self, name) < 1:
        raise ValueError(f"--{name} must be positive, got {getattr(self, name)}")
    if self.num_examples < 0 or self.temperature < 0:
      raise ValueError(f"--num_examples and --temperature must be >= 0, got "
                       f"{self.num_examples} and {self.temperature}")
    if not self.out:
      raise ValueError("--out: the jsonl to write is required")


# ---------------------------------------------------------------------------------------
# Judging responses (pure).


@dataclasses.dataclass(frozen=True)
class Judgement:
  """One sampled response, judged."""

  cot: str  # The response as the SFT stage reads it: up to `<|im_end|>`, stripped.
  reason: str | None  # None: kept; 'wrong_answer', 'too_long' or a prompts.FORMAT_ERRORS code.
  num_inspections: int  # Distinct candidates inspected.


def judge(text: str, answer: int, *, num_candidates: int, max_inspections: int) -> Judgement:
  """Whether the decoded response `text` is well formed and answers `answer` (1-based)."""
  cot = _RESPONSE_END.split(text, maxsplit=1)[0].strip()
  parsed = prompts.parse_response_text(cot, num_candidates=num_candidates,
                                       max_inspections=max_inspections)
  reason = parsed.error
  if reason is None and parsed.answer_index != answer:
    reason = "wrong_answer"
  return Judgement(cot, reason, len(parsed.inspected_indices))


def choose(texts: Sequence[str], answer: int, *, num_candidates: int, max_inspections: int,
           fits: Callable[[str], bool] = lambda cot: True
           ) -> tuple[Judgement | None, list[Judgement]]:
  """Judges every sample of a query; returns the first kept (None if none) and them all.

  `fits(cot)`: whether the SFT stage can take it; a response that passes `judge` but not
  this is rejected as 'too_long'.
  """
  judged = []
  for text in texts:
    j = judge(text, answer, num_candidates=num_candidates, max_inspections=max_inspections)
    if j.reason is None and not fits(j.cot):
      j = dataclasses.replace(j, reason="too_long")
    judged.append(j)
  return next((j for j in judged if j.reason is None), None), judged


def sft_fit(tokenizer: Tokenizer, data: pipeline.PipelineConfig
            ) -> Callable[[str, dict[str, Any], int], bool]:
  """`fits(cot, arrays, row)`: whether `pipeline.sft_targets` takes the CoT for that row."""
  fields = [f.name for f in dataclasses.fields(prompts.PromptBatch)]

  def fits(cot: str, arrays: dict[str, Any], row: int) -> bool:
    single = prompts.PromptBatch(**{name: arrays[name][row:row + 1] for name in fields})
    try:
      pipeline.sft_targets(cot, single, tokenizer, max_response_tokens=data.max_response_tokens,
                           max_inspections=data.max_inspections)
    except ValueError:  # Longer than max_response_tokens with its splices.
      return False
    return True

  return fits


# ---------------------------------------------------------------------------------------
# The output files.


class Output:
  """`path` (kept CoTs, jsonl) and `<path>.tried` (qids whose samples were all rejected).

  Opening reads both; a last line without its newline (a crash mid-write) is cut off the
  file by truncation, which leaves either the old or the shorter file, never a mix.
  `append` writes one batch's lines and syncs them to disk before returning.
  """

  def __init__(self, path: str):
    self.path, self.tried_path = path, f"{path}.tried"
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    _complete_lines(path)
    self.kept = set(pipeline.read_cot_file(path))  # Checks every line, naming it.
    self.tried = {line.strip() for line in _complete_lines(self.tried_path) if line.strip()}

  @property
  def done(self) -> set[str]:
    return self.kept | self.tried

  def append(self, records: Sequence[dict[str, Any]], rejected: Sequence[str]) -> None:
    rows = [json.dumps(r, ensure_ascii=False) for r in records]
    for path, lines in ((self.path, rows), (self.tried_path, rejected)):
      if lines:
        with open(path, "a", encoding="utf-8") as f:
          f.write("".join(f"{line}\n" for line in lines))
          f.flush()
          os.fsync(f.fileno())
    self.kept.update(r["qid"] for r in records)
    self.tried.update(rejected)


def _complete_lines(path: str) -> list[str]:
  """The file's complete lines (an empty file is created if missing); an unfinished last
  line is cut off the file."""
  if not os.path.exists(path):
    open(path, "a").close()
  with open(path, "rb") as f:
    data = f.read()
  end = data.rfind(b"\n") + 1
  if end < len(data):
    logging.warning("%s: cutting off an unfinished last line (%d bytes)", path, len(data) - end)
    os.truncate(path, end)
  return data[:end].decode("utf-8").splitlines()


# ---------------------------------------------------------------------------------------
# The loop.


@dataclasses.dataclass
class Counts:
  """What a run did, query by query and sample by sample."""

  kept: int = 0  # Queries given a CoT.
  rejected: int = 0  # Queries whose samples were all rejected (now in `.tried`).
  skipped: int = 0  # Queries an earlier run did.
  no_positive: int = 0  # Queries whose candidates hold no positive: nothing to teach.
  bad_records: int = 0  # Records the pipeline dropped (data.on_error='skip').
  samples: collections.Counter = dataclasses.field(default_factory=collections.Counter)

  def summary(self) -> str:
    tried = self.kept + self.rejected
    rate = self.kept / tried if tried else 0.0
    reasons = ", ".join(f"{k} {v}" for k, v in self.samples.most_common() if k != "kept")
    return (f"kept {self.kept} of {tried} queries tried ({rate:.1%}); "
            f"{self.samples['kept']} of {sum(self.samples.values())} samples acceptable; "
            f"rejected samples: {reasons or 'none'}; skipped {self.skipped} done before, "
            f"{self.no_positive} without a positive, {self.bad_records} bad records")


def label_batches(batches: Iterable[dict[str, Any]],
                  respond: Callable[[dict[str, Any], int], list[list[str]]], output: Output, *,
                  num_candidates: int, max_inspections: int, num_examples: int = 0,
                  fits: Callable[[str, dict[str, Any], int], bool] = lambda cot, arrays, row: True
                  ) -> Counts:
  """Judges the responses to every new query of `batches` and appends them to `output`.

  Args:
    batches: eval-stage pipeline batches of teacher prompts.
    respond: `(arrays, batch_number) -> texts [B][G]`, the decoded responses to a batch's
      arrays (`pipeline.split_host_fields`); called only for batches with a new query.
    output: where kept CoTs and rejected qids go; its `done` qids are skipped.
    num_candidates, max_inspections: the response format's bounds.
    num_examples: stop after this many queries of `batches` (done ones included); 0: all.
    fits: `(cot, arrays, row)`: whether the SFT stage takes a CoT (`sft_fit`).
  """
  counts, seen = Counts(), 0
  for number, batch in enumerate(batches):
    arrays, host = pipeline.split_host_fields(batch)
    counts.bad_records += int(host["num_skipped"])
    rows = []
    for row, qid in enumerate(host["qid"]):
      if not arrays["valid"][row] or (num_examples and seen >= num_examples):
        continue
      seen += 1
      if qid in output.done:
        counts.skipped += 1
      elif arrays["gt_index"][row] < 0:
        counts.no_positive += 1
      else:
        rows.append(row)
    if rows:
      texts = respond(arrays, number)
      records, rejected = [], []
      for row in rows:
        kept, judged = choose(
            texts[row], int(arrays["gt_index"][row]) + 1, num_candidates=num_candidates,
            max_inspections=max_inspections,
            fits=functools.partial(fits, arrays=arrays, row=row))
        counts.samples.update(j.reason or "kept" for j in judged)
        qid = str(host["qid"][row])
        if kept is None:
          rejected.append(qid)
          continue
        records.append({"qid": qid, "dataset": str(host["dataset"][row]),
                        "task_id": int(arrays["task_id"][row]), "reference_cot": kept.cot,
                        "num_inspections": kept.num_inspections})
      output.append(records, rejected)
      counts.kept += len(records)
      counts.rejected += len(rejected)
      logging.info("batch %d: %s", number, counts.summary())
    if num_examples and seen >= num_examples:
      break
  return counts


# ---------------------------------------------------------------------------------------
# The teacher model.


class _TextMarkup(Tokenizer):
  """A checkpoint's own tokenizer for encoding, with the Retrv-R1 ids of `full` known.

  The Retrv-R1 tokens (`<think>`, `<inspection-index-start>`...) are encoded as the text
  the checkpoint was trained on rather than as added ids with untrained, alike embeddings;
  their ids still exist (`splice_block` needs `<|cand_start|>`) and decode as their text.
  """

  def __init__(self, own: Tokenizer, full: Tokenizer):
    self.own, self.full = own, full

  def encode(self, text: str, *, allow_special: bool = True) -> list[int]:
    return self.own.encode(text, allow_special=allow_special)

  def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
    return self.full.decode(ids, skip_special_tokens=skip_special_tokens)

  def token_to_id(self, token: str) -> int | None:
    return self.full.token_to_id(token)

  def id_to_token(self, token_id: int) -> str:
    return self.full.id_to_token(token_id)

  def is_special(self, token_id: int) -> bool:
    return self.full.is_special(token_id)

  @property
  def vocab_size(self) -> int:
    return self.full.vocab_size

  @property
  def pad(self) -> int:
    return self.full.pad


def teacher_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The run config with the ICM off: the teacher reads every candidate in full."""
  config = config.copy_and_resolve_references()
  config.compression.enabled = False
  return config


def load_teacher(config: ml_collections.ConfigDict, mesh
                 ) -> tuple[Reranker, dict[str, Any], Tokenizer, Tokenizer]:
  """(the teacher without ICM, its params, its prompt tokenizer, the SFT stage's tokenizer).

  `config.hf_checkpoint`: any Qwen2.5-VL checkpoint (its own sizes; numerics from
  config.model); '': `config.init_checkpoint` with the tiny tokenizer.
  """
  icm = setup.compression_config(config)
  if not config.hf_checkpoint:
    model, params = setup.reranker_and_params(config, config.init_checkpoint, mesh=mesh,
                                              lora=False)
    tokenizer = load_tokenizer()
    return model, params, tokenizer, tokenizer
  path = config.hf_checkpoint
  model_config, backbone = hf.load_pretrained(path, dtype=config.model.param_dtype, mesh=mesh,
                                              rules=tuple(config.mesh.rules))
  model_config = model_config.replace(dtype=config.model.dtype)
  full, added = add_retrv_tokens(path)
  if full.vocab_size > model_config.vocab_size:
    raise ValueError(f"{path}: the tokenizer with the Retrv-R1 tokens has {full.vocab_size} "
                     f"ids but the model only {model_config.vocab_size} embedding rows")
  prompt_tokenizer = _TextMarkup(load_tokenizer(path), full) if added else full
  return Reranker(model_config, icm), {"backbone": backbone}, prompt_tokenizer, full


def make_respond(model: Reranker, params: dict[str, Any], tokenizer: Tokenizer,
                 sampling: sampler.SamplingParams, *, samples: int, mesh, seed: int
                 ) -> Callable[[dict[str, Any], int], list[list[str]]]:
  """`respond(arrays, batch_number)`: encode + rollout in one jit, decoded `[B][G]` texts."""
  backbone = Qwen25VL(model.config)

  @jax.jit
  def sample(params, batch, key):
    inputs = model.apply({"params": params}, batch, method=Reranker.encode)
    traj = sampler.rollout(backbone, params["backbone"], inputs, key, sampling=sampling,
                           group_size=samples)
    return traj.tokens, traj.lengths

  def respond(arrays: dict[str, Any], number: int) -> list[list[str]]:
    batch = parallel.shard_batch({k: arrays[k] for k in ENCODE_KEYS}, mesh)
    key = jax.random.fold_in(jax.random.key(seed), number)
    tokens, lengths = jax.device_get(sample(params, batch, key))
    texts = [tokenizer.decode(t[:n].tolist()) for t, n in zip(tokens, lengths, strict=True)]
    return [texts[i:i + samples] for i in range(0, len(texts), samples)]

  return respond


def run(config: ml_collections.ConfigDict, options: Options) -> Counts:
  """Writes CoTs for `options.split` into `options.out` (resuming it); returns the counts."""
  if jax.process_count() > 1:
    raise ValueError(f"retrv_jax.teacher runs in one process (with all its devices), got "
                     f"{jax.process_count()}")
  config_lib.validate_mesh(config, jax.device_count())
  mesh = parallel.create_mesh({name: config.mesh[name] for name in parallel.MESH_AXES})
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if options.batch_size % shards:
    raise ValueError(f"--batch_size={options.batch_size}: expected a multiple of the "
                     f"mesh's data x fsdp = {shards}")
  config = teacher_config(config)
  data = setup.pipeline_config(config, batch_size=options.batch_size, split=options.split,
                               teacher_prompt=True)
  output = Output(options.out)  # Before the model loads: a bad file fails fast.
  model, params, prompt_tokenizer, sft_tokenizer = load_teacher(config, mesh)
  model = Reranker(setup.with_vision_blocks(model.config, data), model.compression)
  sampling = setup.sampling_params(config, prompt_tokenizer, temperature=options.temperature,
                                   max_new_tokens=options.max_new_tokens)
  respond = make_respond(model, params, prompt_tokenizer, sampling, samples=options.samples,
                         mesh=mesh, seed=config.seed)
  batches = pipeline.make_iterator("eval", data, prompt_tokenizer)
  with jax.set_mesh(mesh), parallel.with_rules(tuple(config.mesh.rules)):
    return label_batches(batches, respond, output, num_candidates=data.num_candidates,
                         max_inspections=data.max_inspections,
                         num_examples=options.num_examples, fits=sft_fit(sft_tokenizer, data))


FLAGS = flags.FLAGS


def _define_flags() -> None:
  """Flags exist only when this module runs as a program, so importing it defines none."""
  config_flags.DEFINE_config_file("config", "configs/base.py", "Run config.")
  flags.DEFINE_string("out", None, "The jsonl of kept CoTs (appended; resumable).",
                      required=True)
  flags.DEFINE_enum("split", "train", list(mbeir.SPLITS), "Split to write CoTs for.")
  flags.DEFINE_integer("samples", 4, "Responses sampled per query.")
  flags.DEFINE_float("temperature", 0.7, "Sampling temperature; 0 = greedy.")
  flags.DEFINE_integer("max_new_tokens", 1024, "Tokens per response.")
  flags.DEFINE_integer("num_examples", 0, "The first N queries of the split; 0 = all.")
  flags.DEFINE_integer("batch_size", 8, "Queries per rollout.")


def main(argv: Sequence[str]) -> None:
  del argv
  options = Options(out=FLAGS.out, split=FLAGS.split, samples=FLAGS.samples,
                    temperature=FLAGS.temperature, max_new_tokens=FLAGS.max_new_tokens,
                    num_examples=FLAGS.num_examples, batch_size=FLAGS.batch_size)
  counts = run(FLAGS.config, options)
  output = Output(options.out)
  print(f"teacher: {counts.summary()}")
  print(f"{options.out}: {len(output.kept)} CoTs; {output.tried_path}: {len(output.tried)} "
        "queries rejected")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
