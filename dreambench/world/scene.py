"""The toy world's vocabulary and its renderer: what a scene is, and how one becomes a picture.

A scene is an object of one of ten classes (a family of shapes: parts, proportions, colour, surface pattern,
size, position, tilt, mirror) in one of sixteen contexts (a background a prompt can name), optionally with an
accessory and a shiny finish. A *subject* is a particular object: fixed colours, pattern and proportions, plus
a small emblem (a star, heart, ring, cross or diamond in a fixed place) that no class member ever has, so the
class prior cannot produce a subject by itself. Rendering is pure PIL drawing at 4x and a Lanczos downsample:
the same scene gives the same pixels on every machine.
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

SUPERSAMPLE = 4

# Named colours (RGB): prompt words for property changes ("a red ball") and the palettes members are drawn from.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (210, 40, 40), "orange": (240, 140, 30), "yellow": (240, 215, 40), "green": (50, 160, 60),
    "blue": (40, 80, 210), "purple": (130, 50, 170), "pink": (240, 130, 180), "brown": (120, 75, 40),
    "white": (240, 240, 240), "black": (25, 25, 25), "grey": (128, 128, 128),
}

# Class -> (width / height, parts). A part is (shape, coordinates in the object's unit box, role): role "body"
# takes the object's colour and pattern, any other role is a fixed colour name or "dark" (the body colour x 0.5).
Part = tuple[str, tuple[float, ...], str]
CLASSES: dict[str, tuple[float, list[Part]]] = {
    "ball": (1.0, [("ellipse", (0, 0, 1, 1), "body")]),
    "box": (1.1, [("rect", (0, 0.18, 1, 1), "body"), ("poly", (0, 0.18, 0.15, 0, 1.0, 0, 1, 0.18), "dark")]),
    "cup": (1.0, [("ring", (0.62, 0.25, 1.0, 0.7, 0.09), "body"),
                  ("poly", (0.05, 0.1, 0.8, 0.1, 0.68, 1, 0.17, 1), "body")]),
    "house": (0.9, [("rect", (0.1, 0.42, 0.9, 1), "body"), ("poly", (0, 0.45, 0.5, 0, 1, 0.45), "dark"),
                    ("rect", (0.42, 0.68, 0.58, 1), "brown")]),
    "tree": (0.75, [("rect", (0.41, 0.6, 0.59, 1), "brown"), ("ellipse", (0, 0, 1, 0.72), "body")]),
    "star": (1.0, [("star", (0.5, 0.52, 0.5, 0.21), "body")]),
    "bottle": (0.45, [("rect", (0.05, 0.35, 0.95, 1), "body"), ("rect", (0.33, 0.06, 0.67, 0.38), "body"),
                      ("rect", (0.3, 0, 0.7, 0.08), "dark")]),
    "lamp": (0.6, [("rect", (0.45, 0.38, 0.55, 0.92), "grey"), ("ellipse", (0.15, 0.86, 0.85, 1), "grey"),
                   ("poly", (0.2, 0, 0.8, 0, 1, 0.42, 0, 0.42), "body")]),
    "fish": (1.6, [("poly", (0.68, 0.5, 1, 0.12, 1, 0.88), "dark"), ("ellipse", (0, 0.18, 0.78, 0.82), "body"),
                   ("ellipse", (0.12, 0.38, 0.2, 0.5), "black")]),
    "car": (1.8, [("poly", (0.2, 0.42, 0.3, 0.05, 0.7, 0.05, 0.8, 0.42), "body"),
                  ("rect", (0, 0.38, 1, 0.82), "body"), ("rect", (0.33, 0.12, 0.67, 0.38), "sky"),
                  ("ellipse", (0.1, 0.64, 0.32, 1), "black"), ("ellipse", (0.68, 0.64, 0.9, 1), "black")]),
}
PATTERNS = ("plain", "stripes", "dots", "band", "checks")
MARKS = ("star", "heart", "ring", "cross", "diamond")

# Context phrase (as a prompt says it) -> painter name. "" is the bare studio backdrop of a caption without one.
CONTEXTS: dict[str, str] = {
    "in the jungle": "jungle", "in the snow": "snow", "on the beach": "beach",
    "on a cobblestone street": "cobblestone", "on top of pink fabric": "pink_fabric",
    "on top of a wooden floor": "wooden_floor", "with a city in the background": "city",
    "with a mountain in the background": "mountain", "with a blue house in the background": "blue_house",
    "on top of a purple rug in a forest": "purple_rug_forest", "with a wheat field in the background": "wheat",
    "floating on top of water": "water", "at night": "night", "on top of green grass": "grass",
    "on top of a white rug": "white_rug", "in the desert": "desert", "": "studio",
}
ACCESSORIES = ("wearing a red hat", "wearing a santa hat", "wearing a rainbow scarf", "wearing pink glasses",
               "wearing a black top hat")


@dataclass(frozen=True)
class Thing:
    """An object: its class, look and (for a subject) emblem."""
    cls: str
    colour: tuple[int, int, int]
    pattern: str = "plain"
    colour2: tuple[int, int, int] = (255, 255, 255)
    aspect: float = 1.0          # x the class's width / height
    mark: str | None = None      # a subject's emblem: one of MARKS
    mark_colour: tuple[int, int, int] = (255, 255, 255)
    mark_at: tuple[float, float] = (0.5, 0.5)  # in the object's unit box
    mark_size: float = 0.22      # of the object's height


@dataclass(frozen=True)
class Scene:
    thing: Thing
    context: str = ""            # a key of CONTEXTS
    accessory: str | None = None  # one of ACCESSORIES
    shiny: bool = False
    height: float = 0.5          # of the picture
    x: float = 0.5               # centre, of the picture's width
    ground: float = 0.88         # bottom edge, of the picture's height
    tilt: float = 0.0            # degrees, counter-clockwise
    mirror: bool = False
    seed: int = 0                # the background's texture


def with_colour(thing: Thing, name: str) -> Thing:
    return replace(thing, colour=COLOURS[name])


# --------------------------------------------------------------------------------------------------- the object

def _star_points(cx: float, cy: float, r: float, inner: float, n: int = 5) -> list[tuple[float, float]]:
    pts = []
    for i in range(2 * n):
        a = math.pi * i / n - math.pi / 2
        rr = r if i % 2 == 0 else inner
        pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
    return pts


def _heart_points(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    ts = np.linspace(0, 2 * math.pi, 40, endpoint=False)
    x = 16 * np.sin(ts) ** 3
    y = -(13 * np.cos(ts) - 5 * np.cos(2 * ts) - 2 * np.cos(3 * ts) - np.cos(4 * ts))
    return [(cx + r * a / 17, cy + r * b / 17) for a, b in zip(x, y)]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, c: tuple[float, ...], box: tuple[float, float, float, float],
                fill) -> None:
    x0, y0, w, h = box
    px = lambda u: x0 + u * w
    py = lambda v: y0 + v * h
    if shape == "rect":
        draw.rectangle((px(c[0]), py(c[1]), px(c[2]), py(c[3])), fill=fill)
    elif shape == "ellipse":
        draw.ellipse((px(c[0]), py(c[1]), px(c[2]), py(c[3])), fill=fill)
    elif shape == "ring":
        draw.ellipse((px(c[0]), py(c[1]), px(c[2]), py(c[3])), outline=fill, width=max(1, int(c[4] * w)))
    elif shape == "poly":
        draw.polygon([(px(c[i]), py(c[i + 1])) for i in range(0, len(c), 2)], fill=fill)
    elif shape == "star":
        r = c[2] * min(w, h)
        draw.polygon(_star_points(px(c[0]), py(c[1]), r, r * c[3] / c[2] * 0.9), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _pattern_layer(size: int, pattern: str, box: tuple[float, float, float, float]) -> Image.Image:
    """A mask (L) of where colour2 goes, in the object's own frame (the pattern moves and tilts with it)."""
    x0, y0, w, h = box
    m = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(m)
    if pattern == "stripes":
        step = h / 6
        for k in range(0, 6, 2):
            d.rectangle((x0 - w, y0 + (k + 0.5) * step, x0 + 2 * w, y0 + (k + 1.5) * step), fill=255)
    elif pattern == "dots":
        r = 0.07 * h
        for i in range(4):
            for j in range(4):
                cx, cy = x0 + (i + 0.5 + 0.5 * (j % 2)) * w / 4, y0 + (j + 0.5) * h / 4
                d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    elif pattern == "band":
        d.rectangle((x0 - w, y0 + 0.45 * h, x0 + 2 * w, y0 + 0.65 * h), fill=255)
    elif pattern == "checks":
        n = 4
        for i in range(n):
            for j in range(n):
                if (i + j) % 2:
                    d.rectangle((x0 + i * w / n, y0 + j * h / n, x0 + (i + 1) * w / n, y0 + (j + 1) * h / n), fill=255)
    elif pattern != "plain":
        raise ValueError(f"unknown pattern {pattern!r}")
    return m


def _mark(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float, fill) -> None:
    if kind == "star":
        draw.polygon(_star_points(cx, cy, r, r * 0.45), fill=fill)
    elif kind == "heart":
        draw.polygon(_heart_points(cx, cy, r), fill=fill)
    elif kind == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=fill, width=max(1, int(r * 0.45)))
    elif kind == "cross":
        t = r * 0.38
        draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=fill)
        draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=fill)
    elif kind == "diamond":
        draw.polygon([(cx, cy - r), (cx + r * 0.75, cy), (cx, cy + r), (cx - r * 0.75, cy)], fill=fill)
    else:
        raise ValueError(f"unknown mark {kind!r}")


def _accessory(draw: ImageDraw.ImageDraw, kind: str, box: tuple[float, float, float, float]) -> None:
    x0, y0, w, h = box
    cx, s = x0 + w / 2, h
    if kind == "wearing a red hat":  # a cap: dome and brim
        draw.pieslice((cx - 0.28 * s, y0 - 0.25 * s, cx + 0.28 * s, y0 + 0.2 * s), 180, 360, fill=COLOURS["red"])
        draw.rectangle((cx - 0.28 * s, y0 - 0.04 * s, cx + 0.45 * s, y0 + 0.02 * s), fill=(150, 20, 20))
    elif kind == "wearing a santa hat":
        draw.polygon([(cx - 0.25 * s, y0 + 0.02 * s), (cx + 0.25 * s, y0 + 0.02 * s), (cx + 0.1 * s, y0 - 0.4 * s)],
                     fill=COLOURS["red"])
        draw.rectangle((cx - 0.28 * s, y0 - 0.02 * s, cx + 0.28 * s, y0 + 0.06 * s), fill=(250, 250, 250))
        draw.ellipse((cx + 0.03 * s, y0 - 0.47 * s, cx + 0.17 * s, y0 - 0.33 * s), fill=(250, 250, 250))
    elif kind == "wearing a black top hat":
        draw.rectangle((cx - 0.18 * s, y0 - 0.4 * s, cx + 0.18 * s, y0), fill=COLOURS["black"])
        draw.rectangle((cx - 0.32 * s, y0 - 0.04 * s, cx + 0.32 * s, y0 + 0.03 * s), fill=COLOURS["black"])
    elif kind == "wearing a rainbow scarf":
        rainbow = [(230, 40, 40), (245, 150, 30), (240, 220, 40), (50, 170, 70), (50, 90, 220), (140, 60, 180)]
        top, band = y0 + 0.22 * h, 0.05 * h
        for i, c in enumerate(rainbow):
            draw.rectangle((x0 - 0.04 * w, top + i * band, x0 + 1.04 * w, top + (i + 1) * band), fill=c)
        draw.rectangle((x0 + 0.7 * w, top, x0 + 0.82 * w, top + 0.55 * h), fill=rainbow[0])
    elif kind == "wearing pink glasses":
        r, cy = 0.12 * h, y0 + 0.3 * h
        for dx in (-0.17, 0.17):
            draw.ellipse((cx + dx * w - r, cy - r, cx + dx * w + r, cy + r), outline=COLOURS["pink"],
                         width=max(1, int(0.045 * h)))
        draw.line((cx - 0.17 * w + r, cy, cx + 0.17 * w - r, cy), fill=COLOURS["pink"], width=max(1, int(0.04 * h)))
    else:
        raise ValueError(f"unknown accessory {kind!r}")


def _object_layer(scene: Scene, size: int) -> Image.Image:
    """The object (RGBA) on a transparent canvas, with its pattern, emblem, finish and accessory."""
    t = scene.thing
    aspect, parts = CLASSES[t.cls]
    h = scene.height * size
    w = min(0.92 * size, h * aspect * t.aspect)
    box = (size / 2 - w / 2, size / 2 - h / 2, w, h)  # drawn centred, moved into place after the tilt
    body_mask = Image.new("L", (size, size), 0)
    layer = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    dark = tuple(int(v * 0.5) for v in t.colour)
    for shape, coords, role in parts:
        if role == "body":
            _draw_shape(ImageDraw.Draw(body_mask), shape, coords, box, 255)
            _draw_shape(draw, shape, coords, box, t.colour + (255,))
        else:
            fill = dark if role == "dark" else (150, 200, 235) if role == "sky" else COLOURS[role]
            _draw_shape(draw, shape, coords, box, tuple(fill) + (255,))
    if t.pattern != "plain":
        pat = _pattern_layer(size, t.pattern, box)
        pat = Image.fromarray(np.minimum(np.asarray(pat), np.asarray(body_mask)))
        layer.paste(t.colour2 + (255,), mask=pat)
    if t.mark is not None:
        _mark(draw, t.mark, box[0] + t.mark_at[0] * w, box[1] + t.mark_at[1] * h, t.mark_size * h,
              t.mark_colour + (255,))
    if scene.shiny:  # a specular highlight and a glossy lift of the colours
        arr = np.asarray(layer).astype(np.float32)
        arr[..., :3] = np.minimum(255, arr[..., :3] * 1.15 + 20)
        layer = Image.fromarray(arr.astype(np.uint8), "RGBA")
        draw = ImageDraw.Draw(layer)
        hl = Image.new("L", (size, size), 0)
        ImageDraw.Draw(hl).ellipse((box[0] + 0.2 * w, box[1] + 0.12 * h, box[0] + 0.42 * w, box[1] + 0.3 * h), fill=230)
        hl = Image.fromarray(np.minimum(np.asarray(hl), np.asarray(layer)[..., 3]))
        layer.paste((255, 255, 255, 255), mask=hl)
    if scene.accessory is not None:
        _accessory(ImageDraw.Draw(layer), scene.accessory, box)
    if scene.mirror:
        layer = layer.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if scene.tilt:
        layer = layer.rotate(scene.tilt, resample=Image.Resampling.BICUBIC, center=(size / 2, size / 2 + h / 2))
    # Move: centre x to scene.x, bottom edge to scene.ground.
    dx, dy = round(scene.x * size - size / 2), round(scene.ground * size - (size / 2 + h / 2))
    moved = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    moved.paste(layer, (dx, dy))
    return moved


# ----------------------------------------------------------------------------------------------- the backgrounds

def _sky_ground(d: ImageDraw.ImageDraw, size: int, sky, ground, horizon: float = 0.62) -> None:
    d.rectangle((0, 0, size, horizon * size), fill=sky)
    d.rectangle((0, horizon * size, size, size), fill=ground)


def _jitter(rng: np.random.Generator, c, amount: int = 12) -> tuple[int, int, int]:
    return tuple(int(np.clip(v + rng.integers(-amount, amount + 1), 0, 255)) for v in c)


def paint_background(name: str, size: int, seed: int) -> Image.Image:
    rng = np.random.default_rng([seed, 7])
    im = Image.new("RGB", (size, size))
    d = ImageDraw.Draw(im)
    s = size
    sky = _jitter(rng, (150, 200, 240))
    if name == "studio":
        grey = int(rng.integers(170, 225))
        tint = _jitter(rng, (grey, grey, grey - 8), 10)
        for i in range(16):  # a soft vertical gradient
            k = 1 - 0.15 * i / 15
            d.rectangle((0, i * s / 16, s, (i + 1) * s / 16), fill=tuple(int(v * k) for v in tint))
    elif name == "jungle":
        d.rectangle((0, 0, s, s), fill=_jitter(rng, (30, 90, 40)))
        for _ in range(24):
            x, y, r = rng.uniform(0, s), rng.uniform(0, s), rng.uniform(0.05, 0.14) * s
            d.ellipse((x - r, y - r / 2, x + r, y + r / 2), fill=_jitter(rng, (20, 130, 45), 25))
    elif name == "snow":
        _sky_ground(d, s, _jitter(rng, (205, 215, 228)), (248, 250, 252))
        for _ in range(40):
            x, y, r = rng.uniform(0, s), rng.uniform(0, s), 0.012 * s
            d.ellipse((x - r, y - r, x + r, y + r), fill=(255, 255, 255))
    elif name == "beach":
        _sky_ground(d, s, sky, _jitter(rng, (235, 210, 150)), 0.58)
        d.rectangle((0, 0.5 * s, s, 0.58 * s), fill=_jitter(rng, (40, 120, 190)))
    elif name == "cobblestone":
        _sky_ground(d, s, _jitter(rng, (170, 165, 160)), (95, 95, 100), 0.55)
        for j in range(6):
            for i in range(7):
                x, y = (i + 0.5 * (j % 2)) * s / 6, 0.55 * s + j * 0.08 * s
                d.ellipse((x - 0.07 * s, y, x + 0.07 * s, y + 0.07 * s), fill=_jitter(rng, (125, 122, 120), 15))
    elif name == "pink_fabric":
        d.rectangle((0, 0, s, s), fill=_jitter(rng, (238, 160, 195)))
        for i in range(-4, 8):
            x = i * s / 5 + rng.uniform(-3, 3)
            d.line((x, 0, x + 0.6 * s, s), fill=(250, 190, 215), width=max(1, s // 40))
    elif name == "wooden_floor":
        _sky_ground(d, s, _jitter(rng, (225, 215, 190)), (150, 100, 55), 0.55)
        for j in range(5):
            y = 0.55 * s + j * 0.09 * s
            d.line((0, y, s, y), fill=(105, 65, 35), width=max(1, s // 60))
    elif name == "city":
        _sky_ground(d, s, sky, (110, 110, 115), 0.7)
        x = 0.0
        while x < s:
            bw, bh = rng.uniform(0.1, 0.2) * s, rng.uniform(0.25, 0.6) * s
            d.rectangle((x, 0.7 * s - bh, x + bw, 0.7 * s), fill=_jitter(rng, (80, 85, 100), 20))
            for wy in np.arange(0.7 * s - bh + 0.04 * s, 0.7 * s - 0.04 * s, 0.08 * s):
                d.rectangle((x + 0.25 * bw, wy, x + 0.45 * bw, wy + 0.03 * s), fill=(240, 220, 120))
            x += bw + 0.01 * s
    elif name == "mountain":
        _sky_ground(d, s, sky, _jitter(rng, (90, 150, 70)), 0.68)
        px = rng.uniform(0.3, 0.7) * s
        d.polygon([(px - 0.55 * s, 0.68 * s), (px, 0.12 * s), (px + 0.55 * s, 0.68 * s)], fill=(115, 110, 120))
        d.polygon([(px - 0.14 * s, 0.26 * s), (px, 0.12 * s), (px + 0.14 * s, 0.26 * s)], fill=(250, 250, 250))
    elif name == "blue_house":
        _sky_ground(d, s, sky, _jitter(rng, (90, 160, 70)), 0.68)
        hx = rng.choice([0.05, 0.55]) * s
        d.rectangle((hx, 0.35 * s, hx + 0.4 * s, 0.68 * s), fill=(50, 90, 200))
        d.polygon([(hx - 0.03 * s, 0.36 * s), (hx + 0.2 * s, 0.16 * s), (hx + 0.43 * s, 0.36 * s)], fill=(70, 50, 50))
    elif name == "purple_rug_forest":
        _sky_ground(d, s, _jitter(rng, (60, 110, 70)), (130, 60, 160), 0.6)
        for i in range(7):
            x = i * s / 6 + rng.uniform(-4, 4)
            d.polygon([(x - 0.09 * s, 0.6 * s), (x, 0.1 * s), (x + 0.09 * s, 0.6 * s)], fill=(25, 75, 35))
    elif name == "wheat":
        _sky_ground(d, s, sky, _jitter(rng, (220, 180, 70)), 0.5)
        for i in range(40):
            x = rng.uniform(0, s)
            d.line((x, 0.5 * s, x + rng.uniform(-2, 2), s), fill=(190, 145, 45), width=max(1, s // 80))
    elif name == "water":
        d.rectangle((0, 0, s, s), fill=_jitter(rng, (50, 110, 190)))
        for _ in range(14):
            x, y = rng.uniform(-0.1, 1) * s, rng.uniform(0, 1) * s
            d.arc((x, y, x + 0.2 * s, y + 0.08 * s), 200, 340, fill=(140, 190, 240), width=max(1, s // 60))
    elif name == "night":
        _sky_ground(d, s, _jitter(rng, (15, 20, 55), 8), (25, 30, 35), 0.7)
        for _ in range(30):
            x, y, r = rng.uniform(0, s), rng.uniform(0, 0.65 * s), 0.008 * s
            d.ellipse((x - r, y - r, x + r, y + r), fill=(255, 255, 220))
        d.ellipse((0.78 * s, 0.08 * s, 0.9 * s, 0.2 * s), fill=(245, 240, 200))
    elif name == "grass":
        _sky_ground(d, s, sky, _jitter(rng, (70, 180, 60)), 0.55)
        for _ in range(50):
            x, y = rng.uniform(0, s), rng.uniform(0.55, 1) * s
            d.line((x, y, x + 1, y - 0.03 * s), fill=(40, 130, 40), width=max(1, s // 100))
    elif name == "white_rug":
        _sky_ground(d, s, _jitter(rng, (190, 185, 175)), (245, 243, 238), 0.55)
    elif name == "desert":
        _sky_ground(d, s, _jitter(rng, (240, 215, 170)), _jitter(rng, (225, 160, 90)), 0.6)
        d.ellipse((0.1 * s, 0.5 * s, 0.7 * s, 0.75 * s), fill=(215, 145, 80))
    else:
        raise ValueError(f"unknown background {name!r}")
    return im


def render(scene: Scene, size: int = 64) -> Image.Image:
    """The scene as an RGB picture of size x size pixels."""
    return render_with_silhouette(scene, size)[0]


def render_with_silhouette(scene: Scene, size: int = 64) -> tuple[Image.Image, Image.Image]:
    """`render(scene, size)` and `silhouette(scene, size)` from one drawing of the object."""
    big = size * SUPERSAMPLE
    im = paint_background(CONTEXTS[scene.context], big, scene.seed)
    obj = _object_layer(scene, big)
    im.paste(obj, (0, 0), obj)
    return (im.resize((size, size), Image.Resampling.LANCZOS),
            obj.getchannel("A").resize((size, size), Image.Resampling.BOX))


def silhouette(scene: Scene, size: int = 64) -> Image.Image:
    """Where the object is in `render(scene, size)`: its coverage of each pixel (L, 255 = all object), the loss
    mask of a photo (loss.mask, `<photo>.mask.png`)."""
    obj = _object_layer(scene, size * SUPERSAMPLE)
    return obj.getchannel("A").resize((size, size), Image.Resampling.BOX)


def random_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(rng.uniform(0, 1), rng.uniform(0.45, 0.95), rng.uniform(0.45, 0.95))
    return int(r * 255), int(g * 255), int(b * 255)
