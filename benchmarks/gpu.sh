#!/usr/bin/env bash
# Runs every benchmark of benchmarks/ at GPU sizes and writes their JSON to
# benchmarks/results/gpu/ (and each one's output to results/gpu/logs/NAME.log).
#
#   benchmarks/gpu.sh                      # on a GPU machine (refuses a CPU-only jax)
#   benchmarks/gpu.sh --only overhead,transformer
#   benchmarks/gpu.sh --smoke              # the same command lines, shrunk, on the CPU,
#                                          # into a temporary folder: checks that every
#                                          # script and flag works before a GPU is found
#   benchmarks/gpu.sh --dry-run            # print the commands only
#   benchmarks/gpu.sh --list               # the benchmark names
#
# Environment: PY (default .venv/bin/python), OUT (default benchmarks/results/gpu; with
# --smoke a temporary folder). --force runs the GPU command lines on whatever jax finds.
#
# Sizes: the DeepOBS shapes of benchmarks/problems.py (mnist_mlp, cifar10_3c3d,
# fmnist_2c2d, batch 128) are GPU-sized already and all three are run; the transformer
# runs at --size gpu (d_model 512, 8 heads, 8 blocks, 256 bytes x batch 64), in float32
# (both layouts, peak device memory per variant in fresh processes) and with bfloat16
# parameters and compute (scanned). Its sharding part (per-device bytes on 1/2/4/8
# devices) is a property of the layout, measured on simulated CPU devices by the CPU run
# (benchmarks/results/transformer.json), so it is skipped here.
#
# In --smoke mode each command line gets shrinking flags appended (argparse keeps the last
# value), so the GPU flags are parsed too. Targets (issue 17): transformer economy <= 1.05x
# and full <= 3x the bare step.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PY:-.venv/bin/python}"
MODE=gpu
ONLY=""
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) MODE=smoke ;;
    --dry-run) MODE=dry ;;
    --force) MODE=force ;;
    --list) MODE=list ;;
    --only) shift; ONLY="${1:-}" ;;
    --only=*) ONLY="${1#--only=}" ;;
    -h|--help) sed -n '2,/^set -uo/{/^set -uo/!p}' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done

if [ "$MODE" = smoke ]; then
  OUT="${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/jaxscope-gpu-smoke.XXXXXX")}"
  export JAX_PLATFORMS=cpu
else
  OUT="${OUT:-benchmarks/results/gpu}"
fi

# name | script and its GPU flags | flags appended in --smoke mode
BENCHMARKS=(
  "overhead|overhead.py --problems mnist_mlp,cifar10_3c3d,fmnist_2c2d --out $OUT/overhead.json|--problems mnist_mlp --reps 1 --presets economy"
  "overhead-every10|overhead.py --problems mnist_mlp,cifar10_3c3d,fmnist_2c2d --every 10 --out $OUT/overhead-every10.json|--problems mnist_mlp --reps 1 --presets economy"
  "overhead-every10-host|overhead.py --problems mnist_mlp,cifar10_3c3d,fmnist_2c2d --every 10 --skip host --out $OUT/overhead-every10-host.json|--problems mnist_mlp --reps 1 --presets economy"
  "cockpit_presets|cockpit_presets.py --problems mnist_mlp,cifar10_3c3d,fmnist_2c2d --out $OUT/cockpit-presets.json|--problems mnist_mlp --reps 1 --no-memory"
  "throughput|throughput.py --problems digits,mnist_mlp --out $OUT/throughput.json|--problems digits --chunks 1 --chunk-steps 2"
  "ratio_lr|ratio_lr.py --problems mnist_mlp,cifar10_3c3d,fmnist_2c2d --out $OUT/ratio-lr.json|--problems mnist_mlp --reps 1"
  "preconditioner|preconditioner.py --problems mnist_mlp,fmnist_2c2d --measured-epochs 3 --out $OUT/preconditioner.json|--problems mnist_mlp --reps 1 --epoch 15"
  "costs|costs.py --problems mnist_mlp,cifar10_3c3d,fmnist_2c2d --out $OUT/costs.json|--problems mnist_mlp --reps 1 --block 1 --rows instruments/economy,xla_floor/instruments/economy"
  "peak_memory|peak_memory.py --problems mnist_mlp,cifar10_3c3d,fmnist_2c2d --out $OUT/peak-memory.json|--problems mnist_mlp --batches 8,16"
  "landscape|landscape.py --eval all --wait 0 --out $OUT/landscape.json|--grid 3 --loop-points 2 --reps 1 --epochs 1"
  "transformer|transformer.py --size gpu --no-sharding --out $OUT/transformer.json|--size tiny --reps 1 --variants bare,economy --layouts scan --no-rss --no-sharding"
  "transformer-bf16|transformer.py --size gpu --dtype bfloat16 --param-dtype bfloat16 --layouts scan --no-rss --no-sharding --out $OUT/transformer-bf16.json|--size tiny --reps 1 --variants bare,economy --layouts scan --no-rss --no-sharding"
)

if [ "$MODE" = list ]; then
  for entry in "${BENCHMARKS[@]}"; do echo "${entry%%|*}"; done
  exit 0
fi

if [ -n "$ONLY" ]; then
  IFS=',' read -r -a WANTED <<< "$ONLY"
  for w in "${WANTED[@]}"; do
    found=0
    for entry in "${BENCHMARKS[@]}"; do [ "${entry%%|*}" = "$w" ] && found=1; done
    if [ "$found" = 0 ]; then
      echo "gpu.sh: --only: unknown benchmark '$w' (gpu.sh --list)" >&2
      exit 2
    fi
  done
fi

wanted() {
  [ -z "$ONLY" ] && return 0
  local w
  for w in "${WANTED[@]}"; do [ "$w" = "$1" ] && return 0; done
  return 1
}

if [ "$MODE" != dry ]; then
  if [ ! -x "$PY" ] && ! command -v "$PY" > /dev/null; then
    echo "gpu.sh: no python at '$PY' (make venv, or set PY)" >&2
    exit 2
  fi
  if [ "$MODE" = gpu ]; then
    backend="$("$PY" -c 'import jax; print(jax.default_backend())' 2>/dev/null)"
    if [ "$backend" != gpu ]; then
      echo "gpu.sh: jax's backend is '${backend:-unknown}', not gpu; install jax[cuda12]" \
        "(or run --smoke / --force)" >&2
      exit 2
    fi
  fi
  mkdir -p "$OUT/logs"
  {
    date -u +"%Y-%m-%dT%H:%M:%SZ"
    git describe --always --dirty 2>/dev/null || true
    "$PY" -c 'import jax; print(jax.__version__, jax.devices())' 2>&1
    command -v nvidia-smi > /dev/null && nvidia-smi
  } > "$OUT/logs/environment.txt" 2>&1
fi

FAILED=()
for entry in "${BENCHMARKS[@]}"; do
  name="${entry%%|*}"
  rest="${entry#*|}"
  cmd="${rest%%|*}"
  smoke="${rest#*|}"
  wanted "$name" || continue
  # shellcheck disable=SC2206  # the flags hold no spaces: word splitting is wanted
  args=($cmd)
  [ "$MODE" = smoke ] && args+=($smoke)
  script="benchmarks/${args[0]}"
  if [ "$MODE" = dry ]; then
    echo "$PY $script ${args[*]:1}"
    continue
  fi
  echo "== $name: $PY $script ${args[*]:1}"
  start=$(date +%s)
  if "$PY" "$script" "${args[@]:1}" > "$OUT/logs/$name.log" 2>&1; then
    echo "   ok in $(( $(date +%s) - start )) s"
  else
    echo "   FAILED in $(( $(date +%s) - start )) s; the end of $OUT/logs/$name.log:"
    tail -n 15 "$OUT/logs/$name.log" | sed 's/^/   | /'
    FAILED+=("$name")
  fi
done

[ "$MODE" = dry ] && exit 0
echo "results in $OUT"
if [ ${#FAILED[@]} -gt 0 ]; then
  echo "failed: ${FAILED[*]}" >&2
  exit 1
fi
