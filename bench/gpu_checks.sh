#!/usr/bin/env bash
# The GPU checks of the performance issue, in parts that each fit one 10-minute device call.
#
#   bash bench/gpu_checks.sh tests     # GPU tests: CUDA-graph capture (100 replays vs eager), side
#                                      # stream, offload, set_sync_debug_mode("error"), peak memory
#                                      # per update, every kernel vs the CPU reference, Triton compiled
#   bash bench/gpu_checks.sh large     # update_speed: the 1.31B transformer and its bf16 twin
#   bash bench/gpu_checks.sh native    # update_speed: bf16 weights in bf16 shadows (+SR)
#   bash bench/gpu_checks.sh small     # update_speed: ResNet-50 (+buffers), ViT-B/16
#   bash bench/gpu_checks.sh tiny      # update_speed: 2048 tiny tensors (fused compiles per tensor)
#   bash bench/gpu_checks.sh train     # update_speed: the ViT-B/16 training-step share (+ side stream)
#   bash bench/gpu_checks.sh offload   # offload_cost.py with the PCIe copy
#   bash bench/gpu_checks.sh distributed  # the one-GPU NCCL smoke test, sharded_speed.py (1 rank)
#
# Each part stops itself after GPU_PART_LIMIT_S seconds (default 540; lower it when the device
# budget left is shorter), and writes straight into $OUT: update_speed.py rewrites its JSON after
# every workload (marked "complete": false until the end), so a call cut short keeps what it had.
#
# Needs torch with CUDA, triton, pytest, hypothesis, numpy and safetensors (the GPU image has them).
# The peers torch-ema and ema-pytorch (pure Python) travel in an ignored folder, made here with
#     pip install --no-deps --target build/bench_peers torch-ema ema-pytorch timm
# and carried to the device (carry ["build/bench_peers"]); timm's EMA file is loaded by path.
# Results land in $OUT (the device tool's output folder) when it is set, else in bench/results/;
# copy them into bench/results/ to commit them.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="src:build/bench_peers${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
day=$(date -u +%F)
part=${1:?usage: bash bench/gpu_checks.sh tests|large|native|small|tiny|train|offload|distributed [extra options]}
shift
# anything after the part goes to the part's command (pytest or update_speed.py), e.g.
#     bash bench/gpu_checks.sh large --compile-budget-s 60 --reps 20
limit=${GPU_PART_LIMIT_S:-540}
# results go straight to $OUT when set: a device call cut short still returns what was written
dest=${OUT:-bench/results}
bounded() { timeout -k 10 "$limit" "$@" || echo "gpu_checks: '$*' ended with status $?" >&2; }
speed() {
    local name=$1
    shift
    bounded $PY bench/update_speed.py --device cuda "$@" \
        --out "$dest/update_speed_cuda_${day}_${name}.json" "${extra[@]}"
}
extra=("$@")

case "$part" in
    tests)
        # every test file that holds CUDA tests (grep -l cuda tests), the CPU tests in them too.
        # Each failure's traceback goes to the failures file as it happens (tests/conftest.py), so
        # a call cut at its limit keeps them; one inductor compile thread per process, since with
        # pytest -n N each of N workers would otherwise start a pool of one per core.
        export POLYAK_TEST_LOG="$dest/gpu_tests_failures_$day.txt" TORCHINDUCTOR_COMPILE_THREADS=1
        bounded $PY -m pytest -q -rfEs -p no:cacheprovider "${extra[@]}" tests/test_ema_modes.py \
            tests/test_kernels.py tests/test_triton.py tests/test_tf.py tests/test_ema.py \
            tests/test_tracking.py tests/test_ema_contract.py tests/test_bn.py \
            tests/demo/test_train.py 2>&1 | tee "$dest/gpu_tests_$day.log"
        ;;
    large) speed large --workloads transformer bf16 ;;
    native) speed native --workloads bf16_native ;;
    small) speed small --workloads resnet50 resnet50_buffers vit_b16 ;;
    tiny) speed tiny --workloads many_tiny ;;
    train) speed train --workloads --train-step ;;
    offload)
        bounded $PY bench/offload_cost.py --device cuda
        [[ -n "${OUT:-}" ]] && cp bench/results/offload_cost_cuda_"$day"*.json "$OUT"/ || true
        ;;
    distributed)
        bounded $PY -m pytest -q -rfEs -p no:cacheprovider "${extra[@]}" tests/test_distributed.py \
            -k nccl 2>&1 | tee "$dest/gpu_distributed_$day.log"
        bounded $PY bench/sharded_speed.py --device cuda --world 1 --elements 200000000 \
            --out "$dest/sharded_speed_cuda_w1_$day.json"
        ;;
    *)
        echo "unknown part '$part'; expected tests, large, native, small, tiny, train, offload or distributed" >&2
        exit 2
        ;;
esac
