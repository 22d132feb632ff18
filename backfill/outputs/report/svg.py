"""The report's charts as geometry: bars, gridlines, labels and marks in SVG user units, for a template to draw."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from . import fmt
from .data import Bin, nice_step

__all__ = [
    "HEIGHT",
    "WIDTH",
    "Bar",
    "Chart",
    "Label",
    "Mark",
    "Rect",
    "Tick",
    "latency_chart",
    "throughput_chart",
]

WIDTH, HEIGHT = 960, 260
_LEFT, _RIGHT, _TOP, _BOTTOM = 60, 30, 14, 44  # margins around the plot, room for the axis labels
_TICKS = 5  # about this many gridlines, at a step from nice_step
_THROUGHPUT_LABELS = 8
_LATENCY_LABELS = 10

Tone = Literal["fine", "bad"]  # the CSS classes that colour a bar
Anchor = Literal["start", "middle", "end"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Rect:
    x: float
    y: float
    width: float
    height: float
    tone: Tone


@dataclass(frozen=True, slots=True, kw_only=True)
class Bar:
    """One slot of a chart: a hover title and its rectangles, stacked (none when the slot holds no rows)."""

    title: str
    rects: tuple[Rect, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class Label:
    x: float
    y: float
    text: str
    anchor: Anchor


@dataclass(frozen=True, slots=True, kw_only=True)
class Tick:
    """A gridline across the plot at `y`, for `value` on the y axis, and its label."""

    value: int
    y: float
    label: Label


@dataclass(frozen=True, slots=True, kw_only=True)
class Mark:
    """A dashed vertical line at `x` with a name beside it: where a percentile falls."""

    x: float
    label: Label


@dataclass(frozen=True, slots=True, kw_only=True)
class Chart:
    title: str  # what a screen reader says for the whole chart
    width: int
    height: int
    plot_left: float
    plot_right: float
    plot_top: float
    plot_bottom: float
    ticks: tuple[Tick, ...]
    bars: tuple[Bar, ...]
    x_labels: tuple[Label, ...]
    marks: tuple[Mark, ...]
    caption: Label  # under the x axis: what it measures


_PLOT_RIGHT = WIDTH - _RIGHT
_PLOT_BOTTOM = HEIGHT - _BOTTOM
_PLOT_W = _PLOT_RIGHT - _LEFT
_PLOT_H = _PLOT_BOTTOM - _TOP


def _y_axis(top_value: int) -> tuple[int, tuple[Tick, ...]]:
    """A rounded axis maximum at least `top_value`, and its gridlines from 0 up to it."""
    step = max(1, int(nice_step(max(top_value, 1) / _TICKS)))
    ymax = step * max(1, math.ceil(top_value / step))
    ticks = []
    for value in range(0, ymax + 1, step):
        y = _PLOT_BOTTOM - _PLOT_H * value / ymax
        ticks.append(
            Tick(value=value, y=y, label=Label(x=_LEFT - 6, y=y + 4, text=fmt.count(value), anchor="end"))
        )
    return ymax, tuple(ticks)


def _chart(
    title: str, caption: str, ticks: tuple[Tick, ...], bars: list[Bar], labels: list[Label], marks: list[Mark]
) -> Chart:
    return Chart(
        title=title,
        width=WIDTH,
        height=HEIGHT,
        plot_left=_LEFT,
        plot_right=_PLOT_RIGHT,
        plot_top=_TOP,
        plot_bottom=_PLOT_BOTTOM,
        ticks=ticks,
        bars=tuple(bars),
        x_labels=tuple(labels),
        marks=tuple(marks),
        caption=Label(x=(_LEFT + _PLOT_RIGHT) / 2, y=HEIGHT - 6, text=caption, anchor="middle"),
    )


def throughput_chart(buckets: Sequence[tuple[int, int]], bucket_s: float) -> Chart:
    """Rows finished per time bucket, those that ended well stacked under the rest.

    `buckets` holds (rows fine, rows not fine) for each consecutive bucket of `bucket_s` seconds from the
    run's start.
    """
    ymax, ticks = _y_axis(max((fine + bad for fine, bad in buckets), default=0))
    slots = max(1, len(buckets))
    slot = _PLOT_W / slots
    # A lone bar as wide as the plot reads as a background, not a bar.
    gap = slot * 0.15 if len(buckets) > 1 else slot * 0.3
    bars = []
    for i, (fine, bad) in enumerate(buckets):
        x = _LEFT + i * slot + gap / 2
        fine_h = _PLOT_H * fine / ymax
        bad_h = _PLOT_H * bad / ymax
        rects = []
        if fine:
            rects.append(Rect(x=x, y=_PLOT_BOTTOM - fine_h, width=slot - gap, height=fine_h, tone="fine"))
        if bad:
            rects.append(
                Rect(x=x, y=_PLOT_BOTTOM - fine_h - bad_h, width=slot - gap, height=bad_h, tone="bad")
            )
        lo, hi = fmt.offset(i * bucket_s), fmt.offset((i + 1) * bucket_s)
        title = f"{lo} to {hi}: {fine + bad:,} rows ({bad:,} in other statuses)"
        bars.append(Bar(title=title, rects=tuple(rects)))
    label_every = max(1, math.ceil(len(buckets) / _THROUGHPUT_LABELS))
    labels = [
        Label(x=_LEFT + i * slot, y=_PLOT_BOTTOM + 16, text=fmt.offset(i * bucket_s), anchor="middle")
        for i in range(0, len(buckets) + 1, label_every)
    ]
    return _chart("Rows finished over time", "time since the start of the run", ticks, bars, labels, [])


def latency_chart(bins: Sequence[Bin], *, p50_ms: float, p99_ms: float) -> Chart:
    """A histogram of latencies, an overflow bin (if last) shaded apart, with p50 and p99 marked."""
    ymax, ticks = _y_axis(max((b.count for b in bins), default=0))
    slot = _PLOT_W / max(1, len(bins))
    gap = min(2.0, slot * 0.1)
    bars = []
    for i, b in enumerate(bins):
        h = _PLOT_H * b.count / ymax
        span = f"≥ {fmt.ms(b.low)}" if b.overflow else f"{fmt.ms(b.low)} to < {fmt.ms(b.high)}"
        rect = Rect(
            x=_LEFT + i * slot + gap / 2,
            y=_PLOT_BOTTOM - h,
            width=slot - gap,
            height=h,
            tone="bad" if b.overflow else "fine",
        )
        bars.append(Bar(title=f"{span}: {b.count:,} rows", rects=(rect,)))
    label_every = max(1, math.ceil(len(bins) / _LATENCY_LABELS))
    labels = [
        Label(
            x=_LEFT + i * slot,
            y=_PLOT_BOTTOM + 16,
            text=f"≥{fmt.ms(bins[i].low)}" if bins[i].overflow else fmt.ms(bins[i].low),
            anchor="middle",
        )
        for i in range(0, len(bins), label_every)
    ]
    marks = []
    if bins:
        overflow = bins[-1].overflow
        first, last_plain = bins[0].low, bins[-1].low if overflow else bins[-1].high
        plain_slots = len(bins) - (1 if overflow else 0)
        # Labels on two heights, so p50 and p99 stay legible when they are close or equal.
        for name, value, y in (("p50", p50_ms, _TOP + 12), ("p99", p99_ms, _TOP + 28)):
            if last_plain <= first or not first <= value <= last_plain:
                continue
            x = _LEFT + plain_slots * slot * (value - first) / (last_plain - first)
            near_right = x > _PLOT_RIGHT - 40
            label = (
                Label(x=x - 4, y=y, text=name, anchor="end")
                if near_right
                else Label(x=x + 4, y=y, text=name, anchor="start")
            )
            marks.append(Mark(x=x, label=label))
    return _chart("Latency histogram", "latency of each row's last attempt", ticks, bars, labels, marks)
