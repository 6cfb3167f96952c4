"""CURVE keys for page servers and their clients (ZeroMQ's CurveZMQ: authenticated,
encrypted TCP).

``python -m shards keygen DIR --name NAME`` writes ``NAME.key`` (public, give it
to the other side) and ``NAME.key_secret`` (keep it; mode 0600) in ZeroMQ's
certificate format. A page server takes its secret file and a directory of the
public keys of the clients it accepts; a client takes its secret file and the
server's public key file. Keys are never logged.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import zmq
import zmq.auth

from ._errors import InvalidArgument, ShardsError


class CurveKeyError(ShardsError):
    """A CURVE key file is missing or unreadable (the message names the file)."""


def keygen(directory: str | os.PathLike[str], name: str) -> tuple[Path, Path]:
    """Create ``NAME.key`` and ``NAME.key_secret`` in ``directory``; returns both paths.

    Refuses a name that is not a plain file name, and never overwrites an existing
    key file (a lost secret key locks every peer out)."""
    check_key_name(name)
    d = Path(directory)
    for path in (d / f"{name}.key", d / f"{name}.key_secret"):
        if path.exists():
            raise CurveKeyError(f"{path} already exists: keygen does not overwrite keys "
                                f"(remove it, or choose another name)")
    try:
        d.mkdir(parents=True, exist_ok=True)
        # the secret file is born private: a chmod after writing it would leave a
        # moment in which others may read it (the umask is per process: keygen is a
        # setup step, not something to run beside threads that create files)
        old = os.umask(0o077)
        try:
            public, secret = zmq.auth.create_certificates(str(d), name)
        finally:
            os.umask(old)
        os.chmod(public, 0o644)
    except OSError as e:
        raise CurveKeyError(f"cannot create key files in {d}: {e}") from None
    return Path(public), Path(secret)


def check_key_name(name: str) -> str:
    """``name`` if it can be a key file stem: one path component, not hidden, no NUL."""
    seps = [s for s in (os.sep, os.altsep, "/") if s]
    # a leading '.' covers '.', '..' and hidden files nobody would find
    if (not isinstance(name, str) or not name or name.startswith(".") or "\0" in name
            or any(s in name for s in seps)):
        raise CurveKeyError(f"key name {name!r} must be a plain file name (not empty, no "
                            f"path separator, not starting with '.')")
    return name


def load_secret(path: str | os.PathLike[str]) -> tuple[bytes, bytes]:
    """(public, secret) from a ``.key_secret`` file."""
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as e:
        raise CurveKeyError(f"cannot read CURVE secret key file {path}: {e}") from None
    if secret is None:
        raise CurveKeyError(f"{path} holds no secret key (pass the .key_secret file)")
    return public, secret


def load_public(path: str | os.PathLike[str]) -> bytes:
    try:
        public, _ = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as e:
        raise CurveKeyError(f"cannot read CURVE public key file {path}: {e}") from None
    return public


def is_loopback(endpoint: str) -> bool:
    """Whether ``endpoint`` is reachable only from this host (loopback, ipc, inproc)."""
    parts = urlsplit(endpoint)
    if parts.scheme in ("ipc", "inproc"):
        return True
    host = (parts.hostname or "").strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def add_cli(subparsers: Any) -> None:
    p = subparsers.add_parser("keygen",
                              help="create a CURVE key pair (NAME.key, NAME.key_secret)")
    p.add_argument("directory")
    p.add_argument("--name", default="server", help="file name stem (default: server)")
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    import sys

    try:
        check_key_name(args.name)
    except CurveKeyError as e:
        print(f"error: --name: {e}", file=sys.stderr)
        return 2
    try:
        public, secret = keygen(args.directory, args.name)
    except ShardsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"public key: {public}\nsecret key: {secret} (keep it private)")
    return 0


def check_exposure(bind: str, secured: bool, insecure: bool, log: Any) -> None:
    """Refuse to serve a non-loopback endpoint in the clear unless told to."""
    if secured or is_loopback(bind):
        return
    if not insecure:
        raise InvalidArgument(f"refusing to bind {bind} without CURVE keys: pass a secret key "
                              f"and a clients directory (--curve-secret/--curve-clients), or "
                              f"allow plaintext explicitly (--insecure)")
    log.warning("serving %s WITHOUT authentication or encryption (--insecure)", bind)


def secure_server(ctx: zmq.Context, sock: zmq.Socket, secret_file: str,
                  clients_dir: str) -> Any:
    """Make ``sock`` a CURVE server accepting only the public keys in ``clients_dir``;
    returns the running authenticator (stop it after closing the socket)."""
    from zmq.auth.thread import ThreadAuthenticator

    public, secret = load_secret(secret_file)
    if not Path(clients_dir).is_dir():
        raise CurveKeyError(f"CURVE clients directory {clients_dir} does not exist")
    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve(domain="*", location=str(clients_dir))
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_server = True
    return auth


def secure_client(sock: zmq.Socket, secret_file: str, server_key_file: str) -> None:
    """Make ``sock`` a CURVE client that only talks to the server holding the key."""
    public, secret = load_secret(secret_file)
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_serverkey = load_public(server_key_file)
