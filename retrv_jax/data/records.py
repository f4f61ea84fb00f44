"""Record-level validation shared by the M-BEIR readers: errors, skip counts, fields, images.

Every problem is a `RecordError` naming the file, the 1-based line and the field. A reader
run with `on_error='raise'` stops at the first one; with `on_error='skip'` it drops the
record and counts it under the error's `reason` in a `ReadReport`.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import warnings
from collections.abc import Iterator
from typing import Any, NamedTuple

from absl import logging
from PIL import Image

ON_ERROR = ("raise", "skip")
MODALITIES = ("text", "image", "image,text")
DEFAULT_MAX_IMAGE_PIXELS = 8192 * 8192  # Refused before decoding: decompression bombs.

# Reasons a record is refused; the keys of `ReadReport.skipped`.
MALFORMED = "malformed_json"
NOT_OBJECT = "not_an_object"
MISSING_FIELD = "missing_field"
WRONG_TYPE = "wrong_type"
BAD_VALUE = "bad_value"
UNKNOWN_MODALITY = "unknown_modality"
DUPLICATE_ID = "duplicate_id"
DANGLING_ID = "dangling_id"
BAD_PATH = "bad_path"
MISSING_IMAGE = "missing_image"
CORRUPT_IMAGE = "corrupt_image"
IMAGE_TOO_LARGE = "image_too_large"


class RecordError(ValueError):
  """A record that breaks the schema: '{path}:{line}: field {field!r}: {detail}'."""

  def __init__(self, path: str, line: int, field: str | None, reason: str, detail: str):
    self.path, self.line, self.field, self.reason, self.detail = path, line, field, reason, detail
    where = f"{path}:{line}" + (f": field {field!r}" if field else "")
    super().__init__(f"{where}: {detail}")


@dataclasses.dataclass
class ReadReport:
  """What one reader kept and what it skipped, per reason."""

  path: str
  num_read: int = 0
  skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  logged: int = 0  # Skipped records logged one by one; later ones are only counted.

  @property
  def num_skipped(self) -> int:
    return sum(self.skipped.values())

  def summary(self) -> str:
    reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items()))
    return (f"{self.path}: read {self.num_read} records, skipped {self.num_skipped}"
            + (f" ({reasons})" if reasons else ""))


def check_on_error(on_error: str) -> None:
  if on_error not in ON_ERROR:
    raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")


def handle(err: RecordError, on_error: str, report: ReadReport, max_logged: int = 20) -> None:
  """Raises `err`, or counts it under its reason (logging the first `max_logged`)."""
  if on_error == "raise":
    raise err
  report.skipped[err.reason] += 1
  if report.logged < max_logged:
    report.logged += 1
    logging.warning("skipping record: %s", err)


class Line(NamedTuple):
  path: str
  number: int  # 1-based.
  offset: int  # Byte offset of the line in the file.
  size: int  # Bytes, newline included.
  record: dict[str, Any] | RecordError

  def fields(self) -> Fields:
    """The parsed record's fields; raises the parse error if the line was not a JSON object."""
    if isinstance(self.record, RecordError):
      raise self.record
    return Fields(self.path, self.number, self.record)


def iter_jsonl(path: str) -> Iterator[Line]:
  """Each non-blank line of a jsonl file, parsed (or the parse error)."""
  with open(path, "rb") as f:
    offset = 0
    for number, raw in enumerate(f, start=1):
      start, offset = offset, offset + len(raw)
      if raw.strip():
        yield Line(path, number, start, len(raw), _parse_json_line(path, number, raw))


def _parse_json_line(path: str, number: int, raw: bytes) -> dict[str, Any] | RecordError:
  try:
    record = json.loads(raw)
  except json.JSONDecodeError as e:
    return RecordError(path, number, None, MALFORMED, f"malformed JSON: {e.msg} at column "
                       f"{e.colno}")
  except UnicodeDecodeError as e:
    return RecordError(path, number, None, MALFORMED, f"malformed JSON: not UTF-8 ({e})")
  if not isinstance(record, dict):
    return RecordError(path, number, None, NOT_OBJECT,
                       f"expected a JSON object, got {type(record).__name__}")
  return record


_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", list: "a list"}


class Fields:
  """Typed access to one record's fields; each failure is a RecordError at (path, line)."""

  def __init__(self, path: str, line: int, record: dict[str, Any]):
    self.path, self.line, self.record = path, line, record

  def error(self, field: str | None, reason: str, detail: str) -> RecordError:
    return RecordError(self.path, self.line, field, reason, detail)

  def get(self, name: str, kind: type, *, required: bool = True, nullable: bool = False,
          default: Any = None) -> Any:
    """The value of `name`, of type `kind` (a bool is no int; an int is a float). An absent
    or null optional field gives `default`; null is allowed in a required one if nullable."""
    if name not in self.record:
      if required:
        raise self.error(name, MISSING_FIELD, "missing required field")
      return default
    value = self.record[name]
    if value is None and (nullable or not required):
      return None if nullable else default
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is float and is_number:
      return float(value)
    if not isinstance(value, kind) or (kind is int and not is_number):
      expected = _TYPE_NAMES.get(kind, kind.__name__) + (" or null" if nullable else "")
      raise self.error(name, WRONG_TYPE, f"expected {expected}, got {json.dumps(value)[:80]}")
    return value

  def string_list(self, name: str, *, required: bool = True, non_empty: bool = False
                  ) -> tuple[str, ...]:
    values = self.get(name, list, required=required, default=[])
    if not all(isinstance(v, str) for v in values):
      raise self.error(name, WRONG_TYPE, f"expected a list of strings, got {values!r:.80}")
    if non_empty and not values:
      raise self.error(name, BAD_VALUE, "expected a non-empty list")
    return tuple(values)

  def modality(self, name: str) -> str:
    value = self.get(name, str)
    if value not in MODALITIES:
      raise self.error(name, UNKNOWN_MODALITY, f"unknown modality {value!r}; expected one of "
                       f"{MODALITIES}")
    return value

  def content(self, modality_field: str, text_field: str, image_field: str
              ) -> tuple[str, str | None, str | None]:
    """(modality, text, img_path), the text and path present as the modality demands."""
    modality = self.modality(modality_field)
    text = self.get(text_field, str, required=False, nullable=True)
    img_path = self.get(image_field, str, required=False, nullable=True)
    if "text" in modality and text is None:
      raise self.error(text_field, BAD_VALUE, f"modality {modality!r} needs a text")
    if "image" in modality and not img_path:
      raise self.error(image_field, BAD_VALUE, f"modality {modality!r} needs an image path")
    return modality, text, img_path


def resolve_image(root: str, rel_path: str) -> str | None:
  """The absolute path of an image inside `root`, or None if it would escape `root`."""
  if os.path.isabs(rel_path):
    return None
  root = os.path.abspath(root)
  path = os.path.abspath(os.path.join(root, rel_path))
  return path if path.startswith(root + os.sep) else None


def check_image(fields: Fields, name: str, root: str, rel_path: str,
                max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> None:
  """Checks that an image exists under `root` and decodes, refusing oversized ones before
  any pixel is decoded."""
  path = resolve_image(root, rel_path)
  if path is None:
    raise fields.error(name, BAD_PATH, f"image path {rel_path!r} leaves the data root {root}")
  if not os.path.isfile(path):
    raise fields.error(name, MISSING_IMAGE, f"image file {path} does not exist")
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("error", Image.DecompressionBombWarning)
      with Image.open(path) as img:
        width, height = img.size
        if width * height > max_pixels:
          raise fields.error(name, IMAGE_TOO_LARGE, f"image {path} is {width}x{height}, more "
                             f"than the {max_pixels} pixels allowed")
        img.verify()
      with Image.open(path) as img:
        img.load()
  except RecordError:
    raise
  except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
    raise fields.error(name, IMAGE_TOO_LARGE, f"image {path} refused: {e}") from None
  except Exception as e:  # PIL raises many kinds of errors on corrupt data.
    raise fields.error(name, CORRUPT_IMAGE, f"image {path} does not decode: "
                       f"{type(e).__name__}: {e}") from None
