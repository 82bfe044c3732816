#!/usr/bin/env bash
# The long research replays of docs/results/ (SmolLM2, CounterFact val split in file order).
# Start:  scripts/research_runs.sh start      Resume: scripts/research_runs.sh resume
# Extend the finished runs to N edits in all (the next records of the same split):
#         scripts/research_runs.sh extend N
# Each run is one process with one thread, writing into one SQLite database (WAL).
set -euo pipefail
cd "$(dirname "$0")/.."
DB=docs/results/long-smollm2.db
LOGS=docs/results/logs
mkdir -p "$LOGS"
COMMON=(--model smollm2-135m-fast --dataset val --n-edits 300 --glue-every 20 --glue-limit 50
        --glue-calibration contextual --db "$DB")
launch() {  # name, args...
  local name=$1; shift
  OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 nohup .venv/bin/rome-workbench replay "$@" \
    >>"$LOGS/$name.log" 2>&1 &
  echo "$name: pid $!"
}
case "${1:-}" in
  start)
    launch original "${COMMON[@]}" --mode original
    sleep 20
    launch rrome "${COMMON[@]}" --mode rrome
    sleep 20
    launch rrome-nas "${COMMON[@]}" --mode rrome --norm-anchor
    ;;
  resume)
    for id in $(sqlite3 "$DB" "SELECT id FROM runs WHERE status != 'finished'"); do
      launch "resume-$id" --model smollm2-135m-fast --db "$DB" --resume "$id"
    done
    ;;
  extend)
    n=${2:?usage: $0 extend N}
    for id in $(sqlite3 "$DB" "SELECT id FROM runs WHERE status = 'finished'"); do
      launch "extend-$id" --model smollm2-135m-fast --db "$DB" --resume "$id" --extend-to "$n"
    done
    ;;
  *) echo "usage: $0 start|resume|extend N" >&2; exit 2 ;;
esac
