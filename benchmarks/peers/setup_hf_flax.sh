#!/usr/bin/env bash
# Creates benchmarks/.venv-hf-flax: Hugging Face's FlaxVisionEncoderDecoderModel (transformers
# 4.57.x, the last release line that ships the Flax models) on the jax/flax/optax this repo uses,
# so benchmarks/peers/hf_flax.py can time it against nnx_caption on the same inputs.
#
# Idempotent: a stamp file that records the requirements makes a rerun instant; change a pin
# below and the next run reinstalls. No torch: hf_flax.py reads the PyTorch-format safetensors
# checkpoint with numpy and converts it with transformers' own pt->flax helpers.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="$(cd "$here/.." && pwd)/.venv-hf-flax"
stamp="$venv/.installed"

# Same jax/flax/optax as the main .venv (pyproject.toml, optax from `.venv/bin/pip show optax`),
# so the timing difference is the model code, not the library versions. transformers 4.57.6 is the
# newest 4.57.x on PyPI; it pulls its own huggingface-hub<1 and tokenizers<=0.23.
requirements=(
  "transformers==4.57.6"
  "jax==0.10.2"
  "jaxlib==0.10.2"
  "flax==0.12.8"
  "optax==0.2.8"
  "numpy"
  "safetensors"
)

want="${requirements[*]}"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  echo "hf-flax peer venv up to date: $venv"
  exit 0
fi

start=$SECONDS
[[ -x "$venv/bin/python" ]] || python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --upgrade pip
"$venv/bin/pip" install --quiet "${requirements[@]}"
"$venv/bin/python" -c "import transformers, jax, flax, optax; \
from transformers import FlaxVisionEncoderDecoderModel; \
print('transformers', transformers.__version__, 'jax', jax.__version__, 'flax', flax.__version__, \
'optax', optax.__version__)"
echo "$want" >"$stamp"
echo "hf-flax peer venv ready in $((SECONDS - start)) s: $venv"
