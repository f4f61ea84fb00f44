"""The teacher: its prompt, the keep/reject rule, resumable output, the CoTs reaching SFT
(`PipelineConfig.cot_file`), and the command end to end on a random tiny model."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from hf_models import save_hf_model, tiny_config
from test_tokenizer import build_qwen_like_tokenizer
from tiny_bench import make_bench

from retrv_jax import config as config_lib
from retrv_jax import parallel, teacher
from retrv_jax.data import pipeline, prompts
from retrv_jax.data.tokenizer import RETRV_TOKENS, add_retrv_tokens, load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K = 4


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
  root = make_bench(tmp_path_factory, k=K, num_train=3, num_val=1, num_test=1)
  return root


@pytest.fixture(scope="module")
def tok():
  return load_tokenizer()


def data_config(bench, **changes):
  values = dict(data_dir=bench, source="mbeir", split="train", batch_size=2, num_candidates=K,
                prompt_buckets=(512,), max_candidate_tokens=32, compress_candidates=False,
                teacher_prompt=True, max_response_tokens=256)
  return pipeline.PipelineConfig(**{**values, **changes})


def teacher_batches(bench, tok, **changes):
  return list(pipeline.make_iterator("eval", data_config(bench, **changes), tok))


def response(answer, inspect=None, end=prompts.RESPONSE_END):
  verification = (f"{prompts.inspection_tag(inspect)}Candidate {inspect} is close."
                  if inspect else "Nothing is close.")
  return prompts.format_response(target="a red circle", elimination="Candidate 1 is blue.",
                                 verification=verification, answer=answer) + end


def is_subsequence(part, whole):
  n = len(part)
  return any(list(whole[i:i + n]) == list(part) for i in range(len(whole) - n + 1))


def test_teacher_prompt_adds_the_instruction_to_the_full_candidate_prompt(bench, tok):
  with_teacher = teacher_batches(bench, tok)[0]
  plain = teacher_batches(bench, tok, teacher_prompt=False)[0]
  suffix = len(tok.encode("<|im_end|>\n<|im_start|>assistant\n"))
  for b in range(2):
    answer = int(with_teacher["gt_index"][b]) + 1
    instruction = tok.encode(f"\n{prompts.teacher_instruction(answer)}")
    ids = with_teacher["input_ids"][b, : with_teacher["lengths"][b]].tolist()
    base = plain["input_ids"][b, : plain["lengths"][b]].tolist()
    assert ids == base[:-suffix] + instruction + base[-suffix:]
    assert f"The correct candidate is {answer}." in tok.decode(ids)
    assert tok.cand_con not in ids and tok.cand_rel not in ids
    for k in range(K):
      block = with_teacher["candidate_ids"][b, k][with_teacher["candidate_mask"][b, k]]
      assert len(block) > 0 and is_subsequence(block.tolist(), ids)


def test_judge_keeps_only_well_formed_right_answers():
  kw = dict(num_candidates=K, max_inspections=2)
  kept = teacher.judge(response(3, inspect=2), 3, **kw)
  assert kept.reason is None and kept.num_inspections == 1
  assert kept.cot == response(3, inspect=2, end="") and prompts.RESPONSE_END not in kept.cot
  assert teacher.judge(response(2), 3, **kw).reason == "wrong_answer"
  assert teacher.judge("<answer>3</answer>", 3, **kw).reason == "missing_think"
  assert teacher.judge(response(3)[:40], 3, **kw).reason == "unclosed_think"
  assert teacher.judge(response(5), 5, **kw).reason == "answer_out_of_range"
  too_many = response(3, inspect=1).replace("</think>", "".join(
      prompts.inspection_tag(i) for i in (2, 3)) + "</think>")
  assert teacher.judge(too_many, 3, **kw).reason == "too_many_inspections"

  texts = ["garbage", response(1), response(3, inspect=3), response(3)]
  chosen, judged = teacher.choose(texts, 3, **kw)
  assert chosen == judged[2] and chosen.num_inspections == 1
  assert [j.reason for j in judged] == ["text_before_think", "wrong_answer", None, None]
  chosen, judged = teacher.choose(texts, 3, **kw, fits=lambda cot: "inspection" not in cot)
  assert chosen == judged[3] and judged[2].reason == "too_long"
  assert teacher.choose(texts[:2], 3, **kw)[0] is None


class FakeTeacher:
  """Answers each row [malformed, right with one inspection]; wrong twice for the qids in
  `wrong`. `batches` are the ones `label_batches` reads (a row's qid is a host field)."""

  def __init__(self, batches, wrong=()):
    self.batches, self.wrong, self.calls = batches, set(wrong), []

  def __call__(self, arrays, number):
    self.calls.append(number)
    out = []
    for qid, gt in zip(self.batches[number]["qid"], arrays["gt_index"], strict=True):
      answer = int(gt) + 1
      if qid in self.wrong:
        out.append([response(answer % K + 1)] * 2)
      else:
        out.append(["<think>unfinished", response(answer, inspect=answer % K + 1)])
    return out


def label(fake, out, **kw):
  return teacher.label_batches(fake.batches, fake, teacher.Output(str(out)), num_candidates=K,
                               max_inspections=3, **kw)


def test_resume_skips_written_and_tried_qids_and_drops_a_cut_line(bench, tok, tmp_path):
  batches = teacher_batches(bench, tok)
  qids = [q for b in batches for q, v in zip(b["qid"], b["valid"], strict=True) if v]
  assert len(qids) == 6 and len(batches) == 3
  out = tmp_path / "cots.jsonl"
  first = json.dumps({"qid": qids[0], "reference_cot": "<think>old</think><answer>1</answer>"})
  out.write_text(f"{first}\n" + '{"qid": "' + qids[2] + '", "reference_co')  # Cut by a crash.
  (tmp_path / "cots.jsonl.tried").write_text(f"{qids[1]}\n")
  fake = FakeTeacher(batches, wrong=[qids[5]])
  counts = label(fake, out)
  assert fake.calls == [1, 2]  # Batch 0 holds only done qids (written, tried).
  assert (counts.kept, counts.rejected, counts.skipped) == (3, 1, 2)
  assert counts.samples == {"kept": 3, "unclosed_think": 3, "wrong_answer": 2}

  lines = out.read_text().splitlines()
  assert lines[0] == first
  rows = [json.loads(line) for line in lines]
  assert [r["qid"] for r in rows] == [qids[0], qids[2], qids[3], qids[4]]
  gt = {q: int(g) + 1 for b in batches for q, g in zip(b["qid"], b["gt_index"], strict=True)}
  for r in rows[1:]:
    assert set(r) == {"qid", "dataset", "task_id", "reference_cot", "num_inspections"}
    answer = gt[r["qid"]]
    assert r["reference_cot"] == response(answer, inspect=answer % K + 1, end="")
    assert r["num_inspections"] == 1 and r["task_id"] in (0, 7) and r["dataset"]
  assert (tmp_path / "cots.jsonl.tried").read_text().split() == [qids[1], qids[5]]

  fake = FakeTeacher(batches)
  again = label(fake, out)
  assert fake.calls == [] and again.skipped == 6 and again.kept == 0


def test_num_examples_stops_after_the_first_queries(bench, tok, tmp_path):
  fake = FakeTeacher(teacher_batches(bench, tok))
  counts = label(fake, tmp_path / "cots.jsonl", num_examples=3)
  assert counts.kept == 3 and fake.calls == [0, 1]
  assert len((tmp_path / "cots.jsonl").read_text().splitlines()) == 3


def test_written_cots_reach_the_sft_targets_through_cot_file(bench, tok, tmp_path):
  out = tmp_path / "cots.jsonl"
  fake = FakeTeacher(teacher_batches(bench, tok))
  label(fake, out, fits=teacher.sft_fit(tok, data_config(bench)))
  written = {r["qid"]: r for r in map(json.loads, out.read_text().splitlines())}
  assert len(written) == 6
  sft = data_config(bench, compress_candidates=True, teacher_prompt=False, cot_file=str(out),
                    shuffle=False, num_epochs=1)
  seen = set()
  for batch in pipeline.make_iterator("sft", sft, tok):
    for b, qid in enumerate(batch["qid"]):
      cot = written[qid]["reference_cot"]
      expected = tok.encode(cot + prompts.RESPONSE_END)
      n = int(batch["response_lengths"][b])
      assert batch["response_ids"][b, :n].tolist() == expected
      inspected = batch["insert_candidates"][b]
      assert np.sum(inspected >= 0) == written[qid]["num_inspections"] == 1
      seen.add(qid)
  assert seen == set(written)


def test_cot_file_replaces_reference_cots_by_qid_and_names_a_bad_line(bench, tmp_path):
  own = {r["qid"]: r["reference_cot"] for r in pipeline.read_source(data_config(bench))}
  qid, other = sorted(own)[:2]
  path = tmp_path / "cots.jsonl"
  path.write_text(json.dumps({"qid": qid, "reference_cot": "<think>x</think><answer>2</answer>",
                              "num_inspections": 0}) + "\n\n")
  records = {r["qid"]: r for r in pipeline.read_source(data_config(bench, cot_file=str(path)))}
  assert records[qid]["reference_cot"] == "<think>x</think><answer>2</answer>" != own[qid]
  assert records[other]["reference_cot"] == own[other] != ""

  good = json.dumps({"qid": qid, "reference_cot": "c"})
  cases = {
      '{"qid": "1:2", "reference_co': "not a JSON object",
      json.dumps({"qid": other}): "non-empty string 'reference_cot'",
      json.dumps(["1:2", "cot"]): "expected an object",
      good: "again \\(first on line 1\\)",
  }
  for line, message in cases.items():
    path.write_text(f"{good}\n{line}\n")
    with pytest.raises(ValueError, match=f"{path}:2: .*{message}"):
      pipeline.read_source(data_config(bench, cot_file=str(path)))


def test_text_markup_keeps_retrv_tokens_as_text_for_a_qwen_checkpoint(tmp_path):
  build_qwen_like_tokenizer(tmp_path)
  full, added = add_retrv_tokens(tmp_path)
  assert added == 10
  markup = teacher._TextMarkup(load_tokenizer(tmp_path), full)
  text = response(2, inspect=3)
  ids = markup.encode(text)
  assert not set(ids) & set(full.special_ids.values()) - {full.im_end}
  assert markup.decode(ids) == text
  kept = teacher.judge(markup.decode(ids), 2, num_candidates=K, max_inspections=3)
  assert kept.reason is None and kept.num_inspections == 1
  assert markup.cand_start == full.cand_start and markup.vocab_size == full.vocab_size


@pytest.fixture(scope="module")
def qwen_checkpoint(tmp_path_factory):
  """A random tiny Qwen2.5-VL in Hugging Face format whose tokenizer lacks our tokens."""
  path = tmp_path_factory.mktemp("qwen")
  build_qwen_like_tokenizer(path)
  own = load_tokenizer(path)
  ids = {name: own.token_to_id(f"<|{name}|>") for name in
         ("image_pad", "video_pad", "vision_start", "vision_end", "im_end", "endoftext")}
  save_hf_model(path, tiny_config(
      vocab_size=own.vocab_size + 16, max_position_embeddings=4096,
      image_token_id=ids["image_pad"], video_token_id=ids["video_pad"],
      vision_start_token_id=ids["vision_start"], vision_end_token_id=ids["vision_end"],
      bos_token_id=ids["endoftext"], eos_token_id=ids["im_end"], pad_token_id=ids["endoftext"]))
  return path


def test_a_hugging_face_checkpoint_reads_our_markup_as_text(bench, qwen_checkpoint, tmp_path):
  config = config_lib.sibling_config(os.path.join(ROOT, "configs", "base.py")).get_config()
  config.hf_checkpoint = str(qwen_checkpoint)
  config = teacher.teacher_config(config)
  mesh = parallel.create_mesh({"data": 1, "fsdp": -1, "tensor": 1})
  model, params, prompt_tok, sft_tok = teacher.load_teacher(config, mesh)
  assert model.config.vocab_size == load_tokenizer(qwen_checkpoint).vocab_size + 16
  assert not model.compression.enabled and set(params) == {"backbone"}
  assert sft_tok.token_to_id("<think>") is not None  # The SFT stage's tokenizer has them.
  batch = teacher_batches(bench, prompt_tok, prompt_buckets=(1024,))[0]
  retrv_ids = {sft_tok.token_to_id(t) for t in RETRV_TOKENS}
  prompt = batch["input_ids"][batch["attention_mask"]]
  assert not set(prompt.tolist()) & retrv_ids
  assert "<inspection-index-start>1<inspection-index-end> (for candidate 1)" in prompt_tok.decode(
      batch["input_ids"][0, : batch["lengths"][0]])
  assert (batch["splice_ids"][batch["splice_mask"]] == sft_tok.cand_start).any()


def test_command_runs_end_to_end_on_a_random_tiny_model(bench, tmp_path):
  out = tmp_path / "cots.jsonl"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  result = subprocess.run(
      [sys.executable, "-m", "retrv_jax.teacher", f"--config={ROOT}/configs/base.py",
       "--config.init_checkpoint=", "--config.model.num_layers=2",
       f"--config.data.data_dir={bench}", "--config.data.num_candidates=4",
       "--config.data.prompt_buckets=(512,)", f"--config.workdir={tmp_path}/wd",
       f"--out={out}", "--samples=2", "--max_new_tokens=4", "--num_examples=3",
       "--batch_size=2"],
      cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  # Four tokens cannot hold a whole response: every query is tried and rejected.
  assert "kept 0 of 3 queries tried (0.0%); 0 of 6 samples acceptable" in result.stdout
  assert len((tmp_path / "cots.jsonl.tried").read_text().split()) == 3
  assert out.read_text() == ""
