#!/usr/bin/env bash
# The test command: unit tests (Triton through its interpreter on CPU), the csrc compile check,
# and every benchmark run once as a plain test. Fails on any failure or on an empty collection.
# Each test seeds from crc32(test id) + $CRATE_TEST_SEED_SHIFT (integer, default 0); a failure prints its seed.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pytest tests/ -q -p no:cacheprovider --durations=15 "$@"
CRATE_BENCH_BATCH=2 python -m pytest benchmarks/ -q -p no:cacheprovider --benchmark-disable
