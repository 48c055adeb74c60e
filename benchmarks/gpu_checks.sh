#!/usr/bin/env bash
# Every GPU check and benchmark of the project, for one call on a lent GPU machine:
#   bash benchmarks/gpu_checks.sh            (writes under $OUT, or ./gpu_out)
# CUDA tests first (correctness), then the layer benchmark in bf16 autocast and float32,
# eager and as CUDA-graph replays, the host overhead per step, then a kernel profile of one
# bf16 step. torch.compile runs too: since 2026-11-30 a GBLR training step compiles to one
# graph (no sigma read on the host), in inductor's default mode and with CUDA graphs.
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/machine.txt"
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)' \
  | tee -a "$OUT/machine.txt"
python3 -m pytest -q -p no:cacheprovider tests/ops tests/layers tests/compress tests/deploy \
  -k "cuda or triton" 2>&1 \
  | tail -5 | tee "$OUT/cuda_tests.txt"
B="python3 benchmarks/bench_layer.py --device cuda --repeats 25 --warmup 5"
$B --autocast bf16 --rows 8192 4096 64 --output "$OUT/bench_layer_cuda_bf16.json"
$B --autocast none --rows 8192 64 --output "$OUT/bench_layer_cuda_none.json"
# (capturing nn.Linear's backward at 64 rows failed inside cuBLAS on an H100, torch 2.11)
$B --autocast bf16 --rows 8192 --graph --output "$OUT/bench_layer_cuda_bf16_graph.json"
$B --autocast bf16 --rows 8192 64 --compile default \
  --output "$OUT/bench_layer_cuda_bf16_compile-default.json"
$B --autocast bf16 --rows 8192 --compile reduce-overhead \
  --output "$OUT/bench_layer_cuda_bf16_compile-reduce-overhead.json"
python3 benchmarks/bench_search.py --device cuda --shapes 768x3072 --budgets 0.2 0.4 \
  --output "$OUT/bench_search_cuda.json"
# the fine-tuning recipes' models, full training steps, dense vs GBLR/low-rank (issue 8)
python3 benchmarks/bench_finetune.py --device cuda --autocast bf16 \
  --output "$OUT/bench_finetune_cuda.json" 2>&1 | tail -12
# frozen inference (issue 7): every plan incl. the Triton one vs nn.Linear in bf16, roofline
python3 benchmarks/bench_inference.py --device cuda --dtype bfloat16 --rows 64 4096 16384 \
  --repeats 25 --large-repeats 25 --output "$OUT/bench_inference_cuda_bf16.json" 2>&1 | tail -22
python3 benchmarks/bench_overhead.py --device cuda 2>&1 | tee "$OUT/overhead.txt"
python3 benchmarks/profile_layer.py --device cuda --autocast bf16 --rows 8192 \
  > "$OUT/profile_bf16.txt" 2>&1 || echo "profile failed"
tail -25 "$OUT/profile_bf16.txt"
