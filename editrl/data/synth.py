"""Synthetic paired edit data: (source video, instruction, [reference image], target video, edit mask).

The paper builds its paired data by editing real videos with models; on a CPU and for exact ground
truth, editrl draws procedural scenes instead: textured shapes moving over (and occluding each other
in front of) a textured background that pans like a camera, rendered twice, before and after an edit.

Generators are plugins behind `PairGenerator` (registry `GENERATORS`, entry-point group
`editrl.generators`): `generate(op, rng, sample_id) -> EditSample`. The procedural one is the first;
a model-based one (image editing + image-to-video) only has to return the same EditSample, and
`synthesize` writes it through the manifest writer, so the loader never changes.

Operations (categories), and the VIE-Bench category each one stands for:

    add             Add              an object appears (named by colour, shape, sometimes texture and place)
    remove          Remove           an object disappears; what it hid shows through
    replace         Swap             an object becomes another one (same motion)
    recolor         Swap (attribute) an object changes colour
    background      Background       the background changes; the objects stay
    style           Style/Tone       grayscale, sepia, warm, cool or inverted colours (global)
    reference_add   Reference-Add    the object to add is given only as a reference image
    reference_swap  Reference-Swap   an object is replaced by the one in the reference image
    hybrid          Hybrid           two of add/remove/replace/recolor/background/style in one instruction

Edit masks are exact: True where what is visible changes (an object that appears, disappears, changes,
or is uncovered; the background where it changes; everything for a style edit), so the target equals
the source wherever the mask is False.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import zlib
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Protocol, runtime_checkable

import numpy as np
import torch
from pydantic import Field, field_validator

from editrl import monitor
from editrl.data.manifest import MANIFEST_NAME, ManifestDataset, ManifestRow, write_manifest, write_sample
from editrl.base import StrictModel
from editrl.registry import Registry, RegistryError, did_you_mean
from editrl.types import EditSample

OPS = ("add", "remove", "replace", "recolor", "background", "style", "reference_add", "reference_swap", "hybrid")
HYBRID_PARTS = ("add", "remove", "replace", "recolor", "background", "style")


@runtime_checkable
class PairGenerator(Protocol):
    """Makes one paired sample for an operation; all randomness comes from `rng` (reproducibility)."""

    name: str
    version: str  # part of the cache key: bump it when the output for a seed changes
    ops: tuple[str, ...]

    def generate(self, op: str, rng: np.random.Generator, sample_id: str) -> EditSample: ...


GENERATORS: Registry[Any] = Registry(
    "pair generator", "editrl.generators", {"procedural": "editrl.data.synth:ProceduralGenerator"}
)


def check_frames(frames: int) -> int:
    """Wan-style video VAEs compress time 4x after the first frame, so clips have 4k+1 frames."""
    if frames < 1 or frames % 4 != 1:
        raise ValueError(f"frames must be 4k+1 (5, 9, 13, ...) for video VAEs, got {frames}")
    return frames


# ---------------------------------------------------------------- vocabulary

COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.12, 0.12),
    "orange": (0.96, 0.55, 0.10),
    "yellow": (0.95, 0.88, 0.15),
    "green": (0.15, 0.68, 0.22),
    "teal": (0.05, 0.58, 0.58),
    "blue": (0.15, 0.30, 0.90),
    "purple": (0.55, 0.20, 0.75),
    "pink": (0.98, 0.55, 0.75),
    "brown": (0.50, 0.30, 0.12),
    "white": (0.97, 0.97, 0.97),
    "black": (0.06, 0.06, 0.06),
}
SHAPES: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "disc", "round shape"),
    "square": ("square", "box", "block"),
    "triangle": ("triangle", "triangular shape"),
    "diamond": ("diamond", "rhombus"),
    "star": ("star", "star shape"),
    "ring": ("ring", "donut", "hoop"),
    "cross": ("cross", "plus sign", "plus shape"),
}
TEXTURES: dict[str, tuple[str, ...]] = {
    "solid": ("plain", "solid"),
    "striped": ("striped",),
    "checkered": ("checkered",),
    "dotted": ("dotted", "spotted"),
}
BACKDROPS: dict[str, tuple[str, ...]] = {
    "gradient": ("a {a} and {b} gradient", "a gradient from {a} to {b}", "a smooth {a}-to-{b} gradient"),
    "stripes": ("{a} and {b} stripes", "a striped {a} and {b} pattern"),
    "checker": ("a {a} and {b} checkerboard", "a checkered {a} and {b} pattern"),
    "waves": ("{a} and {b} waves", "a wavy {a} and {b} pattern"),
}
TONES: dict[str, tuple[str, ...]] = {
    "grayscale": ("make the video black and white", "convert the video to grayscale", "remove all color from the video",
                  "turn the footage grayscale"),
    "sepia": ("give the video a sepia tone", "make it look like an old sepia photo", "apply a vintage sepia filter"),
    "warm": ("give the video a warm tone", "make the colors warmer", "apply a warm golden filter", "warm up the colors"),
    "cool": ("give the video a cool blue tone", "make the colors colder", "apply a cold bluish filter",
             "cool down the colors"),
    "invert": ("invert the colors of the video", "turn the video into a color negative",
               "show the video as a photo negative"),
}
CLAUSES: dict[str, tuple[str, ...]] = {
    "add": ("{verb} {a_obj}{where}", "{verb} {a_obj} into the scene{where}", "make {a_obj} appear{where}"),
    "remove": ("{verb} {the_obj}", "{verb} {the_obj} from the video", "make {the_obj} disappear"),
    "replace": ("replace {the_obj} with {a_new}", "swap {the_obj} for {a_new}", "turn {the_obj} into {a_new}",
                "change {the_obj} into {a_new}", "substitute {a_new} for {the_obj}"),
    "recolor": ("make {the_obj} {color}", "change the color of {the_obj} to {color}", "paint {the_obj} {color}",
                "recolor {the_obj} {color}", "turn {the_obj} {color}", "give {the_obj} a {color} color"),
    "background": ("change the background to {bg}", "replace the background with {bg}", "make the background {bg}",
                   "swap the background for {bg}", "use {bg} as the background"),
    "reference_add": ("{verb} the object from the reference image{where}", "{verb} the object shown in the reference{where}",
                      "{verb} the reference object into the scene{where}",
                      "make the object in the reference image appear{where}"),
    "reference_swap": ("replace {the_obj} with the object in the reference image", "swap {the_obj} for the reference object",
                       "turn {the_obj} into the object shown in the reference",
                       "substitute the object from the reference image for {the_obj}"),
}
VERBS: dict[str, tuple[str, ...]] = {
    "add": ("add", "insert", "put", "place"),
    "remove": ("remove", "delete", "erase", "take out", "get rid of"),
}
SENTENCES = ("{C}.", "Please {c}.", "{C}, please.", "Could you {c}?", "I want you to {c}.")
JOINS = ("{C1} and {c2}.", "{C1}, then {c2}.", "{C1}. Also, {c2}.", "Please {c1} and {c2}.", "{C1}; after that, {c2}.")
PLACES: dict[tuple[int, int], tuple[str, ...]] = {
    (0, 0): ("in the top left", "in the upper left corner"),
    (0, 1): ("at the top", "near the top"),
    (0, 2): ("in the top right", "in the upper right corner"),
    (1, 0): ("on the left", "on the left side"),
    (1, 1): ("in the center", "in the middle"),
    (1, 2): ("on the right", "on the right side"),
    (2, 0): ("in the bottom left", "in the lower left corner"),
    (2, 1): ("at the bottom", "near the bottom"),
    (2, 2): ("in the bottom right", "in the lower right corner"),
}


def _pick(rng: np.random.Generator, seq: tuple[str, ...] | list[str]) -> str:
    return str(seq[int(rng.integers(len(seq)))])


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _article(phrase: str) -> str:
    return ("an " if phrase[:1] in "aeiou" else "a ") + phrase


# ---------------------------------------------------------------- scenes


@dataclass(frozen=True)
class Obj:
    """A textured shape. Positions are in units of the frame's shorter side, (y, x), in view coordinates."""

    uid: int
    shape: str
    color: str
    texture: str
    radius: float
    start: tuple[float, float]
    end: tuple[float, float]
    angle: float
    spin: float  # radians over the clip
    tex_freq: float

    def noun(self, rng: np.random.Generator) -> str:
        return _pick(rng, SHAPES[self.shape])

    def the(self, rng: np.random.Generator) -> str:
        """A definite description; colours and shapes are unique in a scene, so any of these is unambiguous."""
        roll = rng.random()
        if roll < 0.2:
            return f"the {self.noun(rng)}"
        if roll < 0.4:
            return f"the {_pick(rng, TEXTURES[self.texture])} {self.color} {self.noun(rng)}"
        return f"the {self.color} {self.noun(rng)}"

    def a(self, rng: np.random.Generator) -> str:
        if rng.random() < 0.3:
            return _article(f"{_pick(rng, TEXTURES[self.texture])} {self.color} {self.noun(rng)}")
        return _article(f"{self.color} {self.noun(rng)}")

    def describe(self) -> str:
        return f"{self.texture} {self.color} {self.shape}"


@dataclass(frozen=True)
class Backdrop:
    kind: str  # gradient | stripes | checker | waves | plain
    colors: tuple[str, str]
    angle: float
    freq: float

    def phrase(self, rng: np.random.Generator) -> str:
        return _pick(rng, BACKDROPS[self.kind]).format(a=self.colors[0], b=self.colors[1])


@dataclass(frozen=True)
class Scene:
    backdrop: Backdrop
    objects: tuple[Obj, ...]  # back to front
    pan: tuple[float, float]  # camera travel over the clip, (y, x)
    tone: str | None = None


def _rgb(name: str) -> np.ndarray:
    return np.asarray(COLORS[name], dtype=np.float32)


def _backdrop_pixels(b: Backdrop, wy: np.ndarray, wx: np.ndarray) -> np.ndarray:
    """(T, H, W, 3) background at world coordinates; colours are muted so objects stand out."""
    if b.kind == "plain":
        return np.full(wy.shape + (3,), 0.5, dtype=np.float32)
    cos, sin = float(np.cos(b.angle)), float(np.sin(b.angle))  # Python floats keep the arrays float32
    d = cos * wx + sin * wy
    e = cos * wy - sin * wx
    if b.kind == "gradient":
        s = 0.5 + 0.5 * np.sin(np.pi * b.freq * d)
    elif b.kind == "stripes":
        s = (np.sin(2 * np.pi * b.freq * d) > 0).astype(np.float32)
    elif b.kind == "checker":
        s = (np.sin(2 * np.pi * b.freq * d) * np.sin(2 * np.pi * b.freq * e) > 0).astype(np.float32)
    else:  # waves
        s = 0.5 + 0.5 * np.sin(2 * np.pi * b.freq * d + 1.5 * np.sin(2 * np.pi * b.freq * e))
    ca = 0.7 * _rgb(b.colors[0]) + 0.15
    cb = 0.7 * _rgb(b.colors[1]) + 0.15
    s = s[..., None].astype(np.float32)
    return ca * (1 - s) + cb * s


SQRT3 = 3**0.5


def _inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Shape membership in local coordinates normalised by the radius."""
    if shape == "circle":
        return u * u + v * v <= 1
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1
    if shape == "triangle":
        return (v <= 0.5) & (SQRT3 * u - v <= 1) & (-SQRT3 * u - v <= 1)
    rho = np.sqrt(u * u + v * v)
    if shape == "ring":
        return (rho <= 1) & (rho >= 0.55)
    if shape == "star":
        return rho <= 0.6 + 0.4 * np.cos(5 * np.arctan2(v, u))
    if shape == "cross":
        return ((np.abs(u) <= 0.3) & (np.abs(v) <= 1)) | ((np.abs(v) <= 0.3) & (np.abs(u) <= 1))
    raise ValueError(f"unknown shape {shape!r}")


def _texture(kind: str, u: np.ndarray, v: np.ndarray, k: float) -> np.ndarray:
    """A 0/1 pattern that moves and turns with the object."""
    if kind == "solid":
        return np.zeros_like(u)
    if kind == "striped":
        return (np.sin(np.pi * k * u) > 0).astype(np.float32)
    if kind == "checkered":
        return (np.sin(np.pi * k * u) * np.sin(np.pi * k * v) > 0).astype(np.float32)
    fu, fv = (k * u / 2) % 1 - 0.5, (k * v / 2) % 1 - 0.5  # dotted
    return (fu * fu + fv * fv < 0.08).astype(np.float32)


TONE_FUNCS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "grayscale": lambda x: np.repeat((x @ np.float32([0.299, 0.587, 0.114]))[..., None], 3, axis=-1),
    "sepia": lambda x: x @ np.float32([[0.393, 0.349, 0.272], [0.769, 0.686, 0.534], [0.189, 0.168, 0.131]]),
    "warm": lambda x: x * np.float32([1.15, 1.0, 0.75]) + np.float32([0.06, 0.02, 0.0]),
    "cool": lambda x: x * np.float32([0.75, 0.95, 1.15]) + np.float32([0.0, 0.02, 0.08]),
    "invert": lambda x: 1 - x,
}


def render(scene: Scene, frames: int, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(T, H, W, 3) uint8 frames and (T, H, W) int16 ids of what each pixel shows (-1: background)."""
    h, w = size
    unit = min(h, w)
    tau = np.linspace(0, 1, frames, dtype=np.float32)[:, None, None]
    ys = ((np.arange(h, dtype=np.float32) + 0.5) / unit)[None, :, None]
    xs = ((np.arange(w, dtype=np.float32) + 0.5) / unit)[None, None, :]
    ys, xs = np.broadcast_to(ys, (frames, h, w)), np.broadcast_to(xs, (frames, h, w))
    # The camera pans over the world: the background slides, the (tracked) objects keep their view path.
    img = _backdrop_pixels(scene.backdrop, ys + scene.pan[0] * tau, xs + scene.pan[1] * tau)
    ids = np.full((frames, h, w), -1, dtype=np.int16)
    for o in scene.objects:
        cy = o.start[0] + (o.end[0] - o.start[0]) * tau
        cx = o.start[1] + (o.end[1] - o.start[1]) * tau
        a = o.angle + o.spin * tau
        dy, dx = ys - cy, xs - cx
        u = (np.cos(a) * dx + np.sin(a) * dy) / o.radius
        v = (-np.sin(a) * dx + np.cos(a) * dy) / o.radius
        inside = _inside(o.shape, u, v)
        base = _rgb(o.color)
        toward = np.float32(1.0 if base.mean() < 0.5 else 0.0)
        p = 0.45 * _texture(o.texture, u, v, o.tex_freq)[..., None]
        color = base * (1 - p) + toward * p
        img = np.where(inside[..., None], color, img)
        ids[inside] = o.uid
    if scene.tone is not None:
        img = TONE_FUNCS[scene.tone](img)
    return np.rint(np.clip(img, 0, 1) * 255).astype(np.uint8), ids


# ---------------------------------------------------------------- the procedural generator


@dataclass
class _Edit:
    """An edit being built: the scene so far, what changed, and the words for it."""

    scene: Scene
    next_uid: int
    visible: dict[int, int]  # uid -> fewest pixels it shows in any source frame
    min_pixels: int
    touched: set[int] = field(default_factory=set)  # objects an earlier op already edited
    restyled: set[int] = field(default_factory=set)  # objects whose look changed in place
    backdrop_changed: bool = False
    reference: Obj | None = None
    placed: list[int] = field(default_factory=list)  # new objects that must be visible
    clauses: list[str] = field(default_factory=list)
    edits: list[dict[str, Any]] = field(default_factory=list)

    def used_colors(self) -> set[str]:
        return {o.color for o in self.scene.objects} | set(self.scene.backdrop.colors)

    def used_shapes(self) -> set[str]:
        return {o.shape for o in self.scene.objects}


class ProceduralGenerator:
    """Textured shapes over a panning textured background; exact targets and masks for every op."""

    name = "procedural"
    version = "1"
    ops = OPS

    def __init__(self, frames: int = 9, size: tuple[int, int] = (64, 64)) -> None:
        self.frames = frames
        self.size = (int(size[0]), int(size[1]))
        if min(self.size) < 16:
            raise ValueError(f"size must be at least 16x16, got {self.size[0]}x{self.size[1]}")
        self.min_pixels = max(4, self.size[0] * self.size[1] // 100)

    # ----- random parts

    def _object(self, rng: np.random.Generator, uid: int, colors: set[str], shapes: set[str], path: Obj | None = None) -> Obj:
        """A new object avoiding the given colours and shapes; `path` copies another object's motion."""
        color = _pick(rng, [c for c in COLORS if c not in colors])
        shape = _pick(rng, [s for s in SHAPES if s not in shapes])
        texture = _pick(rng, list(TEXTURES))
        h, w = self.size
        unit = min(h, w)
        if path is not None:
            motion = dict(radius=path.radius, start=path.start, end=path.end, angle=path.angle, spin=path.spin)
        else:
            lo, hi = 0.18, 0.82

            def point() -> tuple[float, float]:
                return (float(rng.uniform(lo, hi)) * h / unit, float(rng.uniform(lo, hi)) * w / unit)

            motion = dict(
                radius=float(rng.uniform(0.11, 0.19)),
                start=point(),
                end=point(),
                angle=float(rng.uniform(0, 2 * np.pi)),
                spin=float(rng.uniform(-1.5, 1.5)),
            )
        return Obj(uid=uid, shape=shape, color=color, texture=texture, tex_freq=float(rng.uniform(2.5, 4.5)), **motion)

    def _backdrop(self, rng: np.random.Generator, avoid: set[str]) -> Backdrop:
        a, b = rng.choice([c for c in COLORS if c not in avoid], size=2, replace=False)
        return Backdrop(
            kind=_pick(rng, list(BACKDROPS)),
            colors=(str(a), str(b)),
            angle=float(rng.uniform(0, np.pi)),
            freq=float(rng.uniform(0.6, 1.2)) if rng.random() < 0.5 else float(rng.uniform(2.0, 4.0)),
        )

    def _scene(self, rng: np.random.Generator) -> Scene:
        backdrop = self._backdrop(rng, set())
        colors, shapes = set(backdrop.colors), set()
        objects = []
        for uid in range(int(rng.integers(2, 4))):
            o = self._object(rng, uid, colors, shapes)
            colors.add(o.color)
            shapes.add(o.shape)
            objects.append(o)
        pan = (float(rng.uniform(-0.3, 0.3)), float(rng.uniform(-0.4, 0.4)))
        return Scene(backdrop=backdrop, objects=tuple(objects), pan=pan)

    def _place(self, rng: np.random.Generator, o: Obj) -> str:
        """Where the object is on average (often left out: a plain "add a red star" is an instruction too)."""
        if rng.random() < 0.5:
            return ""
        h, w = self.size
        unit = min(h, w)
        y = (o.start[0] + o.end[0]) / 2 * unit / h
        x = (o.start[1] + o.end[1]) / 2 * unit / w
        return " " + _pick(rng, PLACES[(min(int(y * 3), 2), min(int(x * 3), 2))])

    def _target_object(self, rng: np.random.Generator, ed: _Edit) -> Obj:
        """An untouched object that is clearly visible in the source (the most visible as a fallback)."""
        free = [o for o in ed.scene.objects if o.uid not in ed.touched and o.uid in ed.visible]
        clear = [o for o in free if ed.visible[o.uid] >= ed.min_pixels]
        if clear:
            return clear[int(rng.integers(len(clear)))]
        return max(free, key=lambda o: ed.visible[o.uid])

    # ----- operations: each edits `ed.scene` and says what it did

    def _op_add(self, rng: np.random.Generator, ed: _Edit, reference: bool = False) -> None:
        o = self._object(rng, ed.next_uid, ed.used_colors(), ed.used_shapes())
        ed.next_uid += 1
        objects = list(ed.scene.objects)
        objects.insert(len(objects) if rng.random() < 0.7 else int(rng.integers(len(objects) + 1)), o)
        ed.scene = replace(ed.scene, objects=tuple(objects))
        ed.touched.add(o.uid)
        ed.placed.append(o.uid)
        op = "reference_add" if reference else "add"
        where = self._place(rng, o)
        verbs = VERBS["add"] if where else VERBS["add"][:2]  # "put"/"place" want a place
        words = dict(verb=_pick(rng, verbs), a_obj=o.a(rng), where=where)
        ed.clauses.append(_pick(rng, CLAUSES[op]).format(**words))
        if reference:
            ed.reference = o
        ed.edits.append({"op": op, "object": o.describe()})

    def _op_remove(self, rng: np.random.Generator, ed: _Edit) -> None:
        o = self._target_object(rng, ed)
        ed.scene = replace(ed.scene, objects=tuple(x for x in ed.scene.objects if x.uid != o.uid))
        ed.touched.add(o.uid)
        ed.clauses.append(_pick(rng, CLAUSES["remove"]).format(verb=_pick(rng, VERBS["remove"]), the_obj=o.the(rng)))
        ed.edits.append({"op": "remove", "object": o.describe()})

    def _op_replace(self, rng: np.random.Generator, ed: _Edit, reference: bool = False) -> None:
        old = self._target_object(rng, ed)
        new = self._object(rng, ed.next_uid, ed.used_colors(), ed.used_shapes(), path=old)
        ed.next_uid += 1
        ed.scene = replace(ed.scene, objects=tuple(new if x.uid == old.uid else x for x in ed.scene.objects))
        ed.touched |= {old.uid, new.uid}
        op = "reference_swap" if reference else "replace"
        ed.clauses.append(_pick(rng, CLAUSES[op]).format(the_obj=old.the(rng), a_new=new.a(rng)))
        if reference:
            ed.reference = new
        ed.edits.append({"op": op, "object": old.describe(), "to": new.describe()})

    def _op_recolor(self, rng: np.random.Generator, ed: _Edit) -> None:
        old = self._target_object(rng, ed)
        color = _pick(rng, [c for c in COLORS if c not in ed.used_colors()])
        new = replace(old, color=color)
        ed.scene = replace(ed.scene, objects=tuple(new if x.uid == old.uid else x for x in ed.scene.objects))
        ed.touched.add(old.uid)
        ed.restyled.add(old.uid)
        ed.clauses.append(_pick(rng, CLAUSES["recolor"]).format(the_obj=old.the(rng), color=color))
        ed.edits.append({"op": "recolor", "object": old.describe(), "to": color})

    def _op_background(self, rng: np.random.Generator, ed: _Edit) -> None:
        old = ed.scene.backdrop
        new = self._backdrop(rng, {o.color for o in ed.scene.objects} | set(old.colors))
        ed.scene = replace(ed.scene, backdrop=new)
        ed.backdrop_changed = True
        ed.clauses.append(_pick(rng, CLAUSES["background"]).format(bg=new.phrase(rng)))
        ed.edits.append({"op": "background", "to": f"{new.colors[0]} and {new.colors[1]} {new.kind}"})

    def _op_style(self, rng: np.random.Generator, ed: _Edit) -> None:
        tone = _pick(rng, list(TONES))
        ed.scene = replace(ed.scene, tone=tone)
        ed.clauses.append(_pick(rng, TONES[tone]))
        ed.edits.append({"op": "style", "tone": tone})

    def _apply(self, op: str, rng: np.random.Generator, ed: _Edit) -> None:
        if op == "reference_add":
            self._op_add(rng, ed, reference=True)
        elif op == "reference_swap":
            self._op_replace(rng, ed, reference=True)
        else:
            getattr(self, f"_op_{op}")(rng, ed)

    # ----- one sample

    def generate(self, op: str, rng: np.random.Generator, sample_id: str) -> EditSample:
        if op not in OPS:
            raise ValueError(f"unknown op {op!r}{did_you_mean(op, OPS)}; known: {', '.join(OPS)}")
        source = self._scene(rng)
        src_px, src_ids = render(source, self.frames, self.size)
        visible = {o.uid: int((src_ids == o.uid).sum((1, 2)).min()) for o in source.objects}
        ed = _Edit(scene=source, next_uid=len(source.objects), visible=visible, min_pixels=self.min_pixels)
        if op == "hybrid":
            parts = [str(p) for p in rng.choice(HYBRID_PARTS, size=2, replace=False)]
            parts.sort(key=lambda p: p == "style")  # a tone applies to the finished picture: say it last
        else:
            parts = [op]
        for part in parts:
            self._apply(part, rng, ed)
        tgt_px, tgt_ids = render(ed.scene, self.frames, self.size)
        hidden = [uid for uid in ed.placed if (tgt_ids == uid).sum((1, 2)).min() < self.min_pixels]
        if hidden:  # an added object must be seen: bring it to the front
            front = [o for o in ed.scene.objects if o.uid in hidden]
            ed.scene = replace(ed.scene, objects=tuple(o for o in ed.scene.objects if o.uid not in hidden) + tuple(front))
            tgt_px, tgt_ids = render(ed.scene, self.frames, self.size)
        mask = (src_ids != tgt_ids) | np.isin(src_ids, list(ed.restyled)) | np.isin(tgt_ids, list(ed.restyled))
        if ed.backdrop_changed:
            mask |= (src_ids == -1) | (tgt_ids == -1)
        if ed.scene.tone is not None:
            mask[:] = True
        if len(ed.clauses) == 1:
            c = ed.clauses[0]
            instruction = _pick(rng, SENTENCES).format(C=_cap(c), c=c)
        else:
            c1, c2 = ed.clauses
            instruction = _pick(rng, JOINS).format(C1=_cap(c1), c1=c1, c2=c2)
        reference = None
        if ed.reference is not None:
            unit = min(self.size)
            center = (self.size[0] / unit / 2, self.size[1] / unit / 2)
            alone = replace(ed.reference, start=center, end=center, radius=0.32, angle=0.0, spin=0.0)
            plain = Scene(Backdrop("plain", ("white", "white"), 0.0, 0.0), (alone,), (0.0, 0.0))
            reference = _to_video(render(plain, 1, self.size)[0])[0]
        return EditSample(
            id=sample_id,
            instruction=instruction,
            source=_to_video(src_px),
            target=_to_video(tgt_px),
            mask=torch.from_numpy(mask[:, None].copy()),
            reference=reference,
            category=op,
            meta={"generator": self.name, "ops": parts, "edits": ed.edits, "global": bool(mask.all())},
        )


def _to_video(frames: np.ndarray) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (T, 3, H, W) float in [0, 1] (exactly invertible by rounding)."""
    return torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255.0


# ---------------------------------------------------------------- writing a data folder


def build_generator(name: str, frames: int, size: tuple[int, int], **options: Any) -> PairGenerator:
    return GENERATORS.build(name, frames=frames, size=size, **options)


def sample_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """Each sample's own stream: independent of workers and chunking, so any split of the work is identical."""
    return np.random.default_rng([seed, zlib.crc32(split.encode()), index])


def check_ops(ops: list[str] | tuple[str, ...] | None, known: tuple[str, ...]) -> list[str]:
    """The requested ops (all by default), each checked, with a did-you-mean for a typo."""
    ops = list(known) if not ops else list(ops)
    for op in ops:
        if op not in known:
            raise ValueError(f"unknown op {op!r}{did_you_mean(op, known)}; known: {', '.join(known)}")
    return ops


def _make_chunk(spec: dict[str, Any], items: list[tuple[int, str]]) -> list[tuple[int, dict[str, Any]]]:
    """Worker: generate and write some samples; rows come back to be written in index order."""
    torch.set_num_threads(1)
    gen = build_generator(spec["generator"], spec["frames"], spec["size"])
    out = []
    for index, op in items:
        sample = gen.generate(op, sample_rng(spec["seed"], spec["split"], index), f"{spec['split']}-{index:06d}")
        out.append((index, write_sample(spec["out"], sample).model_dump()))
    return out


def synthesize(
    out: str | Path,
    n: int,
    seed: int = 0,
    ops: list[str] | None = None,
    frames: int = 9,
    size: tuple[int, int] = (64, 64),
    split: str = "train",
    generator: str = "procedural",
    workers: int | None = None,
    progress: bool = True,
    bar: monitor.Bar | None = None,
) -> Path:
    """Generate `n` samples (ops taken in turn, so categories are balanced) into `out`; the manifest path.

    The same arguments give a byte-identical manifest and media, whatever `workers` is. Progress shows on its own
    bar, or advances `bar` (one bar for several datasets).
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    check_frames(frames)
    gen = build_generator(generator, frames, size)  # validates size and options before any work
    ops = check_ops(ops, gen.ops)
    out = Path(out)
    if (out / MANIFEST_NAME).exists():
        raise FileExistsError(f"{out} already holds a {MANIFEST_NAME}; choose an empty folder")
    out.mkdir(parents=True, exist_ok=True)
    items = [(i, ops[i % len(ops)]) for i in range(n)]
    if workers is None:
        # A worker costs seconds to start (torch import) and one process already does ~30 samples/s at 64x64;
        # on a 2-core machine shared with other work, 2 workers measured slower than 1 (benchmarks/synth_speed.py).
        workers = max(1, min((os.cpu_count() or 1) // 2, 8, n // 500))
    spec = dict(generator=generator, frames=frames, size=tuple(size), seed=seed, split=split, out=str(out))
    chunk = max(1, min(64, -(-n // (workers * 4))))
    chunks = [items[i : i + chunk] for i in range(0, n, chunk)]
    rows: dict[int, dict[str, Any]] = {}

    with nullcontext(bar) if bar is not None else monitor.progress("synthetic data", n, enabled=progress) as live:
        if workers == 1:
            for c in chunks:
                rows.update(_make_chunk(spec, c))
                live.update(advance=len(c))
        else:
            import multiprocessing as mp

            # spawn: the parent may hold torch/OpenMP threads that a forked child must not inherit
            with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
                futures = {pool.submit(_make_chunk, spec, c): len(c) for c in chunks}
                for fut in as_completed(futures):
                    rows.update(fut.result())
                    live.update(advance=futures[fut])
    return write_manifest(out, [ManifestRow(**rows[i]) for i in range(n)])


# ---------------------------------------------------------------- the `synthetic` dataset kind


def cache_root() -> Path:
    return Path(os.environ.get("EDITRL_CACHE", Path.home() / ".cache" / "editrl")) / "synthetic"


class SyntheticDataset:
    """Dataset kind `synthetic`: generated into a cache folder on first use, then read as a manifest."""

    class Options(StrictModel):
        n: int = Field(64, ge=1)
        seed: int = 0
        ops: list[str] | None = None
        frames: int = 9
        size: tuple[int, int] = (64, 64)
        split: str = "train"
        generator: str = "procedural"
        cache_dir: str | None = None
        max_frames: int | None = Field(None, ge=1)

        @field_validator("frames")
        @classmethod
        def _frames(cls, v: int) -> int:
            return check_frames(v)

        def check(self) -> None:
            try:
                known = GENERATORS.get(self.generator).ops
            except RegistryError as e:
                raise ValueError(str(e)) from None
            check_ops(self.ops, known)

        def folder(self) -> Path:
            """Where this exact data lives: the options that shape the data, and the generator's version."""
            gen = GENERATORS.get(self.generator)
            keyed = self.model_dump(exclude={"cache_dir", "max_frames"}) | {"version": gen.version}
            digest = hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:12]
            root = Path(self.cache_dir) if self.cache_dir else cache_root()
            return root / f"{self.generator}-{self.split}-n{self.n}-s{self.seed}-{digest}"

    def __init__(self, options: Options) -> None:
        options.check()
        self.folder = ensure_synthetic(options)[0]
        self.data = ManifestDataset(ManifestDataset.Options(path=str(self.folder), max_frames=options.max_frames))

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> EditSample:
        return self.data[index]

    @property
    def categories(self) -> list[str | None]:
        return self.data.categories


def prepare_synthetic(*recipes: Any) -> None:
    """Make every synthetic dataset these recipes read, in one "synthetic data" phase (a job's SFT warm start and
    its GRPO run read several)."""
    sources = [d for r in recipes for d in (r.data.train, r.data.eval) if d is not None and d.kind == "synthetic"]
    if sources:
        ensure_synthetic(*[SyntheticDataset.Options.model_validate(d.options) for d in sources])


def ensure_synthetic(*options: SyntheticDataset.Options) -> list[Path]:
    """The cached folders for these options; the missing ones are generated first, under one progress bar.

    Generation goes to a private temporary folder that is renamed into place when complete, so an
    interrupted run leaves nothing half-written and concurrent ranks cannot read a partial folder.
    """
    folders = [o.folder() for o in options]
    todo = {f: o for o, f in zip(options, folders) if not (f / MANIFEST_NAME).is_file()}
    where = ", ".join(sorted({str(f.parent) for f in folders}))
    if not todo:
        monitor.skipped("data", f"cached in {where}")
        return folders
    total = sum(o.n for o in todo.values())
    monitor.announce("data", f"{total} pairs ({', '.join(f'{o.split} {o.n}' for o in todo.values())}) into {where}")
    with monitor.progress("synthetic data", total) as bar:
        for folder, o in todo.items():
            _generate(folder, o, bar)
    return folders


def _generate(folder: Path, options: SyntheticDataset.Options, bar: monitor.Bar) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    synthesize(tmp, options.n, options.seed, options.ops, options.frames, tuple(options.size), options.split,
               options.generator, bar=bar)
    try:
        tmp.rename(folder)
    except OSError:  # another process finished first: its folder is identical
        shutil.rmtree(tmp, ignore_errors=True)
        if not (folder / MANIFEST_NAME).is_file():
            raise
