#!/usr/bin/env bash
# Show a stuck request: start a communicator against a page server that is then
# frozen (SIGSTOP via LocalCluster.freeze), and py-spy dump the process while its
# backend threads wait. Prints the dump, then the communicator's own view of the
# stuck request (dump_inflight) and stats. Usage: profiling/dump_stuck.sh
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cd "$(dirname "$here")"
"${PYTHON:-python3}" "$here/stuck_app.py" &
app=$!
trap 'kill "$app" 2>/dev/null || true; wait "$app" 2>/dev/null || true' EXIT
# wait until the app says its request is stuck
for _ in $(seq 100); do
    [ -e "/tmp/pagecomm-stuck-$app" ] && break
    sleep 0.1
done
echo "=== py-spy dump --pid $app (all threads, with locals) ==="
py-spy dump --pid "$app" --locals
touch "/tmp/pagecomm-stuck-$app.done"
wait "$app"
trap - EXIT
rm -f "/tmp/pagecomm-stuck-$app" "/tmp/pagecomm-stuck-$app.done"
