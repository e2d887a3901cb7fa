"""A small procedural image-caption world.

Every image shows one object on a background. The object has independent
attributes, each drawn uniformly at random unless constrained:

* ``shape``      -- circle, square, triangle, diamond, star, heart, ring, cross
* ``colour``     -- red, green, blue, yellow, purple, orange, pink, cyan
* ``size``       -- small, large
* ``texture``    -- plain, striped, dotted, checkered (a pattern painted on the
                    object that darkens its colour, so the hue stays readable)
* ``background`` -- dark, light, noisy, grass, sky, sand
* ``position``   -- left, right, top, bottom, centre
* ``lighting``   -- neutral, warm, cool, dim: a global colour cast.  Unlike
                    the others it is skewed: 70% of scenes are neutral.

Shapes are drawn from signed-distance functions with a one-pixel soft edge,
so rendering is a handful of numpy operations on a 32x32 grid.

A caption mentions a random subset of the attributes through varied
templates (``"a photo of a red circle."``, ``"a small striped blue square on
the left"``, ``"there is a heart at the top on a dark background"``, ...), so a
model has to read the text to align it with the picture.  Colour and shape
are the attributes the downstream tasks ask about; the others are nuisances.

Captions have a *reporting bias*, as real ones do: unusual lighting is
almost always mentioned ("... under warm light"), neutral lighting rarely.
So a bare prompt such as "a photo of a yellow star." implies neutral light,
and under a warm cast (where yellow looks orange) it matches the wrong
class.  A downstream task photographed under one lighting is therefore what
prompt engineering -- or prompt learning -- can fix: the model knows the
lighting, the default prompt does not say it.

All randomness comes from an explicit :class:`numpy.random.Generator`, so the
world is fully deterministic in its seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

IMAGE_SIZE = 32

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.85, 0.10, 0.10),
    "green": (0.10, 0.70, 0.15),
    "blue": (0.15, 0.25, 0.90),
    "yellow": (0.95, 0.85, 0.10),
    "purple": (0.55, 0.15, 0.75),
    "orange": (1.00, 0.55, 0.05),
    "pink": (1.00, 0.50, 0.75),
    "cyan": (0.10, 0.85, 0.85),
}
SHAPES = ("circle", "square", "triangle", "diamond", "star", "heart", "ring", "cross")
SIZES = ("small", "large")
TEXTURES = ("plain", "striped", "dotted", "checkered")
BACKGROUNDS = ("dark", "light", "noisy", "grass", "sky", "sand")
POSITIONS = ("left", "right", "top", "bottom", "centre")
LIGHTINGS = ("neutral", "warm", "cool", "dim")
LIGHTING_PROBS = (0.7, 0.1, 0.1, 0.1)

#: Attribute name -> its possible values, in canonical order.
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "colour": tuple(COLOURS),
    "size": SIZES,
    "texture": TEXTURES,
    "background": BACKGROUNDS,
    "position": POSITIONS,
    "lighting": LIGHTINGS,
}

# Object radius in pixels and centre offset (x, y; y grows downwards) as a
# fraction of the half image size.
_RADIUS_PX = {"small": 6.0, "large": 10.5}
_OFFSETS = {"left": (-0.45, 0.0), "right": (0.45, 0.0), "top": (0.0, -0.45),
            "bottom": (0.0, 0.45), "centre": (0.0, 0.0)}


@dataclass(frozen=True)
class Scene:
    """The attributes of one image."""

    shape: str
    colour: str
    size: str
    texture: str
    background: str
    position: str
    lighting: str


# --------------------------------------------------------------------------
# Shapes as signed distance functions of (x, y) in object units (radius ~1,
# y pointing up).  Negative inside.  Some are only approximately metric,
# which is fine for a one-pixel soft edge.


def _box(x, y, hx, hy):
    qx, qy = np.abs(x) - hx, np.abs(y) - hy
    outside = np.hypot(np.maximum(qx, 0), np.maximum(qy, 0))
    return outside + np.minimum(np.maximum(qx, qy), 0)


def _triangle(x, y):
    # Equilateral, apex up: intersection of three half-planes, inradius 0.55.
    normals = ((0.0, -1.0), (np.cos(np.pi / 6), np.sin(np.pi / 6)),
               (-np.cos(np.pi / 6), np.sin(np.pi / 6)))
    y = y + 0.2
    return np.max([nx * x + ny * y - 0.55 for nx, ny in normals], axis=0)


def _star(x, y):
    rho, theta = np.hypot(x, y), np.arctan2(y, x) - np.pi / 2
    return rho - (0.45 + 0.6 * np.abs(np.cos(2.5 * theta)) ** 3)


def _heart(x, y):
    lobes = np.minimum(np.hypot(x + 0.4, y - 0.3), np.hypot(x - 0.4, y - 0.3)) - 0.5
    point = (np.abs(x) + np.abs(y + 0.1) - 0.85) / np.sqrt(2)
    return np.minimum(lobes, point)


_SDF: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "circle": lambda x, y: np.hypot(x, y) - 1.0,
    "square": lambda x, y: _box(x, y, 0.85, 0.85),
    "triangle": _triangle,
    "diamond": lambda x, y: (np.abs(x) + np.abs(y) - 1.1) / np.sqrt(2),
    "star": _star,
    "heart": _heart,
    "ring": lambda x, y: np.abs(np.hypot(x, y) - 0.75) - 0.25,
    "cross": lambda x, y: np.minimum(_box(x, y, 0.95, 0.32), _box(x, y, 0.32, 0.95)),
}

# Per-channel gain of each lighting.
# The casts are strong: under warm light a yellow object looks like an orange
# one in neutral light, and on a dark background nothing else tells them apart.
_LIGHT_GAIN = {"neutral": (1.0, 1.0, 1.0), "warm": (1.0, 0.68, 0.3),
               "cool": (0.3, 0.68, 1.0), "dim": (0.45, 0.45, 0.45)}

_ROW, _COL = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32) + 0.5


def _texture(name: str, rng: np.random.Generator) -> np.ndarray:
    """A pattern in [0, 1] (1 = painted) covering the whole image."""
    if name == "plain":
        return np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.float32)
    dx, dy = rng.uniform(0, 8, size=2)
    x, y = _COL + dx, _ROW + dy
    if name == "striped":
        angle = rng.choice([0.0, 0.25, 0.5, 0.75]) * np.pi
        period = rng.uniform(4.0, 6.0)
        phase = (x * np.cos(angle) + y * np.sin(angle)) / period
        return (np.sin(2 * np.pi * phase) > 0).astype(np.float32)
    if name == "dotted":
        return ((x % 4 - 2) ** 2 + (y % 4 - 2) ** 2 < 1.3 ** 2).astype(np.float32)
    if name == "checkered":
        return ((x // 3 + y // 3) % 2).astype(np.float32)
    raise ValueError(f"unknown texture {name!r}")


def _background(name: str, rng: np.random.Generator) -> np.ndarray:
    """An HxWx3 float image in [0, 1]."""
    shape = (IMAGE_SIZE, IMAGE_SIZE, 1)
    if name == "dark":
        return np.full(shape, rng.uniform(0.02, 0.2), np.float32).repeat(3, 2)
    if name == "light":
        return np.full(shape, rng.uniform(0.8, 0.97), np.float32).repeat(3, 2)
    if name == "noisy":
        return rng.uniform(0.15, 0.85, size=shape).astype(np.float32).repeat(3, 2)
    if name == "grass":
        base = np.array([0.2, 0.5, 0.15], np.float32)
        return np.clip(base * rng.uniform(0.6, 1.4, size=shape), 0, 1).astype(np.float32)
    if name == "sky":
        t = (_ROW / IMAGE_SIZE)[..., None]
        top, bottom = np.array([0.35, 0.6, 0.95]), np.array([0.85, 0.92, 1.0])
        return ((1 - t) * top + t * bottom).astype(np.float32)
    if name == "sand":
        base = np.array([0.85, 0.75, 0.5], np.float32)
        return np.clip(base * rng.uniform(0.8, 1.1, size=shape), 0, 1).astype(np.float32)
    raise ValueError(f"unknown background {name!r}")


def render(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """Draw ``scene`` as an ``IMAGE_SIZE x IMAGE_SIZE x 3`` uint8 RGB array.

    Beyond the attributes, ``rng`` jitters the exact colour, radius, offset
    and rotation, so no two images are identical.
    """
    half = IMAGE_SIZE / 2
    radius = _RADIUS_PX[scene.size] * rng.uniform(0.9, 1.1)
    ox, oy = _OFFSETS[scene.position]
    cx = half * (1 + ox) + rng.uniform(-1.5, 1.5)
    cy = half * (1 + oy) + rng.uniform(-1.5, 1.5)
    angle = rng.uniform(-0.25, 0.25)
    x, y = (_COL - cx) / radius, (cy - _ROW) / radius  # object units, y up
    x, y = x * np.cos(angle) - y * np.sin(angle), x * np.sin(angle) + y * np.cos(angle)
    alpha = np.clip(0.5 - _SDF[scene.shape](x, y) * radius, 0, 1)[..., None]

    colour = np.clip(np.array(COLOURS[scene.colour]) + rng.uniform(-0.07, 0.07, 3), 0, 1)
    shade = 1 - 0.5 * _texture(scene.texture, rng)[..., None]
    obj = colour.astype(np.float32) * shade
    image = alpha * obj + (1 - alpha) * _background(scene.background, rng)
    image = np.clip(image * np.array(_LIGHT_GAIN[scene.lighting], np.float32), 0, 1)
    return (image * 255 + 0.5).astype(np.uint8)


def sample_scene(rng: np.random.Generator, **fixed: str | Sequence[str]) -> Scene:
    """Draw every attribute independently (uniformly, except lighting).

    A keyword fixes an attribute (``colour="red"``) or restricts it to a
    subset of values (``texture=("plain", "striped")``).
    """
    unknown = set(fixed) - set(ATTRIBUTES)
    if unknown:
        raise ValueError(f"unknown attributes {sorted(unknown)}")
    values = {}
    for name, choices in ATTRIBUTES.items():
        if name == "lighting" and name not in fixed:
            values[name] = LIGHTINGS[rng.choice(len(LIGHTINGS), p=LIGHTING_PROBS)]
            continue
        allowed = fixed.get(name, choices)
        allowed = (allowed,) if isinstance(allowed, str) else tuple(allowed)
        values[name] = allowed[rng.integers(len(allowed))]
    return Scene(**values)


# --------------------------------------------------------------------------
# Captions

_SIZE_WORDS = {"small": ("small", "tiny", "little"), "large": ("large", "big")}
_POSITION_PHRASES = {
    "left": ("on the left", "at the left"),
    "right": ("on the right", "at the right"),
    "top": ("at the top", "near the top"),
    "bottom": ("at the bottom", "near the bottom"),
    "centre": ("in the centre", "in the middle"),
}
_BACKGROUND_PHRASES = {
    "dark": ("on a dark background", "on black"),
    "light": ("on a light background", "on white"),
    "noisy": ("on a noisy background", "on grey noise"),
    "grass": ("on grass", "on a grass background"),
    "sky": ("against the sky", "on a sky background"),
    "sand": ("on sand", "on a sandy background"),
}
_LIGHTING_PHRASES = {
    "neutral": ("in daylight", "in normal light"),
    "warm": ("under warm light", "in warm golden light"),
    "cool": ("under cool light", "in cold light"),
    "dim": ("in dim light", "in the dark"),
}
#: Probability that a caption mentions the lighting (reporting bias).
_LIGHTING_MENTION = {"neutral": 0.1, "warm": 0.9, "cool": 0.9, "dim": 0.9}
_PREFIXES = ("a photo of {}", "{}", "an image of {}", "a picture of {}", "there is {}",
             "a drawing of {}", "a rendering of {}", "this is {}", "a close-up of {}")
_GENERIC_NOUNS = ("object", "shape", "thing")


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """A caption mentioning a random subset of ``scene``'s attributes."""
    words = []
    if rng.random() < 0.5:
        options = _SIZE_WORDS[scene.size]
        words.append(options[rng.integers(len(options))])
    if scene.texture != "plain" and rng.random() < 0.5:
        words.append(scene.texture)
    if rng.random() < 0.85:
        words.append(scene.colour)
    if rng.random() < 0.9:
        words.append(scene.shape)
    else:
        words.append(_GENERIC_NOUNS[rng.integers(len(_GENERIC_NOUNS))])
    text = _PREFIXES[rng.integers(len(_PREFIXES))].format(_article(" ".join(words)))

    extras = []
    for table, value in ((_POSITION_PHRASES, scene.position),
                         (_BACKGROUND_PHRASES, scene.background)):
        if rng.random() < 0.4:
            extras.append(table[value][rng.integers(len(table[value]))])
    if len(extras) == 2 and rng.random() < 0.5:
        extras.reverse()
    text = " ".join([text, *extras])
    if rng.random() < _LIGHTING_MENTION[scene.lighting]:
        options = _LIGHTING_PHRASES[scene.lighting]
        light = options[rng.integers(len(options))]
        text = f"{light}, {text}" if rng.random() < 0.5 else f"{text} {light}"
    return text + "." if rng.random() < 0.7 else text


def sample(n: int, seed: int | np.random.Generator, **fixed) -> tuple[np.ndarray, list[str], list[Scene]]:
    """Draw ``n`` (image, caption, scene) triples.

    Returns a uint8 array of shape ``(n, IMAGE_SIZE, IMAGE_SIZE, 3)``, the
    captions and the scenes.  ``fixed`` is passed to :func:`sample_scene`.
    """
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    captions, scenes = [], []
    for i in range(n):
        scene = sample_scene(rng, **fixed)
        images[i] = render(scene, rng)
        captions.append(caption(scene, rng))
        scenes.append(scene)
    return images, captions, scenes

