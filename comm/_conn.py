"""One pipelined connection to a page server, owned by one worker thread.

A DEALER socket with IMMEDIATE set (a send while disconnected fails at once, so the
worker keeps the request queued instead of losing it in a dead pipe) and ZeroMQ's
own reconnect with capped exponential backoff (10 ms doubling to 1 s, for refused
connects; a peer that accepts and then fails the handshake is retried every 10 ms,
ZeroMQ's backoff starts again after each TCP connect). A monitor
socket reports connection state changes, so that a page server that died takes
its in-flight requests with it visibly: the worker retries them at once instead
of waiting for their deadlines. ``reset()`` replaces the socket: the server sees
a new identity, so nothing sent to the old one can come back on the new one.
"""

from __future__ import annotations

import logging
import time

import zmq
from zmq.utils.monitor import recv_monitor_message

from shards._curve import secure_client

log = logging.getLogger(__name__)

_AUTH_FAILED = getattr(zmq, "EVENT_HANDSHAKE_FAILED_AUTH", 0)  # the server refused our key
# "connected" means the ZeroMQ handshake succeeded: a TCP connect alone may be a
# listener that is not a page server (it accepts, then drops the handshake)
_UP = getattr(zmq, "EVENT_HANDSHAKE_SUCCEEDED", zmq.EVENT_CONNECTED)
# the handshake itself failed: with CURVE, most likely not the server's public key
_HANDSHAKE_FAILED = (getattr(zmq, "EVENT_HANDSHAKE_FAILED_PROTOCOL", 0)
                     | getattr(zmq, "EVENT_HANDSHAKE_FAILED_NO_DETAIL", 0))
_EVENTS = (_UP | zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_RETRIED | _AUTH_FAILED
           | _HANDSHAKE_FAILED)
RECONNECT_MIN_MS = 10  # also the pace of a listener that accepts and drops us
RECONNECT_MAX_MS = 1000
CONNECT_TIMEOUT_MS = 2000  # a silently dropped SYN would otherwise take minutes
# log an endpoint not up this long (since its first failed attempt), then again
# every _DOWN_LOG_EVERY seconds while it stays down
_DOWN_FIRST_LOG = 2.0
_DOWN_LOG_EVERY = 60.0


class Connection:
    """Socket plumbing only; every decision about requests stays in the worker."""

    def __init__(self, ctx: zmq.Context, endpoint: str, name: str,
                 curve: tuple[str, str] | None = None) -> None:
        self.ctx, self.endpoint, self.name, self.curve = ctx, endpoint, name, curve
        self.auth_failed = False  # the server refused our CURVE key
        self.handshake_failed = False  # a CURVE handshake failed (the server's key?)
        self.generation = 0  # bumped by reset(): pollers must re-register
        self.connected = False
        self.reconnects = 0
        self.retries = 0  # failed attempts since the connection was last up
        self._down_since: float | None = None  # first failed attempt since then
        self._down_logged = 0.0  # when "cannot connect" was last logged
        self.dealer, self.monitor = self._open()

    def _open(self) -> tuple[zmq.Socket, zmq.Socket]:
        s = self.ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.IMMEDIATE, 1)
        s.setsockopt(zmq.SNDHWM, 0)  # bounded by the window, not by ZeroMQ
        s.setsockopt(zmq.RCVHWM, 0)
        s.setsockopt(zmq.RECONNECT_IVL, RECONNECT_MIN_MS)
        s.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_MAX_MS)
        s.setsockopt(zmq.CONNECT_TIMEOUT, CONNECT_TIMEOUT_MS)
        mon = None
        try:
            if self.curve is not None:
                secure_client(s, *self.curve)
            mon = s.get_monitor_socket(_EVENTS)
            mon.setsockopt(zmq.LINGER, 0)
            s.connect(self.endpoint)
        except BaseException:  # a socket left open would block the context's term()
            if mon is not None:
                mon.close(0)
            s.close(0)
            raise
        return s, mon

    def events(self) -> list[int]:
        """Drain the monitor; returns the events seen (zmq.EVENT_*), logging each change."""
        out = []
        while int(self.monitor.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
            ev = recv_monitor_message(self.monitor, zmq.NOBLOCK)["event"]
            out.append(ev)
            if ev & _AUTH_FAILED and self.curve is not None:
                if not self.auth_failed:
                    log.error("%s: %s refused our CURVE key (handshake failed); requests "
                              "will time out", self.name, self.endpoint)
                self.auth_failed = True
            elif ev & _HANDSHAKE_FAILED:
                if not self.handshake_failed:
                    log.error("%s: the handshake with %s fails: %s Requests will time out",
                              self.name, self.endpoint, self.handshake_hint())
                self.handshake_failed = True
            elif ev == _UP and not self.connected:
                self.connected = True
                if self._down_logged:
                    log.warning("%s: connected to %s after %d failed attempts", self.name,
                                self.endpoint, self.retries)
                else:
                    log.info("%s: connected to %s", self.name, self.endpoint)
                self.retries, self._down_since, self._down_logged = 0, None, 0.0
            elif ev == zmq.EVENT_DISCONNECTED and self.connected:
                self.connected = False
                self.reconnects += 1
                log.warning("%s: disconnected from %s; reconnecting", self.name, self.endpoint)
            elif ev in (zmq.EVENT_CONNECT_RETRIED, zmq.EVENT_DISCONNECTED):
                self._failed_attempt()  # refused, timed out, or dropped before the handshake
        return out

    def handshake_hint(self) -> str:
        """What a failing ZeroMQ handshake most likely means, for logs and timeouts."""
        if self.curve is not None:
            return ("is it a page server with CURVE keys, and is COMM_CURVE_SERVER_KEY its "
                    "public key?")
        return ("a page server with CURVE keys needs COMM_CURVE_SECRET and "
                "COMM_CURVE_SERVER_KEY (docs/operations.md); or it is not a page server.")

    def _failed_attempt(self) -> None:
        self.retries += 1
        now = time.monotonic()
        if self._down_since is None:
            self._down_since = now
        elif (now - self._down_since >= _DOWN_FIRST_LOG
              and now - self._down_logged >= _DOWN_LOG_EVERY):
            self._down_logged = now
            log.warning("%s: cannot connect to %s for %.0f s (%d failed attempts so far; "
                        "still trying): is the page server up, and is the endpoint right?",
                        self.name, self.endpoint, now - self._down_since, self.retries)

    def reset(self) -> None:
        self.close()
        self.dealer, self.monitor = self._open()
        self.connected = False
        self.generation += 1

    def close(self) -> None:
        try:
            self.dealer.disable_monitor()
        except zmq.ZMQError:
            pass
        self.monitor.close(0)
        self.dealer.close(0)
