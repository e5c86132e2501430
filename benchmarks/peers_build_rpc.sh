#!/usr/bin/env bash
# Build llama.cpp's RPC split (ggml-rpc-server + llama-completion, CPU only) from the llama.cpp that the installed
# llama-cpp-python vendors, for benchmarks/bench_peers.py --rpc-build DIR. Never run in CI (minutes of CPU).
#
#   benchmarks/peers_build_rpc.sh [WORKDIR]        # default /tmp/llamarpc; binaries land in WORKDIR/build/bin
#
# Environment: JOBS (default 1), NICE (default "nice -n 19 ionice -c3"; set NICE= to build at normal priority).
# The sdist comes from the package registry (the version that `import llama_cpp` reports) unless WORKDIR already
# holds it. No -march=native: this project's machines advertise AMX and ggml's AMX kernels die with SIGILL there
# (docs/environment facts); the vector extensions are named explicitly instead, as the working wheel was built.
set -euo pipefail

WORK=${1:-/tmp/llamarpc}
JOBS=${JOBS:-1}
NICE=${NICE-nice -n 19 ionice -c3}
VERSION=$(python -c "import llama_cpp; print(llama_cpp.__version__)")
SDIST="$WORK/llama_cpp_python-$VERSION.tar.gz"
SRC="$WORK/llama_cpp_python-$VERSION/vendor/llama.cpp"

mkdir -p "$WORK"
if [ ! -f "$SDIST" ]; then
    pip download "llama-cpp-python==$VERSION" --no-binary :all: --no-deps -d "$WORK"
fi
if [ ! -d "$SRC" ]; then
    tar -xzf "$SDIST" -C "$WORK"
fi

# AVX-512 only where the CPU has it (an AMD or older Intel machine would otherwise die with SIGILL instead).
AVX512="-DGGML_AVX512=OFF"
if grep -q avx512f /proc/cpuinfo; then
    AVX512="-DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON"
fi

$NICE cmake -S "$SRC" -B "$WORK/build" -G Ninja \
    -DCMAKE_BUILD_TYPE=Release \
    -DGGML_RPC=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=OFF -DBUILD_SHARED_LIBS=OFF \
    -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
    $AVX512
$NICE cmake --build "$WORK/build" --target ggml-rpc-server llama-completion -j "$JOBS"
ls -l "$WORK/build/bin/ggml-rpc-server" "$WORK/build/bin/llama-completion"
