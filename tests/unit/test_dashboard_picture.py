"""scripts/dashboard_picture.py without Prometheus: the dashboard read, variables substituted as
Grafana does, legends, units, stacking, and the SVG drawn from made-up query results."""

from __future__ import annotations

import math
from xml.etree import ElementTree

import pytest

from scripts.dashboard_picture import (
    PanelData,
    Series,
    format_value,
    last_value,
    legend,
    load_dashboard,
    nice_ceiling,
    panels,
    rate_interval,
    render_svg,
    series_of,
    stacked,
    substitute,
    threshold_colour,
)

pytestmark = pytest.mark.unit

SVG = "{http://www.w3.org/2000/svg}"


def test_every_panel_and_target_of_the_dashboard_is_read() -> None:
    """Each panel keeps its title, place, unit and every target; rows have no query."""
    board = load_dashboard()
    read = panels(board)
    assert [p.id for p in read] == [raw["id"] for raw in board["panels"]]
    for raw, panel in zip(board["panels"], read, strict=True):
        assert [q.expr for q in panel.queries] == [t["expr"] for t in raw.get("targets", [])]
        assert panel.grid == tuple(raw["gridPos"][k] for k in "xywh")
        assert (panel.type == "row") == (panel.queries == ())
    by_title = {p.title: p for p in read}
    assert by_title["Request rate by outcome"].stacked
    assert not by_title["Deltas/s"].stacked
    assert by_title["Time to first delta"].unit == "s"
    assert by_title["Vapi key accepted"].mappings == {"0": "rejected", "1": "ok"}


def test_substitute_replaces_each_variable_syntax_grafana_knows() -> None:
    """``$x``, ``${x}`` and ``[[x]]``; ``$__rate_interval`` is one name, not ``$__rate``."""
    variables = {"namespace": "prod", "job": "w", "__rate_interval": "1m", "__rate": "no"}
    expr = 'rate(m{namespace="$namespace", job="${job}", x="[[job]]"}[$__rate_interval])'
    assert substitute(expr, variables) == 'rate(m{namespace="prod", job="w", x="w"}[1m])'


def test_substitute_refuses_an_unknown_variable() -> None:
    """A query is never sent half-written: a variable without a value is an error."""
    with pytest.raises(KeyError, match=r"\$cluster"):
        substitute('m{cluster="$cluster"}', {"namespace": "prod"})


@pytest.mark.parametrize(
    ("interval_s", "scrape_s", "expected"),
    [(1, 1, "4s"), (15, 15, "60s"), (60, 15, "75s"), (0.5, 1, "4s")],
)
def test_rate_interval_is_grafanas_formula(
    interval_s: float, scrape_s: float, expected: str
) -> None:
    """max($__interval + scrape interval, 4 x scrape interval)."""
    assert rate_interval(interval_s, scrape_s) == expected


def test_legend_follows_the_format_or_shows_the_labels() -> None:
    labels = {"outcome": "failed", "instance": "10.0.0.1:6066"}
    assert legend("{{outcome}}", labels) == "failed"
    assert legend("in flight {{ instance }}", labels) == "in flight 10.0.0.1:6066"
    assert legend("{{missing}}", labels) == ""
    assert legend("", labels) == '{instance="10.0.0.1:6066", outcome="failed"}'


def test_series_of_reads_prometheus_matrices_nan_included() -> None:
    result = [{"metric": {"le": "1"}, "values": [[10, "0.5"], [11, "NaN"], [12, "+Inf"]]}]
    (series,) = series_of(result, "{{le}}")
    assert series.legend == "1"
    assert series.points[0] == (10.0, 0.5)
    assert math.isnan(series.points[1][1])
    assert series.points[2][1] == math.inf


@pytest.mark.parametrize(
    ("value", "unit", "shown"),
    [
        (0.25, "s", "250 ms"),
        (2.5, "s", "2.5 s"),
        (0, "s", "0 s"),
        (1.333, "reqps", "1.33 req/s"),
        (1500, "ops", "1.5k ops/s"),
        (4, "short", "4"),
        (math.nan, "s", "-"),
        (math.inf, "s", "+Inf"),
    ],
)
def test_format_value_speaks_the_panel_unit(value: float, unit: str, shown: str) -> None:
    assert format_value(value, unit) == shown


@pytest.mark.parametrize(
    ("value", "ceiling"), [(0, 1), (0.3, 0.5), (3, 5), (4.9, 5), (5, 5), (88, 100), (math.nan, 1)]
)
def test_nice_ceiling(value: float, ceiling: float) -> None:
    assert nice_ceiling(value) == pytest.approx(ceiling)


def test_stacking_adds_values_and_keeps_gaps() -> None:
    """Each layer starts where the ones before it end; a NaN point is a gap adding nothing."""
    a = Series("a", ((0, 1), (1, 2), (2, math.nan)))
    b = Series("b", ((0, 3), (1, math.nan), (2, 5)))
    layer_a, layer_b = stacked([a, b])
    assert layer_a[:2] == [(0, 0, 1), (1, 0, 2)]
    assert layer_b[0] == (0, 1, 4)
    assert math.isnan(layer_b[1][2])
    assert layer_b[2] == (2, 0, 5)


def test_stat_shows_the_last_value_and_its_threshold_colour() -> None:
    (lag,) = [p for p in panels(load_dashboard()) if p.title == "Consumer lag"]
    assert last_value([Series("", ((0, 150), (1, 120), (2, math.nan)))]) == 120
    assert math.isnan(last_value([]))
    assert threshold_colour(lag, 0) == threshold_colour(lag, 99) != threshold_colour(lag, 100)
    assert threshold_colour(lag, 100) != threshold_colour(lag, 5000)


def test_render_svg_draws_every_panel_from_any_result() -> None:
    """One well-formed SVG: each panel's title, its series' legends; no data, NaN and +Inf
    (a quantile above the last bucket) are drawn, not fatal."""
    board_panels = panels(load_dashboard())
    shapes = [
        (),
        (Series("completed", ((0, 0), (5, 2), (10, math.nan))),),
        (Series("p99", ((0, math.nan), (5, math.inf), (10, 0.3))), Series("zero", ((0, 0),))),
    ]
    data = [
        PanelData(p, tuple(shapes[(p.id + i) % 3] for i, _ in enumerate(p.queries)))
        for p in board_panels
    ]
    svg = render_svg("vapi-stream-worker", "made up", data, 0, 10)
    root = ElementTree.fromstring(svg)
    assert root.tag == f"{SVG}svg"
    texts = [t.text for t in root.iter(f"{SVG}text")]
    for panel in board_panels:
        assert panel.title in texts
    assert "completed" in texts
    assert "No data" in texts
    assert "zero" not in texts  # 0 throughout: counted, not listed
    assert any(t and t.startswith("+1 at 0") for t in texts)
