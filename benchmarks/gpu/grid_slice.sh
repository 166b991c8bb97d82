#!/usr/bin/env bash
# One device run: some attack rows of a paper grid (attacked model, then every defense of the
# grid on it), run by `tsbd bench` into an ignored folder of the checkout, and sent back as one
# small results file (rows, timings, versions; no model weights) to merge into the local store.
#
# On the device machine, from the checkout root, with a data archive copied into .device/data
# (ignored, carried):
#     OUT=$OUT benchmarks/gpu/grid_slice.sh paper-cifar10 badnets,blended [tsbd bench options...]
# Back here, with the folder the device tool returned:
#     tsbd merge FILES_AT/results --into runs/bench/paper-cifar10
#     tsbd report runs/bench/paper-cifar10 --grid paper-cifar10
# Each slice also registers the whole grid's cells (as pending), so the merged store knows which
# cells the table still lacks. Environment: DATA_ROOT (default .device/data), RESULTS (default
# .device/results: kept between calls on a warm machine, so a cut-off slice resumes there),
# BUDGET_SECONDS (default none: stop the slice with Ctrl-C after that long -- the running cell is
# handed back -- and still send back what finished; set it well inside the device call's limit).
set -uo pipefail
usage="usage: OUT=DIR grid_slice.sh GRID ATTACK[,ATTACK...] [tsbd bench options...]"
grid=${1:?$usage}
attacks=${2:?$usage}
shift 2
out=${OUT:?$usage}
data=${DATA_ROOT:-.device/data}
results=${RESULTS:-.device/results}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
list=$(python3 -c 'import json, sys; print(json.dumps(sys.argv[1].split(",")))' "$attacks") || exit 2

python3 -m tsbd bench "$grid" --data-root "$data" --results "$results" --register-only "$@" > /dev/null || exit $?
stop=()
if [ -n "${BUDGET_SECONDS:-}" ]; then stop=(timeout -s INT -k 60 "$BUDGET_SECONDS"); fi
"${stop[@]}" python3 -m tsbd bench "$grid" --data-root "$data" --results "$results" --set "attack=$list" \
    --set save_defended_models=false --quiet "$@"
status=$?
# whatever finished comes back, also when the slice failed or was cut short
python3 -m tsbd merge "$results" --into "$out/results" --no-artifacts || exit $?
exit $status
