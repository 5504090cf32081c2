#!/usr/bin/env bash
# The GPU check, for a machine with one NVIDIA GPU and PyPI access: installs the `gpu` extra,
# times LoRA steps of the training code on the GPU (no Ray), runs a few fine-tuning steps on a
# GPU Ray Train worker, one federated round with two GPU SuperNodes (DP-SGD), then serves on
# the GPU vLLM and benches it against bare vLLM on the same GPU. Prints one table; about 8
# minutes on one GPU.
#
#   bash scripts/gpu_check.sh            # the check
#   bash scripts/gpu_check.sh --dry-run  # configs load, commands resolve; needs no GPU
#
# Configs: configs/*/gpu.yaml cut down to one GPU (scripts/gpu_check_configs.py).
set -uo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=0
[ "${1:-}" = "--dry-run" ] && DRY_RUN=1
VENV=${GPU_CHECK_VENV:-.venv-gpu}
OUT=${GPU_CHECK_DIR:-.fedforge/gpu-check}
PY="$VENV/bin/python"
ROWS=()
FAILED=0

stage() {  # stage NAME COMMAND...: run (or, dry, show) one stage and record its row
  local name=$1; shift
  echo "[gpu-check] $name: $*"
  if [ "$DRY_RUN" = 1 ]; then
    ROWS+=("| $name | - | planned |")
    return 0
  fi
  local started=$SECONDS
  if "$@" >"$OUT/$name.log" 2>&1; then
    ROWS+=("| $name | $((SECONDS - started)) | ok |")
  else
    ROWS+=("| $name | $((SECONDS - started)) | FAILED (see $OUT/$name.log) |")
    FAILED=1
  fi
  tail -n 25 "$OUT/$name.log"
}

mkdir -p "$OUT"
if [ "$DRY_RUN" = 1 ]; then
  PY=${PYTHON:-.venv/bin/python}  # the development venv: nothing is installed
else
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
    || { echo "[gpu-check] no NVIDIA GPU visible"; exit 1; }
  if [ ! -x "$PY" ]; then
    "${PYTHON:-$(command -v python3.11 || command -v python3)}" -m venv "$VENV"
  fi
  stage install "$PY" -m pip install -q -e ".[gpu,dev]"
  stage model "$PY" -m llm.demo_model --state-dir .fedforge
fi

# Valid configs are the first check, GPU or not.
"$PY" scripts/gpu_check_configs.py --out "$OUT" || exit 1
for module in llm.finetune federated.run serve.deploy; do
  "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$module') is None)" \
    || { echo "[gpu-check] module $module does not resolve"; exit 1; }
done
for script in scripts/bench_serve.py scripts/gpu_train_step.py; do
  [ -f "$script" ] || { echo "[gpu-check] $script missing"; exit 1; }
done

# The training step alone on the GPU first: a broken GPU path fails here in a minute, no Ray.
stage train-step "$PY" scripts/gpu_train_step.py --model .fedforge/models/smollm2-135m-instruct
stage finetune "$PY" -m llm.finetune --config "$OUT/finetune.yaml" --state-dir .fedforge
stage federated "$PY" -m federated.run --config "$OUT/federated.yaml" --state-dir .fedforge
stage bench "$PY" scripts/bench_serve.py --config "$OUT/serve.yaml" \
  --finetune-config "$OUT/finetune.yaml" --levels 1,8,32 --tokens 32

echo
echo "| stage | seconds | result |"
echo "|---|---|---|"
printf '%s\n' "${ROWS[@]}"
if [ "$DRY_RUN" = 0 ] && [ -f "$OUT/bench.log" ]; then
  echo
  grep -E '^\|' "$OUT/bench.log"  # the bench's own tables: fedforge against bare vLLM
fi
exit $FAILED
