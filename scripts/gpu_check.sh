#!/usr/bin/env bash
# Everything that needs an accelerator, in one call of under 8 minutes:
#   1. the accelerator tests (tests/test_gpu.py: GPU run == CPU run),
#   2. the benchmark, JAX vs PyTorch, ViT-Ti/16 at the study's batch 64, fp32 and bf16,
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
if $smoke; then
  python3 scripts/benchmark.py --quick --out "$OUT/benchmark.json" 2>&1 | tee "$OUT/benchmark.log" || status=1
else
  for dtype in float32 bfloat16; do
    python3 scripts/benchmark.py --model ti16 --batch_sizes 64 --dtype $dtype \
      --out "$OUT/benchmark_$dtype.json" 2>&1 | tee "$OUT/benchmark_$dtype.log" || status=1
  done
fi

step "study pipeline on synthetic CIFAR-shaped data"
workdir=$(mktemp -d)
# A fresh compilation cache: the time includes every compile, as on a first run.
args=(--config configs/cifar10_vit_tiny.py --workdir "$workdir" --config.data.name=synthetic
      --config.model.init= --config.progress=false --config.compilation_cache="$workdir/xla")
$smoke && args+=(--config.data.synthetic.num_train=256 --config.data.synthetic.num_test=64
                 --config.model.variant= --config.model.image_size=32 --config.model.patch_size=8
                 --config.model.hidden_size=32 --config.model.depth=1 --config.model.num_heads=2
                 --config.model.mlp_dim=64 --config.train_epochs=1 --config.unlearn_epochs=1
                 --config.tsne.num_retain=30 --config.tsne.num_forget=10)
start=$(date +%s.%N)
python3 -m jaxunlearn.main "${args[@]}" 2>&1 | tee "$OUT/pipeline.log" || status=1
python3 -c "import sys; print(f'pipeline wall time: {float(sys.argv[2]) - float(sys.argv[1]):.1f} s')" \
  "$start" "$(date +%s.%N)" | tee -a "$OUT/pipeline.log"
cp "$workdir/results.json" "$OUT/pipeline_results.json" 2>/dev/null || status=1
exit $status
