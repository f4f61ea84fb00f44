"""The Retrv-R1 re-ranker: Qwen2.5-VL plus the ICM, from a prompt batch to decoder inputs.

`Reranker(config, compression).apply({"params": params}, batch, method=Reranker.encode)`
turns the arrays of a `retrv_jax.data.prompts.PromptBatch` (see `batch_from_prompts`)
into `RerankInputs`: the prompt as input embeddings with M-RoPE positions, and every
candidate's splice block for the details-inspection mechanism. Params:
`{"backbone": <Qwen25VL params>, "icm": <InformationCompression params>}` ("icm" only
when compression is enabled).

Steps, all static-shape and jit-friendly:
  1. The vision tower runs once on every image of the batch. Image slots are ordered
     (b, [query, candidate 1 .. K]) and `pixel_values` holds the present ones in that
     order; features are placed at `<|image_pad|>` tokens through the spans (a gather).
  2. Splice blocks `<|cand_start|>` T_c `<|cand_end|>` are embedded with their images;
     T_c is the slice between the two markers, so candidates are embedded once.
  3. The ICM compresses T_c against the prompt's query tokens (`query_mask`); t_con and
     t_rel replace the embeddings of `<|cand_con|>` / `<|cand_rel|>` (`slot_index`).
  4. Positions: `get_rope_index` on the prompt, and on the blocks alone (B*K rows): M-RoPE
     positions are cumulative, so a block placed at position p has positions p + offsets,
     and the token after it has p + advance.

Splice block of a candidate with a 2x2 merged image (t = text, I = image pad):

    ids    : <cs> t  t  <vs> I  I  I  I  <ve> <ce>  pad
    offsets: 0    1  2  3    4+(t,h,w) in {0,1}^2  6  7   0      advance = 8
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from retrv_jax.data.prompts import PromptBatch
from retrv_jax.models import axes, compression, qwen2_5_vl
from retrv_jax.models.compression import CompressionConfig, InformationCompression
from retrv_jax.models.config import ModelConfig
from retrv_jax.models.layers import constrain
from retrv_jax.models.qwen2_5_vl import Qwen25VL
from retrv_jax.models.rope import get_rope_index

# What `encode` reads from a batch (all PromptBatch fields but lengths, slot_positions and
# candidate_ids, which the others imply), plus pixel_values.
ENCODE_KEYS = (
    "input_ids",
    "attention_mask",
    "slot_index",
    "query_mask",
    "image_spans",
    "image_grid_thw",
    "candidate_mask",
    "candidate_image_spans",
    "candidate_image_grid_thw",
    "splice_ids",
    "splice_mask",
    "pixel_values",
)


@flax.struct.dataclass
class RerankInputs:
  """What the rollout engine and the learner decode from."""

  prompt_embeds: jax.Array  # [B, T, D]
  prompt_mask: jax.Array  # [B, T] bool
  prompt_positions: jax.Array  # [3, B, T] int32
  next_position: jax.Array  # [B] int32: position of the first generated token.
  splice_ids: jax.Array  # [B, K, Ls] int32
  splice_embeds: jax.Array  # [B, K, Ls, D]
  splice_mask: jax.Array  # [B, K, Ls] bool, real tokens first.
  splice_offsets: jax.Array  # [3, B, K, Ls] int32: position minus the block's start.
  splice_advance: jax.Array  # [B, K] int32: the token after the block is at start + advance.

  @classmethod
  def from_token_ids(cls, model: Qwen25VL, params: Any, input_ids, attention_mask,
                     pixel_values=None, image_grid_thw=None) -> RerankInputs:
    """A plain prompt (HF processor layout) with one empty, never-inserted block."""
    embeds = model.apply({"params": params}, input_ids, pixel_values, image_grid_thw,
                         method=Qwen25VL.embed)
    positions, next_position = get_rope_index(input_ids, attention_mask, image_grid_thw,
                                              config=model.config)
    return cls.from_embeds(embeds, attention_mask, positions, next_position)

  @classmethod
  def from_embeds(cls, embeds, mask, positions, next_position) -> RerankInputs:
    """A right-padded prompt given as embeddings `[B, T, D]`, with no candidate blocks."""
    b, _, d = embeds.shape
    return cls(
        prompt_embeds=embeds,
        prompt_mask=jnp.asarray(mask, bool),
        prompt_positions=positions,
        next_position=next_position,
        splice_ids=jnp.zeros((b, 1, 1), jnp.int32),
        splice_embeds=jnp.zeros((b, 1, 1, d), embeds.dtype),
        splice_mask=jnp.zeros((b, 1, 1), bool),
        splice_offsets=jnp.zeros((3, b, 1, 1), jnp.int32),
        splice_advance=jnp.zeros((b, 1), jnp.int32),
    )


def _pack_query(embeds: jax.Array, query_mask: jax.Array, size: int):
  """The query's tokens `[B, size, D]` (in prompt order) and their mask; size 0: all of T.

  The ICM uses no positions, so packing changes nothing but the cost of ATT2.
  """
  if not size:
    return embeds, query_mask
  if not isinstance(query_mask, jax.core.Tracer):
    longest = int(np.max(np.sum(np.asarray(query_mask), axis=-1)))
    if longest > size:
      raise ValueError(f"a query has {longest} tokens but compression.max_query_tokens="
                       f"{size}; raise it")
  order = jnp.argsort(~query_mask.astype(bool), axis=-1, stable=True)[:, :size]
  packed = jnp.take_along_axis(embeds, order[..., None], axis=1)
  return packed, jnp.take_along_axis(query_mask.astype(bool), order, axis=1)


class Reranker(nn.Module):
  """Qwen2.5-VL (`backbone`) with the information compression module (`icm`)."""

  config: ModelConfig
  compression: CompressionConfig = CompressionConfig()

  def setup(self):
    self.backbone = Qwen25VL(self.config)
    if self.compression.enabled:
      self.icm = InformationCompression(self.config, self.compression)

  def encode(self, batch: Mapping[str, jax.Array]) -> RerankInputs:
    """Prompt embeddings, positions and splice blocks for a batch of `ENCODE_KEYS`.

    Shapes: prompt `[B, T]`, K candidates of `Lc` tokens, splice blocks `Ls = Lc + 2`,
    `pixel_values [N, C*T*P*P]` (rows past the images are padding).
    """
    cfg = self.config
    missing = sorted(set(ENCODE_KEYS) - set(batch))
    if missing:
      raise ValueError(f"Reranker.encode: batch lacks {missing}; expected keys {ENCODE_KEYS}")
    input_ids, splice_ids = batch["input_ids"], batch["splice_ids"]
    b, k, ls = splice_ids.shape
    if ls != batch["candidate_mask"].shape[-1] + 2:
      raise ValueError(f"splice_ids {splice_ids.shape} must be the candidate blocks "
                       f"{batch['candidate_mask'].shape} plus <|cand_start|> and <|cand_end|>")

    # 1. Every image once; image slot (b, s) owns features first[b, s] onwards.
    grids = jnp.concatenate(
        [batch["image_grid_thw"][:, :1], batch["candidate_image_grid_thw"]], axis=1
    ).astype(jnp.int32)  # [B, 1 + K, 3]
    features = self.backbone.visual(batch["pixel_values"], grids.reshape(-1, 3))
    per_image = (jnp.prod(grids, axis=-1) // cfg.vision.spatial_merge_size**2).reshape(-1)
    first = (jnp.cumsum(per_image) - per_image).reshape(b, 1 + k)

    # 2. Splice blocks; T_c is what lies between <|cand_start|> and <|cand_end|>.
    spans = batch["candidate_image_spans"]
    splice_embeds = _place_features(
        self.backbone.embed(splice_ids.reshape(b * k, ls)).reshape(b, k, ls, -1),
        spans[..., :1] + 1, spans[..., 1:], first[:, 1:, None], features)
    candidates = splice_embeds[:, :, 1:-1]

    # 3. The prompt, with t_con / t_rel at their slots.
    spans = batch["image_spans"]
    embeds = _place_features(self.backbone.embed(input_ids), spans[..., 0], spans[..., 1],
                             first, features)
    embeds = constrain(embeds, axes.ACTIVATION_EMBED)
    if self.compression.enabled:
      query, query_mask = _pack_query(embeds, batch["query_mask"],
                                      self.compression.max_query_tokens)
      compressed = self.icm(candidates, batch["candidate_mask"], query, query_mask)
      slot = batch["slot_index"]
      at_slot = jnp.take_along_axis(compressed.reshape(b, 2 * k, -1),
                                    jnp.maximum(slot, 0)[..., None], axis=1)
      embeds = jnp.where((slot >= 0)[..., None], at_slot.astype(embeds.dtype), embeds)

    # 4. Positions; grids of the images the prompt shows, in order of appearance.
    prompt_grids = jnp.where(spans[..., 1:] > 0, grids, 0).reshape(-1, 3)
    positions, next_position = get_rope_index(
        input_ids, batch["attention_mask"], prompt_grids, config=cfg)
    splice_mask = batch["splice_mask"].astype(bool)
    offsets, advance = get_rope_index(
        splice_ids.reshape(b * k, ls), splice_mask.reshape(b * k, ls),
        batch["candidate_image_grid_thw"].reshape(b * k, 3), config=cfg)
    return RerankInputs(
        prompt_embeds=embeds,
        prompt_mask=batch["attention_mask"].astype(bool),
        prompt_positions=positions,
        next_position=next_position,
        splice_ids=splice_ids,
        splice_embeds=splice_embeds,
        splice_mask=splice_mask,
        splice_offsets=offsets.reshape(3, b, k, ls),
        splice_advance=advance.reshape(b, k),
    )

  def prompt_logits(self, inputs: RerankInputs) -> jax.Array:
    """Logits `[B, T, vocab]` of a cache-free forward over the prompt."""
    return self.backbone.forward_embeds(
        inputs.prompt_embeds, inputs.prompt_positions, inputs.prompt_mask)

  def __call__(self, batch: Mapping[str, jax.Array]) -> jax.Array:
    """`prompt_logits(encode(batch))`."""
    return self.prompt_logits(self.encode(batch))


def encode_batch(model: Reranker, params: Any, batch: Mapping[str, Any]) -> RerankInputs:
  """`Reranker.encode` of a pipeline batch (its other fields are ignored)."""
  return model.apply({"params": params}, {k: batch[k] for k in ENCODE_KEYS},
                     method=Reranker.encode)


def _place_features(
    embeds: jax.Array, starts: jax.Array, counts: jax.Array, first: jax.Array,
    features: jax.Array,
) -> jax.Array:
  """Writes image features over the image-pad runs of token embeddings.

  Args:
    embeds: `[..., L, D]` token embeddings.
    starts, counts: `[..., S]` image runs (count 0: none), positions along L.
    first: `[..., S]` the row of `features` holding each run's first token.
    features: `[F, D]` merged image features of the whole batch.
  """
  rel = jnp.arange(embeds.shape[-2])[:, None] - starts[..., None, :]  # [..., L, S]
  inside = (rel >= 0) & (rel < counts[..., None, :])
  index = jnp.sum(jnp.where(inside, first[..., None, :] + rel, 0), axis=-1)
  gathered = features[jnp.clip(index, 0, features.shape[0] - 1)].astype(embeds.dtype)
  return jnp.where(jnp.any(inside, axis=-1)[..., None], gathered, embeds)


def batch_from_prompts(
    prompt_batch: PromptBatch,
    pixel_values: np.ndarray,
    *,
    num_patches: int | None = None,
    merge_size: int = 2,
    compression: CompressionConfig | None = None,
) -> dict[str, np.ndarray]:
  """The `ENCODE_KEYS` arrays of a prompt batch and its images.

  Args:
    prompt_batch: from `retrv_jax.data.prompts.build_batch`.
    pixel_values: `[n, C*T*P*P]` patches of every image, ordered by (example, slot) with
      slot 0 the query and slot k the k-th candidate, absent images skipped.
    num_patches: pad pixel_values with zero rows to this many (a static bucket); None
      pads only up to one merge block when there is no image at all.
    merge_size: the vision merge size (rows come in blocks of merge_size**2).
    compression: if given, the prompt layout must match it (slots or full candidates).
  """
  grids = np.concatenate(
      [prompt_batch.image_grid_thw[:, :1], prompt_batch.candidate_image_grid_thw], axis=1)
  expected = int(np.prod(grids, axis=-1).sum())
  if pixel_values.ndim != 2 or pixel_values.shape[0] != expected:
    raise ValueError(f"pixel_values: expected [{expected}, patch_dim] (the patches of the "
                     f"query and candidate images), got {pixel_values.shape}")
  rows = max(expected, merge_size**2) if num_patches is None else num_patches
  if rows < expected or rows % merge_size**2:
    raise ValueError(f"num_patches={num_patches}: must be a multiple of {merge_size**2} and "
                     f"at least the {expected} patches of the batch")
  if compression is not None:
    _check_layout(prompt_batch, compression)
  pixels = np.zeros((rows, pixel_values.shape[1]), np.float32)
  pixels[:expected] = pixel_values
  out = {key: getattr(prompt_batch, key) for key in ENCODE_KEYS if key != "pixel_values"}
  return {**out, "pixel_values": pixels}


def _check_layout(prompt_batch: PromptBatch, icm: CompressionConfig) -> None:
  """The prompt's candidate slots are the ones the compression config fills."""
  present = tuple(bool((prompt_batch.slot_positions[..., s] >= 0).any()) for s in (0, 1))
  wanted = (icm.enabled and icm.use_content, icm.enabled and icm.use_relation)
  if present != wanted:
    raise ValueError(
        f"prompt batch has (con, rel) slots {present} but compression {icm} fills {wanted}; "
        f"build it with PromptConfig(compress_candidates={icm.enabled}, "
        f"candidate_slots={icm.candidate_slots})"
    )


def init_params(
    config: ModelConfig,
    compression_config: CompressionConfig,
    rng: jax.Array,
    *,
    backbone_params: Any = None,
) -> dict:
  """`{"backbone", "icm"}` params: the given (or random) backbone and a fresh ICM.

  The ICM's output scale is calibrated to the backbone's token embeddings.
  """
  backbone_rng, icm_rng = jax.random.split(rng)
  if backbone_params is None:
    backbone_params = qwen2_5_vl.init_params(config, backbone_rng)
  params = {"backbone": backbone_params}
  if compression_config.enabled:
    embedding = backbone_params["language_model"]["embed_tokens"]["embedding"]
    params["icm"] = compression.init_params(config, compression_config, icm_rng, embedding)
  return params


def abstract_params(config: ModelConfig, compression_config: CompressionConfig) -> dict:
  """Param shapes with logical-axis boxes (for shardings), nothing allocated."""
  params = {"backbone": qwen2_5_vl.abstract_params(config)}
  if compression_config.enabled:
    params["icm"] = compression.abstract_params(config, compression_config)
  return params
