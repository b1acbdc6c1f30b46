#!/usr/bin/env bash
# The full soak: 10^6 requests at 200 concurrent through pacer to the built-in simulator,
# in release mode. CI runs the same test with 100 000 requests (tests/soak.rs).
# Figures: target/soak-report.txt (requests, answers by status, RSS and fds, duration).
set -euo pipefail
cd "$(dirname "$0")/.."
export PACER_SOAK_REQUESTS="${PACER_SOAK_REQUESTS:-1000000}"
cargo test --release --test soak -- --nocapture
echo "report: ${CARGO_TARGET_DIR:-target}/soak-report.txt"
