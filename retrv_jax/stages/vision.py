"""Stage -1, for the embedded tiny model only: supervised pretraining of the vision tower,
the tiny stand-in for the pretrained ViT every real Qwen2.5-VL starts from.

Linear heads on an image's merged tokens (flattened) predict what `scene_images` labels:
the background, and per cell of the 3 x 3 grid whether it holds an object and that
object's colour, shape and size. Only the vision tower (`backbone/visual`) and the heads
learn; the heads are dropped from the stage's output. Captioning (`pretrain`) from
random init teaches the tower the background colour and nothing about the objects; after
this stage the captions name them. The shipped tiny model starts here
(`configs/pretrain.py`); the README records what it gives downstream.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from retrv_jax.data import scene_images
from retrv_jax.data.scene import SceneSpec
from retrv_jax.data.tokenizer import Tokenizer
from retrv_jax.models import lora
from retrv_jax.models.reranker import Reranker
from retrv_jax.stages import setup, trainer

HEADS = "attribute_heads"  # The heads' params, beside `backbone`; not in the output.
TRAINABLE = (r"^backbone/visual/", rf"^{HEADS}/")
EXTRA_PARAMS = (HEADS,)


def source(config: ml_collections.ConfigDict) -> scene_images.SceneImages:
  """Scenes of the embedded benchmark's vocabulary, seen as the pipeline shows images."""
  data = setup.pipeline_config(config, batch_size=1)
  return scene_images.SceneImages(spec=SceneSpec(), image_size=int(config.vision.image_size),
                                  image_config=data.image_config(),
                                  seed=config.seed + jax.process_index())


def make_iterator(config: ml_collections.ConfigDict, micro_batch_size: int):
  """Micro-batches for every step of the stage, with `get_state` / `set_state`."""
  section = config.vision
  steps_batches = int(section.steps) * (int(section.batch_size) // micro_batch_size)
  return iter(scene_images.dataset(source(config), micro_batch_size, steps_batches))


def tokens_per_image(config: ml_collections.ConfigDict) -> int:
  _, h, w = source(config).grid_thw()
  return h * w // config.model.vision.spatial_merge_size**2


def extra_params(config: ml_collections.ConfigDict, rng: jax.Array) -> dict:
  """Freshly initialised heads: one linear map from the flattened tokens to every logit."""
  features = tokens_per_image(config) * int(config.model.vision.out_hidden_size)
  kernel = 0.02 * jax.random.normal(rng, (features, scene_images.NUM_LOGITS), jnp.float32)
  return {HEADS: {"kernel": kernel, "bias": jnp.zeros(scene_images.NUM_LOGITS, jnp.float32)}}


def head_losses(logits: jax.Array, labels: jax.Array) -> dict[str, tuple]:
  """Per head: (summed cross-entropy, correct, labelled) over the batch's labelled cells."""
  out, column, offset = {}, 0, 0
  for name, classes, columns in scene_images.HEADS:
    x = logits[:, offset:offset + classes * columns].reshape(-1, columns, classes)
    y = labels[:, column:column + columns]
    mask = y != scene_images.IGNORE
    ce = optax.softmax_cross_entropy_with_integer_labels(x, jnp.maximum(y, 0))
    correct = jnp.sum((jnp.argmax(x, -1) == y) & mask, dtype=jnp.float32)
    out[name] = (jnp.sum(ce * mask), correct, jnp.sum(mask, dtype=jnp.float32))
    column, offset = column + columns, offset + classes * columns
  return out


def make_step(model: Reranker, config: ml_collections.ConfigDict, tokenizer: Tokenizer, tx):
  del tokenizer
  grid = np.asarray(source(config).grid_thw(), np.int32)

  def loss_fn(trainable, frozen, batch, denom, rng):
    del rng
    params = lora.combine(trainable, frozen)
    heads = params.pop(HEADS)
    pixels = batch["pixel_values"]
    b = pixels.shape[0]
    tokens = model.apply({"params": params}, pixels.reshape(-1, pixels.shape[-1]),
                         jnp.broadcast_to(jnp.asarray(grid), (b, 3)),
                         method=lambda m, x, g: m.backbone.visual(x, g))
    logits = tokens.reshape(b, -1).astype(jnp.float32) @ heads["kernel"] + heads["bias"]
    per_head = head_losses(logits, batch["labels"])
    loss = sum(ce for ce, _, _ in per_head.values()) / denom
    pairs = {f"{name}_accuracy": (correct, count)
             for name, (_, correct, count) in per_head.items()}
    return loss, pairs

  def denominator(stacked):
    return jnp.sum(stacked["labels"] != scene_images.IGNORE, dtype=jnp.float32)

  return trainer.supervised_step(loss_fn, denominator, tx)
