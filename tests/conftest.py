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
