#!/usr/bin/env bash
# Everything that needs an accelerator, in one call of under 8 minutes:
#   1. the accelerator tests (tests/test_gpu.py: GPU run == CPU run),
#   2. the benchmark at ViT-Ti/16, the study's batch 64: the CE step against PyTorch in fp32
#      and bf16, and in fp32 one call (5 steps) of every unlearning method's steps,
#   3. the whole study pipeline on CIFAR-shaped synthetic data (50,000 + 10,000 images,
#      224 px, all stages), timed end to end including compilation.
# Installs nothing from the network. Packages the GPU image lacks (ml-collections)
# travel as wheels in .whl/ (see README, "GPU check"). Results go to $OUT.
#
#   bash scripts/gpu_check.sh              # on the GPU machine
#   bash scripts/gpu_check.sh --cpu-smoke  # same steps, tiny sizes, on a CPU: checks the script
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
smoke=false
[ "${1:-}" = "--cpu-smoke" ] && smoke=true
status=0
step() { echo "=== $1 ($(date +%T))"; }

step "accelerator tests"
JAX_PLATFORMS= python3 -m pytest -q -rs tests/test_gpu.py 2>&1 | tee "$OUT/tests.log" || status=1

step "benchmark"
# The methods in fp32 only, one call each (--method_steps 5, 5 steps per call), their
# ~20 step and sweep functions compiled 4 at a time (their compile seconds then include
# waiting for one another); the smoke run is the same on the tiny --quick model.
bench=(--model ti16 --batch_sizes 64)
$smoke && bench=(--quick)
python3 scripts/benchmark.py "${bench[@]}" --dtype float32 --method_steps 5 --compile_threads 4 \
  --out "$OUT/benchmark_float32.json" 2>&1 | tee "$OUT/benchmark_float32.log" || status=1
python3 scripts/benchmark.py "${bench[@]}" --dtype bfloat16 --methods none \
  --out "$OUT/benchmark_bfloat16.json" 2>&1 | tee "$OUT/benchmark_bfloat16.log" || status=1

step "study pipeline on synthetic CIFAR-shaped data"
workdir=$(mktemp -d)
# A fresh compilation cache: the time includes every compile, as on a first run.
args=(--config configs/cifar10_vit_tiny.py --workdir "$workdir" --config.data.name=synthetic
      --config.model.init= --config.progress=false --config.compilation_cache="$workdir/xla")
# Smoke sizes; 256 test images leave ~25 of the forgotten class, enough for the
# loss-MIA's stratified 10% hold-out (64 left it one example, and sklearn refuses).
$smoke && args+=(--config.data.synthetic.num_train=256 --config.data.synthetic.num_test=256
                 --config.model.variant= --config.model.image_size=32 --config.model.patch_size=8
                 --config.model.hidden_size=32 --config.model.depth=1 --config.model.num_heads=2
                 --config.model.mlp_dim=64 --config.train.epochs=1 --config.finetune.epochs=1
                 --config.gradient_ascent.epochs=1 --config.two_stage.epochs=1
                 --config.tsne.num_retain=30 --config.tsne.num_forget=10)
start=$(date +%s.%N)
python3 -m jaxunlearn.main "${args[@]}" 2>&1 | tee "$OUT/pipeline.log" || status=1
python3 -c "import sys; print(f'pipeline wall time: {float(sys.argv[2]) - float(sys.argv[1]):.1f} s')" \
  "$start" "$(date +%s.%N)" | tee -a "$OUT/pipeline.log"
cp "$workdir/results.json" "$OUT/pipeline_results.json" 2>/dev/null || status=1
exit $status
