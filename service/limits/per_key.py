"""What one key may hold at once, per API process: a request rate and open event streams (429s)."""

import threading
import time
from collections import defaultdict

from service.problems import ProblemError


class RateLimiter:
    """A token bucket per key: `per_minute` requests a minute, bursts up to a minute's worth. Per API
    process (a deployment with N API processes allows N times as much)."""

    def __init__(self, per_minute: int):
        self.per_minute = per_minute
        self._buckets: dict[int, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, key_id: int) -> None:
        if self.per_minute <= 0:
            return
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(key_id, (float(self.per_minute), now))
            tokens = min(float(self.per_minute), tokens + (now - last) * self.per_minute / 60)
            if tokens < 1:
                self._buckets[key_id] = (tokens, now)
                wait = int((1 - tokens) * 60 / self.per_minute) + 1
                raise ProblemError(429, f"more than {self.per_minute} requests a minute with this key; slow down",
                                   code="rate_limited", headers={"Retry-After": str(wait)})
            self._buckets[key_id] = (tokens - 1, now)


class StreamSlots:
    """Open event streams per key (per API process)."""

    def __init__(self, per_key: int):
        self.per_key = per_key
        self._open: dict[int, int] = defaultdict(int)
        self._lock = threading.Lock()

    def acquire(self, key_id: int):
        """Take a slot; returns its release function, which may be called any number of times."""
        with self._lock:
            if self._open[key_id] >= self.per_key:
                raise ProblemError(429, f"this key already has {self.per_key} open event streams "
                                        "(CONSA_MAX_STREAMS_PER_KEY); close one or page with ?after=",
                                   code="too_many_streams", headers={"Retry-After": "5"})
            self._open[key_id] += 1
        released = threading.Event()

        def release() -> None:
            with self._lock:
                if not released.is_set():
                    released.set()
                    self._open[key_id] -= 1

        return release

    def open(self, key_id: int) -> int:
        return self._open.get(key_id, 0)
