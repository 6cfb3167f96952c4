"""Bad input to ``python -m shards`` generate, import-pgdata and keygen: one line
``error: ...`` naming the flag or path, exit status 2, no traceback, nothing lost.
No page servers: the CLI runs in-process (and once as a real subprocess)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from shards import ShardsError, StoreError, generate_store, open_shard_store, shard_for
from shards.__main__ import main
from shards._curve import CurveKeyError, keygen
from shards._pgimport import import_pgdata
from shards._synth import GenerateError, synth_page, synth_rels

LSN = 0x1000000
UNWRITABLE = "/proc/nope"  # procfs: no directory can be created there, not even by root


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    rc = main(argv)
    err = capsys.readouterr().err
    return rc, err


def _assert_one_line_error(err: str, *needles: str) -> None:
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for n in needles:
        assert n in lines[0], (n, err)


@pytest.fixture
def store4(tmp_path: Path) -> Path:
    """A tiny 4-shard store (stripe 2: pages spread over the shards)."""
    d = tmp_path / "s4"
    generate_store(d, 4, 2, rels=1, nblocks=16, lsns=(LSN,))
    return d


@pytest.fixture
def pgdata(tmp_path: Path) -> Path:
    """The smallest directory check_pgdata accepts (no relation files; pass --lsn)."""
    d = tmp_path / "pgdata"
    (d / "global").mkdir(parents=True)
    (d / "base").mkdir()
    (d / "PG_VERSION").write_text("15\n")
    (d / "global" / "pg_control").write_bytes(b"")
    return d


@pytest.mark.parametrize(("args", "needle"), [
    (["--shard-count", "0"], "--shard-count"),
    (["--shard-count", "-1"], "--shard-count"),
    (["--shard-count", "256"], "--shard-count"),
    (["--shard-count", "1", "--stripe-size", "0"], "--stripe-size"),
    (["--shard-count", "1", "--stripe-size", str((1 << 31) + 1)], "--stripe-size"),
    (["--shard-count", "1", "--nblocks", "-1"], "--nblocks"),
    (["--shard-count", "1", "--nblocks", str(1 << 32)], "--nblocks"),
    (["--shard-count", "1", "--rels", "0"], "--rels"),
    (["--shard-count", "1", "--lsn", "0"], "--lsn"),
])
def test_generate_rejects_bad_numbers(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                      args: list[str], needle: str) -> None:
    store = tmp_path / "store"
    rc, err = _run(["generate", "--store", str(store), "--no-progress", *args], capsys)
    assert rc == 2
    _assert_one_line_error(err, needle)
    assert not store.exists()  # refused before anything was written


def test_generate_unwritable_store(capsys: pytest.CaptureFixture[str]) -> None:
    rc, err = _run(["generate", "--store", UNWRITABLE, "--shard-count", "1", "--no-progress"],
                   capsys)
    assert rc == 2
    _assert_one_line_error(err, f"cannot create store at {UNWRITABLE}")
    with pytest.raises(StoreError, match="cannot create store"):
        generate_store(UNWRITABLE, 1, rels=1, nblocks=1)


def test_generate_refuses_other_layout(store4: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    layout = (store4 / "layout.json").read_bytes()
    rel = synth_rels(1)[0]
    for args, asked in ((["--shard-count", "3", "--stripe-size", "2"], "not 3 with 2"),
                        (["--shard-count", "4", "--stripe-size", "8"], "not 4 with 8"),
                        (["--shard-count", "2"], "not 2 with 2")):  # stripe from the layout
        rc, err = _run(["generate", "--store", str(store4), "--rels", "1", "--nblocks", "16",
                        "--no-progress", *args], capsys)
        assert rc == 2
        _assert_one_line_error(err, str(store4), "holds 4 shard(s) with stripe size 2", asked)
    with pytest.raises(GenerateError, match="holds 4 shard"):
        generate_store(store4, 3, 2, rels=1, nblocks=16, lsns=(LSN,))
    with pytest.raises(ShardsError, match="stripe size 2, not 4 with 2048"):
        generate_store(store4, 4, rels=1, nblocks=16, lsns=(LSN,))
    assert (store4 / "layout.json").read_bytes() == layout
    assert not (store4 / "shard-0004").exists()
    for blk in range(16):  # every page still where its 4-shard owner reads it
        with open_shard_store(store4, shard_for(rel, blk, 4, 2), readonly=True) as st:
            assert st.get_page(rel, blk, LSN) == synth_page(rel, blk, LSN)


def test_generate_same_layout_still_works(store4: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["generate", "--store", str(store4), "--shard-count", "4", "--rels", "1",
               "--nblocks", "16", "--lsn", "0/2000000", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    rel = synth_rels(1)[0]
    with open_shard_store(store4, shard_for(rel, 5, 4, 2), readonly=True) as st:
        assert st.get_page(rel, 5, 0x2000000) == synth_page(rel, 5, 0x2000000)


def test_generate_library_errors_are_typed(tmp_path: Path) -> None:
    for kwargs in ({"shard_count": 0}, {"shard_count": 1, "stripe_size": 0},
                   {"shard_count": 1, "nblocks": -1}, {"shard_count": 1, "rels": True},
                   {"shard_count": 1, "lsns": ()}, {"shard_count": 1, "lsns": None}):
        with pytest.raises(GenerateError):  # a ShardsError and a ValueError
            generate_store(tmp_path / "s", **kwargs)  # type: ignore[arg-type]
    assert not (tmp_path / "s").exists()


def test_generate_corrupt_layout_is_refused(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "layout.json").write_text("{oops")
    rc, err = _run(["generate", "--store", str(tmp_path), "--shard-count", "1",
                    "--no-progress"], capsys)
    assert rc == 2
    _assert_one_line_error(err, "layout.json")
    assert (tmp_path / "layout.json").read_text() == "{oops"


@pytest.mark.parametrize(("args", "needle"), [
    (["--shard-count", "0"], "--shard-count"),
    (["--shard-count", "-2"], "--shard-count"),
    (["--shard-count", "256"], "--shard-count"),
    (["--stripe-size", "0"], "--stripe-size"),
    (["--stripe-size", "-5"], "--stripe-size"),
    (["--lsn", "0"], "--lsn"),
])
def test_import_rejects_bad_numbers(tmp_path: Path, pgdata: Path,
                                    capsys: pytest.CaptureFixture[str],
                                    args: list[str], needle: str) -> None:
    store = tmp_path / "store"
    rc, err = _run(["import-pgdata", str(pgdata), "--store", str(store), "--no-progress",
                    *args], capsys)
    assert rc == 2
    _assert_one_line_error(err, needle)
    assert not store.exists()


def test_import_library_rejects_bad_shard_params(tmp_path: Path, pgdata: Path) -> None:
    from shards import PgImportError

    with pytest.raises(PgImportError, match="shard_count"):
        import_pgdata(pgdata, tmp_path / "store", shard_count=0, lsn=LSN)
    assert not (tmp_path / "store").exists()


def test_import_store_errors(tmp_path: Path, pgdata: Path, store4: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    rc, err = _run(["import-pgdata", str(pgdata), "--store", UNWRITABLE, "--lsn", "0/100",
                    "--no-progress"], capsys)
    assert rc == 2  # refused before importing anything: 2, like generate's unwritable store
    _assert_one_line_error(err, UNWRITABLE)
    layout = (store4 / "layout.json").read_bytes()
    rc, err = _run(["import-pgdata", str(pgdata), "--store", str(store4), "--lsn", "0/100",
                    "--shard-count", "2", "--no-progress"], capsys)
    assert rc == 2  # a store of another layout: a usage error
    _assert_one_line_error(err, "holds 4 shard(s)", "not 2 with 2")
    assert (store4 / "layout.json").read_bytes() == layout
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "layout.json").write_text("[]")
    rc, err = _run(["import-pgdata", str(pgdata), "--store", str(bad), "--lsn", "0/100",
                    "--no-progress"], capsys)
    assert rc == 2
    _assert_one_line_error(err, "layout.json")


@pytest.mark.parametrize("name", ["../evil", "a/b", "", ".", "..", ".hidden", "nul\0"])
def test_keygen_rejects_bad_names(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                  name: str) -> None:
    rc, err = _run(["keygen", str(tmp_path / "keys"), "--name", name], capsys)
    assert rc == 2
    _assert_one_line_error(err, "--name", "plain file name")
    assert not (tmp_path / "keys").exists() and not (tmp_path / "evil.key").exists()
    with pytest.raises(CurveKeyError, match="plain file name"):
        keygen(tmp_path / "keys", name)


def test_keygen_unwritable_directory(capsys: pytest.CaptureFixture[str]) -> None:
    rc, err = _run(["keygen", UNWRITABLE], capsys)
    assert rc == 2
    _assert_one_line_error(err, f"cannot create key files in {UNWRITABLE}")


def test_keygen_never_overwrites(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keygen", str(tmp_path), "--name", "srv"]) == 0
    secret = (tmp_path / "srv.key_secret").read_bytes()
    assert (tmp_path / "srv.key_secret").stat().st_mode & 0o077 == 0
    capsys.readouterr()
    rc, err = _run(["keygen", str(tmp_path), "--name", "srv"], capsys)
    assert rc == 2
    _assert_one_line_error(err, "srv.key", "already exists")
    assert (tmp_path / "srv.key_secret").read_bytes() == secret


def test_subprocess_exit_status_and_no_traceback(tmp_path: Path) -> None:
    """The real entry point (``python -m shards``), as a new user runs it."""
    proc = subprocess.run([sys.executable, "-m", "shards", "generate", "--store",
                           str(tmp_path / "s"), "--shard-count", "0"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: --shard-count must be in 1..255, got 0"


def test_keygen_writes_the_secret_key_private_from_the_start(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    import zmq.auth

    from shards._curve import keygen

    real = zmq.auth.create_certificates
    seen: list[int] = []

    def spy(*args: object, **kw: object) -> object:
        mask = os.umask(0)
        os.umask(mask)
        seen.append(mask)
        return real(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(zmq.auth, "create_certificates", spy)
    public, secret = keygen(tmp_path, "k")
    assert seen and seen[0] & 0o077 == 0o077  # no moment in which others could read it
    assert secret.stat().st_mode & 0o777 == 0o600 and public.stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("argv, words", [
    (["--bind", "foo://x"], "is not an endpoint like"),
    (["--bind", "tcp://127.0.0.1"], "is not an endpoint like"),
    (["--bind", "tcp://127.0.0.1:70000"], "is not an endpoint like"),
    (["--latency-ms", "-1"], "must be milliseconds in 0..3600000"),
    (["--latency-ms", "nan"], "must be milliseconds"),
    (["--latency-ms", "x"], "expected milliseconds"),
])
def test_serve_names_a_bad_bind_or_latency_in_its_own_units(
        store4: Path, argv: list[str], words: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as ei:
        main(["serve", "--store", str(store4), "--shard", "0", *argv])
    assert ei.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {argv[0]}: " in err and words in err and "Traceback" not in err


def test_serve_says_not_an_endpoint_once(store4: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as ei:
        main(["serve", "--store", str(store4), "--shard", "0", "--bind", "garbage"])
    assert ei.value.code == 2
    err = capsys.readouterr().err
    assert err.count("is not an endpoint like") == 1, err
    assert "'garbage' is not an endpoint like tcp://127.0.0.1:6400" in err
    with pytest.raises(SystemExit):  # a specific reason is still given, once
        main(["serve", "--store", str(store4), "--shard", "0", "--bind", "udp://h:1"])
    err = capsys.readouterr().err
    assert err.count("is not an endpoint like") == 1 and "has transport 'udp'" in err, err


# ---------------------------------------------------------------- -v, Ctrl-C

def test_verbose_is_taken_after_the_command_too(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import logging

    levels: list[int] = []
    monkeypatch.setattr(logging, "basicConfig", lambda **kw: levels.append(kw["level"]))
    gen = ["generate", "--shard-count", "1", "--rels", "1", "--nblocks", "2", "--no-progress"]
    assert main([*gen, "--store", str(tmp_path / "a"), "-v"]) == 0
    assert main(["-v", *gen, "--store", str(tmp_path / "b")]) == 0
    assert main([*gen, "--store", str(tmp_path / "c"), "--verbose"]) == 0
    assert main([*gen, "--store", str(tmp_path / "d")]) == 0
    assert levels == [logging.DEBUG] * 3 + [logging.INFO]
    with pytest.raises(SystemExit) as ei:  # anything else unknown is still refused
        main([*gen, "--store", str(tmp_path / "e"), "--bogus"])
    assert ei.value.code == 2
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("command", ["generate", "import-pgdata"])
def test_ctrl_c_is_one_line_and_status_130(tmp_path: Path, pgdata: Path, command: str,
                                           monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    import shards._pgimport
    import shards._synth

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(shards._synth, "generate_store", interrupted)
    monkeypatch.setattr(shards._pgimport, "import_pgdata", interrupted)
    argv = (["generate", "--shard-count", "1"] if command == "generate"
            else ["import-pgdata", str(pgdata), "--lsn", "0/100"])
    rc = main([*argv, "--store", str(tmp_path / "s"), "--no-progress"])
    assert rc == 130
    assert capsys.readouterr().err.strip() == "interrupted"


# ---------------------------------------------------------------- versions move forward

L1, L2, L3 = 0x1000000, 0x2000000, 0x3000000


def _snapshot(store: Path, shard_count: int) -> list[tuple[int, dict, set]]:
    out = []
    for s in range(shard_count):
        with open_shard_store(store, s, readonly=True) as st:
            out.append((st.last_lsn, st.meta(), st.relations(L3)))
    return out


def test_generate_below_the_newest_version_is_refused(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]
                                                      ) -> None:
    store = tmp_path / "s"
    generate_store(store, 2, 4, rels=1, nblocks=8, lsns=(L1, L2))
    before = _snapshot(store, 2)
    rel = synth_rels(2)[1]
    with pytest.raises(GenerateError, match="lsn 0/1000000 is below 0/2000000.*only move "
                       "forward"):
        generate_store(store, 2, 4, rels=2, nblocks=16, lsns=(L1,))
    rc, err = _run(["generate", "--store", str(store), "--shard-count", "2", "--rels", "2",
                    "--nblocks", "16", "--no-progress"], capsys)  # at 0/1000000, the default
    assert rc == 2
    _assert_one_line_error(err, "0/1000000", "0/2000000", str(store))
    assert "generated" not in capsys.readouterr().out
    # an LSN below the newest that was never generated here is refused too
    with pytest.raises(GenerateError, match="lsn 0/1800000 is below 0/2000000.*never "
                       "generated"):
        generate_store(store, 2, 4, rels=2, nblocks=16, lsns=(0x1800000, L3))
    assert _snapshot(store, 2) == before  # the store is left as it was
    assert rel not in before[0][2]


def test_generate_rerun_at_the_same_lsns_and_forward_still_works(tmp_path: Path) -> None:
    store = tmp_path / "s"
    generate_store(store, 2, 4, rels=1, nblocks=8, lsns=(L1, L2))
    generate_store(store, 2, 4, rels=1, nblocks=8, lsns=(L1, L2))  # the same again
    generate_store(store, 2, 4, rels=1, nblocks=8, lsns=(L2,))  # at the newest only
    desc = generate_store(store, 2, 4, rels=1, nblocks=8, lsns=(L1, L2, L3))  # and onward
    assert desc["lsns"][-1] == L3
    rel = synth_rels(1)[0]
    for lsn in (L1, L2, L3):
        with open_shard_store(store, shard_for(rel, 5, 2, 4), readonly=True) as st:
            assert st.get_page(rel, 5, lsn) == synth_page(rel, 5, lsn)
            assert st.last_lsn == L3


def test_generate_failing_while_writing_exits_1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """A refusal is 2, like every command; a failure while writing is 1, as in
    import-pgdata (something may have been written)."""
    import shards._synth as synth

    def full(*a: object, **k: object) -> int:
        raise StoreError("MDB_MAP_FULL: Environment mapsize limit reached")

    monkeypatch.setattr(synth, "_write_rel", full)
    rc, err = _run(["generate", "--store", str(tmp_path / "s"), "--shard-count", "1",
                    "--no-progress"], capsys)
    assert rc == 1
    _assert_one_line_error(err, "generate failed", "MDB_MAP_FULL")
    with pytest.raises(StoreError, match="MDB_MAP_FULL"):
        generate_store(tmp_path / "t", 1, rels=1, nblocks=1)
