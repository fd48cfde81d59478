#!/usr/bin/env bash
# Builds every cargo-fuzz target in fuzz/ (nightly, debug assertions on so
# overflows panic) and runs each for SECONDS (default 30), starting from the
# committed seeds in fuzz/seeds/<target> plus what earlier runs found in
# fuzz/corpus/<target>. Any crash, panic, timeout or allocation over the limit
# fails the script; the input is left in fuzz/artifacts/<target>.
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
summary=""
for target in $(cargo +nightly fuzz list); do
  mkdir -p "corpus/$target"
  log="$(mktemp)"
  # No input may need more than 64 MB at once, nor 1 GB in all, nor 10 s.
  if ! cargo +nightly fuzz run --debug-assertions "$target" "corpus/$target" "seeds/$target" -- \
      -max_total_time="$secs" -max_len=16384 -rss_limit_mb=1024 -malloc_limit_mb=64 \
      -timeout=10 -print_final_stats=1 >"$log" 2>&1; then
    tail -n 40 "$log"
    rm -f "$log"
    echo "fuzz: $target FAILED (input in fuzz/artifacts/$target)"
    exit 1
  fi
  execs="$(grep -a '^stat::number_of_executed_units:' "$log" | tail -n 1 | awk '{print $2}')"
  rm -f "$log"
  summary+="$(printf '%-16s %12s execs in %ss, no crash' "$target" "${execs:-?}" "$secs")"$'\n'
done
printf 'fuzz: every target ran\n%s' "$summary"
