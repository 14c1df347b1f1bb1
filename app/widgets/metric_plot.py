"""The Plot tab: the leading metric per evaluation, with the best-so-far staircase.

Why at most once a second and only while visible: textual-plotext re-renders every point on any
change (~100 ms for 600 points on a 2-core machine), so the plot marks itself dirty on each
frame that changed the series and redraws when a second has passed and its tab is open.
"""

from __future__ import annotations

import math
from typing import Any

from textual_plotext import PlotextPlot

from looptree.app.messages import RunChanged
from looptree.app.model import RunView
from looptree.app.widgets.base import ThrottledRunWidget


class MetricPlot(ThrottledRunWidget, PlotextPlot):
    """The leading metric per evaluation, with the best-so-far line."""

    PERIOD_S = 1.0  # at most one redraw a second

    def __init__(self, *, id: str | None = None) -> None:  # noqa: A002
        super().__init__(id=id)
        self._key: Any = None

    def concerns(self, frame: RunChanged) -> bool:
        return frame.changes.series_changed

    def sync(self, view: RunView) -> bool:
        """Redraw if the data changed (`_maybe` limits this to ≤1 Hz and to a visible tab)."""
        xs, ys, best = view.plot_points()
        spec = view.leading()
        key = (len(view.series), xs[-1:] if xs else None, best[-1:] if best else None, spec)
        if key == self._key:
            return False
        self._key = key
        plt = self.plt
        plt.clear_data()
        plt.clear_figure()
        if spec is None or not xs:
            plt.title("no evaluated node yet")
        else:
            plt.title(f"{spec.name} ({'higher' if spec.higher_is_better else 'lower'} is better)")
            plt.xlabel("evaluation")
            plt.scatter(xs, ys, color="cyan", label="node")
            step_x, step_y = step_line(xs, best)
            plt.plot(step_x, step_y, color="green", label="best so far")
            low, high = min(ys + best), max(ys + best)
            if math.isfinite(low) and math.isfinite(high) and high > low:
                pad = (high - low) * 0.05
                plt.ylim(low - pad, high + pad)
        self.refresh()
        return True


def step_line(xs: list[int], ys: list[float]) -> tuple[list[float], list[float]]:
    """A staircase through (x, y): the best-so-far holds its value until the next improvement."""
    out_x: list[float] = []
    out_y: list[float] = []
    for i, (x, y) in enumerate(zip(xs, ys)):
        if i and ys[i - 1] != y:
            out_x.append(x)
            out_y.append(ys[i - 1])
        out_x.append(x)
        out_y.append(y)
    return out_x, out_y
