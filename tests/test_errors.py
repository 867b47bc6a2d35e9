"""Every exception class megatron-eopd defines derives from EOPDError (and keeps its built-in base)."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import megatron_eopd
from megatron_eopd.errors import EOPDError

PACKAGE_DIR = Path(megatron_eopd.__file__).parent


def _exception_classes():
    """(module, class name) of every top-level class whose name ends in Error/Unavailable, read from source."""
    found = []
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        module = ".".join(("megatron_eopd", *path.relative_to(PACKAGE_DIR).with_suffix("").parts))
        module = module.removesuffix(".__init__")
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef) and node.name.endswith(("Error", "Unavailable")):
                found.append((module, node.name))
    return found


def test_every_package_exception_derives_from_eopd_error():
    classes = _exception_classes()
    assert len(classes) >= 13, classes  # the scan found the package's errors
    not_derived = []
    for module, name in classes:
        cls = getattr(importlib.import_module(module), name)
        if cls is not EOPDError and not issubclass(cls, EOPDError):
            not_derived.append(f"{module}.{name}")
    assert not not_derived, f"not derived from EOPDError: {not_derived}"


def test_built_in_bases_are_kept():
    from megatron_eopd.config import ConfigError
    from megatron_eopd.models.qwen3 import UnsupportedArchitectureError
    from megatron_eopd.trainer.state import CheckpointError
    from megatron_eopd.trainer.student import NonFiniteError

    assert issubclass(ConfigError, ValueError) and issubclass(UnsupportedArchitectureError, ValueError)
    assert issubclass(CheckpointError, RuntimeError) and issubclass(NonFiniteError, FloatingPointError)
