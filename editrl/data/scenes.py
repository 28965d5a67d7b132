"""Procedural scenes: the vocabulary instructions are written in, and the renderer.

Textured shapes move over (and occlude each other in front of) a textured background that pans like a camera. A
scene is plain data (`Scene`); `render` turns it into frames plus a per-pixel id of what each pixel shows, which is
what makes the edit masks exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np


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


def pick(rng: np.random.Generator, seq: tuple[str, ...] | list[str]) -> str:
    return str(seq[int(rng.integers(len(seq)))])


def cap(text: str) -> str:
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
        return pick(rng, SHAPES[self.shape])

    def the(self, rng: np.random.Generator) -> str:
        """A definite description; colours and shapes are unique in a scene, so any of these is unambiguous."""
        roll = rng.random()
        if roll < 0.2:
            return f"the {self.noun(rng)}"
        if roll < 0.4:
            return f"the {pick(rng, TEXTURES[self.texture])} {self.color} {self.noun(rng)}"
        return f"the {self.color} {self.noun(rng)}"

    def a(self, rng: np.random.Generator) -> str:
        if rng.random() < 0.3:
            return _article(f"{pick(rng, TEXTURES[self.texture])} {self.color} {self.noun(rng)}")
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
        return pick(rng, BACKDROPS[self.kind]).format(a=self.colors[0], b=self.colors[1])


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
