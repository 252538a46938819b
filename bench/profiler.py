"""``python -m bench.profiler OUT.prof -m MODULE [ARGS...]``: cProfile on the main thread's CPU.

``python -m cProfile`` times functions with a wall clock, so on a busy machine a function that was
merely preempted looks expensive. This runs the module under ``cProfile.Profile(time.thread_time)``
instead: what each function costs in CPU of the main thread (the event loop), which is what limits
an asyncio worker. Other threads (Faust's consumer thread) are not profiled. The profile is written
when the module exits, also through ``SystemExit`` (Faust exits the process that way) or SIGTERM.

    python -m bench.profiler .run/worker.prof -m worker run
    python -c "import pstats; pstats.Stats('.run/w.prof').sort_stats('tottime').print_stats(30)"
"""

from __future__ import annotations

import cProfile
import runpy
import signal
import sys
import time
from types import FrameType


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "-m":
        print(__doc__, file=sys.stderr)
        return 2
    out, module, rest = argv[0], argv[2], argv[3:]
    sys.argv = [module, *rest]
    profile = cProfile.Profile(time.thread_time)

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(143)

    # Faust installs its own SIGTERM handler; this one only covers the time before it does.
    signal.signal(signal.SIGTERM, on_term)
    code = 0
    profile.enable()
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 0
    finally:
        profile.disable()
        profile.dump_stats(out)
    return code


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
