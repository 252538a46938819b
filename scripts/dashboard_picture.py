"""Draw the Grafana dashboard as an SVG from a Prometheus's data, without Grafana.

    python scripts/dashboard_picture.py --prometheus http://127.0.0.1:9090 \\
        --namespace compose --job vapi-stream-worker --minutes 15 --out dashboard.svg

Every panel of k8s/monitoring/vapi-stream-worker.json is drawn where its ``gridPos`` puts it:
rows as headings, stat panels as their last value over a sparkline, time series as lines
(stacked where the panel stacks). Each query runs as Grafana runs it: ``$namespace``, ``$job``
and ``$__rate_interval`` substituted, one range query per target over the chosen span.
docs/dashboard.svg is this drawing of the end-to-end test's run
(tests/e2e/test_dashboard_on_prometheus.py).

The picture is a sketch of the dashboard's content, not Grafana's exact look: units, thresholds,
value mappings, stacking and legend formats follow the panel's settings; nothing else does. A
legend lists the series that have a value other than 0 and counts the rest, and a series that is
0 throughout is not drawn (stacked, its line would hide the one below it).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import httpx

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "k8s" / "monitoring" / "vapi-stream-worker.json"

#: Grafana's classic palette, in the order it gives series their colours.
PALETTE = (
    "#7EB26D",
    "#EAB839",
    "#6ED0E0",
    "#EF843C",
    "#E24D42",
    "#1F78C1",
    "#BA43A9",
    "#705DA0",
    "#508642",
    "#CCA300",
)
#: Grafana's dark theme, and its named threshold colours.
BACKGROUND, PANEL, BORDER, TEXT, MUTED, GRID = (
    "#111217",
    "#181b1f",
    "#2c3235",
    "#ccccdc",
    "#8e8e9e",
    "#24272c",
)
NAMED_COLOURS = {"green": "#73BF69", "orange": "#FF9830", "red": "#F2495C", "yellow": "#FADE2A"}

#: Pixels per grid column (Grafana's grid is 24 columns wide) and per grid row unit.
COLUMN_PX, ROW_PX, HEADER_PX, GAP_PX = 50, 30, 56, 4
WIDTH_PX = 24 * COLUMN_PX

_VARIABLE = re.compile(r"\$\{(\w+)\}|\$(\w+)|\[\[(\w+)\]\]")
_LEGEND_LABEL = re.compile(r"\{\{\s*(\w+)\s*\}\}")


@dataclass(frozen=True)
class Query:
    """One target of a panel: its PromQL (with Grafana's variables) and its legend format."""

    ref_id: str
    expr: str
    legend: str


@dataclass(frozen=True)
class Panel:
    """A panel of the dashboard, as much of it as the picture and the tests need."""

    id: int
    title: str
    type: str
    grid: tuple[int, int, int, int]  # x, y, w, h in grid units
    unit: str
    queries: tuple[Query, ...]
    stacked: bool = False
    thresholds: tuple[tuple[float | None, str], ...] = ()
    mappings: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Series:
    """One series a query returned: its legend and its (unix time, value) points."""

    legend: str
    points: tuple[tuple[float, float], ...]


@dataclass(frozen=True)
class PanelData:
    """A panel and what its queries returned, query by query (same order as ``panel.queries``)."""

    panel: Panel
    results: tuple[tuple[Series, ...], ...]

    @property
    def series(self) -> list[Series]:
        return [series for result in self.results for series in result]


def load_dashboard(path: Path = DASHBOARD) -> dict[str, Any]:
    board: dict[str, Any] = json.loads(path.read_text())
    return board


def panels(board: Mapping[str, Any]) -> list[Panel]:
    """Every panel of the dashboard, rows included (they have no queries), in the file's order."""
    found = []
    for raw in board["panels"]:
        defaults = raw.get("fieldConfig", {}).get("defaults", {})
        grid = raw["gridPos"]
        stacking = defaults.get("custom", {}).get("stacking", {}).get("mode", "none")
        mappings = {
            value: option["text"]
            for mapping in defaults.get("mappings", [])
            if mapping.get("type") == "value"
            for value, option in mapping["options"].items()
        }
        found.append(
            Panel(
                id=raw["id"],
                title=raw["title"],
                type=raw["type"],
                grid=(grid["x"], grid["y"], grid["w"], grid["h"]),
                unit=defaults.get("unit", "short"),
                queries=tuple(
                    Query(t.get("refId", "A"), t["expr"], t.get("legendFormat", ""))
                    for t in raw.get("targets", [])
                ),
                stacked=stacking == "normal",
                thresholds=tuple(
                    (step["value"], step["color"])
                    for step in defaults.get("thresholds", {}).get("steps", [])
                ),
                mappings=mappings,
            )
        )
    return found


def rate_interval(interval_s: float, scrape_interval_s: float) -> str:
    """Grafana's ``$__rate_interval``: max($__interval + scrape interval, 4 x scrape interval)."""
    seconds = max(interval_s + scrape_interval_s, 4 * scrape_interval_s)
    return f"{seconds:g}s"


def substitute(expr: str, variables: Mapping[str, str]) -> str:
    """``expr`` with Grafana's ``$name``, ``${name}`` and ``[[name]]`` replaced.

    A variable ``variables`` does not define is an error: a query would go out half-written.
    """

    def value(match: re.Match[str]) -> str:
        name = next(group for group in match.groups() if group is not None)
        if name not in variables:
            raise KeyError(f"no value for ${name} in {expr!r}")
        return variables[name]

    return _VARIABLE.sub(value, expr)


def legend(legend_format: str, labels: Mapping[str, str]) -> str:
    """A series' name as Grafana writes it: the legend format, or else its label set."""
    if legend_format:
        return _LEGEND_LABEL.sub(lambda m: labels.get(m.group(1), ""), legend_format).strip()
    inner = ", ".join(f'{name}="{value}"' for name, value in sorted(labels.items()))
    return f"{{{inner}}}"


def series_of(result: Iterable[Mapping[str, Any]], legend_format: str) -> tuple[Series, ...]:
    """The series of a Prometheus range query's ``data.result`` (a matrix)."""
    return tuple(
        Series(
            legend(legend_format, item["metric"]),
            tuple((float(t), float(v)) for t, v in item["values"]),
        )
        for item in result
    )


def query_range(
    client: httpx.Client, expr: str, start: float, end: float, step_s: float
) -> list[dict[str, Any]]:
    """``/api/v1/query_range``'s result; an error answer raises with Prometheus' message."""
    response = client.get(
        "/api/v1/query_range", params={"query": expr, "start": start, "end": end, "step": step_s}
    )
    body = response.json()
    if response.status_code != 200 or body.get("status") != "success":
        raise RuntimeError(f"{expr!r}: {body.get('errorType')}: {body.get('error')}")
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def fetch(
    client: httpx.Client,
    board_panels: Sequence[Panel],
    variables: Mapping[str, str],
    start: float,
    end: float,
    step_s: float,
) -> list[PanelData]:
    """Every panel's queries run over [start, end], as Grafana would run them."""
    return [
        PanelData(
            panel,
            tuple(
                series_of(
                    query_range(client, substitute(q.expr, variables), start, end, step_s),
                    q.legend,
                )
                for q in panel.queries
            ),
        )
        for panel in board_panels
    ]


# ---------------------------------------------------------------------------------------------
# Drawing


def format_value(value: float, unit: str) -> str:
    """A value with its panel's unit, short, as on Grafana's axes and stat panels."""
    if math.isnan(value):
        return "-"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if unit == "s":
        if value == 0:
            return "0 s"
        if abs(value) < 1:
            return f"{_number(value * 1000)} ms"
        return f"{_number(value)} s"
    suffix = {"reqps": " req/s", "ops": " ops/s"}.get(unit, "")
    for size, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= size:
            return f"{_number(value / size)}{prefix}{suffix}"
    return f"{_number(value)}{suffix}"


def _number(value: float) -> str:
    if not math.isfinite(value):
        return str(value)
    if value == int(value):
        return str(int(value))
    return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"


def nice_ceiling(value: float) -> float:
    """The smallest 1, 2, 2.5 or 5 times a power of ten at or above ``value`` (1 for nothing)."""
    if not value > 0 or math.isinf(value):
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    return next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= value * (1 - 1e-9))


def last_value(series: Sequence[Series]) -> float:
    """Grafana's ``lastNotNull`` of the first series (NaN when it has no value)."""
    values = [v for _, v in series[0].points if not math.isnan(v)] if series else []
    return values[-1] if values else math.nan


def threshold_colour(panel: Panel, value: float) -> str:
    colour = "green"
    for limit, name in panel.thresholds:
        if limit is None or (not math.isnan(value) and value >= limit):
            colour = name
    return NAMED_COLOURS.get(colour, colour)


def stacked(series: Sequence[Series]) -> list[list[tuple[float, float, float]]]:
    """Each series as (time, bottom, top) points, stacked on the ones before it.

    A point without a value (NaN) stays a gap, its top NaN, and adds nothing to the stack.
    """
    totals: dict[float, float] = {}
    out = []
    for s in series:
        points = []
        for t, v in s.points:
            bottom = totals.get(t, 0.0)
            top = bottom + v
            if not math.isnan(v):
                totals[t] = top
            points.append((t, bottom, top))
        out.append(points)
    return out


def _segments(
    points: Sequence[tuple[float, float, float]],
) -> list[list[tuple[float, float, float]]]:
    """Runs of points with a value, split where the series has a gap (NaN or a missing step)."""
    runs: list[list[tuple[float, float, float]]] = []
    for point in points:
        if math.isnan(point[2]):
            runs.append([])
            continue
        if not runs:
            runs.append([])
        runs[-1].append(point)
    return [run for run in runs if run]


@dataclass(frozen=True)
class _Box:
    x: float
    y: float
    w: float
    h: float


def _text(x: float, y: float, text: str, size: int, colour: str = TEXT, **attrs: str) -> str:
    extra = "".join(f' {name.replace("_", "-")}="{value}"' for name, value in attrs.items())
    return (
        f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" fill="{colour}"{extra}>'
        f"{escape(text)}</text>"
    )


def _plot(
    series: Sequence[Series], box: _Box, start: float, end: float, stack: bool, top: float
) -> list[str]:
    """Lines (and their light fill) of ``series`` in ``box``, y from 0 to ``top``."""
    span = max(end - start, 1e-9)

    def x_of(t: float) -> float:
        return box.x + (t - start) / span * box.w

    def y_of(v: float) -> float:
        return box.y + box.h - min(max(v, 0.0), top) / top * box.h

    layers = (
        stacked(series)
        if stack
        else [[(t, 0.0, v) for t, v in s.points] for s in series]  # unstacked: from 0
    )
    out = []
    for index, layer in enumerate(layers):
        if not _has_value(series[index]):
            continue  # nothing to draw; stacked, its line would hide the one below
        colour = PALETTE[index % len(PALETTE)]
        for run in _segments(layer):
            line = " ".join(f"{x_of(t):.1f},{y_of(v):.1f}" for t, _, v in run)
            base = " ".join(f"{x_of(t):.1f},{y_of(b):.1f}" for t, b, _ in reversed(run))
            out.append(f'<polygon points="{line} {base}" fill="{colour}" fill-opacity="0.1"/>')
            out.append(
                f'<polyline points="{line}" fill="none" stroke="{colour}" stroke-width="1.5"/>'
            )
    return out


def _has_value(series: Series) -> bool:
    """True when the series has a value other than 0 somewhere."""
    return any(not math.isnan(v) and v != 0 for _, v in series.points)


def _series_top(series: Sequence[Series], stack: bool) -> float:
    if stack:
        tops = [top for layer in stacked(series) for _, _, top in layer]
    else:
        tops = [v for s in series for _, v in s.points]
    return max((v for v in tops if math.isfinite(v)), default=0.0)


def _stat(data: PanelData, box: _Box, start: float, end: float) -> list[str]:
    panel = data.panel
    value = last_value(data.series)
    colour = threshold_colour(panel, value)
    key = _number(value) if not math.isnan(value) else ""
    shown = panel.mappings.get(key) or format_value(value, panel.unit)
    out = [
        f'<rect x="{box.x:.1f}" y="{box.y:.1f}" width="{box.w:.1f}" height="{box.h:.1f}" '
        f'rx="2" fill="{colour}"/>',
        _text(box.x + 8, box.y + 18, panel.title, 13, "#ffffff", font_weight="500"),
    ]
    if data.series:
        spark = _Box(box.x, box.y + box.h * 0.55, box.w, box.h * 0.45)
        top = nice_ceiling(_series_top(data.series[:1], False))
        out += [
            line.replace(f'"{PALETTE[0]}"', '"#ffffff" opacity="0.5"')
            for line in _plot(data.series[:1], spark, start, end, False, top)
        ]
    out.append(
        _text(box.x + box.w / 2, box.y + box.h * 0.62, shown, 30, "#ffffff", text_anchor="middle")
    )
    return out


def _timeseries(data: PanelData, box: _Box, start: float, end: float) -> list[str]:
    panel = data.panel
    series = data.series
    legend_rows = 1 if series else 0
    plot = _Box(box.x + 62, box.y + 30, box.w - 74, box.h - 30 - 22 - 16 * legend_rows)
    top = nice_ceiling(_series_top(series, panel.stacked))
    out = [
        f'<rect x="{box.x:.1f}" y="{box.y:.1f}" width="{box.w:.1f}" height="{box.h:.1f}" '
        f'rx="2" fill="{PANEL}" stroke="{BORDER}"/>',
        _text(box.x + 8, box.y + 18, panel.title, 13, TEXT, font_weight="500"),
    ]
    for i in range(5):
        y = plot.y + plot.h - i / 4 * plot.h
        out.append(
            f'<line x1="{plot.x:.1f}" y1="{y:.1f}" x2="{plot.x + plot.w:.1f}" y2="{y:.1f}" '
            f'stroke="{GRID}"/>'
        )
        label = format_value(top * i / 4, panel.unit)
        out.append(_text(plot.x - 6, y + 4, label, 10, MUTED, text_anchor="end"))
    for i in range(5):
        t = start + (end - start) * i / 4
        x = plot.x + plot.w * i / 4
        stamp = datetime.fromtimestamp(t, UTC).strftime("%H:%M:%S")
        anchor = ("start", "middle", "middle", "middle", "end")[i]
        out.append(_text(x, plot.y + plot.h + 14, stamp, 10, MUTED, text_anchor=anchor))
    out += _plot(series, plot, start, end, panel.stacked, top)
    if not series:
        out.append(
            _text(
                plot.x + plot.w / 2, plot.y + plot.h / 2, "No data", 14, MUTED, text_anchor="middle"
            )
        )
    return out + _legend(series, box)


def _legend(series: Sequence[Series], box: _Box) -> list[str]:
    """One line under the plot: the series that have a value, then how many stayed at 0."""
    out, x, y = [], box.x + 10, box.y + box.h - 11
    shown = [(i, s) for i, s in enumerate(series) if _has_value(s)]
    for index, s in shown:
        width = 14 + 6.5 * len(s.legend) + 14
        if x + width > box.x + box.w - 70:
            out.append(_text(x, y, "…", 11, MUTED))
            break
        colour = PALETTE[index % len(PALETTE)]
        out.append(f'<rect x="{x:.1f}" y="{y - 6:.1f}" width="10" height="3" fill="{colour}"/>')
        out.append(_text(x + 14, y, s.legend, 11, TEXT))
        x += width
    if len(shown) < len(series):
        out.append(_text(x, y, f"+{len(series) - len(shown)} at 0 or empty", 11, MUTED))
    return out


def render_svg(
    board_title: str, caption: str, panel_data: Sequence[PanelData], start: float, end: float
) -> str:
    """The whole dashboard as one SVG document."""
    bottom = max((d.panel.grid[1] + d.panel.grid[3] for d in panel_data), default=0)
    height = HEADER_PX + bottom * ROW_PX + GAP_PX
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH_PX}" height="{height}" '
        f'viewBox="0 0 {WIDTH_PX} {height}" font-family="Inter, Helvetica, Arial, sans-serif">',
        f'<rect width="{WIDTH_PX}" height="{height}" fill="{BACKGROUND}"/>',
        _text(GAP_PX + 8, 26, board_title, 18, TEXT, font_weight="600"),
        _text(GAP_PX + 8, 46, caption, 11, MUTED),
    ]
    for data in panel_data:
        x, y, w, h = data.panel.grid
        box = _Box(
            x * COLUMN_PX + GAP_PX,
            HEADER_PX + y * ROW_PX + GAP_PX,
            w * COLUMN_PX - 2 * GAP_PX,
            h * ROW_PX - 2 * GAP_PX,
        )
        if data.panel.type == "row":
            out.append(_text(box.x + 4, box.y + 17, data.panel.title, 14, TEXT, font_weight="600"))
        elif data.panel.type == "stat":
            out += _stat(data, box, start, end)
        else:
            out += _timeseries(data, box, start, end)
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prometheus", default="http://127.0.0.1:9090", help="base URL")
    parser.add_argument("--namespace", required=True, help="the dashboard's $namespace")
    parser.add_argument("--job", required=True, help="the dashboard's $job")
    parser.add_argument("--minutes", type=float, default=15, help="span ending now")
    parser.add_argument("--scrape-interval", type=float, default=15, help="seconds, as scraped")
    parser.add_argument("--out", type=Path, required=True, help="the SVG file to write")
    args = parser.parse_args(argv)
    end = time.time()
    start = end - args.minutes * 60
    # Grafana's $__interval: the span over about 1000 points, at least the scrape interval.
    step = max(args.scrape_interval, round((end - start) / 1000))
    variables = {
        "namespace": args.namespace,
        "job": args.job,
        "__rate_interval": rate_interval(step, args.scrape_interval),
    }
    board = load_dashboard()
    with httpx.Client(base_url=args.prometheus, timeout=30) as client:
        data = fetch(client, panels(board), variables, start, end, step)
    caption = f"namespace={args.namespace} job={args.job}, the last {args.minutes:g} minutes"
    args.out.write_text(render_svg(board["title"], caption, data, start, end))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
