#!/usr/bin/env python
"""Peak memory and time of the EOPD loss: vocab-parallel (chunked) vs a naive dense implementation.

Both start from the same bf16 student logits (requires grad) and teacher logits of shape
[tokens, vocab] and do the whole job: teacher entropy, sampled log-prob and top-k, then the
student loss forward + backward.  The naive one is what a first implementation looks like: full
fp32 upcast, dense log-softmax, autograd keeping the [tokens, vocab] fp32 log-probs.

Memory column, CPU: the peak of live bytes allocated by torch's CPU allocator during one run,
above what was live when it started (inputs excluded, the returned gradient included); it is
replayed from the allocation and free events of ``torch.profiler`` (profile_memory=True), so
short-lived temporaries are counted exactly.  CUDA: ``torch.cuda.max_memory_allocated`` above
the start.  Time: median wall time over --repeats runs (interleaved), forward + backward, with
--threads intra-op threads on CPU (default 1).
On CUDA the table also gives the HBM floor: bytes of both logit tensors read once divided by the
peak bandwidth, and how far above it the measured time is.
``--kernels`` picks the vocab-parallel implementation (``EOPD_LOSS_KERNELS``): the default "auto"
gives one "vocab-parallel" row (Triton on CUDA, torch on CPU); a list such as "torch,triton" gives
one row per choice, each compared with the naive one.

    python tools/bench_loss.py                         # Qwen3 vocabulary, 256/1024/2048 tokens
    python tools/bench_loss.py --tokens 4096 --device cuda
    python tools/bench_loss.py --tokens 16384 --device cuda --kernels torch,triton
    python tools/bench_loss.py --quick                 # seconds; used by the test suite
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_eopd.objective import EOPDLossConfig, compute_teacher_stats, eopd_loss  # noqa: E402
from megatron_eopd.objective import vocab_parallel  # noqa: E402

QWEN3_VOCAB = 151_936
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Peak HBM bandwidth in GB/s by device-name fragment (vendor datasheets).
PEAK_BANDWIDTH_GBS = {"H200": 4800.0, "H100": 3350.0, "A100": 2039.0, "L40S": 864.0, "A10": 600.0}


def make_inputs(tokens, vocab, dtype, device, seed=0):
    """Inputs drawn directly on ``device`` in ``dtype`` (no fp32 [tokens, vocab] anywhere: that alone
    is ~40 GB at 65536 tokens of Qwen3's vocabulary)."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    scale = torch.exp(torch.empty(tokens, 1, device=device).uniform_(0.0, 2.0, generator=gen)).to(dtype)
    student = torch.randn(tokens, vocab, generator=gen, device=device, dtype=dtype).mul_(scale)
    teacher = torch.randn(tokens, vocab, generator=gen, device=device, dtype=dtype).mul_(scale)
    sampled = torch.randint(0, vocab, (tokens,), generator=gen, device=device)
    mask = torch.rand(tokens, generator=gen, device=device) < 0.9
    old = -3.0 + 0.3 * torch.randn(tokens, generator=gen, device=device)
    return student.requires_grad_(), teacher, sampled, mask, old


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator giving up."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def release(inputs, device):
    """Drop the gradient and give cached blocks back, so one implementation's leftovers never count
    against (or crowd out) the next."""
    inputs[0].grad = None
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def vocab_parallel_step(student, teacher, sampled, mask, old, cfg):
    stats = compute_teacher_stats(teacher, sampled, topk=cfg.topk, response_mask=mask, chunk_tokens=cfg.chunk_tokens)
    loss, _ = eopd_loss(student, sampled, mask, stats, old_logprobs=old, config=cfg)
    loss.backward()
    return loss.detach()


def with_kernels(step, kernels):
    """``step`` with ``EOPD_LOSS_KERNELS`` set to ``kernels`` while it runs."""

    def run(*args):
        saved = os.environ.get(vocab_parallel.KERNELS_ENV)
        os.environ[vocab_parallel.KERNELS_ENV] = kernels
        try:
            return step(*args)
        finally:
            if saved is None:
                del os.environ[vocab_parallel.KERNELS_ENV]
            else:
                os.environ[vocab_parallel.KERNELS_ENV] = saved

    return run


def implementations(kernels):
    """Name -> step: the naive one, then vocab-parallel once per ``--kernels`` choice."""
    impls = {"naive": naive_step}
    for choice in kernels:
        name = "vocab-parallel" if kernels == ["auto"] else f"vocab-parallel ({choice})"
        impls[name] = with_kernels(vocab_parallel_step, choice)
    return impls


def naive_step(student, teacher, sampled, mask, old, cfg):
    with torch.no_grad():
        teacher_logp = torch.log_softmax(teacher.float(), dim=-1)
        teacher_entropy = -(teacher_logp.exp() * teacher_logp).sum(-1)
        teacher_sampled = teacher_logp.gather(1, sampled[:, None])[:, 0]
        top_logp, top_ids = teacher_logp.topk(cfg.topk, dim=-1)
        del teacher_logp
    logq = torch.log_softmax(student.float(), dim=-1)
    logq_sampled = logq.gather(1, sampled[:, None])[:, 0]
    advantage = teacher_sampled - old
    ratio = torch.exp(logq_sampled - old)
    clipped = ratio.clamp(1 - cfg.clip_eps_low, 1 + cfg.clip_eps_high)
    rkl = torch.maximum(-ratio * advantage, -clipped * advantage)
    renorm = torch.log_softmax(top_logp, dim=-1)
    fkl = (renorm.exp() * (renorm - logq.gather(1, top_ids))).sum(-1)
    per_token = rkl + cfg.alpha * (teacher_entropy > cfg.tau).float() * fkl
    loss = (per_token * mask).sum() / mask.sum()
    loss.backward()
    return loss.detach()


@contextlib.contextmanager
def _stderr_silenced():
    """The profiler's C++ side prints start/stop lines on fd 2."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def peak_bytes(step, inputs, cfg, device):
    student = inputs[0]
    student.grad = None
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(*inputs, cfg)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    from torch.profiler import ProfilerActivity, profile

    with _stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(*inputs, cfg)
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()  # negative for frees
        peak = max(peak, live)
    return peak


def time_ms(step, inputs, cfg, device):
    inputs[0].grad = None
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = step(*inputs, cfg)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3, out


def peak_bandwidth_gbs(device, override):
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((bw for key, bw in PEAK_BANDWIDTH_GBS.items() if key in name), None)


def _measure(name, step, inputs, cfg, device, repeats, warm_up):
    """(median ms, peak bytes, loss) of one implementation, or None when it runs out of memory."""
    try:
        if warm_up:
            step(*inputs, cfg)  # lazy initialisation
            release(inputs, device)
        times = []
        for _ in range(repeats):
            ms, loss = time_ms(step, inputs, cfg, device)
            times.append(ms)
            release(inputs, device)
        peak = peak_bytes(step, inputs, cfg, device)
        return statistics.median(times), peak, float(loss)
    except Exception as exc:  # noqa: BLE001 - only out-of-memory is expected; anything else re-raises
        if not is_out_of_memory(exc):
            raise
        print(f"{name}: out of memory ({str(exc).splitlines()[0][:160]})", file=sys.stderr)
        return None
    finally:
        release(inputs, device)


def _gradient_difference(steps, inputs, cfg, device):
    """Max |grad difference| between two implementations (one reference gradient kept), or None
    when the pair does not fit; run after the measurements so it never inflates them."""
    reference = None
    try:
        steps[0](*inputs, cfg)
        reference, inputs[0].grad = inputs[0].grad, None
        steps[1](*inputs, cfg)
        return float((reference.float() - inputs[0].grad.float()).abs().max())
    except Exception as exc:  # noqa: BLE001
        if not is_out_of_memory(exc):
            raise
        return None
    finally:
        del reference
        release(inputs, device)


def run(args):
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    cfg = EOPDLossConfig(topk=args.topk, tau=args.tau, chunk_tokens=args.chunk_tokens)
    bandwidth = peak_bandwidth_gbs(device, args.peak_bandwidth_gbs)
    rows = []
    for tokens in args.tokens:
        inputs = make_inputs(tokens, args.vocab, dtype, device)
        impls = implementations(args.kernels)
        measured = {}
        for name, step in impls.items():
            m = _measure(name, step, inputs, cfg, device, args.repeats, warm_up=tokens == args.tokens[0])
            measured[name] = m
            # As it happens, so that a run stopped by a time limit still shows what it measured.
            what = f"{m[0]:.1f} ms, peak {m[1] / 2**20:.0f} MiB" if m else "out of memory"
            print(f"[bench_loss] {tokens} tokens, {name}: {what}", file=sys.stderr, flush=True)
        floor_ms = None
        if bandwidth:
            floor_ms = 2 * tokens * args.vocab * inputs[0].element_size() / (bandwidth * 1e9) * 1e3
        naive = measured["naive"]
        for name, step in impls.items():
            m = measured[name]
            loss_diff = grad_diff = None
            if name != "naive" and m and naive:
                loss_diff = abs(naive[2] - m[2]) / max(abs(naive[2]), 1e-12)
                grad_diff = _gradient_difference([impls["naive"], step], inputs, cfg, device)
            rows.append(
                dict(
                    tokens=tokens,
                    impl=name,
                    oom=m is None,
                    peak_mib=m[1] / 2**20 if m else None,
                    mem_ratio=naive[1] / max(m[1], 1) if m and naive else None,
                    ms=m[0] if m else None,
                    speedup=naive[0] / m[0] if m and naive else None,
                    floor_ms=floor_ms,
                    loss_rel_diff=loss_diff,
                    grad_max_diff=grad_diff,
                )
            )
        del inputs
        release_all(device)
    return rows


def release_all(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def render(rows, args):
    headers = ["tokens", "impl", "peak MiB", "naive/this mem", "ms fwd+bwd", "speed vs naive"]
    with_floor = any(r["floor_ms"] for r in rows)
    if with_floor:
        headers += ["HBM floor ms", "x floor"]
    headers += ["loss rel diff", "grad max diff"]
    table_rows = []
    def fmt(value, spec, suffix=""):
        return "-" if value is None else f"{value:{spec}}{suffix}"

    for r in rows:
        if r["oom"]:
            cells = [str(r["tokens"]), r["impl"], "OOM", "-", "OOM", "-"]
            cells += ["-", "-"] if with_floor else []
            cells += ["-", "-"]
            table_rows.append(cells)
            continue
        cells = [str(r["tokens"]), r["impl"], fmt(r["peak_mib"], ".1f"), fmt(r["mem_ratio"], ".2f", "x"),
                 fmt(r["ms"], ".1f"), fmt(r["speedup"], ".2f", "x")]
        if with_floor:
            cells += [f"{r['floor_ms']:.3f}", f"{r['ms'] / r['floor_ms']:.1f}x"]
        cells += [fmt(r["loss_rel_diff"], ".1e"), fmt(r["grad_max_diff"], ".1e")]
        table_rows.append(cells)
    threads = f", {args.threads} thread(s)" if args.device == "cpu" else ""
    title = (f"EOPD loss, vocab {args.vocab}, {args.dtype}, top-{args.topk}, device {args.device}{threads}, "
             f"TP=1, median of {args.repeats}")
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title)
        for h in headers:
            table.add_column(h, justify="left" if h == "impl" else "right")
        for cells in table_rows:
            table.add_row(*cells)
        Console(width=160).print(table)
    except ImportError:
        widths = [max(len(h), *(len(c[i]) for c in table_rows)) for i, h in enumerate(headers)]
        print(title)
        print("  ".join(h.rjust(w) for h, w in zip(headers, widths)))
        for cells in table_rows:
            print("  ".join(c.rjust(w) for c, w in zip(cells, widths)))
    print("peak memory: torch allocator bytes live above the start (inputs excluded, gradient included)")
    print("diff columns: this row vs naive.  With bf16 logits many top-k boundaries are ties, which\n"
          "torch.topk breaks arbitrarily (the vocab-parallel top-k takes the lowest ids, like the fp64\n"
          "reference in tests/), so ~1e-4 loss differences are expected; fp32 logits agree to ~1e-7.")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=lambda s: [int(x) for x in s.split(",")], default=[256, 1024, 2048],
                        help="comma-separated token counts (default 256,1024,2048)")
    parser.add_argument("--vocab", type=int, default=QWEN3_VOCAB)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per size (median); default 1 keeps the default run under ~2 min on 2 CPU cores")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads on CPU (default 1: on a shared 2-core machine OpenMP "
                             "barriers against a busy core distort both columns; one core per TP rank)")
    parser.add_argument("--topk", type=int, default=16)
    parser.add_argument("--tau", type=float, default=0.8)
    parser.add_argument("--chunk-tokens", type=int, default=None, help="default: the loss's own choice")
    parser.add_argument("--peak-bandwidth-gbs", type=float, default=None,
                        help="override the GPU's peak memory bandwidth for the HBM floor")
    parser.add_argument("--kernels", type=lambda s: s.split(","), default=["auto"],
                        help="comma-separated EOPD_LOSS_KERNELS choices, one vocab-parallel row each:"
                             " auto (default), torch, triton")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (a few seconds)")
    args = parser.parse_args(argv)
    if args.quick:
        args.tokens, args.vocab, args.repeats = [256], 16384, 1
        args.chunk_tokens = args.chunk_tokens or 32
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is visible")
    unknown = set(args.kernels) - {"auto", "torch", "triton"}
    if unknown or len(set(args.kernels)) != len(args.kernels):
        parser.error(f"--kernels takes distinct auto, torch, triton; got {','.join(args.kernels)}")
    kernels = vocab_parallel.triton_kernels
    probe = torch.empty(0, dtype=DTYPES[args.dtype], device=args.device)
    if "triton" in args.kernels and not (kernels and kernels.available(probe)):
        parser.error(f"--kernels triton: the Triton kernels do not run on {args.dtype} {args.device} tensors"
                     " here (they need CUDA, or TRITON_INTERPRET=1 on CPU)")
    return args


def main(argv=None):
    args = parse_args(argv)
    rows = run(args)
    render(rows, args)
    return rows


if __name__ == "__main__":
    main()
