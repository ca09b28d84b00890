#!/usr/bin/env bash
# Smoke test against a REAL Ollama (none runs on the CI machines): deploy a run, ask it, check it stops.
# Usage: scripts/ollama_smoke.sh runs/quickstart "What is the capital of Veloria?" "Marnette"
set -euo pipefail
run_dir=${1:?run directory}
question=${2:-"What is the capital of Veloria?"}
expect=${3:-"Marnette"}
name=$(basename "$run_dir")
command -v ollama >/dev/null || { echo "ollama is not installed: https://ollama.com/download"; exit 2; }
ollama list >/dev/null || { echo "ollama is not running: start it with 'ollama serve'"; exit 2; }

tuneship deploy "$run_dir" --target ollama            # upload, create, smoke test via the REST API, unload
ollama create "$name-byhand" -f "$run_dir/Modelfile"  # the Modelfile path works by hand too
for model in "$name" "$name-byhand"; do
  reply=$(curl -s "${OLLAMA_HOST:-http://127.0.0.1:11434}/api/chat" -d "{\"model\": \"$model\", \"stream\": false,
    \"messages\": [{\"role\": \"user\", \"content\": \"$question\"}], \"options\": {\"temperature\": 0, \"num_predict\": 64}}")
  echo "$model: $reply"
  echo "$reply" | grep -q '"done_reason":"stop"' || { echo "FAIL: $model did not stop"; exit 1; }
  echo "$reply" | grep -q "$expect" || { echo "FAIL: $model did not answer '$expect'"; exit 1; }
done
ollama rm "$name-byhand" >/dev/null
echo "ok: both the REST deploy and the Modelfile answer and stop"
