"""Generated data sets: small, seeded, offline (no download).

`person_dataset` draws a visual-wake-words style person / no-person set: every
image has a textured, noisy background and distractor shapes (boxes, lines,
blobs); "person" images also hold a procedurally drawn figure (head, torso,
arms, legs; random position, scale and brightness). Examples, tests and the
architecture search train on it.

Example:

>>> from keras_patch.datasets import person_dataset
>>> images, labels = person_dataset(4, seed=1, image_size=64)
>>> images.shape, images.dtype.name, sorted(set(labels.tolist()))
((4, 64, 64, 1), 'float32', [0, 1])
"""

from __future__ import annotations

from typing import Tuple

import numpy as np

REFERENCE_SIZE = 96  # the drawing's pixel constants are for 96x96; other sizes scale them


def _disk(yy, xx, cy, cx, ry, rx):
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def _segment(yy, xx, y0, x0, y1, x1, width):
    """Pixels within `width / 2` of the segment (y0, x0)-(y1, x1)."""
    dy, dx = y1 - y0, x1 - x0
    t = np.clip(((yy - y0) * dy + (xx - x0) * dx) / max(dy * dy + dx * dx, 1e-6), 0.0, 1.0)
    return (yy - (y0 + t * dy)) ** 2 + (xx - (x0 + t * dx)) ** 2 <= (width / 2.0) ** 2


def _background(rng, n: int) -> np.ndarray:
    """Smooth random texture + stripes + pixel noise, in [0, 1]."""
    s = n / REFERENCE_SIZE
    coarse = rng.uniform(0, 1, (int(rng.integers(3, 9)),) * 2)
    idx = np.linspace(0, coarse.shape[0] - 1, n)
    lo = np.floor(idx).astype(int)
    hi = np.minimum(lo + 1, coarse.shape[0] - 1)
    w = idx - lo
    rows = coarse[lo] * (1 - w)[:, None] + coarse[hi] * w[:, None]
    smooth = rows[:, lo] * (1 - w)[None, :] + rows[:, hi] * w[None, :]
    img = rng.uniform(0.2, 0.8) + rng.uniform(0.1, 0.4) * (smooth - 0.5)
    if rng.random() < 0.3:
        yy, xx = np.mgrid[0:n, 0:n]
        angle = rng.uniform(0, np.pi)
        img = img + 0.08 * np.sin((yy * np.cos(angle) + xx * np.sin(angle)) * rng.uniform(0.2, 0.8) / s)
    return img + rng.normal(0, rng.uniform(0.02, 0.08), (n, n))


def _paint(img, mask, value, rng):
    img[mask] = value + rng.normal(0, 0.03, int(mask.sum()))


def _distractors(img, yy, xx, rng, count, n: int):
    s = n / REFERENCE_SIZE
    for _ in range(count):
        kind = rng.integers(3)
        value = rng.uniform(0, 1)
        if kind == 0:  # box
            y0, x0 = rng.uniform(0, n - 8 * s, 2)
            h, w = rng.uniform(6, 30, 2) * s
            mask = (yy >= y0) & (yy < y0 + h) & (xx >= x0) & (xx < x0 + w)
        elif kind == 1:  # line
            y0, x0, y1, x1 = rng.uniform(0, n, 4)
            mask = _segment(yy, xx, y0, x0, y1, x1, rng.uniform(1.5, 4) * s)
        else:  # blob
            cy, cx = rng.uniform(0, n, 2)
            mask = _disk(yy, xx, cy, cx, *(rng.uniform(3, 12, 2) * s))
        _paint(img, mask, value, rng)


def _person(img, yy, xx, rng, n: int):
    """A stick-and-ellipse figure: head, torso, two arms, two legs."""
    h = rng.uniform(34, 80) * (n / REFERENCE_SIZE)  # figure height in pixels
    cx = rng.uniform(h * 0.2, n - h * 0.2)
    top = rng.uniform(-0.05 * h, n - 0.95 * h)
    bg = float(np.median(img))
    value = float(np.clip(bg + rng.choice([-1, 1]) * rng.uniform(0.3, 0.6), 0, 1))
    limb = max(2.0 * n / REFERENCE_SIZE, 0.07 * h)
    head_r = 0.09 * h
    head_cy = top + head_r
    neck = top + 2 * head_r
    hip = neck + 0.38 * h
    mask = _disk(yy, xx, head_cy, cx, head_r, head_r * rng.uniform(0.85, 1.05))
    mask |= _disk(yy, xx, (neck + hip) / 2, cx, 0.2 * h, 0.11 * h * rng.uniform(0.9, 1.3))
    shoulder = neck + 0.06 * h
    for side in (-1, 1):
        ang = rng.uniform(0.2, 1.6)  # arm angle from hanging down
        ex, ey = cx + side * 0.32 * h * np.sin(ang), shoulder + 0.32 * h * np.cos(ang)
        mask |= _segment(yy, xx, shoulder, cx + side * 0.08 * h, ey, ex, limb)
        spread = rng.uniform(0.05, 0.5)
        fx, fy = cx + side * 0.45 * h * np.sin(spread), hip + 0.45 * h * np.cos(spread)
        mask |= _segment(yy, xx, hip - 0.03 * h, cx + side * 0.05 * h, fy, fx, limb * 1.2)
    _paint(img, mask, value, rng)


def person_dataset(samples: int, seed: int = 0, image_size: int = REFERENCE_SIZE) -> Tuple[np.ndarray, np.ndarray]:
    """Generated person / no-person images, half of each, in a seeded random order.

    Args:
        samples: number of images.
        seed: the same seed gives the same images and labels.
        image_size: side of the square grayscale images (figures, shapes and
            textures scale with it).

    Returns:
        `(images, labels)`: float32 images in [0, 1] of shape
        `(samples, image_size, image_size, 1)` and int32 labels (1 = person).
    """
    if samples < 0 or image_size < 8:
        raise ValueError(f"person_dataset: samples must be >= 0 and image_size >= 8, got {samples}, {image_size}")
    n = int(image_size)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
    images = np.empty((samples, n, n, 1), np.float32)
    labels = (np.arange(samples) % 2).astype(np.int32)
    rng.shuffle(labels)
    for i in range(samples):
        img = _background(rng, n)
        _distractors(img, yy, xx, rng, int(rng.integers(1, 5)), n)
        if labels[i]:
            _person(img, yy, xx, rng, n)
        if rng.random() < 0.5:
            _distractors(img, yy, xx, rng, 1, n)  # sometimes in front of the person
        images[i, :, :, 0] = np.clip(img, 0, 1)
    return images, labels
