#!/usr/bin/env bash
# Refresh gripbench/lock.txt, the fully resolved environment that the README's commands
# and .ci/run install against (`pip install -c gripbench/lock.txt ...`).
#
#   bash tools/lock.sh
#
# Resolves pyproject.toml's dependencies (every extra) afresh in a new virtual environment,
# runs the tests that drive lmms-eval through the gripbench plugin (the code path a drifting
# dependency broke once: filelock 4.3 dropped an internal module lmms-eval imports), and only
# then writes the lock. Resolved on CPython 3.11, Linux x86-64; other platforms install
# unlocked (`pip install -e .`), bounded by pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m venv "$tmp/venv"
py="$tmp/venv/bin/python"
"$py" -m pip install -q --upgrade pip
"$py" -m pip install -q -e ".[test,ray]"
HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 GRIPBENCH_CACHE="$tmp/cache" "$py" -m pytest -q -p no:cacheprovider tests/test_lmms.py
{
    echo "# The fully resolved environment of gripbench (every extra), written by tools/lock.sh on $(date -u +%Y-%m-%d)"
    echo "# with $("$py" --version), $(uname -s) $(uname -m). Install against it: pip install -c gripbench/lock.txt -e ."
    "$py" -m pip freeze --exclude-editable
} > gripbench/lock.txt.tmp
mv gripbench/lock.txt.tmp gripbench/lock.txt
echo "wrote gripbench/lock.txt ($(grep -vc '^#' gripbench/lock.txt) packages)"
