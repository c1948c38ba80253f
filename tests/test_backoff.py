"""node.backoff: growing refusal of a failing address, one log line per back-off, bounded memory."""
from __future__ import annotations

import logging

import pytest

from node.backoff import Backoff


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock():
    return Clock()


def test_threshold_then_doubling_up_to_max(clock):
    b = Backoff("test", threshold=3, initial_s=2, max_s=10, clock=clock)
    assert [b.failure("a") for _ in range(2)] == [0, 0] and b.blocked("a") == 0
    assert b.failure("a") == 2 and b.blocked("a") == 2
    clock.now += 2.5
    assert b.blocked("a") == 0
    assert b.failure("a") == 4
    clock.now += 5
    assert b.failure("a") == 8
    clock.now += 9
    assert b.failure("a") == 10  # capped
    assert b.blocked("b") == 0  # other addresses untouched


def test_failures_while_refused_do_not_lengthen_it(clock):
    """Connections opened before the back-off that fail during it (4 at once) count for nothing."""
    b = Backoff("test", threshold=1, initial_s=2, max_s=100, clock=clock)
    assert b.failure("a") == 2
    assert [b.failure("a") for _ in range(4)] == [0, 0, 0, 0]
    clock.now += 2.1
    assert [b.failure("a") for _ in range(4)] == [4, 0, 0, 0]


def test_success_resets_and_old_failures_are_forgotten(clock):
    b = Backoff("test", threshold=2, initial_s=1, max_s=4, forget_s=60, clock=clock)
    b.failure("a")
    b.success("a")
    assert b.failure("a") == 0  # count started again
    clock.now += 61
    assert b.failure("a") == 0  # the earlier one is forgotten
    assert b.failure("a") == 1


def test_one_log_line_per_backoff_not_per_refused_attempt(clock, caplog):
    b = Backoff("DICOM associations", threshold=2, initial_s=5, clock=clock)
    with caplog.at_level(logging.WARNING, logger="node.backoff"):
        b.failure("10.0.0.5")
        b.failure("10.0.0.5")
        refused = [b.blocked("10.0.0.5") for _ in range(100)]
        clock.now += 6
        b.failure("10.0.0.5")
    assert all(r > 0 for r in refused)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert "10.0.0.5 refused for 5 s after 2 failure(s)" in lines[0] and lines[0].startswith("DICOM associations")
    assert "100 attempt(s) refused during its previous back-off" in lines[1] and "for 10 s" in lines[1]


def test_memory_is_bounded_least_recent_first(clock):
    b = Backoff("test", threshold=1, initial_s=30, max_tracked=100, clock=clock)
    for i in range(10_000):
        b.failure(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}")
    assert len(b) == 100
    assert b.blocked("10.0.39.15") > 0  # the last one (9999) is kept
    assert b.blocked("10.0.0.0") == 0  # the first was dropped


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError):
        Backoff("x", threshold=0)
    with pytest.raises(ValueError):
        Backoff("x", initial_s=10, max_s=5)


def test_an_ipv6_sender_cannot_start_afresh_from_each_address_of_its_64(clock):
    b = Backoff("test", threshold=3, initial_s=2, max_s=10, clock=clock)
    for n in range(3):  # three addresses of one /64: one source
        b.failure(f"2001:db8:1:2::{n + 1:x}")
    assert b.blocked("2001:db8:1:2:ffff::9") == 2 and b.blocked("2001:db8:1:3::1") == 0
    assert len(b) == 1
    for _ in range(3):  # IPv4, and IPv4 mapped into IPv6, are the same one address
        b.failure("::ffff:192.0.2.7")
    assert b.blocked("192.0.2.7") == 2 and b.blocked("192.0.2.8") == 0


def test_a_log_window_writes_one_line_per_host_and_kind_with_the_repeats_counted(caplog):
    from node.backoff import LogWindow

    window = LogWindow(window_s=60)
    with caplog.at_level(logging.WARNING, logger="node.backoff"):
        logged = [window.warning("10.0.0.1", "401", "refused %s", n) for n in range(5)]
        window.warning("10.0.0.2", "401", "refused other")
    assert logged == [True, False, False, False, False]
    assert [r.getMessage() for r in caplog.records] == ["refused 0", "refused other"]
