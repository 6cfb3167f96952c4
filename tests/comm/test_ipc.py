"""The backend-process messages and completion records (comm/_ipc.py): pure
encode/decode on bytes and buffers, no sockets."""

from __future__ import annotations

import pytest

from comm import CommError, ConfigError, RequestTimeout, _ipc


def test_attach_carries_the_ring_path_and_old_style_attach_has_none():
    msg = _ipc.encode_attach(4242, 16, "/tmp/pagecomm-ring-x/ring")
    assert _ipc.decode_attach(msg) == (4242, 16, "/tmp/pagecomm-ring-x/ring")
    assert _ipc.decode_attach(_ipc.encode_attach(7, 1)) == (7, 1, "")


@pytest.mark.parametrize("msg, why", [
    (_ipc.encode_attach(1, 0), "slots"),
    (_ipc.encode_attach(1, _ipc.MAX_SLOTS + 1), "slots"),
    (_ipc.encode_attach(1, 4) + b"\xff\xfe", "UTF-8"),
    (_ipc.encode_attach(1, 4) + b"x" * 5000, "ring path"),
    (b"A\x01", "truncated"),
])
def test_bad_attach_messages_are_ipc_errors_that_say_why(msg, why):
    with pytest.raises(_ipc.IpcError, match=why):
        _ipc.decode_attach(msg)


def test_a_completion_round_trips_through_the_slot_header():
    slots = 4
    buf = memoryview(bytearray(_ipc.segment_bytes(slots)))
    ok = _ipc.Done(3, 0xFFFFFFFF, _ipc.OK, True, 32, 1 << 40)
    _ipc.write_completion(buf, slots, ok)
    assert _ipc.read_completion(buf, slots, 3) == ok
    err = _ipc.Done(1, 9, _ipc.status_of(RequestTimeout("x")), False, 0, 0, "late é" * 300)
    _ipc.write_completion(buf, slots, err)
    got = _ipc.read_completion(buf, slots, 1)
    assert (got.slot, got.use, got.status) == (1, 9, err.status)
    assert len(got.message.encode()) <= 1024 and got.message.startswith("late é")
    assert isinstance(_ipc.error_of(got.status, got.message), RequestTimeout)
    assert _ipc.read_completion(buf, slots, 3) == ok  # slots do not overlap


def test_a_corrupt_or_out_of_range_completion_is_an_ipc_error():
    slots = 2
    buf = memoryview(bytearray(_ipc.segment_bytes(slots)))
    with pytest.raises(_ipc.IpcError, match="slot 2 of 2"):
        _ipc.read_completion(buf, slots, 2)
    _ipc.write_completion(buf, slots, _ipc.Done(0, 1, 200, False, 0, 0))
    with pytest.raises(_ipc.IpcError, match="status 200"):
        _ipc.read_completion(buf, slots, 0)
    _ipc.write_completion(buf, slots, _ipc.Done(0, 1, _ipc.OK, False, 33, 0))
    with pytest.raises(_ipc.IpcError, match="33 pages"):
        _ipc.read_completion(buf, slots, 0)
    assert issubclass(_ipc.IpcError, CommError)


def test_rings_decode_whole_rings_only():
    data = _ipc.encode_ring(5, 1) + _ipc.encode_ring(0, 0xFFFFFFFF)
    assert len(data) == 2 * _ipc.RING_BYTES
    assert _ipc.decode_rings(data) == [(5, 1), (0, 0xFFFFFFFF)]
    assert _ipc.decode_rings(b"") == []
    with pytest.raises(_ipc.IpcError, match="not whole rings"):
        _ipc.decode_rings(data[:-1])


@pytest.mark.parametrize("pid", [0, 2**31, 2**32 - 1])
def test_an_attach_naming_a_pid_outside_pid_t_is_an_ipc_error(pid):
    """0 would make os.kill signal the process group; 2**31 and up overflow it."""
    with pytest.raises(_ipc.IpcError, match=f"pid {pid}"):
        _ipc.decode_attach(_ipc.encode_attach(pid, 4))
    assert _ipc.decode_attach(_ipc.encode_attach(2**31 - 1, 4)) == (2**31 - 1, 4, "")


def test_control_calls_and_replies_carry_the_call_sequence_number():
    seq, eps, stripe = _ipc.decode_shards(_ipc.encode_shards(7, ["tcp://h:1", "ipc://x"], 8))
    assert (seq, eps, stripe) == (7, ["tcp://h:1", "ipc://x"], 8)
    assert _ipc.control_seq(_ipc.encode_stats(0xFFFFFFFF)) == 0xFFFFFFFF
    assert _ipc.control_seq(_ipc.encode_shards(9, [], 0)) == 9
    assert _ipc.decode_control_reply(_ipc.encode_control_reply(b"t", 3, b"{}")) == \
        (3, _ipc.OK, b"{}")
    with pytest.raises(_ipc.IpcError, match="truncated"):
        _ipc.control_seq(b"T")


def test_a_control_error_reply_keeps_the_error_class_and_names_any_other():
    seq, status, body = _ipc.decode_control_reply(
        _ipc.encode_control_reply(b"s", 4, error=ConfigError("stripe_size cannot change")))
    assert seq == 4 and type(_ipc.error_of(status, body.decode())) is ConfigError
    seq, status, body = _ipc.decode_control_reply(
        _ipc.encode_control_reply(b"s", 5, error=RuntimeError("boom")))
    e = _ipc.error_of(status, body.decode())
    assert type(e) is CommError and str(e) == "RuntimeError: boom"


@pytest.mark.timeout(30)
def test_process_gone_sees_a_zombie_and_refuses_pids_outside_pid_t():
    import os
    import time

    from comm._procutil import process_gone

    assert not process_gone(os.getpid())
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    try:
        end = time.monotonic() + 10
        while not process_gone(pid):  # a zombie until waited for: os.kill still works
            assert time.monotonic() < end, "a zombie counted as alive"
            time.sleep(0.01)
        os.kill(pid, 0)  # it is one: not reaped yet
    finally:
        os.waitpid(pid, 0)
    assert process_gone(pid)
    for bad in (0, -1, 2**31):
        with pytest.raises(ValueError, match="pid"):
            process_gone(bad)
