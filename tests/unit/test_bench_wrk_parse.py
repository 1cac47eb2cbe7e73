"""The wrk output parser and script writer of `loadtest.wrk`, on output captured from real runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from loadtest.wrk import WrkError, parse_wrk_output, write_script

# wrk 4.1.0 against the gateway at one connection, with the bench's Lua script (BENCH_JSON line).
GATEWAY_C1 = """\
Running 3s test @ http://127.0.0.1:41937/v2/models/digits/infer
  1 threads and 1 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.49ms    1.55ms  20.69ms   91.09%
    Req/Sec   822.50    200.82     1.07k    56.67%
  Latency Distribution
     50%    0.98ms
     75%    1.17ms
     90%    2.80ms
     99%    7.74ms
  2463 requests in 3.01s, 1.42MB read
Requests/sec:    818.60
Transfer/sec:    484.45KB
BENCH_JSON {"requests":2463,"duration_us":3008788,"status":0,"connect":0,"read":0,"write":0,\
"timeout":0,"mean_us":1485.1,"max_us":20695,"p50_us":984,"p90_us":2798,"p99_us":7745,\
"p999_us":18253}
"""

# wrk without a script (a GET): microsecond units, no BENCH_JSON line.
PLAIN_GET = """\
Running 1s test @ http://127.0.0.1:41937/v2/health/live
  1 threads and 1 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   675.92us    1.60ms  16.45ms   90.78%
    Req/Sec     6.73k     3.61k   10.84k    60.00%
  Latency Distribution
     50%  102.00us
     75%  203.00us
     90%    2.15ms
     99%    8.79ms
  6689 requests in 1.00s, 0.88MB read
Requests/sec:   6686.23
Transfer/sec:      0.88MB
"""

# An unknown model: every answer is a 404.
NOT_FOUND = """\
Running 1s test @ http://127.0.0.1:41937/v2/models/nosuch/infer
  1 threads and 2 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.19ms    1.97ms  13.19ms   88.61%
    Req/Sec     3.59k     1.56k    4.94k    70.00%
  Latency Distribution
     50%  398.00us
     75%  697.00us
     90%    3.70ms
     99%    9.31ms
  3575 requests in 1.00s, 740.14KB read
  Non-2xx or 3xx responses: 3575
Requests/sec:   3559.92
Transfer/sec:    737.02KB
BENCH_JSON {"requests":3575,"duration_us":1004235,"status":3575,"connect":0,"read":0,"write":0,\
"timeout":0,"mean_us":1191.8,"max_us":13188,"p50_us":398,"p90_us":3696,"p99_us":9311,\
"p999_us":12677}
"""

# Ray Serve at 32 connections: latencies in seconds (wrk pads the unit with a space).
RAY_C32 = """\
Running 3s test @ http://127.0.0.1:41395/v2/models/digits/infer
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.26s   254.30ms   1.66s    67.14%
    Req/Sec    49.77     58.46   212.00     92.31%
  Latency Distribution
     50%    1.26s \n\
     75%    1.49s \n\
     90%    1.60s \n\
     99%    1.66s \n\
  70 requests in 3.00s, 39.03KB read
Requests/sec:     23.30
Transfer/sec:     12.99KB
"""

# Ray Serve at 48 connections with --timeout 1s: socket timeouts, no BENCH_JSON line here.
RAY_TIMEOUTS = """\
Running 2s test @ http://127.0.0.1:41395/v2/models/digits/infer
  1 threads and 48 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   770.97ms  133.18ms 976.44ms   61.54%
    Req/Sec    43.00     48.84   163.00     90.00%
  Latency Distribution
     50%  738.09ms
     75%  824.32ms
     90%  974.48ms
     99%  976.44ms
  58 requests in 2.00s, 32.34KB read
  Socket errors: connect 0, read 0, write 0, timeout 45
Requests/sec:     28.99
Transfer/sec:     16.17KB
"""


def test_exact_percentiles_from_the_script_override_the_rounded_table() -> None:
    result = parse_wrk_output(GATEWAY_C1)
    assert result.rps == pytest.approx(818.60)
    assert result.requests == 2463
    assert result.duration_s == pytest.approx(3.008788)
    assert result.latency_ms["p50"] == pytest.approx(0.984)
    assert result.latency_ms["p75"] == pytest.approx(1.17)  # only in wrk's own table
    assert result.latency_ms["p99"] == pytest.approx(7.745)
    assert result.latency_ms["p99.9"] == pytest.approx(18.253)
    assert result.latency_ms["mean"] == pytest.approx(1.4851)
    assert result.latency_ms["max"] == pytest.approx(20.695)
    assert result.errors == 0
    result.check("gateway")


def test_table_only_output_with_microsecond_units() -> None:
    result = parse_wrk_output(PLAIN_GET)
    assert result.rps == pytest.approx(6686.23)
    assert result.requests == 6689
    assert result.duration_s == pytest.approx(1.0)
    assert result.latency_ms == pytest.approx(
        {"p50": 0.102, "p75": 0.203, "p90": 2.15, "p99": 8.79, "mean": 0.67592, "max": 16.45}
    )
    assert result.socket_errors == {"connect": 0, "read": 0, "write": 0, "timeout": 0}


def test_seconds_units() -> None:
    result = parse_wrk_output(RAY_C32)
    assert result.latency_ms["p50"] == pytest.approx(1260.0)
    assert result.latency_ms["p99"] == pytest.approx(1660.0)
    assert result.latency_ms["max"] == pytest.approx(1660.0)
    assert result.rps == pytest.approx(23.30)


def test_error_statuses_are_counted_and_fail_the_check() -> None:
    result = parse_wrk_output(NOT_FOUND)
    assert result.non_2xx == 3575
    with pytest.raises(WrkError, match="3575 responses with status >= 400"):
        result.check("gateway")


def test_socket_errors_are_counted_and_fail_the_check() -> None:
    result = parse_wrk_output(RAY_TIMEOUTS)
    assert result.socket_errors == {"connect": 0, "read": 0, "write": 0, "timeout": 45}
    assert result.errors == 45
    with pytest.raises(WrkError, match="timeout"):
        result.check("ray")


def test_output_without_a_summary_is_an_error() -> None:
    with pytest.raises(WrkError, match="cannot parse"):
        parse_wrk_output("unable to connect to 127.0.0.1:1 Connection refused\n")


def test_script_posts_the_body_file_with_the_headers(tmp_path: Path) -> None:
    body = b'{"inputs":[]}' + bytes(range(8))
    script = write_script(
        tmp_path,
        "infer",
        body,
        {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": "13"},
    )
    text = script.read_text()
    assert (tmp_path / "infer.body").read_bytes() == body
    assert 'wrk.method = "POST"' in text
    assert f'io.open([[{(tmp_path / "infer.body").resolve()}]], "rb")' in text
    assert 'wrk.headers["Inference-Header-Content-Length"] = "13"' in text
    assert 'wrk.headers["Content-Type"] = "application/octet-stream"' in text
    assert "latency:percentile(99.9)" in text


def test_a_row_splits_the_servers_cpu_into_its_loop_and_the_rest() -> None:
    from loadtest.bench_clients import LoadResult
    from loadtest.bench_report import brief, row

    result = LoadResult(1000, 1.0, 1000.0, {"p50": 1.0, "p99": 2.0}, 0, None, 0.1)
    cpu = {"server_cores": 1.1, "server_loop_cores": 0.8, "generator_cores": 0.1}
    r = row(result, cpu)
    assert r["server_cpu_ms_per_request"] == 1.1
    assert r["server_loop_cpu_ms_per_request"] == 0.8
    assert "cores server 1.10 (loop 0.80) gen 0.10" in brief(r)


def test_a_threads_cpu_is_read_from_proc() -> None:
    import os
    import time

    from loadtest.peers import thread_cpu_seconds

    before = thread_cpu_seconds(os.getpid(), os.getpid())
    end = time.process_time() + 0.05
    while time.process_time() < end:  # bounded busy work on this (the main) thread
        pass
    assert thread_cpu_seconds(os.getpid(), os.getpid()) > before
    assert thread_cpu_seconds(os.getpid(), 2**22 + 7) == 0.0  # no such thread


@pytest.mark.parametrize(("low", "verdict"), [(1, True), (32, None)])
def test_the_c1_overhead_goal_is_judged_only_when_c1_was_measured(
    low: int, verdict: bool | None
) -> None:
    from loadtest.bench_report import GOALS, goals

    doc = {
        "ratios": {key: None for _, key, _, _ in GOALS if key != "overhead"},
        "overhead_p50_ms_vs_floor": 0.4,
        "overheads_p50_ms_vs_floor": {"concurrency": low},
    }
    [overhead] = [g for g in goals(doc) if "c=1" in g.name]
    assert overhead.passed is verdict
