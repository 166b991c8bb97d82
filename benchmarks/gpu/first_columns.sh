#!/usr/bin/env bash
# One device run: several grids side by side on one GPU, each in two `tsbd bench` runs on one store --
# the first columns (no defense, TSBD and the grid's named rival) with W1 workers, every column with
# W2 more workers started 20 s later (they take the attack cells the first run left, then the rest) --
# all stopped with SIGTERM (the running cells are handed back) END_SECONDS after the start, and each
# grid's store sent back as one small results file (rows, timings, versions; no model weights).
#
# On the device machine, from the checkout root, with the data in .device/data (ignored, carried):
#     OUT=$OUT END_SECONDS=520 benchmarks/gpu/first_columns.sh gtsrb:paper-gtsrb-cpu:nc vgg:paper-cifar10-vgg-cpu:anp
# Back here, per grid:
#     tsbd merge FILES_AT/gtsrb --into runs/bench/paper-gtsrb-cpu
# Environment: DATA_ROOT (default .device/data), WORK (stores and caches, default .device), W1 (default 5),
# W2 (default 3), STAGGER_SECONDS (default 20), END_SECONDS (default 520); arguments after "--" go to
# every `tsbd bench` run (e.g. -- --device cpu).
set -uo pipefail
usage="usage: OUT=DIR first_columns.sh NAME:GRID:RIVAL [NAME:GRID:RIVAL...]"
specs=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do specs+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
extra=("$@")
[ ${#specs[@]} -ge 1 ] || { echo "$usage" >&2; exit 2; }
out=${OUT:?$usage}
data=${DATA_ROOT:-.device/data}
end=${END_SECONDS:-520}
w1=${W1:-5}
w2=${W2:-3}
work=${WORK:-.device}
stagger=${STAGGER_SECONDS:-20}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
t0=$SECONDS
mkdir -p "$out/logs"

one_grid() {
  local name=$1 grid=$2 rival=$3 res=$work/res-$1 cache=$work/cache-$1 left
  python3 -m tsbd bench "$grid" --data-root "$data" --results "$res" --register-only > /dev/null || return
  echo "$name: started at $((SECONDS - t0)) s" >> "$out/env.txt"
  left=$((end - (SECONDS - t0)))
  timeout -s TERM -k 40 "$left" python3 -m tsbd bench "$grid" --data-root "$data" --results "$res" \
      --cache-dir "$cache" --set "defense=[\"none\",\"tsbd\",\"$rival\"]" --set save_defended_models=false \
      --workers "$w1" --threads "$w1" --no-compile --quiet "${extra[@]}" > "$out/logs/$name-first.txt" 2>&1 &
  local first=$!
  sleep "$stagger"
  left=$((end - (SECONDS - t0)))
  timeout -s TERM -k 40 "$left" python3 -m tsbd bench "$grid" --data-root "$data" --results "$res" \
      --cache-dir "$cache" --set save_defended_models=false --workers "$w2" --threads "$w2" --no-compile \
      --quiet "${extra[@]}" > "$out/logs/$name-rest.txt" 2>&1
  echo "$name: every column stopped with $? at $((SECONDS - t0)) s" >> "$out/env.txt"
  wait "$first"
  echo "$name: first columns stopped with $? at $((SECONDS - t0)) s" >> "$out/env.txt"
  # whatever finished comes back, also when a run failed or was cut short
  python3 -m tsbd merge "$res" --into "$out/$name" --no-artifacts >> "$out/env.txt" 2>&1
}

pids=()
for spec in "${specs[@]}"; do
  IFS=: read -r name grid rival <<< "$spec"
  [ -n "$name" ] && [ -n "$grid" ] && [ -n "$rival" ] || { echo "$usage" >&2; exit 2; }
  one_grid "$name" "$grid" "$rival" &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done  # the grids only: a monitor started beside them is not waited for
