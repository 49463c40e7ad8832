#!/usr/bin/env bash
# The test command: unit tests (Triton through its interpreter on CPU), the csrc compile check,
# and every benchmark run once as a plain test. Fails on any failure or on an empty collection.
# --quick: the edit-test loop, tests/ without the compile, end-to-end (subprocess) and slow tiers, no benchmarks.
# Each test seeds from crc32(test id) + $CRATE_TEST_SEED_SHIFT (integer, default 0); a failure prints its seed.
# Tests run in $CRATE_TEST_WORKERS pytest-xdist processes (default 2; 0: in this process, for pdb and -s).
set -euo pipefail
cd "$(dirname "$0")/.."
workers=(-n "${CRATE_TEST_WORKERS:-2}")
if [[ "${1:-}" == "--quick" ]]; then
    shift
    exec python -m pytest tests/ -q -p no:cacheprovider "${workers[@]}" --durations=15 \
        -m "not compile and not e2e and not slow" "$@"
fi
python -m pytest tests/ -q -p no:cacheprovider "${workers[@]}" --durations=15 "$@"
CRATE_BENCH_BATCH=2 python -m pytest benchmarks/ -q -p no:cacheprovider --benchmark-disable
