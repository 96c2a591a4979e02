"""Geometry checks for the report's figures: every piece of text inside the figure, no two text
boxes over each other (titles, axis labels, tick labels, annotations, legends as whole boxes),
and a figure legend off every panel. Used by the plot tests (tests/test_plots.py)."""

from __future__ import annotations

import matplotlib.figure
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.transforms import Bbox


def capture_figures(monkeypatch) -> list:
    """Figures as they are saved (the plot functions close theirs)."""
    saved: list = []
    real = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(
        matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: (saved.append(fig), real(fig, *a, **k))[1]
    )
    return saved


def _shown(text) -> bool:
    return text.get_visible() and bool(text.get_text().strip())


def text_boxes(fig) -> list[tuple[str, Bbox]]:
    """(what, window extent) of every drawn piece of text; a legend is one box."""
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)  # runs the layout engine, as savefig does
    boxes = []
    if fig._suptitle is not None and _shown(fig._suptitle):
        boxes.append(("suptitle", fig._suptitle.get_window_extent(renderer)))
    for legend in fig.legends:
        boxes.append(("figure legend", legend.get_window_extent(renderer)))
    for i, ax in enumerate(fig.axes):
        if not ax.axison and not ax.get_legend():
            continue
        frame = ax.get_window_extent(renderer)
        for name, text in (
            ("title", ax.title),
            ("left title", ax._left_title),
            ("right title", ax._right_title),
            ("x label", ax.xaxis.label),
            ("y label", ax.yaxis.label),
        ):
            if ax.axison and _shown(text):
                boxes.append((f"axes {i} {name} {text.get_text()!r}", text.get_window_extent(renderer)))
        if ax.axison:
            for axis, along in ((ax.xaxis, "x"), (ax.yaxis, "y")):
                for tick in axis.get_ticklabels(which="both"):
                    if not _shown(tick):
                        continue
                    box = tick.get_window_extent(renderer)
                    middle = (box.x0 + box.x1) / 2 if along == "x" else (box.y0 + box.y1) / 2
                    low, high = (frame.x0, frame.x1) if along == "x" else (frame.y0, frame.y1)
                    if low - 1 <= middle <= high + 1:  # ticks outside the view are not drawn
                        boxes.append((f"axes {i} {along} tick {tick.get_text()!r}", box))
        for text in ax.texts:
            if _shown(text):
                boxes.append((f"axes {i} text {text.get_text()!r}", text.get_window_extent(renderer)))
        if ax.get_legend() is not None:
            boxes.append((f"axes {i} legend", ax.get_legend().get_window_extent(renderer)))
    return boxes


def problems(fig, slack: float = 1.0) -> list[str]:
    """What is wrong with the figure's text layout (empty when it reads cleanly)."""
    out = []
    width, height = fig.bbox.width, fig.bbox.height
    boxes = text_boxes(fig)
    for what, box in boxes:
        if box.x0 < -slack or box.y0 < -slack or box.x1 > width + slack or box.y1 > height + slack:
            out.append(f"{what} runs off the figure: {box.bounds}")
    for i, (a, box_a) in enumerate(boxes):
        for b, box_b in boxes[i + 1 :]:
            overlap_x = min(box_a.x1, box_b.x1) - max(box_a.x0, box_b.x0)
            overlap_y = min(box_a.y1, box_b.y1) - max(box_a.y0, box_b.y0)
            if overlap_x > slack and overlap_y > slack:
                out.append(f"{a} overlaps {b}")
    renderer = FigureCanvasAgg(fig).get_renderer()
    for legend in fig.legends:
        box = legend.get_window_extent(renderer)
        for ax in fig.axes:
            if ax.axison and ax.get_window_extent(renderer).overlaps(box):
                out.append("the figure legend lies over a panel")
    return out
