"""The backend-process messages and completion records (comm/_ipc.py): pure
encode/decode on bytes and buffers, no sockets."""

from __future__ import annotations

import pytest

from comm import CommError, RequestTimeout, _ipc


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
