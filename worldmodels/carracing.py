"""CarRacing-v3 with a faster ``state_pixels`` renderer and bit-identical observations.

Speed-ups over gymnasium's renderer, each keeping every observation pixel identical:

* all grass/road polygons are rotated, translated and culled in one numpy pass, with the
  same float operations as ``pygame.math.Vector2.rotate_rad``;
* polygons that cannot touch a pixel the observation depends on are not drawn;
* a background polygon covering the whole view becomes a fill;
* the background, grass and road polygons are drawn by compiled, bit-exact copies of
  ``gfxdraw.aapolygon`` + ``gfxdraw.filled_polygon`` (:mod:`worldmodels.raster`, numba);
* after the vertical flip the HUD bar overwrites the bottom 100 rows, so the top 100 rows of
  the unflipped surface are never needed: ``smoothscale``'s horizontal pass (pygame's SIMD
  code) runs on the 700 kept rows and on the HUD strip, and a compiled copy of its vertical
  pass reads them flipped and spliced, writing the observation array directly;
* persistent surfaces, the HUD text rendered once per distinct reward string, and the HUD
  font parsed from bytes held in memory.

What stays pygame's own code, unchanged: the car (``Car.draw``, ``pygame.draw.polygon``),
the HUD bars and text, and the horizontal ``smoothscale`` pass. Frames the fast path cannot
reproduce exactly (HUD bars reaching above the HUD strip, a display surface being open,
``human``/``rgb_array`` renders) use gymnasium's code; without numba, off smoothscale's SSE2
backend, or for polygons the compiled primitives refuse, the polygons are drawn with gfxdraw.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import io
import math
from typing import Any

import numpy as np
import pygame
import pygame.pkgdata
from gymnasium.envs.box2d.car_dynamics import Car
from gymnasium.envs.box2d.car_racing import (
    GRASS_DIM,
    MAX_SHAPE_DIM,
    PLAYFIELD,
    SCALE,
    STATE_H,
    STATE_W,
    WINDOW_H,
    WINDOW_W,
    ZOOM,
    CarRacing,
    FrictionDetector,
)
from pygame import gfxdraw, surfarray

from worldmodels import FAST_CARRACING_ID as ENV_ID
from worldmodels import raster

VERIFIED_GYMNASIUM = "1.4.0"
VERIFIED_PYGAME = "2.5.8"

# sha256 of inspect.getsource of the upstream code this module mirrors or relies on.
UPSTREAM_SHA256 = {
    "CarRacing._render": "55de32c78669c2be249b6e4edba992c0c332a0f43c4cbe2f7255fa8dd06a3924",
    "CarRacing._render_road": "ececdf992df950f91fc6121dc19ac61650c98da19c67391e72b4c03aee4c3dda",
    "CarRacing._render_indicators": "e814c3df644a1b047be3a6bd6eb1f62b1a0ada0486d6039ca366d8e009edc3c3",
    "CarRacing._draw_colored_polygon": "8ab3784d359ee5577b7e73754b7149ce5cfb34edc85a80a364e65fa69201bea2",
    "CarRacing._create_image_array": "8cbafdbd60c14d2f7370062eefbef6ed99c204731d71ed6a618ae55f5c22559b",
    "CarRacing._create_track": "ccb2c74cab38d190ef199a586850f33790f617287a6c2c88d5df608d337e4b6d",
    "CarRacing.reset": "80680a0d97da121dc371027c836c3abf9e487ec63f4f56513d7e8373a3a525e1",
    "CarRacing.step": "de283b9e2051b893b12077bb8150c0957bc8727b0cb517db17e003aa40f75613",
    "FrictionDetector._contact": "4032cb637d9714878303c7c3f7e8ff64e8166cd819bdbaf90ef5af3475d73f2f",
    "Car.draw": "c83f372eedd2fd25d40f011265d2cbc5977cc0388fa73165fb5fb65874e16cff",
}

_TWO_PI = 2.0 * math.pi
_HALF_PI = math.pi / 2.0
_VEC_EPS = 1e-6  # pygame.math.Vector2's default epsilon

_HUD_TOP = int(WINDOW_H - 5 * (WINDOW_H / 40.0))  # 700: first row of the black HUD bar
_KEEP_TOP = WINDOW_H - _HUD_TOP  # unflipped rows [_KEEP_TOP, WINDOW_H) reach the observation
_KEEP = pygame.Rect(0, _KEEP_TOP, WINDOW_W, _HUD_TOP)
_HUD = pygame.Rect(0, _HUD_TOP, WINDOW_W, WINDOW_H - _HUD_TOP)
_MARGIN = 3.0  # pixels; primitives never touch pixels further than 1 px outside their bbox
_MAX_BAR = (WINDOW_H - _HUD_TOP - WINDOW_H / 40.0 - _MARGIN) / (WINDOW_H / 40.0)
_TEXT_CENTER = (60, WINDOW_H - WINDOW_H * 2.5 / 40.0)


def upstream_mismatches() -> list[str]:
    """Names of upstream methods whose source differs from the verified version."""
    current = {
        "CarRacing._render": CarRacing._render,
        "CarRacing._render_road": CarRacing._render_road,
        "CarRacing._render_indicators": CarRacing._render_indicators,
        "CarRacing._draw_colored_polygon": CarRacing._draw_colored_polygon,
        "CarRacing._create_image_array": CarRacing._create_image_array,
        "CarRacing._create_track": CarRacing._create_track,
        "CarRacing.reset": CarRacing.reset,
        "CarRacing.step": CarRacing.step,
        "FrictionDetector._contact": FrictionDetector._contact,
        "Car.draw": Car.draw,
    }
    return [
        name
        for name, fn in current.items()
        if hashlib.sha256(inspect.getsource(fn).encode()).hexdigest() != UPSTREAM_SHA256[name]
    ]


def rotate(x: np.ndarray, y: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised ``Vector2(x, y).rotate_rad(angle)``, bit for bit (pygame-ce math.c)."""
    angle = math.fmod(angle, _TWO_PI)
    if angle < 0:
        angle += _TWO_PI
    if math.fmod(angle + _VEC_EPS, _HALF_PI) < 2 * _VEC_EPS:
        quarter = int((angle + _VEC_EPS) / _HALF_PI) % 4
        return ((x, y), (-y, x), (-x, -y), (y, -x))[quarter]
    s, c = math.sin(angle), math.cos(angle)
    return c * x - s * y, s * x + c * y


def _grass_polygons() -> np.ndarray:
    quads = [
        [
            (GRASS_DIM * x + GRASS_DIM, GRASS_DIM * y + 0),
            (GRASS_DIM * x + 0, GRASS_DIM * y + 0),
            (GRASS_DIM * x + 0, GRASS_DIM * y + GRASS_DIM),
            (GRASS_DIM * x + GRASS_DIM, GRASS_DIM * y + GRASS_DIM),
        ]
        for x in range(-20, 20, 2)
        for y in range(-20, 20, 2)
    ]
    return np.array(quads, dtype=np.float64)


_GRASS = _grass_polygons()
_FIELD = np.array(
    [(PLAYFIELD, PLAYFIELD), (PLAYFIELD, -PLAYFIELD), (-PLAYFIELD, -PLAYFIELD), (-PLAYFIELD, PLAYFIELD)]
)


@functools.cache
def _default_font_bytes() -> bytes:
    """The file ``pygame.font.Font(pygame.font.get_default_font(), ...)`` reads, read once."""
    with pygame.pkgdata.getResource(pygame.font.get_default_font()) as f:
        return f.read()


def _covers_view(xs: list[float], ys: list[float]) -> bool:
    """True if the convex quad holds every kept pixel with a margin, and fits gfxdraw's int16."""
    if max(map(abs, xs + ys)) > 32000:
        return False
    corners = (
        (-_MARGIN, _KEEP_TOP - _MARGIN),
        (WINDOW_W + _MARGIN, _KEEP_TOP - _MARGIN),
        (WINDOW_W + _MARGIN, WINDOW_H + _MARGIN),
        (-_MARGIN, WINDOW_H + _MARGIN),
    )
    signs = set()
    for i in range(4):
        x0, y0, x1, y1 = xs[i - 1], ys[i - 1], xs[i], ys[i]
        for px, py in corners:
            signs.add((x1 - x0) * (py - y0) - (y1 - y0) * (px - x0) > 0)
    return len(signs) == 1


class FastCarRacing(CarRacing):
    """gymnasium's CarRacing with identical dynamics and pixels, stepped ~6x faster (benchmarks/README.md)."""

    _track_key: tuple[int, int] | None = None

    def _prepare_track(self) -> None:
        road = np.array([poly for poly, _ in self.road_poly], dtype=np.float64).reshape(-1, 4, 2)
        self._polys = np.concatenate([_GRASS, road])
        self._centers = self._polys.mean(axis=1)
        self._radii = np.linalg.norm(self._polys - self._centers[:, None], axis=-1).max(axis=1) * (1 + 1e-9)
        self._road_colors = [color for _, color in self.road_poly]  # tiles recolour on contact
        self._track_key = (id(self.road_poly), len(self.road_poly))

    def _surfaces(self) -> None:
        if getattr(self, "_canvas", None) is None:
            self._canvas = pygame.Surface((WINDOW_W, WINDOW_H))
            self._hud = pygame.Surface((WINDOW_W, WINDOW_H))
            self._shrunk_view = pygame.Surface((STATE_W, _HUD_TOP))
            self._shrunk_hud = pygame.Surface((STATE_W, WINDOW_H - _HUD_TOP))
            self._shrunk = pygame.Surface((STATE_W, WINDOW_H))
            self._texts: dict[str, tuple[pygame.Surface, pygame.Rect]] = {}
            self._mapped: dict[tuple, int | None] = {}
            # The compiled rasteriser draws into the canvas through this (locked) view.
            self._pixels = None
            if raster.supported() and self._canvas.get_masks() == raster.XRGB_MASKS:
                self._pixels = surfarray.pixels2d(self._canvas).T

    def _text(self) -> tuple[pygame.Surface, pygame.Rect]:
        label = f"{self.reward:04.0f}"
        if label not in self._texts:
            # A new Font for each label, as upstream, but parsed from bytes held in memory.
            font = pygame.font.Font(io.BytesIO(_default_font_bytes()), 42)
            text = font.render(label, True, (255, 255, 255), (0, 0, 0))
            rect = text.get_rect()
            rect.center = _TEXT_CENTER
            if len(self._texts) > 4096:
                self._texts.clear()
            self._texts[label] = (text, rect)
        return self._texts[label]

    def _mapped_color(self, color: Any) -> int | None:
        """The pixel value gfxdraw writes for ``color`` on the canvas (None if not opaque)."""
        key = tuple(np.asarray(color).tolist())
        if key not in self._mapped:
            values = []
            for background in (0, 0xFFFFFF):
                probe = pygame.Surface((4, 4))
                probe.fill(background)
                gfxdraw.filled_polygon(probe, [(0, 0), (3, 0), (3, 3), (0, 3)], color)
                values.append(probe.get_at_mapped((1, 1)))
            self._mapped[key] = values[0] if values[0] == values[1] else None
        return self._mapped[key]

    def _hud_fits(self) -> bool:
        """True if every HUD bar stays inside the HUD strip (rows >= 700 after the flip)."""
        car = self.car
        v = car.hull.linearVelocity
        bars = [0.02 * math.sqrt(v[0] * v[0] + v[1] * v[1])] + [0.01 * w.omega for w in car.wheels]
        return max(bars) <= _MAX_BAR

    def _render(self, mode: str) -> Any:
        if (
            mode != "state_pixels"
            or self.render_mode == "human"
            or "t" not in self.__dict__
            or pygame.display.get_surface() is not None
            or not self._hud_fits()
        ):
            return super()._render(mode)
        pygame.font.init()
        if self.clock is None:
            self.clock = pygame.time.Clock()
        self._surfaces()
        text, text_rect = self._text()
        if text_rect.top < _HUD_TOP:
            return super()._render(mode)

        car = self.car
        angle = -car.hull.angle
        zoom = 0.1 * SCALE * max(1 - self.t, 0) + ZOOM * SCALE * min(self.t, 1)
        scroll = pygame.math.Vector2((-(car.hull.position[0]) * zoom, -(car.hull.position[1]) * zoom))
        scroll = scroll.rotate_rad(angle)
        trans = (WINDOW_W / 2 + scroll[0], WINDOW_H / 4 + scroll[1])

        canvas = self._canvas
        field, polys, ids = self._scene(zoom, trans, angle)
        if not self._draw_compiled(field, polys, ids):
            self._draw_pygame(canvas, field, polys, ids)
        car.draw(canvas, zoom, trans, angle, False)

        # The HUD is drawn by upstream code on its own surface; only its bottom strip is used.
        previous, self.surf = self.surf, self._hud
        self._render_indicators(WINDOW_W, WINDOW_H)
        self.surf = previous
        self._hud.blit(text, text_rect)

        # smoothscale = horizontal pass per row, then vertical pass per column.
        pygame.transform.smoothscale(canvas.subsurface(_KEEP), self._shrunk_view.get_size(), self._shrunk_view)
        pygame.transform.smoothscale(self._hud.subsurface(_HUD), self._shrunk_hud.get_size(), self._shrunk_hud)
        view = surfarray.pixels2d(self._shrunk_view).T
        hud = surfarray.pixels2d(self._shrunk_hud).T
        if self._pixels is not None:
            return raster.shrink_columns(view, hud, STATE_H, flip_upper=True)
        shrunk = surfarray.pixels2d(self._shrunk)
        shrunk[:, :_HUD_TOP] = view[::-1].T
        shrunk[:, _HUD_TOP:] = hud.T
        del shrunk, view, hud
        scaled = pygame.transform.smoothscale(self._shrunk, (STATE_W, STATE_H))
        return np.transpose(np.array(surfarray.pixels3d(scaled)), axes=(1, 0, 2))

    def _scene(self, zoom: float, trans: tuple, angle: float) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
        """What upstream draws that can reach the observation, in pixel coordinates.

        Returns the background polygon (None when it is opaque and covers the whole view, so
        a fill will do), the (n, 4, 2) grass and road polygons in drawing order, and their
        indices into ``_polys`` (grass first, then ``road_poly``).
        """
        xs, ys = rotate(_FIELD[:, 0], _FIELD[:, 1], angle)
        xs, ys = xs * zoom + trans[0], ys * zoom + trans[1]
        field = np.stack([xs, ys], axis=-1)
        if self._mapped_color(self.bg_color) is not None and _covers_view(xs.tolist(), ys.tolist()):
            field = None
        if self._track_key != (id(self.road_poly), len(self.road_poly)):
            self._prepare_track()
        # Coarse cull on bounding circles, then exact per-vertex coordinates for the rest.
        cx, cy = rotate(self._centers[:, 0], self._centers[:, 1], angle)
        cx, cy = cx * zoom + trans[0], cy * zoom + trans[1]
        reach = self._radii * zoom + (_MARGIN + 1.0)
        candidates = np.flatnonzero(
            (cx + reach >= 0) & (cx - reach <= WINDOW_W) & (cy + reach >= _KEEP_TOP) & (cy - reach <= WINDOW_H)
        )
        polys = self._polys[candidates]
        xs, ys = rotate(polys[..., 0], polys[..., 1], angle)
        xs, ys = xs * zoom + trans[0], ys * zoom + trans[1]
        # Upstream's cull (any vertex in the enlarged window), and only polygons whose
        # bounding box reaches the kept rows.
        upstream = (
            (xs >= -MAX_SHAPE_DIM)
            & (xs <= WINDOW_W + MAX_SHAPE_DIM)
            & (ys >= -MAX_SHAPE_DIM)
            & (ys <= WINDOW_H + MAX_SHAPE_DIM)
        ).any(axis=1)
        near = (
            (xs.max(axis=1) >= -_MARGIN)
            & (xs.min(axis=1) <= WINDOW_W + _MARGIN)
            & (ys.max(axis=1) >= _KEEP_TOP - _MARGIN)
            & (ys.min(axis=1) <= WINDOW_H + _MARGIN)
        )
        drawn = np.flatnonzero(upstream & near)
        return field, np.stack([xs[drawn], ys[drawn]], axis=-1), candidates[drawn]

    def _colors(self, ids: np.ndarray) -> list:
        """The colours upstream passes to gfxdraw for the polygons ``ids``."""
        n_grass = len(_GRASS)
        return [
            self.grass_color if i < n_grass else [int(c) for c in self._road_colors[i - n_grass]]
            for i in ids.tolist()
        ]

    def _draw_compiled(self, field: np.ndarray | None, polys: np.ndarray, ids: np.ndarray) -> bool:
        """Draw the scene with the compiled primitives; False if it must go to pygame."""
        background, grass = self._mapped_color(self.bg_color), self._mapped_color(self.grass_color)
        if self._pixels is None or background is None or grass is None:
            return False
        n_grass = len(_GRASS)
        mapped = np.full(len(ids) + (field is not None), grass, np.int64)
        if field is not None:
            polys = np.concatenate([field[None], polys])
            mapped[0] = background
        for k, i in enumerate(ids.tolist(), start=len(mapped) - len(ids)):
            if i >= n_grass:
                # gfxdraw maps an in-range (r, g, b) to 0x00RRGGBB on an XRGB8888 surface.
                r, g, b = (int(c) for c in self._road_colors[i - n_grass])
                if not (0 <= r < 256 and 0 <= g < 256 and 0 <= b < 256):
                    return False
                mapped[k] = (r << 16) | (g << 8) | b
        fill = background if field is None else 0
        return raster.draw_polygons(self._pixels, polys, mapped, _KEEP_TOP, fill)

    def _draw_pygame(self, canvas: pygame.Surface, field: np.ndarray | None, polys: np.ndarray, ids: np.ndarray) -> None:
        if field is None:
            canvas.fill(self._mapped_color(self.bg_color), _KEEP)
        else:
            canvas.fill(0)
            gfxdraw.aapolygon(canvas, field.tolist(), self.bg_color)
            gfxdraw.filled_polygon(canvas, field.tolist(), self.bg_color)
        for poly, color in zip(polys.tolist(), self._colors(ids)):
            gfxdraw.aapolygon(canvas, poly, color)
            gfxdraw.filled_polygon(canvas, poly, color)

    def close(self) -> None:
        self._canvas = self._pixels = None
        super().close()


def register() -> None:
    """Register ``worldmodels/CarRacing-v3`` with gymnasium (idempotent; done on import)."""
    from worldmodels import register_envs

    register_envs()
