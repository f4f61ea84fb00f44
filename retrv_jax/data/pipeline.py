"""grain input pipelines of every stage: align, sft, grpo and eval.

  it = make_iterator("grpo", PipelineConfig(data_dir=DIR), load_tokenizer())
  batch = next(it)                                   # numpy, this process's rows
  arrays, host = split_host_fields(batch)            # the trainer: parallel.shard_batch(arrays)
  state = it.get_state(); it.set_state(state)        # JSON-able; exact resume

One linear chain per stage (`make_dataset`):

  source   tfds ArrayRecord (`tfds_mbeir.rerank_dataset`) or an M-BEIR root (`mbeir` reader)
  shard    [process_index::process_count]           disjoint, together the whole split
  (eval)   padded with None to the same length on every process, a multiple of B x workers
  shuffle  seeded; a new permutation every epoch (grain's shuffle reseeds past one epoch)
  repeat   train stages; num_epochs = 0: forever
  map      decode images, Qwen preprocessing, instruction, tokenize, stage targets
  batch    B examples -> static-shape numpy arrays (`_Batcher`)
  prefetch worker processes (`mp_prefetch`) when worker_count > 0

Same seed and worker_count -> same batches; each worker batches its own slice, so another
worker_count gives other batches (resume with the one the state was saved under).

A bad record (undecodable image, prompt longer than the largest bucket, missing CoT...)
raises an error naming its dataset, task and qid; with on_error='skip' it is dropped (eval:
kept as an invalid row, so every process runs the same number of batches) and counted in
the batch's `num_skipped`.

Batch fields (B = batch_size, T = prompt bucket, K = num_candidates, Lc =
max_candidate_tokens, N = max_patches, D = C*T*P*P, R = max_response_tokens, M =
max_inspections, Ld = max_description_tokens). Every stage:

  input_ids, attention_mask, lengths, slot_index, slot_positions, query_mask, image_spans,
  candidate_ids, candidate_mask, candidate_image_spans, candidate_image_grid_thw,
  splice_ids, splice_mask            as `prompts.PromptBatch` ([B, T], [B, K, Lc], ...)
  image_grid_thw  [B, 1 + K, 3] int32  grid of every image: slot 0 the query, 1..K the
                                       candidates; zeros: none. The prompt itself holds
                                       the slots with image_spans[..., 1] > 0.
  pixel_values    [N, D] float32       patches of every image in (b, slot) order, absent
                                       images skipped, zero rows after the last.
  gt_index        [B] int32            0-based positive among the candidates, -1: none.
  hard_negative_mask [B, K] bool       the candidates in the query's `neg_cand_list`.
  task_id         [B] int32            M-BEIR task id.
  valid           [B] bool             False on eval padding and skipped eval rows.
  host fields (numpy, never sent to devices; `split_host_fields`):
  qid, dataset    [B] object (str)     '' on padding.
  num_skipped     int                  bad records dropped while building this batch.

sft adds the teacher response, its inspections spliced as the sampler splices them:

  target_ids:      <think> .. <is> 3 <ie> <cand_start> block_3 <cand_end> .. <|im_end|> pad
  target_loss_mask:   1    ..   1  1  1       0          0..0      0      ..     1       0
  response_ids:    <think> .. <is> 3 <ie> .. <|im_end|> pad ..                 (no splices)
  (<is>, <ie>: <inspection-index-start>, <inspection-index-end>)

  target_ids, target_mask, target_loss_mask   [B, R]  int32, bool (real), bool (scored)
  response_ids [B, R] int32, response_lengths [B] int32   the sampler's token layout
  insert_positions [B, M] int32   index in target_ids of each `<|cand_start|>`, -1: none
  insert_steps     [B, M] int32   index in response_ids of its `<inspection-index-end>`
  insert_candidates [B, M] int32  0-based candidate inserted there (its `splice_ids` row)

align adds what the frozen LM must say from each candidate's compressed tokens:

  description_ids, description_mask  [B, K, Ld]  content description + `<|im_end|>`
  relation_ids, relation_mask        [B, K, Ld]  query-candidate relation + `<|im_end|>`
  (empty texts: no tokens, all-False mask; longer texts are cut before the end token.)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain
import jax
import numpy as np
from absl import flags, logging

from retrv_jax.data import mbeir, prompts, tfds_mbeir
from retrv_jax.data.images import ImageConfig, load_image, preprocess_image
from retrv_jax.data.records import ON_ERROR, resolve_image
from retrv_jax.data.tokenizer import Tokenizer

STAGES = ("align", "sft", "grpo", "eval")
SOURCES = ("tfds", "mbeir")
HOST_FIELDS = ("qid", "dataset", "num_skipped")
_MODALITY_WORDS = {"text": "text", "image": "image", "image,text": "image with text"}


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  """Everything the pipelines read; the trainers build it from `config.data`."""

  data_dir: str = ""  # tfds data_dir (source 'tfds') or the M-BEIR root (source 'mbeir').
  source: str = "tfds"  # 'tfds' (built ArrayRecord files) or 'mbeir' (read the jsonl).
  pool: str = "local"  # tfds: builder config name; mbeir: 'local' or 'global' pools.
  pairs: tuple[str, ...] = ()  # mbeir: 'dataset:task_id' pairs to read; empty: all.
  split: str = "train"
  image_root: str = ""  # Where image paths resolve when a record has no bytes; ''=data_dir
  # for source 'mbeir', none for 'tfds'.
  instructions_file: str = ""  # UniIR query_instructions.tsv; '' = one generic per task.
  # jsonl of {"qid", "reference_cot"} (`retrv_jax.teacher` writes it): its CoTs replace the
  # records' reference_cot by qid; a record it lacks keeps its own. '' = none.
  cot_file: str = ""
  batch_size: int = 4  # Examples per batch on this process.
  seed: int = 0  # Shuffle seed.
  shuffle: bool = True  # Train stages; eval never shuffles.
  num_epochs: int = 0  # Train stages; 0 repeats forever. Eval reads the split once.
  worker_count: int = 0  # Worker processes (mp_prefetch); 0 works in this process.
  worker_buffer_size: int = 2  # Batches each worker keeps ready.
  read_threads: int = 2  # Threads mapping examples (per process / per worker).
  num_candidates: int = 10  # K.
  prompt_buckets: tuple[int, ...] = (256, 512, 1024)  # Padded prompt lengths T.
  max_candidate_tokens: int = 64  # Lc.
  compress_candidates: bool = True  # False: full candidate tokens in the prompt (no ICM).
  teacher_prompt: bool = False  # Prompts end with the ground truth's teacher_instruction.
  candidate_slots: tuple[str, ...] = ("con", "rel")  # Compressed tokens per candidate.
  padding_side: str = "right"  # Of prompts: 'right' or 'left'.
  system_prompt: str = prompts.SYSTEM_PROMPT  # The system turn of every prompt.
  min_pixels: int = 56 * 56  # Image area bounds after resizing (Qwen smart_resize); the
  max_pixels: int = 56 * 56  # tiny default makes every image 4x4 patches = 4 LLM tokens.
  patch_size: int = 14  # Vision tower geometry (must match the model's vision config).
  merge_size: int = 2
  temporal_patch_size: int = 2
  max_patches: int = 0  # N: pixel rows per batch; 0 = B * (1 + K) * max patches per image.
  max_response_tokens: int = 512  # R (sft): response with its splices.
  max_inspections: int = 3  # M: splices per response (the sampler's rule).
  max_description_tokens: int = 48  # Ld (align).
  on_error: str = "raise"  # 'skip' drops bad records and counts them.

  def __post_init__(self):
    _check_choice("source", self.source, SOURCES)
    _check_choice("on_error", self.on_error, ON_ERROR)
    _check_choice("split", self.split, mbeir.SPLITS)
    for name in ("batch_size", "num_candidates", "max_candidate_tokens", "read_threads",
                 "max_response_tokens", "max_description_tokens", "worker_buffer_size"):
      if getattr(self, name) < 1:
        raise ValueError(f"PipelineConfig.{name} must be positive, got {getattr(self, name)}")
    for name in ("num_epochs", "worker_count", "max_patches", "max_inspections"):
      if getattr(self, name) < 0:
        raise ValueError(f"PipelineConfig.{name} must be >= 0, got {getattr(self, name)}")
    if self.pairs and self.source != "mbeir":
      raise ValueError("PipelineConfig.pairs applies to source 'mbeir'; a tfds build fixes "
                       "its pairs (MbeirRerankConfig.pairs)")
    self.prompt_config()  # Validates buckets and padding side.
    self.image_config()

  @classmethod
  def from_config(cls, values: Mapping[str, Any]) -> PipelineConfig:
    """From a dict or ml_collections ConfigDict (`config.data`); unknown keys are an error."""
    values = dict(values.to_dict() if hasattr(values, "to_dict") else values)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
      raise ValueError(f"unknown data config keys {unknown}; known: {sorted(fields)}")
    tuples = {k: tuple(v) for k, v in values.items()
              if k in ("pairs", "prompt_buckets", "candidate_slots")}
    return cls(**{**values, **tuples})

  def prompt_config(self) -> prompts.PromptConfig:
    return prompts.PromptConfig(
        num_candidates=self.num_candidates, prompt_buckets=tuple(self.prompt_buckets),
        max_candidate_tokens=self.max_candidate_tokens, merge_size=self.merge_size,
        compress_candidates=self.compress_candidates, candidate_slots=self.candidate_slots,
        padding_side=self.padding_side, system_prompt=self.system_prompt)

  def image_config(self) -> ImageConfig:
    return ImageConfig(min_pixels=self.min_pixels, max_pixels=self.max_pixels,
                       patch_size=self.patch_size, merge_size=self.merge_size,
                       temporal_patch_size=self.temporal_patch_size)

  def num_patches(self) -> int:
    """N: `max_patches`, or the most a batch can need when every image is the largest."""
    if self.max_patches:
      return self.max_patches
    per_image = self.max_pixels // self.patch_size**2
    return self.batch_size * (1 + self.num_candidates) * per_image


def _check_choice(name: str, value: Any, allowed: Sequence[Any]) -> None:
  if value not in allowed:
    raise ValueError(f"PipelineConfig.{name} must be one of {tuple(allowed)}, got {value!r}")


def split_host_fields(batch: dict[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """(arrays for `parallel.shard_batch`, host-only fields: qid, dataset, num_skipped)."""
  arrays = {k: v for k, v in batch.items() if k not in HOST_FIELDS}
  return arrays, {k: batch[k] for k in HOST_FIELDS if k in batch}


# ---------------------------------------------------------------------------------------
# Sources: dicts with `tfds_mbeir.FEATURES` keys.


def read_source(config: PipelineConfig) -> grain.MapDataset:
  """The split as a MapDataset of decoded records, from tfds files or the M-BEIR reader,
  with `cot_file`'s CoTs as reference_cot where it has one."""
  if config.source == "tfds":
    return _with_cots(tfds_mbeir.rerank_dataset(config.data_dir, config.split,
                                                config=config.pool), config)
  _check_choice("pool", config.pool, ("local", "global"))
  layout = mbeir.Layout(config.data_dir)
  examples = []
  for dataset, task_id in tfds_mbeir._select_pairs(layout, config.split, config.pairs):
    path = (layout.local_pool_file(dataset, task_id) if config.pool == "local"
            else layout.global_pool_file(config.split))
    pool = mbeir.CandidatePool(path, image_root=layout.root, on_error=config.on_error,
                               verify_images="none")
    examples.extend(mbeir.iter_rerank_examples(layout, dataset, task_id, config.split, pool,
                                               on_error=config.on_error, verify_images=False))
    pool.close()
  if not examples:
    raise ValueError(f"no {config.split!r} examples under {config.data_dir}")
  return _with_cots(grain.MapDataset.source(examples).map(_mbeir_record), config)


def _mbeir_record(example: mbeir.RerankExample) -> dict[str, Any]:
  return tfds_mbeir.to_features(example, None)  # Images are read from their paths later.


def read_cot_file(path: str) -> dict[str, str]:
  """qid -> reference_cot from a `cot_file` (one JSON object per line; blank lines ignored)."""
  cots, first_line = {}, {}
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{number}: not a JSON object ({e.msg})") from e
      if not (isinstance(row, dict) and isinstance(row.get("qid"), str)
              and isinstance(row.get("reference_cot"), str) and row["reference_cot"]):
        raise ValueError(f"{path}:{number}: expected an object with a string 'qid' and a "
                         "non-empty string 'reference_cot'")
      qid = row["qid"]
      if qid in cots:
        raise ValueError(f"{path}:{number}: qid {qid!r} again (first on line "
                         f"{first_line[qid]})")
      cots[qid], first_line[qid] = row["reference_cot"], number
  return cots


def _with_cots(records: grain.MapDataset, config: PipelineConfig) -> grain.MapDataset:
  if not config.cot_file:
    return records
  return records.map(functools.partial(_replace_cot, read_cot_file(config.cot_file)))


def _replace_cot(cots: dict[str, str], record: dict[str, Any]) -> dict[str, Any]:
  return dict(record, reference_cot=cots.get(record["qid"], record["reference_cot"]))


def _instructions(config: PipelineConfig) -> dict[tuple[int, str, str], tuple[str, ...]]:
  if not config.instructions_file:
    return {}
  table, _ = mbeir.read_instructions(config.instructions_file, on_error=config.on_error)
  return {key: row.prompts for key, row in table.items()}


# ---------------------------------------------------------------------------------------
# One record -> one prepared example.


class RecordError(ValueError):
  """A record the pipeline cannot use; the message names dataset, task and qid."""


@dataclasses.dataclass
class _Prepared:
  """An example ready to batch: the prompt's inputs, its images and its stage targets."""

  example: prompts.Example
  pixels: list[np.ndarray]  # [h * w, D] per present image, slot order.
  qid: str = ""
  dataset: str = ""
  task_id: int = -1
  gt_index: int = -1
  hard_negatives: np.ndarray | None = None  # [K] bool; None: a padding row (all False).
  targets: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class _Skipped:
  reason: str


class _Prepare:
  """Record dict -> `_Prepared`, or `_Skipped` under on_error='skip'. Picklable for workers."""

  def __init__(self, stage: str, config: PipelineConfig, tokenizer: Tokenizer):
    self.stage, self.config, self.tokenizer = stage, config, tokenizer
    self.prompt_config, self.image_config = config.prompt_config(), config.image_config()
    self.instructions = _instructions(config)
    root = config.image_root or (config.data_dir if config.source == "mbeir" else "")
    self.image_root = root

  def __call__(self, record: dict[str, Any] | None) -> _Prepared | _Skipped | None:
    if record is None:  # Eval padding.
      return None
    try:
      return self.prepare(record)
    except (ValueError, OSError) as e:
      where = f"{record.get('dataset')} task {record.get('task_id')} qid {record.get('qid')}"
      error = RecordError(f"{where}: {e}")
      if self.config.on_error == "raise":
        raise error from e
      logging.warning("skipping record: %s", error)
      return _Skipped(str(error))

  def prepare(self, record: dict[str, Any]) -> _Prepared:
    k = self.config.num_candidates
    if len(record["cand_texts"]) != k:
      raise ValueError(f"{len(record['cand_texts'])} candidates, expected num_candidates={k}")
    pixels, grids = [], []
    sources = [(record["query_image"], record["query_img_path"])]
    sources += list(zip(record["cand_images"], record["cand_img_paths"], strict=True))
    for slot, (data, path) in enumerate(sources):
      image = self.image(data, path, "query" if slot == 0 else f"candidate {slot}")
      grids.append(None if image is None else image[1])
      if image is not None:
        pixels.append(image[0])
    gt_index = int(record["gt_index"])
    example = prompts.Example(
        instruction=self.instruction(record),
        query=prompts.Item(record["query_text"], grids[0]),
        candidates=tuple(prompts.Item(t, g) for t, g in zip(record["cand_texts"], grids[1:],
                                                            strict=True)),
        teacher_answer=gt_index + 1 if self.config.teacher_prompt and gt_index >= 0 else None)
    single = prompts.build_batch([example], self.tokenizer, self.prompt_config)  # Validates.
    rows = sum(len(p) for p in pixels)
    if rows > self.config.num_patches():
      raise ValueError(f"its images have {rows} patches, more than max_patches="
                       f"{self.config.num_patches()}")
    prepared = _Prepared(example, pixels, record["qid"], record["dataset"],
                         int(record["task_id"]), gt_index,
                         np.asarray(record["cand_is_hard_negative"], bool))
    if self.stage == "sft" and not record["reference_cot"]:
      raise ValueError("no reference_cot: the sft stage needs the teacher's response")
    prepared.targets = _stage_targets(
        self.stage, self.config, self.tokenizer, single, cot=record["reference_cot"],
        descriptions=record["cand_descriptions"], relations=record["cand_relations"])
    return prepared

  def image(self, data: bytes, path: str, name: str):
    """(patches [h * w, D], (t, h, w)) of one image slot, or None when it has none."""
    if not data and not path:
      return None
    name = f"{name} ({path})" if path else name
    if not data:
      full = resolve_image(self.image_root, path) if self.image_root else None
      if full is None:
        raise ValueError(f"image {name} has no bytes and does not resolve under image_root="
                         f"{self.image_root!r}")
      data = full
    rgb = load_image(data, self.image_config, name=name)
    return preprocess_image(rgb, self.image_config, name=name)

  def instruction(self, record: dict[str, Any]) -> str:
    task_id, qmod = int(record["task_id"]), record["query_modality"]
    if task_id not in mbeir.TASK_MODALITIES:
      raise ValueError(f"unknown task id {task_id}; known: {sorted(mbeir.TASK_MODALITIES)}")
    cmod = mbeir.TASK_MODALITIES[task_id][1]
    if not self.instructions:
      return (f"Retrieve the {_MODALITY_WORDS[cmod]} that best matches the "
              f"{_MODALITY_WORDS[qmod]} query.")
    key = (int(record["qid"].split(":")[0]), qmod, cmod)
    if key not in self.instructions:
      raise ValueError(f"no instruction for (dataset_id, query, candidate modality) = {key} "
                       f"in {self.config.instructions_file}")
    options = self.instructions[key]
    return options[zlib.crc32(record["qid"].encode()) % len(options)]  # Stable choice.



def _stage_targets(stage: str, config: PipelineConfig, tokenizer: Tokenizer,
                   single: prompts.PromptBatch, *, cot: str, descriptions: Sequence[str],
                   relations: Sequence[str]) -> dict[str, np.ndarray]:
  """The stage's per-example target arrays (none for grpo / eval)."""
  if stage == "sft":
    return sft_targets(cot, single, tokenizer, max_response_tokens=config.max_response_tokens,
                       max_inspections=config.max_inspections)
  out = {}
  if stage == "align":
    for name, texts in (("description", descriptions), ("relation", relations)):
      out[f"{name}_ids"], out[f"{name}_mask"] = _description_arrays(
          texts, tokenizer, config.max_description_tokens)
  return out


def sft_targets(cot: str, single: prompts.PromptBatch, tokenizer: Tokenizer, *,
                max_response_tokens: int, max_inspections: int) -> dict[str, np.ndarray]:
  """The response `cot<|im_end|>` with its splices, padded to R (see the module docstring);
  `single` is the example's one-row PromptBatch (its candidate blocks are spliced)."""
  length, m = max_response_tokens, max_inspections
  response = tokenizer.encode(cot + prompts.RESPONSE_END, allow_special=True) if cot else []
  blocks = [row[mask].tolist() for row, mask in zip(single.candidate_ids[0],
                                                     single.candidate_mask[0], strict=True)]
  ids, loss_mask, insertions = prompts.splice_inspections(response, blocks, tokenizer,
                                                          max_inspections=m)
  if len(ids) > length:
    raise ValueError(f"response of {len(ids)} tokens with its inspections exceeds "
                     f"max_response_tokens={length}")
  out = {
      "target_ids": _padded(ids, length, tokenizer.pad),
      "target_mask": np.arange(length) < len(ids),
      "target_loss_mask": np.pad(np.asarray(loss_mask, bool), (0, length - len(ids))),
      "response_ids": _padded(response, length, tokenizer.pad),
      "response_lengths": np.int32(len(response)),
      "insert_positions": np.full(m, -1, np.int32),
      "insert_steps": np.full(m, -1, np.int32),
      "insert_candidates": np.full(m, -1, np.int32),
  }
  for j, (position, index) in enumerate(insertions):
    out["insert_positions"][j] = position
    out["insert_steps"][j] = sum(loss_mask[:position]) - 1  # The preceding <insp-end>.
    out["insert_candidates"][j] = index - 1
  return out


def _padded(ids: Sequence[int], length: int, pad: int) -> np.ndarray:
  out = np.full(length, pad, np.int32)
  out[: len(ids)] = ids
  return out


def _description_arrays(texts: Sequence[str], tokenizer: Tokenizer, length: int
                        ) -> tuple[np.ndarray, np.ndarray]:
  """[K, Ld] ids and mask: each text as data, cut to Ld - 1 tokens, then `<|im_end|>`."""
  ids = np.full((len(texts), length), tokenizer.pad, np.int32)
  mask = np.zeros((len(texts), length), bool)
  for k, text in enumerate(texts):
    if text:
      row = tokenizer.encode(text, allow_special=False)[: length - 1] + [tokenizer.eos]
      ids[k, : len(row)], mask[k, : len(row)] = row, True
  return ids, mask


# ---------------------------------------------------------------------------------------
# Batching to static shapes.


def padding_batch(stage: str, config: PipelineConfig, tokenizer: Tokenizer,
                  size: int) -> dict[str, Any]:
  """`size` padding rows of the stage's batches: every field in its static shape and dtype
  (what a compile-only check lowers the training step with)."""
  return _Collate(stage, config, tokenizer)([None] * size, 0)


class _Collate:
  """B prepared examples (None: a padding row) -> one batch dict of static shapes."""

  def __init__(self, stage: str, config: PipelineConfig, tokenizer: Tokenizer):
    self.config, self.tokenizer = config, tokenizer
    self.prompt_config = config.prompt_config()
    k = config.num_candidates
    filler = prompts.Example("", prompts.Item(), (prompts.Item(),) * k)
    single = prompts.build_batch([filler], tokenizer, self.prompt_config)
    targets = _stage_targets(stage, config, tokenizer, single, cot="", descriptions=[""] * k,
                             relations=[""] * k)
    self.filler = _Prepared(filler, [], targets=targets)

  def __call__(self, rows: Sequence[_Prepared | None], num_skipped: int) -> dict[str, Any]:
    valid = np.array([r is not None for r in rows])
    rows = [r if r is not None else self.filler for r in rows]
    prompt = prompts.build_batch([r.example for r in rows], self.tokenizer, self.prompt_config)
    batch = {f.name: getattr(prompt, f.name) for f in dataclasses.fields(prompt)}
    batch["image_grid_thw"] = np.concatenate(
        [batch["image_grid_thw"][:, :1], batch["candidate_image_grid_thw"]], axis=1)
    batch["pixel_values"] = self.pixels(rows)
    batch["gt_index"] = np.array([r.gt_index for r in rows], np.int32)
    k = self.config.num_candidates
    batch["hard_negative_mask"] = np.stack(
        [r.hard_negatives if r.hard_negatives is not None else np.zeros(k, bool) for r in rows])
    batch["task_id"] = np.array([r.task_id for r in rows], np.int32)
    batch["valid"] = valid
    for name in rows[0].targets:
      batch[name] = np.stack([r.targets[name] for r in rows])
    batch["qid"] = np.array([r.qid for r in rows], dtype=object)
    batch["dataset"] = np.array([r.dataset for r in rows], dtype=object)
    batch["num_skipped"] = num_skipped
    return batch

  def pixels(self, rows: Sequence[_Prepared]) -> np.ndarray:
    """[N, D]: the images' patches in (row, slot) order, zeros after."""
    counts = [sum(len(p) for p in r.pixels) for r in rows]
    limit = self.config.num_patches()
    if sum(counts) > limit:
      detail = ", ".join(f"{r.dataset}:{r.qid} ({n})" for r, n in zip(rows, counts, strict=True))
      raise ValueError(f"batch images have {sum(counts)} patches, more than max_patches="
                       f"{limit}; examples (patches): {detail}. Raise data.max_patches or "
                       "lower data.max_pixels")
    out = np.zeros((limit, self.config.image_config().patch_dim), np.float32)
    rows_pixels = [p for r in rows for p in r.pixels]
    if rows_pixels:
      stacked = np.concatenate(rows_pixels)
      out[: len(stacked)] = stacked
    return out


class _Batcher(grain.IterDataset):
  """Groups prepared examples into batches; skipped records are counted, not batched.

  Train stages drop a skipped record and a last partial batch; eval (`pad=True`) keeps
  every position, a skipped record or None becoming an invalid row. A batch consumes whole
  parent elements, so its iterator's state is the parent's.
  """

  def __init__(self, parent: grain.IterDataset, batch_size: int, collate: Callable,
               pad: bool):
    super().__init__(parent)
    self.batch_size, self.collate, self.pad = batch_size, collate, pad

  def __iter__(self) -> grain.DatasetIterator:
    return _BatchIterator(self._parent.__iter__(), self)

  def __str__(self) -> str:
    return f"_Batcher(batch_size={self.batch_size}, pad={self.pad})"


class _BatchIterator(grain.DatasetIterator):

  def __init__(self, parent: grain.DatasetIterator, spec: _Batcher):
    super().__init__(parent)
    self.spec = spec

  def __next__(self) -> dict[str, Any]:
    rows, skipped, size = [], 0, self.spec.batch_size
    while len(rows) < size:
      try:
        item = next(self._parent)
      except StopIteration:
        if self.spec.pad and rows:
          rows += [None] * (size - len(rows))
          break
        raise
      if isinstance(item, _Skipped):
        skipped += 1
        item = None
        if not self.spec.pad:
          continue
      rows.append(item)
    return self.spec.collate(rows, skipped)

  def get_state(self) -> dict[str, Any]:
    return self._parent.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state)


class _PadTo(grain.MapDataset):
  """The parent, then None up to `length` (eval: equal batch counts on every process)."""

  def __init__(self, parent: grain.MapDataset, length: int):
    super().__init__(parent)
    self.length = length

  def __len__(self) -> int:
    return self.length

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    return self._parent[index] if index < len(self._parent) else None

  def __str__(self) -> str:
    return f"_PadTo({self.length})"


def make_dataset(stage: str, config: PipelineConfig, tokenizer: Tokenizer, *,
                 process_index: int | None = None, process_count: int | None = None
                 ) -> grain.IterDataset:
  """The stage's chain (module docstring); process_* default to this JAX process's."""
  _check_choice("stage", stage, STAGES)
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if not 0 <= index < count:
    raise ValueError(f"process_index {index} is not in [0, process_count={count})")
  source = read_source(config)
  ds = source[index::count]
  workers = max(config.worker_count, 1)
  if stage == "eval":
    per_process = math.ceil(len(source) / count)
    ds = _PadTo(ds, math.ceil(per_process / (config.batch_size * workers))
                * config.batch_size * workers)
  else:
    if config.shuffle:
      ds = ds.shuffle(seed=config.seed)
    ds = ds.repeat(config.num_epochs or None)
  ds = ds.map(_Prepare(stage, config, tokenizer))
  read = grain.ReadOptions(num_threads=config.read_threads,
                           prefetch_buffer_size=2 * config.batch_size)
  batches = _Batcher(ds.to_iter_dataset(read, allow_nones=True), config.batch_size,
                     _Collate(stage, config, tokenizer), pad=stage == "eval")
  if config.worker_count:
    if not flags.FLAGS.is_parsed():  # Outside app.run (tests, notebooks): grain reads its
      flags.FLAGS.mark_as_parsed()  # absl flags when starting workers; use their defaults.
    batches = batches.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=config.worker_count, per_worker_buffer_size=config.worker_buffer_size))
  return batches


def make_iterator(stage: str, config: PipelineConfig | Mapping[str, Any], tokenizer: Tokenizer,
                  **kwargs: Any) -> grain.DatasetIterator:
  """An iterator of numpy batch dicts with `get_state()` / `set_state()` for checkpoints."""
  if not isinstance(config, PipelineConfig):
    config = PipelineConfig.from_config(config)
  return iter(make_dataset(stage, config, tokenizer, **kwargs))
