#!/usr/bin/env bash
# Quick start 2: create the environment if needed, then run tier 1 of the test suite (README "Tests").
# Extra arguments go to pytest: `--tier 2` or `--tier all` picks another tier, `-k params` filters.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
python -m pytest "$@"
