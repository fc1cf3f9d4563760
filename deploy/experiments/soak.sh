#!/usr/bin/env bash
# Soak: the embedded default for 60 minutes, sampling every role's RSS and the run's throughput;
# fails if any role's memory grows >= 10 % between minutes 10-15 and the last 5.
#   bash deploy/experiments/soak.sh [MINUTES=60] [OUT=runs/soak-<date>] [-- extra popo train flags]
# Short validation run: MINUTES=10 WARM=2,4 FINAL=2 bash deploy/experiments/soak.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
bash deploy/bootstrap.sh
OUT=${OUT:-runs/soak-$(date +%Y%m%d-%H%M%S)}
exec .venv/bin/python deploy/experiments/soak.py --minutes "${MINUTES:-60}" \
  --warm "${WARM:-10,15}" --final "${FINAL:-5}" --out "$OUT" "$@"
