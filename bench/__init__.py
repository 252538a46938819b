"""The throughput and latency benchmark of the worker (issue 3): ``python -m bench``.

It runs real processes on this machine only (127.0.0.1): a local Kafka broker, the Vapi
simulator, and the worker (``python -m worker run``), the plain-Faust baseline
(``bench/baseline.py``) or a bare aiokafka producer (the raw ceiling). Requests are loaded into
the request topic before the worker starts, so it faces a backlog; a separate consumer reads the
outputs, and every request must end with exactly one completed response whose deltas arrived in
seq order and concatenate to its text, or the bench fails (exit 1).

A broker the bench starts itself is warmed up first (one small untimed run through every path),
as a broker in service would be; the raw ceiling is the best of three runs, so that the share of
it the worker reaches is not flattered by one slow run.

    python -m bench                      # both scenarios with their defaults
    python -m bench --scenario fast --requests 2000
    python -m bench --quick              # a small smoke run of both scenarios
    make bench BENCH_ARGS='--scenario paced'

Modules: ``cli`` (arguments), ``scenarios`` (defaults and targets), ``run`` (one scenario),
``procs`` (broker, simulator and worker processes, CPU/RSS sampling), ``kafka`` (topics, load,
output reader, raw ceiling), ``check`` (correctness and measurements), ``report`` (table, JSON),
``baseline`` (the plain Faust agent).
"""
