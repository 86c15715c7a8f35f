#!/usr/bin/env bash
# GPU-machine runs in stages, so a whole benchmark set goes into a few calls.
# Usage (on the GPU machine, repository root; each stage prints its table and writes JSON):
#   bash tools/gpu_bench.sh tests attention model      # about 8 minutes
#   bash tools/gpu_bench.sh extract slide_task         # about 7 minutes (carry .whl)
#   bash tools/gpu_bench.sh extract_gigapath           # about 8 minutes (carry .whl)
#   ENCODERS="gigapath uni" SETTINGS="bf16-true+compile" bash tools/gpu_bench.sh presets
#   bash tools/gpu_bench.sh decoder                    # about 4 minutes
# Stages: fa4 (install FlashAttention-4 from carried wheels: tools/fa4_wheels.sh; first),
# fa4_tests, bench65k, merge_tests, bench, tests, attention, model, model_4m, slide, gigapath,
# extract, extract_gigapath, presets, slide_task, decoder. Results go to $OUT
# (the device tool's output folder) or bench_results/.
set -uo pipefail
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 NO_ALBUMENTATIONS_UPDATE=1
OUT=${OUT:-bench_results}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch; print('torch', torch.__version__, 'cudnn', torch.backends.cudnn.version())"

wheels() {  # openslide from the carried wheels (the GPU image has none)
    if ! python -c "import openslide" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
        python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
    fi
}

fa4() {  # FlashAttention-4 from the two carried halves (tools/fa4_wheels.sh says how)
    python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .fa4b/*.whl || return
    cat /tmp/fa4parts/cu13.part.aa .fa4b/cu13.part.a[b-z] | tar -C /tmp/site -xJf - || return
    export PYTHONPATH=$PYTHONPATH:/tmp/site/nvidia_cutlass_dsl/dsl_packages:/tmp/site
    python -c "import flash_attn.cute.interface" && echo "flash-attn-4 installed"
}

stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(tests attention model)
for stage in "${stages[@]}"; do
    echo "=== $stage ($(date -u +%H:%M:%S) UTC)"
    case $stage in
    tests)
        wheels
        python -m pytest -q -p no:cacheprovider tests/test_attention_gpu.py \
            tests/test_models_norm.py tests/test_models_keep_attention.py \
            tests/test_extract_preprocess.py tests/test_strided_ops.py \
            tests/test_attention_in_place.py \
            "tests/test_extract_features.py::test_features_on_gpu_equal_direct_model_call" \
            tests/test_extract_precision.py \
            2>&1 | tail -15 ;;
    attention)
        python tools/bench_attention.py --iters 3 --out "$OUT/attention.json" ;;
    model)
        python tools/bench_model.py --tokens 65536 262144 1048576 --steps 2 --no-find-max \
            --out "$OUT/model.json" 2>&1 | grep -v Warning
        python tools/bench_model.py --tokens 1048576 --steps 2 --no-find-max --keep-attention \
            --out "$OUT/model_keep.json" 2>&1 | grep -v Warning ;;
    model_4m)
        python tools/bench_model.py --tokens 4194304 --steps 1 --no-find-max --offload \
            --patches-on-host --mlp-chunk 65536 --out "$OUT/model_4m.json" 2>&1 | grep -v Warning ;;
    slide)  # longvit_slide_base against a dense transformer, 1K-65K tiles, and a cohort pass
        python tools/bench_slide_encoder.py --out "$OUT/slide_encoder.jsonl" 2>&1 | grep -v Warning ;;
    gigapath)  # Prov-GigaPath's own slide encoder beside longvit's (GIGAPATH_CODE: their checkout)
        python tools/bench_gigapath.py --gigapath-code "${GIGAPATH_CODE:?set GIGAPATH_CODE}" \
            --tiles 1000 10000 65000 2>&1 | grep -v Warning ;;
    extract)
        wheels
        python tools/bench_extract.py --slides 16 --slide-size 24000 --repeats 2 --workers 15 \
            --out "$OUT/extract.json" 2>&1 | grep -v "it/s" | tail -25 ;;
    extract_gigapath)  # Prov-GigaPath's tile encoder end to end, and the model path's settings
        wheels
        python tools/bench_extract.py --encoder gigapath --precision bf16-true --compile \
            --compare bf16 bf16+compile bf16-true --model-batches 30 --slides 16 \
            --slide-size 24000 --repeats 2 --workers 15 --out "$OUT/extract_gigapath.json" 2>&1 \
            | grep -v "it/s" | tail -25 ;;
    presets)  # each preset's model alone: timm's bf16 autocast against ${SETTINGS}
        wheels
        for encoder in ${ENCODERS:-gigapath uni uni2-h virchow virchow2 h-optimus-0 phikon}; do
            python tools/bench_extract.py --encoder "$encoder" --model-only --model-batches 20 \
                --repeats 2 --compare ${SETTINGS:-bf16-true+compile} \
                --out "$OUT/model_$encoder.json" 2>&1 | grep -v Warning | tail -5
        done ;;
    slide_task)
        wheels
        python tools/bench_slide_task.py --out "$OUT/slide_task.json" 2>&1 \
            | grep -E "^\{|held-out|cohort" ;;
    decoder)  # the decoder's GPU tests, then training, prefill, generation and ops per layer
        python -m pytest -q -p no:cacheprovider tests/test_decoder_gpu.py 2>&1 | tail -3
        python tools/bench_decoder.py --out "$OUT/decoder.json" 2>&1 | grep -v Warning ;;
    fa4)
        fa4 ;;
    fa4_tests)  # after fa4: the tests that run FlashAttention-4 and its replays
        python -m pytest -q -p no:cacheprovider tests/test_attention_gpu.py \
            tests/test_attention_in_place.py tests/test_fa4_launch.py > "$OUT/fa4_tests.txt" 2>&1
        tail -15 "$OUT/fa4_tests.txt" ;;
    bench65k)  # the 65K row
        python tools/bench_attention.py --configs longvit8192_d768 --warmup 5 --iters 20 \
            --out "$OUT/attention_65k.json" 2>&1 | grep -v Warning | tail -3 ;;
    merge_tests)  # merge_all and the strided kernels compiled (no FA4 needed)
        python -m pytest -q -p no:cacheprovider tests/test_merge_all.py tests/test_strided_ops.py \
            2>&1 | tail -3 ;;
    bench)  # every configuration, as recorded in docs/benchmarks.md
        python tools/bench_attention.py --warmup 5 --iters 10 --out "$OUT/attention.json" 2>&1 \
            | grep -v Warning | tail -12 ;;
    *) echo "unknown stage $stage" >&2 ;;
    esac
done
