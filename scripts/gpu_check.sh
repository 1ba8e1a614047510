#!/usr/bin/env bash
# Everything that needs an accelerator, section by section:
#   tests            the accelerator tests (tests/test_gpu.py: GPU run == CPU run, ViT and ResNet)
#   vit              the benchmark at ViT-Ti/16, the study's batch 64: the CE step against
#                    PyTorch in fp32 and bf16, and in fp32 one call (5 steps) of every
#                    unlearning method's steps
#   vit_pipeline     the whole study pipeline on CIFAR-shaped synthetic data (50,000 + 10,000
#                    images, 224 px, all stages), timed end to end including compilation
#   resnet           the benchmark at the CIFAR ResNet-18 (32x32x3, batch 256), fp32 and bf16:
#                    the CE step (SGD momentum) against PyTorch eager and torch.compile, and
#                    one step of every method
#   resnet_pipeline  one Original epoch of ResNet-18 on synthetic CIFAR-10 (50,000 images,
#                    batch 256), fp32 and bf16, through the pipeline (with its Gold and one
#                    fine-tuning epoch, which the pipeline always runs beside it)
# All five take more than one 10-minute device call: name the sections to run, e.g.
#   bash scripts/gpu_check.sh tests vit vit_pipeline      # ~8 min on an H100
#   bash scripts/gpu_check.sh resnet resnet_pipeline
#   bash scripts/gpu_check.sh                             # all
#   bash scripts/gpu_check.sh --cpu-smoke [SECTION...]    # same steps, tiny sizes, on a CPU
# Installs nothing from the network. Packages the GPU image lacks (ml-collections)
# travel as wheels in .whl/ (see README, "GPU check"). Results go to $OUT.
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
if [ "${1:-}" = "--cpu-smoke" ]; then smoke=true; shift; fi
all=(tests vit vit_pipeline resnet resnet_pipeline)
sections=("$@")
[ ${#sections[@]} -eq 0 ] && sections=("${all[@]}")
for s in "${sections[@]}"; do
  [[ " ${all[*]} " == *" $s "* ]] || { echo "unknown section $s; allowed: ${all[*]}"; exit 2; }
done
status=0
step() { echo "=== $1 ($(date +%T))"; }

# The whole pipeline once, with a fresh compilation cache (the time includes every
# compile, as on a first run); prints each stage's seconds. Args: log name, config flags.
pipeline() {
  local name=$1; shift
  local workdir; workdir=$(mktemp -d)
  local start; start=$(date +%s.%N)
  # "$@" first: it starts with --config FILE, which must precede every --config.X.
  python3 -m jaxunlearn.main "$@" --workdir "$workdir" --config.data.name=synthetic \
    --config.model.init= --config.progress=false --config.compilation_cache="$workdir/xla" \
    2>&1 | tee "$OUT/$name.log" || status=1
  python3 -c "import sys; print(f'pipeline wall time: {float(sys.argv[2]) - float(sys.argv[1]):.1f} s')" \
    "$start" "$(date +%s.%N)" | tee -a "$OUT/$name.log"
  cp "$workdir/results.json" "$OUT/${name}_results.json" 2>/dev/null || { status=1; return; }
  # A stage's seconds exclude its compiling (shown apart); the Original's examples/s
  # are its training images x epochs over those seconds.
  python3 - "$OUT/${name}_results.json" <<'EOF' | tee -a "$OUT/$name.log"
import json, sys
results = json.load(open(sys.argv[1]))
c, models = results["config"], results["models"]
for stage, r in models.items():
  line = f"{stage:>16}: {r['seconds']:8.1f} s run, {r['compile_seconds']:6.1f} s compiling"
  if stage == "original" and c["data"]["name"] == "synthetic":
    images = c["data"]["synthetic"]["num_train"] * c["train"]["epochs"]
    line += f", {images / r['seconds']:,.0f} training images/s"
  print(line)
EOF
}

for section in "${sections[@]}"; do
  case $section in
  tests)
    step "accelerator tests"
    JAX_PLATFORMS= python3 -m pytest -q -rs tests/test_gpu.py 2>&1 | tee "$OUT/tests.log" || status=1
    ;;
  vit)
    step "benchmark: ViT"
    # The methods in fp32 only, one call each (--method_steps 5, 5 steps per call), their
    # ~20 step and sweep functions compiled 4 at a time (their compile seconds then include
    # waiting for one another); the smoke run is the same on the tiny --quick model.
    bench=(--model ti16 --batch_sizes 64)
    $smoke && bench=(--quick)
    python3 scripts/benchmark.py "${bench[@]}" --dtype float32 --method_steps 5 --compile_threads 4 \
      --out "$OUT/benchmark_float32.json" 2>&1 | tee "$OUT/benchmark_float32.log" || status=1
    python3 scripts/benchmark.py "${bench[@]}" --dtype bfloat16 --methods none \
      --out "$OUT/benchmark_bfloat16.json" 2>&1 | tee "$OUT/benchmark_bfloat16.log" || status=1
    ;;
  vit_pipeline)
    step "study pipeline on synthetic CIFAR-shaped data: ViT-Ti/16"
    args=(--config configs/cifar10_vit_tiny.py)
    # Smoke sizes; 256 test images leave ~25 of the forgotten class, enough for the
    # loss-MIA's stratified 10% hold-out (64 left it one example, and sklearn refuses).
    $smoke && args+=(--config.data.synthetic.num_train=256 --config.data.synthetic.num_test=256
                     --config.model.vit.variant= --config.model.vit.image_size=32
                     --config.model.vit.patch_size=8 --config.model.vit.hidden_size=32
                     --config.model.vit.depth=1 --config.model.vit.num_heads=2
                     --config.model.vit.mlp_dim=64 --config.train.epochs=1 --config.finetune.epochs=1
                     --config.gradient_ascent.epochs=1 --config.two_stage.epochs=1
                     --config.tsne.num_retain=30 --config.tsne.num_forget=10)
    pipeline pipeline "${args[@]}"
    ;;
  resnet)
    # One step per call and per method (--steps_per_chunk 1 --method_steps 1); the CE
    # step 20 calls against PyTorch (NCHW and channels_last, the faster reported).
    for dtype in float32 bfloat16; do
      step "benchmark: ResNet-18, $dtype"
      bench=(--model resnet18 --batch_sizes 256 --steps_per_chunk 1 --compile_threads 4
             --torch_compile_timeout 300)
      # The smoke run: every method in fp32, the CE step alone in bf16 (a ResNet's ~20
      # programs take ~2 min to compile on the 2-core CPU).
      $smoke && bench=(--quick --model resnet18 --resnet-width 4)
      $smoke && [ $dtype = bfloat16 ] && bench+=(--methods none)
      python3 scripts/benchmark.py "${bench[@]}" --dtype $dtype --method_steps 1 \
        --out "$OUT/benchmark_resnet18_$dtype.json" 2>&1 \
        | tee "$OUT/benchmark_resnet18_$dtype.log" || status=1
    done
    ;;
  resnet_pipeline)
    # One epoch of each stage (Original; Gold and fine-tuning, which every run has) at
    # batch 256: 196 Original steps. No t-SNE: it times the CPU, not the accelerator.
    for dtype in float32 bfloat16; do
      step "study pipeline on synthetic CIFAR-10: ResNet-18, $dtype, one epoch"
      args=(--config configs/cifar10_vit_tiny.py --config.model.name=resnet18
            --config.model.dtype=$dtype --config.batch_size=256 --config.eval.batch_size=1024
            --config.train.epochs=1 --config.methods=finetune --config.finetune.epochs=1
            --config.tsne.num_retain=0 --config.tsne.num_forget=0)
      $smoke && args+=(--config.data.synthetic.num_train=256 --config.data.synthetic.num_test=256
                       --config.model.resnet.width=4 --config.model.resnet.stage_sizes=1,1,1,1
                       --config.batch_size=32 --config.eval.batch_size=64)
      pipeline "pipeline_resnet18_$dtype" "${args[@]}"
    done
    ;;
  esac
done
exit $status
