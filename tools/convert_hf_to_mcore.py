#!/usr/bin/env python
"""Thin CLI over :func:megatron_eopd.checkpoint.convert.hf_to_mcore_main (see its module docstring)."""

import sys
from pathlib import Path

# Runnable from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_eopd.checkpoint.convert import hf_to_mcore_main as main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
