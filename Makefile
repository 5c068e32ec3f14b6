# Two commands for a fresh machine (each does its own setup):
#   make demo   - synthesise parts, train PatchCore, export ONNX, serve a video, print verdicts
#   make test   - the test suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch/torchvision pinned to the releases on this machine's disk (setup.cfg admits them)
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test lint venv clean

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/activate setup.cfg pyproject.toml
	$(BIN)/pip install -q $(TORCH_PINS)
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(BIN)/python -m edgeinspect.demo

test: venv
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -ra

lint: venv
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) demo_out .pytest_cache
