"""Logit parity of the Flax model against Hugging Face transformers on one checkpoint.

  python -m retrv_jax.hf.check_parity --hf_dir DIR [--image PATH ...] [--prompt TEXT] \
      [--atol 1e-4] [--dtype float32]

Both models see the same inputs: the images (a synthetic one by default) preprocessed by
`retrv_jax.data.images` (as the checkpoint's preprocessor_config.json says, if present),
then the prompt through the checkpoint's tokenizer, or random text ids. Prints the
max |logit difference|, KL(hf || ours) mean and max over tokens and top-1 agreement, and
exits non-zero when the max difference exceeds --atol.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from retrv_jax.data import images as images_lib
from retrv_jax.hf import io
from retrv_jax.hf.config import model_config_from_hf
from retrv_jax.models.config import ModelConfig

NUM_RANDOM_TEXT_TOKENS = 8  # Random text ids before and after the images.
SYNTHETIC_IMAGE_SHAPE = (112, 140, 3)  # 8 x 10 patches: the 4 x 5 merged grid has ragged windows.


@dataclasses.dataclass(frozen=True)
class ParityReport:
  """How far our logits are from transformers' on the same inputs (float64 statistics)."""

  max_abs_diff: float  # max |logit_hf - logit_ours| over tokens and vocab.
  kl_mean: float  # Mean over tokens of KL(softmax hf || softmax ours), nats.
  kl_max: float
  top1_agreement: float  # Fraction of tokens whose argmax agrees.
  num_tokens: int
  atol: float

  @property
  def ok(self) -> bool:
    return bool(self.max_abs_diff <= self.atol)

  def summary(self) -> str:
    verdict = "OK" if self.ok else f"FAIL (atol {self.atol:g})"
    return (
        f"tokens {self.num_tokens}  max|dlogit| {self.max_abs_diff:.3e}  "
        f"KL mean {self.kl_mean:.3e} max {self.kl_max:.3e}  "
        f"top-1 agreement {self.top1_agreement:.4f}  {verdict}"
    )


def logit_stats(hf_logits: np.ndarray, our_logits: np.ndarray, mask: np.ndarray, atol: float
                ) -> ParityReport:
  """Compares `[b, t, vocab]` logits on the tokens where `mask [b, t]` is true."""
  if hf_logits.shape != our_logits.shape:
    raise ValueError(f"logit shapes differ: hf {hf_logits.shape}, ours {our_logits.shape}")
  keep = np.asarray(mask, bool)
  a = hf_logits[keep].astype(np.float64)
  b = our_logits[keep].astype(np.float64)
  log_p = a - _logsumexp(a)
  log_q = b - _logsumexp(b)
  kl = np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)
  return ParityReport(
      max_abs_diff=float(np.max(np.abs(a - b))),
      kl_mean=float(np.mean(kl)),
      kl_max=float(np.max(kl)),
      top1_agreement=float(np.mean(np.argmax(a, -1) == np.argmax(b, -1))),
      num_tokens=int(keep.sum()),
      atol=atol,
  )


def _logsumexp(x: np.ndarray) -> np.ndarray:
  top = np.max(x, axis=-1, keepdims=True)
  return top + np.log(np.sum(np.exp(x - top), axis=-1, keepdims=True))


def build_inputs(
    hf_dir: str,
    config: ModelConfig,
    *,
    images: Sequence[Any] = (),
    prompt: str | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
  """Inputs for one row: input_ids, attention_mask `[1, t]`, pixel_values, image_grid_thw.

  Token layout: `[text] (<vision_start> <image_pad> * n <vision_end>) per image [text]`,
  where the text is random ids, or the tokenized `prompt` (after the images) when given.
  `images` are paths, PIL images or uint8 arrays; none means one synthetic random image.
  Images go through `retrv_jax.data.images` (equal to the HF processor), configured by
  the checkpoint's preprocessor_config.json when it has one.
  """
  rng = np.random.default_rng(seed)
  if not images:
    images = [rng.integers(0, 256, SYNTHETIC_IMAGE_SHAPE, dtype=np.uint8)]
  processed = images_lib.preprocess_images(list(images), _image_config(hf_dir, config))
  special = min(config.image_token_id, config.video_token_id, config.vision_start_token_id,
                config.vision_end_token_id)

  def random_text() -> list[int]:
    return rng.integers(3, min(special, config.vocab_size), NUM_RANDOM_TEXT_TOKENS).tolist()

  before, after = ([], _tokenize(hf_dir, prompt)) if prompt else (random_text(), random_text())
  ids = list(before)
  for count in processed.num_tokens:
    ids += [config.vision_start_token_id, *[config.image_token_id] * count,
            config.vision_end_token_id]
  input_ids = np.asarray([ids + after], np.int64)
  return {
      "input_ids": input_ids,
      "attention_mask": np.ones_like(input_ids),
      "pixel_values": processed.pixel_values,
      "image_grid_thw": processed.image_grid_thw,
  }


def _tokenize(hf_dir: str, prompt: str) -> list[int]:
  if not any(os.path.exists(os.path.join(hf_dir, name))
             for name in ("tokenizer.json", "tokenizer_config.json")):
    raise ValueError(f"--prompt needs a tokenizer in {hf_dir} (tokenizer.json)")
  from transformers import AutoTokenizer

  ids = AutoTokenizer.from_pretrained(hf_dir)(prompt, add_special_tokens=False)["input_ids"]
  if not ids:
    raise ValueError(f"prompt {prompt!r} tokenizes to nothing")
  return list(ids)


def _image_config(hf_dir: str, config: ModelConfig) -> images_lib.ImageConfig:
  if os.path.exists(os.path.join(hf_dir, "preprocessor_config.json")):
    return images_lib.ImageConfig.from_preprocessor_config(hf_dir)
  v = config.vision
  return images_lib.ImageConfig(
      patch_size=v.patch_size, merge_size=v.spatial_merge_size,
      temporal_patch_size=v.temporal_patch_size,
  )


def hf_logits(hf_dir: str, inputs: dict[str, np.ndarray], config: ModelConfig, dtype: str
              ) -> np.ndarray:
  """transformers' logits `[b, t, vocab]` as float32 numpy."""
  import torch
  from transformers import Qwen2_5_VLForConditionalGeneration

  model = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_dir, dtype=getattr(torch, dtype))
  model.eval()
  input_ids = torch.from_numpy(inputs["input_ids"])
  # transformers v5 needs the modality of each token to compute M-RoPE positions.
  mm_token_type_ids = (input_ids == config.image_token_id).to(torch.int32)
  with torch.no_grad():
    out = model(
        input_ids=input_ids,
        attention_mask=torch.from_numpy(inputs["attention_mask"]),
        pixel_values=torch.from_numpy(inputs["pixel_values"]).to(model.dtype),
        image_grid_thw=torch.from_numpy(inputs["image_grid_thw"]),
        mm_token_type_ids=mm_token_type_ids,
    )
  return out.logits.float().numpy()


def flax_logits(config: ModelConfig, params: Any, inputs: dict[str, np.ndarray]) -> np.ndarray:
  """Our logits `[b, t, vocab]` as float32 numpy."""
  import jax

  from retrv_jax.models.qwen2_5_vl import Qwen25VL

  # float32 parity needs float32 matmuls; TPUs otherwise multiply in bfloat16 passes.
  precision = "highest" if config.dtype == "float32" else "default"
  with jax.default_matmul_precision(precision):
    logits = Qwen25VL(config).apply(
        {"params": params},
        inputs["input_ids"].astype(np.int32),
        pixel_values=inputs["pixel_values"].astype(config.dtype),
        image_grid_thw=inputs["image_grid_thw"].astype(np.int32),
        attention_mask=inputs["attention_mask"].astype(np.int32),
    )
  return np.asarray(logits, np.float32)


def compare(
    hf_dir: str | os.PathLike,
    *,
    images: Sequence[Any] = (),
    prompt: str | None = None,
    atol: float = 1e-4,
    dtype: str = "float32",
    params: Any = None,
    seed: int = 0,
) -> ParityReport:
  """Runs transformers and the Flax model on the same inputs and compares their logits.

  Args:
    hf_dir: a Hugging Face Qwen2.5-VL checkpoint directory (the reference).
    images: image paths (or PIL images / uint8 arrays); default one synthetic image.
    prompt: text prompt; needs the checkpoint's tokenizer.
    atol: tolerance on the max absolute logit difference.
    dtype: params and compute dtype of both models ('float32' or 'bfloat16').
    params: Flax params to test instead of those imported from `hf_dir`.
    seed: seed of the random text ids and the synthetic image.
  """
  hf_dir = os.fspath(hf_dir)
  if params is None:
    config, params = io.load_pretrained(hf_dir, dtype=dtype)
  else:
    config = model_config_from_hf(hf_dir, param_dtype=dtype, scan_layers=io.is_scanned(params))
  config = config.replace(dtype=dtype)
  inputs = build_inputs(hf_dir, config, images=images, prompt=prompt, seed=seed)
  ours = flax_logits(config, params, inputs)
  theirs = hf_logits(hf_dir, inputs, config, dtype)
  return logit_stats(theirs, ours, inputs["attention_mask"], atol)


def run(
    hf_dir: str,
    *,
    images: Sequence[str] = (),
    prompt: str | None = None,
    atol: float = 1e-4,
    dtype: str = "float32",
) -> int:
  """Prints the parity report; returns the exit status (0 within `atol`, else 1)."""
  report = compare(hf_dir, images=images, prompt=prompt, atol=atol, dtype=dtype)
  print(report.summary())
  return 0 if report.ok else 1


def main(argv: Sequence[str]) -> int:
  from absl import flags

  if len(argv) > 1:
    raise ValueError(f"unexpected arguments: {argv[1:]}")
  values = flags.FLAGS
  return run(values.hf_dir, images=values.image, prompt=values.prompt, atol=values.atol,
             dtype=values.dtype)


def _define_flags() -> None:
  """Flags exist only when run as a program, so importing `compare` defines none."""
  from absl import flags

  flags.DEFINE_string("hf_dir", None, "Hugging Face Qwen2.5-VL checkpoint directory.")
  flags.DEFINE_multi_string("image", [], "Image file(s); default: one synthetic image.")
  flags.DEFINE_string("prompt", None, "Text prompt (needs the checkpoint's tokenizer).")
  flags.DEFINE_float("atol", 1e-4, "Tolerance on max |logit difference|.")
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Params and compute dtype.")
  flags.mark_flag_as_required("hf_dir")


if __name__ == "__main__":
  from absl import app

  _define_flags()
  app.run(main)
