"""Procedural phantom brain slices: the embedded default dataset (no download needed).

Each slice is a 2D axial brain-MRI-like image drawn from its own random generator, seeded from
(seed, index), so slice i is the same whatever ``n`` is. A slice has scalp, skull, a CSF rim,
a folded grey-matter ribbon over textured white matter, ventricles and a midline fissure, under
one of three contrast families (T1-, T2-, FLAIR-like), a smooth bias field, Rician noise, a
random canvas and background, and sometimes burnt-in text or a ruler. Tumour slices get 1-3
irregular lesions (brighter or darker, optionally ring-enhancing, with oedema) and a ground-truth
mask (lesion incl. rim, not oedema). Benign bright spots and vessels appear in both classes, and
contrast, gain and lesion polarity all vary, so global brightness alone cannot separate them.

``lesions`` picks how hard the lesions are to see (``LESIONS``): "standard" (radius 6-30% of the
head's semi-axis, 1.25-1.7x brighter or 0.3-0.72x darker than what they replace: at 64 px many
are a few pixels of faint contrast, a hard task) or "visible" (radius 18-32%, 1.8-2.2x or
0.15-0.35x: what a short CPU run can learn, so the smoke shows learning). Everything else, the
benign spots included, is the same.

numpy + OpenCV only; about 4 ms per ~250 px slice on one core (>= 200 slices/s).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from brainhpc.errors import BrainhpcError

CANVAS = (180, 320)  # canvas side range in pixels (height and width drawn separately)

# Relative tissue intensities per contrast family: the orderings that define T1/T2/FLAIR.
CONTRASTS = {
    "t1": dict(wm=0.80, gm=0.55, csf=0.12, scalp=0.90, bone=0.05, marrow=0.60),
    "t2": dict(wm=0.40, gm=0.58, csf=0.95, scalp=0.55, bone=0.05, marrow=0.45),
    "flair": dict(wm=0.45, gm=0.62, csf=0.10, scalp=0.60, bone=0.05, marrow=0.40),
}
# Oedema is dark on T1 and bright on T2/FLAIR.
OEDEMA_SIGN = {"t1": -1.0, "t2": 1.0, "flair": 1.0}
FONT = cv2.FONT_HERSHEY_SIMPLEX


@dataclass(frozen=True)
class LesionStyle:
    radius: tuple[float, float]  # of the head's semi-axis, drawn log-uniformly
    bright: tuple[float, float]  # lesion / what it replaces, for bright lesions
    dark: tuple[float, float]  # the same for dark ones


LESIONS = {"standard": LesionStyle((0.06, 0.3), (1.25, 1.7), (0.3, 0.72)),
           "visible": LesionStyle((0.18, 0.32), (1.8, 2.2), (0.15, 0.35))}


@dataclass
class Phantom:
    image: np.ndarray  # uint8 HxW grayscale
    label: int  # 0 healthy, 1 tumour
    mask: np.ndarray  # uint8 HxW, 1 inside lesions (incl. enhancing rim, not oedema)
    name: str  # e.g. "phantom-000123-tumour.png"
    contrast: str = ""  # "t1", "t2" or "flair": for checks and previews, not a label


def smooth_noise(rng: np.random.Generator, h: int, w: int, cells: float) -> np.ndarray:
    """Low-pass noise (about unit std) with ``cells`` blobs across the shorter side.

    Bicubic up to a quarter of the canvas, then bilinear the rest of the way: smooth enough,
    and several times faster than one bicubic resize to full size.
    """
    ch = max(2, int(round(cells * h / min(h, w))))
    cw = max(2, int(round(cells * w / min(h, w))))
    small = rng.standard_normal((ch, cw)).astype(np.float32)
    mid = cv2.resize(small, (max(cw, w // 4), max(ch, h // 4)), interpolation=cv2.INTER_CUBIC)
    mid /= mid.std() + 1e-6
    return cv2.resize(mid, (w, h), interpolation=cv2.INTER_LINEAR)


def _jitter(rng: np.random.Generator, tissue: dict[str, float]) -> dict[str, float]:
    return {k: float(np.clip(v * rng.uniform(0.88, 1.12), 0.02, 1.0)) for k, v in tissue.items()}


def _lesion(rng, img, mask, brain, cx, cy, rad, tissue, contrast,
            style: LesionStyle = LESIONS["standard"]) -> None:
    """Draw one irregular lesion (and its oedema) into ``img``/``mask`` around (cx, cy)."""
    h, w = img.shape
    oed = rng.uniform(0.6, 1.6) if rng.random() < 0.7 else 0.0  # oedema reach in radii
    reach = int(rad * (1.4 + oed)) + 2
    x0, x1 = max(0, int(cx) - reach), min(w, int(cx) + reach + 1)
    y0, y1 = max(0, int(cy) - reach), min(h, int(cy) + reach + 1)
    if x1 - x0 < 3 or y1 - y0 < 3:
        return
    yy, xx = np.ogrid[y0:y1, x0:x1]
    ang = rng.uniform(0, np.pi)
    ca, sa = np.cos(ang), np.sin(ang)
    dx, dy = xx - cx, yy - cy
    u = (dx * ca + dy * sa) / rad
    v = (-dx * sa + dy * ca) / (rad * rng.uniform(0.55, 1.0))
    wobble = smooth_noise(rng, y1 - y0, x1 - x0, rng.uniform(3, 6))
    d = np.sqrt(u * u + v * v) / (1.0 + rng.uniform(0.12, 0.3) * wobble)
    inside = brain[y0:y1, x0:x1]
    les = (d < 1.0) & inside
    if not les.any():
        return
    sub = img[y0:y1, x0:x1]
    if oed > 0:
        wgt = np.clip((1.0 + oed - d) / oed, 0.0, 1.0) * inside
        sub += OEDEMA_SIGN[contrast] * rng.uniform(0.08, 0.25) * wgt
    ref = float(sub[les].mean())  # relative to what it replaces (oedema incl.), so it shows
    bright = rng.random() < 0.55
    val = ref * (rng.uniform(*style.bright) if bright else rng.uniform(*style.dark))
    tex = 1.0 + 0.08 * smooth_noise(rng, y1 - y0, x1 - x0, rng.uniform(4, 8))
    if rng.random() < 0.4:  # ring enhancement: bright rim around a dark necrotic core
        rim_w = rng.uniform(0.2, 0.4)
        core = les & (d < 1.0 - rim_w)
        sub[les] = ref * rng.uniform(1.35, 1.8) * tex[les]
        sub[core] = ref * rng.uniform(0.2, 0.6) * tex[core]
    else:
        a = rng.uniform(0.8, 1.0)
        sub[les] = (1 - a) * sub[les] + a * val * tex[les]
    mask[y0:y1, x0:x1] |= les.astype(np.uint8)


def _lesions(rng, img, mask, brain, parench, to_px, a, tissue, contrast,
             style: LesionStyle) -> None:
    """1-3 lesions of varied size at random places in the brain (``a``: head semi-axis, px)."""
    for _ in range(int(rng.choice([1, 1, 1, 2, 2, 3]))):
        for _try in range(10):
            rr, th = np.sqrt(rng.uniform(0, 0.55)), rng.uniform(0, 2 * np.pi)
            lx, ly = to_px(rr * np.cos(th), rr * np.sin(th))
            if brain[int(ly), int(lx)]:
                break
        rad = a * np.exp(rng.uniform(*np.log(style.radius)))
        _lesion(rng, img, mask, parench | (mask > 0), lx, ly, rad, tissue, contrast, style)
    if not mask.any():  # every lesion fell off the parenchyma: one mid-sized, well inside
        lx, ly = to_px(0.2, -0.3)
        _lesion(rng, img, mask, brain, lx, ly, max(0.15, style.radius[0]) * a, tissue,
                contrast, style)


def _benign(rng, img, pts_to_px, tissue) -> None:
    """Label-independent confounders: a bright choroid-plexus-like spot and/or a vessel."""
    if rng.random() < 0.5:
        x, y = pts_to_px(rng.choice([-1, 1]) * rng.uniform(0.08, 0.2), rng.uniform(-0.1, 0.25))
        r = max(2, int(rng.uniform(0.015, 0.04) * img.shape[0]))
        cv2.circle(img, (int(x), int(y)), r, float(tissue["wm"] * rng.uniform(1.2, 1.6)), -1,
                   cv2.LINE_AA)
    if rng.random() < 0.4:
        t = np.linspace(0, 1, 12)
        u0, v0 = rng.uniform(-0.5, 0.5, 2)
        du, dv = rng.uniform(-0.35, 0.35, 2)
        bend = rng.uniform(-0.1, 0.1)
        pts = [pts_to_px(u0 + du * s + bend * np.sin(np.pi * s), v0 + dv * s) for s in t]
        pts = np.array(pts, np.int32).reshape(-1, 1, 2)
        cv2.polylines(img, [pts], False, float(tissue["wm"] * rng.uniform(1.1, 1.5)),
                      int(rng.integers(1, 3)), cv2.LINE_AA)


def _overlays(rng, img: np.ndarray, level: int) -> None:
    """Burnt-in annotations in a corner and/or a small ruler near an edge."""
    h, w = img.shape
    if rng.random() < 0.3:
        text = str(rng.choice(["L", "R", "A", "P", f"IM {rng.integers(1, 40)}",
                               f"SE {rng.integers(1, 12)}", f"{rng.integers(1, 99)}Y"]))
        scale = rng.uniform(0.3, 0.5)
        (tw, th), _ = cv2.getTextSize(text, FONT, scale, 1)
        x = 3 if rng.random() < 0.5 else w - tw - 3
        y = th + 3 if rng.random() < 0.5 else h - 4
        cv2.putText(img, text, (x, y), FONT, scale, level, 1, cv2.LINE_AA)
    if rng.random() < 0.1:
        x = 3 if rng.random() < 0.5 else w - 8
        y0 = int(rng.integers(h // 4, h // 2))
        length = int(rng.integers(h // 6, h // 3))
        cv2.line(img, (x, y0), (x, y0 + length), level, 1)
        for k in range(0, length + 1, max(3, length // 8)):
            cv2.line(img, (x, y0 + k), (x + 4, y0 + k), level, 1)


@dataclass
class _Head:
    """The head ellipse on the canvas: centre, semi-axes a (left-right) < b (front-back),
    rotation (cos, sin), and every pixel's elliptic radius ``r`` (1 on the outline)."""

    h: int
    w: int
    cx: float
    cy: float
    a: float
    b: float
    ca: float
    sa: float
    r: np.ndarray

    def to_px(self, u, v):  # head coordinates (floats or arrays) -> canvas pixels
        return (self.cx + u * self.a * self.ca - v * self.b * self.sa,
                self.cy + u * self.a * self.sa + v * self.b * self.ca)


def _head(rng: np.random.Generator, h: int, w: int) -> _Head:
    """A rotated head ellipse placed off-centre, with a margin for the outline's lumps."""
    fill = rng.uniform(0.62, 0.9)
    b = 0.5 * fill * min(h, w / rng.uniform(0.72, 0.92))
    a = b * rng.uniform(0.72, 0.92)
    if a > 0.46 * w:
        a, b = 0.46 * w, 0.46 * w * b / a
    b = min(b, 0.46 * h)
    ang = np.deg2rad(rng.uniform(-15, 15))
    ca, sa, a, b = float(np.cos(ang)), float(np.sin(ang)), float(a), float(b)
    ext_x = np.sqrt((a * ca) ** 2 + (b * sa) ** 2)
    ext_y = np.sqrt((a * sa) ** 2 + (b * ca) ** 2)
    # Keep a margin for the outline's lumps (up to ~5%) so the head never touches the edge.
    cx = w / 2 + rng.uniform(-1, 1) * max(0.0, w / 2 - 1.06 * ext_x - 3)
    cy = h / 2 + rng.uniform(-1, 1) * max(0.0, h / 2 - 1.06 * ext_y - 3)
    yy, xx = np.ogrid[0:h, 0:w]
    dx, dy = (xx - cx).astype(np.float32), (yy - cy).astype(np.float32)
    U = (dx * ca + dy * sa) / a
    V = (-dx * sa + dy * ca) / b
    return _Head(h, w, cx, cy, a, b, ca, sa, np.sqrt(U * U + V * V))


def _anatomy(rng: np.random.Generator, head: _Head, tissue: dict):
    """Scalp, bone (with marrow), CSF, grey and white matter with sulci; (image, brain mask,
    sulci mask, brain radius)."""
    h, w, r = head.h, head.w, head.r
    lumps = smooth_noise(rng, h, w, 5)  # the skull follows the brain's outline
    r_out = r * (1.0 + 0.015 * lumps)
    r_in = r * (1.0 + 0.03 * lumps)
    r_wm = r * (1.0 + rng.uniform(0.07, 0.11) * smooth_noise(rng, h, w, rng.uniform(16, 26)))
    skull = rng.uniform(0.85, 0.9)
    brain_r = skull - rng.uniform(0.02, 0.05)
    wm_r = brain_r - rng.uniform(0.1, 0.16)

    img = np.zeros((h, w), np.float32)
    img[r_out < 1.0] = tissue["scalp"]
    bone_r = rng.uniform(0.93, 0.96)
    img[r_out < bone_r] = tissue["bone"]
    if rng.random() < 0.7:  # diploic marrow between the inner and outer tables
        img[(r_out < min(skull + 0.04, bone_r - 0.01)) & (r_out > skull + 0.015)] = tissue["marrow"]
    img[r_in < skull] = tissue["csf"]
    brain = r_in < brain_r
    tex = 1.0 + rng.uniform(0.03, 0.07) * smooth_noise(rng, h, w, rng.uniform(12, 24))
    img = np.where(brain, tissue["gm"] * tex, img)
    sulci = brain & (np.abs(smooth_noise(rng, h, w, rng.uniform(14, 22))) < 0.12) & (r_wm > wm_r)
    img[sulci] = tissue["csf"]
    wm = brain & (r_wm < wm_r)
    img = np.where(wm, tissue["wm"] * tex, img)
    return img, brain, sulci, brain_r


def _deep(rng: np.random.Generator, img: np.ndarray, head: _Head, tissue: dict,
          brain_r: float) -> None:
    """Deep grey nuclei, ventricles and the interhemispheric fissure (slice level varies), drawn
    as polygons in head coordinates: much cheaper than full-canvas implicit shapes."""
    def poly(us: np.ndarray, vs: np.ndarray) -> list[np.ndarray]:
        return [np.stack(head.to_px(us, vs), -1).round().astype(np.int32)]

    t = np.linspace(0, 2 * np.pi, 24, endpoint=False)
    vent_scale = rng.uniform(0.5, 1.6) if rng.random() < 0.85 else 0.0
    if vent_scale > 0 and rng.random() < 0.6:
        nuclei = np.zeros((head.h, head.w), np.uint8)
        for s in (-1.0, 1.0):
            cv2.fillPoly(nuclei, poly(s * 0.22 + 0.1 * np.cos(t), 0.12 + 0.13 * np.sin(t)), 1)
        img[nuclei > 0] = 0.5 * img[nuclei > 0] + 0.5 * tissue["gm"]
    csf = float(tissue["csf"])
    if vent_scale > 0:
        curve, vc, length = rng.uniform(0.2, 0.8), rng.uniform(-0.1, 0.0), rng.uniform(0.2, 0.35)
        vs = vc + length * np.cos(np.linspace(0, np.pi, 14))
        shape = np.sqrt(np.clip(1 - ((vs - vc) / length) ** 2, 0, 1))
        for s in (-1.0, 1.0):
            half = 0.05 * vent_scale * rng.uniform(0.75, 1.25) * shape
            mid_u = s * (0.1 * vent_scale ** 0.5 + curve * (vs - vc) ** 2)
            us = np.concatenate([mid_u - half, (mid_u + half)[::-1]])
            cv2.fillPoly(img, poly(us, np.concatenate([vs, vs[::-1]])), csf, cv2.LINE_AA)
    thick = 1 + int(rng.random() < 0.5)
    for v0, v1 in ((0.38, 0.85), (-0.38, -0.85)):
        (x0, y0), (x1, y1) = head.to_px(0.0, v0), head.to_px(0.0, v1 * brain_r)
        cv2.line(img, (int(x0), int(y0)), (int(x1), int(y1)), csf, thick, cv2.LINE_AA)


def _acquire(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """What the scanner adds: partial volume, bias field, background, Rician noise, overlays."""
    h, w = img.shape
    img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.6, 1.2))  # partial volume
    img *= 1.0 + rng.uniform(0.1, 0.3) * smooth_noise(rng, h, w, rng.uniform(1.5, 3)).clip(-2, 2)
    img *= rng.uniform(150, 250)
    if rng.random() < 0.25:  # grey (or textured) scanner background
        img += rng.uniform(15, 70) * (1.0 + 0.2 * smooth_noise(rng, h, w, 3) * rng.random())
    sigma = rng.uniform(2, 10)
    # Rician magnitude noise. OpenCV's generator (thread-local, seeded from ``rng`` right here,
    # so still deterministic) is about 4x faster than numpy's normal draws, the slowest step.
    cv2.setRNGSeed(int(rng.integers(2**31)))
    n1, n2 = np.empty((h, w), np.float32), np.empty((h, w), np.float32)
    cv2.randn(n1, 0.0, sigma)
    cv2.randn(n2, 0.0, sigma)
    img = np.sqrt((img + n1) ** 2 + n2 ** 2)
    image = np.clip(img, 0, 255).astype(np.uint8)
    _overlays(rng, image, int(rng.integers(180, 256)))
    return image


def make_one(rng: np.random.Generator, index: int, tumour: bool,
             lesions: str = "standard") -> Phantom:
    """One slice from ``rng`` (the caller seeds it); ``index`` only names it."""
    side = rng.integers(CANVAS[0], CANVAS[1] + 1, 2)
    h, w = (int(side[0]), int(side[0])) if rng.random() < 0.3 else (int(side[0]), int(side[1]))
    contrast = str(rng.choice(list(CONTRASTS)))
    tissue = _jitter(rng, CONTRASTS[contrast])
    head = _head(rng, h, w)
    img, brain, sulci, brain_r = _anatomy(rng, head, tissue)
    _deep(rng, img, head, tissue, brain_r)
    _benign(rng, img, head.to_px, tissue)
    # Lesions draw from their own generator, so the rest of the slice is the same whether or
    # not it has a tumour (healthy/tumour twins differ only around the lesions).
    lesion_rng = np.random.default_rng(rng.integers(2**63))
    mask = np.zeros((h, w), np.uint8)
    if tumour:
        parench = brain & ~sulci & (img != float(tissue["csf"]))
        _lesions(lesion_rng, img, mask, brain, parench, head.to_px, head.a, tissue, contrast,
                 LESIONS[lesions])
    image = _acquire(rng, img)
    name = f"phantom-{index:06d}-{'tumour' if tumour else 'healthy'}.png"
    return Phantom(image, int(tumour), mask, name, contrast)


def generate(n: int, seed: int = 0, tumour_fraction: float = 0.5,
             lesions: str = "standard") -> list[Phantom]:
    """``n`` slices; slice i depends only on (seed, i), its label on its own generator."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise BrainhpcError(f"phantom: n must be an integer >= 1, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise BrainhpcError(f"phantom: seed must be an integer >= 0, got {seed!r}")
    if not 0.0 <= float(tumour_fraction) <= 1.0:
        raise BrainhpcError(f"phantom: tumour_fraction must be in [0, 1], got {tumour_fraction!r}")
    if lesions not in LESIONS:
        raise BrainhpcError(f"phantom: lesions must be one of {', '.join(LESIONS)}, "
                            f"got {lesions!r}")
    return [make_slice(i, int(seed), float(tumour_fraction), lesions) for i in range(int(n))]


def make_slice(index: int, seed: int = 0, tumour_fraction: float = 0.5,
               lesions: str = "standard") -> Phantom:
    """Slice ``index`` of ``generate(n, seed, tumour_fraction)`` alone (for parallel workers)."""
    rng = np.random.default_rng([int(seed), int(index)])
    return make_one(rng, int(index), bool(rng.random() < tumour_fraction), lesions)
