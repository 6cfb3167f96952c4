"""CURVE keys for page servers and their clients (ZeroMQ's CurveZMQ: authenticated,
encrypted TCP).

``python -m shards keygen DIR --name NAME`` writes ``NAME.key`` (public, give it
to the other side) and ``NAME.key_secret`` (keep it; mode 0600) in ZeroMQ's
certificate format. A page server takes its secret file and a directory of the
public keys of the clients it accepts; a client takes its secret file and the
server's public key file. Keys are never logged.

The clients directory is authoritative for every NEW connection: each CURVE
handshake asks :class:`ClientKeys`, which re-reads the directory's ``*.key``
files whenever its listing (names, sizes, modification times) changed, so a key
file added later is accepted and a removed one is refused from then on
(connections already established stay up). A key file that cannot be read or
holds no valid public key is skipped with a warning naming the file.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import stat
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import zmq
import zmq.auth
from zmq.utils import z85

from ._errors import InvalidArgument, ShardsError

log = logging.getLogger(__name__)
_Z85_KEY_LEN = 40  # a 32-byte CURVE key in Z85
_MAX_KEY_FILE = 64 * 1024  # a key file is a few hundred bytes; anything larger is not one


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
    except Exception as e:  # OSError, ValueError, IndexError (a line without '='), ...
        raise CurveKeyError(f"cannot read CURVE secret key file {path}: {e!r}") from None
    if secret is None:
        raise CurveKeyError(f"{path} holds no secret key (pass the .key_secret file)")
    return public, secret


def load_public(path: str | os.PathLike[str]) -> bytes:
    try:
        public, _ = zmq.auth.load_certificate(str(path))
    except Exception as e:  # any parse error: one typed error naming the file
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


def _is_z85_key(key: bytes) -> bool:
    if len(key) != _Z85_KEY_LEN:
        return False
    try:
        z85.decode(key)
    except Exception:  # KeyError for a character outside the alphabet, struct.error, ...
        return False
    return True


class ClientKeys:
    """The public keys in a clients directory, as the authenticator's credentials
    provider: :meth:`callback` is called (in the authenticator's thread) once per
    CURVE handshake with the client's Z85 public key.

    The directory is listed on each call (a scandir and a stat per ``*.key`` entry: a
    few microseconds for a handful of clients); the key
    files are re-read only when that listing changed. A missing or unreadable
    directory accepts nobody (with a warning) until it is back."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self._lock = threading.Lock()
        self._listing: tuple[tuple[str, int, int, int, int], ...] | None = None
        self._loaded = False
        self._keys: frozenset[bytes] = frozenset()
        self.keys()  # read them now: warnings about bad files come at start

    def _list(self) -> tuple[tuple[str, int, int, int, int], ...] | None:
        try:
            out = []
            with os.scandir(self.directory) as it:
                for e in it:
                    if e.name.endswith(".key") and not e.name.startswith("."):
                        try:
                            st = e.stat()  # follows a symlink, as reading the file does
                        except OSError:
                            out.append((e.name, -1, -1, -1, -1))  # dangling: _read skips it
                            continue
                        # ctime too: a chmod making an unreadable file readable counts;
                        # size -2: not a regular file (a FIFO would block the reader)
                        size = st.st_size if stat.S_ISREG(st.st_mode) else -2
                        out.append((e.name, st.st_mtime_ns, st.st_ctime_ns, size,
                                    st.st_ino))
            return tuple(sorted(out))
        except OSError:
            return None

    def keys(self) -> frozenset[bytes]:
        """The accepted public keys (Z85) as the directory holds them now."""
        listing = self._list()
        with self._lock:
            if self._loaded and listing == self._listing:
                return self._keys
            if listing is None:  # warned once per change, not per handshake
                log.warning("CURVE clients directory %s cannot be listed: refusing every "
                            "client until it can", self.directory)
                self._keys = frozenset()
            else:
                self._keys = self._read(listing)
            self._listing, self._loaded = listing, True
            return self._keys

    def _read(self, listing: tuple[tuple[str, int, int, int, int], ...]) -> frozenset[bytes]:
        keys = set()
        for name, _, _, size, _ in listing:
            path = self.directory / name
            if size == -2 or size > _MAX_KEY_FILE:
                log.warning("CURVE clients directory: skipping %s: not a regular key file "
                            "of at most %d bytes", path, _MAX_KEY_FILE)
                continue
            try:
                public, _ = zmq.auth.load_certificate(str(path))
            except Exception as e:  # any parse error skips the file; messages name it,
                # never a key
                log.warning("CURVE clients directory: skipping %s: %r", path, e)
                continue
            if not _is_z85_key(public):
                log.warning("CURVE clients directory: skipping %s: its public-key is not "
                            "a 40-character Z85 key", path)
                continue
            keys.add(public)
        log.debug("CURVE clients directory %s: %d key(s)", self.directory, len(keys))
        return frozenset(keys)

    def callback(self, domain: str, client_key: bytes) -> bool:
        """Whether ``client_key`` (Z85) is in the directory now. Never raises: an
        exception here would stop the authenticator thread."""
        try:
            return client_key in self.keys()
        except Exception:  # a bug must refuse one client, not every later one
            log.exception("CURVE clients directory %s: checking a key failed", self.directory)
            return False


def secure_server(ctx: zmq.Context, sock: zmq.Socket, secret_file: str,
                  clients_dir: str) -> Any:
    """Make ``sock`` a CURVE server accepting only the public keys in ``clients_dir``
    at the time of each new connection (:class:`ClientKeys`); returns the running
    authenticator (stop it after closing the socket)."""
    from zmq.auth.thread import ThreadAuthenticator

    public, secret = load_secret(secret_file)
    if not Path(clients_dir).is_dir():
        raise CurveKeyError(f"CURVE clients directory {clients_dir} does not exist")
    provider = ClientKeys(clients_dir)  # consulted at every handshake, not read once
    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve_callback(domain="*", credentials_provider=provider)
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
