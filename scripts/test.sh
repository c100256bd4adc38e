#!/usr/bin/env bash
# Quick start 2: create the environment if needed, then run the test suite.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k params`).
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
python -m pytest "$@"
