#!/usr/bin/env bash
# The main job: export the `echostream` preset, lint it for TensorRT, check parity against PyTorch,
# then stream real speech (espeak-ng) through the exported graphs on ONNX Runtime.
# Usage: bash scripts/demo.sh [PRESET] [OUT_DIR]     (defaults: echostream engines/echostream)
set -euo pipefail
cd "$(dirname "$0")/.."
preset=${1:-echostream}
out=${2:-engines/$preset}

if [ ! -f "$out/manifest.json" ]; then
  echostream export --preset "$preset" --out "$out"
fi
echostream lint "$out"
echostream parity "$out"

mkdir -p engines/demo
wav=engines/demo/speech.wav
if [ ! -f "$wav" ]; then
  if ! command -v espeak-ng >/dev/null 2>&1; then
    echo "demo: espeak-ng is not installed (apt-get install espeak-ng)" >&2
    exit 2
  fi
  espeak-ng -v en-us -s 150 -w "$wav" \
    "The quick brown fox jumps over the lazy dog. Streaming translation speaks while you talk."
fi
echostream translate "$wav" --artifacts "$out" --backend onnxruntime --segment-ms 320 \
  --out engines/demo/translated.wav --json engines/demo/translated.json --force
