"""A tiny built-in 5x7 bitmap font for burned-in text markers (no font files needed)."""

from __future__ import annotations

import numpy as np

__all__ = ["render_text"]

_GLYPHS: dict[str, tuple[str, ...]] = {
    "P": ("####.", "#...#", "#...#", "####.", "#....", "#....", "#...."),
    "O": (".###.", "#...#", "#...#", "#...#", "#...#", "#...#", ".###."),
    "R": ("####.", "#...#", "#...#", "####.", "#.#..", "#..#.", "#...#"),
    "T": ("#####", "..#..", "..#..", "..#..", "..#..", "..#..", "..#.."),
}


def render_text(text: str, scale: int = 1) -> np.ndarray:
    """Rasterise ``text`` as a boolean ``(7 * scale, (6 * len - 1) * scale)`` bitmap.

    Parameters
    ----------
    text
        Upper-case text made of the glyphs the font has (``P``, ``O``, ``R``, ``T``).
    scale
        Integer pixel replication factor.

    Raises
    ------
    ValueError
        When a character has no glyph.
    """
    missing = sorted(set(text) - set(_GLYPHS))
    if missing:
        raise ValueError(f"no glyph for {missing}; the font has {sorted(_GLYPHS)}")
    columns = []
    for position, character in enumerate(text):
        if position:
            columns.append(np.zeros((7, 1), bool))
        columns.append(np.array([[pixel == "#" for pixel in row] for row in _GLYPHS[character]]))
    bitmap = np.concatenate(columns, axis=1)
    return np.kron(bitmap, np.ones((scale, scale), bool)).astype(bool)
