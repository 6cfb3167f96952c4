"""ClientKeys, the CURVE credentials provider of a page server: the clients directory
is re-read when its listing changes (and only then), bad key files are skipped with a
warning, and the callback never raises (it runs in the authenticator's thread)."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

import shards._curve as curve
from shards._curve import ClientKeys, keygen, load_public

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def pubs(tmp_path: Path) -> dict[str, Any]:
    src = tmp_path / "src"
    a_pub, _ = keygen(src, "a")
    b_pub, _ = keygen(src, "b")
    return {"a": a_pub, "b": b_pub, "a_key": load_public(a_pub), "b_key": load_public(b_pub)}


def test_listing_changes_are_seen_and_nothing_else_rereads(tmp_path: Path, pubs,
                                                           monkeypatch) -> None:
    d = tmp_path / "clients"
    d.mkdir()
    shutil.copy(pubs["a"], d / "a.key")
    keys = ClientKeys(d)
    reads: list[str] = []
    real = curve.zmq.auth.load_certificate

    def counting(path: str) -> tuple[bytes, bytes | None]:
        reads.append(os.path.basename(path))
        return real(path)

    monkeypatch.setattr(curve.zmq.auth, "load_certificate", counting)
    assert keys.callback("*", pubs["a_key"]) and not keys.callback("*", pubs["b_key"])
    assert reads == []  # unchanged listing: the cached keys
    shutil.copy(pubs["b"], d / "b.key")
    assert keys.callback("*", pubs["b_key"]) and keys.callback("*", pubs["a_key"])
    assert sorted(reads) == ["a.key", "b.key"]
    (d / "a.key").unlink()
    assert not keys.callback("*", pubs["a_key"]) and keys.callback("*", pubs["b_key"])
    (d / "b.key_secret").write_text("ignored: only *.key files hold accepted keys\n")
    (d / ".hidden.key").write_bytes((d / "b.key").read_bytes())
    assert keys.keys() == {pubs["b_key"]}
    # a key file replaced in place (same name, new contents) is re-read too; the
    # explicit mtime keeps a coarse file-system clock from hiding the change
    shutil.copy(pubs["a"], d / "b.key")
    st = (d / "b.key").stat()
    os.utime(d / "b.key", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert keys.keys() == {pubs["a_key"]}


def test_bad_files_are_skipped_with_a_warning(tmp_path: Path, pubs, caplog) -> None:
    d = tmp_path / "clients"
    d.mkdir()
    shutil.copy(pubs["a"], d / "a.key")
    (d / "empty.key").write_bytes(b"")
    (d / "binary.key").write_bytes(b"\xff\xfe\x00public-key = \xff\n")
    (d / "short.key").write_text('public-key = "tooshort"\n')
    (d / "alphabet.key").write_text('public-key = "' + "~" * 40 + '"\n')
    (d / "dir.key").mkdir()
    (d / "dangling.key").symlink_to(d / "nowhere")
    with caplog.at_level(logging.WARNING, logger="shards._curve"):
        keys = ClientKeys(d)
    assert keys.keys() == {pubs["a_key"]}
    msgs = " ".join(r.getMessage() for r in caplog.records)
    for name in ("empty", "binary", "short", "alphabet", "dir", "dangling"):
        assert f"{name}.key" in msgs
    assert pubs["a_key"].decode() not in msgs
    assert keys.callback("*", pubs["a_key"])


def test_a_vanished_directory_refuses_everyone_and_never_raises(tmp_path: Path, pubs,
                                                                caplog, monkeypatch) -> None:
    d = tmp_path / "clients"
    d.mkdir()
    shutil.copy(pubs["a"], d / "a.key")
    keys = ClientKeys(d)
    assert keys.callback("*", pubs["a_key"])
    shutil.rmtree(d)
    with caplog.at_level(logging.WARNING, logger="shards._curve"):
        assert not keys.callback("*", pubs["a_key"])
        assert not keys.callback("*", pubs["a_key"])
    assert sum("cannot be listed" in r.getMessage() for r in caplog.records) == 1
    d.mkdir()
    shutil.copy(pubs["a"], d / "a.key")
    assert keys.callback("*", pubs["a_key"])

    def boom() -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(keys, "_list", boom)
    with caplog.at_level(logging.ERROR, logger="shards._curve"):
        assert keys.callback("*", pubs["a_key"]) is False
    assert any("checking a key failed" in r.getMessage() for r in caplog.records)


def test_a_malformed_or_special_file_is_skipped_and_the_others_still_work(
        tmp_path: Path) -> None:
    """A key file with a line that pyzmq cannot parse (IndexError inside pyzmq), and a
    FIFO (reading it would block the authenticator), are skipped with a warning."""
    pub, _ = keygen(tmp_path, "good")
    (tmp_path / "cut.key").write_text("metadata\ncurve\n    public-key\n")  # no '='
    os.mkfifo(tmp_path / "pipe.key")
    keys = ClientKeys(tmp_path)
    assert keys.callback("*", load_public(pub)) is True
    assert keys.callback("*", b"x" * 40) is False
