#!/usr/bin/env python
"""Time both weight-sync paths (Megatron student -> vLLM) and extrapolate to Qwen3-4B by bytes moved.

For each model size: build the Megatron student (TP1/PP1, in this process) from a random HF Qwen3,
start vLLM on its HF export, then run ``WeightSyncer.sync`` ``--repeats`` times per path:

* memory/bytes: exporter -> bucketed RPC carrying the tensors' bytes into vLLM's worker extension
  -> ``load_weights`` in place;
* memory/ipc:   the same, but each bucket is one shared buffer the worker maps (CUDA IPC on GPUs,
  ``/dev/shm`` on CPU) and the RPC carries only its handle;
* disk:         exporter -> safetensors HF directory under a sync dir -> vLLM in-place reload.

Sync time (export + transfer + load) and the parity probe (the syncer's own, as the trainer runs
it after every sync) are timed separately, and a second table breaks one sync into its parts
(median over the repeats): ``export`` (Megatron -> HF-named tensors, ``iter_hf_weights``), ``pack``
(buckets into their transport), ``engine_load`` (the RPCs into the worker and vLLM's
``load_weights``), ``finish`` (vLLM's post-load processing), ``prefix_cache_reset``, then the
probe's ``probe_generate`` (engine greedy token), ``probe_megatron`` (the student's forward),
``probe_score`` (engine prompt log-probs) and ``probe_compare``.  The probe's verdict is reported,
not enforced (its tolerances are set to infinity here: the table shows the differences).  A line
``t = fixed + bytes / throughput`` fitted through the sizes' medians gives the Qwen3-4B estimate
(bf16, tied embedding sent once).

Sizes: ``tiny`` and ``small`` come from the tiny maker (a toy tokenizer); ``qwen3-0.6b-2l`` is Qwen3-0.6B
at its real widths and real 151,936-row vocabulary, cut to 2 layers, with the real tokenizer and
config (``write_random_qwen3``; about 0.75 GB in fp32), the shape the trainer's real-shape runs use.  Numbers on a CPU machine describe the CPU transports (disk
through the page cache); on GPU clusters the model sits on the GPU, ``ipc`` is a CUDA IPC handle
and the disk path a shared file system, so re-run it there.

    python tools/bench_weight_sync.py                 # tiny + small, bf16
    python tools/bench_weight_sync.py --sizes tiny --repeats 2 --dtype float32 --paths memory/ipc
    python tools/bench_weight_sync.py --sizes qwen3-0.6b-2l --repeats 3 --dtype float32 --paths memory/ipc
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Runnable from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PATHS = ("memory/bytes", "memory/ipc", "disk")
SIZES = {
    # name: make_tiny_qwen3 keyword arguments
    "tiny": dict(hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32, ffn_hidden_size=128),
    "small": dict(
        hidden_size=512,
        num_layers=8,
        num_heads=8,
        num_kv_heads=4,
        head_dim=64,
        ffn_hidden_size=1536,
        vocab_size=4096,
        init_std=0.02,
    ),
}
# name: write_random_qwen3 arguments (real widths, vocabulary, tokenizer and config; fewer layers)
REAL_SIZES = {
    "qwen3-0.6b-2l": dict(arch="0.6b", num_layers=2, seed=1, dtype="fp32", kind="base"),
}
# The parts of one sync, in the order they run (WeightLoadReport.parts, then the probe's).
PARTS = ("export", "pack", "engine_load", "finish", "prefix_cache_reset", "load",
         "probe_generate", "probe_megatron", "probe_score", "probe_compare")


def _source(name: str, args, workdir: Path) -> Path:
    """The HF directory the student starts from."""
    if name in REAL_SIZES:
        from megatron_eopd.checkpoint.random_qwen3 import write_random_qwen3

        return write_random_qwen3(workdir / f"{name}-init", **REAL_SIZES[name])
    from megatron_eopd.testing.tiny_qwen3 import make_tiny_qwen3

    return make_tiny_qwen3(workdir / f"{name}-init", dtype=args.dtype, **SIZES[name])


def _bench_size(name: str, args, workdir: Path) -> list[dict]:
    import torch

    from megatron_eopd.checkpoint import HFSafetensors
    from megatron_eopd.checkpoint.hf_writer import copy_side_files, write_hf_weights
    from megatron_eopd.models.qwen3 import (
        build_qwen3_gpt,
        expected_hf_shapes,
        iter_hf_weights,
        load_hf_weights,
    )
    from megatron_eopd.rollout import (
        ParityProbeConfig,
        RolloutConfig,
        SamplingConfig,
        WeightSyncer,
        create_rollout_engine,
    )

    dtype = getattr(torch, args.dtype)
    src = _source(name, args, workdir)
    student = build_qwen3_gpt(src, params_dtype=dtype, layer_spec="local", perform_initialization=False)
    load_hf_weights(student, HFSafetensors(src))
    student.eval()
    served = workdir / f"{name}-served"
    served.mkdir()
    write_hf_weights(
        served, iter_hf_weights(student, to_rank=0), expected_hf_shapes(student.eopd_arch), dtype
    )
    (served / "config.json").write_text((src / "config.json").read_text())
    copy_side_files(src, served)

    config = RolloutConfig(
        engine="vllm",
        dtype=args.dtype,
        enforce_eager=True,
        max_model_len=256,
        show_progress=False,
        sampling=SamplingConfig(max_tokens=16),
        sync_dir=str(workdir / f"{name}-sync"),
        sync_bucket_mb=args.bucket_mb,
        # Reported, not enforced: the tables show the differences next to the timings.
        parity=ParityProbeConfig(max_abs_tolerance=float("inf"), mean_abs_tolerance=float("inf")),
    )
    engine = create_rollout_engine(config, served)
    syncer = WeightSyncer(engine, config)
    rows = []
    try:
        for path in args.paths:
            method, _, transport = path.partition("/")
            engine.config = config.replace(sync_transport=transport or "auto")
            times, probes, parts, report = [], [], [], None
            for rep in range(args.repeats):
                with torch.no_grad():
                    for p in student.parameters():
                        p.add_(1e-3 * torch.randn_like(p))
                t0 = time.perf_counter()
                report = syncer.sync(student, method=method, probe=True)
                total = time.perf_counter() - t0
                probe_s = sum(v for k, v in report.parts.items() if k.startswith("probe_"))
                times.append(total - probe_s)
                probes.append(probe_s)
                parts.append(report.parts)
            rows.append(
                dict(
                    size=name,
                    path=path,
                    tensors=report.load.num_tensors,
                    bytes=report.load.num_bytes,
                    messages=report.load.num_messages,
                    sync_s=statistics.median(times),
                    probe_s=statistics.median(probes),
                    probe_tokens=report.parity.num_tokens,
                    max_diff=report.parity.max_abs_diff,
                    mean_diff=report.parity.mean_abs_diff,
                    parts={k: statistics.median(p.get(k, 0.0) for p in parts) for k in PARTS
                           if any(k in p for p in parts)},
                )
            )
    finally:
        engine.close()
    return rows


def _fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares ``t = a + b * bytes`` (one point: a = 0)."""
    if len(points) == 1:
        x, y = points[0]
        return 0.0, y / x
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    b = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
    return max(my - b * mx, 0.0), b


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="tiny,small",
                        help=f"comma-separated, from {sorted(SIZES) + sorted(REAL_SIZES)}")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--bucket-mb", type=float, default=512.0, help="in-memory sync bucket size")
    parser.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated, from {list(PATHS)}")
    args = parser.parse_args(argv)
    args.paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    if not args.paths or any(p not in PATHS for p in args.paths):
        parser.error(f"--paths: choose from {list(PATHS)}, got {args.paths}")
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in sizes if s not in SIZES and s not in REAL_SIZES]
    if unknown:
        parser.error(f"unknown sizes {unknown}; choose from {sorted(SIZES) + sorted(REAL_SIZES)}")
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")

    from megatron_eopd.models.qwen3 import QWEN3_PRESETS
    from megatron_eopd.platform import init_distributed, init_model_parallel, shutdown

    init_distributed()
    init_model_parallel(1, 1)
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="bench_weight_sync_") as tmp:
            for size in sizes:
                rows.extend(_bench_size(size, args, Path(tmp)))
    finally:
        shutdown()

    mib = 1024**2
    print(
        f"\nWeight sync, Megatron TP1/PP1 -> vLLM ({args.dtype}, bucket {args.bucket_mb:g} MiB, "
        f"median of {args.repeats})"
    )
    width = max(6, *(len(r["size"]) for r in rows))
    header = (
        f"{'size':{width}} {'path':12} {'tensors':>7} {'MiB':>9} {'msgs':>5} {'sync s':>8} {'MiB/s':>8} "
        f"{'probe s':>8} {'max diff':>9} {'mean diff':>9}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['size']:{width}} {r['path']:12} {r['tensors']:7d} {r['bytes'] / mib:9.2f} {r['messages']:5d} "
            f"{r['sync_s']:8.3f} {r['bytes'] / mib / r['sync_s']:8.1f} {r['probe_s']:8.3f} "
            f"{r['max_diff']:9.2e} {r['mean_diff']:9.2e}"
        )

    print(f"\nOne sync by part (seconds, median of {args.repeats}; probe over each row's scored tokens)")
    for r in rows:
        total = r["sync_s"] + r["probe_s"]
        print(f"{r['size']} {r['path']}: {total:.3f} s in all, probe {r['probe_tokens']} tokens")
        for part, seconds in r["parts"].items():
            print(f"  {part:20} {seconds:8.3f} {100 * seconds / total:5.1f}%")

    arch = QWEN3_PRESETS["Qwen3-4B"]
    bytes_4b = arch.total_parameters() * 2  # bf16; a tied embedding is exported once
    print(
        f"\nExtrapolation to Qwen3-4B: {arch.total_parameters() / 1e9:.2f} B parameters, "
        f"{bytes_4b / 1024**3:.2f} GiB "
        f"in bf16 (fit t = fixed + bytes / throughput over the sizes above)"
    )
    header = f"{'path':12} {'fixed s':>8} {'MiB/s':>8} {'est. sync s':>12}"
    print(header)
    print("-" * len(header))
    for path in args.paths:
        pts = [(r["bytes"], r["sync_s"]) for r in rows if r["path"] == path]
        fixed, per_byte = _fit(pts)
        throughput = 1 / per_byte / mib if per_byte > 0 else float("inf")
        print(f"{path:12} {fixed:8.3f} {throughput:8.1f} {fixed + per_byte * bytes_4b:12.1f}")
    if len(sizes) == 1:
        print("(one size only: its fixed per-sync cost is counted as bandwidth; run with --sizes tiny,small)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
