#!/usr/bin/env bash
# "Your own images": pretrain with no --config (the recipe chosen from the data and the machine,
# its default CPU time budget) and evaluate with linear-probe's default protocol, one set at a time.
#
#   scripts/bench_your_images.sh DATA OUT [native|avx2] [SET ...]
#
# DATA holds the unpacked sets of ../shared/data (cifar10/, eurosat/, intel-scenes/) and, for
# "mixed", intel-mixed/ (scripts/make_mixed_photos.py); "digits" is the built-in set. avx2 holds
# torch's kernels to AVX2 (ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2) for pretraining;
# evaluation is fp32 on every CPU, so it runs natively. Run with nothing else on the machine:
# the budget is wall clock. Per set: OUT/ISA_SET/ (the run), OUT/ISA_SET-eval/ (results.json),
# OUT/ISA_SET.pretrain.log and .eval.log (with /usr/bin/time -v when it is installed).
# scripts/your_images_table.py OUT reads them back into BENCHMARKS.md's tables.
set -euo pipefail
data=${1:?DATA folder}; out=${2:?OUT folder}; isa=${3:-native}; shift 3 || true
sets=("$@"); [ ${#sets[@]} -eq 0 ] && sets=(digits intel eurosat cifar10 mixed)
mkdir -p "$out"
timer=(); command -v /usr/bin/time >/dev/null && timer=(/usr/bin/time -v)
isa_env=(); [ "$isa" = avx2 ] && isa_env=(env ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2)
for set in "${sets[@]}"; do
  case $set in
    digits) train=builtin:digits:train; test=builtin:digits:test ;;
    intel) train=$data/intel-scenes/train; test=$data/intel-scenes/test ;;
    mixed) train=$data/intel-mixed/train; test=$data/intel-mixed/test ;;
    *) train=$data/$set/train; test=$data/$set/test ;;
  esac
  run=$out/${isa}_$set
  echo "== $(date -u +%FT%TZ) $isa $set pretrain (load: $(cut -d' ' -f1-3 /proc/loadavg))"
  "${isa_env[@]}" "${timer[@]}" ssl-pretrain --data "$train" --out "$run" --overwrite --no-progress \
    > "$run.pretrain.log" 2>&1
  if [ "${EVAL:-1}" = 1 ]; then
    echo "== $(date -u +%FT%TZ) $isa $set evaluate (load: $(cut -d' ' -f1-3 /proc/loadavg))"
    rm -rf "$run-eval"
    "${timer[@]}" linear-probe --checkpoint "$run" --train "$train" --test "$test" --out "$run-eval" \
      > "$run.eval.log" 2>&1
  fi
done
echo "== $(date -u +%FT%TZ) done"
