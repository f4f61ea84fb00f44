"""Both tokenizer backends: special tokens, round trips, the tiny id layout, adding tokens."""

from __future__ import annotations

import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from retrv_jax.data import tokenizer as tok_lib
from retrv_jax.models import config as config_lib

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                 "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]


def sample_texts(n: int = 400) -> list[str]:
  rng = np.random.default_rng(0)
  colors = ["red", "green", "blue", "yellow", "purple"]
  shapes = ["circle", "square", "triangle", "star"]
  out = []
  for i in range(n):
    c1, c2 = rng.choice(colors, 2)
    s1, s2 = rng.choice(shapes, 2)
    out.append(f"A {c1} {s1} left of a {c2} {s2}, size {i % 97}.\nThe background is white.")
  return out


def build_qwen_like_tokenizer(directory) -> str:
  """A small byte-level BPE with Qwen's special tokens (not the Retrv-R1 ones)."""
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator(sample_texts(100), trainer)
  tok.add_special_tokens(QWEN_SPECIALS)
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, "tokenizer.json")
  tok.save(path)
  return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  path = tmp_path_factory.mktemp("tiny") / "tiny.model"
  return tok_lib.train_tiny_tokenizer(sample_texts(), path)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
  directory = tmp_path_factory.mktemp("qwen")
  build_qwen_like_tokenizer(directory)
  tok, num_added = tok_lib.add_retrv_tokens(directory)
  assert num_added == len(tok_lib.RETRV_TOKENS)
  return tok


def _all_specials_text() -> str:
  parts = [f"word{i} {t}" for i, t in enumerate(config_lib.TINY_SPECIAL_TOKENS)]
  return " x\n".join(parts) + " The end  with  spaces 12 ."


@pytest.mark.parametrize("backend", ["tiny", "qwen"])
def test_round_trip_with_every_special_token(backend, request):
  tok = request.getfixturevalue(backend)
  text = _all_specials_text()
  ids = tok.encode(text)
  assert tok.decode(ids) == text
  for name, token in tok_lib.SPECIAL_TOKEN_NAMES.items():
    token_id = getattr(tok, name)
    assert tok.token_to_id(token) == token_id and tok.id_to_token(token_id) == token
    assert ids.count(token_id) == 1, token
    assert tok.is_special(token_id)
  plain = tok.decode(ids, skip_special_tokens=True)
  assert not any(t in plain for t in config_lib.TINY_SPECIAL_TOKENS)
  assert "word3" in plain and tok.eos == tok.im_end


@pytest.mark.parametrize("backend", ["tiny", "qwen"])
def test_data_text_never_becomes_special_tokens(backend, request):
  tok = request.getfixturevalue(backend)
  text = "a caption that says <think> and <|im_end|>"
  ids = tok.encode(text, allow_special=False)
  assert not set(ids) & set(tok.special_ids.values())
  assert tok.decode(ids) == text
  assert tok.think_start in tok.encode(text)


@pytest.mark.parametrize("backend", ["tiny", "qwen"])
def test_digits_are_single_tokens(backend, request):
  tok = request.getfixturevalue(backend)
  digits = tok.digit_ids
  assert len(set(digits)) == 10
  assert [tok.decode([d]) for d in digits] == list("0123456789")


def test_tiny_layout_matches_config_tiny(tiny):
  cfg = config_lib.tiny()
  base = cfg.vocab_size - config_lib.TINY_NUM_RESERVED
  assert tiny.vocab_size == cfg.vocab_size == 4096
  for i, token in enumerate(config_lib.TINY_SPECIAL_TOKENS):
    assert tiny.token_to_id(token) == base + i
  assert tiny.image_pad == cfg.image_token_id
  assert tiny.video_pad == cfg.video_token_id
  assert tiny.vision_start == cfg.vision_start_token_id
  assert tiny.vision_end == cfg.vision_end_token_id
  assert (tiny.eos, tiny.bos, tiny.pad) == (cfg.eos_token_id, cfg.bos_token_id, cfg.pad_token_id)
  assert tiny.id_to_token(0) == "<pad>" and tiny.id_to_token(1) == "<unk>"
  assert tiny.id_to_token(4095) == "<|reserved_15|>"
  assert max(tiny.encode(_all_specials_text() + " é 🎉")) < cfg.vocab_size


def test_tiny_training_is_deterministic(tiny, tmp_path):
  again = tok_lib.train_tiny_tokenizer(sample_texts(), tmp_path / "again.model")
  with open(again._path, "rb") as a, open(tiny._path, "rb") as b:
    assert a.read() == b.read()


def test_tiny_pickles(tiny):
  clone = pickle.loads(pickle.dumps(tiny))
  text = _all_specials_text()
  assert clone.encode(text) == tiny.encode(text)


def test_tiny_refuses_out_of_vocabulary_ids(tiny):
  with pytest.raises(ValueError, match="token id 4096 outside the vocabulary"):
    tiny.decode([5, 4096])


def test_tiny_cli_trains_from_the_corpus(tmp_path, monkeypatch):
  from retrv_jax.data import synthetic

  seen = []

  def corpus(data_dir):
    seen.append(data_dir)
    yield from sample_texts(50)

  monkeypatch.setattr(synthetic, "iter_corpus_text", corpus)
  out = tmp_path / "cli.model"
  tok_lib.main(["--train_tiny", "--data_dir", "/data/synth", "--out", str(out)])
  assert seen == ["/data/synth"]
  tok = tok_lib.load_tokenizer(out)
  assert isinstance(tok, tok_lib.TinyTokenizer) and tok.token_to_id("<think>") == 4070


def test_shipped_tiny_tokenizer():
  """The asset under retrv_jax/data/assets/ has the layout of config.tiny()."""
  tok = tok_lib.load_tokenizer()
  cfg = config_lib.tiny()
  assert isinstance(tok, tok_lib.TinyTokenizer) and tok.vocab_size == cfg.vocab_size
  assert (tok.image_pad, tok.eos) == (cfg.image_token_id, cfg.eos_token_id)
  assert tok.decode(tok.encode(_all_specials_text())) == _all_specials_text()
  # Trained on the benchmark's words: a caption is about one token per word.
  caption = "a large blue circle at the top right on a black background"
  assert len(tok.encode(caption)) == len(caption.split())


def test_missing_tiny_model_names_the_command(tmp_path):
  with pytest.raises(FileNotFoundError, match="--train_tiny"):
    tok_lib.TinyTokenizer(tmp_path / "absent.model")


def test_qwen_tokenizer_without_retrv_tokens(tmp_path):
  """Loads (plain generation works); a Retrv-R1 token is refused on use, naming the fix."""
  build_qwen_like_tokenizer(tmp_path)
  tok = tok_lib.load_tokenizer(tmp_path)
  assert tok.decode(tok.encode("<|im_start|>hi<|im_end|>")) == "<|im_start|>hi<|im_end|>"
  with pytest.raises(KeyError, match=r"no token '<think>'.*add_retrv_tokens"):
    _ = tok.think_start
  with pytest.raises(KeyError, match="add_retrv_tokens"):
    _ = tok.special_ids


def test_tokenizer_json_without_chat_tokens_is_refused(tmp_path):
  raw = tokenizers.Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>"))
  raw.save(str(tmp_path / "tokenizer.json"))
  with pytest.raises(ValueError, match=r"tokenizer.json: the vocabulary lacks the tokens"):
    tok_lib.load_tokenizer(tmp_path)


def test_add_retrv_tokens_appends_and_is_idempotent(tmp_path):
  path = build_qwen_like_tokenizer(tmp_path)
  original = tokenizers.Tokenizer.from_file(path)
  tok, num_added = tok_lib.add_retrv_tokens(original)
  assert num_added == 10
  assert original.token_to_id("<think>") is None  # The input is not modified.
  old_size = original.get_vocab_size(with_added_tokens=True)
  assert tok.vocab_size == old_size + 10
  assert [tok.token_to_id(t) for t in tok_lib.RETRV_TOKENS] == list(range(old_size, old_size + 10))
  assert tok.im_end == original.token_to_id("<|im_end|>")
  assert tok.pad == original.token_to_id("<|endoftext|>")
  again, num_again = tok_lib.add_retrv_tokens(tok)
  assert num_again == 0 and again.vocab_size == tok.vocab_size


def test_saved_qwen_tokenizer_loads_in_transformers(qwen, tmp_path):
  from transformers import PreTrainedTokenizerFast

  path = qwen.save(tmp_path)
  text = _all_specials_text()
  assert tok_lib.load_tokenizer(tmp_path).encode(text) == qwen.encode(text)
  hf = PreTrainedTokenizerFast(tokenizer_file=path)
  assert hf.encode(text, add_special_tokens=False) == qwen.encode(text)


def _params(vocab, dim, untied):
  embed = jnp.arange(vocab * dim, dtype=jnp.float32).reshape(vocab, dim) / 7.0
  params = {"language_model": {"embed_tokens": {"embedding": embed}, "norm": {"scale": 1.0}}}
  if untied:
    params["lm_head"] = {"kernel": -embed.T}
  return params


@pytest.mark.parametrize("untied", [False, True])
def test_resize_token_embeddings_grows_with_mean_rows(untied):
  params = _params(10, 4, untied)
  out = tok_lib.resize_token_embeddings(params, 13, key=jax.random.key(0))
  embed = out["language_model"]["embed_tokens"]["embedding"]
  old = params["language_model"]["embed_tokens"]["embedding"]
  assert embed.shape == (13, 4) and old.shape == (10, 4)  # Pure: the input is unchanged.
  np.testing.assert_array_equal(embed[:10], old)
  np.testing.assert_allclose(embed[10:], np.broadcast_to(old.mean(0), (3, 4)), atol=0.02)
  assert not np.array_equal(embed[10], embed[11])  # Noise separates the new tokens.
  assert ("lm_head" in out) == untied
  if untied:
    head = out["lm_head"]["kernel"]
    assert head.shape == (4, 13)
    np.testing.assert_array_equal(head[:, :10], params["lm_head"]["kernel"])
    np.testing.assert_allclose(head[:, 12], -old.mean(0), atol=0.02)


def test_resize_token_embeddings_reinitialises_padding_rows():
  params = _params(10, 4, untied=False)
  out = tok_lib.resize_token_embeddings(params, 10, key=jax.random.key(1), num_old_tokens=6)
  embed = out["language_model"]["embed_tokens"]["embedding"]
  old = params["language_model"]["embed_tokens"]["embedding"]
  np.testing.assert_array_equal(embed[:6], old[:6])
  np.testing.assert_allclose(embed[6:], np.broadcast_to(old[:6].mean(0), (4, 4)), atol=0.02)
  with pytest.raises(ValueError, match="smaller than the current 10"):
    tok_lib.resize_token_embeddings(params, 9, key=jax.random.key(0))
