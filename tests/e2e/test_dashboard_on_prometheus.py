"""The Grafana dashboard and the alert rules, run on a real Prometheus against a real run.

A worker handles requests (a retry, a failure, a malformed Vapi event and a dead-lettered record
among them) while Debian's ``prometheus`` scrapes it every second with the compose scrape config
and evaluates the PrometheusRule's groups. Then every query of every panel of
k8s/monitoring/vapi-stream-worker.json runs as Grafana runs it (variables resolved through
``label_values``, ``$__rate_interval`` by Grafana's formula, a range query over the run and an
instant query at its end): none may fail, and each panel whose metrics moved during the run must
show it (a finite non-zero value). New panels are covered as they are added. Every rule must be
loaded and evaluate without error, and the dead-letter alert fire for the one bad record.

With ``DASHBOARD_SVG=docs/dashboard.svg`` the test also writes the picture of the dashboard the
README shows, drawn from this run's data by scripts/dashboard_picture.py.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import pytest

from scripts.dashboard_picture import (
    PanelData,
    Series,
    fetch,
    legend,
    load_dashboard,
    main,
    panels,
    rate_interval,
    render_svg,
    substitute,
)
from tests.e2e.harness import (
    OutputReader,
    SimulatorProcess,
    Topics,
    WorkerProcess,
    produce,
    request_record,
)
from tests.e2e.prometheus import PrometheusProcess

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(150)]

SCRAPE_S = 1.0
SVG = "{http://www.w3.org/2000/svg}"
METRIC = re.compile(r"\bchat_worker_\w+")
#: A panel query of the form ``sum by (labels) (rate(counter{...}[...]))``.
BY_LABEL_RATE = re.compile(
    r"sum by \((?P<labels>[\w, ]+)\) \(rate\((?P<counter>chat_worker_\w+_total)\{[^}]*\}\[\w+\]\)\)"
)
LABEL_VALUES = re.compile(r"label_values\((?P<selector>.+),\s*(?P<label>\w+)\)")
#: Streams of about 2 s (30 deltas 60 ms apart), so that scrapes see them in flight.
PACE = "[[sim:pace tokens=30 delay_ms=60]]"
#: The metrics the run moves; the test fails if one did not move (then it proves less).
EXERCISED = {
    "chat_worker_requests_total",
    "chat_worker_deltas_total",
    "chat_worker_in_flight",
    "chat_worker_buffered",
    "chat_worker_time_to_first_delta_seconds_bucket",
    "chat_worker_request_duration_seconds_bucket",
    "chat_worker_queue_wait_seconds_bucket",
    "chat_worker_delta_publish_seconds_bucket",
    "chat_worker_vapi_responses_total",
    "chat_worker_retries_total",
    "chat_worker_dlq_total",
    "chat_worker_malformed_events_total",
}


@pytest.fixture
def worker(
    kafka_bootstrap: str, simulator: SimulatorProcess, topics: Topics, tmp_path: Path
) -> Iterator[WorkerProcess]:
    process = WorkerProcess(kafka_bootstrap, topics, simulator, tmp_path).start()
    yield process
    process.terminate()


@pytest.fixture
def prometheus(worker: WorkerProcess, tmp_path: Path) -> Iterator[PrometheusProcess]:
    server = PrometheusProcess(
        tmp_path / "prometheus", [f"127.0.0.1:{worker.http_port}"], SCRAPE_S
    ).start()
    yield server
    server.stop()


def _wait(condition: Any, what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.25)


def _run_the_traffic(bootstrap: str, topics: Topics) -> None:
    """Two turns of four conversations, a 503 retried, a 422 that fails, a malformed SSE line
    and a record that is not JSON; returns once every response and the dead letter are out."""
    first = [request_record(f"conv-{c}", f"conv-{c}-1", f"{PACE} Hello {c}") for c in "abcd"]
    faults = [
        request_record("conv-r", "conv-r-1", "[[sim:fault status code=503 times=1]] hi"),
        request_record("conv-f", "conv-f-1", "[[sim:fault status code=422]] hi"),
        request_record("conv-m", "conv-m-1", f"{PACE} [[sim:fault malformed after=2 line=json]]"),
        (b"conv-x", b"{not json"),
    ]
    second = [request_record(f"conv-{c}", f"conv-{c}-2", f"{PACE} Again {c}") for c in "abcd"]

    async def run() -> None:
        async with OutputReader(bootstrap, topics) as reader:
            await produce(bootstrap, topics.requests, [*first, *faults])
            ids = [f"conv-{c}-1" for c in "abcdrfm"]
            await reader.wait_for_responses(ids, 60)
            await reader.wait_for(lambda out: len(out.dlq) == 1, 30, "the dead letter")
            await produce(bootstrap, topics.requests, second)
            await reader.wait_for_responses([f"conv-{c}-2" for c in "abcd"], 60)
            statuses = {r["request_id"]: r["status"] for r in reader.outputs.responses}
            assert statuses["conv-f-1"] == "failed"
            assert {s for i, s in statuses.items() if i != "conv-f-1"} == {"completed"}

    asyncio.run(run())


def _moved(prometheus: PrometheusProcess, scope: str, metrics: set[str], window_s: int) -> set[str]:
    """The metrics among ``metrics`` whose scraped samples changed within the last window."""
    return {
        name
        for name in metrics
        if prometheus.value(f"sum(changes({name}{{{scope}}}[{window_s}s]))") > 0
    }


def _resolve_variables(prometheus: PrometheusProcess, board: dict[str, Any]) -> dict[str, str]:
    """The dashboard's query variables, each resolved as Grafana does (``label_values`` through
    the label values API, in order, later ones seeing earlier ones), each with exactly one value."""
    variables: dict[str, str] = {}
    for variable in board["templating"]["list"]:
        if variable["type"] != "query":
            continue
        found = LABEL_VALUES.fullmatch(variable["definition"])
        assert found, variable["definition"]
        selector = substitute(found["selector"], variables)
        values = prometheus.api(f"label/{found['label']}/values", **{"match[]": selector})
        assert len(values) == 1, (variable["name"], values)
        variables[variable["name"]] = values[0]
    return variables


def _finite_nonzero(series: Series) -> bool:
    return any(not math.isnan(v) and v != 0 for _, v in series.points)


def _alert_states(prometheus: PrometheusProcess) -> dict[str, str]:
    """Each alerting rule's state: inactive, pending or firing."""
    groups = prometheus.api("rules")["groups"]
    return {r["name"]: r["state"] for g in groups for r in g["rules"] if r["type"] == "alerting"}


def _check_rules(prometheus: PrometheusProcess, scope: dict[str, str]) -> None:
    """Every rule of the PrometheusRule is loaded and evaluated without error."""
    groups = prometheus.api("rules")["groups"]
    loaded = {(g["name"], r["name"]) for g in groups for r in g["rules"]}
    expected = {
        (g["name"], r.get("alert") or r["record"])
        for g in prometheus.rule_groups
        for r in g["rules"]
    }
    assert loaded == expected
    rules = [r for g in groups for r in g["rules"]]
    broken = [(r["name"], r["health"], r.get("lastError")) for r in rules if r["health"] != "ok"]
    assert broken == [], broken
    # The recording rule keeps the deployment's labels, which the alert on it groups by.
    (lag,) = prometheus.query("namespace_job:chat_worker_consumer_lag:sum")
    assert lag["metric"] == {"__name__": "namespace_job:chat_worker_consumer_lag:sum", **scope}


def _wait_until_idle(prometheus: PrometheusProcess, selector: str) -> None:
    """No stream open, the backlog reported drained (every 5 s), the last increments out of the
    rate window: the end of the picture is an idle dashboard."""
    window = rate_interval(SCRAPE_S, SCRAPE_S)
    idle = " + ".join(
        (
            f"sum(chat_worker_in_flight{{{selector}}})",
            f"sum(chat_worker_consumer_lag{{{selector}}})",
            f"sum(rate(chat_worker_requests_total{{{selector}}}[{window}]))",
        )
    )
    _wait(lambda: prometheus.query(f"({idle}) == 0") != [], "the idle worker's metrics", 20)


def _counted_but_not_shown(
    prometheus: PrometheusProcess, selector: str, data: PanelData, variables: dict[str, str]
) -> list[str]:
    """Series of a ``sum by (labels) (rate(counter))`` query that the run counted (the counter
    is above 0 at the end) but the panel never shows above 0: an increment rate() cannot see."""
    missing = []
    for query, result in zip(data.panel.queries, data.results, strict=True):
        found = BY_LABEL_RATE.fullmatch(substitute(query.expr, variables))
        if found is None:
            continue
        counted = prometheus.query(
            f"sum by ({found['labels']}) ({found['counter']}{{{selector}}}) > 0"
        )
        shown = {s.legend for s in result if _finite_nonzero(s)}
        missing += [
            f"{data.panel.title}: {legend(query.legend, c['metric'])}"
            for c in counted
            if legend(query.legend, c["metric"]) not in shown
        ]
    return missing


def _check_panels(
    prometheus: PrometheusProcess,
    data: list[PanelData],
    variables: dict[str, str],
    selector: str,
    window: tuple[int, int],
) -> list[str]:
    """No query fails (range and instant), every panel whose metrics moved shows a value, and
    every label value the run counted shows on its panel; returns the series count report."""
    start, end = window
    used = {name for d in data for q in d.panel.queries for name in METRIC.findall(q.expr)}
    moved = _moved(prometheus, selector, used, end - start + 1)
    assert moved >= EXERCISED, f"the run did not move {EXERCISED - moved}"
    report, silent, missing = [], [], []
    for panel_data in data:
        panel = panel_data.panel
        for query, result in zip(panel.queries, panel_data.results, strict=True):
            expr = substitute(query.expr, variables)
            prometheus.query(expr, at=end)  # the instant form evaluates too
            report.append(f"{len(result):3} series  {panel.title} [{query.ref_id}]: {expr}")
        active = set(METRIC.findall(" ".join(q.expr for q in panel.queries))) & moved
        if active and not any(_finite_nonzero(s) for s in panel_data.series):
            silent.append(panel.title)
        missing += _counted_but_not_shown(prometheus, selector, panel_data, variables)
    print("\n".join(["dashboard queries over the run:", *report]))
    assert silent == [], f"panels whose metrics moved but show no value: {silent}"
    assert missing == [], f"counted by the worker, never shown on the dashboard: {missing}"
    return report


def test_every_panel_query_and_rule_evaluates_on_a_real_prometheus(
    kafka_bootstrap: str,
    worker: WorkerProcess,
    prometheus: PrometheusProcess,
    topics: Topics,
    tmp_path: Path,
) -> None:
    """Every dashboard query and every rule evaluates on a real run; active panels show data."""
    worker.wait_ready()
    scope = {"namespace": prometheus.labels["namespace"], "job": prometheus.job}
    selector = ", ".join(f'{name}="{value}"' for name, value in scope.items())
    # rate() needs a sample from before the traffic, so the counters' first move shows.
    _wait(
        lambda: prometheus.value(f"count_over_time(chat_worker_in_flight{{{selector}}}[1m])") >= 2,
        "two scrapes of the worker",
    )
    start = math.floor(time.time()) - 2

    _run_the_traffic(kafka_bootstrap, topics)

    expected = {"completed": 10, "failed": 1, "invalid": 1}
    outcomes = f"sum by (outcome) (chat_worker_requests_total{{{selector}}}) > 0"
    _wait(
        lambda: (
            {r["metric"]["outcome"]: float(r["value"][1]) for r in prometheus.query(outcomes)}
            == expected
        ),
        f"Prometheus to scrape {expected}",
    )
    # One bad record fires the dead-letter alert (for: 0m); one failure in eleven puts the
    # failure ratio above 5 %, pending for its 10 minutes.
    firing = {"ChatWorkerDeadLetters": "firing", "ChatWorkerHighFailureRatio": "pending"}
    try:
        _wait(lambda: firing.items() <= _alert_states(prometheus).items(), f"alerts {firing}")
    except AssertionError:
        _check_rules(prometheus, scope)  # a rule that cannot be evaluated says so first
        raise
    (dead_letter,) = prometheus.query('ALERTS{alertname="ChatWorkerDeadLetters"}')
    assert dead_letter["metric"]["reason"] == "not_json"
    assert {k: dead_letter["metric"][k] for k in scope} == scope
    _wait_until_idle(prometheus, selector)
    end = math.ceil(time.time())
    _check_rules(prometheus, scope)

    board = load_dashboard()
    variables = _resolve_variables(prometheus, board)
    assert variables == scope
    # Grafana's $__interval for a span this short is its floor, the scrape interval.
    variables["__rate_interval"] = rate_interval(SCRAPE_S, SCRAPE_S)
    data = fetch(prometheus.client, panels(board), variables, start, end, SCRAPE_S)
    assert [d for d in data if d.panel.queries]
    _check_panels(prometheus, data, variables, selector, (start, end))

    caption = (
        f"namespace={scope['namespace']} job={scope['job']}: the run of "
        f"tests/e2e/test_dashboard_on_prometheus.py (12 records), scraped every {SCRAPE_S:g} s "
        f"by Prometheus {prometheus.api('status/buildinfo')['version']}"
    )
    svg = render_svg(board["title"], caption, data, start, end)
    assert ElementTree.fromstring(svg).tag == f"{SVG}svg"
    (tmp_path / "dashboard.svg").write_text(svg)
    if os.environ.get("DASHBOARD_SVG"):
        Path(os.environ["DASHBOARD_SVG"]).write_text(svg)
    # The script's command line draws the same dashboard from the same Prometheus.
    argv = ["--prometheus", prometheus.base_url, "--namespace", scope["namespace"]]
    argv += ["--job", scope["job"], "--minutes", "1", "--scrape-interval", f"{SCRAPE_S:g}"]
    assert main([*argv, "--out", str(tmp_path / "cli.svg")]) == 0
    drawn = ElementTree.parse(tmp_path / "cli.svg").getroot()
    assert {p.title for p in panels(board)} <= {t.text for t in drawn.iter(f"{SVG}text")}
