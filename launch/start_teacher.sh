#!/usr/bin/env bash
# Start a gold_jax teacher server with N local workers and wait until it answers.
#
#   launch/start_teacher.sh MODEL_DIR [N_WORKERS]
#
# MODEL_DIR is an HF-format folder (config.json, *.safetensors, tokenizer files).
# Environment (defaults): PORT=15555 WORKER_PORT=15556 HOST=127.0.0.1 (0.0.0.0 opens
# both sockets to the network) BACKEND=jax DTYPE=auto (float32|bfloat16|float16; auto =
# bfloat16 on accelerators, float32 on CPU) WORKERS=1 WAIT_S=900 LOG_DIR=./teacher_logs
# PYTHON=python. The server runs in the background (pid in $LOG_DIR/teacher_server.pid,
# log in $LOG_DIR/teacher_server.log); stop it with: kill $(cat $LOG_DIR/teacher_server.pid)
# More workers, here or on other hosts, can join a running server with
#   python -m gold_jax.teacher.worker --model MODEL_DIR --dtype auto --connect tcp://SERVER_HOST:15556
set -euo pipefail

MODEL="${1:?usage: launch/start_teacher.sh MODEL_DIR [N_WORKERS]}"
WORKERS="${2:-${WORKERS:-1}}"
PORT="${PORT:-15555}"
WORKER_PORT="${WORKER_PORT:-15556}"
HOST="${HOST:-127.0.0.1}"
BACKEND="${BACKEND:-jax}"
DTYPE="${DTYPE:-auto}"
WAIT_S="${WAIT_S:-900}"
LOG_DIR="${LOG_DIR:-./teacher_logs}"
PYTHON="${PYTHON:-python}"
# Several workers on one accelerator must not each grab most of its memory up front.
export XLA_PYTHON_CLIENT_PREALLOCATE="${XLA_PYTHON_CLIENT_PREALLOCATE:-false}"

[[ -d "$MODEL" ]] || { echo "start_teacher: model dir '$MODEL' does not exist" >&2; exit 2; }
[[ "$WORKERS" =~ ^[0-9]+$ ]] || { echo "start_teacher: N_WORKERS must be an integer, got '$WORKERS'" >&2; exit 2; }
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$LOG_DIR"
LOG="$LOG_DIR/teacher_server.log"
CONNECT_HOST="$HOST"
[[ "$HOST" == "0.0.0.0" || "$HOST" == "*" ]] && CONNECT_HOST=127.0.0.1
ADDR="tcp://$CONNECT_HOST:$PORT"

nohup "$PYTHON" -m gold_jax.teacher --model "$MODEL" --backend "$BACKEND" --dtype "$DTYPE" --host "$HOST" \
  --port "$PORT" --worker-port "$WORKER_PORT" --workers "$WORKERS" >"$LOG" 2>&1 &
PID=$!
echo "$PID" >"$LOG_DIR/teacher_server.pid"
echo "teacher server pid $PID on $ADDR (workers connect to port $WORKER_PORT); log: $LOG"

# Ping through the real client until all local workers have registered (loading a
# model and its first compile can take minutes); give up early if the server died.
deadline=$((SECONDS + WAIT_S))
until "$PYTHON" -m gold_jax.teacher.status --address "$ADDR" --workers "$WORKERS" --wait 5 >/dev/null 2>&1; do
  if ! kill -0 "$PID" 2>/dev/null; then
    echo "start_teacher: the server exited; last lines of $LOG:" >&2
    tail -n 30 "$LOG" >&2
    exit 1
  fi
  if (( SECONDS > deadline )); then
    echo "start_teacher: $ADDR not ready with $WORKERS worker(s) after ${WAIT_S}s; stopping it. Log: $LOG" >&2
    tail -n 30 "$LOG" >&2
    kill "$PID" 2>/dev/null || true
    exit 1
  fi
done

"$PYTHON" -m gold_jax.teacher.status --address "$ADDR" --workers "$WORKERS"
cat <<MSG

Teacher ready at $ADDR. Verify it (tokenizer check + one test score):
  python -m gold_jax.teacher.status --address $ADDR --tokenizer STUDENT_TOKENIZER_DIR --score
Train against it:   --config.teacher.address=$ADDR
Stop it:            kill \$(cat $LOG_DIR/teacher_server.pid)
MSG
