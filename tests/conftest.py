"""Suite-wide fixtures: the shared multi-rank launch."""

from __future__ import annotations

import pytest

from megatron_eopd.testing.multirank import MultirankResults

_selected_specs = []


def pytest_configure(config):
    config.addinivalue_line("markers", "multirank: runs inside the shared torchrun launch on gloo ranks")
    config.addinivalue_line("markers", "vllm: needs a real vLLM installation")
    config.addinivalue_line("markers", "slurm: starts a real Slurm, one node or several simulated in namespaces (needs root)")


def pytest_collection_finish(session):
    # Only the checks that survived -k / -m / path selection are launched.  (This runs after every
    # plugin's collection_modifyitems, deselection included; collecting there could see items
    # that -k later drops.)
    for item in session.items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and "multirank_spec" in callspec.params:
            _selected_specs.append(callspec.params["multirank_spec"])


@pytest.fixture(scope="session")
def multirank_results(tmp_path_factory):
    return MultirankResults(list(_selected_specs), tmp_path_factory.mktemp("multirank"))


@pytest.fixture
def model_parallel():
    """A lone process's (gloo) group with Megatron's TP=1/PP=1 state, torn down as it was found."""
    import torch.distributed as dist

    from megatron_eopd.platform import distributed as platform_dist

    started = not dist.is_initialized()
    platform_dist.init_distributed()
    platform_dist.init_model_parallel(1, 1)
    yield
    if started:
        platform_dist.shutdown()
    else:
        platform_dist.destroy_model_parallel()


# Few SFT steps: enough to exercise the Slurm jobs' path, not to make good models.
SLURM_TINY_PREPARE_ARGS = ("--teacher-sft-iterations", "4", "--student-sft-iterations", "2")


@pytest.fixture(scope="session")
def slurm_tiny_assets(tmp_path_factory):
    """Tiny teacher and student prepared once per session (``tools/run_tiny.py --prepare-only`` with
    :data:`SLURM_TINY_PREPARE_ARGS`), for Slurm jobs that need models but need not prepare them:
    copied into a run directory's ``assets/``, the job's own preparation step finds them cached
    (the same arguments, hence the same recipe).  Returns ``(assets directory, the arguments)``."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    run_dir = tmp_path_factory.mktemp("slurm-tiny-prepared")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "EOPD_"))}
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "tools/run_tiny.py", "--prepare-only", "--run-dir", str(run_dir),
                           *SLURM_TINY_PREPARE_ARGS], cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir / "assets", " ".join(SLURM_TINY_PREPARE_ARGS)
