#!/usr/bin/env bash
# Fuzzes every target in fuzz/ for a bounded time (FUZZ_SECONDS each, default 60) with
# cargo-fuzz on nightly. Without a nightly toolchain it says so and replays each target's
# corpus through the stable harness in tests/fuzz_smoke.rs instead.
# Crashes land in fuzz/artifacts/<target>/; the replay test picks them up too.
set -euo pipefail
cd "$(dirname "$0")/.."

SECONDS_EACH="${FUZZ_SECONDS:-60}"
TARGETS=(config path_template retry_after identity feedback_headers token_answer)

replay_on_stable() {
  echo "fuzz.sh: $1; replaying the corpora on stable instead (tests/fuzz_smoke.rs)" >&2
  cargo test --test fuzz_smoke -- --nocapture
  exit 0
}

if ! rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  rustup toolchain install nightly --profile minimal >/dev/null 2>&1 ||
    replay_on_stable "no nightly toolchain and none can be installed here"
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked || replay_on_stable "cargo-fuzz could not be installed"
fi

for t in "${TARGETS[@]}"; do
  echo "== fuzzing $t for ${SECONDS_EACH}s"
  # The committed seeds stay in corpus/<t>/; new inputs go beside them (git-ignored).
  cargo +nightly fuzz run "$t" "fuzz/corpus/$t" -- \
    -max_total_time="$SECONDS_EACH" -max_len=4096 -timeout=10 -rss_limit_mb=2048
done
# Everything the fuzzer found interesting, replayed once more on stable.
cargo test --test fuzz_smoke
