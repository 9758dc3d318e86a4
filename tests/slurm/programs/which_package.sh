#!/bin/bash
# Stand-in for the interpreter (GRM_PYTHON): imports megatron_grm with the real one ($GRM_TEST_PYTHON) as
# `python -m` would look it up (the working directory, i.e. the submit folder, first unless PYTHONSAFEPATH is
# set) and says where the package came from.
exec "$GRM_TEST_PYTHON" -c 'import sys, megatron_grm; print(f"rank {sys.argv[1]}: megatron_grm from {megatron_grm.__file__}")' "$RANK"
