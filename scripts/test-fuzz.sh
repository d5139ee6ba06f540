#!/usr/bin/env bash
# Part of scripts/test.sh: the bounded fuzz smoke run.
set -euo pipefail
exec bash "$(dirname "$0")/fuzz-smoke.sh"
