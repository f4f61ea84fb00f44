"""The embedded benchmark: determinism, schema, hard negatives, stage-I lists, reference CoTs."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from retrv_jax.data import mbeir, prompts, synthetic
from retrv_jax.data import scene as scene_lib

TINY = synthetic.BenchmarkConfig(num_train=8, num_val=3, num_test=4, k=6, image_size=48)
COT = re.compile(r"^<think>(?P<body>.*)</think><answer>(?P<answer>\d+)</answer>$", re.S)
INSPECT = re.compile(r"<inspection-index-start>(\d+)<inspection-index-end>")


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("bench") / "synth")
  synthetic.generate(root, TINY)
  return root


def _tree(root):
  out = {}
  for d, _, names in os.walk(root):
    for n in names:
      path = os.path.join(d, n)
      with open(path, "rb") as f:
        out[os.path.relpath(path, root)] = f.read()
  return out


def _scene(src):
  return scene_lib.Scene.from_json(json.loads(src)["scene"])


def _pairs(root):
  layout = mbeir.Layout(root)
  for split in mbeir.SPLITS:
    for dataset, task_id in layout.pairs(split):
      pool = mbeir.CandidatePool(layout.local_pool_file(dataset, task_id), image_root=root,
                                 verify_images="eager")
      queries, report = mbeir.read_queries(layout.query_file(dataset, task_id, split),
                                           image_root=root, pool=pool)
      topk, _ = mbeir.read_stage1(layout.stage1_file(dataset, task_id, split), pool=pool)
      assert report.num_skipped == 0
      yield split, task_id, pool, queries, topk


def test_same_seed_same_bytes_other_seed_differs(bench, tmp_path):
  again = str(tmp_path / "again")
  synthetic.generate(again, TINY)
  assert _tree(again) == _tree(bench)
  other = str(tmp_path / "other")
  synthetic.generate(other, synthetic.BenchmarkConfig(**{**TINY.__dict__, "seed": 1}))
  a, b = _tree(bench), _tree(other)
  name = "query/train/mbeir_synthcoco_task0_train.jsonl"
  assert a[name] != b[name]


def test_layout_and_counts(bench):
  layout = mbeir.Layout(bench)
  expected = sorted((t.dataset, t.task_id) for t in synthetic.TASKS)
  for split in mbeir.SPLITS:
    assert layout.pairs(split) == expected
    assert os.path.isfile(layout.global_pool_file(split))
  for dataset, task_id in expected:
    queries, _ = mbeir.read_queries(layout.query_file(dataset, task_id, "test"),
                                    image_root=bench)
    qrels, _ = mbeir.read_qrels(layout.qrels_file(dataset, task_id, "test"))
    assert len(queries) == TINY.num_test
    assert [(r.qid, r.did, r.relevance, r.task_id) for r in qrels] == [
        (q.qid, q.pos_cand_list[0], 1, task_id) for q in queries]
  instructions, _ = mbeir.read_instructions(layout.instructions_file())
  assert {(k[1], k[2]) for k in instructions} == {
      (t.query_modality, t.cand_modality) for t in synthetic.TASKS}


def test_every_record_validates_and_stage1_holds_the_positive(bench):
  seen, test_cands = 0, set()
  for split, _, pool, queries, topk in _pairs(bench):
    for q in queries:
      cands = topk[q.qid].cand_list
      assert len(cands) == TINY.k and len(set(cands)) == TINY.k
      assert q.pos_cand_list[0] in cands and set(q.neg_cand_list) <= set(cands)
      assert all(c in pool for c in cands)
      seen += 1
      if split == "test":
        test_cands.update(cands)
  assert seen == 5 * (TINY.num_train + TINY.num_val + TINY.num_test)
  union = mbeir.CandidatePool(mbeir.Layout(bench).global_pool_file("test"), image_root=bench,
                              verify_images="eager")
  assert test_cands and all(d in union for d in test_cands)


def test_hard_negatives_differ_in_exactly_one_attribute(bench):
  num_hard = 0
  for _, task_id, pool, queries, topk in _pairs(bench):
    for q in queries:
      target = scene_lib.Scene.from_json(json.loads(q.src_content)["target"])
      positive = _scene(pool[q.pos_cand_list[0]].src_content)
      assert scene_lib.distance(target, positive) == 0
      if task_id == 7:  # The edit turns the query's reference scene into the target.
        edit = scene_lib.Edit(**json.loads(q.src_content)["edit"])
        assert scene_lib.apply_edit(_scene(q.src_content), edit).key() == target.key()
      for did in q.neg_cand_list:
        assert scene_lib.distance(positive, _scene(pool[did].src_content)) == 1
        num_hard += 1
      easy = set(topk[q.qid].cand_list) - set(q.neg_cand_list) - set(q.pos_cand_list)
      for did in easy:
        assert scene_lib.distance(positive, _scene(pool[did].src_content)) >= 2
  assert num_hard > 0


def test_reference_cot_is_well_formed(bench):
  inspected_any = 0
  for split, _, _, queries, topk in _pairs(bench):
    for q in queries:
      if split != "train":
        assert q.reference_cot is None
        continue
      cands = topk[q.qid].cand_list
      gt = cands.index(q.pos_cand_list[0]) + 1
      m = COT.match(q.reference_cot)
      assert m, q.reference_cot
      assert int(m["answer"]) == gt
      assert m["body"].count("<think>") == 0 and m["body"].count("<answer>") == 0
      inspected = [int(i) for i in INSPECT.findall(m["body"])]
      hard = sorted(cands.index(d) + 1 for d in q.neg_cand_list)
      assert len(inspected) <= TINY.max_inspections
      assert len(set(inspected)) == len(inspected) and all(1 <= i <= TINY.k for i in inspected)
      assert inspected == (sorted([gt] + hard) if hard else [])
      for label in inspected:
        assert f"<inspection-index-end>Candidate {label} " in m["body"]
      parsed = prompts.parse_response_text(q.reference_cot, num_candidates=TINY.k,
                                           max_inspections=TINY.max_inspections)
      assert parsed.well_formed and parsed.answer_index == gt, parsed.error
      assert list(parsed.inspected_indices) == inspected
      inspected_any += bool(inspected)
  assert inspected_any > 0


def test_relations_and_descriptions(bench):
  for _, _, pool, queries, topk in _pairs(bench):
    for q in queries:
      t = topk[q.qid]
      for did, relation in zip(t.cand_list, t.relations, strict=True):
        if did in q.pos_cand_list:
          assert relation == "matches the target in every detail"
        elif did in q.neg_cand_list:
          assert relation.startswith("matches the target except that ")
        else:
          assert relation.startswith("does not match the target")
        c = pool[did]
        assert c.description == _scene(c.src_content).caption()


def test_corpus_text_covers_every_kind_with_a_small_vocabulary(bench):
  texts = list(synthetic.iter_corpus_text(bench))
  assert any(t.startswith("<think>") for t in texts)
  assert any(t.startswith("the same scene with") for t in texts)
  assert any(t.startswith("Find the image") for t in texts)
  assert any(t.startswith("matches the target except") for t in texts)
  words = {w for t in texts for w in re.findall(r"[a-z]+", t.lower())}
  assert len(words) < 150, sorted(words)


def test_scene_edits_and_text():
  rng = np.random.default_rng(0)
  spec = scene_lib.SceneSpec(num_objects=(3,))
  for _ in range(50):
    s = scene_lib.sample_scene(rng, spec)
    edit = scene_lib.random_edit(rng, s, spec)
    edited = scene_lib.apply_edit(s, edit)
    assert scene_lib.distance(s, edited) == 1
    assert len({o.look for o in edited.objects}) == 3  # Every object stays nameable.
    (diff,) = scene_lib.differences(s, edited)
    sentence = scene_lib.describe_difference(s, diff)
    assert edit.new in sentence and edit.old in sentence
  a = scene_lib.render(s, 48, np.random.default_rng(1))
  b = scene_lib.render(s, 48, np.random.default_rng(2))
  assert a.size == (48, 48) and a.tobytes() != b.tobytes()


def test_config_is_validated():
  with pytest.raises(ValueError, match="tasks"):
    synthetic.BenchmarkConfig(tasks=(5,))
  with pytest.raises(ValueError, match="num_objects"):
    scene_lib.SceneSpec(num_objects=(0,))


def test_cli_writes_and_refuses_to_overwrite(tmp_path):
  out = tmp_path / "cli"
  cmd = [sys.executable, "-m", "retrv_jax.data.synthetic", f"--out={out}", "--num_train=2",
         "--num_val=1", "--num_test=1", "--k=4", "--tasks=0,7", "--num_objects=2"]
  done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr
  assert mbeir.Layout(str(out)).pairs("train") == [("synthcirr", 7), ("synthcoco", 0)]
  again = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
  assert again.returncode != 0 and "exists" in again.stderr
