#!/usr/bin/env bash
# Runs the regression tests of issue 13 against the package as it was before the runtime redesign
# (commit 2481d01, unpacked into ./.old by `git archive 2481d01 offload_map | tar -x -C .old`), to show
# that they fail there. The old runtime spelled three accessors differently; only those are rewritten.
# usage: bash benchmarks/old_main_regressions.sh [pytest args...]   (run from the repository root)
set -u
root=$(pwd)
work=$(mktemp -d)
cp -r tests "$work/"
sed -i -e 's/handle\.runtime\.host_buffers/handle._runtime.packed/g' \
       -e 's/handle\.runtime\.set_residency("", {}, 1)/handle._runtime.set_residency("", frozenset(), 1)/g' \
       -e 's/handle\.runtime\.rings\[""\]\.slot_bytes/handle._runtime.rings[""].slot_bytes/g' "$work"/tests/*.py
cd "$work" && PYTHONPATH="$root/.old${PYTHONPATH:+:$PYTHONPATH}" python -m pytest -p no:cacheprovider -q -rf "$@"
