"""Settings: one frozen dataclass; ``from_env()`` (and ``env_settings()``, which lists
what it would read) are the only readers of ``os.environ``."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from shards._endpoint import endpoint_problem

from ._errors import ConfigError

ENV_PREFIX = "COMM_"
# the integer settings' bounds: attribute -> (variable, lo, hi); the bench checks
# its flags for these same fields against this table (to name the flag)
INT_RANGES: dict[str, tuple[str, int, int]] = {
    "stripe_size": ("COMM_STRIPE_SIZE", 1, 1 << 31),
    "threads_per_shard": ("COMM_THREADS_PER_SHARD", 1, 64),
    "inflight_per_conn": ("COMM_INFLIGHT_PER_CONN", 1, 65536),
    "inflight_pages_per_conn": ("COMM_INFLIGHT_PAGES_PER_CONN", 1, 1 << 24),
    "slots_per_backend": ("COMM_SLOTS_PER_BACKEND", 1, 65535),
    "prefetch_pages": ("COMM_PREFETCH_PAGES", 0, 1 << 24),
    "relsize_cache": ("COMM_RELSIZE_CACHE", 0, 1 << 24),
}


@dataclass(frozen=True)
class CommConfig:
    """Tuning of one Communicator. docs/tuning.md explains what each value trades."""

    shards: tuple[str, ...] = ()
    stripe_size: int = 2048
    threads_per_shard: int = 1
    inflight_per_conn: int = 64
    inflight_pages_per_conn: int = 256
    slots_per_backend: int = 16
    prefetch_pages: int = 4096
    relsize_cache: int = 4096
    request_timeout: float = 30.0
    attempt_timeout: float = 10.0
    stuck_log_after: float = 10.0
    metrics_port: int | None = None
    metrics_addr: str = "127.0.0.1"  # the metrics endpoint's listen address
    verify_checksums: bool = False
    curve_secret: str | None = None  # this client's CURVE .key_secret file
    curve_server_key: str | None = None  # the page servers' CURVE public .key file
    # not a COMM_* variable: the inproc pipes and sockets per Context
    max_sockets: int = field(default=65536, repr=False)

    def __post_init__(self) -> None:
        for attr, (env, lo, hi) in INT_RANGES.items():
            _positive(self, attr, env, lo, hi)
        for attr in ("request_timeout", "attempt_timeout", "stuck_log_after"):
            t = getattr(self, attr)
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < 1e6:
                raise ConfigError(f"COMM_{attr.upper()} ({attr}) must be a number of "
                                  f"seconds in (0, 1e6), got {t!r}")
        if self.metrics_port is not None:
            _positive(self, "metrics_port", "COMM_METRICS_PORT", 0, 65535)
        try:
            if not isinstance(self.metrics_addr, str):
                raise TypeError
            ipaddress.ip_address(self.metrics_addr)
        except (TypeError, ValueError):
            raise ConfigError(f"COMM_METRICS_ADDR (metrics_addr) must be an IP address to "
                              f"listen on, like 127.0.0.1 or 0.0.0.0, got "
                              f"{self.metrics_addr!r}") from None
        if isinstance(self.shards, list):  # a list is what most callers have: keep it frozen
            object.__setattr__(self, "shards", tuple(self.shards))
        if not isinstance(self.shards, tuple) or not all(isinstance(s, str) and s
                                                          for s in self.shards):
            raise ConfigError(f"COMM_SHARDS (shards) must be a list of endpoint strings, "
                              f"got {self.shards!r}")
        if (self.curve_secret is None) != (self.curve_server_key is None):
            raise ConfigError("COMM_CURVE_SECRET and COMM_CURVE_SERVER_KEY go together: the "
                              "client's .key_secret file and the servers' public .key file")
        for attr in ("curve_secret", "curve_server_key"):
            path = getattr(self, attr)
            if path is not None and not os.path.isfile(path):
                raise ConfigError(f"COMM_{attr.upper()} ({attr}): no such file {path!r}")
        if len(self.shards) > 255:
            raise ConfigError(f"COMM_SHARDS lists {len(self.shards)} shards; at most 255")
        for ep in self.shards:
            why = endpoint_problem(ep)
            if why is not None:
                raise ConfigError(f"COMM_SHARDS (shards): {ep!r} {why}")

    def replace(self, **changes: object) -> CommConfig:
        """A copy with ``changes`` (setting names); ConfigError names an unknown one."""
        _check_names(changes)
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> CommConfig:
        """Build a config from ``COMM_*`` variables; keyword overrides win."""
        env = os.environ if environ is None else environ
        kw: dict[str, object] = {}
        for f in dataclasses.fields(cls):
            if not f.repr:
                continue
            name = ENV_PREFIX + f.name.upper()
            raw = env.get(name)
            if raw is None or raw.strip() == "":
                continue
            kw[f.name] = _parse(f.name, name, raw.strip())
        _check_names(overrides)
        kw.update(overrides)
        return cls(**kw)  # type: ignore[arg-type]


_SETTINGS = frozenset(f.name for f in dataclasses.fields(CommConfig))


def _check_names(settings: Mapping[str, object]) -> None:
    """ConfigError naming the keys of ``settings`` that are no CommConfig setting."""
    unknown = sorted(set(settings) - _SETTINGS)
    if unknown:
        raise ConfigError(f"unknown setting(s) {', '.join(unknown)}; the settings are "
                          f"{', '.join(sorted(_SETTINGS))}")


def env_settings(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The ``COMM_*`` variables ``CommConfig.from_env()`` reads that are set (not blank),
    with their raw values, in field order: for a command that applies only some of them
    and names the others (``python -m comm demo`` / ``bench``)."""
    env = os.environ if environ is None else environ
    out: dict[str, str] = {}
    for f in dataclasses.fields(CommConfig):
        name = ENV_PREFIX + f.name.upper()
        if f.repr and env.get(name, "").strip():
            out[name] = env[name]
    return out


def _positive(cfg: CommConfig, attr: str, env: str, lo: int, hi: int) -> None:
    v = getattr(cfg, attr)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ConfigError(f"{env} ({attr}) must be an integer in {lo}..{hi}, got {v!r}")


def _parse(attr: str, env: str, raw: str) -> object:
    try:
        if attr == "shards":
            eps = tuple(s.strip() for s in raw.split(",") if s.strip())
            for ep in eps:
                if "://" not in ep:
                    raise ValueError(f"{ep!r} is not an endpoint like tcp://host:port")
            return eps
        if attr in ("request_timeout", "attempt_timeout", "stuck_log_after"):
            return float(raw)
        if attr in ("curve_secret", "curve_server_key", "metrics_addr"):
            return raw
        if attr == "verify_checksums":
            low = raw.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected 1/0, true/false, yes/no or on/off")
        return int(raw, 10)
    except ValueError as e:
        raise ConfigError(f"{env}={raw!r} is invalid: {e}") from None
