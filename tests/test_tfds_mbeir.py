"""tfds builder -> ArrayRecord -> grain: every example equals the reader's join of the files."""

import os
import subprocess
import sys

import numpy as np
import pytest

from retrv_jax.data import mbeir, synthetic, tfds_mbeir

TINY = synthetic.BenchmarkConfig(num_train=12, num_val=1, num_test=3, k=5, image_size=32)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("bench") / "synth")
  synthetic.generate(root, TINY)
  return root


def _file_bytes(root, rel):
  if rel is None:
    return b""
  with open(os.path.join(root, rel), "rb") as f:
    return f.read()


def _expected(root, split, pool_kind="local"):
  layout = mbeir.Layout(root)
  for dataset, task_id in layout.pairs(split):
    path = (layout.local_pool_file(dataset, task_id) if pool_kind == "local"
            else layout.global_pool_file(split))
    pool = mbeir.CandidatePool(path, image_root=root)
    yield from mbeir.iter_rerank_examples(layout, dataset, task_id, split, pool)


def test_build_then_grain_read_equals_reader(bench, tmp_path):
  data_dir = str(tmp_path / "tfds")
  built = tfds_mbeir.build(bench, data_dir)
  assert built == tfds_mbeir.dataset_dir(data_dir)
  hard_seen = False
  for split in mbeir.SPLITS:
    ds = tfds_mbeir.rerank_dataset(data_dir, split)
    expected = list(_expected(bench, split))
    assert len(ds) == len(expected) == 5 * TINY.num_queries(split)
    by_id = {(ds[i]["dataset"], ds[i]["qid"]): i for i in range(len(ds))}  # Random access.
    assert len(by_id) == len(expected)
    for ex in expected:
      got = ds[by_id[ex.dataset, ex.query.qid]]
      q, cands = ex.query, ex.candidates
      assert (got["qid"], got["dataset"], got["task_id"]) == (q.qid, ex.dataset, ex.task_id)
      assert got["query_modality"] == q.modality and got["query_text"] == (q.text or "")
      assert got["query_image"] == _file_bytes(bench, q.img_path)
      assert got["query_img_path"] == (q.img_path or "")
      assert got["cand_img_paths"] == [c.img_path or "" for c in cands]
      assert got["cand_dids"] == [c.did for c in cands]
      assert got["cand_modalities"] == [c.modality for c in cands]
      assert got["cand_texts"] == [c.text or "" for c in cands]
      assert got["cand_images"] == [_file_bytes(bench, c.img_path) for c in cands]
      assert got["cand_descriptions"] == [c.description for c in cands]
      assert got["cand_relations"] == list(ex.relations)
      np.testing.assert_allclose(got["cand_scores"], ex.scores, rtol=1e-6)
      assert got["cand_is_positive"].tolist() == [c.did in q.pos_cand_list for c in cands]
      assert got["gt_index"] == ex.gt_index and got["cand_is_positive"][ex.gt_index]
      assert got["cand_is_hard_negative"].tolist() == [c.did in q.neg_cand_list for c in cands]
      hard_seen = hard_seen or got["cand_is_hard_negative"].any()
      assert got["reference_cot"] == (q.reference_cot or "")
      assert bool(got["reference_cot"]) == (split == "train")
  assert hard_seen  # The embedded benchmark's queries have hard negatives.
  batch = next(iter(ds.shuffle(seed=0).batch(2, batch_fn=list)))
  assert len(batch) == 2 and {b["qid"] for b in batch} <= {e.query.qid for e in expected}


def test_custom_config_global_pool_pair_subset_no_image_bytes(bench, tmp_path):
  data_dir = str(tmp_path / "tfds")
  config = tfds_mbeir.MbeirRerankConfig(name="cirr_global", pool="global",
                                        pairs=("synthcirr:7",), splits=("test",),
                                        embed_images=False)
  tfds_mbeir.build(bench, data_dir, config)
  ds = tfds_mbeir.rerank_dataset(data_dir, "test", config="cirr_global")
  expected = {e.query.qid: e for e in _expected(bench, "test", "global")
              if e.dataset == "synthcirr"}
  assert sorted(ds[i]["qid"] for i in range(len(ds))) == sorted(expected)
  for i in range(len(ds)):
    got = ds[i]
    assert got["task_id"] == 7 and got["cand_images"] == [b""] * TINY.k
    assert got["cand_dids"] == [c.did for c in expected[got["qid"]].candidates]
  with pytest.raises(ValueError, match="split 'train' not built"):
    tfds_mbeir.rerank_dataset(data_dir, "train", config="cirr_global")


def test_missing_stage1_file_is_named(bench, tmp_path):
  config = tfds_mbeir.MbeirRerankConfig(name="no_stage1", stage1_dir="nowhere")
  with pytest.raises(FileNotFoundError, match="nowhere/train/mbeir_synthcirr_task7_train"):
    tfds_mbeir.build(bench, str(tmp_path / "tfds"), config)
  config = tfds_mbeir.MbeirRerankConfig(name="bad_pair", pairs=("synthcoco:9",))
  with pytest.raises(ValueError, match="synthcoco:9"):
    tfds_mbeir.build(bench, str(tmp_path / "tfds"), config)


def test_cli_builds(bench, tmp_path):
  data_dir = str(tmp_path / "tfds")
  cmd = [sys.executable, "-m", "retrv_jax.data.tfds_mbeir", f"--manual_dir={bench}",
         f"--data_dir={data_dir}", "--splits=val", "--pairs=synthcoco:3"]
  unnamed = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
  assert unnamed.returncode != 0 and "--name" in unnamed.stderr
  done = subprocess.run(cmd + ["--name=coco3"], capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr[-2000:]
  ds = tfds_mbeir.rerank_dataset(data_dir, "val", config="coco3")
  assert len(ds) == TINY.num_val and ds[0]["task_id"] == 3 and ds[0]["cand_texts"][0]
