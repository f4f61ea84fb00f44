"""Rewards of a GRPO step, computed in jit from the sampled token ids (PAPER.md §5.3).

    R   = r_f + r_r
    r_f = 1[well formed]
    r_r = 1[well formed and answer == gt] * (1 - lambda * N_ins / K)

r_r is gated on well-formedness (our choice): the answer of a broken response is not trusted,
so a malformed response earns nothing, and r_f is never outweighed by a lucky answer. N_ins
is the number of distinct candidates inserted by the sampler (`Trajectory.num_inserted`);
lambda follows the curriculum `curriculum_lambda` (0 -> 1 over training).

`check_format` is `retrv_jax.data.prompts.parse_response` as a token-level automaton, one
`lax.scan` step per generated token, all rows at once. It reads every token up to the row's
length or its first stop token (`<|im_end|>` or pad), as the parser does. Parser events map
to token modes:

    main ──<inspection-index-start>──> inspect digits ──<inspection-index-end>──> after inspect
     ^ ^                                 │ other special: unclosed, main handles it  │
     │ └──────────── <|cand_end|> ── splice <──── <|cand_start|> ────────────────────┘
     └── <answer> ──> answer digits ──</answer>──> main (other special: unclosed, as above)

Text tokens are judged one at a time by their own decoding (whitespace only, or digits
only); the parser decodes a whole run. They differ only where one character is split over
several tokens (byte fallback of, e.g., U+00A0 or an Arabic-Indic digit): such a run counts
as plain text here.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from retrv_jax.data.tokenizer import Tokenizer
from retrv_jax.rl.sampler import Trajectory

MAX_INDEX = 10**6  # Digit strings are read up to this value (as in the sampler), then capped.
CURRICULUM_SCHEDULES = ("linear", "fixed")

# Token kinds.
_TEXT, _STOP, _OTHER = 0, 1, 2
_THINK_START, _THINK_END, _ANSWER_START, _ANSWER_END = 3, 4, 5, 6
_INSPECT_START, _INSPECT_END, _CAND_START, _CAND_END = 7, 8, 9, 10
_STRUCTURE = {
    "think_start": _THINK_START, "think_end": _THINK_END, "answer_start": _ANSWER_START,
    "answer_end": _ANSWER_END, "inspect_start": _INSPECT_START, "inspect_end": _INSPECT_END,
    "cand_start": _CAND_START, "cand_end": _CAND_END,
}
# Modes of the automaton (where inside a sub-parse) and response states (how far along).
_MAIN, _INSPECT_DIGITS, _AFTER_INSPECT, _SPLICE, _ANSWER_DIGITS = range(5)
_BEFORE_THINK, _IN_THINK, _AFTER_THINK, _AFTER_ANSWER = range(4)


@dataclasses.dataclass(frozen=True)
class FormatTokens:
  """The token ids the format checker needs. Hashable: a static argument under jit."""

  think_start: int
  think_end: int
  answer_start: int
  answer_end: int
  inspect_start: int
  inspect_end: int
  cand_start: int
  cand_end: int
  stop_ids: tuple[int, ...]  # `<|im_end|>` and pad: the response ends at the first.
  other_special_ids: tuple[int, ...]  # The other named special tokens: unexpected anywhere.
  blank_ids: tuple[int, ...]  # Text tokens that decode to whitespace only (or to nothing).
  digit_ids: tuple[int, ...]  # Text tokens that decode to decimal digits only (or nothing).
  digit_values: tuple[int, ...]  # Their value, capped at MAX_INDEX.
  digit_lengths: tuple[int, ...]  # Their number of digits.

  @classmethod
  def from_tokenizer(cls, tok: Tokenizer) -> FormatTokens:
    """Reads the special ids and decodes every other id once (about 1 s for Qwen's vocab)."""
    ids = tok.special_ids
    stops = (tok.im_end, tok.pad)
    specials = set(ids.values()) | set(stops)
    blank, digits = [], []
    for token_id in range(tok.vocab_size):
      if token_id in specials:
        continue
      text = tok.decode([token_id])
      if not text.strip():
        blank.append(token_id)
      if not text or re.fullmatch(r"\d+", text):
        digits.append((token_id, min(int(text or 0), MAX_INDEX), len(text)))
    return cls(
        **{name: ids[name] for name in _STRUCTURE},
        stop_ids=stops,
        other_special_ids=tuple(sorted(
            i for name, i in ids.items() if name not in _STRUCTURE and i not in stops)),
        blank_ids=tuple(blank),
        digit_ids=tuple(d[0] for d in digits),
        digit_values=tuple(d[1] for d in digits),
        digit_lengths=tuple(d[2] for d in digits),
    )

  @functools.cached_property
  def tables(self) -> dict[str, np.ndarray]:
    """Per-id lookup tables (ids past them are plain text): kind, blank, digit ok/value/len."""
    size = 1 + max((*self.stop_ids, *self.other_special_ids, *self.blank_ids, *self.digit_ids,
                    *(getattr(self, name) for name in _STRUCTURE)))
    kind = np.full(size, _TEXT, np.int32)
    kind[list(self.other_special_ids)] = _OTHER
    for name, code in _STRUCTURE.items():
      kind[getattr(self, name)] = code
    kind[list(self.stop_ids)] = _STOP
    out = {"kind": kind, "blank": np.zeros(size, bool), "digit_ok": np.zeros(size, bool),
           "digit_value": np.zeros(size, np.int32), "digit_length": np.zeros(size, np.int32)}
    out["blank"][list(self.blank_ids)] = True
    out["digit_ok"][list(self.digit_ids)] = True
    out["digit_value"][list(self.digit_ids)] = self.digit_values
    out["digit_length"][list(self.digit_ids)] = self.digit_lengths
    return out


@flax.struct.dataclass
class FormatResult:
  """What `check_format` reads from each row `[R]`."""

  well_formed: jax.Array  # bool, as `ParsedResponse.well_formed`.
  answer: jax.Array  # int32, 0-based: the first in-range answer, even if malformed; -1: none.
  num_inspected: jax.Array  # int32, distinct candidates inspected (`inspected_indices`).
  stopped: jax.Array  # bool, a stop token came within the row's length.


@flax.struct.dataclass
class _Carry:
  mode: jax.Array  # [R] int32
  state: jax.Array  # [R] int32
  error: jax.Array  # [R] bool
  stopped: jax.Array  # [R] bool
  answer: jax.Array  # [R] int32, 0-based, -1: none.
  value: jax.Array  # [R] int32: digits read in the current inspection / answer.
  num_digits: jax.Array  # [R] int32
  not_digits: jax.Array  # [R] bool: a non-digit text token among them.
  count: jax.Array  # [R] int32: closed integer inspections.
  inspected: jax.Array  # [R, K] bool


def _append_digits(value, num_digits, token_value, token_length):
  """`value * 10**token_length + token_value`, capped at MAX_INDEX without overflow."""
  shift = 10 ** jnp.minimum(token_length, 6)
  too_big = (value > MAX_INDEX // shift) | ((token_length > 6) & (value > 0))
  value = jnp.where(too_big, MAX_INDEX, jnp.minimum(value * shift + token_value, MAX_INDEX))
  return value, jnp.minimum(num_digits + token_length, MAX_INDEX)


def _main_transition(kind, blank, state):
  """The parser's main loop on one token: (allowed here, next state, next mode)."""
  allowed = {
      _TEXT: blank | (state == _IN_THINK),
      _THINK_START: state == _BEFORE_THINK,
      _THINK_END: state == _IN_THINK,
      _ANSWER_START: state == _AFTER_THINK,
      _INSPECT_START: state == _IN_THINK,  # Outside think: an error, but still parsed.
  }
  ok = functools.reduce(jnp.logical_or, [(kind == k) & a for k, a in allowed.items()])
  next_state = jnp.select([kind == _THINK_START, kind == _THINK_END, kind == _ANSWER_START],
                          [_IN_THINK, _AFTER_THINK, _AFTER_ANSWER], state)
  next_mode = jnp.select([kind == _INSPECT_START, kind == _ANSWER_START],
                         [_INSPECT_DIGITS, _ANSWER_DIGITS], _MAIN)
  return ok, next_state, next_mode


def check_format(
    tokens: jax.Array,
    lengths: jax.Array,
    format_tokens: FormatTokens,
    *,
    num_candidates: int,
    max_inspections: int,
    require_stop: bool = False,
) -> FormatResult:
  """Checks each response `tokens [R, N]` (its first `lengths [R]` tokens) as the parser does.

  `require_stop=True` also demands a stop token within the length (the parser does not: a
  response cut at the budget right after `</answer>` parses as well formed).
  """
  if not 0 < num_candidates < MAX_INDEX:
    raise ValueError(f"num_candidates must be in [1, {MAX_INDEX}), got {num_candidates}")
  tables = {k: jnp.asarray(v) for k, v in format_tokens.tables.items()}
  size = tables["kind"].shape[0]
  rows, budget = tokens.shape
  known = (tokens >= 0) & (tokens < size)
  look = lambda name, default: jnp.where(known, tables[name][jnp.where(known, tokens, 0)],
                                         default)
  features = (look("kind", _TEXT), look("blank", False), look("digit_ok", False),
              look("digit_value", 0), look("digit_length", 0))
  steps = jnp.arange(budget)

  def step(carry: _Carry, xs) -> tuple[_Carry, None]:
    j, kind, blank, digit_ok, digit_value, digit_length = xs
    live = ~carry.stopped & (j < lengths)
    stop = live & (kind == _STOP)
    live = live & ~stop
    mode, state = carry.mode, carry.state
    text = kind == _TEXT

    # Inside an inspection's or answer's digits.
    in_digits = (mode == _INSPECT_DIGITS) | (mode == _ANSWER_DIGITS)
    close_inspect = (mode == _INSPECT_DIGITS) & (kind == _INSPECT_END)
    close_answer = (mode == _ANSWER_DIGITS) & (kind == _ANSWER_END)
    unclosed = in_digits & ~text & ~close_inspect & ~close_answer
    open_splice = ((mode == _INSPECT_DIGITS) | (mode == _AFTER_INSPECT)) & (kind == _CAND_START)
    main = ((mode == _MAIN) | (mode == _AFTER_INSPECT) | unclosed) & ~open_splice

    index = carry.value
    integer = ~carry.not_digits & (carry.num_digits > 0)
    in_range = (index >= 1) & (index <= num_candidates)
    count = carry.count + (close_inspect & integer)
    inspect_ok = close_inspect & integer & in_range & (count <= max_inspections)
    inspected = carry.inspected | (
        inspect_ok[:, None] & (jnp.arange(num_candidates) == index[:, None] - 1))
    take_answer = close_answer & integer & in_range & (carry.answer < 0)

    main_ok, next_state, main_mode = _main_transition(kind, blank, state)
    # A repeated inspection is allowed (it inserts nothing); every other flaw is an error.
    error = (unclosed | (close_inspect & ~inspect_ok) | (close_answer & ~(integer & in_range)) |
             (main & ~main_ok))
    next_mode = jnp.select(
        [main, close_inspect, close_answer, open_splice, (mode == _SPLICE) & (kind == _CAND_END)],
        [main_mode, _AFTER_INSPECT, _MAIN, _SPLICE, _MAIN], mode)

    starts = main & ((kind == _INSPECT_START) | (kind == _ANSWER_START))
    value, num_digits = _append_digits(carry.value, carry.num_digits, digit_value, digit_length)
    accumulate = in_digits & text
    keep = lambda old, new: jnp.where(live, new, old)
    new = _Carry(
        mode=keep(mode, next_mode),
        state=keep(state, jnp.where(main & main_ok, next_state, state)),
        error=carry.error | (live & error),
        stopped=carry.stopped | stop,
        answer=keep(carry.answer, jnp.where(take_answer, index - 1, carry.answer)),
        value=keep(carry.value, jnp.select([starts, accumulate], [0, value], carry.value)),
        num_digits=keep(carry.num_digits,
                        jnp.select([starts, accumulate], [0, num_digits], carry.num_digits)),
        not_digits=keep(carry.not_digits, jnp.select(
            [starts, accumulate], [False, carry.not_digits | ~digit_ok], carry.not_digits)),
        count=keep(carry.count, count),
        inspected=jnp.where(live[:, None], inspected, carry.inspected),
    )
    return new, None

  zeros = jnp.zeros(rows, jnp.int32)
  init = _Carry(mode=zeros + _MAIN, state=zeros + _BEFORE_THINK, error=zeros.astype(bool),
                stopped=zeros.astype(bool), answer=zeros - 1, value=zeros, num_digits=zeros,
                not_digits=zeros.astype(bool), count=zeros,
                inspected=jnp.zeros((rows, num_candidates), bool))
  xs = (steps, *(f.T for f in features))
  final, _ = jax.lax.scan(step, init, xs)
  unfinished = ((final.mode == _INSPECT_DIGITS) | (final.mode == _ANSWER_DIGITS) |
                (final.mode == _SPLICE))
  well_formed = ~final.error & (final.state == _AFTER_ANSWER) & ~unfinished
  if require_stop:
    well_formed = well_formed & final.stopped
  return FormatResult(well_formed=well_formed, answer=final.answer,
                      num_inspected=jnp.sum(final.inspected, -1, dtype=jnp.int32),
                      stopped=final.stopped)


def curriculum_lambda(
    step: jax.Array | int, total_steps: int, schedule: str = "linear", value: float = 0.5
) -> jax.Array:
  """lambda of the inspection penalty at optimizer step `step` (0 for the first update).

  'linear' (the paper): lambda_i = i / N_iter, 0 at the first update, 1 from `total_steps`
  on. 'fixed': `value` throughout (the fixed-lambda ablation).
  """
  if schedule == "fixed":
    if not 0 <= value <= 1:
      raise ValueError(f"curriculum value must be in [0, 1], got {value}")
    return jnp.asarray(value, jnp.float32)
  if schedule != "linear":
    raise ValueError(f"curriculum schedule {schedule!r}: expected one of {CURRICULUM_SCHEDULES}")
  if total_steps <= 0:
    raise ValueError(f"curriculum total_steps must be positive, got {total_steps}")
  return jnp.clip(jnp.asarray(step, jnp.float32) / total_steps, 0.0, 1.0)


def retrieval_reward(
    result: FormatResult,
    gt_index: jax.Array,
    num_inspected: jax.Array,
    *,
    curriculum_weight: jax.Array | float,
    num_candidates: int,
) -> dict[str, jax.Array]:
  """R = r_f + r_r per row, and its parts (float32 `[R]`) for metrics.

  Args:
    result: `check_format` of the rows.
    gt_index: `[R]` 0-based positive candidate, -1: none (never correct).
    num_inspected: `[R]` distinct candidates inspected, `Trajectory.num_inserted`.
    curriculum_weight: lambda, from `curriculum_lambda`.
    num_candidates: K.

  Returns:
    reward, format (r_f), correct (well formed and right), answer_match (right, whatever the
    format), n_inspected, retrieval (r_r).
  """
  answer_match = (result.answer == gt_index) & (gt_index >= 0)
  correct = result.well_formed & answer_match
  n_inspected = num_inspected.astype(jnp.float32)
  r_f = result.well_formed.astype(jnp.float32)
  r_r = correct * (1.0 - curriculum_weight * n_inspected / num_candidates)
  return {
      "reward": r_f + r_r,
      "format": r_f,
      "correct": correct.astype(jnp.float32),
      "answer_match": answer_match.astype(jnp.float32),
      "n_inspected": n_inspected,
      "retrieval": r_r,
  }


def trajectory_rewards(
    trajectory: Trajectory,
    gt_index: jax.Array,
    format_tokens: FormatTokens,
    *,
    curriculum_weight: jax.Array | float,
    num_candidates: int,
    max_inspections: int,
    require_stop: bool = False,
) -> dict[str, jax.Array]:
  """`retrieval_reward` of a `Trajectory` whose R = B * G rows answer `gt_index [B]`."""
  rows = trajectory.tokens.shape[0]
  if rows % gt_index.shape[0]:
    raise ValueError(f"{rows} trajectory rows is not a multiple of {gt_index.shape[0]} prompts")
  result = check_format(trajectory.tokens, trajectory.lengths, format_tokens,
                        num_candidates=num_candidates, max_inspections=max_inspections,
                        require_stop=require_stop)
  return retrieval_reward(result, jnp.repeat(gt_index, rows // gt_index.shape[0]),
                          trajectory.num_inserted, curriculum_weight=curriculum_weight,
                          num_candidates=num_candidates)
