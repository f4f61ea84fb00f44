"""Tokenizers: a real Qwen2.5-VL `tokenizer.json`, or the embedded tiny sentencepiece model.

Both backends sit behind `Tokenizer`: `encode` recognises special tokens written in the text
(unless `allow_special=False`, for data such as captions), `decode` renders or skips them,
and the special tokens of Retrv-R1 are named properties (`tok.inspect_end`, `tok.cand_con`).

Tiny vocabulary layout (`vocab_size` = 4096, R = `TINY_NUM_RESERVED` = 32):

  0 <pad> | 1 <unk> | 2 <s> | 3 </s> | 4 .. n-1 sentencepiece pieces | n .. V-R-1 <|unused_i|>
  V-R+i: TINY_SPECIAL_TOKENS[i] (i < 16) | the rest <|reserved_j|>

The sentencepiece model holds ids 0 .. n-1 (n <= V - R; a small corpus gives fewer pieces and
the gap stays unused). bos = 2, pad = 0, eos = `<|im_end|>`, as `config.tiny()`.

A real Qwen checkpoint gets the Retrv-R1 tokens with one call, then its embeddings are
resized (new rows start at the mean of the trained rows):

  tokenizer, num_added = add_retrv_tokens(checkpoint_dir)
  params = resize_token_embeddings(
      params, max(config.vocab_size, tokenizer.vocab_size), key=key,
      num_old_tokens=tokenizer.vocab_size - num_added)

Qwen pads its embedding matrix (151936 rows for 151665 tokens), so the new ids usually fit
and `num_old_tokens` re-initialises their untrained rows instead of growing the matrix.

The shipped tiny model (`assets/tiny_tokenizer.model`) is produced, deterministically, by
  python -m retrv_jax.data.synthetic --out /tmp/synth --seed 0
  python -m retrv_jax.data.tokenizer --train_tiny --data_dir /tmp/synth \
      --out retrv_jax/data/assets/tiny_tokenizer.model
and must be rebuilt (and the tiny model retrained) when the benchmark's texts change.
"""

from __future__ import annotations

import abc
import argparse
import io
import itertools
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import sentencepiece as spm
import tokenizers

from retrv_jax.models.config import TINY_NUM_RESERVED, TINY_SPECIAL_TOKENS

TINY_VOCAB_SIZE = 4096
TINY_TOKENIZER_PATH = os.path.join(os.path.dirname(__file__), "assets", "tiny_tokenizer.model")
# Tokens a Qwen2.5-VL vocabulary lacks; `add_retrv_tokens` appends them.
RETRV_TOKENS = TINY_SPECIAL_TOKENS[6:]
QWEN_PAD_TOKEN = "<|endoftext|>"

# Property name -> token string, for every special token the project refers to by name.
SPECIAL_TOKEN_NAMES = {
    "im_start": "<|im_start|>",
    "im_end": "<|im_end|>",
    "vision_start": "<|vision_start|>",
    "vision_end": "<|vision_end|>",
    "image_pad": "<|image_pad|>",
    "video_pad": "<|video_pad|>",
    "think_start": "<think>",
    "think_end": "</think>",
    "answer_start": "<answer>",
    "answer_end": "</answer>",
    "inspect_start": "<inspection-index-start>",
    "inspect_end": "<inspection-index-end>",
    "cand_start": "<|cand_start|>",
    "cand_end": "<|cand_end|>",
    "cand_con": "<|cand_con|>",
    "cand_rel": "<|cand_rel|>",
}
assert tuple(SPECIAL_TOKEN_NAMES.values()) == TINY_SPECIAL_TOKENS


def _special(name: str) -> property:
  token = SPECIAL_TOKEN_NAMES[name]
  return property(lambda self: self._required_id(token), doc=f"Id of `{token}`.")


class Tokenizer(abc.ABC):
  """Text <-> ids, with the Retrv-R1 special tokens as named ids."""

  @abc.abstractmethod
  def encode(self, text: str, *, allow_special: bool = True) -> list[int]:
    """Ids of `text`; special-token strings in it become their ids if `allow_special`."""

  @abc.abstractmethod
  def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
    """Text of `ids`; special tokens are written out unless skipped."""

  @abc.abstractmethod
  def token_to_id(self, token: str) -> int | None:
    """Id of a token string, None if the vocabulary lacks it."""

  @abc.abstractmethod
  def id_to_token(self, token_id: int) -> str:
    """Token string of an id (raises ValueError outside the vocabulary)."""

  @abc.abstractmethod
  def is_special(self, token_id: int) -> bool:
    """Whether `decode(..., skip_special_tokens=True)` drops this id."""

  @property
  @abc.abstractmethod
  def vocab_size(self) -> int:
    """Number of ids; the embedding matrix needs at least this many rows."""

  @property
  @abc.abstractmethod
  def pad(self) -> int:
    """Padding id."""

  @property
  def eos(self) -> int:
    """End of a response: `<|im_end|>` for both backends."""
    return self.im_end

  @property
  def bos(self) -> int | None:
    """Beginning-of-sequence id, None where the model has none (Qwen)."""
    return None

  im_start = _special("im_start")
  im_end = _special("im_end")
  vision_start = _special("vision_start")
  vision_end = _special("vision_end")
  image_pad = _special("image_pad")
  video_pad = _special("video_pad")
  think_start = _special("think_start")
  think_end = _special("think_end")
  answer_start = _special("answer_start")
  answer_end = _special("answer_end")
  inspect_start = _special("inspect_start")
  inspect_end = _special("inspect_end")
  cand_start = _special("cand_start")
  cand_end = _special("cand_end")
  cand_con = _special("cand_con")
  cand_rel = _special("cand_rel")

  @property
  def special_ids(self) -> dict[str, int]:
    """Property name -> id for every named special token (see SPECIAL_TOKEN_NAMES)."""
    return {name: self._required_id(token) for name, token in SPECIAL_TOKEN_NAMES.items()}

  @property
  def digit_ids(self) -> tuple[int, ...]:
    """Ids of "0" .. "9"; each digit is one token in both backends (indices are parsed so)."""
    ids = []
    for digit in "0123456789":
      encoded = self.encode(digit, allow_special=False)
      if len(encoded) != 1:
        raise ValueError(f"digit {digit!r} is not a single token: {encoded}")
      ids.append(encoded[0])
    return tuple(ids)

  def _required_id(self, token: str) -> int:
    token_id = self.token_to_id(token)
    if token_id is None:
      raise KeyError(
          f"tokenizer has no token {token!r}; for a Qwen checkpoint call "
          "retrv_jax.data.tokenizer.add_retrv_tokens(checkpoint_dir) first"
      )
    return token_id


class HFTokenizer(Tokenizer):
  """A Hugging Face `tokenizers` tokenizer (a Qwen2.5-VL `tokenizer.json`).

  It must hold Qwen's chat and vision tokens; the Retrv-R1 tokens (`RETRV_TOKENS`, added by
  `add_retrv_tokens`) are only needed by what uses them: a missing one raises on access.
  """

  def __init__(
      self, tokenizer: tokenizers.Tokenizer, *, pad_token: str = QWEN_PAD_TOKEN, where: str = ""
  ):
    self._tok = tokenizer
    # A clone that writes special-token strings as plain text (for untrusted data).
    self._plain = tokenizers.Tokenizer.from_str(tokenizer.to_str())
    self._plain.encode_special_tokens = True
    self._special = frozenset(
        i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special
    )
    required = [pad_token, *TINY_SPECIAL_TOKENS[: -len(RETRV_TOKENS)]]
    missing = [t for t in required if tokenizer.token_to_id(t) is None]
    if missing:
      raise ValueError(f"{where or 'HFTokenizer'}: the vocabulary lacks the tokens {missing}")
    self._pad = tokenizer.token_to_id(pad_token)

  @classmethod
  def from_file(cls, path: str | os.PathLike, **kwargs: Any) -> HFTokenizer:
    """Loads `tokenizer.json`, or the one inside a checkpoint directory."""
    path = _tokenizer_json(path)
    return cls(tokenizers.Tokenizer.from_file(path), where=path, **kwargs)

  @property
  def backend(self) -> tokenizers.Tokenizer:
    """The wrapped `tokenizers.Tokenizer` (not to be mutated)."""
    return self._tok

  def encode(self, text: str, *, allow_special: bool = True) -> list[int]:
    tok = self._tok if allow_special else self._plain
    return tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
    ids = [int(i) for i in ids]
    self._check_ids(ids)
    return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

  def token_to_id(self, token: str) -> int | None:
    return self._tok.token_to_id(token)

  def id_to_token(self, token_id: int) -> str:
    self._check_ids([token_id])
    return self._tok.id_to_token(int(token_id))

  def is_special(self, token_id: int) -> bool:
    return int(token_id) in self._special

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  @property
  def pad(self) -> int:
    return self._pad

  def save(self, directory: str | os.PathLike) -> str:
    """Writes `tokenizer.json` into `directory` (atomically); returns its path."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "tokenizer.json")
    _atomic_write(path, self._tok.to_str(pretty=True).encode("utf-8"))
    return path

  def _check_ids(self, ids: Sequence[int]) -> None:
    bad = [i for i in ids if not 0 <= i < self.vocab_size]
    if bad:
      raise ValueError(f"token ids {bad[:5]} outside the vocabulary [0, {self.vocab_size})")


class TinyTokenizer(Tokenizer):
  """The embedded model's sentencepiece tokenizer with special tokens at the top ids."""

  def __init__(
      self,
      model_path: str | os.PathLike = TINY_TOKENIZER_PATH,
      *,
      vocab_size: int = TINY_VOCAB_SIZE,
  ):
    model_path = os.fspath(model_path)
    if not os.path.exists(model_path):
      raise FileNotFoundError(
          f"tiny tokenizer model {model_path} not found; build it with "
          "`python -m retrv_jax.data.tokenizer --train_tiny --data_dir DIR --out PATH`"
      )
    self._path = model_path
    self._vocab_size = vocab_size
    self._sp = spm.SentencePieceProcessor(model_file=model_path)
    self._num_pieces = self._sp.get_piece_size()
    base = vocab_size - TINY_NUM_RESERVED
    if self._num_pieces > base:
      raise ValueError(
          f"{model_path}: {self._num_pieces} sentencepiece pieces do not fit below the "
          f"{TINY_NUM_RESERVED} reserved ids of a {vocab_size}-token vocabulary"
      )
    if (self._sp.pad_id(), self._sp.unk_id(), self._sp.bos_id(), self._sp.eos_id()) != (0, 1, 2, 3):
      raise ValueError(f"{model_path}: expected pad/unk/bos/eos ids 0/1/2/3")
    added = [f"<|unused_{i}|>" for i in range(base - self._num_pieces)]
    added += list(TINY_SPECIAL_TOKENS)
    added += [f"<|reserved_{j}|>" for j in range(TINY_NUM_RESERVED - len(TINY_SPECIAL_TOKENS))]
    self._added = {token: self._num_pieces + i for i, token in enumerate(added)}
    self._added_by_id = {i: token for token, i in self._added.items()}
    # Longest first, so no token is cut short by one that is its prefix.
    alternatives = sorted(self._added, key=len, reverse=True)
    self._split = re.compile("(" + "|".join(re.escape(t) for t in alternatives) + ")")

  def __getstate__(self) -> dict[str, Any]:
    return {"model_path": self._path, "vocab_size": self._vocab_size}

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__init__(state["model_path"], vocab_size=state["vocab_size"])

  def encode(self, text: str, *, allow_special: bool = True) -> list[int]:
    if not allow_special:
      return list(self._sp.encode(text)) if text else []
    ids = []
    for i, part in enumerate(self._split.split(text)):
      if i % 2:  # re.split puts the captured separators at odd positions.
        ids.append(self._added[part])
      elif part:
        ids.extend(self._sp.encode(part))
    return ids

  def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
    out, run = [], []
    for token_id in ids:
      token_id = int(token_id)
      if not 0 <= token_id < self._vocab_size:
        raise ValueError(f"token id {token_id} outside the vocabulary [0, {self._vocab_size})")
      if self.is_special(token_id):
        out.append(self._sp.decode(run))
        run = []
        if not skip_special_tokens:
          out.append(self.id_to_token(token_id))
      else:
        run.append(token_id)
    out.append(self._sp.decode(run))
    return "".join(out)

  def token_to_id(self, token: str) -> int | None:
    if token in self._added:
      return self._added[token]
    token_id = self._sp.piece_to_id(token)
    return token_id if self._sp.id_to_piece(token_id) == token else None

  def id_to_token(self, token_id: int) -> str:
    token_id = int(token_id)
    if token_id in self._added_by_id:
      return self._added_by_id[token_id]
    if 0 <= token_id < self._num_pieces:
      return self._sp.id_to_piece(token_id)
    raise ValueError(f"token id {token_id} outside the vocabulary [0, {self._vocab_size})")

  def is_special(self, token_id: int) -> bool:
    token_id = int(token_id)
    return token_id >= self._num_pieces or token_id in (0, 2, 3)

  @property
  def vocab_size(self) -> int:
    return self._vocab_size

  @property
  def num_pieces(self) -> int:
    """Ids produced by the sentencepiece model (the rest are added tokens)."""
    return self._num_pieces

  @property
  def pad(self) -> int:
    return 0

  @property
  def bos(self) -> int:
    return 2


def load_tokenizer(path: str | os.PathLike | None = None) -> Tokenizer:
  """A tokenizer from a checkpoint dir / `tokenizer.json` (HF) or a `.model` file (tiny).

  None loads the shipped tiny tokenizer.
  """
  if path is None:
    return TinyTokenizer()
  path = os.fspath(path)
  if path.endswith(".model"):
    return TinyTokenizer(path)
  return HFTokenizer.from_file(path)


def add_retrv_tokens(
    tokenizer: str | os.PathLike | tokenizers.Tokenizer | HFTokenizer,
) -> tuple[HFTokenizer, int]:
  """Adds the Retrv-R1 special tokens that a Qwen tokenizer lacks; returns (copy, how many).

  `tokenizer` is a checkpoint directory, a `tokenizer.json` path, or a tokenizer object (not
  modified). New tokens get the next free ids in `TINY_SPECIAL_TOKENS` order; calling it on a
  tokenizer that has them all adds nothing.
  """
  if isinstance(tokenizer, HFTokenizer):
    tokenizer = tokenizer.backend
  if isinstance(tokenizer, tokenizers.Tokenizer):
    where = "tokenizer"
    raw = tokenizers.Tokenizer.from_str(tokenizer.to_str())
  else:
    where = _tokenizer_json(tokenizer)
    raw = tokenizers.Tokenizer.from_file(where)
  missing = [t for t in TINY_SPECIAL_TOKENS if raw.token_to_id(t) is None]
  raw.add_special_tokens(
      [tokenizers.AddedToken(t, special=True, normalized=False) for t in missing]
  )
  return HFTokenizer(raw, where=where), len(missing)


def resize_token_embeddings(
    params: dict[str, Any],
    new_vocab_size: int,
    *,
    key: Any,
    num_old_tokens: int | None = None,
    noise_scale: float = 1e-3,
) -> dict[str, Any]:
  """Grows the token embedding (and an untied `lm_head`) to `new_vocab_size` rows.

  Rows from `num_old_tokens` (default: the current row count) on are set to the mean of the
  rows before it, plus Gaussian noise of `noise_scale` x the per-dimension std so new tokens
  are not identical. Pure: returns a new pytree. Embedding at
  `params['language_model']['embed_tokens']['embedding']` `[V, D]`; head, if untied, at
  `params['lm_head']['kernel']` `[D, V]`.
  """
  import jax  # Deferred: data workers import this module without needing jax.
  import jax.numpy as jnp

  embedding = params["language_model"]["embed_tokens"]["embedding"]
  old_vocab = embedding.shape[0]
  keep = old_vocab if num_old_tokens is None else num_old_tokens
  if new_vocab_size < old_vocab:
    raise ValueError(f"new_vocab_size {new_vocab_size} is smaller than the current {old_vocab}")
  if not 0 < keep <= old_vocab:
    raise ValueError(f"num_old_tokens must be in [1, {old_vocab}], got {num_old_tokens}")

  def grow(table, key):  # table: [V, D] -> [new_vocab_size, D]
    trained = table[:keep].astype(jnp.float32)
    mean, std = trained.mean(axis=0), trained.std(axis=0)
    noise = jax.random.normal(key, (new_vocab_size - keep, table.shape[1]), jnp.float32)
    new_rows = (mean + noise_scale * std * noise).astype(table.dtype)
    return jnp.concatenate([table[:keep], new_rows], axis=0)

  embed_key, head_key = jax.random.split(key)
  out = jax.tree_util.tree_map(lambda x: x, params)  # New containers, shared leaves.
  out["language_model"]["embed_tokens"]["embedding"] = grow(embedding, embed_key)
  if "lm_head" in params:
    out["lm_head"]["kernel"] = grow(params["lm_head"]["kernel"].T, head_key).T
  return out


def train_tiny_tokenizer(
    texts: Iterable[str],
    out_path: str | os.PathLike,
    *,
    vocab_size: int = TINY_VOCAB_SIZE,
) -> TinyTokenizer:
  """Trains the tiny sentencepiece model on `texts` and writes it to `out_path` (atomically).

  BPE model, identity normalisation (text round-trips exactly: spaces, newlines, case),
  no dummy prefix, byte fallback (no unknown characters), digits and newline as single
  tokens. Deterministic for the same texts. Special-token strings in the texts are cut out.
  """
  special = re.compile("|".join(re.escape(t) for t in TINY_SPECIAL_TOKENS))
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=_training_lines(texts, special),
      model_writer=model,
      model_type="bpe",
      vocab_size=vocab_size - TINY_NUM_RESERVED,
      hard_vocab_limit=False,  # A small corpus may give fewer pieces; the gap stays unused.
      normalization_rule_name="identity",
      remove_extra_whitespaces=False,
      add_dummy_prefix=False,
      byte_fallback=True,
      character_coverage=1.0,  # Every character seen is a piece; bytes only for unseen ones.
      user_defined_symbols=["\n", *"0123456789"],
      pad_id=0,
      unk_id=1,
      bos_id=2,
      eos_id=3,
      max_sentence_length=1 << 16,
      num_threads=1,  # Deterministic output.
      minloglevel=2,
  )
  out_path = os.fspath(out_path)
  if os.path.dirname(out_path):
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
  _atomic_write(out_path, model.getvalue())
  return TinyTokenizer(out_path, vocab_size=vocab_size)


def _training_lines(texts: Iterable[str], special: re.Pattern) -> Iterator[str]:
  for text in texts:
    for part in special.split(text):
      yield from (line for line in part.split("\n") if line.strip())


def _tokenizer_json(path: str | os.PathLike) -> str:
  path = os.fspath(path)
  if os.path.isdir(path):
    path = os.path.join(path, "tokenizer.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no tokenizer.json at {path}")
  return path


def _atomic_write(path: str, data: bytes) -> None:
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--train_tiny", action="store_true", help="train the tiny tokenizer")
  parser.add_argument("--data_dir", required=True, help="synthetic benchmark directory")
  parser.add_argument("--out", default=TINY_TOKENIZER_PATH, help="where to write the .model")
  parser.add_argument("--vocab_size", type=int, default=TINY_VOCAB_SIZE)
  args = parser.parse_args(argv)
  if not args.train_tiny:
    parser.error("nothing to do: pass --train_tiny")
  from retrv_jax.data import prompts, synthetic  # Deferred: only the CLI needs them.

  # Templates are repeated so that their words become whole pieces like the corpus's words.
  templates = list(prompts.template_texts()) * 100
  texts = itertools.chain(synthetic.iter_corpus_text(args.data_dir), templates)
  tok = train_tiny_tokenizer(texts, args.out, vocab_size=args.vocab_size)
  print(f"wrote {args.out}: {tok.num_pieces} pieces, vocab_size {tok.vocab_size}")


if __name__ == "__main__":
  main()
