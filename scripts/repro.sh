#!/usr/bin/env bash
# Quick start 1: create the environment if needed, then run the whole pipeline (dvc repro).
# Extra arguments go to `dvc repro` (e.g. `bash scripts/repro.sh train`).
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
dvc repro "$@"
dvc metrics show
