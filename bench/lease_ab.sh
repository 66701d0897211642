#!/usr/bin/env bash
# One device call of an A/B lease: a base commit and this tree measured on the same machine, in turn.
#
#   bash bench/lease_ab.sh kernels          # GPU bit-exactness + kernel timings of this tree (~4 min)
#   bash bench/lease_ab.sh step             # train step, base tree then this tree (~8 min)
#   bash bench/lease_ab.sh tiles            # this tree's step with the non-spilling tile launches
#   bash bench/lease_ab.sh unsloth          # unsloth's step and this tree's, same sizes and harness
#
# step and tiles step AdamW foreach, as the base tree's harness does; unsloth runs both libraries with
# fused AdamW, what transformers' Trainer uses by default.
# Runs in the repository root on the device machine with `.gpu` carried (site.tgz from
# `WITH_PEERS=1 bash ../shared/gpu/make_site.sh`, base.tgz from `git archive BASE_REV | gzip`), and
# writes its tables under $OUT. Each part fits one call's 10 minutes.
set -euo pipefail
part=${1:?part: kernels, step, tiles or unsloth}
out=${OUT:-/tmp/out}
mkdir -p "$out" /tmp/site
tar xzf .gpu/site.tgz -C /tmp/site
export PYTHONUNBUFFERED=1
steps=(--steps 10 --timing-rounds 7)
case "$part" in
  kernels)
    PYTHONPATH=$PWD:/tmp/site python bench/kernels.py --out "$out/kernels.md" \
      --only correctness add_rms_norm swiglu dequant attention ;;
  step)
    rm -rf /tmp/base && mkdir -p /tmp/base && tar xzf .gpu/base.tgz -C /tmp/base
    (cd /tmp/base && PYTHONPATH=/tmp/base:/tmp/site python bench/train_step.py "${steps[@]}" \
      --variants "+ RoPE kernel" --out "$out/step_base.md")
    PYTHONPATH=$PWD:/tmp/site python bench/train_step.py "${steps[@]}" --optimizer foreach \
      --variants "+ RoPE kernel,+ residual add in RMSNorm" --out "$out/step_new.md" ;;
  tiles)
    for meta in 3 4; do
      PYTHONPATH=$PWD:/tmp/site python bench/train_step.py "${steps[@]}" --optimizer foreach \
        --tile-meta "$meta" --variants "+ residual add in RMSNorm" --out "$out/step_tiles_$meta.md"
    done ;;
  unsloth)
    PYTHONPATH=$PWD:/tmp/site python bench/train_step_unsloth.py --steps 10 --out "$out/unsloth.md"
    PYTHONPATH=$PWD:/tmp/site python bench/train_step.py --steps 10 --timing-rounds 3 \
      --variants "+ residual add in RMSNorm" --out "$out/step_fused_adamw.md" ;;
  *) echo "unknown part $part" >&2; exit 2 ;;
esac
