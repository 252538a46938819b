"""``python -m worker.simulator``: the simulator alone, without the worker's settings."""

import argparse

from worker.simulator.cli import add_arguments, run

parser = argparse.ArgumentParser(
    prog="python -m worker.simulator", description="Serve the Vapi /chat simulator."
)
add_arguments(parser)
raise SystemExit(run(parser.parse_args()))
