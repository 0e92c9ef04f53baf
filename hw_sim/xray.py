"""Synthetic dual-energy X-ray images of parcels, deterministic for a seed.

A dual-energy scanner colours each pixel by the effective atomic number of what the beam passed
through, and darkens it by how much it passed through:

  organic (clothes, paper, food, plastics)   orange
  mixed / light inorganic (glass, aluminium) green
  metal / dense inorganic                    blue
  nothing                                    near white

Each object here is a shape with a material and a thickness map. Attenuations add up along the
beam (objects overlap), so the image is ``I = exp(-sum_m mu_m * t_m)`` per material, coloured by
the materials' shares and darkened by I. What sits in a parcel: its box or polybag, benign clutter
(clothes, books, electronics, shoes, cosmetics) and, for some parcels, one item customs look for:

  battery   lithium cells: dense cylinders or a slab, with metal ends
  blade     a thin, sharply edged dark-blue shape, usually with a handle
  firearm   dense blue masses with a pistol's outline, or a barrel and slide
  liquid    a bottle outline holding a uniform orange-green volume

Placed with random pose, scale, overlap and occlusion by clutter. ``render(seed, label)`` gives the
same image for the same arguments on every machine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

CLASSES = ("clean", "battery", "blade", "firearm", "liquid")
TARGETS = CLASSES[1:]
SIZE = 128

# attenuation per unit thickness, and display colour (RGB, 0..1) per material
_MU = {"organic": 0.9, "mixed": 1.8, "metal": 4.0}
_COLOUR = {
    "organic": np.array([0.95, 0.55, 0.10]),
    "mixed": np.array([0.25, 0.75, 0.20]),
    "metal": np.array([0.10, 0.25, 0.90]),
}
_MATERIALS = tuple(_MU)


@dataclass
class Canvas:
    size: int

    def __post_init__(self) -> None:
        self.t = {m: np.zeros((self.size, self.size), np.float32) for m in _MATERIALS}

    def add(self, material: str, mask: np.ndarray, thickness: float | np.ndarray) -> None:
        self.t[material] += mask * thickness

    def image(self, rng: np.random.Generator) -> np.ndarray:
        att = {m: self.t[m] * _MU[m] for m in _MATERIALS}
        total: np.ndarray = np.sum(np.stack(list(att.values())), axis=0)
        intensity = np.exp(-total)[..., None]
        share = np.stack([att[m] for m in _MATERIALS], -1) / (total[..., None] + 1e-6)
        colour = share @ np.stack([_COLOUR[m] for m in _MATERIALS])
        rgb = intensity * 1.0 + (1 - intensity) * colour * (0.25 + 0.75 * intensity)
        rgb += rng.normal(0, 0.012, rgb.shape).astype(np.float32)  # detector noise
        out: np.ndarray = (np.clip(rgb, 0, 1) * 255).astype(np.uint8)
        return out


def _mask(size: int) -> np.ndarray:
    return np.zeros((size, size), np.float32)


def _poly(size: int, pts: np.ndarray) -> np.ndarray:
    m = _mask(size)
    cv2.fillPoly(m, [np.round(pts).astype(np.int32)], 1.0, lineType=cv2.LINE_AA)
    return m


def _transform(pts: np.ndarray, angle: float, scale: float, centre: tuple[float, float]) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    rot = np.array([[c, -s], [s, c]])
    out: np.ndarray = (pts * scale) @ rot.T + np.array(centre)
    return out


def _rect(w: float, h: float) -> np.ndarray:
    return np.array([[-w / 2, -h / 2], [w / 2, -h / 2], [w / 2, h / 2], [-w / 2, h / 2]])


def _place(rng: np.random.Generator, size: int, margin: float = 0.22) -> tuple[float, float]:
    lo, hi = size * margin, size * (1 - margin)
    return float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi))


def _blob(rng: np.random.Generator, size: int, centre: tuple[float, float], radius: float, n: int = 10) -> np.ndarray:
    angles = np.sort(rng.uniform(0, 2 * math.pi, n))
    radii = radius * rng.uniform(0.6, 1.2, n)
    pts = np.stack([np.cos(angles) * radii, np.sin(angles) * radii], -1) + np.array(centre)
    return _poly(size, pts)


# --- the parcel and benign clutter -----------------------------------------------------------


def _container(cv: Canvas, rng: np.random.Generator) -> None:
    size = cv.size
    if rng.random() < 0.5:  # a carton: walls show as a thin frame
        w, h = rng.uniform(0.75, 0.95) * size, rng.uniform(0.6, 0.95) * size
        outer = _poly(size, _transform(_rect(w, h), rng.uniform(-0.15, 0.15), 1, (size / 2, size / 2)))
        inner = _poly(size, _transform(_rect(w - 6, h - 6), 0, 1, (size / 2, size / 2)))
        cv.add("organic", outer, 0.15)
        cv.add("organic", np.clip(outer - inner, 0, 1), 0.35)
    else:  # a polybag
        cv.add("organic", _blob(rng, size, (size / 2, size / 2), size * 0.45, 14), 0.08)


def _clothes(cv: Canvas, rng: np.random.Generator) -> None:
    m = _blob(rng, cv.size, _place(rng, cv.size, 0.3), cv.size * rng.uniform(0.15, 0.3), 12)
    folds = cv2.GaussianBlur(rng.uniform(0.1, 0.5, m.shape).astype(np.float32), (0, 0), 3)
    cv.add("organic", m, 0.3 + folds)


def _book(cv: Canvas, rng: np.random.Generator) -> None:
    pts = _transform(_rect(rng.uniform(20, 40), rng.uniform(28, 50)), rng.uniform(0, math.pi), 1, _place(rng, cv.size))
    cv.add("organic", _poly(cv.size, pts), rng.uniform(0.6, 1.0))


def _electronics(cv: Canvas, rng: np.random.Generator) -> None:
    centre, angle = _place(rng, cv.size), rng.uniform(0, math.pi)
    w, h = rng.uniform(22, 40), rng.uniform(14, 28)
    cv.add("mixed", _poly(cv.size, _transform(_rect(w, h), angle, 1, centre)), 0.25)
    for _ in range(rng.integers(3, 8)):  # components and screws: small metal dots
        off = rng.uniform(-0.4, 0.4, 2) * np.array([w, h])
        p = _transform(np.array([[0.0, 0.0]]), angle, 1, centre) + off @ np.array(
            [[math.cos(angle), math.sin(angle)], [-math.sin(angle), math.cos(angle)]]
        )
        m = _mask(cv.size)
        cv2.circle(m, tuple(np.round(p[0]).astype(int)), int(rng.integers(1, 3)), 1.0, -1, cv2.LINE_AA)
        cv.add("metal", m, 0.3)
    for _ in range(rng.integers(2, 5)):  # traces and wires
        m = _mask(cv.size)
        a = np.round(_transform(rng.uniform(-0.5, 0.5, (2, 2)) * np.array([w, h]), angle, 1, centre)).astype(int)
        cv2.line(m, tuple(a[0]), tuple(a[1]), 1.0, 1, cv2.LINE_AA)
        cv.add("mixed", m, 0.3)


def _shoe(cv: Canvas, rng: np.random.Generator) -> None:
    centre, angle = _place(rng, cv.size), rng.uniform(0, 2 * math.pi)
    sole = _transform(np.array([[-22, -7], [18, -9], [24, 0], [18, 9], [-22, 7], [-26, 0]], float),
                      angle, rng.uniform(0.8, 1.2), centre)
    cv.add("organic", _poly(cv.size, sole), 0.9)
    for k in range(rng.integers(3, 6)):  # eyelets
        p = _transform(np.array([[-6 + 4 * k, 0.0]]), angle, 1, centre)
        m = _mask(cv.size)
        cv2.circle(m, tuple(np.round(p[0]).astype(int)), 1, 1.0, -1, cv2.LINE_AA)
        cv.add("metal", m, 0.2)


def _cosmetics(cv: Canvas, rng: np.random.Generator) -> None:
    centre = _place(rng, cv.size)
    m = _mask(cv.size)
    if rng.random() < 0.5:  # a jar
        cv2.circle(m, tuple(np.round(centre).astype(int)), int(rng.integers(4, 8)), 1.0, -1, cv2.LINE_AA)
    else:  # a tube or a lipstick
        pts = _transform(_rect(rng.uniform(4, 7), rng.uniform(12, 20)), rng.uniform(0, math.pi), 1, centre)
        m = _poly(cv.size, pts)
    cv.add(rng.choice(["organic", "mixed"]), m, rng.uniform(0.4, 0.8))


CLUTTER = (_clothes, _book, _electronics, _shoe, _cosmetics)


# --- what customs look for ----------------------------------------------------------------------


def _battery(cv: Canvas, rng: np.random.Generator) -> None:
    centre, angle, scale = _place(rng, cv.size), rng.uniform(0, math.pi), rng.uniform(0.8, 1.3)
    if rng.random() < 0.6:  # a pack of cylindrical cells side by side
        cells = int(rng.integers(2, 6))
        for k in range(cells):
            off = (k - (cells - 1) / 2) * 7.5
            body = _transform(_rect(6.5, 24) + np.array([off, 0]), angle, scale, centre)
            cv.add("mixed", _poly(cv.size, body), 0.9)
            for end in (-11.5, 11.5):
                cap = _transform(_rect(6.5, 2.5) + np.array([off, end]), angle, scale, centre)
                cv.add("metal", _poly(cv.size, cap), 0.6)
    else:  # a pouch cell / power bank slab with terminals
        w, h = rng.uniform(18, 28), rng.uniform(28, 40)
        cv.add("mixed", _poly(cv.size, _transform(_rect(w, h), angle, scale, centre)), 1.0)
        for k in (-1, 1):
            tab = _transform(_rect(3, 5) + np.array([k * w / 4, -h / 2 - 2]), angle, scale, centre)
            cv.add("metal", _poly(cv.size, tab), 0.9)


def _blade(cv: Canvas, rng: np.random.Generator) -> None:
    centre, angle, scale = _place(rng, cv.size), rng.uniform(0, 2 * math.pi), rng.uniform(0.8, 1.3)
    length, width = rng.uniform(28, 42), rng.uniform(4, 7)
    blade = np.array([[0, -width / 2], [length, -width / 4], [length + 6, 0], [0, width / 2]], float)
    cv.add("metal", _poly(cv.size, _transform(blade, angle, scale, centre)), rng.uniform(0.35, 0.6))
    if rng.random() < 0.8:  # handle
        handle = _rect(18, width + 3) + np.array([-9, 0])
        cv.add(rng.choice(["organic", "mixed"]), _poly(cv.size, _transform(handle, angle, scale, centre)), 0.7)


def _firearm(cv: Canvas, rng: np.random.Generator) -> None:
    centre, angle, scale = _place(rng, cv.size), rng.uniform(0, 2 * math.pi), rng.uniform(0.8, 1.2)
    slide = _rect(44, 10) + np.array([6, -6])
    grip = np.array([[-14, -1], [-4, -1], [0, 22], [-10, 24]], float)
    guard = np.array([[-4, -1], [6, -1], [6, 6], [-2, 6]], float)
    cv.add("metal", _poly(cv.size, _transform(slide, angle, scale, centre)), rng.uniform(0.9, 1.3))
    if rng.random() < 0.8:  # a whole pistol; otherwise slide and barrel only
        cv.add("metal", _poly(cv.size, _transform(grip, angle, scale, centre)), rng.uniform(0.7, 1.1))
        cv.add("metal", _poly(cv.size, _transform(guard, angle, scale, centre)), 0.4)


def _liquid(cv: Canvas, rng: np.random.Generator) -> None:
    centre, angle, scale = _place(rng, cv.size), rng.uniform(0, 2 * math.pi), rng.uniform(0.9, 1.3)
    w, h = rng.uniform(16, 24), rng.uniform(34, 48)
    body = np.array([[-w / 2, h / 2], [w / 2, h / 2], [w / 2, -h / 4], [w / 5, -h / 2 + 2],
                     [w / 5, -h / 2 - 8], [-w / 5, -h / 2 - 8], [-w / 5, -h / 2 + 2], [-w / 2, -h / 4]], float)
    m = _poly(cv.size, _transform(body, angle, scale, centre))
    liquid = rng.uniform(0.9, 1.3)
    cv.add("organic", m, liquid * 0.7)
    cv.add("mixed", m, liquid * 0.35)
    wall = np.clip(m - cv2.erode(m, np.ones((3, 3), np.uint8)), 0, 1)
    cv.add(rng.choice(["mixed", "organic"]), wall, 0.6)  # glass or plastic wall


TARGET_DRAWERS = {"battery": _battery, "blade": _blade, "firearm": _firearm, "liquid": _liquid}


def render(seed: int, label: str = "clean", size: int = SIZE) -> np.ndarray:
    """One parcel image (H x W x 3 RGB uint8), the same for the same seed and label."""
    if label not in CLASSES:
        raise ValueError(f"unknown class {label!r}")
    rng = np.random.default_rng(seed)
    cv = Canvas(size)
    _container(cv, rng)
    clutter = [CLUTTER[i] for i in rng.integers(0, len(CLUTTER), rng.integers(2, 6))]
    below = int(rng.integers(0, len(clutter) + 1))
    for draw in clutter[:below]:
        draw(cv, rng)
    if label != "clean":
        TARGET_DRAWERS[label](cv, rng)
    for draw in clutter[below:]:  # clutter on top occludes the item (attenuation adds)
        draw(cv, rng)
    return cv.image(rng)


def write_png(path: str, rgb: np.ndarray) -> None:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise OSError(f"cannot encode {path}")
    with open(path, "wb") as f:
        f.write(buf.tobytes())
