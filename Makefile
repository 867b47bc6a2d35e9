# Entry points for a fresh machine.  `make test` builds .venv from the CPU lock file and runs the
# suite; `make run` runs the main job on its embedded tiny CPU configuration.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.eopd-installed
PYTEST_ARGS ?=

.PHONY: venv test run bench clean

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

clean:
	rm -rf $(VENV) .pytest_cache
