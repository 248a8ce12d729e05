# The two commands of README.md:
#   make smoke   set up .venv and run the main job on the embedded default (CPU, minutes)
#   make test    set up .venv (and the local Slurm cluster) and run every test tier but `gpu` and `slow`
# make test-all adds the `slow` tier (too long for CI's budget; with the GGUF tests, after make deploy-tools):
# run it before resolving an issue
PY := .venv/bin/python

.PHONY: setup smoke test test-all slurm-up slurm-down deploy-tools

setup:
	bash scripts/setup.sh

smoke: setup
	$(PY) experiments/qwen_lora_ja.py --executor local --smoke

slurm-up:
	bash slurm/local/install.sh
	bash slurm/local/start.sh --nodes 2

slurm-down:
	bash slurm/local/stop.sh

test: setup slurm-up
	$(PY) -m pytest -m "not gpu and not slow"

# llama.cpp's converters and llama-cpp-python, built once into ~/.cache/jp-peft (jp-peft export gguf; ~8 min first)
deploy-tools: setup
	bash scripts/deploy_tools.sh

test-all: setup slurm-up deploy-tools
	$(PY) -m pytest -m "not gpu"
