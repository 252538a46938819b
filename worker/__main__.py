"""``python -m worker`` is the same as the ``vapi-worker`` command."""

from worker.cli import main

raise SystemExit(main())
