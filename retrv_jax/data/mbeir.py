"""M-BEIR reader: queries, candidate pools, qrels, instructions and stage-I top-K lists.

Layout under the M-BEIR root (PAPER.md §7; `Layout` builds every path):

  query/{split}/mbeir_{dataset}_task{t}_{split}.jsonl
  cand_pool/local/mbeir_{dataset}_task{t}_cand_pool.jsonl
  cand_pool/global/mbeir_union_{split}_cand_pool.jsonl
  qrels/{split}/mbeir_{dataset}_task{t}_{split}_qrels.txt      "qid 0 did rel task_id"
  instructions/query_instructions.tsv                          header + one row per task
  stage1/{split}/mbeir_{dataset}_task{t}_{split}_topk.jsonl    ours: {qid, cand_list, scores,
                                                               relations?}, one K per file

Every record is validated (fields, types, modalities, ids, images); a bad one raises a
`RecordError` naming file, line and field, or with `on_error='skip'` is dropped and counted
per reason in the returned `ReadReport` (and logged). Image paths are relative to the root.
A `CandidatePool` indexes its jsonl by byte offset (16 bytes per candidate in numpy arrays)
and parses a record, and checks its image, only when asked for it: pools of millions of
candidates open in one pass without holding records or images in memory.
"""

from __future__ import annotations

import array
import dataclasses
import json
import os
import re
from collections.abc import Iterator
from typing import Any

import numpy as np
from absl import logging

from retrv_jax.data import records as rec
from retrv_jax.data.records import Fields, ReadReport, RecordError

SPLITS = ("train", "val", "test")
TASK_MODALITIES = {  # M-BEIR task id -> (query modality, candidate modality).
    0: ("text", "image"), 1: ("text", "text"), 2: ("text", "image,text"),
    3: ("image", "text"), 4: ("image", "image"), 6: ("image,text", "text"),
    7: ("image,text", "image"), 8: ("image,text", "image,text"),
}  # fmt: skip
_ID = re.compile(r"^(\d+):(\d+)$")
_INDEX_BITS = 40  # id "d:i" -> int key d << 40 | i.
_QUERY_FILE = re.compile(r"^mbeir_(?P<dataset>.+)_task(?P<task>\d+)_(?P<split>[a-z]+)\.jsonl$")
VERIFY_IMAGES = ("eager", "lazy", "none")


@dataclasses.dataclass(frozen=True)
class Query:
  qid: str
  modality: str  # One of records.MODALITIES.
  text: str | None
  img_path: str | None  # Relative to the M-BEIR root.
  pos_cand_list: tuple[str, ...]
  neg_cand_list: tuple[str, ...] = ()  # Hard negatives where the dataset has them.
  src_content: str | None = None  # JSON text as in M-BEIR.
  task_id: int | None = None  # From the record, else from the file name.
  reference_cot: str | None = None  # Ours: four-phase CoT, labels index the stage-I list.
  where: str = dataclasses.field(default="", compare=False)  # "path:line" for messages.


@dataclasses.dataclass(frozen=True)
class Candidate:
  did: str
  modality: str
  text: str | None
  img_path: str | None
  src_content: str | None = None
  description: str | None = None  # Ours: ground-truth content description.
  where: str = dataclasses.field(default="", compare=False)


@dataclasses.dataclass(frozen=True)
class Qrel:
  qid: str
  did: str
  relevance: int
  task_id: int


@dataclasses.dataclass(frozen=True)
class TopK:
  """A query's stage-I list: K candidate ids by descending score."""

  qid: str
  cand_list: tuple[str, ...]
  scores: tuple[float, ...]
  relations: tuple[str, ...] | None = None  # Ours: candidate-to-target relation sentences.
  where: str = dataclasses.field(default="", compare=False)


@dataclasses.dataclass(frozen=True)
class Instruction:
  query_modality: str
  cand_modality: str
  dataset: str
  dataset_id: int
  prompts: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Layout:
  """Paths of an M-BEIR directory."""

  root: str
  stage1_dir: str = "stage1"  # Relative to root, or absolute.

  def _path(self, *parts: str) -> str:
    return os.path.join(self.root, *parts)

  def query_file(self, dataset: str, task_id: int, split: str) -> str:
    return self._path("query", split, f"mbeir_{dataset}_task{task_id}_{split}.jsonl")

  def local_pool_file(self, dataset: str, task_id: int) -> str:
    return self._path("cand_pool", "local", f"mbeir_{dataset}_task{task_id}_cand_pool.jsonl")

  def global_pool_file(self, split: str) -> str:
    return self._path("cand_pool", "global", f"mbeir_union_{split}_cand_pool.jsonl")

  def qrels_file(self, dataset: str, task_id: int, split: str) -> str:
    return self._path("qrels", split, f"mbeir_{dataset}_task{task_id}_{split}_qrels.txt")

  def instructions_file(self) -> str:
    return self._path("instructions", "query_instructions.tsv")

  def stage1_file(self, dataset: str, task_id: int, split: str) -> str:
    return self._path(self.stage1_dir, split, f"mbeir_{dataset}_task{task_id}_{split}_topk.jsonl")

  def pairs(self, split: str) -> list[tuple[str, int]]:
    """The (dataset, task id) pairs that have a query file for `split`, sorted."""
    folder = self._path("query", split)
    if not os.path.isdir(folder):
      return []
    found = (_QUERY_FILE.match(n) for n in os.listdir(folder))
    return sorted((m["dataset"], int(m["task"])) for m in found if m and m["split"] == split)


def id_key(value: str) -> int | None:
  """'9:123' -> an int64 key (dataset id in the high bits); None if not 'dataset_id:index'."""
  m = _ID.match(value)
  if not m or int(m[2]) >= 1 << _INDEX_BITS or int(m[1]) >= 1 << (63 - _INDEX_BITS):
    return None
  return int(m[1]) << _INDEX_BITS | int(m[2])


def _id(f: Fields, name: str) -> str:
  value = f.get(name, str)
  if id_key(value) is None:
    raise f.error(name, rec.BAD_VALUE, f"expected an id 'dataset_id:index', got {value!r}")
  return value


def _src_content(f: Fields, name: str) -> str | None:
  value = f.record.get(name)
  return value if value is None or isinstance(value, str) else json.dumps(value)


def _finish(report: ReadReport) -> ReadReport:
  (logging.warning if report.num_skipped else logging.info)("%s", report.summary())
  return report


def _parse_query(f: Fields, file_task_id: int | None) -> Query:
  qid = _id(f, "qid")
  modality, text, img_path = f.content("query_modality", "query_txt", "query_img_path")
  return Query(
      qid=qid, modality=modality, text=text, img_path=img_path,
      pos_cand_list=f.string_list("pos_cand_list", non_empty=True),
      neg_cand_list=f.string_list("neg_cand_list", required=False),
      src_content=_src_content(f, "query_src_content"),
      task_id=f.get("task_id", int, required=False, default=file_task_id),
      reference_cot=f.get("reference_cot", str, required=False),
      where=f"{f.path}:{f.line}")


def read_queries(path: str, *, image_root: str, pool: CandidatePool | None = None,
                 on_error: str = "raise", verify_images: bool = True,
                 max_image_pixels: int = rec.DEFAULT_MAX_IMAGE_PIXELS
                 ) -> tuple[list[Query], ReadReport]:
  """All valid queries of a query jsonl; with `pool`, every listed candidate id must be in it."""
  rec.check_on_error(on_error)
  m = _QUERY_FILE.match(os.path.basename(path))
  file_task_id = int(m["task"]) if m else None
  report, queries, seen = ReadReport(path), [], set()
  for line in rec.iter_jsonl(path):
    try:
      f = line.fields()
      q = _parse_query(f, file_task_id)
      if q.qid in seen:
        raise f.error("qid", rec.DUPLICATE_ID, f"qid {q.qid!r} appears twice")
      for name in ("pos_cand_list", "neg_cand_list") if pool is not None else ():
        missing = [d for d in getattr(q, name) if d not in pool]
        if missing:
          raise f.error(name, rec.DANGLING_ID, f"candidate ids {missing[:5]} are not in the "
                        f"pool {pool.path}")
      if verify_images and q.img_path:
        rec.check_image(f, "query_img_path", image_root, q.img_path, max_image_pixels)
    except RecordError as e:
      rec.handle(e, on_error, report)
      continue
    seen.add(q.qid)
    queries.append(q)
    report.num_read += 1
  return queries, _finish(report)


def _parse_candidate(f: Fields) -> Candidate:
  did = _id(f, "did")
  modality, text, img_path = f.content("modality", "txt", "img_path")
  return Candidate(did=did, modality=modality, text=text, img_path=img_path,
                   src_content=_src_content(f, "src_content"),
                   description=f.get("description", str, required=False),
                   where=f"{f.path}:{f.line}")


class CandidatePool:
  """A candidate pool served by id, indexed by byte offsets into its jsonl.

  verify_images: 'eager' checks every image while indexing (and skips or raises there);
  'lazy' checks an image the first time its candidate is read (a failure then raises a
  RecordError whatever `on_error` says: the caller asked for that candidate); 'none' never.
  """

  def __init__(self, path: str, *, image_root: str, on_error: str = "raise",
               verify_images: str = "lazy",
               max_image_pixels: int = rec.DEFAULT_MAX_IMAGE_PIXELS):
    rec.check_on_error(on_error)
    if verify_images not in VERIFY_IMAGES:
      raise ValueError(f"verify_images must be one of {VERIFY_IMAGES}, got {verify_images!r}")
    self.path, self.image_root, self.verify_images = path, image_root, verify_images
    self.max_image_pixels = max_image_pixels
    self.report = ReadReport(path)
    self._verified: set[int] = set()
    self._file = None
    keys, offsets = array.array("q"), array.array("q")  # Compact while scanning millions.
    sizes, lines = array.array("i"), array.array("i")
    for line in rec.iter_jsonl(path):
      try:
        f = line.fields()
        c = _parse_candidate(f)
        if verify_images == "eager" and c.img_path:
          rec.check_image(f, "img_path", image_root, c.img_path, max_image_pixels)
      except RecordError as e:
        rec.handle(e, on_error, self.report)
        continue
      keys.append(id_key(c.did))
      offsets.append(line.offset)
      sizes.append(line.size)
      lines.append(line.number)
    order = np.argsort(np.frombuffer(keys, np.int64), kind="stable")
    self._keys = np.frombuffer(keys, np.int64)[order]
    self._offsets = np.frombuffer(offsets, np.int64)[order]
    self._sizes = np.asarray(sizes, np.int32)[order]
    self._lines = np.asarray(lines, np.int32)[order]
    self._drop_duplicates(on_error)
    self.report.num_read = len(self._keys)
    _finish(self.report)

  def _drop_duplicates(self, on_error: str) -> None:
    dup = np.flatnonzero(self._keys[1:] == self._keys[:-1]) + 1  # Later lines of a repeat.
    for i in dup:
      f = Fields(self.path, int(self._lines[i]), {})
      did = self._read(int(i))["did"]
      rec.handle(f.error("did", rec.DUPLICATE_ID, f"did {did!r} also on line "
                         f"{int(self._lines[i - 1])}"), on_error, self.report)
    keep = np.ones(len(self._keys), bool)
    keep[dup] = False
    for name in ("_keys", "_offsets", "_sizes", "_lines"):
      setattr(self, name, getattr(self, name)[keep])

  def __len__(self) -> int:
    return len(self._keys)

  def _row(self, did: str) -> int | None:
    key = id_key(did) if isinstance(did, str) else None
    if key is None:
      return None
    i = int(np.searchsorted(self._keys, key))
    return i if i < len(self._keys) and self._keys[i] == key else None

  def __contains__(self, did: object) -> bool:
    return self._row(did) is not None

  def _read(self, row: int) -> dict[str, Any]:
    if self._file is None:
      self._file = open(self.path, "rb")  # Held for the pool's lifetime; see close().
    raw = os.pread(self._file.fileno(), int(self._sizes[row]), int(self._offsets[row]))
    return json.loads(raw)

  def __getitem__(self, did: str) -> Candidate:
    row = self._row(did)
    if row is None:
      raise KeyError(f"candidate {did!r} is not in the pool {self.path}")
    f = Fields(self.path, int(self._lines[row]), self._read(row))
    c = _parse_candidate(f)
    if self.verify_images == "lazy" and c.img_path and row not in self._verified:
      rec.check_image(f, "img_path", self.image_root, c.img_path, self.max_image_pixels)
      self._verified.add(row)
    return c

  def ids(self) -> Iterator[str]:
    """Every did, in key order."""
    for key in self._keys:
      yield f"{int(key) >> _INDEX_BITS}:{int(key) & ((1 << _INDEX_BITS) - 1)}"

  def __getstate__(self) -> dict[str, Any]:  # Picklable for worker processes.
    return {**self.__dict__, "_file": None}

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None


def read_qrels(path: str, *, on_error: str = "raise") -> tuple[list[Qrel], ReadReport]:
  """Lines 'qid 0 did relevance task_id'."""
  rec.check_on_error(on_error)
  report, out = ReadReport(path), []
  with open(path, encoding="utf-8") as fh:
    for number, text in enumerate(fh, start=1):
      if not text.strip():
        continue
      cols = text.split()
      f = Fields(path, number, dict(zip(("qid", "iter", "did", "relevance", "task_id"), cols,
                                        strict=False)))
      try:
        if len(cols) != 5:
          raise f.error(None, rec.BAD_VALUE, f"expected 5 columns 'qid 0 did rel task_id', "
                        f"got {len(cols)}")
        qid, did = _id(f, "qid"), _id(f, "did")
        for name in ("relevance", "task_id"):
          if not re.fullmatch(r"-?\d+", f.record[name]):
            raise f.error(name, rec.WRONG_TYPE, f"expected an integer, got {f.record[name]!r}")
      except RecordError as e:
        rec.handle(e, on_error, report)
        continue
      out.append(Qrel(qid, did, int(cols[3]), int(cols[4])))
      report.num_read += 1
  return out, _finish(report)


def read_instructions(path: str, *, on_error: str = "raise"
                      ) -> tuple[dict[tuple[int, str, str], Instruction], ReadReport]:
  """UniIR's tsv: header, then query_modality, cand_modality, dataset, dataset_id, prompts...
  Keyed by (dataset_id, query_modality, cand_modality)."""
  rec.check_on_error(on_error)
  report, out = ReadReport(path), {}
  names = ("query_modality", "cand_modality", "dataset", "dataset_id")
  with open(path, encoding="utf-8") as fh:
    for number, text in enumerate(fh, start=1):
      if number == 1 or not text.strip():
        continue  # The header.
      cols = text.rstrip("\n").split("\t")
      f = Fields(path, number, dict(zip(names, cols, strict=False)))
      try:
        if len(cols) < 5:
          raise f.error(None, rec.BAD_VALUE, f"expected >= 5 tab-separated columns, got "
                        f"{len(cols)}")
        qm, cm = f.modality("query_modality"), f.modality("cand_modality")
        if not cols[3].isdigit():
          raise f.error("dataset_id", rec.WRONG_TYPE, f"expected an integer, got {cols[3]!r}")
        prompts = tuple(p.strip() for p in cols[4:] if p.strip())
        if not prompts:
          raise f.error("prompt_1", rec.BAD_VALUE, "expected at least one prompt")
      except RecordError as e:
        rec.handle(e, on_error, report)
        continue
      out[(int(cols[3]), qm, cm)] = Instruction(qm, cm, cols[2], int(cols[3]), prompts)
      report.num_read += 1
  return out, _finish(report)


def _parse_topk(f: Fields, pool: CandidatePool | None, k: int | None) -> TopK:
  qid = _id(f, "qid")
  cands = f.string_list("cand_list", non_empty=True)
  if k is not None and len(cands) != k:
    raise f.error("cand_list", rec.BAD_VALUE, f"expected K = {k} ids (the file's first "
                  f"record has {k}), got {len(cands)}")
  if len(set(cands)) != len(cands):
    raise f.error("cand_list", rec.DUPLICATE_ID, "a candidate id appears twice")
  if pool is not None:
    missing = [d for d in cands if d not in pool]
    if missing:
      raise f.error("cand_list", rec.DANGLING_ID, f"candidate ids {missing[:5]} are not in "
                    f"the pool {pool.path}")
  scores = f.get("scores", list)
  if len(scores) != len(cands) or not all(
      isinstance(s, (int, float)) and not isinstance(s, bool) for s in scores):
    raise f.error("scores", rec.BAD_VALUE, f"expected {len(cands)} numbers")
  relations = f.string_list("relations", required=False) or None
  if relations is not None and len(relations) != len(cands):
    raise f.error("relations", rec.BAD_VALUE, f"expected {len(cands)} strings")
  return TopK(qid, cands, tuple(float(s) for s in scores), relations, f"{f.path}:{f.line}")


def read_stage1(path: str, *, pool: CandidatePool | None = None, k: int | None = None,
                on_error: str = "raise") -> tuple[dict[str, TopK], ReadReport]:
  """Stage-I lists keyed by qid. All lists of a file have one length K (static shapes):
  `k`, or else that of the first valid record."""
  rec.check_on_error(on_error)
  report, out = ReadReport(path), {}
  for line in rec.iter_jsonl(path):
    try:
      f = line.fields()
      topk = _parse_topk(f, pool, k)
      if topk.qid in out:
        raise f.error("qid", rec.DUPLICATE_ID, f"qid {topk.qid!r} appears twice")
    except RecordError as e:
      rec.handle(e, on_error, report)
      continue
    k = len(topk.cand_list)
    out[topk.qid] = topk
    report.num_read += 1
  return out, _finish(report)


@dataclasses.dataclass(frozen=True)
class RerankExample:
  """One query with its stage-I candidates: what the re-ranker reads."""

  dataset: str
  task_id: int
  query: Query
  candidates: tuple[Candidate, ...]  # Stage-I order; label i + 1 in prompts.
  scores: tuple[float, ...]
  relations: tuple[str, ...] | None
  gt_index: int  # Position of the first positive in `candidates`; -1 if stage I missed all.


def _error_at(where: str, field: str, reason: str, detail: str) -> RecordError:
  path, _, line = where.rpartition(":")
  return RecordError(path, int(line), field, reason, detail)


def iter_rerank_examples(layout: Layout, dataset: str, task_id: int, split: str,
                         pool: CandidatePool, *, on_error: str = "raise",
                         verify_images: bool = True, report: ReadReport | None = None
                         ) -> Iterator[RerankExample]:
  """Joins a pair's queries with their stage-I lists and the pool, in query-file order.

  A query without a stage-I record, or whose candidate fails to load, raises or is skipped
  and counted in `report` (per-file problems are counted in the files' own reports).
  """
  query_path = layout.query_file(dataset, task_id, split)
  report = report if report is not None else ReadReport(f"{query_path} (joined)")
  queries, _ = read_queries(query_path, image_root=layout.root, pool=pool, on_error=on_error,
                            verify_images=verify_images)
  stage1_path = layout.stage1_file(dataset, task_id, split)
  topks, _ = read_stage1(stage1_path, pool=pool, on_error=on_error)
  for q in queries:
    try:
      topk = topks.get(q.qid)
      if topk is None:
        raise _error_at(q.where, "qid", rec.DANGLING_ID, f"query {q.qid!r} has no stage-I "
                        f"record in {stage1_path}")
      cands = tuple(pool[d] for d in topk.cand_list)
    except RecordError as e:
      rec.handle(e, on_error, report)
      continue
    positives = set(q.pos_cand_list)
    gt = next((i for i, d in enumerate(topk.cand_list) if d in positives), -1)
    report.num_read += 1
    yield RerankExample(dataset, q.task_id if q.task_id is not None else task_id, q, cands,
                        topk.scores, topk.relations, gt)
