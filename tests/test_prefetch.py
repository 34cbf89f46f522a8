"""`prefetch`: batches planned in a background thread arrive in order, errors and early exits propagate."""

import threading
import time

import pytest

from patchscope.atlas.prefetch import prefetch


def test_items_arrive_in_order_and_ahead_of_the_consumer():
    produced = []

    def slow_source():
        for i in range(20):
            produced.append(i)
            yield i

    seen = []
    for item in prefetch(slow_source(), depth=3):
        seen.append(item)
        if item == 0:
            deadline = time.monotonic() + 5
            while len(produced) < 4 and time.monotonic() < deadline:  # the producer runs ahead
                time.sleep(0.01)
            assert len(produced) >= 4
    assert seen == list(range(20))


def test_producer_errors_are_raised_in_the_consumer_after_the_good_items():
    def failing():
        yield 1
        yield 2
        raise ValueError("bad document 3")

    seen = []
    with pytest.raises(ValueError, match="bad document 3"):
        for item in prefetch(failing()):
            seen.append(item)
    assert seen == [1, 2]


def test_closing_early_stops_the_producer():
    def endless():
        i = 0
        while True:
            yield i
            i += 1

    stream = prefetch(endless(), depth=2)
    assert next(stream) == 0
    stream.close()
    assert not any(t.name == "patchscope-prefetch" and t.is_alive() for t in threading.enumerate())
