#!/usr/bin/env bash
# The prepared accelerator run, from the repository root, with no network:
#
#     benchmarks/device.sh OUT            # on a GPU / TPU machine (under 8 minutes)
#     benchmarks/device.sh OUT --smoke    # the same ladder on the tiny preset, any machine
#
# It installs this tree over the machine's own packages (pip install --no-deps -e .: jax,
# flax, optax, orbax-checkpoint, ... are the image's), checks that jax sees the accelerator,
# and runs benchmarks/device_ladder.py: every bench.json, OUT/results.md and a profiler trace.
# PYTHON picks the interpreter (default: .venv/bin/python where it exists, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: benchmarks/device.sh OUT [--smoke]}
shift
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
# Installed already from this tree (make setup's venv, a second run): nothing to do.
here=$("$PYTHON" -c 'import nnx_caption, os; print(os.path.dirname(nnx_caption.__file__))' \
    2>/dev/null || true)
if [[ "$here" != "$PWD/nnx_caption" ]]; then
    "$PYTHON" -m pip install --no-deps --no-build-isolation -q -e .
fi
"$PYTHON" - "$@" <<'EOF'
import sys
import jax
devices = jax.devices()
print(f"jax {jax.__version__}: {len(devices)} x {devices[0].device_kind} ({devices[0].platform})")
if devices[0].platform == "cpu" and "--smoke" not in sys.argv[1:]:
    sys.exit("jax sees no accelerator (only the CPU): run with --smoke, or check the drivers")
EOF
exec "$PYTHON" benchmarks/device_ladder.py "$out" "$@"
