#!/usr/bin/env bash
# The newest releases inside pyproject.toml's ranges (no lock): what a user who installs today gets.
set -euo pipefail
exec bash "$(dirname "$0")/release_lane.sh" newest
