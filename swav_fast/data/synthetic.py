"""A built-in synthetic, photo-like image dataset (ImageFolder layout) for tests and benchmarks.

Every image is a procedurally rendered "photo": a smoothly shaded background, a lattice of many
small objects plus one to three large ones, a textured surface, lighting and sensor noise, saved
as a JPEG whose size and decode cost resemble an ImageNet photo (~500x375, quality 90, ~100 KB).

A class is a *family* of shape and texture (:func:`class_family`): the object shape (disc,
square, triangle, star, ring, cross, hexagon) and a luminance texture (stripes, checker, dots,
waves, cross-hatch, zigzag) with a class-specific period and orientation. Texture covers the whole
frame (background and objects) and objects are repeated all over the image, so even a crop of
5% of the area carries class evidence. Colours, hue of the background, positions, scales,
rotations, lighting and noise level are random per image, so colour is *not* a shortcut: a
model has to become invariant to colour (jitter, grayscale) and crop to separate the classes.

A second kind, ``kind="shapes"`` (:func:`render_shapes_image`), has nothing but shape: one large
object of the class's shape (filled, or outlined for classes 7-13) on a smooth two-colour background,
both colours, the pose and the scale random per image. Colour and texture, which a random-init trunk
already separates well, carry no class evidence there, so such a trunk is much closer to chance.

Output is deterministic: image ``i`` is rendered from ``np.random.default_rng([seed, i])``, so
the bytes do not depend on the number of worker processes.
"""
from __future__ import annotations

import json
import math
import multiprocessing
import os
import re
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from PIL import Image

from pipelines.atomic import atomic_write
from swav_fast.errors import DataError

__all__ = [
    "SHAPES",
    "TEXTURES",
    "GENERATOR_VERSION",
    "MANIFEST_NAME",
    "class_family",
    "class_name",
    "image_name",
    "render_image",
    "render_shapes_image",
    "shape_class",
    "KINDS",
    "encode_jpeg",
    "generate_synthetic",
]

#: Bumped whenever the rendering changes, so a cached dataset from an older renderer is redone.
GENERATOR_VERSION = 3
MANIFEST_NAME = "manifest.json"
_FORMAT = "swav-fast-synthetic"

#: dataset kinds: ``photo`` (:func:`render_image`, the default) and ``shapes`` (:func:`render_shapes_image`)
KINDS = ("photo", "shapes")
SHAPES = ("disc", "square", "triangle", "star", "ring", "cross", "hexagon")
TEXTURES = ("stripes", "checker", "dots", "waves", "crosshatch", "zigzag")
#: Texture frequencies, in cycles per short side of the image (period 31-94 px at 500x375). Coarse
#: enough that the class evidence survives crops downscaled to 64-96 px, as in CPU-sized recipes.
_FREQS = (4.0, 5.5, 8.0, 12.0)
_N_ANGLES = 8  # texture orientations, 0..78.75 degrees in steps of 11.25
# Version 3: the class texture is the strongest cue an image shares across its crops (luminance
# modulation of 40-70%), and the lattice of small objects is sparser (30% of cells). With the v2
# values (18-32%, 80%) per-image nuisances (lattice geometry, lighting, colour layout) dominated what
# two crops share, and a CPU-minutes SwAV run learned them instead of the classes.
_TEX_AMP = (0.40, 0.70)
_OBJ_TEX_AMP = (0.26, 0.66)
_LATTICE_PRESENCE = 0.3

_F32 = np.float32


# ----------------------------------------------------------------------------- class families
def class_family(class_index: int, num_classes: int | None = None) -> dict[str, Any]:
    """The shape/texture family that defines class ``class_index``.

    The mapping does not depend on ``num_classes`` (class k is the same family in a 10-class and
    a 100-class dataset). Shapes (7) and textures (6) cycle with coprime periods, so the first 42
    classes all have distinct (shape, texture) pairs; classes sharing a texture type additionally
    differ in texture frequency and/or orientation, which keeps families distinct well past 100.
    """
    k = int(class_index)
    if k < 0 or (num_classes is not None and k >= num_classes):
        raise ValueError(f"class_index {k} out of range for {num_classes} classes")
    r = k % len(TEXTURES)
    j = k // len(TEXTURES)  # rank among the classes with this texture type
    freq = _FREQS[j % len(_FREQS)]
    angle_idx = ((j // len(_FREQS)) * 3 + r) % _N_ANGLES
    # Beyond 6 * 4 * 8 classes the families repeat with a small frequency offset.
    cycle = j // (len(_FREQS) * _N_ANGLES)
    freq = freq * (1.0 + 0.09 * (cycle % 3))
    return {
        "shape": SHAPES[k % len(SHAPES)],
        "texture": TEXTURES[r],
        "freq": freq,
        "angle_deg": angle_idx * (90.0 / _N_ANGLES),
    }


def class_name(class_index: int) -> str:
    return f"class_{class_index:03d}"


def image_name(index: int) -> str:
    return f"img_{index:08d}.jpg"


# ----------------------------------------------------------------------------- rendering helpers
def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV -> RGB for a handful of colours; inputs in [0, 1], output (..., 3) float32."""
    h = np.asarray(h, dtype=np.float64) * 6.0
    s = np.asarray(s, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    i = np.floor(h).astype(np.int64) % 6
    f = h - np.floor(h)
    p = v * (1 - s)
    q = v * (1 - s * f)
    t = v * (1 - s * (1 - f))
    r = np.choose(i, [v, q, p, p, t, v])
    g = np.choose(i, [t, v, v, q, p, p])
    b = np.choose(i, [p, p, t, v, v, q])
    return np.stack([r, g, b], axis=-1).astype(_F32)


def _random_colours(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` random colours (0..255 float32) with a wide range of hue, saturation and value."""
    h = rng.random(n)
    s = rng.uniform(0.15, 0.95, n)
    v = rng.uniform(0.25, 0.95, n)
    return _hsv_to_rgb(h, s, v) * _F32(255.0)


def _texture(kind: str, a: np.ndarray, b: np.ndarray, phase: float, warp: float) -> np.ndarray:
    """Luminance texture in about [-1, 1] on rotated coordinates (a, b) measured in cycles."""
    two_pi = _F32(2 * math.pi)
    if kind == "stripes":
        return np.sin(two_pi * a + _F32(phase))
    if kind == "checker":
        return np.tanh(_F32(4.0) * np.sin(two_pi * a + _F32(phase)) * np.sin(two_pi * b))
    if kind == "dots":
        c = np.cos(two_pi * a + _F32(phase)) + np.cos(two_pi * b)  # in [-2, 2], peaks on a lattice
        return np.tanh(_F32(3.0) * (c - _F32(0.9)))
    if kind == "waves":
        return np.sin(two_pi * a + _F32(warp) * np.sin(two_pi * _F32(0.35) * b) + _F32(phase))
    if kind == "crosshatch":
        # two line families 60 degrees apart
        a2 = _F32(0.5) * a + _F32(0.8660254) * b
        return _F32(0.6) * (np.sin(two_pi * a + _F32(phase)) + np.sin(two_pi * a2))
    if kind == "zigzag":
        # sawtooth along a, shifted by a triangle wave along b: sharp asymmetric edges
        tb = b * _F32(0.5)
        tri = np.abs(tb - np.floor(tb) - _F32(0.5))
        x = a + tri + _F32(phase / (2 * math.pi))
        return _F32(2.0) * (x - np.floor(x)) - _F32(1.0)
    raise ValueError(f"unknown texture {kind!r}")


def _shape_distance(shape: str, p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Normalised 'radius' of the point (p, q) for a shape of unit size: < 1 inside."""
    if shape == "disc":
        return np.sqrt(p * p + q * q)
    if shape == "square":
        return np.maximum(np.abs(p), np.abs(q)) * _F32(1.2)
    if shape in ("triangle", "hexagon"):
        n = 3 if shape == "triangle" else 6
        d = None
        for j in range(n):
            ang = 2 * math.pi * j / n + math.pi / 2
            dot = p * _F32(math.cos(ang)) + q * _F32(math.sin(ang))
            d = dot if d is None else np.maximum(d, dot)
        return d * _F32(1.0 / math.cos(math.pi / n) * (0.62 if n == 3 else 0.9))
    if shape == "star":
        r = np.sqrt(p * p + q * q)
        theta = np.arctan2(q, p)
        return r / (_F32(0.62) + _F32(0.38) * np.cos(_F32(5.0) * theta))
    if shape == "ring":
        r = np.sqrt(p * p + q * q)
        return np.abs(r - _F32(0.7)) * _F32(1.0 / 0.3)
    if shape == "cross":
        ap = np.abs(p)
        aq = np.abs(q)
        w = _F32(1.0 / 0.33)
        return np.minimum(np.maximum(ap * w, aq), np.maximum(ap, aq * w))
    raise ValueError(f"unknown shape {shape!r}")


def _coverage(d: np.ndarray, radius_px: np.ndarray | float) -> np.ndarray:
    """Anti-aliased inside-ness (0..1) from the normalised distance ``d`` of a shape."""
    return np.clip((_F32(1.0) - d) * radius_px + _F32(0.5), _F32(0.0), _F32(1.0))


# ----------------------------------------------------------------------------- the renderer
def render_image(class_index: int, num_classes: int, rng: np.random.Generator,
                 size: tuple[int, int] = (500, 375)) -> np.ndarray:
    """Render one image of class ``class_index``; returns an (H, W, 3) uint8 array.

    ``size`` is (width, height). All randomness comes from ``rng``: colours, lattice, object
    poses, large objects, lighting and noise are nuisances; :func:`class_family` fixes the
    shape and texture (type, frequency, orientation up to a few degrees of jitter).
    """
    width, height = int(size[0]), int(size[1])
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {size!r}")
    if num_classes < 1 or not 0 <= class_index < num_classes:
        raise ValueError(f"class_index {class_index} out of range for {num_classes} classes")
    fam = class_family(class_index, num_classes)
    scale = float(min(width, height))  # coordinates are in units of the short side
    # pixel-centre coordinates, centred, as broadcastable row/column vectors
    xs = ((np.arange(width, dtype=_F32) + _F32(0.5) - _F32(width / 2)) / _F32(scale))[None, :]
    ys = ((np.arange(height, dtype=_F32) + _F32(0.5) - _F32(height / 2)) / _F32(scale))[:, None]

    # --- texture (class evidence everywhere), with per-image jitter of period and angle
    freq = fam["freq"] * rng.uniform(0.88, 1.12)
    ang = math.radians(fam["angle_deg"] + rng.uniform(-5.0, 5.0))
    ca, sa = math.cos(ang) * freq, math.sin(ang) * freq
    ta = xs * _F32(ca) + ys * _F32(sa)
    tb = ys * _F32(ca) - xs * _F32(sa)
    tex = _texture(fam["texture"], ta, tb, rng.uniform(0, 2 * math.pi), rng.uniform(0.8, 1.6))

    # --- background: two random colours blended along a random direction, textured.
    # The image is built planar (3, H, W): per-channel ops on contiguous planes are much faster
    # than broadcasting over a trailing axis of 3.
    c_bg = _random_colours(rng, 2)
    g_ang = rng.uniform(0, 2 * math.pi)
    span = abs(math.cos(g_ang)) * width / scale + abs(math.sin(g_ang)) * height / scale
    gx = _F32(math.cos(g_ang) / max(span, 1e-6))
    gy = _F32(math.sin(g_ang) / max(span, 1e-6))
    grad = xs * gx + (ys * gy + _F32(0.5))
    bg_mod = _F32(rng.uniform(_TEX_AMP[0], _TEX_AMP[1])) * tex
    bg_mod += _F32(1.0)
    img = np.empty((3, height, width), dtype=_F32)
    for c in range(3):
        np.multiply(grad, c_bg[1, c] - c_bg[0, c], out=img[c])
        img[c] += c_bg[0, c]
        img[c] *= bg_mod

    # --- lattice of small objects covering the whole frame
    cell = rng.uniform(0.22, 0.34)  # cell size in short sides
    l_ang = rng.uniform(0, 2 * math.pi)
    cl, sl = math.cos(l_ang) / cell, math.sin(l_ang) / cell
    lu = xs * _F32(cl) + (ys * _F32(sl) + _F32(rng.random()))
    lv = ys * _F32(cl) - (xs * _F32(sl) - _F32(rng.random()))
    # (Fresh full-size temporaries cost page faults, so this block works in place where it can.)
    iu = np.floor(lu)
    iv = np.floor(lv)
    iu0, iv0 = float(iu.min()), float(iv.min())
    nu = int(iu.max() - iu0) + 1
    nv = int(iv.max() - iv0) + 1
    ncell = nu * nv
    lu -= iu  # fractional position in the cell, [0, 1)
    lv -= iv
    iu -= _F32(iu0)
    iv -= _F32(iv0)
    iv *= _F32(nu)
    iv += iu
    idx = iv.astype(np.int32)
    # per-cell random pose, size, colour, presence
    radius = rng.uniform(0.24, 0.42, ncell)  # in cell units
    slack = 0.5 - radius
    off_u = (rng.uniform(-1, 1, ncell) * slack + 0.5).astype(_F32)
    off_v = (rng.uniform(-1, 1, ncell) * slack + 0.5).astype(_F32)
    rot = rng.uniform(0, 2 * math.pi, ncell)
    present = rng.random(ncell) < _LATTICE_PRESENCE
    inv_r = np.where(present, 1.0 / radius, 1e3).astype(_F32)  # absent cells: far outside
    cos_t = (np.cos(rot) * inv_r).astype(_F32)
    sin_t = (np.sin(rot) * inv_r).astype(_F32)
    radius_px = (radius * cell * scale).astype(_F32)
    colours = _random_colours(rng, ncell)
    l_dir = rng.uniform(0, 2 * math.pi)
    shade_u = (0.22 * math.cos(l_dir) * inv_r).astype(_F32)
    shade_v = (0.22 * math.sin(l_dir) * inv_r).astype(_F32)
    fg_amp = _F32(rng.uniform(_OBJ_TEX_AMP[0], _OBJ_TEX_AMP[1]) * rng.choice([-1.0, 1.0]))
    # local coordinates relative to the object centre (cell units): du -> lu, dv -> lv
    t1, t2 = iu, iv  # reuse as scratch
    lu -= np.take(off_u, idx, out=t1, mode="clip")
    lv -= np.take(off_v, idx, out=t1, mode="clip")
    du, dv = lu, lv
    ct = np.take(cos_t, idx, mode="clip")
    st = np.take(sin_t, idx, out=t2, mode="clip")
    p = np.multiply(du, ct)
    p += np.multiply(dv, st, out=t1)
    q = np.multiply(dv, ct, out=ct)
    q -= np.multiply(du, st, out=t1)
    d = _shape_distance(fam["shape"], p, q)
    alpha = _coverage(d, np.take(radius_px, idx, out=t1, mode="clip"))
    # object surface: its own colour, the class texture (inverted / different contrast), and a
    # directional shading that makes it look like a lit 3-D object
    fg_mod = np.multiply(du, np.take(shade_u, idx, out=t1, mode="clip"), out=p)
    fg_mod += np.multiply(dv, np.take(shade_v, idx, out=t1, mode="clip"), out=q)
    fg_mod += _F32(1.0)
    fg_mod *= np.multiply(tex, fg_amp, out=t1) + _F32(1.0)
    fill = t1
    for c in range(3):
        np.take(colours[:, c], idx, out=fill, mode="clip")
        fill *= fg_mod
        fill -= img[c]
        fill *= alpha
        img[c] += fill
    del du, dv, ct, st, p, q, d, alpha, fg_mod, fill, idx, t1, t2, lu, lv, iu, iv

    # --- one to three large objects of the class shape
    for _ in range(int(rng.integers(1, 4))):
        r_obj = rng.uniform(0.16, 0.34)  # radius in short sides
        cx = rng.uniform(-0.5, 0.5) * width / scale
        cy = rng.uniform(-0.5, 0.5) * height / scale
        rot_o = rng.uniform(0, 2 * math.pi)
        colour = _random_colours(rng, 1)[0]
        amp = _F32(rng.uniform(0.12, 0.3) * rng.choice([-1.0, 1.0]))
        l_dir = rng.uniform(0, 2 * math.pi)
        x0 = max(0, int(math.floor((cx - r_obj) * scale + width / 2)))
        x1 = min(width, int(math.ceil((cx + r_obj) * scale + width / 2)) + 1)
        y0 = max(0, int(math.floor((cy - r_obj) * scale + height / 2)))
        y1 = min(height, int(math.ceil((cy + r_obj) * scale + height / 2)) + 1)
        if x1 <= x0 or y1 <= y0:
            continue
        co, so = _F32(math.cos(rot_o) / r_obj), _F32(math.sin(rot_o) / r_obj)
        dx = xs[:, x0:x1] - _F32(cx)
        dy = ys[y0:y1, :] - _F32(cy)
        po = dx * co + dy * so
        qo = dy * co - dx * so
        a_obj = _coverage(_shape_distance(fam["shape"], po, qo), _F32(r_obj * scale))
        mod_o = _F32(1.0) + _F32(0.3 * math.cos(l_dir)) * po + _F32(0.3 * math.sin(l_dir)) * qo
        mod_o *= _F32(1.0) + amp * tex[y0:y1, x0:x1]
        for c in range(3):
            region = img[c, y0:y1, x0:x1]
            region += (mod_o * colour[c] - region) * a_obj

    # --- lighting: a linear falloff, a soft spotlight and vignetting
    li_ang = rng.uniform(0, 2 * math.pi)
    li_amp = rng.uniform(0.0, 0.35)
    sx, sy = rng.uniform(-0.6, 0.6) * width / scale, rng.uniform(-0.5, 0.5) * height / scale
    spot_amp = _F32(rng.uniform(0.0, 0.35))
    spot_k = _F32(-1.0 / rng.uniform(0.05, 0.3))
    vig = _F32(rng.uniform(0.0, 0.25))
    # separable: exp(-k (x^2 + y^2)) = exp(-k x^2) exp(-k y^2); everything else is a sum of
    # row and column terms, so the field costs two full-size ops
    row = _F32(1.0) + _F32(li_amp * math.cos(li_ang)) * xs - vig * xs * xs
    col = _F32(li_amp * math.sin(li_ang)) * ys - vig * ys * ys
    light = row + col
    light += (spot_amp * np.exp(spot_k * (ys - _F32(sy)) ** 2)) * np.exp(spot_k * (xs - _F32(sx)) ** 2)

    # --- sensor noise: luminance grain (drives the JPEG size) plus chroma noise along a random
    # chroma axis (cheap: one plane, weighted per channel)
    sigma = rng.uniform(7.0, 12.0)
    lum = rng.random((height, width), dtype=_F32)
    lum += rng.random((height, width), dtype=_F32)  # triangular distribution, std = 0.408
    lum -= _F32(1.0)
    lum *= _F32(sigma / 0.408)
    chroma = rng.random((height, width), dtype=_F32)
    chroma -= _F32(0.5)
    axis = rng.normal(size=3)
    axis -= axis.mean()
    axis *= sigma * 0.9 / max(float(np.linalg.norm(axis)), 1e-6) / 0.289
    out = np.empty((height, width, 3), dtype=np.uint8)
    for c in range(3):
        plane = img[c]
        plane *= light
        plane += lum
        plane += chroma * _F32(axis[c])
        plane += _F32(0.5)
        np.clip(plane, 0.0, 255.0, out=plane)
        out[:, :, c] = plane  # float -> uint8 truncation (after +0.5: rounding)
    return out


def shape_class(class_index: int) -> tuple[str, bool]:
    """``(shape, outlined)`` of class ``class_index`` in the ``shapes`` kind: ``SHAPES[k % 7]``, filled for
    k < 7 and outlined for 7 <= k < 14 (14 classes at most)."""
    k = int(class_index)
    if not 0 <= k < 2 * len(SHAPES):
        raise ValueError(f"the shapes kind has {2 * len(SHAPES)} classes at most, got class {k}")
    return SHAPES[k % len(SHAPES)], k >= len(SHAPES)


def render_shapes_image(class_index: int, num_classes: int, rng: np.random.Generator,
                        size: tuple[int, int] = (500, 375)) -> np.ndarray:
    """One image of the ``shapes`` kind: an (H, W, 3) uint8 array, ``size`` = (width, height).

    One object of the class's shape (:func:`shape_class`) of radius 0.22-0.38 short sides, at a random
    rotation and position (centre within the middle half), in a random colour, on a background that
    blends linearly between two other random colours; an outline is the band ``0.72 < d < 1`` of the
    shape's normalised distance ``d``. The object's value (HSV V) differs from the background's by at
    least 0.3, so the shape always shows; sensor noise (std 4) on top.
    """
    width, height = int(size[0]), int(size[1])
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {size!r}")
    if num_classes < 1 or not 0 <= class_index < num_classes:
        raise ValueError(f"class_index {class_index} out of range for {num_classes} classes")
    shape, outlined = shape_class(class_index)
    scale = float(min(width, height))
    xs = ((np.arange(width, dtype=_F32) + _F32(0.5) - _F32(width / 2)) / _F32(scale))[None, :]
    ys = ((np.arange(height, dtype=_F32) + _F32(0.5) - _F32(height / 2)) / _F32(scale))[:, None]
    # background: two colours of one value band, blended along a random direction
    v_bg = rng.uniform(0.25, 0.95)
    v_obj = (v_bg - rng.uniform(0.3, 0.6)) if v_bg > 0.6 else (v_bg + rng.uniform(0.3, 0.6))
    v_obj = float(np.clip(v_obj, 0.05, 1.0))
    hues, sats = rng.random(3), rng.uniform(0.15, 0.95, 3)
    colours = _hsv_to_rgb(hues, sats, np.array([v_bg, v_bg, v_obj])) * _F32(255.0)
    ang = rng.uniform(0, 2 * math.pi)
    t = xs * _F32(math.cos(ang)) + ys * _F32(math.sin(ang))
    t = np.clip(t / _F32(max(width, height) / scale) + _F32(0.5), _F32(0.0), _F32(1.0))[..., None]
    img = colours[0] * (_F32(1.0) - t) + colours[1] * t  # (H, W, 3)
    # the object
    radius = rng.uniform(0.22, 0.38)
    cx = rng.uniform(-0.25, 0.25) * width / scale
    cy = rng.uniform(-0.25, 0.25) * height / scale
    rot = rng.uniform(0, 2 * math.pi)
    c, s_ = _F32(math.cos(rot)), _F32(math.sin(rot))
    p = ((xs - _F32(cx)) * c + (ys - _F32(cy)) * s_) / _F32(radius)
    q = ((ys - _F32(cy)) * c - (xs - _F32(cx)) * s_) / _F32(radius)
    d = _shape_distance(shape, p, q)
    radius_px = radius * scale
    cover = _coverage(d, radius_px)
    if outlined:
        cover = np.clip(cover - _coverage(d / _F32(0.72), radius_px * 0.72), _F32(0.0), _F32(1.0))
    img += (colours[2] - img) * cover[..., None]
    img += rng.normal(0.0, 4.0, size=img.shape).astype(_F32)
    return np.clip(img + _F32(0.5), 0.0, 255.0).astype(np.uint8)


def encode_jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    """JPEG bytes of an (H, W, 3) uint8 array (baseline, 4:2:0, like most photos)."""
    import io

    buf = io.BytesIO()
    Image.fromarray(image, mode="RGB").save(buf, format="JPEG", quality=int(quality))
    return buf.getvalue()


# ----------------------------------------------------------------------------- writing
def _write_atomic(path: Path, data: bytes) -> None:
    """``data`` to ``path`` through :func:`pipelines.atomic.atomic_write`, without the fsyncs (the set
    can be generated again; the rename alone keeps readers from half-written files)."""
    atomic_write(path, data, make_parents=False, durable=False)


def _render_to_file(task: tuple) -> tuple[int, int]:
    index, num_classes, size, seed, quality, out_dir, kind = task
    cls = index % num_classes
    path = Path(out_dir) / class_name(cls) / image_name(index)
    rng = np.random.default_rng([seed, index])
    render = render_shapes_image if kind == "shapes" else render_image
    data = encode_jpeg(render(cls, num_classes, rng, size), quality)
    _write_atomic(path, data)
    return index, len(data)


def _render_chunk(tasks: list[tuple]) -> list[tuple[int, int]]:
    """Pool worker entry point (module level, picklable: works with spawn and forkserver)."""
    return [_render_to_file(t) for t in tasks]


def _params(num_images: int, num_classes: int, size: tuple[int, int], seed: int,
            quality: int, kind: str = "photo") -> dict[str, Any]:
    return {
        "format": _FORMAT,
        "kind": kind,
        "generator_version": GENERATOR_VERSION,
        "num_images": num_images,
        "num_classes": num_classes,
        "size": [size[0], size[1]],
        "seed": seed,
        "quality": quality,
    }


def _read_manifest(out_dir: Path) -> dict[str, Any] | None:
    path = out_dir / MANIFEST_NAME
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != _FORMAT:
        return None
    data.setdefault("kind", "photo")  # manifests written before kinds existed
    return data


def _same_params(manifest: dict[str, Any], params: dict[str, Any]) -> bool:
    return all(manifest.get(k) == v for k, v in params.items())


_IMG_RE = re.compile(r"^img_(\d{8,})\.jpg$")


def _existing_images(out_dir: Path, class_names: Iterable[str]) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for name in class_names:
        try:
            with os.scandir(out_dir / name) as it:
                found[name] = {e.name for e in it if _IMG_RE.match(e.name)}
        except OSError:
            found[name] = set()
    return found


def _cache_valid(out_dir: Path, manifest: dict[str, Any]) -> bool:
    """A complete manifest whose files are all present (checked by name, cheaply)."""
    if not manifest.get("complete"):
        return False
    n, c = manifest["num_images"], manifest["num_classes"]
    names = [class_name(k) for k in range(c)]
    existing = _existing_images(out_dir, names)
    for i in range(n):
        if image_name(i) not in existing[names[i % c]]:
            return False
    return True


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"synthetic dataset output {str(out_dir)!r} exists and is not a directory")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create synthetic dataset directory {str(out_dir)!r}: "
                        f"{exc.strerror or exc}") from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise DataError(f"synthetic dataset directory {str(out_dir)!r} is not writable")


def _remove_stale(out_dir: Path, old: dict[str, Any], num_images: int, num_classes: int) -> None:
    """Delete images of a previous (different) generation that the new one will not overwrite."""
    try:
        old_c = int(old.get("num_classes", 0))
    except (TypeError, ValueError):
        return
    names = [class_name(k) for k in range(old_c)]
    for name, files in _existing_images(out_dir, names).items():
        for fname in files:
            i = int(_IMG_RE.match(fname).group(1))
            if i < num_images and class_name(i % num_classes) == name:
                continue  # will be rewritten in place
            try:
                os.unlink(out_dir / name / fname)
            except OSError:
                pass
        if int(name[6:]) >= num_classes:
            try:
                (out_dir / name).rmdir()
            except OSError:
                pass


_TMP_RE = re.compile(r"^\.(img_\d+\.jpg|manifest\.json)\..*\.tmp$")


def _remove_abandoned_tmp(out_dir: Path, dirs: Iterable[str], max_age_s: float = 3600.0) -> None:
    """Delete temp files of killed runs (old enough not to belong to a concurrent writer)."""
    now = time.time()
    for sub in [out_dir, *(out_dir / d for d in dirs)]:
        try:
            with os.scandir(sub) as it:
                for e in it:
                    if _TMP_RE.match(e.name):
                        try:
                            if now - e.stat().st_mtime > max_age_s:
                                os.unlink(e.path)
                        except OSError:
                            pass
        except OSError:
            pass


def _resolve_workers(workers: int, num_tasks: int) -> int:
    if workers is None or workers <= 0:
        workers = os.cpu_count() or 1
    return max(1, min(int(workers), num_tasks))


def generate_synthetic(out_dir: str | Path, num_images: int, num_classes: int = 10,
                       size: tuple[int, int] = (500, 375), seed: int = 0, quality: int = 90,
                       workers: int = 0, progress: bool = True, kind: str = "photo") -> dict:
    """Write an ImageFolder (``out_dir/<class_name>/<file>.jpg``) and return its manifest.

    Image ``i`` belongs to class ``i % num_classes`` (balanced counts) and is written to
    ``out_dir/class_{c:03d}/img_{i:08d}.jpg`` atomically. The manifest (class names, counts per
    class, size, seed, quality, total bytes, ...) is also written atomically to
    ``out_dir/manifest.json``. If ``out_dir`` already holds a complete dataset with the same
    parameters, its manifest is returned without rendering anything (a cache); an interrupted
    run with the same parameters is resumed.

    ``kind``: ``photo`` (:func:`render_image`) or ``shapes`` (:func:`render_shapes_image`, at most 14
    classes). ``workers``: 0 = ``os.cpu_count()``, 1 = in-process, N > 1 = a process pool of N.
    Raises :class:`~swav_fast.errors.DataError` if ``out_dir`` is a file or not writable.
    """
    out_dir = Path(out_dir)
    num_images = int(num_images)
    num_classes = int(num_classes)
    size = (int(size[0]), int(size[1]))
    seed = int(seed)
    quality = int(quality)
    if num_images < 1:
        raise DataError(f"num_images must be >= 1, got {num_images}")
    if num_classes < 2:
        raise DataError(f"num_classes must be >= 2, got {num_classes}")
    if size[0] < 8 or size[1] < 8:
        raise DataError(f"image size must be at least 8x8, got {size[0]}x{size[1]}")
    if not 1 <= quality <= 100:
        raise DataError(f"JPEG quality must be in 1..100, got {quality}")
    if seed < 0:
        raise DataError(f"seed must be >= 0, got {seed}")
    if kind not in KINDS:
        raise DataError(f"unknown synthetic dataset kind {kind!r}; kinds: {', '.join(KINDS)}")
    if kind == "shapes" and num_classes > 2 * len(SHAPES):
        raise DataError(f"the shapes kind has {2 * len(SHAPES)} classes at most, got {num_classes}")

    _check_out_dir(out_dir)
    params = _params(num_images, num_classes, size, seed, quality, kind)
    old = _read_manifest(out_dir)
    if old is not None and _same_params(old, params) and _cache_valid(out_dir, old):
        return old

    names = [class_name(k) for k in range(num_classes)]
    todo = list(range(num_images))
    if old is not None and _same_params(old, params):
        # same parameters but incomplete (interrupted): files are written atomically, so any
        # file present is a finished image of this very dataset -> resume
        existing = _existing_images(out_dir, names)
        todo = [i for i in todo if image_name(i) not in existing[names[i % num_classes]]]
    elif old is not None:
        _remove_stale(out_dir, old, num_images, num_classes)
    _remove_abandoned_tmp(out_dir, names)

    try:
        for name in names:
            (out_dir / name).mkdir(exist_ok=True)
        # Mark the directory as "in progress" with these parameters (enables resuming).
        _write_atomic(out_dir / MANIFEST_NAME,
                      (json.dumps({**params, "complete": False}, indent=2) + "\n").encode())
    except OSError as exc:
        raise DataError(f"cannot write to synthetic dataset directory {str(out_dir)!r}: "
                        f"{exc.strerror or exc}") from None

    tasks = [(i, num_classes, size, seed, quality, str(out_dir), kind) for i in todo]
    n_workers = _resolve_workers(workers, len(tasks)) if tasks else 1
    from tqdm import tqdm

    bar = tqdm(total=len(tasks), desc="synth", unit="img", disable=not progress,
               dynamic_ncols=True, smoothing=0.1)
    try:
        if n_workers <= 1:
            for t in tasks:
                _render_to_file(t)
                bar.update(1)
        else:
            chunk = max(1, min(64, len(tasks) // (n_workers * 4)))
            chunks = [tasks[k:k + chunk] for k in range(0, len(tasks), chunk)]
            with multiprocessing.get_context().Pool(n_workers) as pool:
                for done in pool.imap_unordered(_render_chunk, chunks):
                    bar.update(len(done))
    except OSError as exc:
        raise DataError(f"failed writing synthetic images under {str(out_dir)!r}: "
                        f"{exc.strerror or exc}") from None
    finally:
        bar.close()

    # Sizes from the files themselves (covers resumed runs too).
    counts = {name: 0 for name in names}
    total_bytes = 0
    for i in range(num_images):
        name = names[i % num_classes]
        try:
            total_bytes += (out_dir / name / image_name(i)).stat().st_size
        except OSError as exc:
            raise DataError(f"synthetic image missing after generation: {exc.filename}") from None
        counts[name] += 1
    manifest = {
        **params,
        "complete": True,
        "classes": names,
        "counts": counts,
        "width": size[0],
        "height": size[1],
        "total_bytes": total_bytes,
        "mean_bytes": total_bytes / num_images,
        "families": {names[k]: (class_family(k, num_classes) if kind == "photo" else
                                dict(zip(("shape", "outlined"), shape_class(k))))
                     for k in range(num_classes)},
        "layout": "out_dir/<class>/img_<global index:08d>.jpg; image i has class i % num_classes; "
                  "rng = numpy.random.default_rng([seed, i])",
    }
    try:
        _write_atomic(out_dir / MANIFEST_NAME, (json.dumps(manifest, indent=2) + "\n").encode())
    except OSError as exc:
        raise DataError(f"cannot write {str(out_dir / MANIFEST_NAME)!r}: {exc.strerror or exc}") from None
    return manifest
