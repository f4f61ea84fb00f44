"""Procedural scenes for the embedded benchmark: attributes, edits, differences, text, pixels.

A scene is a background colour and a few objects, each with a colour, a shape, a size and a
position (one cell of a 3 x 3 grid, at most one object per cell). Everything the benchmark
says about a scene (captions, edit instructions, "matches except that ..." sentences) is
generated here from the attributes, with a small fixed vocabulary, so that a tiny tokenizer
covers it and every statement is true by construction.

Two scenes are compared by `distance`: the fewest attribute edits (change the background,
or one attribute of one object) turning one into the other, where an object present in only
one scene costs one edit per object attribute. A hard negative is one edit away from its
positive (distance 1); an easy negative is at least two.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

COLORS = ("red", "green", "blue", "yellow", "purple", "orange")
BACKGROUNDS = ("white", "gray", "black", "brown")  # Disjoint from COLORS: objects stay visible.
SHAPES = ("circle", "square", "triangle", "diamond", "star")
SIZES = ("small", "large")
CELLS = (  # Raster order; also the order in which captions list objects.
    "top left", "top", "top right", "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)  # fmt: skip
OBJECT_ATTRIBUTES = ("color", "shape", "size", "position")
EDITABLE = ("background",) + OBJECT_ATTRIBUTES
MAX_OBJECTS = 6  # `distance` tries every object matching; 6! stays cheap.

_RGB = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
    "yellow": (240, 210, 40), "purple": (140, 60, 190), "orange": (245, 140, 30),
    "white": (250, 250, 250), "gray": (128, 128, 128), "black": (15, 15, 15),
    "brown": (120, 80, 40),
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class SceneObject:
  color: str
  shape: str
  size: str
  position: str  # One of CELLS.

  def phrase(self) -> str:
    """'a large red circle at the top left'."""
    return f"a {self.size} {self.color} {self.shape} at the {self.position}"

  @property
  def look(self) -> tuple[str, str, str]:
    return (self.color, self.shape, self.size)


@dataclasses.dataclass(frozen=True)
class Scene:
  background: str
  objects: tuple[SceneObject, ...]

  def key(self) -> tuple[Any, ...]:
    """Canonical identity: equal keys <=> the same picture up to rendering jitter."""
    return (self.background, tuple(sorted(self.objects, key=lambda o: CELLS.index(o.position))))

  def caption(self) -> str:
    """'a large red circle at the top left and a small blue square at the center on a gray
    background'; objects in raster order."""
    parts = [o.phrase() for o in self.key()[1]]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{listed} on a {self.background} background"

  def summary(self) -> str:
    """What a partial text of the scene says: the object count and the background."""
    n = len(self.objects)
    return f"a scene with {n} object{'s' if n > 1 else ''} on a {self.background} background"

  def to_json(self) -> dict[str, Any]:
    return {"background": self.background, "objects": [dataclasses.asdict(o) for o in self.objects]}

  @classmethod
  def from_json(cls, data: dict[str, Any]) -> Scene:
    return cls(data["background"], tuple(SceneObject(**o) for o in data["objects"]))


@dataclasses.dataclass(frozen=True)
class SceneSpec:
  """The attribute vocabulary scenes are drawn from; shrink or grow it to tune difficulty."""

  num_objects: tuple[int, ...] = (2, 3)  # Allowed object counts, drawn uniformly.
  colors: tuple[str, ...] = COLORS
  shapes: tuple[str, ...] = SHAPES
  sizes: tuple[str, ...] = SIZES
  backgrounds: tuple[str, ...] = BACKGROUNDS
  editable: tuple[str, ...] = EDITABLE  # Attributes that hard negatives and edits may change.

  def __post_init__(self):
    if not self.num_objects or not all(1 <= n <= MAX_OBJECTS for n in self.num_objects):
      raise ValueError(f"num_objects must lie in [1, {MAX_OBJECTS}], got {self.num_objects}")
    for name, allowed in (("colors", COLORS), ("shapes", SHAPES), ("sizes", SIZES),
                          ("backgrounds", BACKGROUNDS), ("editable", EDITABLE)):
      values = getattr(self, name)
      unknown = [v for v in values if v not in allowed]
      if not values or unknown:
        raise ValueError(f"SceneSpec.{name} must be a non-empty subset of {allowed}, got {values}")
    if len(self.colors) * len(self.shapes) * len(self.sizes) < max(self.num_objects):
      raise ValueError("SceneSpec: too few colour x shape x size looks for num_objects objects")


@dataclasses.dataclass(frozen=True)
class Edit:
  """One attribute edit: `attribute` of object `index` (None for the background)."""

  index: int | None
  attribute: str
  old: str
  new: str


def sample_scene(rng: np.random.Generator, spec: SceneSpec) -> Scene:
  """A random scene whose objects all look different (colour, shape, size)."""
  n = int(rng.choice(spec.num_objects))
  cells = rng.choice(len(CELLS), size=n, replace=False)
  looks: list[tuple[str, str, str]] = []
  while len(looks) < n:
    look = (_pick(rng, spec.colors), _pick(rng, spec.shapes), _pick(rng, spec.sizes))
    if look not in looks:
      looks.append(look)
  objects = tuple(SceneObject(c, s, z, CELLS[int(p)])
                  for (c, s, z), p in zip(looks, cells, strict=True))
  return Scene(_pick(rng, spec.backgrounds), objects)


def _pick(rng: np.random.Generator, values: Sequence[str]) -> str:
  return values[int(rng.integers(len(values)))]


def _edit_options(scene: Scene, spec: SceneSpec, attribute: str, index: int | None) -> list[str]:
  """New values for one attribute that keep the scene valid (free cells, distinct looks)."""
  if attribute == "background":
    return [b for b in spec.backgrounds if b != scene.background]
  obj = scene.objects[index]
  if attribute == "position":
    taken = {o.position for o in scene.objects}
    return [c for c in CELLS if c not in taken]
  values = {"color": spec.colors, "shape": spec.shapes, "size": spec.sizes}[attribute]
  others = {o.look for i, o in enumerate(scene.objects) if i != index}
  return [v for v in values if v != getattr(obj, attribute)
          and dataclasses.replace(obj, **{attribute: v}).look not in others]


def apply_edit(scene: Scene, edit: Edit) -> Scene:
  if edit.index is None:
    return dataclasses.replace(scene, background=edit.new)
  objects = list(scene.objects)
  objects[edit.index] = dataclasses.replace(objects[edit.index], **{edit.attribute: edit.new})
  return dataclasses.replace(scene, objects=tuple(objects))


def random_edit(rng: np.random.Generator, scene: Scene, spec: SceneSpec) -> Edit:
  """A uniformly drawn valid edit of one editable attribute (background or one object's)."""
  options = []
  for attribute in spec.editable:
    for index in [None] if attribute == "background" else range(len(scene.objects)):
      for new in _edit_options(scene, spec, attribute, index):
        old = scene.background if index is None else getattr(scene.objects[index], attribute)
        options.append(Edit(index, attribute, old, new))
  if not options:
    raise ValueError(f"SceneSpec leaves no valid edit for scene {scene.caption()!r}")
  return options[int(rng.integers(len(options)))]


@dataclasses.dataclass(frozen=True)
class Difference:
  """How a candidate differs from a target. kind: 'edit' (one attribute of a matched object or
  the background), 'extra' (object only in the candidate), 'missing' (only in the target)."""

  kind: str
  edit: Edit | None = None
  obj: SceneObject | None = None


def _object_cost(a: SceneObject | None, b: SceneObject | None) -> int:
  if a is None or b is None:
    return len(OBJECT_ATTRIBUTES)
  return sum(getattr(a, f) != getattr(b, f) for f in OBJECT_ATTRIBUTES)


def differences(target: Scene, candidate: Scene) -> list[Difference]:
  """The cheapest edit script from `target` to `candidate` (see module docstring)."""
  n = max(len(target.objects), len(candidate.objects))
  tgt = list(target.objects) + [None] * (n - len(target.objects))
  cand = list(candidate.objects) + [None] * (n - len(candidate.objects))
  best = min(itertools.permutations(range(n)),
             key=lambda perm: sum(_object_cost(tgt[i], cand[j]) for i, j in enumerate(perm)))
  out = []
  if target.background != candidate.background:
    out.append(Difference("edit", Edit(None, "background", target.background,
                                       candidate.background)))
  for i, j in enumerate(best):
    a, b = tgt[i], cand[j]
    if a is None:
      out.append(Difference("extra", obj=b))
    elif b is None:
      out.append(Difference("missing", obj=a))
    else:
      out.extend(Difference("edit", Edit(i, f, getattr(a, f), getattr(b, f)))
                 for f in OBJECT_ATTRIBUTES if getattr(a, f) != getattr(b, f))
  return out


def distance(target: Scene, candidate: Scene) -> int:
  """Number of attribute edits between two scenes; 0 iff their keys are equal."""
  cost = {"edit": 1, "extra": len(OBJECT_ATTRIBUTES), "missing": len(OBJECT_ATTRIBUTES)}
  return sum(cost[d.kind] for d in differences(target, candidate))


def refer(scene: Scene, index: int, *, avoid: str | None = None, use: str | None = None) -> str:
  """The shortest phrase picking object `index` out of `scene`: 'the circle', 'the red circle',
  'the object at the top'. `avoid` is an attribute the phrase must not name, `use` one it must."""
  obj = scene.objects[index]
  for attrs in (("shape",), ("color", "shape"), ("size", "shape"), ("size", "color", "shape"),
                ("color",), ("size", "color"), ("position",)):
    if avoid in attrs or (use is not None and use not in attrs):
      continue
    same = [o for o in scene.objects if all(getattr(o, a) == getattr(obj, a) for a in attrs)]
    if len(same) == 1:
      words = [getattr(obj, a) for a in attrs if a in ("size", "color")]
      noun = obj.shape if "shape" in attrs else "object"
      where = f" at the {obj.position}" if "position" in attrs else ""
      return " ".join(["the", *words, noun]) + where
  return f"the {obj.size} {obj.color} {obj.shape} at the {obj.position}"


def describe_difference(target: Scene, diff: Difference) -> str:
  """'the red object is a star, not a circle', 'the background is black, not gray'."""
  if diff.kind == "extra":
    return f"it has an extra {diff.obj.size} {diff.obj.color} {diff.obj.shape}"
  if diff.kind == "missing":
    return f"it lacks the {diff.obj.size} {diff.obj.color} {diff.obj.shape}"
  e = diff.edit
  if e.attribute == "background":
    return f"the background is {e.new}, not {e.old}"
  ref = refer(target, e.index, avoid=e.attribute)
  if e.attribute == "shape":
    return f"{ref} is a {e.new}, not a {e.old}"
  if e.attribute == "position":
    return f"{ref} is at the {e.new}, not at the {e.old}"
  return f"{ref} is {e.new}, not {e.old}"


def describe_edit(scene: Scene, edit: Edit) -> str:
  """A composed-retrieval instruction: 'the same scene with the red circle turned blue'."""
  if edit.attribute == "background":
    return f"the same scene on a {edit.new} background"
  ref = refer(scene, edit.index, use=None if edit.attribute == "position" else edit.attribute)
  verb = {"color": f"turned {edit.new}", "shape": f"turned into a {edit.new}",
          "size": f"made {edit.new}", "position": f"moved to the {edit.new}"}[edit.attribute]
  return f"the same scene with {ref} {verb}"


def render(scene: Scene, image_size: int, rng: np.random.Generator) -> Image.Image:
  """Draws the scene; `rng` jitters each object's centre so renderings of one scene differ."""
  image = Image.new("RGB", (image_size, image_size), _RGB[scene.background])
  draw = ImageDraw.Draw(image)
  cell = image_size / 3
  jitter = image_size / 28
  for obj in scene.objects:
    row, col = divmod(CELLS.index(obj.position), 3)
    cx, cy = (col + 0.5) * cell, (row + 0.5) * cell
    cx, cy = cx + rng.uniform(-jitter, jitter), cy + rng.uniform(-jitter, jitter)
    r = cell * (0.22 if obj.size == "small" else 0.38)
    _draw_shape(draw, obj.shape, cx, cy, r, _RGB[obj.color])
  return image


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float,
                fill: tuple[int, int, int]) -> None:
  if shape == "circle":
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
  elif shape == "square":
    s = r * 0.85
    draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
  elif shape == "triangle":
    draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill)
  elif shape == "diamond":
    draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
  elif shape == "star":
    angles = np.pi / 2 + np.arange(10) * np.pi / 5
    radii = np.where(np.arange(10) % 2 == 0, r, r * 0.45)
    points = zip(cx + radii * np.cos(angles), cy - radii * np.sin(angles), strict=True)
    draw.polygon(list(points), fill=fill)
  else:
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
