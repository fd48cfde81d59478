#!/usr/bin/env bash
# Faults against the demo, measured: a throwaway PostgreSQL cluster (never
# the shared one) restarted, stopped, its rows locked; a starved pool;
# clients that give up; an instance killed with SIGKILL. Prints a table
# (the README's "Faults" figures come from it). About two minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --all-features --example demo
cargo test --all-features --test chaos -- --ignored --nocapture --test-threads=1 chaos
