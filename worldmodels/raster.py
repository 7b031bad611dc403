"""Compiled, bit-exact copies of the pygame-ce 2.5.8 pixel primitives CarRacing's renderer uses.

Written with numba against the arithmetic of the C code they mirror:

* :func:`draw_polygons`: ``gfxdraw.aapolygon`` followed by ``gfxdraw.filled_polygon`` for each
  polygon (SDL_gfx as vendored by pygame-ce): coordinates truncated towards zero and wrapped to
  int16, Cohen-Sutherland clipping of each edge with single-precision slopes, Wu anti-aliased
  edges on a 32-bit error accumulator (the weight is the accumulator's top byte, scaled by
  ``255 * w >> 8``, so even a full-weight edge pixel is blended at alpha 254), the blend
  ``d + ((c - d) * a >> 8)`` per channel with an arithmetic shift (SDL_gfx's unsigned 32-bit
  expression reduces to this for 8-bit channels; it also clears the unused top byte), and the
  scanline fill's 16.16 fixed-point edge crossings with its round-half-up span ends (a span
  whose ends cross is drawn with its ends swapped, as SDL_gfx does);
* :func:`shrink_columns`: the vertical pass of ``transform.smoothscale`` (pygame-ce's
  ``filter_shrink_Y_SSE2``): a 16-bit accumulator per channel, the pixel at a destination
  boundary split by ``mulhi(src << 2, counter)``, the sum scaled by
  ``mulhi(sum, 0x40000000 // space)``. The horizontal pass stays pygame's: its SIMD loop over
  1000-pixel rows is faster than a compiled scalar one, whose 9-10 pixel segments between
  destination boundaries do not vectorise.

Everything works on 32-bit ``XRGB8888`` pixels (``0x00RRGGBB``, masks :data:`XRGB_MASKS`), the
format of a plain ``pygame.Surface`` (callers check it). :func:`supported` says whether the
module may be used at all: numba importable and smoothscale on the SSE2 backend it mirrors.
The probes in ``tests/test_raster.py`` compare each primitive with pygame on many shapes, so a
pygame-ce release that changes the arithmetic fails there before any frame differs.
"""

from __future__ import annotations

import numpy as np

try:
    import numba
except ImportError:  # the renderer falls back to pygame's own primitives
    numba = None

XRGB_MASKS = (0xFF0000, 0xFF00, 0xFF, 0)
"""The red, green, blue and alpha masks of an ``XRGB8888`` surface."""
_U32 = 0xFFFFFFFF
_ONE = 0x4000  # smoothscale's fixed-point unit: one source pixel


def _jit(fn):
    if numba is None:
        return fn
    try:
        return numba.njit(cache=True, nogil=True)(fn)
    except RuntimeError:  # no writable cache directory: compile in each process instead
        return numba.njit(nogil=True)(fn)


def supported() -> bool:
    """True if numba is importable and pygame's smoothscale runs the SSE2 filters this mirrors."""
    if numba is None:
        return False
    import pygame

    return pygame.transform.get_smoothscale_backend() == "SSE2"


# --------------------------------------------------------------------------- SDL_gfx


@_jit
def _int16(v):
    """A Python float as gfxdraw reads a coordinate: ``int()``, then a C cast to int16."""
    return ((int(v) + 32768) & 0xFFFF) - 32768


@_jit
def _wrap16(v):
    return ((v + 32768) & 0xFFFF) - 32768


@_jit
def _blend(dst, color, alpha):
    out = 0
    for shift in (16, 8, 0):
        d = (dst >> shift) & 0xFF
        c = (color >> shift) & 0xFF
        out |= ((d + (((c - d) * alpha) >> 8)) & 0xFF) << shift
    return out


@_jit
def _put(img, ylo, x, y, color, alpha):
    """One pixel at full or partial alpha; the clip rectangle is the whole surface."""
    h, w = img.shape
    if 0 <= x < w and ylo <= y < h:
        if alpha == 255:
            img[y, x] = color
        else:
            img[y, x] = _blend(np.int64(img[y, x]), color, alpha)


@_jit
def _put_weighted(img, ylo, x, y, color, weight):
    _put(img, ylo, x, y, color, (255 * weight) >> 8)


@_jit
def _hline(img, ylo, x1, x2, y, color):
    h, w = img.shape
    if x1 > x2:
        x1, x2 = x2, x1
    if x2 < 0 or x1 > w - 1 or y < 0 or y > h - 1 or y < ylo:
        return
    img[y, max(x1, 0) : min(x2, w - 1) + 1] = color


@_jit
def _vline(img, ylo, x, y1, y2, color):
    h, w = img.shape
    if y1 > y2:
        y1, y2 = y2, y1
    if x < 0 or x > w - 1 or y2 < 0 or y1 > h - 1:
        return
    for y in range(max(y1, 0, ylo), min(y2, h - 1) + 1):
        img[y, x] = color


@_jit
def _outcode(x, y, right, bottom):
    code = 0
    if x < 0:
        code |= 1
    elif x > right:
        code |= 2
    if y < 0:
        code |= 8
    elif y > bottom:
        code |= 4
    return code


@_jit
def _clip_line(x1, y1, x2, y2, right, bottom):
    """SDL_gfx's Cohen-Sutherland clip against (0, 0, right, bottom), float32 slope, int16 ends."""
    while True:
        c1 = _outcode(x1, y1, right, bottom)
        c2 = _outcode(x2, y2, right, bottom)
        if (c1 | c2) == 0:
            return True, x1, y1, x2, y2
        if c1 & c2:
            return False, x1, y1, x2, y2
        if c1 == 0:
            x1, y1, x2, y2, c1 = x2, y2, x1, y1, c2
        if x2 != x1:
            m = np.float32(y2 - y1) / np.float32(x2 - x1)
        else:
            m = np.float32(1.0)
        if c1 & 1:
            y1 = _wrap16(y1 + _wrap16(int(np.float32(0 - x1) * m)))
            x1 = 0
        elif c1 & 2:
            y1 = _wrap16(y1 + _wrap16(int(np.float32(right - x1) * m)))
            x1 = right
        elif c1 & 4:
            if x2 != x1:
                x1 = _wrap16(x1 + _wrap16(int(np.float32(bottom - y1) / m)))
            y1 = bottom
        else:
            if x2 != x1:
                x1 = _wrap16(x1 + _wrap16(int(np.float32(0 - y1) / m)))
            y1 = 0


@_jit
def _aaline(img, ylo, x1, y1, x2, y2, color):
    """SDL_gfx ``_aalineColor`` without its endpoint, as ``aapolygonColor`` calls it."""
    h, w = img.shape
    ok, x1, y1, x2, y2 = _clip_line(x1, y1, x2, y2, w - 1, h - 1)
    if not ok:
        return
    xx0, yy0, xx1, yy1 = x1, y1, x2, y2
    if yy0 > yy1:
        xx0, yy0, xx1, yy1 = xx1, yy1, xx0, yy0
    dx = xx1 - xx0
    dy = yy1 - yy0
    if dx == 0:
        if dy > 0:
            _vline(img, ylo, x1, yy0, yy0 + dy, color)
        else:
            _put(img, ylo, x1, y1, color, 255)
        return
    if dy == 0:
        _hline(img, ylo, xx0, xx0 + dx, y1, color)
        return
    xdir = 1
    if dx < 0:
        xdir = -1
        dx = -dx
    _put(img, ylo, x1, y1, color, 255)
    erracc = 0
    if dy > dx:
        erradj = (((dx << 16) // dy) << 16) & _U32
        x0pxdir = xx0 + xdir
        for _ in range(dy - 1):
            previous = erracc
            erracc = (erracc + erradj) & _U32
            if erracc <= previous:
                xx0 = x0pxdir
                x0pxdir += xdir
            yy0 += 1
            wgt = (erracc >> 24) & 255
            _put_weighted(img, ylo, xx0, yy0, color, 255 - wgt)
            _put_weighted(img, ylo, x0pxdir, yy0, color, wgt)
    else:
        erradj = (((dy << 16) // dx) << 16) & _U32
        y0p1 = yy0 + 1
        for _ in range(dx - 1):
            previous = erracc
            erracc = (erracc + erradj) & _U32
            if erracc <= previous:
                yy0 = y0p1
                y0p1 += 1
            xx0 += xdir
            wgt = (erracc >> 24) & 255
            _put_weighted(img, ylo, xx0, yy0, color, 255 - wgt)
            _put_weighted(img, ylo, xx0, y0p1, color, wgt)


@_jit
def _filled_polygon(img, ylo, vx, vy, color, ints):
    """SDL_gfx ``filledPolygonColorMT``; False if a scanline had an odd number of crossings
    (SDL_gfx then reads stale memory, which cannot be reproduced)."""
    h, w = img.shape
    n = vx.shape[0]
    miny = vy.min()
    maxy = vy.max()
    for y in range(max(miny, ylo), min(maxy, h - 1) + 1):
        count = 0
        for i in range(n):
            j = i - 1 if i > 0 else n - 1
            ya, yb = vy[j], vy[i]
            if ya < yb:
                xa, xb = vx[j], vx[i]
            elif ya > yb:
                ya, yb = yb, ya
                xa, xb = vx[i], vx[j]
            else:
                continue
            if (ya <= y < yb) or (y == maxy and ya < y <= yb):
                ints[count] = ((65536 * (y - ya)) // (yb - ya)) * (xb - xa) + 65536 * xa
                count += 1
        if count & 1:
            return False
        for i in range(1, count):  # insertion sort: a handful of crossings
            v = ints[i]
            j = i - 1
            while j >= 0 and ints[j] > v:
                ints[j + 1] = ints[j]
                j -= 1
            ints[j + 1] = v
        for i in range(0, count, 2):
            xa = ints[i] + 1
            xa = (xa >> 16) + ((xa & 32768) >> 15)
            xb = ints[i + 1] - 1
            xb = (xb >> 16) + ((xb & 32768) >> 15)
            _hline(img, ylo, _wrap16(xa), _wrap16(xb), y, color)
    return True


@_jit
def _draw_polygons(img, ylo, fill, polys, colors):
    if fill >= 0:
        img[ylo:] = fill
    n_poly, n_vert, _ = polys.shape
    vx = np.empty(n_vert, np.int64)
    vy = np.empty(n_vert, np.int64)
    ints = np.empty(n_vert, np.int64)
    for p in range(n_poly):
        for i in range(n_vert):
            vx[i] = _int16(polys[p, i, 0])
            vy[i] = _int16(polys[p, i, 1])
        color = colors[p]
        for i in range(n_vert):
            j = i + 1 if i + 1 < n_vert else 0
            _aaline(img, ylo, vx[i], vy[i], vx[j], vy[j], color)
        if not _filled_polygon(img, ylo, vx, vy, color, ints):
            return p
    return -1


# Polygon coordinates beyond this make SDL_gfx's 32-bit fixed point overflow (or leave float
# to int conversion undefined); such frames go to pygame.
MAX_COORD = 8192.0


def draw_polygons(
    img: np.ndarray, polys: np.ndarray, colors: np.ndarray, ylo: int = 0, fill: int | None = None
) -> bool:
    """Fill with ``fill`` (if given), then draw each polygon as ``gfxdraw.aapolygon`` followed
    by ``gfxdraw.filled_polygon`` would.

    ``img`` is the surface's pixels as a C-contiguous (height, width) uint32 array (clip
    rectangle: the whole surface); rows above ``ylo`` are left untouched (the clipping
    arithmetic still uses the whole surface). ``polys`` is (n, vertices, 2) float64 in pixel
    coordinates, ``colors`` the opaque mapped pixel values (int64). Returns False, possibly
    after drawing some polygons, when a polygon falls outside what is reproduced exactly
    (coordinates beyond ``MAX_COORD``, an odd number of scanline crossings); the caller must
    then redraw the frame with pygame.
    """
    if polys.size and not np.all(np.abs(polys) < MAX_COORD):
        return False
    return _draw_polygons(img, ylo, -1 if fill is None else fill, polys, colors) < 0


# --------------------------------------------------------------------------- smoothscale


def shrink_plan(src: int, dst: int) -> np.ndarray:
    """Where smoothscale's shrink filter writes, shrinking ``src`` pixels to ``dst``.

    Row k < dst holds (source index of the pixel split at the k-th boundary, its weight
    ``counter`` for destination pixel k, its weight ``fraction`` carried to pixel k + 1); the
    last row holds the filter's 16-bit reciprocal of the spacing.
    """
    space = _ONE * src // dst
    if not 1 < src / dst < 256:
        raise ValueError(f"only shrinking by a factor in (1, 256) is reproduced, not {src} -> {dst}")
    plan = np.zeros((dst + 1, 3), np.int64)
    counter, k = space, 0
    for i in range(src):
        if counter > _ONE:
            counter -= _ONE
        else:
            frac = _ONE - counter
            if k < dst:
                plan[k] = (i, counter, frac)
            k += 1
            counter = space - frac
    if k != dst:
        raise ValueError(f"shrink {src} -> {dst} writes {k} pixels")
    plan[dst, 0] = (0x40000000 // space) & 0xFFFF
    return plan


@_jit
def _shrink_columns(upper, lower, flip, plan, out):
    # A destination pixel is ((mulhi(4 s, counter) + acc) * recip) >> 16 with acc the sum of
    # the whole source pixels plus mulhi(4 s', fraction) of the previous split pixel. Both
    # weights add up to the spacing, so for a factor below 256 acc stays below 2**16 and the
    # result below 256: SSE2's 16-bit wrap-around and saturation never act, and 32-bit
    # integers hold every intermediate. Red and blue are summed in the halves of one integer.
    height = plan.shape[0] - 1
    width = out.shape[1]
    recip = np.int32(plan[height, 0])
    acc_rb = np.zeros(width, np.int32)
    acc_g = np.zeros(width, np.int32)
    n_upper = upper.shape[0]
    k = 0
    for r in range(n_upper + lower.shape[0]):
        if r < n_upper:
            row = upper[n_upper - 1 - r] if flip else upper[r]
        else:
            row = lower[r - n_upper]
        if k < height and r == plan[k, 0]:
            counter = np.int32(4 * plan[k, 1])
            frac = np.int32(4 * plan[k, 2])
            for x in range(width):
                p = np.int32(row[x])
                red, green, blue = (p >> 16) & 0xFF, (p >> 8) & 0xFF, p & 0xFF
                out[k, x, 0] = (((red * counter) >> 16) + (acc_rb[x] >> 16)) * recip >> 16
                out[k, x, 1] = (((green * counter) >> 16) + (acc_g[x] >> 8)) * recip >> 16
                out[k, x, 2] = (((blue * counter) >> 16) + (acc_rb[x] & 0xFFFF)) * recip >> 16
                acc_rb[x] = (((red * frac) >> 16) << 16) | ((blue * frac) >> 16)
                acc_g[x] = ((green * frac) >> 16) << 8
            k += 1
        else:
            for x in range(width):
                p = np.int32(row[x])
                acc_rb[x] += p & 0xFF00FF
                acc_g[x] += p & 0xFF00


def shrink_columns(upper: np.ndarray, lower: np.ndarray, height: int, flip_upper: bool = False) -> np.ndarray:
    """The vertical pass of ``smoothscale`` (``filter_shrink_Y_SSE2``) to ``height`` rows, of
    the image made of the rows of ``upper`` (in reverse order if ``flip_upper``) followed by
    those of ``lower``.

    ``upper`` and ``lower`` are C-contiguous (rows, width) uint32 XRGB pixel arrays. Returns
    the (height, width, 3) uint8 RGB image.
    """
    plan = _plan(upper.shape[0] + lower.shape[0], height)
    out = np.empty((height, upper.shape[1], 3), np.uint8)
    _shrink_columns(upper, lower, flip_upper, plan, out)
    return out


_PLANS: dict[tuple[int, int], np.ndarray] = {}


def _plan(src: int, dst: int) -> np.ndarray:
    if (src, dst) not in _PLANS:
        _PLANS[src, dst] = shrink_plan(src, dst)
    return _PLANS[src, dst]
