"""M-BEIR reader: valid records parse; each kind of bad record names its file, line and field."""

import json
import logging
import os
import pickle
import struct
import zlib

import pytest
from PIL import Image

from retrv_jax.data import mbeir
from retrv_jax.data import records as rec
from retrv_jax.data.records import RecordError

QUERIES = [
    {"qid": "9:1", "query_txt": "a red circle", "query_img_path": None,
     "query_modality": "text", "query_src_content": None, "pos_cand_list": ["9:10"],
     "neg_cand_list": ["9:11"], "task_id": 0},
    # Real M-BEIR style: no task_id (taken from the file name), image only.
    {"qid": "9:2", "query_txt": None, "query_img_path": "mbeir_images/b.png",
     "query_modality": "image", "query_src_content": "{}", "pos_cand_list": ["9:11"],
     "neg_cand_list": []},
    {"qid": "9:3", "query_txt": "like this", "query_img_path": "mbeir_images/a.png",
     "query_modality": "image,text", "pos_cand_list": ["9:12"],
     "reference_cot": "<think>x</think><answer>1</answer>"},
]
POOL = [
    {"did": "9:10", "txt": None, "img_path": "mbeir_images/a.png", "modality": "image",
     "src_content": None, "description": "a red circle"},
    {"did": "9:11", "txt": None, "img_path": "mbeir_images/b.png", "modality": "image",
     "src_content": None},
    {"did": "9:12", "txt": "a caption", "img_path": None, "modality": "text"},
]
TOPK = [{"qid": q["qid"], "cand_list": ["9:10", "9:11", "9:12"], "scores": [0.9, 0.5, 0.1]}
        for q in QUERIES]
QUERY_FILE = "query/test/mbeir_toy_task0_test.jsonl"
POOL_FILE = "cand_pool/local/mbeir_toy_task0_cand_pool.jsonl"
STAGE1_FILE = "stage1/test/mbeir_toy_task0_test_topk.jsonl"


def _write(root, rel, lines):
  path = os.path.join(root, rel)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write("".join((line if isinstance(line, str) else json.dumps(line)) + "\n"
                    for line in lines))
  return path


@pytest.fixture
def root(tmp_path):
  root = str(tmp_path)
  os.makedirs(os.path.join(root, "mbeir_images"))
  for name, color in (("a", "red"), ("b", "blue")):
    Image.new("RGB", (8, 8), color).save(os.path.join(root, "mbeir_images", f"{name}.png"))
  _write(root, QUERY_FILE, QUERIES)
  _write(root, POOL_FILE, POOL)
  _write(root, STAGE1_FILE, TOPK)
  _write(root, "qrels/test/mbeir_toy_task0_test_qrels.txt",
         [f"{q['qid']} 0 {q['pos_cand_list'][0]} 1 0" for q in QUERIES])
  _write(root, "instructions/query_instructions.tsv", [
      "query_modality\tcand_modality\tdataset\tdataset_id\tprompt_1\tprompt_2",
      "text\timage\ttoy\t9\tFind the image.\tRetrieve it."])
  return root


def _pool(root, **kw):
  return mbeir.CandidatePool(os.path.join(root, POOL_FILE), image_root=root, **kw)


def _queries(root, **kw):
  return mbeir.read_queries(os.path.join(root, QUERY_FILE), image_root=root, **kw)


def _raises(fn, path, line, field, reason):
  with pytest.raises(RecordError) as info:
    fn()
  err = info.value
  assert (err.path, err.line, err.field, err.reason) == (path, line, field, reason)
  assert f"{path}:{line}" in str(err) and (field is None or repr(field) in str(err))
  return err


def test_valid_files_parse(root):
  pool = _pool(root, verify_images="eager")
  queries, report = _queries(root, pool=pool)
  assert (report.num_read, report.num_skipped) == (3, 0)
  assert [q.task_id for q in queries] == [0, 0, 0]
  assert queries[1] == mbeir.Query("9:2", "image", None, "mbeir_images/b.png", ("9:11",),
                                   (), "{}", 0)
  assert queries[2].reference_cot.startswith("<think>")
  assert len(pool) == 3 and "9:12" in pool and "9:13" not in pool and "x" not in pool
  assert pool["9:10"].description == "a red circle" and pool["9:12"].text == "a caption"
  assert sorted(pool.ids()) == ["9:10", "9:11", "9:12"]
  assert pickle.loads(pickle.dumps(pool))["9:11"] == pool["9:11"]
  with pytest.raises(KeyError, match="9:99"):
    pool["9:99"]
  topk, _ = mbeir.read_stage1(os.path.join(root, STAGE1_FILE), pool=pool)
  assert topk["9:2"].cand_list == ("9:10", "9:11", "9:12") and topk["9:2"].scores[0] == 0.9
  layout = mbeir.Layout(root)
  qrels, _ = mbeir.read_qrels(layout.qrels_file("toy", 0, "test"))
  assert qrels[0] == mbeir.Qrel("9:1", "9:10", 1, 0)
  instructions, _ = mbeir.read_instructions(layout.instructions_file())
  assert instructions[(9, "text", "image")].prompts == ("Find the image.", "Retrieve it.")
  examples = list(mbeir.iter_rerank_examples(layout, "toy", 0, "test", pool))
  assert [e.gt_index for e in examples] == [0, 1, 2]
  assert examples[1].candidates[1] == pool["9:11"]


def test_malformed_json(root):
  path = _write(root, QUERY_FILE, [QUERIES[0], '{"qid": "9:2", ', QUERIES[2]])
  _raises(lambda: _queries(root), path, 2, None, rec.MALFORMED)


def test_missing_field(root):
  bad = {k: v for k, v in QUERIES[2].items() if k != "query_modality"}
  path = _write(root, QUERY_FILE, [QUERIES[0], QUERIES[1], bad])
  _raises(lambda: _queries(root), path, 3, "query_modality", rec.MISSING_FIELD)


def test_wrong_type(root):
  path = _write(root, QUERY_FILE, [{**QUERIES[0], "pos_cand_list": "9:10"}])
  _raises(lambda: _queries(root), path, 1, "pos_cand_list", rec.WRONG_TYPE)


def test_unknown_modality(root):
  path = _write(root, POOL_FILE, [POOL[0], {**POOL[1], "modality": "video"}, POOL[2]])
  err = _raises(lambda: _pool(root), path, 2, "modality", rec.UNKNOWN_MODALITY)
  assert "video" in str(err)


def test_dangling_candidate_id(root):
  path = _write(root, QUERY_FILE, [QUERIES[0], {**QUERIES[1], "pos_cand_list": ["9:77"]}])
  err = _raises(lambda: _queries(root, pool=_pool(root)), path, 2, "pos_cand_list",
                rec.DANGLING_ID)
  assert "9:77" in str(err)
  stage1 = _write(root, STAGE1_FILE, [TOPK[0], {**TOPK[1], "cand_list": ["9:10", "9:78",
                                                                        "9:12"]}])
  _raises(lambda: mbeir.read_stage1(stage1, pool=_pool(root)), stage1, 2, "cand_list",
          rec.DANGLING_ID)


def test_missing_image(root):
  path = _write(root, POOL_FILE, [POOL[0], POOL[1], {**POOL[2], "img_path": "mbeir_images/no.png",
                                                     "modality": "image,text"}])
  err = _raises(lambda: _pool(root, verify_images="eager"), path, 3, "img_path",
                rec.MISSING_IMAGE)
  assert "no.png" in str(err)
  lazy = _pool(root)  # Indexing succeeds; reading that candidate fails, naming the line.
  assert lazy["9:10"].did == "9:10"
  _raises(lambda: lazy["9:12"], path, 3, "img_path", rec.MISSING_IMAGE)


def test_corrupt_image(root):
  with open(os.path.join(root, "mbeir_images", "b.png"), "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\nthis is not a png")
  _raises(lambda: _queries(root), os.path.join(root, QUERY_FILE), 2, "query_img_path",
          rec.CORRUPT_IMAGE)
  truncated = os.path.join(root, "mbeir_images", "a.png")
  with open(truncated, "rb") as f:
    data = f.read()
  with open(truncated, "wb") as f:
    f.write(data[: len(data) // 2])
  _raises(lambda: _pool(root, verify_images="eager"), os.path.join(root, POOL_FILE), 1,
          "img_path", rec.CORRUPT_IMAGE)


def _png_header_claiming(path, width, height):
  """A PNG whose header claims width x height; decoding it would allocate that much."""
  ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
  chunk = lambda kind, body: (struct.pack(">I", len(body)) + kind + body
                              + struct.pack(">I", zlib.crc32(kind + body)))
  with open(path, "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def test_decompression_bomb_and_escaping_path_are_refused(root):
  _png_header_claiming(os.path.join(root, "mbeir_images", "a.png"), 100_000, 100_000)
  _raises(lambda: _pool(root, verify_images="eager"), os.path.join(root, POOL_FILE), 1,
          "img_path", rec.IMAGE_TOO_LARGE)
  path = _write(root, POOL_FILE, [{**POOL[1], "img_path": "../outside.png"}])
  _raises(lambda: _pool(root, verify_images="eager"), path, 1, "img_path", rec.BAD_PATH)


def test_duplicate_ids(root):
  path = _write(root, POOL_FILE, [POOL[0], POOL[1], POOL[0]])
  err = _raises(lambda: _pool(root), path, 3, "did", rec.DUPLICATE_ID)
  assert "line 1" in str(err)
  assert len(_pool(root, on_error="skip")) == 2


def test_skip_counts_every_reason(root, caplog):
  with open(os.path.join(root, "mbeir_images", "bad.png"), "wb") as f:
    f.write(b"junk")
  lines = [
      QUERIES[0],
      "not json",
      "[1, 2]",
      {k: v for k, v in QUERIES[1].items() if k != "qid"},
      {**QUERIES[1], "query_modality": "audio"},
      {**QUERIES[1], "pos_cand_list": ["9:404"]},
      {**QUERIES[1], "query_img_path": "mbeir_images/none.png"},
      {**QUERIES[1], "query_img_path": "mbeir_images/bad.png"},
      {**QUERIES[1], "qid": "bad id"},
      QUERIES[2],
      QUERIES[2],
  ]
  _write(root, QUERY_FILE, lines)
  with caplog.at_level(logging.INFO):
    queries, report = _queries(root, pool=_pool(root), on_error="skip")
  assert [q.qid for q in queries] == ["9:1", "9:3"]
  assert report.num_read == 2
  assert dict(report.skipped) == {
      rec.MALFORMED: 1, rec.NOT_OBJECT: 1, rec.MISSING_FIELD: 1, rec.UNKNOWN_MODALITY: 1,
      rec.DANGLING_ID: 1, rec.MISSING_IMAGE: 1, rec.CORRUPT_IMAGE: 1, rec.BAD_VALUE: 1,
      rec.DUPLICATE_ID: 1}
  assert "skipped 9" in report.summary()
  assert "skipped 9" in caplog.text and f"{QUERY_FILE}:2" in caplog.text


def test_qrels_and_instructions_errors(root):
  layout = mbeir.Layout(root)
  path = _write(root, "qrels/test/mbeir_toy_task0_test_qrels.txt",
                ["9:1 0 9:10 1 0", "9:2 0 9:11 one 0", "9:3 0 9:12"])
  _raises(lambda: mbeir.read_qrels(path), path, 2, "relevance", rec.WRONG_TYPE)
  qrels, report = mbeir.read_qrels(path, on_error="skip")
  assert len(qrels) == 1 and dict(report.skipped) == {rec.WRONG_TYPE: 1, rec.BAD_VALUE: 1}
  tsv = _write(root, "instructions/query_instructions.tsv",
               ["header", "text\tsmell\ttoy\t9\tFind."])
  _raises(lambda: mbeir.read_instructions(layout.instructions_file()), tsv, 2,
          "cand_modality", rec.UNKNOWN_MODALITY)


def test_stage1_needs_one_k_and_matching_scores(root):
  path = _write(root, STAGE1_FILE, [TOPK[0], {**TOPK[1], "cand_list": ["9:10", "9:11"],
                                              "scores": [1, 0]}])
  _raises(lambda: mbeir.read_stage1(path), path, 2, "cand_list", rec.BAD_VALUE)
  path = _write(root, STAGE1_FILE, [{**TOPK[0], "scores": [1.0, 0.5]}])
  _raises(lambda: mbeir.read_stage1(path), path, 1, "scores", rec.BAD_VALUE)


def test_join_reports_a_query_without_stage1_record(root):
  _write(root, STAGE1_FILE, TOPK[:2])
  layout = mbeir.Layout(root)
  with pytest.raises(RecordError, match=f"{QUERY_FILE}:3: field 'qid'.*no stage-I record"):
    list(mbeir.iter_rerank_examples(layout, "toy", 0, "test", _pool(root)))
  report = rec.ReadReport("join")
  got = list(mbeir.iter_rerank_examples(layout, "toy", 0, "test", _pool(root),
                                        on_error="skip", report=report))
  assert len(got) == 2 and dict(report.skipped) == {rec.DANGLING_ID: 1}
