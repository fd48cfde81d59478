#!/usr/bin/env bash
# Builds every cargo-fuzz target in fuzz/ (nightly, debug assertions on so
# overflows panic) and runs each for SECONDS (default 30), starting from the
# committed seeds in fuzz/seeds/<target> plus what earlier runs found in
# fuzz/corpus/<target>, as many targets at once as there are cores. Any crash,
# panic, timeout or allocation over the limit fails the script; the input is
# left in fuzz/artifacts/<target>.
#   bash scripts/fuzz.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs="${1:-30}"
if ! cargo +nightly --version >/dev/null 2>&1; then
  echo "fuzz: no nightly toolchain (rustup toolchain install nightly)" >&2
  exit 1
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked
fi
export CARGO_TERM_COLOR=never
cargo +nightly fuzz build --debug-assertions
# One target per core at a time: each still gets SECONDS of a whole core.
jobs="$(nproc)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
fuzz_one() {
  local target="$1"
  mkdir -p "corpus/$target"
  # No input may need more than 64 MB at once, nor 1 GB in all, nor 10 s.
  if cargo +nightly fuzz run --debug-assertions "$target" "corpus/$target" "seeds/$target" -- \
      -max_total_time="$secs" -max_len=16384 -rss_limit_mb=1024 -malloc_limit_mb=64 \
      -timeout=10 -print_final_stats=1 >"$work/$target.log" 2>&1; then
    touch "$work/$target.ok"
  fi
}
targets=($(cargo +nightly fuzz list))
for target in "${targets[@]}"; do
  while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do wait -n || true; done
  fuzz_one "$target" &
done
wait
summary=""
failed=0
for target in "${targets[@]}"; do
  if [ ! -e "$work/$target.ok" ]; then
    tail -n 40 "$work/$target.log" || true
    echo "fuzz: $target FAILED (input in fuzz/artifacts/$target)"
    failed=1
    continue
  fi
  execs="$(grep -a '^stat::number_of_executed_units:' "$work/$target.log" | tail -n 1 | awk '{print $2}')"
  summary+="$(printf '%-16s %12s execs in %ss, no crash' "$target" "${execs:-?}" "$secs")"$'\n'
done
[ "$failed" -eq 0 ] || exit 1
printf 'fuzz: every target ran\n%s' "$summary"
