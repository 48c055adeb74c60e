#!/usr/bin/env bash
# Every GPU check and benchmark of the project, for one call on a lent GPU machine:
#   bash benchmarks/gpu_checks.sh            (writes under $OUT, or ./gpu_out)
#
# A lent machine gives back at most 8 files per call and stops a command after 10
# minutes, so every result goes into one folder that is packed into
# $OUT/gpu_results.tar.gz after each step (what finished survives a kill), each step runs
# under its own time limit, and the steps are ordered by what they decide:
#   1. issue 2: one GBLRLinear training step vs nn.Linear in bf16 at 8192 rows, eager
#      and torch.compile'd (default and reduce-overhead), the open question;
#   2. issue 7: frozen inference, every plan incl. the Triton one, bf16, roofline bound;
#   3. the CUDA / Triton tests (correctness);
#   4. issue 19: every structured family's training step at equal MACs, bf16;
#   5. the rest: float32 and CUDA-graph layer steps, structure search, fine-tuning
#      throughput, host overhead per step, a kernel profile.
# Unpack here with: tar -xzf gpu_results.tar.gz -C <folder>. steps.txt (packed too, and
# also written beside the archive) lists each step's exit status and seconds; 124 means
# it hit its limit.
# GPU_CHECKS_BUDGET_S (default 540) is the whole script's budget in seconds: a step
# starts only with 20 s left and is cut at the deadline.
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
RESULTS=$(mktemp -d)
DEADLINE=$((SECONDS + ${GPU_CHECKS_BUDGET_S:-540}))
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

pack() {
  # tar then rename, so an archive cut short by a kill never replaces a complete one
  tar -czf "$OUT/gpu_results.tar.gz.part" -C "$RESULTS" . \
    && mv "$OUT/gpu_results.tar.gz.part" "$OUT/gpu_results.tar.gz"
  cp "$RESULTS/steps.txt" "$OUT/steps.txt" 2>/dev/null || true
}

# step NAME LIMIT_S COMMAND...: runs COMMAND with its output in NAME.log, at most LIMIT_S
# seconds and never past the deadline, records its status and packs the results.
step() {
  local name=$1 limit=$2 left status start
  shift 2
  left=$((DEADLINE - SECONDS))
  if ((left < 20)); then
    echo "$name skipped: ${left}s left of the budget" | tee -a "$RESULTS/steps.txt"
    pack
    return
  fi
  ((limit > left)) && limit=$left
  start=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >"$RESULTS/$name.log" 2>&1
  status=$?
  echo "$name exit $status after $((SECONDS - start))s (limit ${limit}s)" \
    | tee -a "$RESULTS/steps.txt"
  tail -n 12 "$RESULTS/$name.log"
  pack
}

R=$RESULTS
step machine 30 bash -c 'nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv;
  python3 -c "import torch, triton; print(\"torch\", torch.__version__, \"triton\", triton.__version__)"'
B="python3 benchmarks/bench_layer.py --device cuda --repeats 25 --warmup 5"
# 1. issue 2
step layer_bf16 90 $B --autocast bf16 --rows 8192 4096 64 --output "$R/bench_layer_cuda_bf16.json"
step layer_bf16_compile_default 150 $B --autocast bf16 --rows 8192 64 --compile default \
  --output "$R/bench_layer_cuda_bf16_compile-default.json"
step layer_bf16_compile_reduce_overhead 120 $B --autocast bf16 --rows 8192 \
  --compile reduce-overhead --output "$R/bench_layer_cuda_bf16_compile-reduce-overhead.json"
# 2. issue 7
step inference_bf16 150 python3 benchmarks/bench_inference.py --device cuda --dtype bfloat16 \
  --rows 64 4096 16384 --repeats 25 --large-repeats 25 \
  --output "$R/bench_inference_cuda_bf16.json"
# 3. correctness
step cuda_tests 120 python3 -m pytest -q -p no:cacheprovider tests/ops tests/layers \
  tests/compress tests/deploy tests/learn -k "cuda or triton"
# 4. issue 19: every family's training step at equal MACs (GBLR vs low-rank's target: 2x)
step families_bf16 60 python3 benchmarks/bench_families.py --device cuda --autocast bf16 \
  --skip-errors --repeats 15 --output "$R/bench_families_cuda_bf16.json"
# 5. the rest
step layer_fp32 60 $B --autocast none --rows 8192 64 --output "$R/bench_layer_cuda_none.json"
# (capturing nn.Linear's backward at 64 rows failed inside cuBLAS on an H100, torch 2.11)
step layer_bf16_graph 60 $B --autocast bf16 --rows 8192 --graph \
  --output "$R/bench_layer_cuda_bf16_graph.json"
step search 60 python3 benchmarks/bench_search.py --device cuda --shapes 768x3072 \
  --budgets 0.2 0.4 --output "$R/bench_search_cuda.json"
step finetune 90 python3 benchmarks/bench_finetune.py --device cuda --autocast bf16 \
  --output "$R/bench_finetune_cuda.json"
step overhead 45 python3 benchmarks/bench_overhead.py --device cuda
step profile 45 python3 benchmarks/profile_layer.py --device cuda --autocast bf16 --rows 8192
rm -rf "$RESULTS"
