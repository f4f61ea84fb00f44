"""Retrv-R1 prompt and response formats, as static-shape token batches, and their parser.

Prompt (Qwen chat layout; one line per `\\n`, K candidates):

  <|im_start|>system\\n{system prompt}<|im_end|>\\n
  <|im_start|>user\\n{instruction}\\nQuery: {query text}{query image span}\\nCandidates:\\n
  Candidate 1: <|cand_con|><|cand_rel|>\\n ... Candidate K: <|cand_con|><|cand_rel|><|im_end|>\\n
  <|im_start|>assistant\\n

An image span is `<|vision_start|>` n x `<|image_pad|>` `<|vision_end|>`, n = t*h*w / merge**2.
With `compress_candidates=False` (the "no ICM" ablation, and the teacher's prompt) each slot
pair is replaced by the candidate's full tokens: `{text}{image span}`, the same block the ICM
compresses and the DIM splices in after an inspection:

  <inspection-index-start>3<inspection-index-end><|cand_start|>{full tokens of 3}<|cand_end|>

A teacher's prompt (`Example.teacher_answer` set) adds `\\n{teacher_instruction(answer)}`
after the last candidate.

Response: `<think>...</think><answer>idx</answer><|im_end|>`, the think block in four phases
(`format_response`). Template strings are encoded with special tokens recognised; data
(instructions, queries, candidates) never: a caption containing "<think>" stays text.

Every variable part is encoded on its own and the ids are concatenated, so a candidate's
tokens are the same in the prompt, in its ICM block and in a splice.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator, Sequence

import numpy as np

from retrv_jax.data.tokenizer import SPECIAL_TOKEN_NAMES, Tokenizer

SYSTEM_PROMPT = (
    "You are a multimodal retrieval re-ranker. Given a query and numbered candidates, find the "
    "candidate that best matches the query. Each candidate is shown in compressed form. Reason "
    "inside <think></think> in four phases: (1) imagine the ideal target, (2) quickly eliminate "
    "clear negatives, (3) inspect and verify the hard candidates: writing "
    "<inspection-index-start>k<inspection-index-end> shows candidate k in full, (4) give the "
    "index. Then write the number of the best candidate inside <answer></answer>."
)
PHASE_HEADINGS = ("Ideal target:", "Elimination:", "Verification:", "Conclusion:")
RESPONSE_END = "<|im_end|>"

# Parser error codes (ParsedResponse.error), in no particular order; metrics count by code.
FORMAT_ERRORS = (
    "empty",
    "text_before_think",
    "missing_think",
    "multiple_think",
    "unclosed_think",
    "missing_answer",
    "multiple_answers",
    "unclosed_answer",
    "answer_not_integer",
    "answer_out_of_range",
    "text_between_think_and_answer",
    "text_after_answer",
    "inspection_outside_think",
    "inspection_not_integer",
    "unclosed_inspection",
    "inspection_out_of_range",
    "too_many_inspections",
    "unclosed_splice",
    "unexpected_token",
)
_DIGITS = re.compile(r"\d+")


@dataclasses.dataclass(frozen=True)
class Item:
  """A query or candidate: text and/or one image, known here only by its patch grid."""

  text: str = ""
  image_grid_thw: tuple[int, int, int] | None = None  # From images.image_grid_thw.


@dataclasses.dataclass(frozen=True)
class Example:
  """One re-ranking prompt: the task instruction, the query and its K candidates."""

  instruction: str
  query: Item
  candidates: tuple[Item, ...]
  # The teacher's prompt (`retrv_jax.teacher`): the known 1-based answer, whose
  # `teacher_instruction` ends the user turn. None: the re-ranker's own prompt.
  teacher_answer: int | None = None


@dataclasses.dataclass(frozen=True)
class PromptConfig:
  """Static shapes and layout of prompt batches."""

  num_candidates: int = 50  # K: every example has exactly this many candidates.
  prompt_buckets: tuple[int, ...] = (256, 512, 1024)  # Padded prompt lengths T, ascending.
  max_candidate_tokens: int = 256  # Lc: candidate blocks are cut (text only) to this length.
  merge_size: int = 2  # Vision merge: an image of t*h*w patches is t*h*w / merge**2 tokens.
  compress_candidates: bool = True  # ICM slots; False puts the full tokens in the prompt.
  # Compressed tokens per candidate, in order: "con" (t_con) and/or "rel" (t_rel); one of
  # them alone is the "without t_rel" / "without t_con" ablation.
  candidate_slots: tuple[str, ...] = ("con", "rel")
  padding_side: str = "right"  # "right" or "left".
  system_prompt: str = SYSTEM_PROMPT

  def __post_init__(self):
    if self.padding_side not in ("left", "right"):
      raise ValueError(f"padding_side must be 'left' or 'right', got {self.padding_side!r}")
    if not self.prompt_buckets or list(self.prompt_buckets) != sorted(self.prompt_buckets):
      raise ValueError(f"prompt_buckets must be non-empty and ascending: {self.prompt_buckets}")
    if self.num_candidates < 1 or self.max_candidate_tokens < 1:
      raise ValueError("num_candidates and max_candidate_tokens must be positive")
    if tuple(self.candidate_slots) not in (("con", "rel"), ("con",), ("rel",)):
      raise ValueError(
          f"candidate_slots must be ('con', 'rel'), ('con',) or ('rel',), got "
          f"{self.candidate_slots!r}"
      )


@dataclasses.dataclass(frozen=True)
class PromptBatch:
  """Padded prompts and candidate blocks, numpy, shapes static per (B, T) bucket.

  Image slots are ordered [query, candidate 1, ..., candidate K]; a span (start, n) gives
  the first `<|image_pad|>` and their count (n = 0: no image there). Slot index 2k + s marks
  the compressed token s (0 = con, 1 = rel) of candidate k (0-based), -1 elsewhere; a slot
  left out by `PromptConfig.candidate_slots` has position -1 and no index.
  """

  input_ids: np.ndarray  # [B, T] int32, pad-filled.
  attention_mask: np.ndarray  # [B, T] bool
  lengths: np.ndarray  # [B] int32: real tokens per prompt.
  slot_index: np.ndarray  # [B, T] int32
  slot_positions: np.ndarray  # [B, K, 2] int32: positions of (con, rel); -1 where absent.
  query_mask: np.ndarray  # [B, T] bool: the query's own tokens (T_q of the ICM).
  image_spans: np.ndarray  # [B, 1 + K, 2] int32: image spans inside the prompt.
  image_grid_thw: np.ndarray  # [B, 1 + K, 3] int32: their grids (zeros: none).
  candidate_ids: np.ndarray  # [B, K, Lc] int32: full tokens of each candidate, pad-filled.
  candidate_mask: np.ndarray  # [B, K, Lc] bool
  candidate_image_spans: np.ndarray  # [B, K, 2] int32: image span inside each block.
  candidate_image_grid_thw: np.ndarray  # [B, K, 3] int32
  splice_ids: np.ndarray  # [B, K, Lc + 2] int32: <|cand_start|> block <|cand_end|>.
  splice_mask: np.ndarray  # [B, K, Lc + 2] bool


@dataclasses.dataclass(frozen=True)
class ParsedResponse:
  """What a response says, shared by rewards and evaluation."""

  reasoning_text: str  # The think block; inspections written as tags, splices left out.
  inspected_indices: tuple[int, ...]  # Distinct 1-based candidates, in inspection order.
  repeated_indices: tuple[int, ...]  # Inspections of an already inspected candidate.
  answer_index: int | None  # First in-range answer (1-based), even if the format is broken.
  well_formed: bool
  error: str | None  # First violation, one of FORMAT_ERRORS; None when well formed.


# ---------------------------------------------------------------------------------------
# Text templates.


def inspection_tag(index: int) -> str:
  """`<inspection-index-start>{index}<inspection-index-end>` (1-based index)."""
  return f"{SPECIAL_TOKEN_NAMES['inspect_start']}{index}{SPECIAL_TOKEN_NAMES['inspect_end']}"


def format_response(
    *, target: str, elimination: str, verification: str, answer: int, conclusion: str = ""
) -> str:
  """The four-phase response (an SFT target), without the closing `<|im_end|>`.

  `verification` may contain `inspection_tag(k)` calls' output; `conclusion` defaults to a
  sentence naming the answer.
  """
  conclusion = conclusion or f"Candidate {answer} matches the query best."
  phases = (target, elimination, verification, conclusion)
  body = "\n".join(f"{head} {text}" for head, text in zip(PHASE_HEADINGS, phases, strict=True))
  return f"<think>{body}</think><answer>{answer}</answer>"


def teacher_instruction(answer: int) -> str:
  """Appended to a teacher's (no-ICM) prompt: write the four phases toward the known answer."""
  return (
      f"The correct candidate is {answer}. Write the reasoning that finds it, in the four "
      f"phases, each on its own line starting with {', '.join(PHASE_HEADINGS)}; in the "
      f"verification phase inspect the hard candidates with {inspection_tag(1)} (for "
      f"candidate 1) before judging them; end with <answer>{answer}</answer>."
  )


def template_texts(max_candidates: int = 50) -> Iterator[str]:
  """Every fixed string of the formats (for training the tiny tokenizer)."""
  yield SYSTEM_PROMPT
  yield teacher_instruction(1)
  yield from PHASE_HEADINGS
  yield "Query: \nCandidates:\n"
  for k in range(1, max_candidates + 1):
    yield f"Candidate {k}: \nCandidate {k} matches the query best."


# ---------------------------------------------------------------------------------------
# Token blocks.


def image_span_ids(grid_thw: Sequence[int], tokenizer: Tokenizer, merge_size: int) -> list[int]:
  """`<|vision_start|>` + n x `<|image_pad|>` + `<|vision_end|>` for an image of this grid."""
  t, h, w = grid_thw
  if h % merge_size or w % merge_size:
    raise ValueError(f"image grid {tuple(grid_thw)} is not divisible by merge_size {merge_size}")
  num = t * h * w // merge_size**2
  return [tokenizer.vision_start, *([tokenizer.image_pad] * num), tokenizer.vision_end]


def candidate_block(
    item: Item, tokenizer: Tokenizer, *, max_tokens: int, merge_size: int, name: str = "candidate"
) -> tuple[list[int], tuple[int, int]]:
  """Full tokens `{text}{image span}` of a candidate, cut to `max_tokens` in the text only.

  Returns (ids, (start, n) of its `<|image_pad|>` run, (0, 0) without image). Raises if the
  image span alone does not fit: a vision span is never split.
  """
  span = image_span_ids(item.image_grid_thw, tokenizer, merge_size) if item.image_grid_thw else []
  if len(span) > max_tokens:
    raise ValueError(
        f"{name}: its image span has {len(span)} tokens, more than max_candidate_tokens="
        f"{max_tokens}; raise the limit or lower the image's max_pixels"
    )
  text = tokenizer.encode(item.text, allow_special=False)[: max_tokens - len(span)]
  image = (len(text) + 1, len(span) - 2) if span else (0, 0)
  return text + span, image


def splice_block(block: Sequence[int], tokenizer: Tokenizer) -> list[int]:
  """What the DIM inserts after `<inspection-index-end>`: `<|cand_start|>` block `<|cand_end|>`."""
  return [tokenizer.cand_start, *block, tokenizer.cand_end]


@dataclasses.dataclass
class _Prompt:
  """One unpadded prompt under construction; positions count from its first token."""

  ids: list[int] = dataclasses.field(default_factory=list)
  slots: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # (con, rel); -1: none.
  query: tuple[int, int] = (0, 0)  # [start, end) of the query's tokens.
  image_spans: dict[int, tuple[int, int]] = dataclasses.field(default_factory=dict)

  def add(self, ids: Sequence[int]) -> int:
    start = len(self.ids)
    self.ids.extend(ids)
    return start


def encode_prompt(
    example: Example,
    blocks: Sequence[tuple[list[int], tuple[int, int]]],
    tokenizer: Tokenizer,
    config: PromptConfig,
) -> _Prompt:
  """The prompt's ids and landmarks; `blocks` are the candidates' `candidate_block`s."""
  template = lambda text: tokenizer.encode(text, allow_special=True)
  prompt = _Prompt()
  prompt.add(template(f"<|im_start|>system\n{config.system_prompt}<|im_end|>\n<|im_start|>user\n"))
  prompt.add(tokenizer.encode(example.instruction, allow_special=False))
  prompt.add(template("\nQuery: "))
  query_start = prompt.add(tokenizer.encode(example.query.text, allow_special=False))
  if example.query.image_grid_thw:
    span = image_span_ids(example.query.image_grid_thw, tokenizer, config.merge_size)
    prompt.image_spans[0] = (prompt.add(span) + 1, len(span) - 2)
  prompt.query = (query_start, len(prompt.ids))
  prompt.add(template("\nCandidates:\n"))
  for k, (block, (image_start, image_len)) in enumerate(blocks):
    prompt.add(template(f"Candidate {k + 1}: "))
    if config.compress_candidates:
      ids = {"con": tokenizer.cand_con, "rel": tokenizer.cand_rel}
      positions = {name: prompt.add([ids[name]]) for name in config.candidate_slots}
      prompt.slots.append((positions.get("con", -1), positions.get("rel", -1)))
    else:
      start = prompt.add(block)
      if image_len:
        prompt.image_spans[k + 1] = (start + image_start, image_len)
    if k + 1 < len(blocks):
      prompt.add(template("\n"))
  if example.teacher_answer is not None:
    prompt.add(template(f"\n{teacher_instruction(example.teacher_answer)}"))
  prompt.add(template("<|im_end|>\n<|im_start|>assistant\n"))
  return prompt


def build_batch(
    examples: Sequence[Example], tokenizer: Tokenizer, config: PromptConfig
) -> PromptBatch:
  """Encodes and pads examples into one `PromptBatch` (T = smallest bucket that fits all)."""
  k_cands, lc = config.num_candidates, config.max_candidate_tokens
  prompts, all_blocks = [], []
  for b, example in enumerate(examples):
    if len(example.candidates) != k_cands:
      raise ValueError(
          f"example {b}: {len(example.candidates)} candidates, expected num_candidates={k_cands}"
      )
    blocks = [
        candidate_block(
            c,
            tokenizer,
            max_tokens=lc,
            merge_size=config.merge_size,
            name=f"example {b} candidate {k + 1}",
        )
        for k, c in enumerate(example.candidates)
    ]
    prompts.append(encode_prompt(example, blocks, tokenizer, config))
    all_blocks.append(blocks)
  longest = max(len(p.ids) for p in prompts)
  fits = [t for t in config.prompt_buckets if t >= longest]
  if not fits:
    worst = max(range(len(prompts)), key=lambda b: len(prompts[b].ids))
    raise ValueError(
        f"example {worst}: prompt of {longest} tokens exceeds the largest prompt bucket "
        f"{config.prompt_buckets[-1]}"
    )
  return _pad(examples, prompts, all_blocks, fits[0], tokenizer, config)


def _pad(examples, prompts, all_blocks, length, tokenizer, config) -> PromptBatch:
  """Fills the static-shape arrays; left padding shifts every prompt position."""
  bsz, k_cands, lc = len(prompts), config.num_candidates, config.max_candidate_tokens
  i32 = lambda shape, fill: np.full(shape, fill, np.int32)
  out = dict(
      input_ids=i32((bsz, length), tokenizer.pad),
      attention_mask=np.zeros((bsz, length), bool),
      lengths=i32((bsz,), 0),
      slot_index=i32((bsz, length), -1),
      slot_positions=i32((bsz, k_cands, 2), -1),
      query_mask=np.zeros((bsz, length), bool),
      image_spans=i32((bsz, 1 + k_cands, 2), 0),
      image_grid_thw=i32((bsz, 1 + k_cands, 3), 0),
      candidate_ids=i32((bsz, k_cands, lc), tokenizer.pad),
      candidate_mask=np.zeros((bsz, k_cands, lc), bool),
      candidate_image_spans=i32((bsz, k_cands, 2), 0),
      candidate_image_grid_thw=i32((bsz, k_cands, 3), 0),
      splice_ids=i32((bsz, k_cands, lc + 2), tokenizer.pad),
      splice_mask=np.zeros((bsz, k_cands, lc + 2), bool),
  )
  for b, (example, prompt, blocks) in enumerate(zip(examples, prompts, all_blocks, strict=True)):
    n = len(prompt.ids)
    off = length - n if config.padding_side == "left" else 0
    out["input_ids"][b, off : off + n] = prompt.ids
    out["attention_mask"][b, off : off + n] = True
    out["lengths"][b] = n
    out["query_mask"][b, off + prompt.query[0] : off + prompt.query[1]] = True
    for k, slots in enumerate(prompt.slots):
      for s, position in enumerate(slots):
        if position >= 0:
          out["slot_positions"][b, k, s] = off + position
          out["slot_index"][b, off + position] = 2 * k + s
    items = (example.query, *example.candidates)
    for slot, (start, count) in prompt.image_spans.items():
      out["image_spans"][b, slot] = (off + start, count)
      out["image_grid_thw"][b, slot] = items[slot].image_grid_thw
    for k, (block, (start, count)) in enumerate(blocks):
      out["candidate_ids"][b, k, : len(block)] = block
      out["candidate_mask"][b, k, : len(block)] = True
      spliced = splice_block(block, tokenizer)
      out["splice_ids"][b, k, : len(spliced)] = spliced
      out["splice_mask"][b, k, : len(spliced)] = True
      if count:
        out["candidate_image_spans"][b, k] = (start, count)
        out["candidate_image_grid_thw"][b, k] = example.candidates[k].image_grid_thw
  return PromptBatch(**out)


# ---------------------------------------------------------------------------------------
# Responses: DIM splices for SFT targets, and the parser.


def splice_inspections(
    response_ids: Sequence[int],
    blocks: Sequence[Sequence[int]],
    tokenizer: Tokenizer,
    *,
    max_inspections: int,
) -> tuple[list[int], list[bool], list[tuple[int, int]]]:
  """Inserts each inspected candidate's splice block after its `<inspection-index-end>`.

  Follows the sampler's rule: a well-formed in-range inspection of a candidate not yet
  inspected, among the first `max_inspections`, gets `splice_block(blocks[k - 1])`; anything
  else inserts nothing. Returns (ids, loss mask: False on inserted observations, insertions as
  (position of `<|cand_start|>` in ids, 1-based candidate)).

    response:  ... <insp-start> 3 <insp-end>  next ...
    output:    ... <insp-start> 3 <insp-end> <cand_start> block_3 <cand_end> next ...
    loss mask:      1          1     1           0         0 ... 0     0       1
  """
  ids, mask, insertions, seen = [], [], [], set()
  count, opened = 0, None  # opened: position in ids just after the latest inspection start.
  for token in response_ids:
    token = int(token)
    ids.append(token)
    mask.append(True)
    if token == tokenizer.inspect_start:
      opened = len(ids)
    elif token == tokenizer.inspect_end and opened is not None:
      digits = tokenizer.decode(ids[opened:-1])
      opened = None
      if not _DIGITS.fullmatch(digits):
        continue
      count += 1
      index = int(digits)
      if count <= max_inspections and 1 <= index <= len(blocks) and index not in seen:
        seen.add(index)
        insertions.append((len(ids), index))
        spliced = splice_block(blocks[index - 1], tokenizer)
        ids.extend(spliced)
        mask.extend([False] * len(spliced))
  return ids, mask, insertions


_STOP = ("im_end", "pad")
# Error codes by parser state (states: before_think -> in_think -> after_think -> after_answer).
_STRAY_TEXT = {
    "before_think": "text_before_think",
    "after_think": "text_between_think_and_answer",
    "after_answer": "text_after_answer",
}
_MISPLACED_ANSWER = {
    "before_think": "missing_think",
    "in_think": "unclosed_think",
    "after_answer": "multiple_answers",
}
_UNFINISHED = {
    "before_think": "missing_think",
    "in_think": "unclosed_think",
    "after_think": "missing_answer",
}


def parse_response(
    ids: Sequence[int], tokenizer: Tokenizer, *, num_candidates: int, max_inspections: int
) -> ParsedResponse:
  """Parses generated ids (from the first response token; stops at `<|im_end|>` or pad).

  Splice blocks after an inspection are skipped, so sampler trajectories parse as they are.
  """
  by_id = {i: name for name, i in tokenizer.special_ids.items()}
  by_id[tokenizer.pad] = "pad"
  events, run = [], []
  for token in ids:
    name = by_id.get(int(token))
    if name is None:
      run.append(int(token))
      continue
    if run:
      events.append(("text", tokenizer.decode(run)))
      run = []
    if name in _STOP:
      break
    events.append(("special", name))
  else:
    if run:
      events.append(("text", tokenizer.decode(run)))
  return _Parser(events, num_candidates, max_inspections).parse()


def parse_response_text(
    text: str, *, num_candidates: int, max_inspections: int
) -> ParsedResponse:
  """`parse_response` for a string (a teacher's output); stops at `<|im_end|>`/`<|endoftext|>`."""
  text = re.split(re.escape(RESPONSE_END) + "|<\\|endoftext\\|>", text, maxsplit=1)[0]
  names = {token: name for name, token in SPECIAL_TOKEN_NAMES.items()}
  pattern = "(" + "|".join(re.escape(t) for t in sorted(names, key=len, reverse=True)) + ")"
  events = []
  for i, part in enumerate(re.split(pattern, text)):
    if i % 2:
      events.append(("special", names[part]))
    elif part:
      events.append(("text", part))
  return _Parser(events, num_candidates, max_inspections).parse()


class _Parser:
  """One pass over (kind, value) events: kind "text" (value: str) or "special" (value: name).

  Grammar of a well-formed response (whitespace text allowed between the parts):
    think_start (text | inspection)* think_end answer_start DIGITS answer_end
    inspection := inspect_start DIGITS inspect_end [cand_start ... cand_end]
  """

  def __init__(self, events, num_candidates: int, max_inspections: int):
    self.events, self.pos = events, 0
    self.num_candidates, self.max_inspections = num_candidates, max_inspections
    self.error: str | None = None
    self.reasoning: list[str] = []
    self.inspected: list[int] = []
    self.repeated: list[int] = []
    self.num_inspections = 0
    self.answer: int | None = None

  def fail(self, code: str) -> None:
    if self.error is None:
      self.error = code

  def next(self) -> tuple[str, str] | None:
    if self.pos >= len(self.events):
      return None
    self.pos += 1
    return self.events[self.pos - 1]

  def peek(self) -> tuple[str, str] | None:
    return self.events[self.pos] if self.pos < len(self.events) else None

  def parse(self) -> ParsedResponse:
    if not self.events:
      self.fail("empty")
    state = "before_think"
    while (event := self.next()) is not None:
      kind, value = event
      if kind == "text":
        if state == "in_think":
          self.reasoning.append(value)
        elif value.strip():
          self.fail(_STRAY_TEXT[state])
      elif value == "think_start":
        if state == "before_think":
          state = "in_think"
        else:
          self.fail("multiple_think")
      elif value == "think_end" and state == "in_think":
        state = "after_think"
      elif value == "inspect_start":
        if state != "in_think":
          self.fail("inspection_outside_think")
        self.inspection()
      elif value == "answer_start":
        if state == "after_think":
          state = "after_answer"
        else:
          self.fail(_MISPLACED_ANSWER[state])
        self.answer_block()
      else:
        self.fail("unexpected_token")
    if state != "after_answer":
      self.fail(_UNFINISHED[state])
    return ParsedResponse(
        reasoning_text="".join(self.reasoning),
        inspected_indices=tuple(self.inspected),
        repeated_indices=tuple(self.repeated),
        answer_index=self.answer,
        well_formed=self.error is None,
        error=self.error,
    )

  def digits_until(self, end: str, not_integer: str, unclosed: str) -> int | None:
    """Reads `DIGITS end`; returns the integer, or None after recording an error."""
    text = ""
    if (event := self.peek()) is not None and event[0] == "text":
      text = self.next()[1]
    if self.peek() != ("special", end):
      self.fail(unclosed)
      return None
    self.next()
    if not _DIGITS.fullmatch(text):
      self.fail(not_integer)
      return None
    return int(text)

  def inspection(self) -> None:
    index = self.digits_until("inspect_end", "inspection_not_integer", "unclosed_inspection")
    if self.peek() == ("special", "cand_start"):  # The spliced observation: skip it.
      while (event := self.next()) is not None and event != ("special", "cand_end"):
        pass
      if event is None:
        self.fail("unclosed_splice")
    if index is None:
      return
    self.reasoning.append(inspection_tag(index))
    self.num_inspections += 1
    if not 1 <= index <= self.num_candidates:
      self.fail("inspection_out_of_range")
    elif self.num_inspections > self.max_inspections:
      self.fail("too_many_inspections")
    elif index in self.inspected:
      self.repeated.append(index)
    else:
      self.inspected.append(index)

  def answer_block(self) -> None:
    index = self.digits_until("answer_end", "answer_not_integer", "unclosed_answer")
    if index is None:
      return
    if not 1 <= index <= self.num_candidates:
      self.fail("answer_out_of_range")
    elif self.answer is None:
      self.answer = index
