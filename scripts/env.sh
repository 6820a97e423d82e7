# Sourced by the scripts: where cargo puts its output (outside the clone, so CI and
# later runs reuse it) and where rustup's cargo lives.
export PATH="$HOME/.cargo/bin:$PATH"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/deskcam/target}"
