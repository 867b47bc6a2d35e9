#!/usr/bin/env python
"""Write a real-shaped Qwen3 Hugging Face directory with seeded random weights (see
:mod:`megatron_eopd.checkpoint.random_qwen3`): rehearse a cluster job before downloading weights."""

import argparse
import sys
from pathlib import Path

# Runnable from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

EXIT_BAD_INPUT = 2


def parser() -> argparse.ArgumentParser:
    from megatron_eopd.checkpoint.random_qwen3 import ARCHS, DTYPES

    p = argparse.ArgumentParser(prog="make_qwen3", description=__doc__.split("(see")[0].strip() + ".",
                                epilog="Exit status 2 on bad input; nothing is left behind.")
    p.add_argument("--arch", required=True, choices=list(ARCHS), help="which Qwen3 preset's shapes")
    p.add_argument("--output", required=True, type=Path, help="directory to create")
    p.add_argument("--num-layers", type=int, default=None, help="fewer layers than the preset (default: all)")
    p.add_argument("--seed", type=int, default=0, help="weights' seed (default 0)")
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16", help="weights' dtype (default bf16, as the hub)")
    p.add_argument("--kind", choices=("base", "instruct"), default="instruct",
                   help="Qwen3-Base (eos <|endoftext|>) or the chat model (eos <|im_end|>); default instruct")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    return p


def main(argv=None) -> int:
    from megatron_eopd.checkpoint.random_qwen3 import RandomCheckpointError, write_random_qwen3
    from megatron_eopd.data.qwen3_tokenizer import TokenizerUnavailableError

    args = parser().parse_args(argv)
    try:
        out = write_random_qwen3(args.output, args.arch, num_layers=args.num_layers, seed=args.seed,
                                 dtype=args.dtype, kind=args.kind, overwrite=args.overwrite, progress=True)
    except (RandomCheckpointError, TokenizerUnavailableError) as exc:
        print(f"make_qwen3: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
