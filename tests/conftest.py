"""Suite-wide fixtures: the shared multi-rank launch and common paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from megatron_eopd.testing.multirank import MultirankResults

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("EOPD_SHARED_DATA", REPO_ROOT.parent / "shared" / "data" / "math"))

_selected_specs = []


def pytest_configure(config):
    config.addinivalue_line("markers", "multirank: runs inside the shared torchrun launch on gloo ranks")
    config.addinivalue_line("markers", "vllm: needs a real vLLM installation")
    config.addinivalue_line("markers", "slurm: needs running Slurm daemons")


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


@pytest.fixture(scope="session")
def shared_math_dir() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"offline benchmark data not found at {SHARED_DATA}")
    return SHARED_DATA
