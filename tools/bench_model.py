#!/usr/bin/env python
"""Throughput of the project's Qwen3 models on Megatron-Core next to Hugging Face transformers.

Students (Qwen3-0.6B, 1.7B by default) are timed forward + backward, the teacher (an 8B-shaped
Qwen3) forward only under ``torch.no_grad()``, each at every sequence length and micro-batch size
asked for, for each framework:

* ``megatron``: the model exactly as the project builds it,
  ``megatron_eopd.models.qwen3.build_qwen3_gpt(arch, params_dtype=..., layer_spec=...,
  attention_backend=...)`` under Megatron's TP=1/PP=1 state of a one-process platform
  (``megatron_eopd.platform.init_distributed`` + ``init_model_parallel(1, 1)``), on
  ``platform.default_device()`` in the chosen dtype.  Training loss: ``GPTModel(tokens, positions,
  None, labels=next_tokens)``, i.e. Megatron computes the output logits ``[s, mb, V]`` and on them
  ``megatron.core.tensor_parallel.vocab_parallel_cross_entropy`` (which upcasts the logits to
  fp32), giving a per-token loss ``[mb, s]`` whose mean is back-propagated.  Forward only: the
  logits ``[mb, s, V]``.
* ``megatron-fused``: the same model with the output layer fused into the loss, as the trainer runs
  it (``train.fused_output_layer``): the last stage hands over its final hidden states
  (``models.output_head.final_hidden_states``) and ``objective.fused_head.head_token_loss`` runs
  the head over blocks of tokens with the same cross-entropy (mean over tokens, padded vocabulary
  columns included as in Megatron's), so neither the logits nor their gradient exist in full.
  Forward only: the teacher statistics the trainer computes (entropy, log-prob of the next token,
  top-16) with ``head_summary``, likewise without the logits.
* ``hf``: ``transformers`` ``Qwen3ForCausalLM`` from a ``Qwen3Config`` of the same shape,
  ``attn_implementation="sdpa"``, built on the same device in the same dtype, random init,
  ``use_cache=False``.  Training: ``model(input_ids=tokens, labels=tokens).loss.backward()``
  (transformers' cross-entropy on fp32-upcast logits).
* ``hf-liger``: the same after Liger Kernel's ``apply_liger_kernel_to_qwen3`` (RoPE, RMSNorm,
  SwiGLU, fused linear cross-entropy: the training loss never materialises the logits).  Only
  when ``liger_kernel`` imports and the device is CUDA (Triton kernels); the patches are undone
  afterwards.

No optimizer, no data loader: one step is forward (+ backward) of one micro-batch of random token
ids; gradients are reset to ``None`` before every step (outside the timed region).

Time: median of ``--repeats`` steps after ``--warmup`` steps; CUDA events around each step on
CUDA, ``time.perf_counter`` on the CPU.  Peak memory (CUDA): ``torch.cuda.max_memory_allocated``
over the warm-up and timed steps minus ``torch.cuda.memory_allocated`` before the model was
built, so weights, gradients, activations and logits all count (comparable with the absolute
peaks of the reference measurements, where nothing else was allocated); on the CPU: "n/a".

``--recompute full`` builds the Megatron students with ``train.recompute=full`` (each layer re-run
in backward from its input): the same FLOPs are counted, so MFU then shows the cost of recomputing.

FLOPs (the "model FLOPs" of the MFU convention, no causal discount, no recomputation counted):

    MFU = [6·N·T + 12·L·(H_q·d_head)·s·T] / t / peak_flops        forward + backward
    forward only: one third of that, [2·N·T + 4·L·(H_q·d_head)·s·T] / t / peak_flops

with N = non-embedding parameters + V·hidden (the LM head's matmul; the input embedding is a
lookup), T = micro-batch·s tokens, L layers, H_q query heads of d_head, s the sequence, t the
step time.  peak_flops: dense bf16 by device name (H100 SXM/HBM3 989.4e12, H100 PCIe 756e12,
H200 989.4e12, A100 312e12) or ``--peak-tflops``; an unknown device, the CPU or a non-16-bit dtype
print MFU as n/a.

    python tools/bench_model.py --device cuda                      # the full matrix (minutes)
    python tools/bench_model.py --models 1.7b --seq 4096 --teacher none --frameworks megatron,hf
    python tools/bench_model.py --quick --device cpu               # seconds; used by the test suite
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import inspect
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

# Runnable from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_eopd.models.qwen3.architecture import QWEN3_PRESETS, Qwen3Arch  # noqa: E402
from megatron_eopd.models.qwen3.model import RECOMPUTE_FULL, RECOMPUTE_MODES, RECOMPUTE_NONE  # noqa: E402

GIB = float(2**30)
FRAMEWORKS = ("megatron", "megatron-fused", "hf", "hf-liger")  # also the order they run in (Liger patches go last)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

MODEL_ALIASES = {"0.6b": "Qwen3-0.6B", "1.7b": "Qwen3-1.7B", "4b": "Qwen3-4B", "8b": "Qwen3-8B"}
# --quick: two layers, ~0.5M parameters, Qwen3's layout (GQA 4:2, explicit head_dim, q/k norms).
QUICK_ARCHS = {
    "tiny": Qwen3Arch(128, 2, 4, 2, 32, 384, 1024, tie_word_embeddings=True),
    "tiny-untied": Qwen3Arch(128, 2, 4, 2, 32, 384, 1024, tie_word_embeddings=False),
}
QUICK = dict(models=["tiny"], teacher="tiny-untied", seq=[64], micro_batches=[1, 2], repeats=1, warmup=1)

# Dense (no sparsity) bf16 tensor-core peaks by device-name fragment, first match wins (datasheets).
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100", 989.4e12),  # SXM5, reported as "NVIDIA H100 80GB HBM3"
    ("H200", 989.4e12),  # same chip and clocks as the H100 SXM, more and faster memory
    ("A100", 312e12),
)

# The targets: peers measured on one H100 80GB HBM3, seq 4,096, at their best micro-batch
# (/work/shared/reference/gpu-peers-qwen3-2026-11-28.md, gpu-2026-11-28.md section 4).
PEER_TARGETS = {
    ("hf", "Qwen3-0.6B"): (41_661, 26.9),
    ("hf", "Qwen3-1.7B"): (26_745, 35.5),
    ("hf-liger", "Qwen3-0.6B"): (67_126, 43.4),
    ("hf-liger", "Qwen3-1.7B"): (40_688, 54.0),
    ("teacher", "Qwen3-8B"): (27_099, 48.1),
}
PEER_SEQ = 4096
PEER_FOOTER = """\
Targets (issue 9): peers measured on one H100 80GB HBM3, seq 4,096, best micro-batch, bf16, same formula
(/work/shared/reference/gpu-peers-qwen3-2026-11-28.md, gpu-2026-11-28.md):

| peer | Qwen3-0.6B | Qwen3-1.7B | Qwen3-8B teacher, forward |
|---|---:|---:|---:|
| HF + SDPA | 41.7k tokens/s (26.9% MFU, mb 4) | 26.7k (35.5%, mb 3; mb 4 OOM) | 27.1k tokens/s (48.1%) |
| HF + SDPA + Liger | 67.1k (43% MFU, mb 4) | 40.7k (54%, mb 3) | |
| Megatron at d501e4b (Megatron attn) | 11.7k (7.6%; mb 2 OOM) | 10.3k (13.7%; mb 2 OOM) | 10.5k (18.6%) |

An H200 has the H100's bf16 peak and 1.4x its memory bandwidth: the peers would be somewhat faster there."""


# ----------------------------------------------------------------------------------- FLOPs
def flops_parameters(arch: Qwen3Arch) -> int:
    """N of the formula: non-embedding parameters + V·hidden (the LM head)."""
    return arch.non_embedding_parameters() + arch.vocab_size * arch.hidden_size


def model_flops(arch: Qwen3Arch, seq: int, micro_batch: int, training: bool = True) -> float:
    """6·N·T + 12·L·(H_q·d_head)·s·T for forward + backward, a third of it forward only."""
    tokens = micro_batch * seq
    attention_width = arch.num_attention_heads * arch.head_dim
    fwd_bwd = 6 * flops_parameters(arch) * tokens + 12 * arch.num_layers * attention_width * seq * tokens
    return float(fwd_bwd if training else fwd_bwd / 3)


def peak_flops_for(device_name: Optional[str]) -> Optional[float]:
    """Dense bf16 peak FLOP/s of a GPU by its name, or None when the name is not in the table."""
    if not device_name:
        return None
    name = device_name.lower()
    return next((peak for key, peak in PEAK_BF16_FLOPS if key.lower() in name), None)


# ----------------------------------------------------------------------------------- models
def resolve_arch(name: str) -> tuple[str, Qwen3Arch]:
    """("Qwen3-0.6B", arch) from "0.6b" / "Qwen3-0.6B" / a --quick name."""
    key = name.strip()
    if key.lower() in QUICK_ARCHS:
        return key.lower(), QUICK_ARCHS[key.lower()]
    canonical = MODEL_ALIASES.get(key.lower(), key)
    for preset, arch in QWEN3_PRESETS.items():
        if preset.lower() == canonical.lower():
            return preset, arch
    known = sorted(MODEL_ALIASES) + sorted(QWEN3_PRESETS) + sorted(QUICK_ARCHS)
    raise ValueError(f"unknown model {name!r}; known: {', '.join(known)}")


def hf_qwen3_config(arch: Qwen3Arch):
    """A transformers ``Qwen3Config`` with the architecture's shapes (no KV cache)."""
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=arch.vocab_size,
        hidden_size=arch.hidden_size,
        intermediate_size=arch.ffn_hidden_size,
        num_hidden_layers=arch.num_layers,
        num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_kv_heads,
        head_dim=arch.head_dim,
        max_position_embeddings=arch.max_position_embeddings,
        rms_norm_eps=arch.rms_norm_eps,
        tie_word_embeddings=arch.tie_word_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": arch.rope_theta},
        attention_dropout=0.0,
        use_cache=False,
    )


def build_hf(arch: Qwen3Arch, dtype: torch.dtype, device: torch.device, attn_implementation: str = "sdpa"):
    from transformers import AutoModelForCausalLM

    with torch.device(device):  # initialised where it runs: no fp32 CPU copy of an 8B model
        model = AutoModelForCausalLM.from_config(hf_qwen3_config(arch), dtype=dtype,
                                                 attn_implementation=attn_implementation)
    return model.to(device=device)


def build_megatron(arch: Qwen3Arch, dtype: torch.dtype, layer_spec: str, attention: str,
                   recompute: str = RECOMPUTE_NONE):
    from megatron_eopd.models.qwen3 import build_qwen3_gpt

    extra = {"attention_backend": attention} if layer_spec == "local" else {}
    return build_qwen3_gpt(arch, params_dtype=dtype, layer_spec=layer_spec, recompute=recompute, **extra)


def build_model(framework: str, arch: Qwen3Arch, args: argparse.Namespace, device: torch.device,
                training: bool = True):
    """The model of one framework on ``device`` in ``args.dtype`` (random init); ``--recompute``
    applies to Megatron students (a forward-only teacher keeps no activations to recompute)."""
    dtype = DTYPES[args.dtype]
    if framework in ("megatron", "megatron-fused"):
        return build_megatron(arch, dtype, args.layer_spec, args.attention,
                              recompute=args.recompute if training else RECOMPUTE_NONE)
    return build_hf(arch, dtype, device)


def framework_label(framework: str, args: argparse.Namespace, training: bool = True) -> str:
    if framework in ("megatron", "megatron-fused"):
        head = ", fused head" if framework == "megatron-fused" else ""
        head += ", full recompute" if training and args.recompute == RECOMPUTE_FULL else ""
        if args.layer_spec == "local":
            return f"{framework} (local spec, {args.attention} attn{head})"
        return f"{framework} (te spec{head})"
    return {"hf": "hf sdpa", "hf-liger": "hf sdpa+liger"}[framework]


def liger_unavailable(device: torch.device) -> Optional[str]:
    """Why the hf-liger variant cannot run here, or None."""
    if device.type != "cuda":
        return "Liger's kernels are Triton GPU kernels; skipped on the CPU"
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger_kernel is not installed; skipped"
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_qwen3  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
        return f"liger_kernel does not import ({type(exc).__name__}: {_first_line(exc)}); skipped"
    return None


@contextlib.contextmanager
def liger_patched():
    """transformers' Qwen3 with Liger's patches, restored afterwards (they replace module globals
    and class attributes of ``modeling_qwen3``)."""
    from liger_kernel.transformers import apply_liger_kernel_to_qwen3
    from transformers.models.qwen3 import modeling_qwen3

    saved = dict(vars(modeling_qwen3))
    classes = {name: dict(vars(obj)) for name, obj in saved.items()
               if isinstance(obj, type) and obj.__module__ == modeling_qwen3.__name__}
    wanted = dict(rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=True)
    accepted = inspect.signature(apply_liger_kernel_to_qwen3).parameters
    apply_liger_kernel_to_qwen3(**{k: v for k, v in wanted.items() if k in accepted})
    try:
        yield
    finally:
        for key in set(vars(modeling_qwen3)) - set(saved):
            delattr(modeling_qwen3, key)
        for key, value in saved.items():
            if getattr(modeling_qwen3, key, None) is not value:
                setattr(modeling_qwen3, key, value)
        for name, attrs in classes.items():
            cls = saved[name]
            for key in set(vars(cls)) - set(attrs):
                delattr(cls, key)
            for key, value in attrs.items():
                if vars(cls).get(key) is not value:
                    setattr(cls, key, value)


# ----------------------------------------------------------------------------------- steps
class Batch:
    """Random token ids [mb, s], their positions and next-token labels, on the device."""

    def __init__(self, vocab: int, seq: int, micro_batch: int, device: torch.device, seed: int = 0):
        gen = torch.Generator(device=device).manual_seed(seed)
        self.tokens = torch.randint(0, vocab, (micro_batch, seq), generator=gen, device=device)
        self.positions = torch.arange(seq, device=device).unsqueeze(0).expand(micro_batch, -1)
        self.labels = torch.roll(self.tokens, shifts=-1, dims=1)


def megatron_train_step(model, batch: Batch) -> None:
    # GPTModel with labels: output logits [s, mb, V] -> vocab_parallel_cross_entropy -> [mb, s].
    loss = model(batch.tokens, batch.positions, None, labels=batch.labels)
    loss.mean().backward()


def megatron_forward_step(model, batch: Batch) -> torch.Tensor:
    with torch.no_grad():
        return model(batch.tokens, batch.positions, None)  # [mb, s, V] logits


def megatron_fused_train_step(model, batch: Batch) -> None:
    from megatron_eopd.models.output_head import final_hidden_states, head_weight
    from megatron_eopd.objective.fused_head import cross_entropy_per_token, head_token_loss

    with final_hidden_states(model):
        hidden = model(batch.tokens, batch.positions, None)  # [mb, s, hidden]
    flat = hidden.reshape(-1, hidden.shape[-1])
    loss_sum, _, _ = head_token_loss(flat, head_weight(model), batch.labels.reshape(-1, 1), cross_entropy_per_token,
                                     want_entropy=False)
    (loss_sum / flat.shape[0]).backward()


def megatron_fused_forward_step(model, batch: Batch):
    from megatron_eopd.models.output_head import final_hidden_states, head_weight
    from megatron_eopd.objective.fused_head import head_summary

    with torch.no_grad(), final_hidden_states(model):
        hidden = model(batch.tokens, batch.positions, None)
        return head_summary(hidden.reshape(-1, hidden.shape[-1]), head_weight(model),
                            sampled_ids=batch.labels.reshape(-1), topk=16)


def hf_train_step(model, batch: Batch) -> None:
    model(input_ids=batch.tokens, labels=batch.tokens).loss.backward()


def hf_forward_step(model, batch: Batch) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch.tokens).logits


STEPS: dict[tuple[str, bool], Callable] = {
    ("megatron", True): megatron_train_step,
    ("megatron", False): megatron_forward_step,
    ("megatron-fused", True): megatron_fused_train_step,
    ("megatron-fused", False): megatron_fused_forward_step,
    ("hf", True): hf_train_step,
    ("hf", False): hf_forward_step,
    ("hf-liger", True): hf_train_step,
    ("hf-liger", False): hf_forward_step,
}


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA's OutOfMemoryError, the CPU allocator giving up, or an allocator message saying so."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:160]


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _timed(step: Callable, model, batch: Batch, device: torch.device) -> float:
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = step(model, batch)
        end.record()
        end.synchronize()
        del out
        return float(start.elapsed_time(end))
    t0 = time.perf_counter()
    out = step(model, batch)
    elapsed = (time.perf_counter() - t0) * 1e3
    del out
    return elapsed


def measure(step: Callable, model, arch: Qwen3Arch, seq: int, micro_batch: int, args, device: torch.device,
            memory_start: Optional[int]) -> tuple[float, Optional[float]]:
    """(median ms, peak GiB above ``memory_start`` or None on the CPU) of one configuration."""
    batch = Batch(arch.vocab_size, seq, micro_batch, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.warmup):
        _timed(step, model, batch, device)
    times = [_timed(step, model, batch, device) for _ in range(args.repeats)]
    peak = None
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated() - memory_start) / GIB
    return statistics.median(times), peak


# ----------------------------------------------------------------------------------- driver
def _row(framework, args, model_name, training, seq, micro_batch, **fields) -> dict:
    row = dict(framework=framework, variant=framework_label(framework, args, training), model=model_name,
               role="student" if training else "teacher", step="fwd+bwd" if training else "fwd",
               seq=seq, micro_batch=micro_batch, status="ok", ms=None, tokens_per_s=None, tflops=None,
               mfu=None, peak_gib=None, weights_gib=None, note="")
    row.update(fields)
    return row


def _progress(row: dict) -> None:
    if row["status"] == "ok":
        what = f"{row['ms']:.1f} ms, {row['tokens_per_s']:,.0f} tokens/s"
    else:
        what = f"{row['status']} {row['note']}"
    where = f"{row['variant']} {row['model']} {row['step']} s={row['seq']} mb={row['micro_batch']}"
    print(f"[bench_model] {where}: {what}", file=sys.stderr, flush=True)


def bench_model(framework: str, model_name: str, training: bool, args, device: torch.device,
                peak: Optional[float], rows: list) -> None:
    """Every (seq, micro-batch) of one model on one framework, appended to ``rows``."""
    name, arch = resolve_arch(model_name)
    step = STEPS[(framework, training)]
    free_memory(device)
    memory_start = torch.cuda.memory_allocated() if device.type == "cuda" else None
    model, failure = None, None
    try:
        model = build_model(framework, arch, args, device, training=training)
    except Exception as exc:  # noqa: BLE001 - only out-of-memory is a result; anything else re-raises
        if not is_out_of_memory(exc):
            raise
        failure = f"building the model: {_first_line(exc)}"
    if model is None:
        free_memory(device)
        for seq in args.seq:
            for mb in args.micro_batches:
                rows.append(_row(framework, args, name, training, seq, mb, status="out of memory",
                                 note=failure))
                _progress(rows[-1])
        return
    model.train(training)
    weights = (torch.cuda.memory_allocated() - memory_start) / GIB if device.type == "cuda" else None
    try:
        for seq in args.seq:
            too_big = None  # the smallest micro-batch that ran out of memory at this length
            for mb in args.micro_batches:
                if too_big is not None and mb > too_big:
                    rows.append(_row(framework, args, name, training, seq, mb, status="out of memory",
                                     note=f"not tried: mb {too_big} did not fit", weights_gib=weights))
                    _progress(rows[-1])
                    continue
                result, failure = None, None
                try:
                    result = measure(step, model, arch, seq, mb, args, device, memory_start)
                except Exception as exc:  # noqa: BLE001
                    if not is_out_of_memory(exc):
                        raise
                    failure = _first_line(exc)
                finally:
                    model.zero_grad(set_to_none=True)
                if result is None:
                    free_memory(device)  # the failed step's tensors died with its traceback
                    too_big = mb
                    rows.append(_row(framework, args, name, training, seq, mb, status="out of memory",
                                     note=failure, weights_gib=weights))
                    _progress(rows[-1])
                    continue
                ms, peak_gib = result
                flops = model_flops(arch, seq, mb, training)
                tflops = flops / (ms * 1e-3) / 1e12
                rows.append(_row(framework, args, name, training, seq, mb, ms=ms,
                                 tokens_per_s=mb * seq / (ms * 1e-3), tflops=tflops,
                                 mfu=100.0 * tflops * 1e12 / peak if peak else None,
                                 peak_gib=peak_gib, weights_gib=weights))
                _progress(rows[-1])
    finally:
        del model
        with contextlib.suppress(Exception):  # cleanup must not mask the error on its way out
            free_memory(device)


def versions() -> str:
    """torch / transformers / megatron-core / liger-kernel versions, for the caption."""
    from importlib import metadata

    parts = [f"torch {torch.__version__}"]
    for label, dist_name in (("transformers", "transformers"), ("megatron-core", "megatron-core"),
                             ("liger-kernel", "liger-kernel")):
        try:
            parts.append(f"{label} {metadata.version(dist_name)}")
        except metadata.PackageNotFoundError:
            parts.append(f"{label} absent")
    return ", ".join(parts)


def _setup_platform(requested: str):
    """The one-process platform and Megatron's TP=1/PP=1 state; returns (platform, started_here)."""
    import torch.distributed as dist

    from megatron_eopd.platform import distributed as platform_dist

    started = not dist.is_initialized()
    platform = platform_dist.init_distributed(device=requested)
    if platform.device.type != requested:
        raise RuntimeError(f"the platform is already initialised on {platform.device}, not {requested}")
    if platform.world_size != 1:
        raise RuntimeError(f"bench_model runs as one process (world size {platform.world_size}); "
                           "launch it with python, not torchrun")
    platform_dist.init_model_parallel(1, 1)
    return platform, started


def _teardown_platform(started: bool) -> None:
    from megatron_eopd.platform import distributed as platform_dist

    if started:
        platform_dist.shutdown()
    else:
        platform_dist.destroy_model_parallel()


def run(args: argparse.Namespace, rows: Optional[list] = None) -> dict:
    """Run the benchmark; rows are appended to ``rows`` as they finish (kept if something raises)."""
    rows = [] if rows is None else rows
    platform, started = _setup_platform(args.device)
    device = platform.device
    try:
        device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        peak = args.peak_tflops * 1e12 if args.peak_tflops else (
            peak_flops_for(device_name) if device.type == "cuda" else None)
        if args.dtype not in ("bf16", "fp16") and not args.peak_tflops:
            peak = None  # the table holds 16-bit tensor-core peaks
        report = dict(rows=rows, notes=[], device=str(device), device_name=device_name, peak_flops=peak,
                      versions=versions(), args={k: v for k, v in vars(args).items()})
        jobs = [(m, True) for m in args.models] + ([(args.teacher, False)] if args.teacher else [])
        for framework in (f for f in FRAMEWORKS if f in args.frameworks):
            patched = contextlib.nullcontext()
            if framework == "hf-liger":
                reason = liger_unavailable(device)
                if reason:
                    report["notes"].append(f"hf sdpa+liger: {reason}")
                    continue
                patched = liger_patched()
            with patched:
                for model_name, training in jobs:
                    if framework != "hf-liger":
                        bench_model(framework, model_name, training, args, device, peak, rows)
                        continue
                    try:  # a third-party patch that breaks is a finding, not the end of the run
                        bench_model(framework, model_name, training, args, device, peak, rows)
                    except Exception as exc:  # noqa: BLE001
                        report["notes"].append(f"hf sdpa+liger {model_name}: failed with "
                                               f"{type(exc).__name__}: {_first_line(exc)}")
                        free_memory(device)
        return report
    finally:
        _teardown_platform(started)


# ----------------------------------------------------------------------------------- output
def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _tflops(value: Optional[float]) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if value >= 10 else f"{value:.3g}"


def caption(report: dict, args) -> str:
    peak = report["peak_flops"]
    source = "--peak-tflops" if args.peak_tflops else "bf16 dense, by device name"
    peak_text = (f"{peak / 1e12:.1f} TFLOP/s ({source})" if peak
                 else "unknown for this device/dtype, so MFU is n/a")
    timing = "CUDA events" if report["device"].startswith("cuda") else "wall clock (time.perf_counter)"
    memory = ("torch.cuda.max_memory_allocated during the steps minus the memory allocated before the model "
              "was built (weights, gradients, activations, logits)" if report["device"].startswith("cuda")
              else "n/a on the CPU")
    megatron_loss = ("GPTModel(labels=) -> Megatron's tensor_parallel.vocab_parallel_cross_entropy on the "
                     "[s, mb, V] logits (fp32 inside), mean over tokens")
    where = f"{report['device_name']}** ({report['device']}, {args.dtype}, TP=PP=1, one process)"
    return "\n".join([
        f"**Qwen3 throughput on {where}; median of {args.repeats} after {args.warmup} warm-up(s), "
        f"{timing}; {report.get('versions') or versions()}.",
        "",
        "MFU = [6·N·T + 12·L·(H_q·d_head)·s·T] / t / peak_flops for fwd+bwd (fwd only: one third of "
        "that), N = non-embedding parameters + V·hidden, T = micro-batch·s; "
        f"peak_flops = {peak_text}.",
        f"Loss, fwd+bwd rows: megatron {megatron_loss}; megatron-fused: the same cross-entropy with the "
        "output layer fused in (head_token_loss over blocks of tokens; no full logits or logit gradient); "
        "hf `labels=` (transformers' CE on fp32-upcast logits; with Liger its fused linear CE). fwd rows: "
        "the teacher's full logits under torch.no_grad(); megatron-fused: the trainer's teacher statistics "
        "(entropy, next-token log-prob, top-16) from the hidden states, no full logits. "
        f"peak GiB: {memory}; weights GiB: what building the model allocated.",
    ])


def markdown_table(headers: list, rows: list) -> str:
    left = {"framework / variant", "model", "pass", "note"}
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join("---" if h in left else "---:" for h in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in cells) + " |" for cells in rows]
    return "\n".join(lines)


def results_table(rows: list) -> str:
    headers = ["framework / variant", "model", "pass", "seq", "mb", "ms", "tokens/s", "model TFLOP/s",
               "MFU %", "peak GiB", "weights GiB", "note"]
    body = []
    for r in rows:
        model = r["model"] + (" (teacher)" if r["role"] == "teacher" else "")
        if r["status"] != "ok":
            body.append([r["variant"], model, r["step"], r["seq"], r["micro_batch"], r["status"],
                         "-", "-", "-", "-", _fmt(r["weights_gib"], ".2f"), r["note"]])
            continue
        body.append([r["variant"], model, r["step"], r["seq"], r["micro_batch"], f"{r['ms']:.1f}",
                     f"{r['tokens_per_s']:,.0f}", _tflops(r["tflops"]),
                     "n/a" if r["mfu"] is None else f"{r['mfu']:.1f}",
                     "n/a" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}",
                     "n/a" if r["weights_gib"] is None else f"{r['weights_gib']:.2f}", r["note"]])
    return markdown_table(headers, body)


def best_rows(rows: list) -> list:
    """The fastest micro-batch of each (framework, model, pass, seq) that ran."""
    best: dict = {}
    for r in rows:
        if r["status"] != "ok":
            continue
        key = (r["variant"], r["model"], r["step"], r["seq"])
        if key not in best or r["tokens_per_s"] > best[key]["tokens_per_s"]:
            best[key] = r
    return list(best.values())


def _peer(row: dict) -> Optional[tuple[int, float]]:
    if row["seq"] != PEER_SEQ:
        return None
    if row["role"] == "teacher":
        return PEER_TARGETS.get(("teacher", row["model"]))
    # Megatron is held against the strongest easy peer (HF + Liger).
    peer = "hf-liger" if row["framework"].startswith("megatron") else row["framework"]
    return PEER_TARGETS.get((peer, row["model"]))


def best_table(rows: list) -> str:
    headers = ["framework / variant", "model", "pass", "seq", "best mb", "tokens/s", "MFU %", "peak GiB",
               "H100 peer tokens/s", "this / peer"]
    body = []
    for r in best_rows(rows):
        peer = _peer(r)
        model = r["model"] + (" (teacher)" if r["role"] == "teacher" else "")
        body.append([r["variant"], model, r["step"], r["seq"], r["micro_batch"], f"{r['tokens_per_s']:,.0f}",
                     "n/a" if r["mfu"] is None else f"{r['mfu']:.1f}",
                     "n/a" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}",
                     f"{peer[0]:,}" if peer else "-",
                     f"{r['tokens_per_s'] / peer[0]:.2f}x" if peer else "-"])
    return markdown_table(headers, body)


def render(report: dict, args, out=None) -> None:
    out = out or sys.stdout
    rows = report["rows"]
    print(caption(report, args), file=out)
    print(file=out)
    print(results_table(rows), file=out)
    print(file=out)
    print("Best tokens/s per framework, model and sequence (its best micro-batch; the peer column is the "
          "strongest easy peer for megatron, the same variant for hf):", file=out)
    print(file=out)
    print(best_table(rows), file=out)
    for note in report["notes"]:
        print(f"\nNote: {note}", file=out)
    print(file=out)
    print(PEER_FOOTER, file=out)


# ----------------------------------------------------------------------------------- CLI
def _int_list(text: str) -> list:
    values = [int(x) for x in text.split(",") if x.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def _name_list(text: str) -> list:
    return [x.strip() for x in text.split(",") if x.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=_name_list, default=None,
                        help="students, fwd+bwd (default 0.6b,1.7b; also 4b, 8b, or preset names)")
    parser.add_argument("--teacher", default=None,
                        help="teacher shape, forward only (default 8b; 'none' to skip)")
    parser.add_argument("--seq", type=_int_list, default=None, help="sequence lengths (default 2048,4096)")
    parser.add_argument("--micro-batches", type=_int_list, default=None,
                        help="micro-batch sizes (default 1,2,3,4)")
    parser.add_argument("--frameworks", type=_name_list, default=list(FRAMEWORKS),
                        help="any of megatron,hf,hf-liger (default all; they run in that order)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed steps per configuration (median; default 4)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None,
                        help="default: cuda when visible (cpu with --quick)")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None,
                        help="default bf16 on cuda, fp32 on cpu")
    parser.add_argument("--attention", choices=["sdpa", "megatron"], default="sdpa",
                        help="core attention of the Megatron local spec (models/attention.py); default sdpa")
    parser.add_argument("--layer-spec", choices=["local", "te"], default=None,
                        help="Megatron layer spec (default: te when transformer-engine imports, else local)")
    parser.add_argument("--recompute", choices=list(RECOMPUTE_MODES), default=RECOMPUTE_NONE,
                        help="activation recomputation of the Megatron students (train.recompute); default none")
    parser.add_argument("--peak-tflops", type=float, default=None, help="override the device's peak for MFU")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    parser.add_argument("--quick", action="store_true",
                        help="tiny 2-layer models, seq 64, mb 1-2, 1 repeat, on the CPU: seconds (the test)")
    args = parser.parse_args(argv)

    defaults = dict(models=["0.6b", "1.7b"], teacher="8b", seq=[2048, 4096], micro_batches=[1, 2, 3, 4],
                    repeats=4, warmup=2)
    if args.quick:
        defaults.update(QUICK)
        args.device = args.device or "cpu"
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if str(args.teacher).lower() in ("none", ""):
        args.teacher = None
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device")
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    if args.layer_spec is None:
        from megatron_eopd.models.qwen3.model import default_layer_spec_name

        args.layer_spec = default_layer_spec_name()
    unknown = sorted(set(args.frameworks) - set(FRAMEWORKS))
    if unknown:
        parser.error(f"unknown frameworks {unknown}; choose from {', '.join(FRAMEWORKS)}")
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    try:
        for name in args.models + ([args.teacher] if args.teacher else []):
            resolve_arch(name)
    except ValueError as exc:
        parser.error(str(exc))
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    rows: list = []
    try:
        report = run(args, rows)
    except BaseException:
        # Whatever finished is still worth seeing (e.g. a GPU run cut short).
        partial = dict(rows=rows, notes=["INCOMPLETE: the run stopped with an error (traceback below)"],
                       device=args.device, device_name=args.device, peak_flops=None)
        render(partial, args)
        raise
    render(report, args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        serialisable = dict(report, args={k: (str(v) if isinstance(v, Path) else v)
                                          for k, v in report["args"].items()})
        args.json.write_text(json.dumps(serialisable, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
