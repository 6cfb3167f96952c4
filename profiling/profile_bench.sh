#!/usr/bin/env bash
# Profile one bench workload under py-spy: a flame graph (SVG) and a speedscope profile.
#
#   profiling/profile_bench.sh [workload] [design] [backends] [latency_ms] [seconds]
#   profiling/profile_bench.sh random pagecomm 64 0 5
#
# Writes profiling/out/<workload>-<design>-<backends>b-<latency>ms.{svg,speedscope.json}
# plus the bench's own results.json. --gil samples only the thread holding the GIL,
# which is what limits a Python process: the flame graph then shows where the GIL
# time goes (worker threads vs backend threads vs the bench's own bookkeeping).
# Extra py-spy flags can be passed in PYSPY_FLAGS (e.g. PYSPY_FLAGS="--native").
# Needs root (or ptrace permission) for py-spy to attach to its child.
set -euo pipefail
workload=${1:-random}
design=${2:-pagecomm}
backends=${3:-64}
latency=${4:-0}
seconds=${5:-5}
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
out=$here/out
mkdir -p "$out"
name=$workload-$design-${backends}b-${latency}ms
bench=("${PYTHON:-python3}" -m comm bench --workloads "$workload" --designs "$design" --backends "$backends"
       --latency-ms "$latency" --duration "$seconds" --no-plots --no-progress
       --out "$out/$name-bench")
cd "$root"
# py-spy needs the bench as its child; --subprocesses would also sample the page servers
py-spy record --gil --threads --rate 250 ${PYSPY_FLAGS:-} -o "$out/$name.svg" -- "${bench[@]}"
py-spy record --gil --threads --rate 250 ${PYSPY_FLAGS:-} --format speedscope \
    -o "$out/$name.speedscope.json" -- "${bench[@]}"
echo "flame graph: $out/$name.svg (open in a browser)"
echo "speedscope:  $out/$name.speedscope.json (drop on https://www.speedscope.app)"
