"""End to end on the embedded benchmark: pipeline batch -> re-ranker encode (ICM) ->
rollout with inspections -> learner log-probs through encode equal the sampler's."""

import jax
import numpy as np
import pytest
from tiny_bench import make_bench

from retrv_jax.data.pipeline import PipelineConfig, make_iterator, split_host_fields
from retrv_jax.data.tokenizer import load_tokenizer
from retrv_jax.models import reranker
from retrv_jax.models.compression import CompressionConfig
from retrv_jax.models.config import tiny
from retrv_jax.models.qwen2_5_vl import Qwen25VL
from retrv_jax.rl import learner, sampler
from retrv_jax.rl.rewards import FormatTokens

K = 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = make_bench(tmp_path_factory, k=K, num_train=2, num_val=1, num_test=1)
  tok = load_tokenizer()
  config = PipelineConfig(data_dir=root, source="mbeir", batch_size=2, num_candidates=K,
                          prompt_buckets=(256,), max_candidate_tokens=32)
  batch, _ = split_host_fields(next(make_iterator("grpo", config, tok)))
  model_config = tiny().replace(num_layers=2)
  rerank = reranker.Reranker(model_config, CompressionConfig())
  params = reranker.init_params(model_config, CompressionConfig(), jax.random.key(0))
  inputs_batch = {key: batch[key] for key in reranker.ENCODE_KEYS}
  return tok, rerank, params, inputs_batch


def test_learner_through_encode_equals_sampler_with_inspections(setup):
  tok, rerank, params, batch = setup
  encode = jax.jit(lambda p, b: rerank.apply({"params": p}, b, method=rerank.encode))
  inputs = encode(params, batch)
  digits = FormatTokens.from_tokenizer(tok)
  sampling = sampler.SamplingParams(
      max_new_tokens=16, temperature=1.0, stop_token_ids=(tok.eos,),
      inspect_start_id=tok.inspect_start, inspect_end_id=tok.inspect_end,
      digit_ids=digits.digit_ids, digit_values=digits.digit_values,
      digit_lengths=digits.digit_lengths, max_inspections=2)
  opening = [tok.think_start, tok.inspect_start, tok.digit_ids[3], tok.inspect_end,
             tok.inspect_start, tok.digit_ids[1], tok.inspect_end]
  forced = np.tile(np.array(opening, np.int32), (4, 1))
  backbone = Qwen25VL(rerank.config)
  traj = sampler.rollout(backbone, params["backbone"], inputs, jax.random.key(1),
                         sampling=sampling, group_size=2, forced_tokens=forced)
  np.testing.assert_array_equal(np.asarray(traj.insert_candidate), [[2, 0]] * 4)

  def learner_logprobs(p):
    return learner.token_logprobs(backbone, p["backbone"], encode(p, batch), traj,
                                  group_size=2, chunk_size=8)

  logp, mask = jax.jit(learner_logprobs)(params)
  assert np.asarray(mask).sum() == np.asarray(traj.lengths).sum()
  np.testing.assert_allclose(np.asarray(logp), np.asarray(traj.logprobs), atol=1e-4)
