"""A replica's share of a fleet-wide limit, from the request partitions it owns: pure arithmetic.

Why by partition: replicas never talk to each other, but Kafka tells each of them which request
partitions it owns, and every partition has exactly one owner. So a limit is split over the
*partitions*, not over the replicas (Spark's ``maxRatePerPartition`` is the precedent), and a
replica takes the sum of its partitions' parts. Whatever the number of replicas, the parts of all
owners add up to the limit, and never to more.

* Streams (an integer): the limit ``G`` is spread over ``N`` partitions as evenly as integers
  allow, partition ``p`` getting ``floor(G*(p+1)/N) - floor(G*p/N)``: every part is
  ``floor(G/N)`` or ``ceil(G/N)``, and all ``N`` parts add up to exactly ``G``. Nothing is lost to
  rounding per replica: 12 streams over 8 partitions are parts 1,2,1,2,1,2,1,2, and owners of
  partitions 0-2, 3-5 and 6-7 get 4+5+3 = 12, where flooring ``12*3/8`` per replica would give
  4+4+3 = 11. With ``G >= N`` every partition gets at least one stream, so no owner of a
  partition is left with none (the setting is checked for it).
* Requests per minute (a rate): partition ``p`` gets ``R/N``, a replica ``R * owned / N``.

A partition number outside ``0..N-1`` (a topic that grew after the count was read) gets nothing:
the share errs low, never high.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["partition_quota", "rate_share", "stream_share"]


def partition_quota(limit: int, partition: int, partitions: int) -> int:
    """Partition ``partition``'s part of ``limit`` streams spread over ``partitions`` partitions."""
    if limit < 0 or partitions < 1:
        raise ValueError(f"need limit >= 0 and partitions >= 1, got {limit}, {partitions}")
    if not 0 <= partition < partitions:
        return 0
    return limit * (partition + 1) // partitions - limit * partition // partitions


def stream_share(limit: int, owned: Iterable[int], partitions: int) -> int:
    """The streams a replica owning ``owned`` (partition numbers) may run of ``limit``."""
    return sum(partition_quota(limit, p, partitions) for p in set(owned))


def rate_share(per_minute: float, owned: Iterable[int], partitions: int) -> float:
    """The requests per minute a replica owning ``owned`` may make of ``per_minute``."""
    if per_minute < 0 or partitions < 1:
        raise ValueError(
            f"need per_minute >= 0 and partitions >= 1, got {per_minute}, {partitions}"
        )
    count = sum(1 for p in set(owned) if 0 <= p < partitions)
    return per_minute * count / partitions
