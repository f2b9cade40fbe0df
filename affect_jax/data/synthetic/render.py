"""Drawn faces whose 12 action units each move a visible part, plus camera nuisance.

Faces are built as polygons/polylines in face units (the canvas spans [-1, 1], y down),
moved by the head pose with one matrix product, drawn with PIL at twice the output size
and box-downsampled (anti-aliasing). Per frame the camera adds lighting, blur, sensor
noise, JPEG compression, occluders, and drops some frames entirely.
"""

from __future__ import annotations

import dataclasses
import functools
import io
from typing import Iterator, NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from affect_jax.data.affwild2 import AU_NAMES
from affect_jax.data.synthetic.dynamics import ou

_DARK = (25, 16, 14)
_SKINS = ((255, 224, 196), (241, 194, 160), (224, 172, 130), (198, 134, 96), (165, 108, 76),
          (130, 84, 60), (105, 68, 50))
_HAIRS = ((25, 20, 18), (60, 40, 28), (110, 75, 45), (170, 130, 80), (215, 185, 130),
          (150, 150, 150), (130, 50, 30))
NEUTRAL_POSE = (0.0, 0.0, 0.0, 1.0)  # dx, dy, rotation (rad), scale


@dataclasses.dataclass(frozen=True)
class Identity:
  """One person (and their scene): shape, colours and feature placement, in face units."""
  head: tuple[float, float]  # half width, half height of the head ellipse
  jaw: float                 # narrowing of the lower face
  skin: tuple[int, int, int]
  hair: tuple[int, int, int]
  hair_style: int            # 0 short, 1 long, 2 fringe, 3 bald
  hairline: float
  lips: tuple[int, int, int]
  iris: tuple[int, int, int]
  clothes: tuple[int, int, int]
  eye_dx: float
  eye_y: float
  eye_w: float
  eye_h: float
  brow_gap: float
  brow_thick: float
  mouth_w: float
  mouth_y: float
  lip_thick: float
  glasses: bool
  rest: tuple[float, ...]    # [12] resting face: AU-like offsets that are never labelled
  bg_seed: int


def _mix(a, b, t: float) -> tuple[int, int, int]:
  t = min(max(float(t), 0.0), 1.0)
  return tuple(int(x + (y - x) * t + 0.5) for x, y in zip(a, b))


def sample_identity(rng: np.random.Generator) -> Identity:
  u = rng.uniform
  i = rng.integers(len(_SKINS) - 1)
  skin = _mix(_SKINS[i], _SKINS[i + 1], u())
  eye_y, brow_gap = u(-0.2, -0.1), u(0.15, 0.2)
  rest = np.zeros(len(AU_NAMES))
  rest[[AU_NAMES.index(k) for k in ("AU1", "AU4", "AU12", "AU15")]] = rng.normal(0, 0.12, 4)
  return Identity(
      head=(u(0.68, 0.8), u(0.85, 0.95)), jaw=u(0.05, 0.3), skin=skin,
      hair=_HAIRS[rng.integers(len(_HAIRS))], hair_style=int(rng.integers(4)),
      hairline=eye_y - brow_gap - u(0.22, 0.32),
      lips=_mix(_mix(skin, (175, 45, 65), 0.6), _DARK, u(0, 0.25)),
      iris=_mix((40, 25, 15), (70, 120, 150), u() ** 2),
      clothes=tuple(int(c) for c in rng.integers(20, 235, 3)),
      eye_dx=u(0.26, 0.33), eye_y=eye_y, eye_w=u(0.11, 0.14), eye_h=u(0.06, 0.08),
      brow_gap=brow_gap, brow_thick=u(0.045, 0.07), mouth_w=u(0.19, 0.25), mouth_y=u(0.42, 0.5),
      lip_thick=u(0.035, 0.055), glasses=bool(rng.random() < 0.2),
      rest=tuple(float(r) for r in rest), bg_seed=int(rng.integers(2**31)))


# Fixed sample grids, built once: rendering runs ~50 of these small shapes per frame.
_CIRCLES = {n: np.stack([np.cos(t), np.sin(t)], 1)
            for n in (12, 16, 20, 24) for t in [np.linspace(0, 2 * np.pi, n, endpoint=False)]}
_HEAD_T = np.linspace(0, 2 * np.pi, 48, endpoint=False)
_CROWN_T = np.linspace(np.pi - 0.3, 2 * np.pi + 0.3, 20)
_S9, _S13 = np.linspace(-1, 1, 9), np.linspace(-1, 1, 13)
_BEZIER_S = np.linspace(0, 1, 7)[:, None]
_BROW_TAPER = np.linspace(1.1, 0.5, 7)[:, None] * np.array([0.0, 0.5])


def _ellipse(cx, cy, rx, ry, n=24) -> np.ndarray:
  return _CIRCLES[n] * np.array([rx, ry]) + np.array([cx, cy])


def _pts(x, y) -> np.ndarray:
  """[k, 2] points from x and y (arrays or scalars, broadcast)."""
  out = np.empty((max(np.size(x), np.size(y)), 2))
  out[:, 0], out[:, 1] = x, y
  return out


def _bezier(p0, p1, p2) -> np.ndarray:
  """Quadratic curve through p0, p1 (at its middle) and p2; [7, 2]."""
  p0, p1, p2 = map(np.asarray, (p0, p1, p2))
  c = 2 * p1 - (p0 + p2) / 2  # the control point that puts p1 on the curve
  s = _BEZIER_S
  return (1 - s) ** 2 * p0 + 2 * s * (1 - s) * c + s**2 * p2


def _mirror(pts) -> np.ndarray:
  return pts * np.array([-1.0, 1.0])


def _head_ops(idn: Identity, a: dict) -> list:
  rx, ry = idn.head
  low = np.clip(np.sin(_HEAD_T), 0, 1)  # 0 above the centre line, 1 at the chin; AU26 drops the jaw
  head = _pts(rx * np.cos(_HEAD_T) * (1 - idn.jaw * low**2), ry * np.sin(_HEAD_T) + 0.1 * a["AU26"] * low)
  crown = _pts(1.07 * rx * np.cos(_CROWN_T), 1.08 * ry * np.sin(_CROWN_T) - 0.02)
  xs = -rx * _S9
  hairline = _pts(xs, idn.hairline + 0.3 * (xs / rx) ** 4)
  if idn.hair_style == 2:  # a jagged fringe
    hairline[1::2, 1] += 0.06
  ops = [("poly", _pts([-1.3, -1.3, -0.35, 0, 0.35, 1.3, 1.3], [1.4, 0.95, 0.8, 0.95, 0.8, 0.95, 1.4]),
          idn.clothes),
         ("poly", _pts([-0.3, 0.3, 0.36, -0.36], [0.4, 0.4, 1.0, 1.0]), _mix(idn.skin, _DARK, 0.25))]
  if idn.hair_style == 1:
    ops.append(("poly", np.concatenate([crown, _pts([rx + 0.2, -rx - 0.2], [1.1, 1.1])]), idn.hair))
  for sg in (-1, 1):
    ear = _ellipse(sg * 0.98 * rx, idn.eye_y + 0.12, 0.08, 0.15, 12)
    ops.append(("poly", ear, _mix(idn.skin, _DARK, 0.15)))
  ops.append(("poly", head, idn.skin, _mix(idn.skin, _DARK, 0.35)))
  if idn.hair_style == 3:  # bald: hair only above the ears
    for sg in (-1, 1):
      tuft = _pts(sg * rx * np.array([0.8, 1.03, 1.02]), [-0.45, -0.2, 0.0])
      ops.append(("poly", tuft, idn.hair))
  else:
    ops.append(("poly", np.concatenate([crown, hairline]), idn.hair))
  return ops


def _brow_ops(idn: Identity, a: dict) -> list:
  by = idn.eye_y - idn.brow_gap
  a1, a2, a4 = a["AU1"], a["AU2"], a["AU4"]
  ops = []
  # AU1 wrinkles the central forehead, AU2 the lateral one, AU4 the glabella.
  for x0, x1, k in ((-0.18, 0.18, a1), (0.2, 0.45, a2), (-0.45, -0.2, a2)):
    if k > 0.05:
      for dy in (0.1, 0.17):
        ops.append(("line", _pts([x0, (x0 + x1) / 2, x1], [by - dy, by - dy - 0.015, by - dy]),
                    _mix(idn.skin, _DARK, 0.55 * k), 0.015))
  if a4 > 0.05:
    for sg in (-1, 1):
      furrow = _pts([sg * 0.035, sg * 0.045], [by - 0.02, by + 0.09])
      ops.append(("line", furrow, _mix(idn.skin, _DARK, 0.6 * a4), 0.015))
  inner = (idn.eye_dx - idn.eye_w - 0.06 * a4, by + 0.01 - 0.10 * a1 + 0.09 * a4)
  mid = (idn.eye_dx + 0.1 * idn.eye_w - 0.02 * a4, by - 0.025 - 0.04 * a1 - 0.05 * a2 + 0.06 * a4)
  outer = (idn.eye_dx + 1.25 * idn.eye_w, by + 0.01 - 0.10 * a2 + 0.05 * a4)
  curve = _bezier(inner, mid, outer)
  th = idn.brow_thick * _BROW_TAPER  # half thickness, vertical
  brow = np.concatenate([curve - th, (curve + th)[::-1]])
  colour = _mix((15, 10, 8), idn.hair, 0.25)  # brows stay darker than any skin
  return ops + [("poly", brow, colour), ("poly", _mirror(brow), colour)]


def _eye_ops(idn: Identity, a: dict, blink: float) -> list:
  a6, a7 = a["AU6"], a["AU7"]
  ew, open_ = idn.eye_w, 1 - blink
  hu = max(idn.eye_h * (1 - 0.5 * a7 - 0.15 * a6) * open_, 0.004)
  hl = max(0.6 * idn.eye_h * (1 - 0.65 * a6 - 0.45 * a7) * open_, 0.004)
  s = _S9
  ops = []
  for sg in (-1, 1):
    cx, cy = sg * idn.eye_dx, idn.eye_y
    cheek = _ellipse(sg * (idn.eye_dx + 0.02), cy + 0.25 - 0.07 * a6 - 0.03 * a["AU12"], 0.11, 0.07, 12)
    ops.append(("poly", cheek, _mix(idn.skin, (200, 90, 90), 0.1 + 0.35 * a6)))
    upper, lower = _pts(cx + s * ew, cy - hu * (1 - s**2)), _pts(cx + s * ew, cy + hl * (1 - s**2))
    ops.append(("poly", np.concatenate([upper, lower[::-1]]), (236, 234, 228)))
    for r, colour in ((0.55 * idn.eye_h, idn.iris), (0.25 * idn.eye_h, (15, 10, 10))):
      iris = _ellipse(cx, cy, r, r, 16)
      su = np.clip((iris[:, 0] - cx) / ew, -1, 1)
      iris[:, 1] = np.clip(iris[:, 1], cy - hu * (1 - su**2), cy + hl * (1 - su**2))
      ops.append(("poly", iris, colour))
    ops.append(("line", upper, (35, 25, 25), 0.022))
    crease = _pts(cx + s * ew * 0.9, cy - hu * (1 - s**2) - 0.035)
    ops.append(("line", crease, _mix(idn.skin, _DARK, 0.35), 0.012))
    ops.append(("line", lower, _mix(idn.skin, _DARK, 0.3 + 0.4 * a6), 0.01))
    # AU6 pushes the cheek contour up under the eye and creases the outer corner.
    ops.append(("line", _pts(cx + s * ew * 0.8 + sg * 0.1 * ew, cy + hl + 0.07 - 0.035 * a6 + 0.02 * s**2),
                _mix(idn.skin, _DARK, 0.1 + 0.5 * a6), 0.012))
    if a6 > 0.05:
      for dy in (-0.04, 0.0, 0.04):
        ops.append(("line", _pts(cx + sg * np.array([ew + 0.02, ew + 0.09]), [cy, cy + 1.5 * dy]),
                    _mix(idn.skin, _DARK, 0.6 * a6), 0.011))
    if idn.glasses:
      ops.append(("line", _ellipse(cx, cy, 1.35 * ew, 1.1 * ew, 20)[[*range(20), 0]], (30, 30, 35), 0.02))
  if idn.glasses:
    bridge = _pts([-idn.eye_dx + 1.35 * ew, idn.eye_dx - 1.35 * ew], idn.eye_y - 0.03)
    ops.append(("line", bridge, (30, 30, 35), 0.02))
  return ops


def _mouth_ops(idn: Identity, a: dict) -> list:
  mw = idn.mouth_w * (1 + 0.25 * a["AU12"] - 0.3 * a["AU23"] - 0.05 * a["AU24"])
  my, ny = idn.mouth_y, idn.eye_y + 0.3 - 0.03 * a["AU10"]
  corner = (-0.08 * a["AU12"] + 0.08 * a["AU15"]) * (1 - 0.7 * a["AU24"])
  thin = max(1 - 0.7 * a["AU23"] - 0.5 * a["AU24"], 0.2)
  gap = max((0.05 * a["AU25"] + 0.12 * a["AU26"]) * (1 - 0.9 * a["AU24"]), 0.0)
  s = _S13
  x, w = s * mw, 1 - s**2
  mid = my + corner * np.abs(s) ** 1.5
  up_in = mid - 0.3 * gap * w - 0.06 * a["AU10"] * np.sqrt(w)
  up_out = up_in - idn.lip_thick * thin * np.sqrt(w) - 0.008
  lo_in = mid + 0.7 * gap * w
  lo_out = lo_in + 1.2 * idn.lip_thick * thin * np.sqrt(w) + 0.008
  dark = functools.partial(_mix, idn.skin, _DARK)
  fold = min(0.12 + 0.5 * (a["AU12"] + a["AU10"] + 0.4 * a["AU6"]), 0.7)
  ops = [("line", _pts([-0.09, 0, 0.09], [ny, ny + 0.03, ny]), dark(0.45), 0.018)]
  for sg in (-1, 1):
    ops.append(("line", _pts(sg * np.array([0.065, 0.08]), [idn.eye_y + 0.06, ny - 0.03]), dark(0.2), 0.012))
    nasolabial = _bezier((sg * 0.12, ny + 0.01), (sg * (mw + 0.02), my - 0.07),
                         (sg * (mw + 0.06), my + 0.07 + corner))
    ops.append(("line", nasolabial, dark(fold), 0.015))
    if a["AU15"] > 0.05:
      marionette = _pts(sg * np.array([mw + 0.01, mw + 0.03]), [my + corner + 0.02, my + corner + 0.13])
      ops.append(("line", marionette, dark(0.6 * a["AU15"]), 0.013))
  xx = np.concatenate([x, x[::-1]])
  band = lambda top, bottom: _pts(xx, np.concatenate([top, bottom[::-1]]))  # noqa: E731
  ops.append(("poly", band(up_in, lo_in), (70, 22, 30)))
  if np.max(lo_in - up_in) > 0.008:  # open: upper teeth show
    ops.append(("poly", band(up_in, np.minimum(up_in + 0.035 * w, lo_in)), (232, 228, 214)))
  lips = _mix(idn.lips, idn.skin, 0.4 * a["AU24"])
  ops.append(("poly", band(up_out, up_in), lips))
  ops.append(("poly", band(lo_in, lo_out), lips))
  for edge in (up_out, lo_out):  # the vermilion border shows the lip shape on every skin tone
    ops.append(("line", _pts(x, edge), _mix(lips, _DARK, 0.35), 0.01))
  ops.append(("line", _pts(x, (up_in + lo_in) / 2), _mix(lips, _DARK, 0.6), 0.012))
  chin = my + 0.22 + 0.1 * a["AU26"]
  ops.append(("line", _pts([-0.08, 0, 0.08], [chin, chin + 0.015, chin]), dark(0.25), 0.012))
  if a["AU24"] > 0.05:  # pressed lips bunch the chin below the lower lip
    ops.append(("line", _pts([-0.1, 0, 0.1], [lo_out[6] + 0.05, lo_out[6] + 0.035, lo_out[6] + 0.05]),
                dark(0.6 * a["AU24"]), 0.014))
  return ops


def face_ops(idn: Identity, au, blink: float = 0.0) -> list:
  """Draw list of one face: ("poly", pts[k,2], fill[, outline]) or ("line", pts, colour, width)."""
  a = dict(zip(AU_NAMES, np.asarray(au, float) + np.asarray(idn.rest)))
  return _head_ops(idn, a) + _brow_ops(idn, a) + _eye_ops(idn, a, blink) + _mouth_ops(idn, a)


def _paint(img: Image.Image, ops: list, pose) -> None:
  """Draws ops (face units) onto img, moved by pose = (dx, dy, rotation, scale)."""
  dx, dy, rot, scale = pose
  half = img.size[0] / 2
  k = half * scale
  rmat = k * np.array([[np.cos(rot), -np.sin(rot)], [np.sin(rot), np.cos(rot)]])
  ends = np.cumsum([len(op[1]) for op in ops]).tolist()
  pix = np.concatenate([op[1] for op in ops]) @ rmat.T + half * (1 + np.array([dx, dy]))
  draw = ImageDraw.Draw(img)
  for op, start, end in zip(ops, [0] + ends[:-1], ends):
    flat = pix[start:end].ravel().tolist()
    if op[0] == "poly":
      draw.polygon(flat, fill=op[2], outline=op[3] if len(op) > 3 else None)
    else:
      draw.line(flat, fill=op[2], width=max(1, int(op[3] * k + 0.5)), joint="curve")


def background(idn: Identity, size: int) -> Image.Image:
  """The scene behind the face: a smooth colour field with a few blurred objects."""
  rng = np.random.default_rng(idn.bg_seed)
  base = rng.integers(30, 225, 3)
  grid = np.clip(base + rng.normal(0, 35, (4, 4, 3)), 0, 255).astype(np.uint8)
  img = Image.fromarray(grid).resize((size, size), Image.BILINEAR)
  draw = ImageDraw.Draw(img)
  for _ in range(rng.integers(1, 4)):
    x0, y0 = rng.uniform(-0.2, 1.0, 2) * size
    w, h = rng.uniform(0.1, 0.6, 2) * size
    draw.rectangle([x0, y0, x0 + w, y0 + h], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
  return img.filter(ImageFilter.BoxBlur(size / 40))


def occluder_ops(kind: int, cx: float, cy: float, size: float, angle: float, colour) -> list:
  """A rectangle (0), a hand (1) or a round object (2) in image units."""
  if kind == 0:
    shapes = [("poly", _pts([-1, 1, 1, -1], [-0.6, -0.6, 0.6, 0.6]))]
  elif kind == 1:  # a palm, four fingers and a thumb
    shapes = [("poly", _ellipse(0, 0, 0.5, 0.45, 16))]
    shapes += [("line", _pts([x, 1.1 * x], [-0.3, -1.1 + 0.15 * abs(x)]), 0.17) for x in (-0.36, -0.12, 0.12, 0.36)]
    shapes += [("line", _pts([0.4, 0.85], [0.1, -0.3]), 0.17)]
  else:
    shapes = [("poly", _ellipse(0, 0, 1.0, 0.8, 20))]
  rot = size * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
  return [(kind_, pts @ rot.T + np.array([cx, cy]), colour, *(w * size for w in width))
          for kind_, pts, *width in shapes]


def render_face(idn: Identity, au, size: int, pose=NEUTRAL_POSE, blink: float = 0.0, occluder=None,
                bg: Image.Image | None = None) -> Image.Image:
  """One clean frame (no lighting/noise/blur): size x size RGB. bg is background(idn, 2 * size)."""
  img = (bg if bg is not None else background(idn, 2 * size)).copy()
  _paint(img, face_ops(idn, au, blink), pose)
  if occluder is not None:
    _paint(img, occluder_ops(*occluder), NEUTRAL_POSE)
  return img.reduce(2)


# ---- The camera: per-frame nuisance ----


class Nuisance(NamedTuple):
  """Per-frame camera and capture conditions of one video ([T] unless noted)."""
  pose: np.ndarray       # [T, 4] dx, dy, rotation, scale
  light: np.ndarray      # [T, 3] gradient angle, gradient strength, exposure
  tint: np.ndarray       # [3] white balance gains
  blur: np.ndarray       # Gaussian radius in pixels at 112 px (0 = sharp)
  noise: float           # sensor noise std, 8-bit levels
  quality: np.ndarray    # JPEG quality
  occluder: list         # per frame None or (kind, cx, cy, size, angle, colour)
  missing: np.ndarray    # bool: no image written


def _run_mask(rng, n: int, fraction: float, dur: tuple[int, int]) -> list[tuple[int, int]]:
  """Disjoint (start, length) runs covering about `fraction` of n frames."""
  mask, out = np.zeros(n, bool), []
  target, tries = fraction * n, 0
  while mask.sum() < target and tries < 100:
    tries += 1
    length = min(int(rng.integers(dur[0], dur[1] + 1)), int(np.ceil(target - mask.sum())))
    start = int(rng.integers(1, max(2, n - length)))
    if not mask[max(0, start - 1):start + length + 1].any():
      mask[start:start + length] = True
      out.append((start, min(length, n - start)))
  return out


def sample_occluder(rng: np.random.Generator):
  """(kind, colour, start, end) of an occluder: a rectangle, a hand (skin coloured) or a round
  object, moving from `start` to `end` = (cx, cy, size, angle) over its run."""
  kind = int(rng.integers(3))
  colour = _mix(_SKINS[rng.integers(len(_SKINS))], (0, 0, 0), 0.1) if kind == 1 else tuple(
      int(c) for c in rng.integers(0, 255, 3))
  p0, p1 = rng.uniform([-0.35, -0.2, 0.35, -0.6], [0.35, 0.6, 0.65, 0.6], (2, 4))
  return kind, colour, p0, p1


def sample_nuisance(rng: np.random.Generator, n: int, fps: float, missing_fraction: float,
                    occluded_fraction: float, blur_fraction: float, missing_start: bool = False,
                    missing_middle: bool = False) -> Nuisance:
  """Draws one video's capture conditions; missing_start/middle force those gaps."""
  pose = np.stack([0.04 * ou(rng, n, 2 * fps) + 0.015 * ou(rng, n, 0.3 * fps),
                   0.04 * ou(rng, n, 2 * fps) + 0.015 * ou(rng, n, 0.3 * fps),
                   0.08 * ou(rng, n, 3 * fps),
                   1 + rng.normal(0, 0.03) + 0.04 * ou(rng, n, 4 * fps)], 1)
  light = np.stack([rng.uniform(0, 2 * np.pi) + 0.3 * ou(rng, n, 5 * fps),
                    rng.uniform(0.1, 0.45) * (1 + 0.3 * ou(rng, n, 4 * fps)),
                    rng.uniform(0.75, 1.15) * (1 + 0.05 * ou(rng, n, 3 * fps))], 1)
  blur = np.full(n, rng.uniform(0.3, 0.7) * (rng.random() < 0.3))  # some cameras are soft
  for start, length in _run_mask(rng, n, blur_fraction, (round(0.2 * fps), round(1.0 * fps))):
    blur[start:start + length] = rng.uniform(0.8, 3.0)
  quality = np.clip(rng.integers(55, 96) + rng.integers(-5, 6, n), 30, 98)
  occluder = [None] * n
  for start, length in _run_mask(rng, n, occluded_fraction, (round(0.5 * fps), round(2 * fps))):
    kind, colour, p0, p1 = sample_occluder(rng)
    for j in range(length):
      cx, cy, size, angle = p0 + (p1 - p0) * 0.3 * j / max(length - 1, 1)
      occluder[start + j] = (kind, cx, cy, size, angle, colour)
  missing = np.zeros(n, bool)
  for start, length in _run_mask(rng, n, missing_fraction, (1, max(1, round(0.8 * fps)))):
    missing[start:start + length] = True
  if missing_middle and not missing[1:-1].any() and n > 4:
    start = int(rng.integers(n // 4, n // 2))
    missing[start:start + max(1, min(n // 8, round(0.5 * fps)))] = True
  if missing_start:
    missing[:int(rng.integers(1, max(2, round(0.3 * fps))))] = True
  return Nuisance(pose, light, rng.uniform(0.9, 1.1, 3), blur, float(rng.uniform(1.5, 7.0)),
                  quality, occluder, missing)


def light_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
  """(yy, xx) [S, S] float32 coordinates in [-1, 1], the lighting gradient's domain."""
  yy, xx = np.mgrid[-1:1:size * 1j, -1:1:size * 1j].astype(np.float32)
  return yy, xx


def capture(rng: np.random.Generator, img: Image.Image, light, tint: np.ndarray, blur: float,
            noise: float, quality: int, grid) -> bytes:
  """The camera on one clean frame: lighting gradient and exposure, white balance, optics
  blur, sensor noise, JPEG compression. `grid` is `light_grid(size)`; returns JPEG bytes."""
  yy, xx = grid
  size = img.size[0]
  angle, strength, exposure = (float(v) for v in light)
  gain = xx * np.float32(strength * exposure * np.cos(angle))  # [S, S] light from one side
  gain += yy * np.float32(strength * exposure * np.sin(angle))
  gain += np.float32(exposure)
  arr = np.asarray(img).astype(np.float32)  # [S, S, 3]
  arr *= gain[..., None]
  arr *= tint.astype(np.float32)
  if blur > 0.05:  # optics blur before the sensor adds noise
    blurred = Image.fromarray(np.clip(arr, 0, 255, out=arr).astype(np.uint8))
    blurred = blurred.filter(ImageFilter.GaussianBlur(float(blur) * size / 112))
    arr = np.asarray(blurred).astype(np.float32)
  # Uniform sensor noise of the given std: much cheaper to draw than Gaussian.
  arr += (rng.random(arr.shape, np.float32) - np.float32(0.5)) * np.float32(noise * 12**0.5)
  arr += np.float32(0.5)
  out = Image.fromarray(np.clip(arr, 0, 255, out=arr).astype(np.uint8))
  buf = io.BytesIO()
  out.save(buf, format="JPEG", quality=int(quality))
  return buf.getvalue()


def render_video(rng: np.random.Generator, idn: Identity, au: np.ndarray, blink: np.ndarray,
                 nuisance: Nuisance, size: int) -> Iterator[tuple[int, bytes]]:
  """Yields (1-based frame index, JPEG bytes) for every frame that is not missing."""
  bg = background(idn, 2 * size)
  grid = light_grid(size)
  for t in np.flatnonzero(~nuisance.missing):
    img = render_face(idn, au[t], size, nuisance.pose[t], blink[t], nuisance.occluder[t], bg)
    yield int(t) + 1, capture(rng, img, nuisance.light[t], nuisance.tint, nuisance.blur[t],
                              nuisance.noise, nuisance.quality[t], grid)
