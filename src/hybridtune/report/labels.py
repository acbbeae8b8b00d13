"""Point labels on a matplotlib plot that never overlap each other or the points.

Each label tries offsets around its point, nearest first, and takes the first whose box (measured
by the renderer, in display pixels) overlaps no label placed before it no point marker and not the legend; a
label with no free spot is left out of the plot and returned, for the caller to list beside it.
matplotlib has no label placement of its own (adjustText would be a dependency for these lines).
"""

from __future__ import annotations

import itertools

from matplotlib.transforms import Bbox

# offsets in points, nearest first: right, above, left, below, the diagonals, then further out
_DIRECTIONS = [(1, 0.3), (0, 1), (-1, 0.3), (0, -1), (1, 1), (-1, 1), (1, -1), (-1, -1)]
_OFFSETS = [(dx * r, dy * r) for r in (6, 14, 24, 36) for dx, dy in _DIRECTIONS]


def place_labels(ax, xs: list[float], ys: list[float], labels: list[str], fontsize: int = 8) -> list[str]:
    """Annotate each (x, y) with its label where it overlaps nothing; returns the labels left out."""
    fig = ax.figure
    fig.canvas.draw()  # the final layout (tight_layout first) sets the data -> pixel transform
    renderer = fig.canvas.get_renderer()
    pad = 3.0  # pixels around each point marker
    points = [ax.transData.transform((x, y)) for x, y in zip(xs, ys, strict=True)]
    taken = [Bbox.from_extents(px - pad, py - pad, px + pad, py + pad) for px, py in points]
    legend = ax.get_legend()
    if legend is not None:
        taken.append(legend.get_window_extent(renderer))
    frame = ax.get_window_extent(renderer)
    left_out = []
    for (x, y), label in zip(zip(xs, ys, strict=True), labels, strict=True):
        for dx, dy in _OFFSETS:
            text = ax.annotate(
                label,
                (x, y),
                textcoords="offset points",
                xytext=(dx, dy),
                fontsize=fontsize,
                ha="left" if dx > 0 else "right" if dx < 0 else "center",
                va="bottom" if dy > 0 else "top" if dy < 0 else "center",
            )
            box = text.get_window_extent(renderer).expanded(1.05, 1.1)
            inside = frame.contains(box.x0, box.y0) and frame.contains(box.x1, box.y1)
            if inside and not any(box.overlaps(other) for other in taken):
                taken.append(box)
                break
            text.remove()
        else:
            left_out.append(label)
    return left_out


def boxes_overlap(ax) -> list[tuple[str, str]]:
    """The pairs of annotation texts on `ax` whose boxes overlap (for tests)."""
    renderer = ax.figure.canvas.get_renderer()
    texts = [t for t in ax.texts if t.get_visible()]
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in texts]
    return [(a, b) for (a, ba), (b, bb) in itertools.combinations(boxes, 2) if ba.overlaps(bb)]
