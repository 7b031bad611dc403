"""worldmodels.raster must write the same pixels as the pygame-ce primitives it mirrors.

These probes pin SDL_gfx's and smoothscale's arithmetic: a pygame-ce release that changes
either fails here, on shapes chosen to reach every branch (clipping on each side, vertical,
horizontal and diagonal edges, x- and y-major anti-aliased edges, degenerate polygons,
negative and fractional coordinates, blending over arbitrary pixels).
"""

from __future__ import annotations

import platform

import numpy as np
import pygame
import pytest
from pygame import gfxdraw, surfarray

from worldmodels import raster

needs_raster = pytest.mark.skipif(not raster.supported(), reason="numba missing or smoothscale not on SSE2")


def _surface(pixels: np.ndarray) -> pygame.Surface:
    surface = pygame.Surface(pixels.shape[::-1])
    surfarray.pixels2d(surface)[:] = pixels.T
    return surface


def _pixels(surface: pygame.Surface) -> np.ndarray:
    return surfarray.pixels2d(surface).T.copy()


def pygame_polygons(background: np.ndarray, polys: np.ndarray, colors: list) -> np.ndarray:
    surface = _surface(background)
    for poly, color in zip(polys.tolist(), colors):
        gfxdraw.aapolygon(surface, poly, color)
        gfxdraw.filled_polygon(surface, poly, color)
    return _pixels(surface)


def mapped(colors: list) -> np.ndarray:
    return np.array([(r << 16) | (g << 8) | b for r, g, b in colors], np.int64)


def probe_polygons(rng: np.random.Generator, width: int, height: int) -> list[np.ndarray]:
    """Polygons (n, 4, 2) of every kind the rasteriser has a branch for."""
    shapes = []
    for _ in range(60):  # rotated rectangles, like road tiles and grass squares
        angle = rng.uniform(0, 2 * np.pi)
        half = rng.uniform(0.3, 0.6 * max(width, height), size=2)
        corners = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * half
        rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        center = rng.uniform([-0.3 * width, -0.3 * height], [1.3 * width, 1.3 * height])
        shapes.append((corners @ rot.T + center)[None])
    for _ in range(40):  # arbitrary (also concave or self-crossing) quads, several per call
        center = rng.uniform([-0.2 * width, -0.2 * height], [1.2 * width, 1.2 * height])
        shapes.append(center + rng.normal(0, rng.choice([2.0, 20.0, width]), size=(rng.integers(1, 4), 4, 2)))
    x0, y0 = width / 3, height / 3
    for d in (1, 7, 40):  # axis-aligned, diagonal and degenerate outlines
        shapes.append(np.array([[[x0, y0], [x0 + d, y0], [x0 + d, y0 + d], [x0, y0 + d]]]))
        shapes.append(np.array([[[x0, y0], [x0 + d, y0 + d], [x0, y0 + 2 * d], [x0 - d, y0 + d]]]))
        shapes.append(np.array([[[x0, y0], [x0 + d, y0 + d], [x0 + 2 * d, y0 + 2 * d], [x0, y0]]]))
        shapes.append(np.array([[[-d - 0.5, y0], [width + d, y0 + 0.5], [width + d, -d], [x0, -d - 0.7]]]))
    shapes.append(np.full((1, 4, 2), 5.5))
    shapes.append(np.array([[[-0.9, -0.9], [0.9, -0.9], [0.9, 0.9], [-0.9, 0.9]]]))
    return shapes


@needs_raster
@pytest.mark.parametrize("width,height,ylo", [(1000, 800, 100), (64, 48, 0), (97, 33, 5)])
def test_draw_polygons_matches_gfxdraw(width: int, height: int, ylo: int) -> None:
    rng = np.random.default_rng(width)
    for i, polys in enumerate(probe_polygons(rng, width, height)):
        colors = [tuple(int(v) for v in rng.integers(0, 256, 3)) for _ in range(len(polys))]
        background = rng.integers(0, 1 << 24, size=(height, width)).astype(np.uint32)
        if i % 2:
            background[:] = rng.integers(0, 1 << 24)
        expected = pygame_polygons(background, polys, colors)
        got = background.copy()
        assert raster.draw_polygons(got, polys, mapped(colors), ylo), f"shape {i} not drawn"
        assert np.array_equal(got[ylo:], expected[ylo:]), f"shape {i} differs: {polys.tolist()}"
        assert np.array_equal(got[:ylo], background[:ylo])


@needs_raster
def test_draw_polygons_fill_and_refusals() -> None:
    img = np.zeros((20, 30), np.uint32)
    assert raster.draw_polygons(img, np.zeros((0, 4, 2)), np.zeros(0, np.int64), ylo=4, fill=0x123456)
    assert (img[4:] == 0x123456).all() and (img[:4] == 0).all()
    far = np.array([[[0.0, 0.0], [raster.MAX_COORD, 0.0], [0.0, 5.0], [1.0, 1.0]]])
    assert not raster.draw_polygons(img, far, np.ones(1, np.int64))


@needs_raster
@pytest.mark.parametrize("width,upper,lower,height", [(96, 700, 100, 96), (64, 200, 37, 64), (7, 40, 1, 39)])
def test_shrink_columns_matches_smoothscale(width: int, upper: int, lower: int, height: int) -> None:
    rng = np.random.default_rng(upper)
    for kind in ("noise", "bands", "white"):
        image = rng.integers(0, 1 << 24, size=(upper + lower, width)).astype(np.uint32)
        if kind == "bands":
            image[:] = image[:, :1]
            image[rng.integers(0, upper + lower, (upper + lower) // 10)] = 0xFFFFFF
        elif kind == "white":
            image[:] = 0xFFFFFF
        got = raster.shrink_columns(image[:upper], image[upper:], height, flip_upper=True)
        flipped = np.concatenate([image[:upper][::-1], image[upper:]])
        expected = surfarray.pixels3d(pygame.transform.smoothscale(_surface(flipped), (width, height)))
        assert np.array_equal(got, np.transpose(expected, (1, 0, 2))), kind


@needs_raster
def test_shrink_plan_refuses_what_it_cannot_reproduce() -> None:
    with pytest.raises(ValueError):
        raster.shrink_plan(96, 96)
    with pytest.raises(ValueError):
        raster.shrink_plan(256 * 10, 10)


def test_compiled_path_available_on_x86() -> None:
    # Where pygame-ce runs smoothscale on SSE2 the compiled path must be on; if a pygame-ce
    # release renames or replaces that backend, this fails instead of silently falling back.
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("SSE2 backend checked on x86-64 only")
    assert raster.numba is not None, "numba is a dependency: install it"
    assert raster.supported(), f"smoothscale backend is {pygame.transform.get_smoothscale_backend()}"
