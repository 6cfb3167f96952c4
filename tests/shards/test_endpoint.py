"""Endpoint checks shared by the communicator (connect) and shards serve (bind)."""

import pytest

from shards._endpoint import endpoint_problem


@pytest.mark.parametrize("ep, connect_ok, bind_ok", [
    ("tcp://127.0.0.1:6400", True, True),
    ("tcp://127.0.0.1:0", False, True),   # a free port: only when binding
    ("tcp://*:6400", False, True),        # every interface: only when binding
    ("tcp://127.0.0.1:*", False, True),
    ("ipc:///tmp/page.ipc", True, True),
    ("inproc://pages", True, True),
    ("tcp://127.0.0.1", False, False),
    ("tcp://127.0.0.1:65536", False, False),
    ("foo://bar", False, False),
    ("tcp://", False, False),
])
def test_connect_and_bind_rules(ep, connect_ok, bind_ok):
    assert (endpoint_problem(ep) is None) == connect_ok
    assert (endpoint_problem(ep, bind=True) is None) == bind_ok
