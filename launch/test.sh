#!/usr/bin/env bash
# The test suite: CPU only, real DeepSpeed engine and gloo collectives. Extra arguments go to pytest.
source "$(dirname "$0")/env.sh"
exec python -m pytest -q tests "$@"
