import threading

import pytest

from comm import Cancelled, InvalidStateError, Slot, SlotState


def armed() -> Slot:
    s = Slot(0, 1, "test")
    s.arm(1, 0, None, (7,), 100, 100, 1e18, 0)
    return s


def test_complete_then_take():
    s = armed()
    assert s.state == SlotState.PENDING
    assert s.complete(("page",))
    assert s.wait(1)
    assert s.take() == ("page",)
    assert s.state == SlotState.FREE


def test_fail_raises_in_taker():
    s = armed()
    s.fail(KeyError("x"))
    assert s.wait(1)
    with pytest.raises(KeyError):
        s.take()
    assert s.state == SlotState.FREE


def test_set_twice_is_an_error():
    s = armed()
    s.complete(1)
    with pytest.raises(InvalidStateError):
        s.complete(2)
    with pytest.raises(InvalidStateError):
        s.fail(RuntimeError())


def test_arm_twice_is_an_error():
    s = armed()
    with pytest.raises(InvalidStateError):
        s.arm(1, 0, None, (7,), 100, 100, 1e18, 0)


def test_wait_times_out_then_abandon_then_worker_frees():
    s = armed()
    assert not s.wait(0.01)
    assert s.abandon()
    assert s.state == SlotState.ABANDONED
    assert s.complete(("late",)) is False  # nobody waits: reclaimed, nothing delivered
    assert s.state == SlotState.FREE and s.result is None


def test_abandon_after_completion_returns_result():
    s = armed()
    assert not s.wait(0.0)
    s.complete(("page",))
    assert s.abandon() is False
    assert s.take() == ("page",)


@pytest.mark.timeout(10)
def test_cancel_wakes_waiter_from_another_thread():
    s = armed()
    threading.Timer(0.05, s.cancel, args=(Cancelled("stop"),)).start()
    assert s.wait(5)
    assert s.state == SlotState.ABANDONED and isinstance(s.error, Cancelled)
    s.fail(RuntimeError("late"))  # the worker lets go later
    assert s.state == SlotState.FREE


def test_disarm_after_a_concurrent_cancel_keeps_the_event_armed():
    s = Slot(0, 1, "test")
    s.arm_join(None, 100, 100, 1e18)
    s.add_part()
    s.cancel(Cancelled("from another thread"))  # races the lookup that found nothing
    s.disarm()
    s.arm(1, 0, None, (7,), 100, 100, 1e18, 0)
    assert not s.wait(0.01)  # the next use waits for its own completion
    s.complete(("page",))
    assert s.wait(1) and s.take() == ("page",)
