"""ZeroMQ endpoints of page servers, checked before a socket sees them: a bad one
would otherwise fail only inside a worker thread or a server's bind."""

from __future__ import annotations


def endpoint_problem(ep: str, *, bind: bool = False) -> str | None:
    """What is wrong with endpoint ``ep`` (None if nothing). To connect, a tcp endpoint
    needs a host and a port in 1..65535; to ``bind``, host ``*`` (every interface) and
    port ``*`` or 0 (a free one) are fine too."""
    scheme, sep, rest = ep.partition("://")
    if not sep or not rest:
        return "is not an endpoint like tcp://host:port, ipc://path or inproc://name"
    if scheme in ("ipc", "inproc"):
        return None
    if scheme != "tcp":
        return f"has transport {scheme!r}; page servers listen on tcp, ipc or inproc"
    host, colon, port = rest.rpartition(":")
    if not colon or not host or (not bind and host in ("[]", "*")):
        return "needs a host and a port, like tcp://127.0.0.1:6400"
    if bind and port == "*":
        return None
    if not port.isdigit() or not (0 if bind else 1) <= int(port) <= 65535:
        return f"has port {port!r}; a port is {0 if bind else 1}..65535"
    return None
