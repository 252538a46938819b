"""``python -m bench.rocksdb_worker run``: the worker with its table in Faust's RocksDB store.

For ``bench.table_recovery --store rocksdb`` only. The worker keeps ``chat-state`` in memory
(``worker.kafka_adapters.TableStore``); this entry point builds the same worker with Faust's
RocksDB store (``rocksdict``) for the table instead, in the data directory
``BENCH_TABLE_DATADIR``, which outlives the process: a second start finds the first one's
databases and their persisted changelog offsets, as a pod would on a persistent volume.

Only the table's recovery is measured with it. The worker's own table writes and its expiry
sweep use the in-memory store's partition index, which this store does not keep: the bench sends
no requests, its TTL of 30 days puts the first sweep 10 minutes after the start, and a sweep
would find no key's partition and delete nothing.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Any

DATADIR_ENV = "BENCH_TABLE_DATADIR"


def main() -> int:
    datadir = os.environ.get(DATADIR_ENV)
    if not datadir:
        print(f"bench.rocksdb_worker: {DATADIR_ENV} is not set", file=sys.stderr)
        return 2
    try:
        import rocksdict  # noqa: F401  # only its presence is checked here
    except ImportError:
        print(
            "bench.rocksdb_worker: needs rocksdict, which the project does not install:"
            " .venv/bin/pip install rocksdict",
            file=sys.stderr,
        )
        return 2
    _use_rocksdb(Path(datadir))
    from worker.cli import main as worker_main

    return worker_main(sys.argv[1:])


def _use_rocksdb(datadir: Path) -> None:
    """Make every worker built from here on keep its table in RocksDB under ``datadir``."""
    from faust.stores.rocksdb import Store as RocksDBStore

    from worker import runner
    from worker.kafka_adapters import StateTable

    class BenchRocksDBStore(RocksDBStore):
        """Faust's RocksDB store, with the two names the worker reads besides the mapping."""

        @property
        def data(self) -> Any:
            # The chat_worker_conversations gauge counts len(store.data): every key, read
            # from the databases.
            return self

        def partition_of(self, _key: Any) -> int | None:
            return None  # not kept: the expiry sweep skips every key

    def new_store(table: StateTable) -> Any:
        return BenchRocksDBStore(
            "rocksdb://",
            table.app,
            table,
            table_name=table.name,
            key_type=table.key_type,
            key_serializer=table.key_serializer,
            value_serializer=table.value_serializer,
            value_type=table.value_type,
            loop=table.loop,
            options=table.options,
        )

    build_worker = runner.build_worker

    def build_with_datadir(*args: Any, **kwargs: Any) -> Any:
        worker = build_worker(*args, **kwargs)
        with warnings.catch_warnings():
            # Faust warns that the setting was read before; the table's store reads it on use.
            warnings.simplefilter("ignore")
            worker.app.conf.datadir = datadir
        return worker

    StateTable._new_store = new_store  # type: ignore[method-assign]  # noqa: SLF001  the store factory
    runner.build_worker = build_with_datadir


if __name__ == "__main__":
    raise SystemExit(main())
