# Entry points for a fresh machine.  `make test` builds .venv from the CPU lock file and runs the
# suite; `make run` runs the main job on its embedded tiny CPU configuration.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.eopd-installed
PYTEST_ARGS ?=

.PHONY: venv test run bench clean test-mcore-latest

venv: $(STAMP)

$(STAMP): requirements/cpu.lock setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=24"
	$(PY) -m pip install -q --no-deps -r requirements/cpu.lock
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) -c "import torch, megatron.core, vllm, transformers; print('env ok: torch', torch.__version__, '| megatron-core', megatron.core.__version__, '| vllm', vllm.__version__)"
	touch $@

test: $(STAMP)
	$(PY) -m pytest tests $(PYTEST_ARGS)

run: $(STAMP)
	$(PY) tools/bench_loss.py

bench: $(STAMP)
	$(PY) tools/bench_loss.py

# Clusters run newer Megatron-Core on Python 3.12 (NGC).  This builds a second venv with
# megatron-core 0.19.2 (PyPI torch: a CUDA build, ~5 GB) and runs every suite that does not need
# vLLM or ModelOpt, on CPU, against it.
VENV_LATEST := .venv-mcore-latest
# python3.12 on PATH, or pyenv's 3.12 where only a shim is there; override with PYTHON312=...
PYTHON312 ?= $(shell PYENV_VERSION=$$(pyenv versions --bare 2>/dev/null | grep '^3\.12' | tail -n 1) \
	python3.12 -c 'import sys; print(sys.executable)' 2>/dev/null || echo python3.12)
test-mcore-latest:
	$(PYTHON312) -m venv $(VENV_LATEST)
	$(VENV_LATEST)/bin/python -m pip install -q "torch==2.13.0" megatron-core==0.19.2 transformers==5.19.0 \
		safetensors pyyaml pytest tqdm rich numpy packaging psutil
	$(VENV_LATEST)/bin/python -m pip install -q --no-deps -e .
	$(VENV_LATEST)/bin/python -m pytest tests/test_platform.py tests/test_config.py tests/test_qwen3_architecture.py \
		tests/test_convert_tools.py tests/test_qwen3_multirank.py tests/test_objective_units.py \
		tests/test_objective_reference.py -k "not modelopt" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(VENV_LATEST) .pytest_cache
