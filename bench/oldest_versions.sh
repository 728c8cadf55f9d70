#!/usr/bin/env bash
# Does vlpcache work with the oldest versions pyproject.toml admits? Builds a venv in DIR (outside the
# repository: torch's CUDA wheels take about 5 GB) from bench/oldest-versions.txt and runs the suite with
# it (10-13 minutes on 2 cores). Not part of CI, which installs the newest releases.
#
#   bash bench/oldest_versions.sh DIR [pytest args...]      # PYTHON=python3.11 by default
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: bash bench/oldest_versions.sh DIR [pytest args...]" >&2; exit 2; }
venv=$1; shift
cd "$(dirname "$0")/.."
[ -x "$venv/bin/python" ] || "${PYTHON:-python3.11}" -m venv "$venv"
"$venv/bin/pip" install -q -c bench/oldest-versions.txt -e ".[test]"
"$venv/bin/pip" check
# the tests start `vlpcache` with sys.executable: the commands run with these versions too
exec "$venv/bin/python" -m pytest -q -rs "$@"
