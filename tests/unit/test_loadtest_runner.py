"""The generator in virtual time: open loop never waits for answers, closed loop counts, drain."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Sequence

import pytest

from loadtest.clients import Answer
from loadtest.fleet import share
from loadtest.runner import Generator, Histogram, Records
from loadtest.scenario import ClosedLoad
from loadtest.shapes import Arrival


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds


class FakeClient:
    """Answers through the event loop, as real clients do, after a virtual service time."""

    error_samples: dict[str, str]

    def __init__(
        self,
        clock: FakeClock,
        service_s: float = 0.0,
        labels: Callable[[int], Sequence[int] | None] = lambda b: [b],
        error: Callable[[int], str | None] = lambda n: None,
        hold: int = 0,
    ) -> None:
        self.clock = clock
        self.service_s = service_s
        self.labels = labels
        self.error = error
        self.hold = hold  # keep answers until this many requests are in flight
        self.held: list[tuple[int, Answer]] = []
        self.submitted = 0
        self.error_samples = {}

    async def start(self) -> None:
        pass

    async def check(self) -> str | None:
        return None

    def submit(self, klass: int, batch: int, answer: Answer) -> None:
        self.submitted += 1
        if self.hold:
            self.held.append((batch, answer))
            if len(self.held) == self.hold:
                asyncio.get_running_loop().call_soon(self._release)
            return
        asyncio.get_running_loop().call_soon(self._answer, self.submitted, batch, answer)

    def _answer(self, n: int, batch: int, answer: Answer) -> None:
        self.clock.now += self.service_s
        err = self.error(n)
        answer(err, None if err else self.labels(batch))

    def _release(self) -> None:
        self.clock.now = 10.0
        for batch, answer in self.held:
            answer(None, [batch])

    def queued(self) -> int:
        return 0

    async def close(self) -> None:
        pass


def run(
    client: FakeClient,
    clock: FakeClock,
    arrivals: list[Arrival] | None = None,
    closed: ClosedLoad | None = None,
    max_requests: int = 1_000_000,
    drain_timeout_s: float = 5.0,
) -> tuple[Generator, Records]:
    stream = iter(arrivals) if arrivals is not None else (Arrival(0.0, 0, 1) for _ in iter(int, 1))
    gen = Generator(
        client,
        [[b] for b in range(4)],
        arrivals=stream,
        closed=closed,
        duration_s=closed.duration_s if closed else 1.0,
        max_requests=max_requests,
        drain_timeout_s=drain_timeout_s,
        clock=clock,
        sleep=clock.sleep,
    )
    records = asyncio.run(gen.run(start_at=0.0))
    return gen, records


def test_open_loop_sends_on_schedule_while_answers_are_outstanding() -> None:
    clock = FakeClock()
    arrivals = [Arrival(i * 0.1, 0, i % 4) for i in range(20)]
    client = FakeClient(clock, hold=20)  # no answer at all until every request is out
    gen, rec = run(client, clock, arrivals)
    assert client.submitted == 20 and len(rec) == 20
    assert list(rec.lag) == [0.0] * 20
    # Latency counts from the intended send time, so early requests waited longest.
    assert sorted(rec.latency, reverse=True) == pytest.approx([10.0 - i * 0.1 for i in range(20)])
    assert list(rec.correct) == [1] * 20
    assert gen.ok == 20 and gen.errors == 0


def test_open_loop_records_lag_when_behind() -> None:
    clock = FakeClock()
    clock.now = 0.5  # the generator starts half a second late
    arrivals = [Arrival(0.0, 0, 0), Arrival(0.25, 0, 1), Arrival(1.0, 0, 2)]
    _, rec = run(FakeClient(clock), clock, arrivals)
    assert list(rec.lag) == [0.5, 0.25, 0.0]
    assert list(rec.intended) == [0.0, 0.25, 1.0]


def test_closed_loop_count_follows_service_time() -> None:
    clock = FakeClock()
    # Every answer advances virtual time by 1/64 s; with 4 clients and a 1 s run, clients stop
    # once the clock reaches 1 s: 4 first requests plus one per answer before that (63).
    load = ClosedLoad(shape="closed", concurrency=4, duration_s=1.0)
    gen, rec = run(FakeClient(clock, service_s=1 / 64), clock, closed=load)
    assert gen.sent == 4 + 63 and len(rec) == 67
    assert all(lag == 0 for lag in rec.lag)
    assert gen.send_window_s == 1.0


def test_closed_loop_stops_at_the_request_cap() -> None:
    clock = FakeClock()
    load = ClosedLoad(shape="closed", concurrency=3, duration_s=100.0)
    gen, rec = run(FakeClient(clock, service_s=0.001), clock, closed=load, max_requests=50)
    assert gen.sent == 50 and len(rec) == 50
    assert gen.send_window_s == pytest.approx(clock.now, abs=0.01)  # cut short by the cap


def test_errors_and_wrong_labels_are_recorded_by_kind() -> None:
    clock = FakeClock()
    arrivals = [Arrival(i * 0.01, i % 2, i % 4) for i in range(8)]
    client = FakeClient(
        clock,
        labels=lambda b: [9],  # always wrong
        error=lambda n: {3: "http_503", 6: "timeout"}.get(n),
    )
    gen, rec = run(client, clock, arrivals)
    kinds = [rec.kinds[k] for k in rec.kind]
    assert kinds.count("http_503") == 1 and kinds.count("timeout") == 1
    assert [c for c, k in zip(rec.correct, kinds, strict=True) if k == "ok"] == [0] * 6
    assert list(rec.klass) == [i % 2 for i in range(8)]
    assert gen.errors == 2 and gen.ok == 6


def test_unanswered_requests_are_written_off_after_the_drain_timeout() -> None:
    clock = FakeClock()
    client = FakeClient(clock, hold=1000)  # never answers
    gen, rec = run(client, clock, [Arrival(0.0, 0, 0), Arrival(0.5, 0, 1)], drain_timeout_s=0.01)
    assert [rec.kinds[k] for k in rec.kind] == ["unfinished", "unfinished"]
    assert gen.errors == 2


def test_unchecked_answers() -> None:
    clock = FakeClock()
    _, rec = run(FakeClient(clock, labels=lambda b: None), clock, [Arrival(0.0, 0, 0)])
    assert list(rec.correct) == [-1]


def test_records_merge_remaps_error_kinds() -> None:
    a, b = Records(), Records()
    a.add(0.0, 0.0, 0.1, a.code("timeout"), 0, 0)
    b.add(1.0, 0.0, 0.2, b.code("http_503"), 1, 0)
    b.add(2.0, 0.0, 0.3, b.code("timeout"), 1, 0)
    a.extend(b)
    assert [a.kinds[k] for k in a.kind] == ["timeout", "http_503", "timeout"]
    assert list(a.intended) == [0.0, 1.0, 2.0]


def test_histogram_quantiles_are_within_bucket_width() -> None:
    hist = Histogram()
    values = [i / 10_000 for i in range(1, 10_001)]  # 0.1 ms .. 1 s, uniform
    for v in values:
        hist.add(v)
    p99 = hist.quantile(0.99)
    assert p99 is not None and math.isclose(p99, 0.99, rel_tol=0.03)
    merged = Histogram.of(hist.counts)
    merged.merge(hist.counts)
    assert merged.quantile(0.5) == pytest.approx(hist.quantile(0.5))
    assert Histogram().quantile(0.5) is None


@pytest.mark.parametrize(("total", "count"), [(10, 3), (7, 7), (5, 2), (1, 4)])
def test_shares_add_up(total: int, count: int) -> None:
    parts = [share(total, i, count) for i in range(count)]
    assert sum(parts) == total and max(parts) - min(parts) <= 1
