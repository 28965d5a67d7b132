"""The procedural pair generator: a scene rendered before and after an edit, with the instruction that asks for it.

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

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from editrl.data.scenes import (
    BACKDROPS,
    Backdrop,
    CLAUSES,
    COLORS,
    JOINS,
    Obj,
    PLACES,
    SENTENCES,
    SHAPES,
    Scene,
    TEXTURES,
    TONES,
    VERBS,
    cap,
    pick,
    render,
)
from editrl.base import DataError
from editrl.registry import did_you_mean
from editrl.types import EditSample

OPS = ("add", "remove", "replace", "recolor", "background", "style", "reference_add", "reference_swap", "hybrid")
HYBRID_PARTS = ("add", "remove", "replace", "recolor", "background", "style")



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
    version = "2"  # 2: one-frame samples (images) say "the image" where videos say "the video"
    ops = OPS

    def __init__(
        self,
        frames: int = 9,
        size: tuple[int, int] = (64, 64),
        objects: tuple[int, int] = (2, 3),
        still: bool = False,
        solid: bool = False,
    ) -> None:
        """`objects`: how many objects a source scene has (inclusive range); `still`: no object motion, spin or
        camera pan; `solid`: untextured objects. The defaults are the full task; the others make easier ones (each
        sample draws the same random numbers either way, so only what the option names changes)."""
        self.frames = frames
        self.size = (int(size[0]), int(size[1]))
        if min(self.size) < 16:
            raise DataError(f"size must be at least 16x16, got {self.size[0]}x{self.size[1]}")
        lo, hi = (int(v) for v in objects)
        if not 2 <= lo <= hi <= len(SHAPES) - 2:  # a hybrid edit may touch two objects; adds need free shapes
            raise DataError(f"objects must be a range [lo, hi] with 2 <= lo <= hi <= {len(SHAPES) - 2}, got {list(objects)}")
        self.objects, self.still, self.solid = (lo, hi), still, solid
        self.min_pixels = max(4, self.size[0] * self.size[1] // 100)

    # ----- random parts

    def _object(self, rng: np.random.Generator, uid: int, colors: set[str], shapes: set[str], path: Obj | None = None) -> Obj:
        """A new object avoiding the given colours and shapes; `path` copies another object's motion."""
        color = pick(rng, [c for c in COLORS if c not in colors])
        shape = pick(rng, [s for s in SHAPES if s not in shapes])
        texture = pick(rng, list(TEXTURES))
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
        if self.still:
            motion.update(end=motion["start"], spin=0.0)
        return Obj(uid=uid, shape=shape, color=color, texture="solid" if self.solid else texture,
                   tex_freq=float(rng.uniform(2.5, 4.5)), **motion)

    def _backdrop(self, rng: np.random.Generator, avoid: set[str]) -> Backdrop:
        a, b = rng.choice([c for c in COLORS if c not in avoid], size=2, replace=False)
        return Backdrop(
            kind=pick(rng, list(BACKDROPS)),
            colors=(str(a), str(b)),
            angle=float(rng.uniform(0, np.pi)),
            freq=float(rng.uniform(0.6, 1.2)) if rng.random() < 0.5 else float(rng.uniform(2.0, 4.0)),
        )

    def _scene(self, rng: np.random.Generator) -> Scene:
        backdrop = self._backdrop(rng, set())
        colors, shapes = set(backdrop.colors), set()
        objects = []
        for uid in range(int(rng.integers(self.objects[0], self.objects[1] + 1))):
            o = self._object(rng, uid, colors, shapes)
            colors.add(o.color)
            shapes.add(o.shape)
            objects.append(o)
        pan = (float(rng.uniform(-0.3, 0.3)), float(rng.uniform(-0.4, 0.4)))
        return Scene(backdrop=backdrop, objects=tuple(objects), pan=(0.0, 0.0) if self.still else pan)

    def _place(self, rng: np.random.Generator, o: Obj) -> str:
        """Where the object is on average (often left out: a plain "add a red star" is an instruction too)."""
        if rng.random() < 0.5:
            return ""
        h, w = self.size
        unit = min(h, w)
        y = (o.start[0] + o.end[0]) / 2 * unit / h
        x = (o.start[1] + o.end[1]) / 2 * unit / w
        return " " + pick(rng, PLACES[(min(int(y * 3), 2), min(int(x * 3), 2))])

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
        words = dict(verb=pick(rng, verbs), a_obj=o.a(rng), where=where)
        ed.clauses.append(pick(rng, CLAUSES[op]).format(**words))
        if reference:
            ed.reference = o
        ed.edits.append({"op": op, "object": o.describe()})

    def _op_remove(self, rng: np.random.Generator, ed: _Edit) -> None:
        o = self._target_object(rng, ed)
        ed.scene = replace(ed.scene, objects=tuple(x for x in ed.scene.objects if x.uid != o.uid))
        ed.touched.add(o.uid)
        ed.clauses.append(pick(rng, CLAUSES["remove"]).format(verb=pick(rng, VERBS["remove"]), the_obj=o.the(rng)))
        ed.edits.append({"op": "remove", "object": o.describe()})

    def _op_replace(self, rng: np.random.Generator, ed: _Edit, reference: bool = False) -> None:
        old = self._target_object(rng, ed)
        new = self._object(rng, ed.next_uid, ed.used_colors(), ed.used_shapes(), path=old)
        ed.next_uid += 1
        ed.scene = replace(ed.scene, objects=tuple(new if x.uid == old.uid else x for x in ed.scene.objects))
        ed.touched |= {old.uid, new.uid}
        op = "reference_swap" if reference else "replace"
        ed.clauses.append(pick(rng, CLAUSES[op]).format(the_obj=old.the(rng), a_new=new.a(rng)))
        if reference:
            ed.reference = new
        ed.edits.append({"op": op, "object": old.describe(), "to": new.describe()})

    def _op_recolor(self, rng: np.random.Generator, ed: _Edit) -> None:
        old = self._target_object(rng, ed)
        color = pick(rng, [c for c in COLORS if c not in ed.used_colors()])
        new = replace(old, color=color)
        ed.scene = replace(ed.scene, objects=tuple(new if x.uid == old.uid else x for x in ed.scene.objects))
        ed.touched.add(old.uid)
        ed.restyled.add(old.uid)
        ed.clauses.append(pick(rng, CLAUSES["recolor"]).format(the_obj=old.the(rng), color=color))
        ed.edits.append({"op": "recolor", "object": old.describe(), "to": color})

    def _op_background(self, rng: np.random.Generator, ed: _Edit) -> None:
        old = ed.scene.backdrop
        new = self._backdrop(rng, {o.color for o in ed.scene.objects} | set(old.colors))
        ed.scene = replace(ed.scene, backdrop=new)
        ed.backdrop_changed = True
        ed.clauses.append(pick(rng, CLAUSES["background"]).format(bg=new.phrase(rng)))
        ed.edits.append({"op": "background", "to": f"{new.colors[0]} and {new.colors[1]} {new.kind}"})

    def _op_style(self, rng: np.random.Generator, ed: _Edit) -> None:
        tone = pick(rng, list(TONES))
        ed.scene = replace(ed.scene, tone=tone)
        ed.clauses.append(pick(rng, TONES[tone]))
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
            raise DataError(f"unknown op {op!r}{did_you_mean(op, OPS)}; known: {', '.join(OPS)}")
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
            instruction = pick(rng, SENTENCES).format(C=cap(c), c=c)
        else:
            c1, c2 = ed.clauses
            instruction = pick(rng, JOINS).format(C1=cap(c1), c1=c1, c2=c2)
        if self.frames == 1:  # an image: the same edit, said of a picture
            instruction = instruction.replace("the video", "the image").replace("the footage", "the image")
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
