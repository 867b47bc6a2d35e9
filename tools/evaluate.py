#!/usr/bin/env python
"""Thin CLI over :func:`megatron_eopd.evaluation.runner.main` (see its module docstring)."""

import sys
from pathlib import Path

# Runnable from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_eopd.evaluation.runner import main  # noqa: E402

if __name__ == "__main__":  # vLLM starts its engine in a spawned process: keep the guard
    sys.exit(main())
