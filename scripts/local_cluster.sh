#!/usr/bin/env bash
# A multi-node Ray cluster on this machine, plus an MLflow tracking server: for trying fedforge
# on "a cluster" and for the multi-node tests (tests/multinode/).
#
#   scripts/local_cluster.sh up       # head + 2 worker nodes (each its own raylet and node id)
#   scripts/local_cluster.sh status   # nodes, their resources, the MLflow server
#   scripts/local_cluster.sh down     # stops exactly the processes `up` started
#
# Then, from the repository root (the cluster uses Ray's token authentication):
#   export RAY_AUTH_MODE=token
#   .venv/bin/fedforge demo --profile tiny --address http://127.0.0.1:8266 \
#       --tracking-uri http://127.0.0.1:5055
#
# Every node is a separate `ray start --block` process in its own process group; `down` stops
# those groups by their recorded pids (never `ray stop`, which would stop every Ray process on
# the host, other people's clusters included). The dashboard and MLflow listen on 127.0.0.1;
# Ray advertises this machine's IP for every node (it replaces 127.0.0.1 itself) and binds GCS
# and raylet ports on all interfaces, so Ray's token authentication stays on. Ports are not
# Ray's defaults: this cluster runs beside a default local head (6379/8265). Settings:
#   FEDFORGE_CLUSTER_DIR  state: pids, logs, MLflow store (default ./.fedforge/cluster)
#   GCS_PORT=6390 DASHBOARD_PORT=8266 MLFLOW_PORT=5055 CLIENT_PORT=10091
#   HEAD_CPUS=0 WORKERS=2 WORKER_CPUS=2   logical CPUs (they may exceed the physical ones)
#   OBJECT_STORE_MB=400                   object store per node
#   RAY_TMP                               Ray's temp dir root (short: it holds Unix sockets)
# `up --no-mlflow` starts Ray only.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV_BIN=${VENV_BIN:-$ROOT/.venv/bin}
DIR=${FEDFORGE_CLUSTER_DIR:-./.fedforge/cluster}
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
GCS_PORT=${GCS_PORT:-6390}
DASHBOARD_PORT=${DASHBOARD_PORT:-8266}
MLFLOW_PORT=${MLFLOW_PORT:-5055}
CLIENT_PORT=${CLIENT_PORT:-10091}
HEAD_CPUS=${HEAD_CPUS:-0}
WORKERS=${WORKERS:-2}
WORKER_CPUS=${WORKER_CPUS:-2}
OBJECT_STORE_MB=${OBJECT_STORE_MB:-400}
# Unix socket paths must stay under ~107 characters: keep Ray's temp dir short, one per cluster.
RAY_TMP=${RAY_TMP:-/tmp/ffc-$(printf '%s' "$DIR" | cksum | cut -d' ' -f1)}
HOST=127.0.0.1
PIDS=$DIR/pids
LOGS=$DIR/logs
DASHBOARD=http://$HOST:$DASHBOARD_PORT

# Jobs run `python -m ...` on the nodes: the venv's python must come first on their PATH.
export PATH="$VENV_BIN:$PATH"
export RAY_USAGE_STATS_ENABLED=0
# Ray 2.60's token authentication, on every node (a worker node does not turn it on by itself);
# the token is ~/.ray/auth_token (or $RAY_AUTH_TOKEN), made on first use.
export RAY_AUTH_MODE=token
# Ray's own helpers (e.g. Ray Train's placement-group cleaner) find "the" cluster by looking for
# GCS processes on the host: with other clusters on this machine they would find several.
export RAY_ADDRESS=$HOST:$GCS_PORT

log() { echo "[local_cluster] $*"; }

alive() { [ -f "$PIDS/$1.pid" ] && kill -0 "$(cat "$PIDS/$1.pid")" 2>/dev/null; }

start_group() { # name, command...: run in a new session (pgid = pid), record the pid
  local name=$1
  shift
  setsid "$@" >"$LOGS/$name.log" 2>&1 </dev/null &
  echo $! >"$PIDS/$name.pid"
}

node_args() { # index: ports that must differ between nodes on one host
  local i=$1
  echo --node-ip-address "$HOST" --block --disable-usage-stats \
    --temp-dir "$RAY_TMP/n$i" \
    --object-store-memory $((OBJECT_STORE_MB * 1024 * 1024)) \
    --dashboard-agent-listen-port $((52400 + i)) \
    --min-worker-port $((20000 + 200 * i)) --max-worker-port $((20199 + 200 * i))
}

auth_header() { # Ray 2.60 enables token auth by default: its HTTP APIs want the token
  local token=${RAY_AUTH_TOKEN:-}
  [ -z "$token" ] && [ -f "$HOME/.ray/auth_token" ] && token=$(cat "$HOME/.ray/auth_token")
  echo "Authorization: Bearer $token"
}

alive_nodes() { # how many nodes the GCS reports alive (0 when the dashboard is not up)
  curl -sf -H "$(auth_header)" "$DASHBOARD/api/v0/nodes?limit=100&detail=false" 2>/dev/null \
    | grep -o '"state": *"ALIVE"' | wc -l || true
}

wait_for() { # seconds, description, test command...
  local seconds=$1 what=$2
  shift 2
  local deadline=$((SECONDS + seconds))
  until "$@"; do
    if ((SECONDS > deadline)); then
      log "timed out waiting for $what; logs in $LOGS"
      return 1
    fi
    sleep 1
  done
}

nodes_up() { [ "$(alive_nodes)" -ge $((WORKERS + 1)) ]; }
mlflow_up() { curl -sf "http://$HOST:$MLFLOW_PORT/health" >/dev/null 2>&1; }

up() {
  local with_mlflow=1
  [ "${1:-}" = "--no-mlflow" ] && with_mlflow=0
  if alive head; then
    log "already up (head pid $(cat "$PIDS/head.pid")); '$0 down' first"
    return 1
  fi
  mkdir -p "$PIDS" "$LOGS" "$RAY_TMP"
  if [ -z "${RAY_AUTH_TOKEN:-}" ] && [ ! -s "$HOME/.ray/auth_token" ]; then
    ray get-auth-token --generate >/dev/null
  fi
  local started=$SECONDS
  if ((with_mlflow)); then
    mkdir -p "$DIR/mlflow/artifacts"
    # Artifacts go through the server (mlflow-artifacts:/), so every node reaches them by HTTP.
    # Its job runner (GenAI scorers; ~7 huey processes) is not used by fedforge: off.
    MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false start_group mlflow mlflow server \
      --backend-store-uri "sqlite:///$DIR/mlflow/mlflow.db" \
      --artifacts-destination "$DIR/mlflow/artifacts" \
      --host "$HOST" --port "$MLFLOW_PORT" --workers 1
  fi
  # shellcheck disable=SC2046
  start_group head ray start --head --port "$GCS_PORT" --num-cpus "$HEAD_CPUS" \
    --include-dashboard true --dashboard-host "$HOST" --dashboard-port "$DASHBOARD_PORT" \
    --ray-client-server-port "$CLIENT_PORT" $(node_args 0)
  wait_for 90 "the head" nodes_up_head || { down; return 1; }
  for i in $(seq 1 "$WORKERS"); do
    # shellcheck disable=SC2046
    start_group "worker$i" ray start --address "$HOST:$GCS_PORT" --num-cpus "$WORKER_CPUS" \
      $(node_args "$i")
  done
  wait_for 90 "$WORKERS worker nodes" nodes_up || { down; return 1; }
  if ((with_mlflow)); then
    wait_for 90 "the MLflow server" mlflow_up || { down; return 1; }
  fi
  log "up in $((SECONDS - started)) s: head + $WORKERS worker nodes"
  log "  Ray address (drivers):  $HOST:$GCS_PORT"
  log "  job address / dashboard: $DASHBOARD"
  ((with_mlflow)) && log "  MLflow tracking URI:    http://$HOST:$MLFLOW_PORT"
  log "  Ray token auth is on: clients need RAY_AUTH_MODE=token (token: ~/.ray/auth_token)"
  return 0
}

nodes_up_head() { [ "$(alive_nodes)" -ge 1 ]; }

stop_groups() { # names...: SIGTERM their process groups together, SIGKILL what is left after
  local name pid pids=() deadline=$((SECONDS + ${STOP_GRACE_S:-15}))
  for name in "$@"; do
    [ -f "$PIDS/$name.pid" ] && pids+=("$(cat "$PIDS/$name.pid")")
  done
  for pid in "${pids[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do
    while kill -0 -- "-$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.5; done
    kill -KILL -- "-$pid" 2>/dev/null || true
  done
  for name in "$@"; do rm -f "$PIDS/$name.pid"; done
}

stray_pids() { # processes of this cluster that left its groups: they name its temp dir
  local pid
  for pid in $(pgrep -f -- "$RAY_TMP/" || true); do
    [ "$pid" != "$$" ] && echo "$pid"
  done
}

down() {
  # Worker nodes, head and MLflow at once: a node drains for up to 30 s on SIGTERM (nothing
  # to drain here), so the grace is short and the rest of the group is killed.
  # shellcheck disable=SC2046
  stop_groups $(ls "$PIDS" 2>/dev/null | sed -n 's/\.pid$//p')
  local stray
  stray=$(stray_pids)
  if [ -n "$stray" ]; then
    log "stopping processes that left their node's group: $(echo "$stray" | tr '\n' ' ')"
    # shellcheck disable=SC2086
    kill -KILL $stray 2>/dev/null || true
  fi
  rm -rf "$RAY_TMP"
  log "down"
}

status() {
  local name
  for name in $(ls "$PIDS" 2>/dev/null | sed 's/\.pid$//'); do
    if alive "$name"; then
      log "$name: running (pid $(cat "$PIDS/$name.pid"))"
    else
      log "$name: not running"
    fi
  done
  if curl -sf -H "$(auth_header)" "$DASHBOARD/api/v0/nodes?limit=1" >/dev/null 2>&1; then
    "$VENV_BIN/python" - "$DASHBOARD" <<'EOF'
import sys
from ray.util.state import list_nodes

for node in list_nodes(address=sys.argv[1], detail=True):
    role = "head" if node.is_head_node else "worker"
    cpus = node.resources_total.get("CPU", 0)
    print(f"[local_cluster] {role:6} {node.node_id[:12]} {node.state:5} CPU={cpus:g} {node.node_ip}")
EOF
  else
    log "Ray: not reachable at $DASHBOARD"
  fi
  if mlflow_up; then log "MLflow: http://$HOST:$MLFLOW_PORT (healthy)"; else log "MLflow: down"; fi
}

case "${1:-}" in
  up) shift; up "$@" ;;
  down) down ;;
  status) status ;;
  *)
    echo "usage: $0 up [--no-mlflow] | down | status" >&2
    exit 2
    ;;
esac
