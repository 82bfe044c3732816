#!/usr/bin/env bash
# The 1,000-edit comparison of docs/results/: r-ROME (one edit at a time) against MEMIT,
# EMMET and AlphaEdit (batches of 100, the published protocol) on the embedded SmolLM2,
# the unfiltered CounterFact split in file order; uncalibrated SST-2, perplexity, fluency and
# the retention of the first 100 edits every 100 edits.
# Start:  scripts/family_runs.sh start      Resume: scripts/family_runs.sh resume
# Each run is one process with one thread, writing into one SQLite database (WAL).
# The same comparison as a spec: rome-workbench compare docs/results/family-smollm2.toml
set -euo pipefail
cd "$(dirname "$0")/.."
DB=${DB:-docs/results/family-smollm2.db}
LOGS=${LOGS:-docs/results/logs}
PY=${PY:-.venv/bin/python}
mkdir -p "$LOGS"
COMMON=(--model smollm2-135m --dataset val --n-edits 1000 --glue-every 100 --glue-limit 200
        --glue-tasks sst2 --glue-calibration none --retention-size 100 --db "$DB")
launch() {  # name, args...
  local name=$1; shift
  OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 nohup nice -n "${NICE:-0}" "$PY" -m workbench.cli replay "$@" \
    >>"$LOGS/$name.log" 2>&1 &
  echo "$name: pid $!"
}
case "${1:-}" in
  start)
    launch rrome "${COMMON[@]}" --method rome --mode rrome
    sleep 30
    for m in memit emmet alphaedit; do
      launch "$m" "${COMMON[@]}" --method "$m" --batch-size 100
      sleep 30
    done
    ;;
  resume)
    for id in $(sqlite3 "$DB" "SELECT id FROM runs WHERE status != 'finished'"); do
      launch "resume-$id" --model smollm2-135m --db "$DB" --resume "$id"
    done
    ;;
  *) echo "usage: $0 start|resume" >&2; exit 2 ;;
esac
