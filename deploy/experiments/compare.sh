#!/usr/bin/env bash
# POPO vs GRPO vs WAPO on the embedded task (3 seeds each), and async vs synchronous POPO.
# Every run is the embedded default (`popo train`) with one switch changed; runs go one after
# another so they never share the machine. Results: runs/compare/*, report.png and table.md there.
#   bash deploy/experiments/compare.sh [SEEDS="0 1 2"] [ALGOS="popo grpo wapo"]
set -euo pipefail
cd "$(dirname "$0")/../.."
bash deploy/bootstrap.sh
POPO=.venv/bin/popo
OUT=${OUT:-runs/compare}
SEEDS=${SEEDS:-0 1 2}
ALGOS=${ALGOS:-popo grpo wapo}
mkdir -p "$OUT"
run() {  # name, flags...
  local name=$1; shift
  if [ -f "$OUT/$name/summary.json" ]; then echo "[compare] $name done already"; return; fi
  rm -rf "${OUT:?}/$name"
  echo "[compare] $name: $*"
  "$POPO" train --deploy.run_dir "$OUT/$name" "$@" > "$OUT/$name.log" 2>&1
  tail -2 "$OUT/$name.log"
}
for algo in $ALGOS; do
  for seed in $SEEDS; do
    run "$algo-s$seed" --algorithm.name "$algo" --learner.seed "$seed" --actor.seed "$seed"
  done
done
# async (max_staleness 1, the default) vs synchronous (0): same seed, evaluated every 25 steps
run "async-s0" --learner.eval_every 25
run "sync-s0" --learner.eval_every 25 --learner.max_staleness 0
dirs=$(for algo in $ALGOS; do for seed in $SEEDS; do echo "$OUT/$algo-s$seed"; done; done)
# shellcheck disable=SC2086
"$POPO" report $dirs --table --out "$OUT/algorithms.png" | tail -n +2 > "$OUT/table.md"
"$POPO" report "$OUT/async-s0" "$OUT/sync-s0" --table --out "$OUT/async_vs_sync.png" | tail -n +2 >> "$OUT/table.md"
cat "$OUT/table.md"
