"""CURVE-authenticated page servers: listed clients read, others read nothing and get a
clear error at their deadline; plaintext is refused off loopback unless asked for;
and two page servers on two test hosts (network namespaces) serve through CURVE."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import netns
import pytest

import comm
from shards import PageServer, generate_store, open_shard_store
from shards._curve import keygen
from shards._synth import synth_pages

pytestmark = [pytest.mark.servers, pytest.mark.timeout(90)]
LSN = 0x1000000


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("keys")
    (d / "clients").mkdir()
    server_pub, server_sec = keygen(d, "server")
    client_pub, client_sec = keygen(d / "clients", "reader")
    os.rename(client_sec, d / "reader.key_secret")  # only public keys in the allow-list
    rogue_pub, rogue_sec = keygen(d / "rogue", "rogue")
    return {"server_pub": server_pub, "server_sec": server_sec, "clients": d / "clients",
            "client_pub": client_pub, "client_sec": d / "reader.key_secret",
            "rogue_pub": rogue_pub, "rogue_sec": rogue_sec}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, comm.RelTag]:
    d = tmp_path_factory.mktemp("curve") / "store"
    desc = generate_store(d, 2, 16, rels=1, nblocks=64, lsns=(LSN,))
    return d, desc["rels"][0]


@pytest.fixture
def server(store, keys) -> Iterator[PageServer]:
    st = open_shard_store(store[0], 0, readonly=True)
    srv = PageServer(st, shard=0, shard_count=2, stripe_size=16,
                     curve_secret=str(keys["server_sec"]),
                     curve_clients=str(keys["clients"])).start()
    yield srv
    srv.stop()
    st.close()


def cfg(keys: dict[str, Path], secret: str) -> comm.CommConfig:
    return comm.CommConfig(curve_secret=str(keys[secret]),
                           curve_server_key=str(keys["server_pub"]))


def test_listed_client_reads(server, store, keys):
    with comm.Communicator([server.endpoint], config=cfg(keys, "client_sec")) as c, \
            c.backend() as be:
        assert be.get_page(store[1], 3, LSN) == synth_pages(store[1], [3], LSN)[0]


def test_unlisted_client_reads_nothing_and_times_out_clearly(server, store, keys, caplog):
    served = server.stats()["pages_served"]
    with caplog.at_level(logging.ERROR, logger="comm._conn"):
        with comm.Communicator([server.endpoint], config=cfg(keys, "rogue_sec")) as c, \
                c.backend() as be:
            t = time.monotonic()
            with pytest.raises(comm.RequestTimeout, match="CURVE"):
                be.get_page(store[1], 3, LSN, timeout=1.0)
            assert time.monotonic() - t < 3
    assert server.stats()["pages_served"] == served  # it never got a page
    assert any("refused our CURVE key" in r.getMessage() for r in caplog.records)
    assert not any(b"key" in r.getMessage().encode() and len(r.getMessage()) > 300
                   for r in caplog.records)  # no key material in logs


def read_one(server: PageServer, store, keys: dict[str, Path], secret: str) -> bytes:
    """Block 3 through a NEW communicator (a new connection, a new CURVE handshake)."""
    with comm.Communicator([server.endpoint], config=cfg(keys, secret)) as c, \
            c.backend() as be:
        return be.get_page(store[1], 3, LSN, timeout=1.0)


def test_clients_directory_is_read_for_each_new_connection(store, keys, tmp_path, caplog):
    """docs/operations.md: removing a key file revokes the client for new connections;
    a key file added while the server runs admits its client; a bad file is skipped."""
    clients = tmp_path / "clients"
    clients.mkdir()
    shutil.copy(keys["client_pub"], clients / "reader.key")
    st = open_shard_store(store[0], 0, readonly=True)
    srv = PageServer(st, shard=0, shard_count=2, stripe_size=16,
                     curve_secret=str(keys["server_sec"]), curve_clients=str(clients)).start()
    try:
        want = synth_pages(store[1], [3], LSN)[0]
        assert read_one(srv, store, keys, "client_sec") == want
        with pytest.raises(comm.RequestTimeout, match="CURVE"):
            read_one(srv, store, keys, "rogue_sec")  # not listed yet

        (clients / "reader.key").unlink()
        with pytest.raises(comm.RequestTimeout, match="CURVE"):
            read_one(srv, store, keys, "client_sec")  # revoked for new connections

        (clients / "junk.key").write_text("not a certificate\n")
        (clients / "short.key").write_text('curve\n    public-key = "abc"\n')
        shutil.copy(keys["rogue_pub"], clients / "rogue.key")
        with caplog.at_level(logging.WARNING, logger="shards._curve"):
            assert read_one(srv, store, keys, "rogue_sec") == want  # added later: admitted
        skipped = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
        assert any("junk.key" in m for m in skipped) and any("short.key" in m for m in skipped)
        with pytest.raises(comm.RequestTimeout, match="CURVE"):
            read_one(srv, store, keys, "client_sec")  # still revoked

        shutil.copy(keys["client_pub"], clients / "reader.key")
        assert read_one(srv, store, keys, "client_sec") == want  # listed again
    finally:
        srv.stop()
        st.close()


def test_a_wrong_server_key_times_out_naming_it(server, store, keys, tmp_path):
    other_pub, _ = keygen(tmp_path, "other")  # taken for the server's public key
    config = comm.CommConfig(curve_secret=str(keys["client_sec"]),
                             curve_server_key=str(other_pub))
    with comm.Communicator([server.endpoint], config=config) as c, c.backend() as be:
        with pytest.raises(comm.RequestTimeout, match="COMM_CURVE_SERVER_KEY"):
            be.get_page(store[1], 3, LSN, timeout=1.0)


def test_client_without_curve_gets_nothing_and_is_told_why(server, store, caplog):
    caplog.set_level(logging.ERROR, logger="comm._conn")
    with comm.Communicator([server.endpoint]) as c, c.backend() as be:
        with pytest.raises(comm.RequestTimeout, match="needs COMM_CURVE_SECRET"):
            be.get_page(store[1], 3, LSN, timeout=1.0)
    assert any("handshake with" in r.getMessage() and "COMM_CURVE_SECRET" in r.getMessage()
               for r in caplog.records)


def test_bad_key_files_are_config_errors(keys, tmp_path):
    with pytest.raises(comm.ConfigError, match="COMM_CURVE_SECRET"):
        comm.CommConfig(curve_secret=str(tmp_path / "missing"),
                        curve_server_key=str(keys["server_pub"]))
    with pytest.raises(comm.ConfigError, match="go together"):
        comm.CommConfig(curve_secret=str(keys["client_sec"]))
    with pytest.raises(comm.ConfigError, match="COMM_CURVE_SECRET"):  # a public key file
        comm.Communicator(["tcp://127.0.0.1:1"], config=comm.CommConfig(
            curve_secret=str(keys["server_pub"]), curve_server_key=str(keys["server_pub"])))


def test_plaintext_off_loopback_is_refused_unless_insecure(store, caplog):
    st = open_shard_store(store[0], 0, readonly=True)
    try:
        with pytest.raises(ValueError, match="without CURVE"):
            PageServer(st, shard_count=2, stripe_size=16, bind="tcp://0.0.0.0:0")
        with caplog.at_level(logging.WARNING):
            srv = PageServer(st, shard_count=2, stripe_size=16, bind="tcp://0.0.0.0:0",
                             insecure=True)
        assert any("WITHOUT authentication" in r.getMessage() for r in caplog.records)
        del srv
    finally:
        st.close()


def test_two_hosts_in_network_namespaces_through_curve(store, keys):
    why = netns.available()
    if why is not None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"network namespaces unavailable under CI: {why}", pytrace=False)
        pytest.skip(why)
    rel = store[1]
    with netns.TestHosts(2) as hosts:
        procs = []
        try:
            endpoints = []
            for i in range(2):
                ep = f"tcp://{hosts.addrs[i]}:7{400 + i}"
                argv = [sys.executable, "-m", "shards", "serve", "--store", str(store[0]),
                        "--shard", str(i), "--bind", ep,
                        "--curve-secret", str(keys["server_sec"]),
                        "--curve-clients", str(keys["clients"])]
                p = subprocess.Popen(hosts.command(i, argv), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
                procs.append(p)
                assert p.stdout is not None
                line = p.stdout.readline()
                assert line.startswith("READY"), (line, p.stderr.read() if p.stderr else "")
                endpoints.append(line.split()[1])
            with comm.Communicator(endpoints, stripe_size=16,
                                   config=cfg(keys, "client_sec")) as c, c.backend() as be:
                assert be.get_pages(rel, range(64), LSN) == synth_pages(rel, range(64), LSN)
                assert all(s["completed"] > 0 for s in c.stats()["shards"])
        finally:
            for p in procs:
                p.terminate()
                p.wait(10)
