#!/usr/bin/env bash
# One command for a lent GPU machine (the `device` tool; it has PyTorch but no Rust).
#
#   bash bench/device.sh prepare   here: builds the bench binary into .bench/ and downloads
#                                  the Vulkan and EGL loaders into .gl/ (both git-ignored)
#   bash bench/device.sh run       there (carry .bench and .gl), or here to test it: the bench
#                                  on the full GPT-2 set with JSON output, then PyTorch on the
#                                  same shapes and GPU; everything lands in $OUT (else bench-out/)
#
# The run keeps within 8 minutes: the bench gets 6, torch the rest.
set -euo pipefail
cd "$(dirname "$0")/.."

prepare() {
    cargo build --release --example bench
    mkdir -p .bench
    cp target/release/examples/bench .bench/bench
    for d in /.bench/ /.gl/; do
        grep -qxF "$d" .git/info/exclude || echo "$d" >>.git/info/exclude
    done
    if [ ! -d .gl ]; then
        mkdir -p .gl /tmp/amd64/partial
        local o='-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/amd64'
        # shellcheck disable=SC2086
        apt-get $o update
        # shellcheck disable=SC2086
        (cd .gl && apt-get $o download libvulkan1 libegl1 libglvnd0 libopengl0 libgl1 libglx0 libgles2)
    fi
    echo "prepared: .bench/bench and .gl/ ($(ls .gl | wc -l) packages)"
}

run() {
    local out="${OUT:-bench-out}"
    mkdir -p "$out"
    if [ -d .gl ] && ! ldconfig -p | grep -q libvulkan; then
        for f in .gl/*.deb; do dpkg -x "$f" /; done
        ldconfig
    fi
    local icd=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
    if [ -f "$icd" ]; then
        export VK_DRIVER_FILES="$icd"
        export __EGL_VENDOR_LIBRARY_FILENAMES=/usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json
    fi
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version --format=csv | tee "$out/gpu.txt"
    local bench=.bench/bench
    [ -x "$bench" ] || bench=target/release/examples/bench
    set +e
    # torch's clip on the same GPU and shapes, timed right after each gradclip figure.
    GRADCLIP_TORCH_PYTHON=python3 timeout 360 "$bench" --runs 7 --json "$out/bench.json" 2>&1 | tee "$out/bench.log"
    local status=${PIPESTATUS[0]}
    timeout 100 python3 bench/torch_peer.py --runs 7 --json "$out/torch.json" 2>&1 | tee "$out/torch.log"
    set -e
    echo "bench exit status $status; files in $out: $(ls "$out" | tr '\n' ' ')"
    return "$status"
}

case "${1:-run}" in
    prepare) prepare ;;
    run) run ;;
    *) echo "usage: bash bench/device.sh prepare|run" >&2; exit 2 ;;
esac
