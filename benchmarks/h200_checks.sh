#!/usr/bin/env bash
# The GPU checks that issues 14 and 17 still wait for, cut into stages that each fit one 10-minute device call.
# Each stage writes under $OUT (or ./h200_out); commit what it writes under benchmarks/results/h200/.
#
# usage (from the repository root, on the GPU machine):
#   bash benchmarks/h200_checks.sh tests     # the CUDA tests, then the whole suite against the GPU but test_ranks.py
#   bash benchmarks/h200_checks.sh tests-ranks # test_ranks.py against the GPU: its ranks are processes that start
#     torch each, 25-50 s a test there (the whole suite in one call ran past 9 minutes on 2026-12-02)
#   bash benchmarks/h200_checks.sh flux      # step_time rows of Flux-12B, raw, lossless and fp8
#   bash benchmarks/h200_checks.sh sd35      # the same for SD3.5-medium
#   bash benchmarks/h200_checks.sh wan       # the same for a Wan2.1/2.2 14B transformer (one expert)
#   bash benchmarks/h200_checks.sh flux-pipe # the full Flux pipeline: fp8 PSNR, lossless, RSS peak with PACK_IN_FLIGHT
#   bash benchmarks/h200_checks.sh flux-pipe-2 # the full Flux pipeline's rows issue 14 still lacks: model and
#     diffusers-sequential (a 1-step and a 2-step call, extrapolated), after a resident row
#   bash benchmarks/h200_checks.sh flux-pipe-3 # resident and layerwise only: a quick check of the streamed pipeline
#     (about 4 minutes)
#   bash benchmarks/h200_checks.sh flux-pipe-budgets # resident, auto at 24, 12 and 8 GiB, and model: the rows whose
#     host RSS peak was last measured before packing stopped holding units twice (issue 14's 1.1x)
#   bash benchmarks/h200_checks.sh flux-pipe-folder # resident, layerwise-lossless and layerwise-lossless-folder: host
#     RSS of lossless on a pipeline built in memory, without and with offload_folder (in the working directory: the streamed blocks'
#     33 GB are written there)
#   bash benchmarks/h200_checks.sh wan-pipe-1 | wan-pipe-2 | wan-pipe-3 | wan-pipe-4   # the full Wan2.2 pipeline,
#     3 rows each (-4: diffusers-sequential alone). -2, -3 and -4 compare against the resident output wan-pipe-1
#     leaves in /tmp: run them in the same device call, e.g. bash -c '... wan-pipe-1 && ... wan-pipe-2' (a machine
#     idle for a while is handed back, /tmp with it). Rows take 1.5 to 4 minutes each on an H200 (resident, layerwise
#     and auto-8GiB fit one call; resident, model and part of diffusers-model took the whole 9 minutes).
#   bash benchmarks/h200_checks.sh wan-pipe-baselines | wan-pipe-diffusers-model | wan-pipe-diffusers-sequential
#     # a resident row, then model, enable_model_cpu_offload or enable_sequential_cpu_offload: one call each
#     (diffusers-group needs 2.2x the weights of host memory, more than an H200 host has)
#   bash benchmarks/h200_checks.sh codec     # the codecs on the GPU (about 2.5 minutes): the CUDA compression
#     tests, decode throughput of bf16 and fp16 blocks at 4, 8 and 16 warps, where SD3.5-medium's coded step goes
#     (raw, lossless, decodes skipped), then its step_time rows, lossless and fp8 (SD3.5's lossless step swings
#     between runs: README)
#   bash benchmarks/h200_checks.sh sd35-timeline   # SD3.5-medium's per-block copy/compute timeline at window 2, raw
#     then lossless, two dispatches each (about a minute): who paces the step, the host or the link; one step
#     synchronised, then 10 back to back (lossless was slower back to back than synchronised in one call)
#   bash benchmarks/h200_checks.sh sd35-interleaved   # SD3.5-medium resident, raw, lossless and fp8 (pieces of
#     128 MiB, and of 64 as -p64) dispatched at once, 30 rounds of 5 back-to-back steps each in turn, a host probe
#     before each round (about 3 minutes): the strategies compared under the same host
#   bash benchmarks/h200_checks.sh flux-pipe-24 # resident and auto at 24 GiB only (about 2.5 minutes)
#   bash benchmarks/h200_checks.sh cold-lossless   # Flux-12B from safetensors: host RSS and ready time, raw and lossless
#     (blocks held only as their code; by weights= and by from_pretrained); writes the 23.8 GB checkpoint to
#     /tmp/flux_ckpt first (about a minute)
#   bash benchmarks/h200_checks.sh cold-lossless-sd35-wan   # SD3.5-medium and the Wan-14B transformer from a
#     checkpoint by weights=, raw and lossless: host RSS and ready time (issue 17's targets on its other two models;
#     no read-alone or from_pretrained phases); writes each checkpoint under /tmp first, 4.9 and 28.6 GB, and
#     removes it after
set -eu
out=${OUT:-h200_out}
mkdir -p "$out"
rows=resident,layerwise-w2,layerwise-w2-lossless,layerwise-w2-fp8,auto-12GiB,auto-12GiB-lossless
# The resident video (tens of MB) stays out of $out, which comes back from the device machine.
wan=(python benchmarks/pipeline_time.py --pipeline wan22 --out "$out" --reference /tmp/wan22_reference.pt)
# each STRATEGIES COMMAND...: one process per strategy, each appending its row (a stage that starts the table removes
# it first). Within one process the host memory of a Wan2.2 row (72 GB) was not all available to the next (3 GB left
# on the H200), which then skipped itself.
each() {
  local strategies=$1; shift
  for s in ${strategies//,/ }; do "$@" --append --strategies "$s"; done
}
# The GPU's clocks, power, utilisation and throttle reasons every 100 ms while the stage runs: a step that is slower
# with the GPU's clock at its maximum and its utilisation well below 100% was bound by the host (SD3.5-medium's
# swings on 2026-12-02, README).
if command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,utilization.gpu,clocks_throttle_reasons.active \
    --format=csv -lms 100 > "$out/gpu_clocks_${1:-none}.csv" 2>&1 &
  clock_log=$!
  trap 'kill "$clock_log" 2> /dev/null || true' EXIT  # a logger that died first must not fail the stage
fi
case "${1:-}" in
  tests)
    python -m pytest -q -m cuda tests/ 2>&1 | tee "$out/pytest_cuda.txt"
    python -m pytest -q -p no:cacheprovider --target-device cuda --ignore tests/test_ranks.py tests/ 2>&1 |
      tee "$out/pytest_target_cuda.txt" ;;
  tests-ranks)
    python -m pytest -q -p no:cacheprovider --target-device cuda tests/test_ranks.py 2>&1 | tee "$out/pytest_target_cuda_ranks.txt" ;;
  flux) python benchmarks/step_time.py --model flux-12b --strategies "$rows" --out "$out" ;;
  sd35) python benchmarks/step_time.py --model sd35-medium --strategies "$rows" --out "$out" ;;
  wan) python benchmarks/step_time.py --model wan-14b --strategies "$rows" --out "$out" ;;
  flux-pipe)
    rm -f "$out"/pipeline_time_flux.*
    each resident,layerwise,layerwise-lossless,layerwise-fp8,auto-12GiB-lossless \
      python benchmarks/pipeline_time.py --pipeline flux --out "$out" --reference /tmp/flux_reference.pt ;;
  flux-pipe-2)
    rm -f "$out"/pipeline_time_flux.*
    each resident,model,diffusers-sequential \
      python benchmarks/pipeline_time.py --pipeline flux --out "$out" --reference /tmp/flux_reference.pt ;;
  flux-pipe-3)
    rm -f "$out"/pipeline_time_flux.*
    each resident,layerwise \
      python benchmarks/pipeline_time.py --pipeline flux --out "$out" --reference /tmp/flux_reference.pt ;;
  flux-pipe-budgets)
    rm -f "$out"/pipeline_time_flux.*
    each resident,auto-24GiB,auto-12GiB,auto-8GiB,model \
      python benchmarks/pipeline_time.py --pipeline flux --out "$out" --reference /tmp/flux_reference.pt ;;
  flux-pipe-folder)
    rm -f "$out"/pipeline_time_flux.*
    each resident,layerwise-lossless,layerwise-lossless-folder \
      python benchmarks/pipeline_time.py --pipeline flux --out "$out" --reference /tmp/flux_reference.pt ;;
  wan-pipe-1) rm -f "$out"/pipeline_time_wan22.*; each resident,layerwise,auto-8GiB "${wan[@]}" ;;
  wan-pipe-2) each auto-12GiB,auto-24GiB,model "${wan[@]}" ;;
  wan-pipe-3) each diffusers-model,layerwise-lossless,diffusers-group "${wan[@]}" ;;
  wan-pipe-4) each diffusers-sequential "${wan[@]}" ;;
  wan-pipe-baselines)
    rm -f "$out"/pipeline_time_wan22.*
    each resident,model "${wan[@]}" ;;
  wan-pipe-diffusers-model | wan-pipe-diffusers-sequential)
    rm -f "$out"/pipeline_time_wan22.*
    each "resident,${1#wan-pipe-}" "${wan[@]}" ;;
  codec)
    python -m pytest -q -p no:cacheprovider -m cuda tests/test_compression.py tests/test_codec_kernel_interpreted.py 2>&1 |
      tee "$out/pytest_cuda_codec.txt"
    for dtype in bfloat16 float16; do
      python benchmarks/codec_throughput.py --bytes 339831296 190999552 --dtype $dtype --warps 4 8 16 \
        --out "$out/codec_throughput.jsonl"
    done
    python benchmarks/lossless_variants.py --model sd35-medium --variants raw,lossless,no-decode --out "$out"
    python benchmarks/step_time.py --model sd35-medium --strategies resident,layerwise-w2,layerwise-w2-lossless,layerwise-w2-fp8 \
      --repeats 20 --warmup 3 --out "$out" ;;
  sd35-timeline)
    python benchmarks/timeline.py --model sd35-medium --budgets w2,w2 --back-to-back 10 --out "$out"
    python benchmarks/timeline.py --model sd35-medium --budgets w2,w2 --compression lossless --back-to-back 10 --out "$out" ;;
  sd35-interleaved)
    python benchmarks/interleaved.py --model sd35-medium --strategies resident,raw,lossless,lossless-p64,fp8,fp8-p64 \
      --rounds 30 --out "$out" ;;
  flux-pipe-24)
    rm -f "$out"/pipeline_time_flux.*
    each resident,auto-24GiB python benchmarks/pipeline_time.py --pipeline flux --out "$out" --reference /tmp/flux_reference.pt ;;
  cold-lossless)
    python benchmarks/cold_start.py --model flux-12b --ckpt /tmp/flux_ckpt --out "$out" --cache warm \
      --phases write,read,offload_map,offload_map-lossless,pretrained-lossless ;;
  cold-lossless-sd35-wan)
    for model in sd35-medium wan-14b; do
      python benchmarks/cold_start.py --model "$model" --ckpt "/tmp/${model}_ckpt" --out "$out" --cache warm \
        --phases write,offload_map,offload_map-lossless
      rm -rf "/tmp/${model}_ckpt"
    done ;;
  *) rm -f "$out/gpu_clocks_${1:-none}.csv"; sed -n '/^set -eu/q;2,$p' "$0"; exit 2 ;;  # no log of a stage never run
esac
