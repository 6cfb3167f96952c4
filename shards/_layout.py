"""A sharded page store: a directory with ``layout.json`` (shard count, stripe size)
and one PageStore per shard in ``shard-NNNN``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ._errors import InvalidArgument, StoreError
from ._shardmap import check_shard_params
from ._store import PageStore, _int

LAYOUT_FILE = "layout.json"
LAYOUT_VERSION = 1


def shard_store_path(store_dir: str | os.PathLike[str], shard: int) -> Path:
    """Directory of shard ``shard``'s store inside a sharded store directory."""
    return Path(store_dir) / f"shard-{_int('shard', shard, 0, 254):04d}"


def write_layout(store_dir: str | os.PathLike[str], shard_count: int, stripe_size: int) -> None:
    """Create ``store_dir`` and write its ``layout.json`` (atomically)."""
    check_shard_params(shard_count, stripe_size)
    d = Path(store_dir)
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / (LAYOUT_FILE + ".tmp")
    tmp.write_text(json.dumps({"shard_count": shard_count, "stripe_size": stripe_size,
                               "version": LAYOUT_VERSION}) + "\n")
    os.replace(tmp, d / LAYOUT_FILE)


def read_layout(store_dir: str | os.PathLike[str]) -> dict[str, int]:
    """``{shard_count, stripe_size, version}`` of a sharded store directory."""
    path = Path(store_dir) / LAYOUT_FILE
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise StoreError(f"{path} not found: {store_dir} is not a sharded page store") from None
    except (OSError, ValueError) as e:
        raise StoreError(f"cannot read {path}: {e}") from None
    if not isinstance(raw, dict) or raw.get("version") != LAYOUT_VERSION:
        raise StoreError(f"{path}: unknown layout version {raw.get('version')!r}"
                         if isinstance(raw, dict) else f"{path}: not a JSON object")
    try:
        check_shard_params(raw.get("shard_count"), raw.get("stripe_size"))  # type: ignore[arg-type]
    except ValueError as e:
        raise StoreError(f"{path}: {e}") from None
    return {"shard_count": raw["shard_count"], "stripe_size": raw["stripe_size"],
            "version": raw["version"]}


def open_shard_store(store_dir: str | os.PathLike[str], shard: int, readonly: bool = False,
                     **kwargs: Any) -> PageStore:
    """Open shard ``shard`` of the sharded store directory ``store_dir``.

    ``store_dir`` must already be a sharded store (hold a layout.json, written by
    :func:`write_layout`, generate_store or import_pgdata): StoreError otherwise,
    so a mistyped path is reported rather than silently made an empty store.
    InvalidArgument if ``shard`` is outside the layout's shard count. Writable
    (the default), the shard's PageStore is created when the store has none yet
    (generate_store and import_pgdata fill new stores so); ``readonly=True``
    needs it to exist (StoreError)."""
    path = shard_store_path(store_dir, shard)
    count = read_layout(store_dir)["shard_count"]  # StoreError: not a sharded page store
    if shard >= count:
        raise InvalidArgument(f"shard={shard} is outside 0..{count - 1} of {store_dir}")
    return PageStore(path, readonly=readonly, **kwargs)


_LAYOUT_KEYS = ("shard", "shard_count", "stripe_size")


def check_store_layout(store: PageStore, shard: int, shard_count: int,
                       stripe_size: int) -> None:
    """InvalidArgument (a ShardsError) naming both layouts if ``store.meta()`` records
    a shard, shard_count or stripe_size other than the ones given: serving a store
    under another map answers "not found" for pages it holds. Keys the meta record
    lacks are not checked (a plain PageStore has none); with one shard on both sides
    the stripe size maps nothing and is not compared."""
    meta_of = getattr(store, "meta", None)
    if meta_of is None:
        return
    meta = meta_of()
    recorded = {k: meta[k] for k in _LAYOUT_KEYS if k in meta}
    given = {"shard": shard, "shard_count": shard_count, "stripe_size": stripe_size}
    if shard_count == 1 and recorded.get("shard_count", 1) == 1:
        recorded.pop("stripe_size", None)
    if all(given[k] == v for k, v in recorded.items()):
        return

    def describe(layout: dict[str, Any]) -> str:
        return ", ".join(f"{k}={layout[k]!r}" for k in _LAYOUT_KEYS if k in layout)

    raise InvalidArgument(
        f"page store {getattr(store, 'path', store)} holds {describe(recorded)}, but the "
        f"server was asked to serve {describe(given)}: a server must serve its store with "
        f"the layout the store was written for")
