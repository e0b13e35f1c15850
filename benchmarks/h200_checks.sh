#!/usr/bin/env bash
# The GPU checks that issues 14 and 17 still wait for, cut into stages that each fit one 10-minute device call.
# Each stage writes under $OUT (or ./h200_out); commit what it writes under benchmarks/results/h200/.
#
# usage (from the repository root, on the GPU machine):
#   bash benchmarks/h200_checks.sh tests     # CUDA tests of compression, stream order and the runtime
#   bash benchmarks/h200_checks.sh flux      # step_time rows of Flux-12B, raw, lossless and fp8
#   bash benchmarks/h200_checks.sh sd35      # the same for SD3.5-medium
#   bash benchmarks/h200_checks.sh wan       # the same for a Wan2.1/2.2 14B transformer (one expert)
#   bash benchmarks/h200_checks.sh flux-pipe # the full Flux pipeline: fp8 PSNR, lossless, RSS peak with PACK_IN_FLIGHT
#   bash benchmarks/h200_checks.sh wan-pipe-1 | wan-pipe-2 | wan-pipe-3   # the full Wan2.2 pipeline, in three calls
set -eu
out=${OUT:-h200_out}
mkdir -p "$out"
rows=resident,layerwise-w2,layerwise-w2-lossless,layerwise-w2-fp8,auto-12GiB,auto-12GiB-lossless
wan=(python benchmarks/pipeline_time.py --pipeline wan22 --out "$out" --reference "$out/wan22_reference.pt")
case "${1:-}" in
  tests)
    python -m pytest -q -m cuda tests/test_compression.py tests/test_compression_edges.py tests/test_stream_order.py \
      tests/test_cuda.py 2>&1 | tee "$out/pytest_cuda_compression.txt" ;;
  flux) python benchmarks/step_time.py --model flux-12b --strategies "$rows" --out "$out" ;;
  sd35) python benchmarks/step_time.py --model sd35-medium --strategies "$rows" --out "$out" ;;
  wan) python benchmarks/step_time.py --model wan-14b --strategies "$rows" --out "$out" ;;
  flux-pipe)
    python benchmarks/pipeline_time.py --pipeline flux --out "$out" \
      --strategies resident,layerwise,layerwise-lossless,layerwise-fp8,auto-12GiB-lossless ;;
  wan-pipe-1) "${wan[@]}" --strategies resident,layerwise,auto-24GiB ;;
  wan-pipe-2) "${wan[@]}" --append --strategies auto-12GiB,auto-8GiB,model ;;
  wan-pipe-3) "${wan[@]}" --append --strategies diffusers-model,layerwise-lossless,diffusers-group ;;
  *) sed -n '2,11p' "$0"; exit 2 ;;
esac
