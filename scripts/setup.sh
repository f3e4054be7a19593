#!/usr/bin/env bash
# Set up EchoStream on a fresh machine (CPU): torch (CPU build), the package with its extras,
# and espeak-ng (real speech for the demo and the real-speech tests).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -e ".[torch,cpu,dev]"
# torchaudio's Emformer is the reference for the weight importer's parity test. Its PyPI wheel is a
# CUDA build that does not import beside the CPU torch, so the test loads torchaudio/models/emformer.py
# from it directly; --no-deps keeps pip from replacing the CPU torch.
python3 -m pip install -q --no-deps torchaudio==2.11.0 || echo "setup: torchaudio unavailable; its parity test will be skipped" >&2
# Serving on Triton (`echostream serve`, parity_tests/test_triton.py): the real tritonserver bundled in
# the nvidia-pytriton wheel and the gRPC client. Both --no-deps: nvidia-pytriton pins numpy<2 and
# tritonclient protobuf<7 / ml-dtypes<=0.5.4, which would downgrade this shared environment (torch,
# onnx); the client runs on the newer ones (pytriton's Python package itself is never imported).
# pip then warns that their pins are unmet ("dependency conflicts"): expected, and harmless here.
python3 -m pip install -q --no-deps nvidia-pytriton==0.7.0 tritonclient==2.73.0
python3 -m pip install -q "grpcio>=1.81.1" "python-rapidjson>=0.9.1" "urllib3>=2.0.7" "packaging>=14.1" ml-dtypes
# The Python-backend stub is built against NumPy 1.x: the model runs in a numpy<2 environment layered
# over this one (~/.cache/echostream/triton-model-env/...; see runtime/triton_server.py).
python3 -m echostream.cli serve --setup-model-env
if ! command -v espeak-ng >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng >/dev/null) \
      || echo "setup: espeak-ng could not be installed; real-speech tests will be skipped" >&2
  fi
fi
python3 -c "import echostream.models, echostream.runtime; print('echostream ready')"
