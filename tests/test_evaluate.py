"""Evaluation: the Recall@k rule, batched answer log-likelihoods against a naive forward per
candidate, the metrics of forced responses on a sharded batch, results.json, the CLI."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from tiny_bench import make_bench

from retrv_jax import evaluate, parallel
from retrv_jax.data import prompts
from retrv_jax.data.pipeline import PipelineConfig, make_iterator
from retrv_jax.data.tokenizer import load_tokenizer
from retrv_jax.models import reranker
from retrv_jax.models.compression import CompressionConfig
from retrv_jax.models.config import tiny
from retrv_jax.models.qwen2_5_vl import Qwen25VL
from retrv_jax.rl import learner, sampler
from retrv_jax.rl.rewards import FormatTokens

K = 4
BUDGET = 12
ROWS = 8  # 6 test examples (3 per task) and 2 padding rows.
ANSWER = load_tokenizer().answer_start
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
  root = make_bench(tmp_path_factory, k=K, num_train=1, num_val=1, num_test=3)
  return root


@pytest.fixture(scope="module")
def cli(bench, tmp_path_factory):
  """The command line on the benchmark with random init, started early in the background:
  its compiles overlap the in-process tests'."""
  workdir = tmp_path_factory.mktemp("cli") / "work"
  cmd = [sys.executable, "-m", "retrv_jax.evaluate", "--config=configs/eval.py",
         "--config.init_checkpoint=", f"--config.workdir={workdir}",
         f"--config.data.data_dir={bench}", f"--config.data.num_candidates={K}",
         "--config.model.num_layers=2", "--config.eval.max_new_tokens=6",
         "--config.eval.batch_size=5", "--name=smoke"]
  # One device: XLA's CPU collectives can deadlock when two fake devices run a program
  # while other processes load the machine (sharded evaluation is tested in-process).
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  yield proc, workdir
  if proc.poll() is None:
    proc.kill()
    proc.communicate()


@pytest.fixture(scope="module")
def env(bench, cli):
  tok = load_tokenizer()
  data = PipelineConfig(data_dir=bench, source="mbeir", batch_size=ROWS, num_candidates=K,
                        split="test", prompt_buckets=(256,), max_candidate_tokens=32)
  batch = next(make_iterator("eval", data, tok))
  assert batch["valid"].tolist() == [True] * 6 + [False] * 2
  model_config = tiny().replace(num_layers=2)
  icm = CompressionConfig()
  params = jax.jit(lambda key: reranker.init_params(model_config, icm, key))(jax.random.key(0))
  digits = FormatTokens.from_tokenizer(tok)
  sampling = sampler.SamplingParams(
      max_new_tokens=BUDGET, temperature=0.0, stop_token_ids=(tok.eos,),
      inspect_start_id=tok.inspect_start, inspect_end_id=tok.inspect_end,
      digit_ids=digits.digit_ids, digit_values=digits.digit_values,
      digit_lengths=digits.digit_lengths, max_inspections=2)
  responses = _responses(tok, batch["gt_index"])
  forced = np.full((ROWS, BUDGET), -1, np.int32)
  for r, ids in enumerate(responses):
    forced[r, :len(ids)] = ids
  return dict(tok=tok, batch=batch, model=reranker.Reranker(model_config, icm), params=params,
              sampling=sampling, responses=responses, forced=forced)


def _responses(tok, gt):
  """Forced responses of the 6 valid rows, one case each."""
  d = lambda i: tok.encode(str(i), allow_special=False)
  text = tok.encode("red", allow_special=False)[:1]
  wrong = lambda g: (g + 1) % K + 1  # 1-based, never g + 1.
  ist, ien = tok.inspect_start, tok.inspect_end
  think, end_think, ans, end_ans, eos = (tok.think_start, tok.think_end, tok.answer_start,
                                         tok.answer_end, tok.eos)
  return [
      [think, ist, *d(3), ien, end_think, ans, *d(gt[0] + 1), end_ans, eos],  # right
      [think, end_think, ans, ist, *d(1), ien, *d(wrong(gt[1])), end_ans, eos],  # splice late
      [think, ist, *d(2), ien, *text, eos],  # stops without an answer
      text * BUDGET,  # runs out of budget without an answer
      [ans, *d(gt[4] + 1), end_ans, eos],  # right but malformed
      [think, end_think, ans, *d(wrong(gt[5])), end_ans, eos],  # wrong, well formed
  ]


def test_ranking_and_recall_rule():
  scores = np.array([[0.5, 0.9, 0.1, 0.9],
                     [-1.0, -1.0, -2.0, -0.5],
                     [0.0, 0.0, 0.0, 0.0],
                     [3.0, 2.0, 1.0, 0.0]])
  chosen = np.array([2, -1, 3, 0])
  np.testing.assert_array_equal(evaluate.ranking(chosen, scores),
                                [[2, 1, 3, 0], [3, 0, 1, 2], [3, 0, 1, 2], [0, 1, 2, 3]])
  hits = evaluate.recall_hits(chosen, scores, np.array([1, 3, 0, -1]), ks=(1, 2, 3))
  # Row 1 has no answer: its likelihood ranking puts the positive first, yet R@1 misses.
  np.testing.assert_array_equal(hits[1], [False, False, False, False])
  np.testing.assert_array_equal(hits[2], [True, True, True, False])
  np.testing.assert_array_equal(hits[3], [True, True, True, False])
  hits = evaluate.recall_hits(chosen, scores, np.array([2, 0, 1, 0]), ks=(1,))
  np.testing.assert_array_equal(hits[1], [True, False, False, True])


def _naive_prefix(ids, length, stop):
  """The scored prefix by the rule, in plain Python."""
  ids = list(ids[:length])
  if ANSWER in ids:
    return ids[:ids.index(ANSWER) + 1]
  cut = length - (ids[-1] == stop)
  return ids[:min(cut, BUDGET - 1)] + [ANSWER]


def _mesh():
  mesh = parallel.create_mesh({"data": 1, "fsdp": -1, "tensor": 1})
  assert mesh.shape["fsdp"] == ROWS
  return mesh


def test_answer_logprobs_equal_naive_forward_per_candidate(env):
  tok, model, params, sampling = env["tok"], env["model"], env["params"], env["sampling"]
  batch = {k: env["batch"][k] for k in reranker.ENCODE_KEYS + ("valid", "gt_index", "task_id")}
  backbone = Qwen25VL(model.config)
  conts, cont_mask = evaluate.continuation_ids(tok, K)
  mesh = _mesh()
  with jax.set_mesh(mesh), parallel.with_rules(parallel.DEFAULT_RULES):
    # The call `evaluate` makes (candidate_chunk given): the next test reuses its compile.
    out = evaluate.eval_step(model, params, parallel.shard_batch(batch, mesh), conts, cont_mask,
                             env["forced"], sampling=sampling, answer_start_id=tok.answer_start,
                             candidate_chunk=0)
  traj, scores = jax.device_get(out["trajectory"]), np.asarray(out["scores"])
  tokens, lengths = traj.tokens, traj.lengths
  steps, cands = traj.insert_step, traj.insert_candidate
  np.testing.assert_array_equal(lengths[:6], [len(r) for r in env["responses"]])
  np.testing.assert_array_equal(cands[:3, 0], [2, 0, 1])

  @jax.jit
  def naive_and_chunked(params, batch, traj, naive_traj):
    """Log-probs of a full forward, and the chunked batched scores of the sampled rows."""
    inputs = model.apply({"params": params}, batch, method=reranker.Reranker.encode)
    logp, _ = learner.token_logprobs(backbone, params["backbone"], inputs, naive_traj,
                                     group_size=1, temperature=1.0)
    chunked = evaluate.answer_logprobs(backbone, params["backbone"], inputs, traj, conts,
                                       cont_mask, answer_start_id=tok.answer_start,
                                       stop_ids=(tok.eos,), candidate_chunk=3)
    return logp, chunked

  prefixes = [_naive_prefix(tokens[r], lengths[r], tok.eos) for r in range(ROWS)]
  assert [len(p) for p in prefixes[:4]] == [6, 3, 6, BUDGET]  # <answer>; cut; cut; budget.
  keep = (cands >= 0) & (steps < np.array([len(p) - 1 for p in prefixes])[:, None])
  assert keep[0, 0] and not keep[1, 0]  # The splice after <answer> is not in the prefix.
  encode_batch = {k: batch[k] for k in reranker.ENCODE_KEYS}
  naive = np.zeros((ROWS, K))
  for i in range(K):
    full = [p + conts[i][cont_mask[i]].tolist() for p in prefixes]
    ids = np.zeros((ROWS, BUDGET + conts.shape[1]), np.int32)
    for r, row in enumerate(full):
      ids[r, :len(row)] = row
    naive_traj = traj.replace(
        tokens=ids, lengths=np.array([len(f) for f in full], np.int32),
        logprobs=np.zeros(ids.shape, np.float32), insert_step=np.where(keep, steps, -1),
        insert_candidate=np.where(keep, cands, -1))
    logp, chunked = jax.device_get(naive_and_chunked(params, encode_batch, traj, naive_traj))
    for r, (p, f) in enumerate(zip(prefixes, full, strict=True)):
      naive[r, i] = logp[r, len(p):len(f)].sum()
  np.testing.assert_allclose(scores, naive, atol=1e-4)
  np.testing.assert_allclose(chunked, scores, atol=1e-4)
  assert np.ptp(naive[:6], axis=1).min() > 1e-3  # Candidates are told apart.


def test_evaluate_metrics_match_parsed_responses(env):
  tok, batch, responses = env["tok"], env["batch"], env["responses"]

  def batches():
    yield batch
    yield batch
    raise AssertionError("read a batch past num_examples")

  got = evaluate.evaluate(env["model"], env["params"], batches(), tok, env["sampling"],
                          num_examples=8, mesh=_mesh(), forced_tokens=env["forced"])
  rows = list(range(6)) + [0, 1]  # The second batch counts up to 8 examples.
  parsed = [prompts.parse_response_text(tok.decode(responses[r]), num_candidates=K,
                                        max_inspections=2) for r in rows]
  gt, task = batch["gt_index"][rows], batch["task_id"][rows]
  hit = np.array([p.answer_index == g + 1 for p, g in zip(parsed, gt, strict=True)])
  assert hit.tolist() == [True, False, False, False, True, False, True, False]
  assert got["recall@1"] == pytest.approx(hit.mean())
  for t in np.unique(task):
    assert got[f"recall@1/task{t}"] == pytest.approx(hit[task == t].mean())
  assert got["recall@5"] == 1.0 and (gt >= 0).all()  # K = 4: every candidate is in the top 5.
  assert got["format_error_rate"] == pytest.approx(1 - np.mean([p.well_formed for p in parsed]))
  assert got["mean_response_tokens"] == pytest.approx(np.mean([len(responses[r]) for r in rows]))
  assert got["mean_inspections"] == pytest.approx(5 / 8)  # Rows 0, 1, 2 splice one each.
  assert got["num_examples"] == 8


def test_evaluate_rejects_sampling():
  with pytest.raises(ValueError, match="temperature must be 0"):
    evaluate.evaluate(None, None, [], None, sampler.SamplingParams(temperature=1.0))


def test_write_results_merges_atomically(tmp_path, monkeypatch):
  path = evaluate.write_results(str(tmp_path), "untrained", {"recall@1": np.float32(0.25)})
  evaluate.write_results(str(tmp_path), "sft", {"recall@1": 0.5})
  evaluate.write_results(str(tmp_path), "untrained", {"recall@1": 0.75})
  with open(path) as f:
    assert json.load(f) == {"untrained": {"recall@1": 0.75}, "sft": {"recall@1": 0.5}}
  assert sorted(os.listdir(tmp_path)) == ["results.json"]

  def fail(*args):
    raise OSError("disk full")

  monkeypatch.setattr(os, "replace", fail)
  with pytest.raises(OSError, match="disk full"):
    evaluate.write_results(str(tmp_path), "grpo", {"recall@1": 1.0})
  with open(path) as f:
    assert "grpo" not in json.load(f)  # The old file is whole.
  monkeypatch.undo()
  with open(path, "w") as f:
    f.write("{not json")
  with pytest.raises(ValueError, match="results.json: not readable JSON"):
    evaluate.write_results(str(tmp_path), "grpo", {"recall@1": 1.0})


def test_command_line_writes_results(cli):
  proc, workdir = cli
  stdout, stderr = proc.communicate(timeout=300)
  assert proc.returncode == 0, stderr[-3000:]
  with open(workdir / "results.json") as f:
    metrics = json.load(f)["smoke"]
  for key in ("recall@1", "recall@5", "mean_inspections", "format_error_rate",
              "recall@1/task0", "recall@1/task7"):
    assert 0 <= metrics[key] <= 3, key
  assert 0 < metrics["mean_response_tokens"] <= 6
  assert metrics["num_examples"] == 6
  assert "smoke ->" in stdout
