"""grain pipelines: static shapes, pixel layout, SFT / align targets, determinism, resume,
process shards, tfds == M-BEIR source, bad records."""

import dataclasses
import json
import os
import shutil

import numpy as np
import pytest

from retrv_jax.data import images, mbeir, pipeline, prompts, synthetic, tfds_mbeir
from retrv_jax.data.tokenizer import load_tokenizer

K = 4
BENCH = synthetic.BenchmarkConfig(num_train=4, num_val=1, num_test=3, k=K, image_size=56)
NUM_TRAIN, NUM_TEST = 5 * BENCH.num_train, 5 * BENCH.num_test  # Five (dataset, task) pairs.


@pytest.fixture(scope="module")
def tok():
  return load_tokenizer()


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("bench") / "synth")
  synthetic.generate(root, BENCH)
  return root


@pytest.fixture(scope="module")
def cfg(bench, tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  tfds_mbeir.build(bench, data_dir)
  return pipeline.PipelineConfig(data_dir=data_dir, num_candidates=K, batch_size=3,
                                 prompt_buckets=(256, 512), max_candidate_tokens=48)


def _iter(stage, cfg, tok, **changes):
  index, count = changes.pop("process_index", 0), changes.pop("process_count", 1)
  config = dataclasses.replace(cfg, **changes)
  return pipeline.make_iterator(stage, config, tok, process_index=index, process_count=count)


def _take(it, n=None):
  return [b for _, b in zip(range(n), it, strict=False)] if n else list(it)


def _rows(batches):
  """(dataset, qid) -> that row of every per-example array, for valid rows."""
  out = {}
  for b in batches:
    for i in np.flatnonzero(b["valid"]):
      out[b["dataset"][i], b["qid"][i]] = {
          k: v[i] for k, v in b.items() if isinstance(v, np.ndarray) and k != "pixel_values"}
  return out


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b, strict=True):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def _records(cfg, split):
  ds = tfds_mbeir.rerank_dataset(cfg.data_dir, split)
  return {(r["dataset"], r["qid"]): r for r in (ds[i] for i in range(len(ds)))}


@pytest.mark.parametrize("stage", pipeline.STAGES)
def test_static_shapes_and_pixel_layout(stage, cfg, tok):
  split = "test" if stage == "eval" else "train"
  batches = _take(_iter(stage, cfg, tok, split=split), 5)
  assert len(batches) == 5
  spec = {k: (v.shape, v.dtype) for k, v in batches[0].items()
          if isinstance(v, np.ndarray) and k not in pipeline.HOST_FIELDS}
  n, d = cfg.num_patches(), cfg.image_config().patch_dim
  assert spec["pixel_values"] == ((n, d), np.float32) and n == 3 * (1 + K) * 16
  assert spec["input_ids"] == ((3, 256), np.int32)
  assert spec["image_grid_thw"] == ((3, 1 + K, 3), np.int32)
  assert spec["candidate_ids"] == ((3, K, 48), np.int32)
  extra = {"sft": "target_ids", "align": "description_ids"}.get(stage)
  assert (extra in spec) == (stage in ("sft", "align"))
  records = _records(cfg, split)
  for b in batches:
    assert {k: (v.shape, v.dtype) for k, v in b.items() if k in spec} == spec
    assert b["qid"].shape == (3,) and set(b) == set(spec) | set(pipeline.HOST_FIELDS)
    grid = b["image_grid_thw"]
    real = int(np.prod(grid, axis=-1).sum())
    assert real > 0
    assert np.all(np.any(b["pixel_values"][:real] != 0, axis=-1))
    assert not np.any(b["pixel_values"][real:])
    # Images inside the prompt: span length = merged tokens of the grid.
    spans = b["image_spans"][..., 1]
    assert np.all(spans[spans > 0] == np.prod(grid, -1)[spans > 0] // 4)
    # Rows are (b, slot 0 = query, slots 1..K) of the records' own images.
    expected = []
    for i in np.flatnonzero(b["valid"]):
      r = records[b["dataset"][i], b["qid"][i]]
      assert b["gt_index"][i] == r["gt_index"] and b["task_id"][i] == r["task_id"]
      np.testing.assert_array_equal(b["hard_negative_mask"][i], r["cand_is_hard_negative"])
      for slot, data in enumerate([r["query_image"], *r["cand_images"]]):
        assert bool(data) == bool(grid[i, slot].any())
        if data:
          expected.append(images.preprocess_image(images.load_image(data),
                                                  cfg.image_config())[0])
    if b["valid"].all():
      np.testing.assert_array_equal(b["pixel_values"][:real], np.concatenate(expected))


def test_sft_targets_mask_splices_and_padding(cfg, tok):
  batches = _take(_iter("sft", cfg, tok, num_epochs=1, batch_size=4), None)
  records = _records(cfg, "train")
  assert sum(len(b["qid"]) for b in batches) == NUM_TRAIN
  num_inserted = 0
  for b in batches:
    for i in range(4):
      ids, loss, real = b["target_ids"][i], b["target_loss_mask"][i], b["target_mask"][i]
      assert not np.any(loss & ~real) and np.all(ids[~real] == tok.pad)
      cot = records[b["dataset"][i], b["qid"][i]]["reference_cot"]
      assert tok.decode(ids[loss].tolist()) == cot + prompts.RESPONSE_END
      length = b["response_lengths"][i]
      np.testing.assert_array_equal(b["response_ids"][i, :length], ids[loss])
      inserted = real & ~loss
      for pos, step, cand in zip(b["insert_positions"][i], b["insert_steps"][i],
                                 b["insert_candidates"][i], strict=True):
        if cand < 0:
          assert pos == step == -1
          continue
        num_inserted += 1
        block = b["splice_ids"][i, cand][b["splice_mask"][i, cand]]
        np.testing.assert_array_equal(ids[pos : pos + len(block)], block)
        assert inserted[pos : pos + len(block)].all()
        assert ids[pos - 1] == b["response_ids"][i, step] == tok.inspect_end
        label = tok.decode(b["response_ids"][i, step - 1 : step].tolist())
        assert int(label) == cand + 1
      assert inserted.sum() == sum(
          b["splice_mask"][i, c].sum() for c in b["insert_candidates"][i] if c >= 0)
  assert num_inserted > 0


def test_align_targets_are_descriptions_and_relations(cfg, tok):
  b = next(_iter("align", cfg, tok))
  records = _records(cfg, "train")
  for i in range(3):
    r = records[b["dataset"][i], b["qid"][i]]
    for name, field in (("description", "cand_descriptions"), ("relation", "cand_relations")):
      for k in range(K):
        ids = b[f"{name}_ids"][i, k][b[f"{name}_mask"][i, k]]
        assert ids[-1] == tok.eos and tok.decode(ids[:-1].tolist()) == r[field][k]
        assert r[field][k]


def test_same_seed_same_batches_other_seed_other_order(cfg, tok):
  first = _take(_iter("sft", cfg, tok, seed=3), 4)
  _assert_batches_equal(first, _take(_iter("sft", cfg, tok, seed=3), 4))
  other = _take(_iter("sft", cfg, tok, seed=4), 4)
  assert [list(b["qid"]) for b in first] != [list(b["qid"]) for b in other]


@pytest.mark.parametrize("stage", ["grpo", "eval"])
def test_resume_from_saved_state_is_exact(stage, cfg, tok):
  # Train: 20 examples, B = 3: batches 5..7 cross into the second (reshuffled) epoch.
  it = _iter(stage, cfg, tok, split="test" if stage == "eval" else "train")
  _take(it, 2 if stage == "eval" else 5)
  state = json.loads(json.dumps(it.get_state()))
  expected = _take(it, 3)
  resumed = _iter(stage, cfg, tok, split="test" if stage == "eval" else "train", seed=0)
  resumed.set_state(state)
  _assert_batches_equal(_take(resumed, 3), expected)


def test_epochs_are_reshuffled_permutations(cfg, tok):
  rows = [q for b in _take(_iter("grpo", cfg, tok, batch_size=1), 2 * NUM_TRAIN)
          for q in zip(b["dataset"], b["qid"], strict=True)]
  assert set(rows[:NUM_TRAIN]) == set(rows[NUM_TRAIN:]) and len(set(rows)) == NUM_TRAIN
  assert rows[:NUM_TRAIN] != rows[NUM_TRAIN:]


def test_process_shards_are_disjoint_and_cover_the_split(cfg, tok):
  seen = []
  for index in range(2):
    batches = _take(_iter("grpo", cfg, tok, batch_size=1, num_epochs=1, process_index=index,
                          process_count=2), None)
    seen.append(set(_rows(batches)))
  assert not seen[0] & seen[1]
  assert len(seen[0] | seen[1]) == NUM_TRAIN and len(seen[0]) == NUM_TRAIN // 2
  # Eval: every process runs the same number of batches; padding rows are invalid.
  evals = [_take(_iter("eval", cfg, tok, split="test", process_index=i, process_count=2))
           for i in range(2)]
  assert [len(e) for e in evals] == [3, 3]  # ceil(ceil(15 / 2) / 3).
  valid = [sum(int(b["valid"].sum()) for b in e) for e in evals]
  assert valid == [8, 7]
  shards = [set(_rows(e)) for e in evals]
  assert not shards[0] & shards[1] and len(shards[0] | shards[1]) == NUM_TEST
  pad = evals[1][-1]
  assert not pad["valid"][-1] and pad["qid"][-1] == "" and pad["gt_index"][-1] == -1


def test_tfds_and_mbeir_sources_give_the_same_examples(bench, cfg, tok):
  tsv = os.path.join(bench, "instructions", "query_instructions.tsv")
  common = dict(split="test", batch_size=1, num_epochs=1, shuffle=False, instructions_file=tsv)
  from_tfds = _rows(_take(_iter("grpo", cfg, tok, **common), None))
  from_files = _rows(_take(_iter("grpo", cfg, tok, source="mbeir", data_dir=bench, **common),
                           None))
  assert len(from_tfds) == NUM_TEST and from_tfds.keys() == from_files.keys()
  for key, row in from_tfds.items():
    for name, value in row.items():
      np.testing.assert_array_equal(value, from_files[key][name], err_msg=f"{key} {name}")
  table, _ = mbeir.read_instructions(tsv)
  options = {p for row in table.values() for p in row.prompts}
  prompt = tok.decode(next(iter(from_tfds.values()))["input_ids"].tolist())
  assert any(f"user\n{p}\nQuery:" in prompt for p in options)


def _corrupt_one_query_image(bench, tmp_path):
  root = str(tmp_path / "bench")
  shutil.copytree(bench, root)
  layout = mbeir.Layout(root)
  queries, _ = mbeir.read_queries(layout.query_file("synthnights", 4, "test"), image_root=root)
  with open(os.path.join(root, queries[1].img_path), "wb") as f:
    f.write(b"not an image")
  return root, queries[1].qid


def test_bad_record_raises_or_is_skipped_and_counted(bench, cfg, tok, tmp_path):
  root, qid = _corrupt_one_query_image(bench, tmp_path)
  common = dict(source="mbeir", data_dir=root, split="test", batch_size=2, num_epochs=1)
  with pytest.raises(pipeline.RecordError, match=f"synthnights task 4 qid {qid}: image query"):
    _take(_iter("grpo", cfg, tok, **common), None)
  batches = _take(_iter("grpo", cfg, tok, on_error="skip", **common), None)
  assert sum(b["num_skipped"] for b in batches) == 1
  kept = _rows(batches)
  assert ("synthnights", qid) not in kept and len(kept) == NUM_TEST - 1
  evals = _take(_iter("eval", cfg, tok, on_error="skip", **common))
  assert sum(b["num_skipped"] for b in evals) == 1
  assert sum(int(b["valid"].sum()) for b in evals) == NUM_TEST - 1
  assert len(evals) == 8  # ceil(15 / 2): the skipped record is an invalid row.


def test_batch_over_max_patches_names_its_examples(cfg, tok):
  # An example has at most 5 images x 16 patches = 80 rows: each fits, a batch of 3 may not.
  with pytest.raises(ValueError, match=r"more than max_patches=100; examples .*\(80\)"):
    _take(_iter("eval", cfg, tok, split="test", max_patches=100))


def test_two_workers_give_the_examples_of_one_process(cfg, tok):
  it = _iter("eval", cfg, tok, split="test", worker_count=2)
  try:
    with_workers = _rows(_take(it))
  finally:
    it.close()
  assert with_workers.keys() == _rows(_take(_iter("eval", cfg, tok, split="test"))).keys()
  assert len(with_workers) == NUM_TEST


def test_config_from_mapping_checks_keys_and_values():
  config = pipeline.PipelineConfig.from_config({"batch_size": 2, "prompt_buckets": [128, 256]})
  assert config.prompt_buckets == (128, 256) and config.batch_size == 2
  with pytest.raises(ValueError, match=r"unknown data config keys \['batchsize'\]"):
    pipeline.PipelineConfig.from_config({"batchsize": 2})
  with pytest.raises(ValueError, match="source must be one of"):
    pipeline.PipelineConfig(source="csv")
  arrays, host = pipeline.split_host_fields({"qid": 1, "dataset": 2, "num_skipped": 0,
                                             "input_ids": 3})
  assert arrays == {"input_ids": 3} and set(host) == set(pipeline.HOST_FIELDS)
