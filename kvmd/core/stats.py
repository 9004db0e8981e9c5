"""Counts of whole-VM operations (snapshots, restores, migrations), kept by the core and read
by the metrics collector at scrape time."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from kvmd.core.histogram import Histogram

# Seconds a VM operation takes: from milliseconds (a small snapshot) to minutes.
OPERATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                     60.0, 300.0)


@dataclass
class OperationStats:
    """Per operation ("snapshot", "restore", ...): counts by (kind, result), bytes moved,
    and a histogram of durations."""

    counts: dict[tuple[str, str, str], int] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, Histogram] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, operation: str, kind: str, result: str, nbytes: int,
               seconds: float) -> None:
        with self._lock:
            key = (operation, kind, result)
            self.counts[key] = self.counts.get(key, 0) + 1
            self.bytes[operation] = self.bytes.get(operation, 0) + nbytes
            hist = self.seconds.get(operation)
            if hist is None:
                hist = self.seconds[operation] = Histogram(OPERATION_BUCKETS)
        hist.observe(seconds)

    def snapshot(self) -> tuple[dict[tuple[str, str, str], int], dict[str, int],
                                dict[str, Histogram]]:
        with self._lock:
            return dict(self.counts), dict(self.bytes), dict(self.seconds)


# Seconds a migrated VM was paused for its switch-over: from a millisecond to seconds.
DOWNTIME_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


@dataclass
class MigrationStats:
    """Completed outgoing migrations: their downtimes and pre-copy rounds."""

    downtime: Histogram = field(default_factory=lambda: Histogram(DOWNTIME_BUCKETS))
    rounds_total: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, downtime_seconds: float, rounds: int) -> None:
        with self._lock:
            self.rounds_total += rounds
        self.downtime.observe(downtime_seconds)
