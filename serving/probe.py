"""A steady load of inference requests, every outcome recorded with its time: what the fault tests and
`bench/cluster_faults.py` drive a service with while a replica or a node goes, and read back as the error
window (first to last failed request) and the failed-request count. Bounded: `max_requests` in all."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np

from serving.client import OipClient, OipError

#: what a request that got no HTTP answer (refused connection, timeout) is recorded as
NO_ANSWER = 0


@dataclass(frozen=True)
class Outcome:
    started: float  # time.monotonic() when the request was sent
    seconds: float
    status: int  # 200, the HTTP error status, or NO_ANSWER


@dataclass
class LoadProbe:
    """`clients` threads, each sending `frames` to `model` back to back until stopped or `max_requests` were sent."""

    url: str
    model: str
    frames: np.ndarray
    clients: int = 2
    max_requests: int = 20_000
    timeout_s: float = 30.0
    outcomes: list[Outcome] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(self.clients)]

    def __enter__(self) -> LoadProbe:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=self.timeout_s * 2)

    def _run(self) -> None:
        client = OipClient(self.url, timeout=self.timeout_s)
        while not self._stop.is_set():
            with self._lock:
                if len(self.outcomes) >= self.max_requests:
                    return
            started = time.monotonic()
            status = 200
            try:
                client.infer(self.model, {"frames": self.frames}, {"labels": True})
            except OipError as exc:
                status = exc.status or NO_ANSWER
            except OSError:
                status = NO_ANSWER
            with self._lock:
                self.outcomes.append(Outcome(started, time.monotonic() - started, status))

    def snapshot(self) -> list[Outcome]:
        with self._lock:
            return list(self.outcomes)

    def wait_for(self, successes: int, after: float = 0.0, timeout_s: float = 600.0) -> bool:
        """Waits until `successes` requests sent after `after` (monotonic) in a row have succeeded; False if the
        probe stopped or `timeout_s` passed first."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and any(t.is_alive() for t in self._threads):
            if streak(self.snapshot(), after) >= successes:
                return True
            time.sleep(0.1)
        return False

    def summary(self, since: float) -> dict:
        """Requests sent from `since` on: how many, how many failed (by status), and the error window."""
        sent = [o for o in self.snapshot() if o.started >= since]
        failed = [o for o in sent if o.status != 200]
        window = (max(o.started + o.seconds for o in failed) - min(o.started for o in failed)) if failed else 0.0
        statuses: dict[int, int] = {}
        for outcome in failed:
            statuses[outcome.status] = statuses.get(outcome.status, 0) + 1
        return {"requests": len(sent), "failed": len(failed), "failed_by_status": statuses,
                "error_window_s": window, "p50_ms": _median_ms(sent), "max_ms": max((o.seconds for o in sent),
                                                                                    default=0.0) * 1000}


def streak(outcomes: list[Outcome], after: float) -> int:
    """How many of the latest requests sent after `after` succeeded in a row."""
    count = 0
    for outcome in sorted((o for o in outcomes if o.started >= after), key=lambda o: o.started, reverse=True):
        if outcome.status != 200:
            break
        count += 1
    return count


def _median_ms(outcomes: list[Outcome]) -> float:
    return float(np.median([o.seconds for o in outcomes])) * 1000 if outcomes else float("nan")
