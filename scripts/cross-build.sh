#!/usr/bin/env bash
# Builds the gateway binary for the ARM targets in Cross.toml with Debian's cross linkers
# (no container needed):  scripts/cross-build.sh [aarch64|armv7]...
# Needs: rustup target add aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf
#        apt-get install gcc-aarch64-linux-gnu gcc-arm-linux-gnueabihf
# Run the result under emulation with qemu-user: qemu-aarch64 -L /usr/aarch64-linux-gnu target/.../gridweaver --help
set -euo pipefail
cd "$(dirname "$0")/.."
targets=("${@:-aarch64 armv7}")
for t in ${targets[@]}; do
    case "$t" in
        aarch64) triple=aarch64-unknown-linux-gnu; cc=aarch64-linux-gnu-gcc ;;
        armv7) triple=armv7-unknown-linux-gnueabihf; cc=arm-linux-gnueabihf-gcc ;;
        *) echo "unknown target $t (aarch64 or armv7)" >&2; exit 2 ;;
    esac
    env_triple=$(echo "$triple" | tr 'a-z-' 'A-Z_')
    export "CARGO_TARGET_${env_triple}_LINKER=$cc" "CC_${triple//-/_}=$cc"
    # The gateway build: no demo, simulator or embedded broker (the `demo` feature).
    cargo build --release --target "$triple" -p gridweaver-actors --no-default-features
    echo "built target/$triple/release/gridweaver"
done
