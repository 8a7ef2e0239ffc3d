"""How the console shows things: template filters (times, sizes, durations) and the publish-rate chart."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from service.core.repository import FinishedInMinute

CHART_WIDTH = 1200
CHART_HEIGHT = 120
CHART_GAP = 4


def when(moment: datetime | None) -> str:
    """A timestamp as operators read it: UTC, to the second."""
    return "—" if moment is None else moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def duration(seconds: float | None) -> str:
    """'0.4 s', '12 s', '3 min 20 s', '5 h 2 min', '3 d 4 h'."""
    if seconds is None:
        return "—"
    if seconds < 10:
        return f"{seconds:.1f} s"
    whole = int(seconds)
    for unit, size, smaller, smaller_size in (("d", 86400, "h", 3600), ("h", 3600, "min", 60), ("min", 60, "s", 1)):
        if whole >= size:
            rest = (whole % size) // smaller_size
            return f"{whole // size} {unit}" + (f" {rest} {smaller}" if rest else "")
    return f"{whole} s"


def ago(moment: datetime | None) -> str:
    if moment is None:
        return "—"
    seconds = (datetime.now(UTC) - moment).total_seconds()
    return f"in {duration(-seconds)}" if seconds < 0 else f"{duration(seconds)} ago"


def size(count: int | None) -> str:
    if count is None:
        return "—"
    if count < 1024:
        return f"{count} B"
    return f"{count / 1024:.1f} KiB" if count < 1024**2 else f"{count / 1024**2:.1f} MiB"


FILTERS: dict[str, Callable[..., str]] = {"when": when, "duration": duration, "ago": ago, "size": size}


@dataclass(frozen=True)
class Bar:
    """One minute of the chart: a stacked bar of published over superseded intents."""

    x: float
    width: float
    done_y: float
    done_height: float
    superseded_y: float
    superseded_height: float
    label: str


@dataclass(frozen=True)
class Chart:
    bars: list[Bar]
    peak: int
    total_done: int
    total_superseded: int
    width: int = CHART_WIDTH
    height: int = CHART_HEIGHT


def rate_chart(per_minute: list[FinishedInMinute]) -> Chart:
    """Bars scaled to the busiest minute, oldest minute on the left (drawn as inline SVG)."""
    peak = max((m.done + m.superseded for m in per_minute), default=0)
    scale = CHART_HEIGHT / max(peak, 1)
    step = CHART_WIDTH / max(len(per_minute), 1)
    bars = []
    for index, minute in enumerate(per_minute):
        done, superseded = minute.done * scale, minute.superseded * scale
        when_label = "this minute" if minute.minutes_ago == 0 else f"{minute.minutes_ago} min ago"
        bars.append(
            Bar(
                x=index * step,
                width=step - CHART_GAP,
                done_y=CHART_HEIGHT - done,
                done_height=done,
                superseded_y=CHART_HEIGHT - done - superseded,
                superseded_height=superseded,
                label=f"{when_label}: {minute.done} published, {minute.superseded} superseded",
            )
        )
    return Chart(
        bars,
        peak,
        sum(m.done for m in per_minute),
        sum(m.superseded for m in per_minute),
    )
