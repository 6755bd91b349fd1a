#!/usr/bin/env bash
# The long fuzzing campaign: every target in fuzz/ under libFuzzer for
# SECONDS each (default 600), one after another, with its seed corpus.
# Needs nightly Rust and cargo-fuzz (`cargo install cargo-fuzz`); CI runs
# the same targets briefly on stable (fuzz/tests/targets.rs).
#
#   scripts/fuzz-campaign.sh [SECONDS] [TARGET...]
#
# A crash is saved by libFuzzer under fuzz/artifacts/TARGET/; copy it to
# fuzz/regressions/TARGET/ so the stable test replays it for good, then
# fix the decoder. Prints CPU seconds and executions per target.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds="${1:-600}"
shift || true
if [ "$#" -gt 0 ]; then
  targets=("$@")
else
  mapfile -t targets < <(ls fuzz_targets | sed 's/\.rs$//')
fi
for target in "${targets[@]}"; do
  mkdir -p "corpus/$target" "artifacts/$target"
  echo "== $target: ${seconds} s"
  # The corpus grows in a scratch copy; the committed seeds stay small.
  work="$(mktemp -d)"
  cp -r "corpus/$target/." "$work/" 2>/dev/null || true
  cargo +nightly fuzz run --features libfuzzer "$target" "$work" -- \
    -max_total_time="$seconds" -artifact_prefix="artifacts/$target/" -print_final_stats=1 \
    2>&1 | grep -E "stat::number_of_executed_units|stat::peak_rss_mb|ERROR|SUMMARY|Done" || true
  rm -rf "$work"
done
