"""Bench output: the stdout table, the targets, the process-vs-thread ratios,
results.json and the PNG plots."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._setup import COPIES_PER_PAGE, COPY_PATH, CPU_METHOD

Cell = dict[str, Any]


def _f(v: Any, nd: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{nd}f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def table(cells: Sequence[Cell]) -> str:
    """One line per cell, grouped by latency and workload."""
    head = ("lat_ms", "workload", "design", "backends", "pages/s", "p50_ms", "p99_ms", "conns",
            "cpu_s/1k", "srv_cpu/1k", "pf_hit", "pf_waste", "verified", "wrong", "note")
    rows = [head]
    for c in cells:
        note = ""
        if c["workload"] == "mixed" and c["design"] != "raw":
            note = (f"random p99 alone {_f(c.get('random_p99_alone_ms'), 3)} -> "
                    f"mixed {_f(c.get('random_p99_mixed_ms'), 3)} ms")
        elif c["design"] == "raw":
            note = f"{c['pages_per_request']} page(s)/request, {_f(c['requests_per_s'], 0)} req/s"
        if c.get("errors"):
            note += f" errors={c['errors']}"
        pf = c.get("prefetch") or {}
        rows.append((_f(c["latency_ms"], 1), c["workload"], c["design"],
                     "-" if c["design"] == "raw" else str(c["backends"]),
                     _f(c["pages_per_s"], 0), _f(c["p50_ms"], 3), _f(c["p99_ms"], 3),
                     str(c["connections"]), _f(c["cpu_s_per_1k_pages"], 3),
                     _f(c["server_cpu_s_per_1k_pages"], 3), _f(pf.get("hits", 0)),
                     _f(pf.get("waste", 0)), _f(c["verified"]), _f(c["wrong"]), note))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(v.rjust(w) if i > 2 and i < len(head) - 1 else v.ljust(w)
                       for i, (v, w) in enumerate(zip(r, widths, strict=True))).rstrip()
             for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def _find(cells: Sequence[Cell], **kw: Any) -> list[Cell]:
    return [c for c in cells if all(c.get(k) == v for k, v in kw.items())]


def _best(cells: Sequence[Cell], **kw: Any) -> Cell | None:
    found = _find(cells, **kw)
    return max(found, key=lambda c: c["pages_per_s"]) if found else None


def _target(name: str, goal: str, measured: float | None, ok: bool | None,
            detail: str) -> dict[str, Any]:
    return {"target": name, "goal": goal,
            "measured": None if measured is None else round(measured, 3),
            "met": ok, "detail": detail}


def targets(cells: Sequence[Cell], shards: int) -> list[dict[str, Any]]:
    """The issue's targets as ratios of cells of THIS run (None = not measured)."""
    out = []
    raw_r = _best(cells, design="raw", workload="random", latency_ms=0.0)
    pc_r = _best(cells, design="pagecomm", workload="random", latency_ms=0.0)
    pc_s = _best(cells, design="pagecomm", workload="scan", latency_ms=0.0)
    if raw_r and pc_r:
        m = pc_r["pages_per_s"] / raw_r["pages_per_s"]
        out.append(_target("random reads, 0 ms: pagecomm / raw", ">= 0.60", m, m >= 0.6,
                           f"pagecomm {pc_r['pages_per_s']:,.0f} pages/s (best, "
                           f"{pc_r['backends']} backends) vs raw {raw_r['pages_per_s']:,.0f}"))
    else:
        out.append(_target("random reads, 0 ms: pagecomm / raw", ">= 0.60", None, None,
                           "needs raw and pagecomm random cells at latency 0"))
    if raw_r and pc_s:
        m = pc_s["pages_per_s"] / raw_r["requests_per_s"]
        out.append(_target("32-page prefetched scans, 0 ms: pagecomm pages/s / raw 1-page "
                           "round trips/s", ">= 3.0", m, m >= 3.0,
                           f"pagecomm scan {pc_s['pages_per_s']:,.0f} pages/s (best, "
                           f"{pc_s['backends']} backends) vs raw {raw_r['requests_per_s']:,.0f} "
                           f"round trips/s"))
    else:
        out.append(_target("32-page prefetched scans, 0 ms", ">= 3.0", None, None,
                           "needs raw random and pagecomm scan cells at latency 0"))
    for wl in ("random", "scan"):
        pc = _find(cells, design="pagecomm", workload=wl, latency_ms=0.5, backends=64)
        old = _find(cells, design="old", workload=wl, latency_ms=0.5, backends=64)
        name = f"{wl}, 0.5 ms, 64 backends, {shards} shards: pagecomm / old"
        if pc and old:
            m = pc[0]["pages_per_s"] / max(old[0]["pages_per_s"], 1e-9)
            cr = pc[0]["connections"] / max(old[0]["connections"], 1)
            ok = m >= 1.5 and cr <= 1 / 8 and shards == 4
            out.append(_target(name, ">= 1.5x, <= 1/8 connections (4 shards)", m, ok,
                               f"{pc[0]['pages_per_s']:,.0f} vs {old[0]['pages_per_s']:,.0f} "
                               f"pages/s; connections {pc[0]['connections']} vs "
                               f"{old[0]['connections']} ({cr:.3f})"))
        else:
            out.append(_target(name, ">= 1.5x", None, None,
                               "needs old and pagecomm cells at 0.5 ms with 64 backends"))
    return out + _latency_targets(cells)


def _latency_targets(cells: Sequence[Cell]) -> list[dict[str, Any]]:
    """The per-latency targets: mixed p99 and 16 -> 256 backend scaling."""
    out = []
    for lat in sorted({c["latency_ms"] for c in cells}):
        mixed = _find(cells, design="pagecomm", workload="mixed", latency_ms=lat)
        name = f"mixed, {lat:g} ms: random readers' p99 with scans / alone"
        if mixed:
            c = max(mixed, key=lambda c: c["backends"])
            a, b = c.get("random_p99_alone_ms"), c.get("random_p99_mixed_ms")
            m = b / a if a and b else None
            out.append(_target(name, "<= 1.5", m, None if m is None else m <= 1.5,
                               f"{c['backends']} backends (half scanning): p99 {_f(a, 3)} -> "
                               f"{_f(b, 3)} ms"))
    for lat in sorted({c["latency_ms"] for c in cells}):
        hi = _find(cells, design="pagecomm", workload="random", latency_ms=lat, backends=256)
        lo = _find(cells, design="pagecomm", workload="random", latency_ms=lat, backends=16)
        name = f"random, {lat:g} ms: 256 backends / 16 backends throughput"
        if hi and lo:
            m = hi[0]["pages_per_s"] / lo[0]["pages_per_s"]
            out.append(_target(name, ">= 0.90", m, m >= 0.9,
                               f"{hi[0]['pages_per_s']:,.0f} vs {lo[0]['pages_per_s']:,.0f}"))
        else:
            out.append(_target(name, ">= 0.90", None, None,
                               "needs pagecomm random cells with 16 and 256 backends"))
    return out


def targets_table(ts: Sequence[dict[str, Any]], judged: bool = True) -> str:
    """The targets' lines; a run that is not a measurement (--quick: a data set the
    prefetch buffer holds whole, 0.3 s cells) shows its ratios without a verdict."""
    lines = ["targets (ratios from this run):" if judged else
             "targets (ratios from this run, not judged: --quick only checks that every "
             "design works here; its data set fits the prefetch buffer)"]
    for t in ts:
        verdict = {True: "MET", False: "NOT MET", None: "not measured"}[t["met"]]
        if not judged and t["met"] is not None:
            verdict = "quick run"
        lines.append(f"  [{verdict:>12}] {t['target']}: {_f(t['measured'], 3)} "
                     f"(goal {t['goal']}); {t['detail']}")
    return "\n".join(lines)


def proc_vs_threads(cells: Sequence[Cell]) -> dict[str, Any]:
    """proc / pagecomm ratios for every (latency, workload, backends) run with both."""
    pairs = []
    for pc in _find(cells, design="pagecomm"):
        pr = _find(cells, design="proc", workload=pc["workload"], latency_ms=pc["latency_ms"],
                   backends=pc["backends"])
        if not pr:
            continue

        def ratio(key: str, a: Cell = pc, b: Cell = pr[0]) -> float | None:
            x, y = a.get(key), b.get(key)
            return round(y / x, 3) if x and y is not None else None

        pairs.append({"latency_ms": pc["latency_ms"], "workload": pc["workload"],
                      "backends": pc["backends"],
                      "threads_pages_per_s": pc["pages_per_s"],
                      "procs_pages_per_s": pr[0]["pages_per_s"],
                      "pages_per_s": ratio("pages_per_s"), "p50": ratio("p50_ms"),
                      "p99": ratio("p99_ms"), "cpu_per_page": ratio("cpu_s_per_1k_pages"),
                      "threads_connections": pc["connections"],
                      "procs_connections": pr[0]["connections"]})
    return {"ratio": "proc / pagecomm (process backends / thread backends)",
            "copies_per_page": {"processes": COPIES_PER_PAGE["proc"],
                                "threads": COPIES_PER_PAGE["pagecomm"]},
            "copy_path": {"processes": COPY_PATH["proc"], "threads": COPY_PATH["pagecomm"]},
            "cpu_method": {"processes": CPU_METHOD["proc"], "threads": CPU_METHOD["pagecomm"]},
            "pairs": pairs}


def proc_vs_threads_table(pvt: dict[str, Any]) -> str:
    lines = ["process vs thread backends (ratios proc / pagecomm, same run, same servers):"]
    for r in pvt["pairs"]:
        lines.append(f"  {r['workload']:>8}, {r['latency_ms']:g} ms, {r['backends']} backends: "
                     f"{r['procs_pages_per_s']:,.0f} vs {r['threads_pages_per_s']:,.0f} pages/s "
                     f"= {_f(r['pages_per_s'], 3)}x; p50 {_f(r['p50'], 2)}x, "
                     f"p99 {_f(r['p99'], 2)}x, CPU/page {_f(r['cpu_per_page'], 2)}x; "
                     f"connections {r['procs_connections']} vs {r['threads_connections']}")
    c = pvt["copies_per_page"]
    lines.append(f"  page copies per page read: processes {c['processes']} (reply frame -> "
                 f"bytes, -> shared-memory slot, -> backend's bytes), threads {c['threads']} "
                 f"(the bytes cut from the reply frame handed over)")
    return "\n".join(lines)


def write_json(path: Path, doc: dict[str, Any]) -> None:
    path.write_text(json.dumps(doc, indent=1, default=str) + "\n")


def plots(cells: Sequence[Cell], out: Path) -> list[Path]:
    """throughput_vs_backends.png and latency_cdf.png; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lats = sorted({c["latency_ms"] for c in cells})
    wls = [w for w in ("random", "scan", "mixed", "samescan")
           if any(c["workload"] == w for c in cells)]
    written = []
    for name, draw in (("throughput_vs_backends.png", _throughput),
                       ("latency_cdf.png", _cdf_plot)):
        fig, axes = plt.subplots(len(lats), len(wls), figsize=(4 * len(wls), 3.2 * len(lats)),
                                 squeeze=False)
        for i, lat in enumerate(lats):
            for j, wl in enumerate(wls):
                draw(axes[i][j], cells, lat, wl)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(out / name)
    return written


_COLORS = {"raw": "tab:gray", "old": "tab:red", "pagecomm": "tab:blue", "proc": "tab:green"}


def _throughput(ax: Any, cells: Sequence[Cell], lat: float, wl: str) -> None:
    for d in ("old", "pagecomm", "proc"):
        pts = sorted((c["backends"], c["pages_per_s"])
                     for c in _find(cells, design=d, workload=wl, latency_ms=lat))
        if pts:
            ax.plot(*zip(*pts, strict=True), "o-", color=_COLORS[d], label=d)
    raw = _find(cells, design="raw", latency_ms=lat,
                workload="random" if wl == "random" else "scan")
    if raw and wl != "mixed":
        ax.axhline(raw[0]["pages_per_s"], ls="--", color=_COLORS["raw"],
                   label=f"raw ({raw[0]['pages_per_request']} page/req)")
    ax.set_xscale("log", base=2)
    ax.set_title(f"{wl}, {lat:g} ms injected", fontsize=9)
    ax.set_xlabel("backends")
    ax.set_ylabel("pages/s")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7)


def _cdf_plot(ax: Any, cells: Sequence[Cell], lat: float, wl: str) -> None:
    """Per-call latency CDF of each design at its largest backend count."""
    for d in ("raw", "old", "pagecomm", "proc"):
        if d == "raw":
            found = _find(cells, design="raw", latency_ms=lat,
                          workload="random" if wl == "random" else "scan")
            if wl == "mixed":
                found = []
        else:
            found = _find(cells, design=d, workload=wl, latency_ms=lat)
        if not found or not found[0].get("cdf"):
            continue
        c = max(found, key=lambda c: c["backends"])
        ys = [k / len(c["cdf"]) for k in range(len(c["cdf"]))]
        label = d if d == "raw" else f"{d} ({c['backends']} backends)"
        ax.plot(c["cdf"], ys, color=_COLORS[d], label=label)
    ax.set_xscale("log")
    ax.set_title(f"{wl}, {lat:g} ms: per-call latency CDF", fontsize=9)
    ax.set_xlabel("ms")
    ax.set_ylabel("fraction of calls")
    ax.legend(fontsize=7)
