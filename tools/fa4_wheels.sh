#!/usr/bin/env bash
# FlashAttention-4 (flash-attn-4) for the GPU machine, which cannot download packages: its wheels
# for Python 3.12 / x86_64 / CUDA 13, in two git-ignored folders that each fit in what one
# device call carries (64 MiB): .fa4a holds the first half of the CuTe DSL's CUDA 13 libraries
# (xz), .fa4b the second half and the small wheels. Run here (pip, xz; ~4 minutes, mostly xz):
#   bash tools/fa4_wheels.sh
# Then on the GPU machine, two calls in a row (the machine stays warm 30 s between them):
#   1. carry [".fa4a"]:          mkdir -p /tmp/fa4parts && cp .fa4a/* /tmp/fa4parts/
#   2. carry [".fa4b", ".whl"]:  bash tools/gpu_bench.sh fa4 tests attention
set -euo pipefail
FA4=${FA4:-4.0.0b36}
DSL=${DSL:-4.8.1}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
pip_get() {
    "${PYTHON:-python3}" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$work" "$@"
}
pip_get "flash-attn-4==$FA4" "nvidia-cutlass-dsl==$DSL" "nvidia-cutlass-dsl-libs-base==$DSL" \
    "nvidia-cutlass-dsl-libs-core==$DSL" "nvidia-cutlass-dsl-libs-cu13==$DSL" \
    "apache-tvm-ffi<0.2" torch-c-dlpack-ext quack-kernels
mkdir -p "$work/cu13"
unzip -q "$work"/nvidia_cutlass_dsl_libs_cu13-*.whl -d "$work/cu13"
rm "$work"/nvidia_cutlass_dsl_libs_cu13-*.whl
rm -rf .fa4a .fa4b && mkdir -p .fa4a .fa4b
tar -C "$work/cu13" -cf - . | xz -9 -T0 > "$work/cu13.tar.xz"
split -b 32000000 "$work/cu13.tar.xz" "$work/cu13.part."
mv "$work/cu13.part.aa" .fa4a/
mv "$work"/cu13.part.a[b-z] "$work"/*.whl .fa4b/
grep -qx '/.fa4a/' .git/info/exclude || printf '/.fa4a/\n/.fa4b/\n' >> .git/info/exclude
du -sh .fa4a .fa4b
