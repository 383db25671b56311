#!/bin/bash
# Growth against fixed depth over several seeds at once: the small model (growth.py --small) leaves
# a GPU mostly idle, so each seed's fixed and grown runs go as separate processes side by side
# (--runs), and their outputs, joined per seed, are read by growth.py --from-log, which prints
# each seed's fraction, the median and mean, and the fraction on the seed-averaged curves.
#
#   DATA=input.txt SEEDS="1337 1 2 3 7" STEPS=16000 OUT=growth-out bash benchmarks/growth_seeds.sh
#
# DEVICE (default cuda), BOUNDS (default 0.1,0.2), GROW (default stack). Each process is given
# one CPU thread; ten processes shared one H100 and 16 cores in the 2026-11-23 runs (commit b61689f).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${DATA:?set DATA to the tiny Shakespeare input.txt}"
SEEDS=${SEEDS:-"1337 1 2 3 7"}; STEPS=${STEPS:-8000}; OUT=${OUT:-growth-seeds}
DEVICE=${DEVICE:-cuda}; BOUNDS=${BOUNDS:-0.1,0.2}; GROW=${GROW:-stack}
mkdir -p "$OUT"
export OMP_NUM_THREADS=1
pids=(); names=()
common=(--small --steps "$STEPS" --grow "$GROW" --bounds "$BOUNDS" --data "$DATA")
for s in $SEEDS; do
  for r in fixed grown; do
    python3 benchmarks/growth.py "${common[@]}" --seed "$s" --device "$DEVICE" --runs $r > "$OUT/seed$s-$r.txt" 2>&1 &
    pids+=("$!"); names+=("$OUT/seed$s-$r.txt")
  done
done
t0=$(date +%s)
while [ -n "$(jobs -r)" ]; do
  sleep "${POLL:-30}"
  now=$(date +%s); evals=$(cat "$OUT"/seed*-*.txt | grep -c "^step " || true)
  echo "$((now - t0)) s: $evals evaluations so far"
done
failed=0
for i in "${!pids[@]}"; do  # bash keeps each finished child's exit status for wait PID
  if ! wait "${pids[$i]}"; then
    echo "growth_seeds.sh: a run failed; its output: ${names[$i]}" >&2
    failed=1
  fi
done
[ "$failed" = 0 ] || exit 1
logs=()
for s in $SEEDS; do
  cat "$OUT/seed$s-fixed.txt" "$OUT/seed$s-grown.txt" > "$OUT/growth-small-$STEPS-seed$s.txt"
  logs+=("$OUT/growth-small-$STEPS-seed$s.txt")
done
python3 benchmarks/growth.py "${common[@]}" --from-log "${logs[@]}"
