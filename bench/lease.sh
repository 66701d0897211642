#!/usr/bin/env bash
# One device call's worth of GPU work per part, each inside the device's 10-minute limit and its 8 files
# back under $OUT. Run from the repository root on the device machine, with .gpu (WITH_PEERS=1 bash
# ../shared/gpu/make_site.sh) in the call's carry and the commit passed literally (the device's git may
# name a stale one):
#   QLORA_FAST_COMMIT=<sha> bash bench/lease.sh checks    # GPU checks of the paths changed since the last
#                                                         # lease, then the seed dequantize harness
#   QLORA_FAST_COMMIT=<sha> bash bench/lease.sh rows SHAPE [RECIPES] [STACKS]
#       # recipe rows of one shape (default recipes peft,trl_padded; stacks qlora_fast,unsloth), appended to
#       # a copy of bench/recipes.json under $OUT (copy it back, then bench/recipes.py --render); with
#       # PROFILE_STEP=N each row's Nth step is profiled (untimed): top kernels and GPU idle gaps
#   QLORA_FAST_COMMIT=<sha> bash bench/lease.sh kernels   # the base GEMM with K widened for LoRA factors
#                                                         # (terms_in_gemm), the dequantize's and the tile
#                                                         # kernels' launch candidates, then pick defaults
#   QLORA_FAST_COMMIT=<sha> bash bench/lease.sh profile [SIZES] [VARIANTS] [SHAPE]  # where the bare loop's
#       # and peft's recipe step go, GEMMs by shape among it (default 4x2048, qlora_fast default and with
#       # attention recomputed, llama-3-8b)
#   QLORA_FAST_COMMIT=<sha> bash bench/lease.sh decide [SHAPE] [STACKS]  # peft's recipe of one shape
#       # (default llama-3-8b; stacks default qlora_fast,unsloth, a qlora_fast:CANDIDATE of bench/recipes.py
#       # among them), then the dequantize candidates and terms_in_gemm and the fused MLP's GPU parity: what
#       # decides the defaults, in one call where device starts are scarce (ROWS_ONLY=1: the rows alone;
#       # RECIPE=peft_r64: another recipe; KERNELS="low_rank_add": other kernel_timings sections)
# Then fetch $OUT's files into bench/ (recipes.json, seed_dequant.json/.md) and write RESULTS.md / NOTES.md.
set -euo pipefail
case "${1:-}" in
checks | rows | kernels | profile | decide) ;;
*) echo "usage: bash bench/lease.sh checks | rows SHAPE [RECIPES] [STACKS] | kernels | profile [SIZES] [VARIANTS] [SHAPE] | decide [SHAPE] [STACKS]" >&2
   exit 2 ;;
esac
: "${OUT:?run on the device machine, where OUT is set}" "${QLORA_FAST_COMMIT:?pass the commit}"
mkdir -p /tmp/site && tar xzf .gpu/site.tgz -C /tmp/site
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 QLORA_FAST_COMMIT
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader

case "${1:-}" in
checks)
  # timeouts: both parts inside the call's 10 minutes, whatever a step costs
  timeout 400 python bench/gpu_checks.py dequantize_and_in_gemm_matmul stacked_dequantize relaunch_paths \
    cross_entropy softcapped_cross_entropy lora_layers_and_mlp kept_attention_kernels trl_fused_head whole_models \
    pinned_buffers_across_lengths \
    > "$OUT/gpu_checks.txt" 2>&1 || true
  grep -v '^PASS' "$OUT/gpu_checks.txt" | tail -12
  timeout 170 python bench/seed_dequant.py --out "$OUT/seed_dequant.md" --repeats 3 > "$OUT/seed_dequant.log" 2>&1 || true
  grep -A6 'harness seconds' "$OUT/seed_dequant.md"
  grep 'Host us\|Pieces\|Harness floor' "$OUT/seed_dequant.md"
  ;;
rows)
  shape=${2:?rows SHAPE [RECIPES] [STACKS]}
  cp bench/recipes.json "$OUT/recipes.json"
  python bench/recipes.py --out "$OUT/recipes" --shapes "$shape" --recipes "${3:-peft,trl_padded}" \
    --stacks "${4:-qlora_fast,unsloth}" ${PROFILE_STEP:+--profile-step "$PROFILE_STEP"} | tail -n 20
  (cd "$OUT" && shopt -s nullglob && files=(recipes-*-*.log recipes-profile-*.md) \
    && tar czf recipe_logs.tgz "${files[@]}" && rm -f "${files[@]}")
  ;;
kernels)
  python bench/kernel_timings.py --only terms_in_gemm dequant swiglu mlp low_rank_add --out "$OUT/kernels.md" \
    > "$OUT/kernels.log" 2>&1
  cut -c1-160 "$OUT/kernels.md"
  ;;
profile)
  for recipe in bare peft; do
    python bench/profile_step.py $([ $recipe = peft ] && echo --prepared) --sizes "${2:-4x2048}" \
      --variants "${3:-qlora_fast default,qlora_fast attention recomputed}" --shape "${4:-llama-3-8b}" \
      --out "$OUT/profile_$recipe.md" | tail -n 3
  done
  ;;
decide)
  cp bench/recipes.json "$OUT/recipes.json"
  timeout 380 python bench/recipes.py --out "$OUT/recipes" --shapes "${2:-llama-3-8b}" --recipes "${RECIPE:-peft}" \
    --stacks "${3:-qlora_fast,unsloth}" > "$OUT/recipes_stdout.txt" 2>&1 || true
  grep '^{' "$OUT/recipes_stdout.txt" | cut -c1-260
  rm -f "$OUT"/recipes-*-*.log
  [ -n "${ROWS_ONLY:-}" ] && exit 0
  timeout 150 python bench/kernel_timings.py --only ${KERNELS:-dequant terms_in_gemm} --out "$OUT/kernels.md" \
    > "$OUT/kernels.log" 2>&1 || true
  cut -c1-200 "$OUT/kernels.md"
  timeout 50 python bench/gpu_checks.py lora_layers_and_mlp > "$OUT/gpu_checks.txt" 2>&1 || true
  grep -c '^PASS' "$OUT/gpu_checks.txt"; grep -v '^PASS' "$OUT/gpu_checks.txt" | tail -4
  ;;
esac
