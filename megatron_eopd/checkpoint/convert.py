"""The two conversion commands (HF -> Megatron torch_dist, and back), as ``main(argv)`` functions.

Both validate every input before writing, write into a temporary directory next to the output and
rename it at the end, and exit with status 2 and a message naming the problem on bad input.

Process groups: run as a plain process, a command opens a world-size-1 process group itself (gloo
on CPU, NCCL on GPU) and converts at TP=1/PP=1 - the torch_dist checkpoint reshards on load, so
``--tp/--pp`` are validated and recorded.  Run under ``torchrun`` with ``WORLD_SIZE = TP*PP*k``,
each rank builds and writes only its own shard (memory per rank ~ model / (TP*PP)).
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Optional, Sequence

from megatron_eopd.checkpoint.errors import ConversionError
from megatron_eopd.checkpoint.mcore_dist import DTYPES, HF_SUBDIR

EXIT_BAD_INPUT = 2
_EPILOG = (
    "Runs as a plain process (opens a world-size-1 gloo/NCCL group itself) or under torchrun with "
    "WORLD_SIZE a multiple of TP*PP (each rank then handles only its shard). Exit status 2 on bad input; "
    "nothing is left behind."
)


# --------------------------------------------------------------------------- shared plumbing


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _check_output(output: Path, overwrite: bool) -> None:
    if output.exists() and not overwrite:
        raise ConversionError(f"output directory {output} already exists (pass --overwrite to replace it)")
    if output.exists() and not output.is_dir():
        raise ConversionError(f"output {output} exists and is not a directory")


@contextmanager
def _process_group():
    """Yield (rank, world_size); open a world-size-1 group when none exists, and close it after."""
    import torch.distributed as dist

    from megatron_eopd.platform import distributed as platform_dist

    started = not dist.is_initialized()
    if started:
        platform_dist.init_distributed()
    close = platform_dist.shutdown if started else platform_dist.destroy_model_parallel
    try:
        yield dist.get_rank(), dist.get_world_size()
    except BaseException:
        _quietly(close, "closing the process group")  # must not replace the error in flight
        raise
    close()


def _layout(world: int, tp: int, pp: int) -> tuple[int, int]:
    if world == 1:
        return 1, 1  # torch_dist is layout-free: a lone process writes the whole model
    if world % (tp * pp):
        raise ConversionError(f"world size {world} is not a multiple of TP*PP = {tp}*{pp}")
    return tp, pp


def _broadcast_obj(obj, rank: int):
    import torch.distributed as dist

    box = [obj if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _quietly(fn: Callable[[], object], what: str) -> None:
    """Run clean-up while another error is propagating: report its own failure, never raise it."""
    try:
        fn()
    except BaseException as exc:  # noqa: BLE001 - the error in flight is the one to report
        _log(f"(while handling the error below, {what} also failed: {type(exc).__name__}: {exc})")


def _agree_on_failure(failed: bool) -> bool:
    """True on every rank if any rank failed (so all ranks clean up and exit together)."""
    import torch
    import torch.distributed as dist

    from megatron_eopd.platform import distributed as platform_dist

    # On the device the backend reduces on: NCCL has no CPU path.
    flag = torch.tensor([1 if failed else 0], dtype=torch.int32, device=platform_dist.collective_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


@contextmanager
def _staging_dir(output: Path, rank: int, overwrite: bool):
    """A temporary directory next to ``output`` (shared by all ranks), renamed to ``output`` on success.

    On any failure - this rank's, another rank's, or the agreement collective's own - the staging
    directory is removed and this rank raises; an error raised inside the block is re-raised as is.
    """
    import torch.distributed as dist

    tmp = None
    if rank == 0:
        output.parent.mkdir(parents=True, exist_ok=True)
        tmp = output.parent / f".{output.name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
    tmp = Path(_broadcast_obj(str(tmp) if tmp else None, rank))

    def discard() -> None:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)

    try:
        yield tmp
    except BaseException:
        # Tell the other ranks (they may still be writing into tmp), then clean up even if that fails.
        if dist.is_initialized():
            _quietly(lambda: _agree_on_failure(True), "telling the other ranks")
        discard()
        raise
    try:
        any_failed = _agree_on_failure(False) if dist.is_initialized() else False
    except BaseException:
        discard()
        raise
    if any_failed:
        discard()
        raise RuntimeError("the conversion failed on another rank (see its error); nothing was written")
    if rank == 0:
        if output.exists() and overwrite:
            trash = output.parent / f".{output.name}.old-{uuid.uuid4().hex[:8]}"
            output.rename(trash)
            shutil.rmtree(trash, ignore_errors=True)
        tmp.rename(output)
    if dist.is_initialized():
        dist.barrier()


def _progress(total: int, desc: str, rank: int):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", disable=rank != 0, file=sys.stderr, mininterval=1.0)


def _run(fn: Callable[[argparse.Namespace], None], parser: argparse.ArgumentParser, argv) -> int:
    from megatron_eopd.models.qwen3.architecture import UnsupportedArchitectureError
    from megatron_eopd.models.qwen3.mapping import MappingError

    args = parser.parse_args(argv)
    try:
        fn(args)
    except (ConversionError, UnsupportedArchitectureError, MappingError) as exc:
        _log(f"{parser.prog}: error: {exc}")
        return EXIT_BAD_INPUT
    return 0


# --------------------------------------------------------------------------- HF -> Megatron


def hf_to_mcore_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="convert_hf_to_mcore",
        description="Convert a HF Qwen3ForCausalLM directory into a Megatron-Core torch_dist checkpoint "
        "(loadable at any TP/PP: torch_dist reshards on load).",
        epilog=_EPILOG,
    )
    p.add_argument("--hf-dir", required=True, type=Path, help="HF model directory (safetensors)")
    p.add_argument("--output", required=True, type=Path, help="checkpoint directory to create")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size to validate for / shard at")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to validate for / shard at")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="parameter dtype (default bf16)")
    p.add_argument("--layer-spec", choices=("auto", "te", "local"), default="auto",
                   help="Megatron layer spec (default: transformer-engine when importable)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    return p


def _hf_to_mcore(args: argparse.Namespace) -> None:
    from megatron_eopd.checkpoint.safetensors_io import HFSafetensors
    from megatron_eopd.models.qwen3.architecture import DEFAULT_VOCAB_DIVISOR, padded_vocab_size, parse_hf_config, validate_parallelism
    from megatron_eopd.models.qwen3.mapping import validate_hf_tensor_set

    hf_dir, output = args.hf_dir, args.output
    if not hf_dir.is_dir():
        raise ConversionError(f"HF directory {hf_dir} does not exist")
    arch = parse_hf_config(hf_dir)
    try:
        validate_parallelism(arch, args.tp, args.pp, padded_vocab_size(arch.vocab_size, args.tp))
    except ValueError as exc:
        raise ConversionError(str(exc)) from exc
    _check_output(output, args.overwrite)
    weights = HFSafetensors(hf_dir)
    validate_hf_tensor_set(arch, weights.shapes())
    # Inputs are valid; from here on only our own bugs or I/O can fail.

    from megatron_eopd.checkpoint.hf_writer import copy_side_files
    from megatron_eopd.checkpoint.mcore_dist import save_mcore_checkpoint, write_checkpoint_meta
    from megatron_eopd.models.qwen3.transfer import load_hf_weights
    from megatron_eopd.models.qwen3.model import build_qwen3_gpt, default_layer_spec_name
    from megatron_eopd.platform import init_model_parallel

    spec = default_layer_spec_name() if args.layer_spec == "auto" else args.layer_spec
    with _process_group() as (rank, world):
        tp, pp = _layout(world, args.tp, args.pp)
        init_model_parallel(tp, pp)
        with _staging_dir(output, rank, args.overwrite) as tmp:
            model = build_qwen3_gpt(arch, params_dtype=DTYPES[args.dtype], layer_spec=spec,
                                    perform_initialization=False)
            n_params = sum(1 for _ in model.parameters())
            with _progress(n_params, "HF -> Megatron (rank 0)", rank) as bar:
                load_hf_weights(model, weights, arch, progress=lambda _n: bar.update(1))
            _log(f"writing torch_dist checkpoint (layout TP={tp} PP={pp}, world {world}) ...") if rank == 0 else None
            save_mcore_checkpoint(model, tmp)
            if rank == 0:
                hf_out = tmp / HF_SUBDIR
                hf_out.mkdir()
                shutil.copy2(hf_dir / "config.json", hf_out / "config.json")
                copy_side_files(hf_dir, hf_out)
                write_checkpoint_meta(tmp, tp=args.tp, pp=args.pp, dtype=args.dtype,
                                      padded_vocab=model.eopd_padded_vocab, vocab_divisor=DEFAULT_VOCAB_DIVISOR,
                                      layer_spec=spec, source=str(hf_dir.resolve()))
    if rank == 0:
        _log(f"wrote {output}")


def hf_to_mcore_main(argv: Optional[Sequence[str]] = None) -> int:
    """``convert_hf_to_mcore`` entry point; returns the exit status."""
    return _run(_hf_to_mcore, hf_to_mcore_parser(), argv)


# --------------------------------------------------------------------------- Megatron -> HF


def _parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?i?B?)\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 5GB, 500MB)")
    unit = match.group(2).upper().rstrip("B").rstrip("I")
    return int(float(match.group(1)) * {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}[unit])


def mcore_to_hf_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="convert_mcore_to_hf",
        description="Export a megatron-eopd Qwen3 torch_dist checkpoint as a HF directory (transformers / vLLM).",
        epilog=_EPILOG,
    )
    p.add_argument("--mcore-dir", required=True, type=Path, help="checkpoint written by convert_hf_to_mcore or training")
    p.add_argument("--output", required=True, type=Path, help="HF directory to create")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="output dtype (default: the checkpoint's)")
    p.add_argument("--max-shard-size", type=_parse_size, default=_parse_size("5GB"),
                   help="largest safetensors file (default 5GB); larger models are sharded with an index")
    p.add_argument("--tp", type=int, default=1, help="under torchrun: TP to load at (default 1)")
    p.add_argument("--pp", type=int, default=1, help="under torchrun: PP to load at (default 1)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    return p


def _mcore_to_hf(args: argparse.Namespace) -> None:
    from megatron_eopd.checkpoint.mcore_dist import hf_config_of, read_checkpoint_meta
    from megatron_eopd.models.qwen3.architecture import parse_hf_config, validate_parallelism

    ckpt, output = args.mcore_dir, args.output
    if not ckpt.is_dir():
        raise ConversionError(f"Megatron checkpoint directory {ckpt} does not exist")
    meta = read_checkpoint_meta(ckpt)
    hf_config = hf_config_of(ckpt)
    arch = parse_hf_config(hf_config)
    try:
        validate_parallelism(arch, args.tp, args.pp, meta["padded_vocab_size"])
    except ValueError as exc:
        raise ConversionError(str(exc)) from exc
    _check_output(output, args.overwrite)
    out_dtype_name = args.dtype or meta["dtype"]

    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    from megatron_eopd.checkpoint.hf_writer import write_hf_files
    from megatron_eopd.checkpoint.mcore_dist import load_mcore_checkpoint
    from megatron_eopd.models.qwen3.mapping import expected_hf_shapes
    from megatron_eopd.models.qwen3.transfer import iter_hf_weights
    from megatron_eopd.models.qwen3.model import build_qwen3_gpt
    from megatron_eopd.platform import init_model_parallel

    out_dtype = DTYPES[out_dtype_name]
    with _process_group() as (rank, world):
        tp, pp = _layout(world, args.tp, args.pp)
        init_model_parallel(tp, pp)
        model = build_qwen3_gpt(arch, params_dtype=DTYPES[meta["dtype"]], layer_spec=meta.get("layer_spec"),
                                vocab_divisor=meta.get("vocab_divisor", 128), perform_initialization=False)
        if model.eopd_padded_vocab != meta["padded_vocab_size"]:
            raise ConversionError(f"checkpoint vocabulary padding {meta['padded_vocab_size']} does not match "
                                  f"{model.eopd_padded_vocab} at TP={tp}")
        try:
            load_mcore_checkpoint(model, ckpt)
        except ConversionError:
            raise
        except (Exception, CheckpointException) as exc:  # noqa: BLE001 - mismatches surface in many ways
            raise ConversionError(f"checkpoint {ckpt} does not match its Qwen3 config: {exc}") from exc
        with _staging_dir(output, rank, args.overwrite) as tmp:
            shapes = expected_hf_shapes(arch)
            stream = iter_hf_weights(model, arch, to_rank=0)
            if rank == 0:
                with _progress(len(shapes), "Megatron -> HF", rank) as bar:
                    write_hf_files(tmp, stream, shapes, out_dtype, hf_config=hf_config,
                                   side_files_from=ckpt / HF_SUBDIR, max_shard_bytes=args.max_shard_size, progress=bar)
            else:
                for _ in stream:  # drive the collectives; only rank 0 receives tensors
                    pass
    if rank == 0:
        _log(f"wrote {output}")


def mcore_to_hf_main(argv: Optional[Sequence[str]] = None) -> int:
    """``convert_mcore_to_hf`` entry point; returns the exit status."""
    return _run(_mcore_to_hf, mcore_to_hf_parser(), argv)
