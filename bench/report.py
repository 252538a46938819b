"""The table (stdout) and its JSON twin (``.run/bench-<timestamp>.json``)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from bench.run import CeilingResult, ScenarioResult, SystemResult
from bench.scenarios import (
    FAST_MIN_CEILING_SHARE,
    PACED_MAX_P99_MS,
    PACED_MIN_PEAK_STREAMS,
    PACED_MIN_REQUEST_RATE_RATIO,
)


@dataclass(frozen=True)
class Row:
    """One line of the table; ``target`` and ``result`` are empty for plain measurements."""

    metric: str
    worker: str
    baseline: str = ""
    ceiling: str = ""
    target: str = ""
    result: str = ""


HEADERS = Row("metric", "worker", "baseline", "raw ceiling", "target", "result")


@dataclass(frozen=True)
class TargetCheck:
    """One target of issue 3 and how the run did against it."""

    scenario: str
    name: str
    target: str
    measured: float
    passed: bool


@dataclass
class _Judge:
    """Turns measurements into target and result cells, and keeps the checks for the JSON."""

    scenario: str
    judged: bool
    checks: list[TargetCheck] = field(default_factory=list)

    def __call__(
        self, name: str, target: str, measured: float, passed: bool, shown: str
    ) -> tuple[str, str]:
        if not self.judged:
            return target, "- (smoke run)"
        self.checks.append(TargetCheck(self.scenario, name, target, measured, passed))
        return target, f"{'PASS' if passed else 'MISS'} ({shown})"


def _num(value: float | None, digits: int = 1) -> str:
    return "" if value is None else f"{value:,.{digits}f}"


def _of(result: SystemResult | None, attr: str, digits: int = 1) -> str:
    return "" if result is None else _num(float(getattr(result, attr)), digits)


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else float("inf")


def _size_rows(w: SystemResult, b: SystemResult | None, c: CeilingResult | None) -> list[Row]:
    return [
        Row(
            "requests / deltas",
            f"{w.requests:,} / {w.deltas:,}",
            "" if b is None else f"{b.requests:,} / {b.deltas:,}",
            "" if c is None else f"- / {c.records:,}",
        ),
        Row(
            "window (s), first call to last response",
            _num(w.window_s, 2),
            _of(b, "window_s", 2),
            "" if c is None else _num(c.seconds, 2),
        ),
    ]


def _rate_rows(result: ScenarioResult, judge: _Judge) -> list[Row]:
    w, b, c = result.worker, result.baseline, result.ceiling
    paced, fast = result.scenario.name == "paced", result.scenario.name == "fast"
    target = verdict = ""
    if b is not None:
        ratio = _ratio(w.requests_per_s, b.requests_per_s)
        target, verdict = "", f"{ratio:,.0f}x baseline"
        if paced:
            target, verdict = judge(
                "request_rate_vs_baseline",
                f">= {PACED_MIN_REQUEST_RATE_RATIO:g}x baseline",
                ratio,
                ratio >= PACED_MIN_REQUEST_RATE_RATIO,
                f"{ratio:,.1f}x",
            )
    requests = Row(
        "requests/s sustained",
        _num(w.requests_per_s, 2),
        _of(b, "requests_per_s", 3),
        "",
        target,
        verdict,
    )
    target = verdict = ""
    notes = []
    if c is not None:
        share = _ratio(w.deltas_per_s, c.deltas_per_s)
        if fast:
            target, verdict = judge(
                "delta_rate_vs_ceiling",
                f">= {FAST_MIN_CEILING_SHARE:.0%} of ceiling",
                share,
                share >= FAST_MIN_CEILING_SHARE,
                f"{share:.1%}",
            )
        else:
            notes.append(f"{share:.1%} of ceiling")
    if b is not None:
        notes.append(f"{_ratio(w.deltas_per_s, b.deltas_per_s):,.0f}x baseline")
    deltas = Row(
        "deltas/s sustained",
        _num(w.deltas_per_s, 0),
        _of(b, "deltas_per_s", 1),
        "" if c is None else _num(c.deltas_per_s, 0),
        target,
        "; ".join([verdict, *notes] if verdict else notes),
    )
    return [requests, deltas]


def _stream_rows(result: ScenarioResult, judge: _Judge) -> list[Row]:
    w, b = result.worker, result.baseline
    target = verdict = ""
    if result.scenario.name == "paced":
        target, verdict = judge(
            "peak_streams_in_flight",
            f">= {PACED_MIN_PEAK_STREAMS}",
            w.peak_streams_in_flight,
            w.peak_streams_in_flight >= PACED_MIN_PEAK_STREAMS,
            str(w.peak_streams_in_flight),
        )
    peak = "" if b is None else str(b.peak_streams_in_flight)
    return [
        Row("streams in flight, peak", str(w.peak_streams_in_flight), peak, "", target, verdict)
    ]


def _latency_rows(result: ScenarioResult, judge: _Judge) -> list[Row]:
    w, b = result.worker, result.baseline
    target = verdict = ""
    if result.scenario.name == "paced":
        target, verdict = judge(
            "delta_p99_added_latency_ms",
            f"< {PACED_MAX_P99_MS:g} ms",
            w.latency_p99_ms,
            w.latency_p99_ms < PACED_MAX_P99_MS,
            f"{w.latency_p99_ms:,.1f} ms",
        )
    return [
        Row("added latency/delta p50 (ms)", _num(w.latency_p50_ms), _of(b, "latency_p50_ms")),
        Row(
            "added latency/delta p99 (ms)",
            _num(w.latency_p99_ms),
            _of(b, "latency_p99_ms"),
            "",
            target,
            verdict,
        ),
        Row("added latency/delta max (ms)", _num(w.latency_max_ms), _of(b, "latency_max_ms")),
        Row("  simulator->worker p50 / p99 (ms)", _split(w, "receive"), _split(b, "receive")),
        Row("  worker->reader p50 / p99 (ms)", _split(w, "publish"), _split(b, "publish")),
    ]


def _split(result: SystemResult | None, part: str) -> str:
    if result is None:
        return ""
    p50, p99 = getattr(result, f"{part}_p50_ms"), getattr(result, f"{part}_p99_ms")
    return f"{p50:,.1f} / {p99:,.1f}"


def _cpu(result: SystemResult) -> str:
    broker = "?" if result.broker_cpu_s is None else f"{result.broker_cpu_s:.1f}"
    return (
        f"{result.cpu_s:.1f} / {result.simulator_cpu_s:.1f} / {broker} / {result.bench_cpu_s:.1f}"
    )


def _ceiling_cpu(result: CeilingResult) -> str:
    broker = "?" if result.broker_cpu_s is None else f"{result.broker_cpu_s:.1f}"
    return f"{result.producer_cpu_s:.1f} / - / {broker} / -"


def _busy(result: SystemResult) -> str:
    return f"{result.machine_busy_cores:.2f} ({result.other_processes_cores:.2f})"


def _resource_rows(w: SystemResult, b: SystemResult | None, c: CeilingResult | None) -> list[Row]:
    rows = [
        Row(
            "CPU s per 1,000 deltas",
            _num(w.cpu_s_per_1000_deltas, 3),
            _of(b, "cpu_s_per_1000_deltas", 3),
        ),
        Row("peak RSS (MiB)", _num(w.peak_rss_mib), _of(b, "peak_rss_mib")),
        Row(
            "CPU s: process/simulator/broker/reader",
            _cpu(w),
            "" if b is None else _cpu(b),
            "" if c is None else _ceiling_cpu(c),
        ),
        Row("machine busy, cores (others' share)", _busy(w), "" if b is None else _busy(b)),
    ]
    if w.retried_requests or (b is not None and b.retried_requests):
        retried = "" if b is None else str(b.retried_requests)
        rows.append(Row("requests retried", str(w.retried_requests), retried))
    return rows


def scenario_rows(result: ScenarioResult, judged: bool) -> tuple[list[Row], list[TargetCheck]]:
    """The rows of one scenario and the targets it was judged by (none when not ``judged``)."""
    judge = _Judge(result.scenario.name, judged)
    w, b, c = result.worker, result.baseline, result.ceiling
    rows = [
        *_size_rows(w, b, c),
        *_rate_rows(result, judge),
        *_stream_rows(result, judge),
        *_latency_rows(result, judge),
        *_resource_rows(w, b, c),
    ]
    return rows, judge.checks


def render(results: Sequence[ScenarioResult], judged: bool) -> tuple[str, list[TargetCheck]]:
    """The whole table as text, and every target check."""
    sections: list[tuple[ScenarioResult, list[Row]]] = []
    checks: list[TargetCheck] = []
    for result in results:
        rows, found = scenario_rows(result, judged)
        sections.append((result, rows))
        checks += found
    names = [f.name for f in fields(Row)]
    every = [HEADERS, *(row for _, rows in sections for row in rows)]
    widths = [max(len(getattr(row, name)) for row in every) for name in names]

    def line(row: Row) -> str:
        cells = [getattr(row, name) for name in names]
        numbers = [cell.rjust(width) for cell, width in zip(cells[1:4], widths[1:4], strict=True)]
        return "  ".join([cells[0].ljust(widths[0]), *numbers, cells[4].ljust(widths[4]), cells[5]])

    rule = "-" * (sum(widths) + 2 * (len(widths) - 1))
    out = [line(HEADERS).rstrip(), rule]
    for result, rows in sections:
        out.append(f"[{result.scenario.name}] {result.scenario.describe()}")
        out += [line(row).rstrip() for row in rows]
        out.append(rule)
    return "\n".join(out), checks


def write_json(
    path: Path,
    results: Sequence[ScenarioResult],
    table: str,
    checks: Sequence[TargetCheck],
    extra: dict[str, Any],
) -> None:
    """The same numbers as the table, machine-readable."""
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {
        **extra,
        "cpus": os.cpu_count(),
        "scenarios": [result.to_json() for result in results],
        "targets": [asdict(check) for check in checks],
        "table": table.splitlines(),
    }
    path.write_text(json.dumps(document, indent=2) + "\n")
