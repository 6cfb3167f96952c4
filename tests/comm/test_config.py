import pytest

import comm
from comm import CommConfig, ConfigError


def test_defaults_are_valid():
    cfg = CommConfig()
    assert cfg.stripe_size == 2048 and cfg.threads_per_shard >= 1


def test_from_env_reads_every_variable():
    env = {"COMM_SHARDS": "tcp://127.0.0.1:1, tcp://127.0.0.1:2", "COMM_STRIPE_SIZE": "16",
           "COMM_THREADS_PER_SHARD": "2", "COMM_INFLIGHT_PER_CONN": "8",
           "COMM_INFLIGHT_PAGES_PER_CONN": "96",
           "COMM_SLOTS_PER_BACKEND": "4", "COMM_PREFETCH_PAGES": "100",
           "COMM_REQUEST_TIMEOUT": "2.5", "COMM_METRICS_PORT": "0",
           "COMM_METRICS_ADDR": "0.0.0.0",
           "COMM_VERIFY_CHECKSUMS": "yes", "UNRELATED": "x"}
    cfg = CommConfig.from_env(env)
    assert cfg.shards == ("tcp://127.0.0.1:1", "tcp://127.0.0.1:2")
    assert (cfg.stripe_size, cfg.threads_per_shard, cfg.inflight_per_conn) == (16, 2, 8)
    assert cfg.inflight_pages_per_conn == 96
    assert (cfg.slots_per_backend, cfg.prefetch_pages) == (4, 100)
    assert cfg.request_timeout == 2.5 and cfg.metrics_port == 0 and cfg.verify_checksums
    assert cfg.metrics_addr == "0.0.0.0"


def test_overrides_win_over_env():
    cfg = CommConfig.from_env({"COMM_STRIPE_SIZE": "16"}, stripe_size=32)
    assert cfg.stripe_size == 32


@pytest.mark.parametrize("var,value", [
    ("COMM_STRIPE_SIZE", "abc"), ("COMM_STRIPE_SIZE", "0"), ("COMM_THREADS_PER_SHARD", "-1"),
    ("COMM_INFLIGHT_PER_CONN", "1.5"), ("COMM_SLOTS_PER_BACKEND", "0"),
    ("COMM_INFLIGHT_PAGES_PER_CONN", "0"),
    ("COMM_PREFETCH_PAGES", "-5"), ("COMM_REQUEST_TIMEOUT", "soon"),
    ("COMM_REQUEST_TIMEOUT", "0"), ("COMM_METRICS_PORT", "70000"),
    ("COMM_VERIFY_CHECKSUMS", "maybe"), ("COMM_SHARDS", "localhost:6400"),
    ("COMM_METRICS_ADDR", "localhost"), ("COMM_METRICS_ADDR", "300.1.1.1"),
])
def test_bad_values_name_the_variable(var, value):
    with pytest.raises(ConfigError, match=var):
        CommConfig.from_env({var: value})


def test_config_is_frozen():
    cfg = CommConfig()
    with pytest.raises(AttributeError):
        cfg.stripe_size = 5  # type: ignore[misc]


@pytest.mark.parametrize("ep, why", [
    ("tcp://", "not an endpoint"),
    ("foo://bar", "transport 'foo'"),
    ("tcp://127.0.0.1", "needs a host and a port"),
    ("tcp://:6400", "needs a host and a port"),
    ("tcp://127.0.0.1:99999", "a port is 1..65535"),
    ("tcp://127.0.0.1:http", "a port is 1..65535"),
    ("tcp://127.0.0.1:\uff16\uff14\uff10\uff10", "a port is 1..65535"),  # fullwidth digits
])
def test_a_malformed_endpoint_is_refused_before_any_thread_starts(ep, why):
    with pytest.raises(ConfigError, match=why) as ei:
        CommConfig(shards=(ep,))
    assert repr(ep) in str(ei.value) and "COMM_SHARDS" in str(ei.value)
    with pytest.raises(ConfigError, match=why):
        CommConfig.from_env({"COMM_SHARDS": f"tcp://127.0.0.1:1,{ep}"})


@pytest.mark.parametrize("ep", ["tcp://127.0.0.1:6400", "tcp://[::1]:1", "tcp://pages.local:65535",
                                "ipc:///tmp/page.ipc", "inproc://pages"])
def test_well_formed_endpoints_are_accepted(ep):
    assert CommConfig(shards=(ep,)).shards == (ep,)


def test_settings_by_name_a_list_of_shards_and_unknown_names():
    cfg = comm.CommConfig(shards=["tcp://127.0.0.1:1", "tcp://127.0.0.1:2"])
    assert cfg.shards == ("tcp://127.0.0.1:1", "tcp://127.0.0.1:2")  # kept frozen
    assert cfg.replace(request_timeout=3).request_timeout == 3
    with pytest.raises(comm.ConfigError, match="unknown setting.*request_timeot"):
        cfg.replace(request_timeot=3)
    with pytest.raises(comm.ConfigError, match="unknown setting.*stripe"):
        comm.CommConfig.from_env({}, stripe=8)
    with pytest.raises(comm.ConfigError, match="unknown setting.*timeout_s"):
        comm.Communicator(["tcp://127.0.0.1:1"], timeout_s=3)
    with pytest.raises(comm.ConfigError, match="COMM_REQUEST_TIMEOUT"):
        comm.Communicator(["tcp://127.0.0.1:1"], request_timeout=-1)
    with comm.Communicator(["tcp://127.0.0.1:1"], request_timeout=3,
                           inflight_per_conn=8) as c:
        assert c.config.request_timeout == 3 and c.config.inflight_per_conn == 8
