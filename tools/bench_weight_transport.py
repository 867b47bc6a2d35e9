#!/usr/bin/env python
"""How fast a whole Qwen3 model's weights cross into another process, by each sync transport.

No vLLM is needed (the lent GPU image has none): a spawned receiver process stands in for a vLLM
worker.  It decodes each bucket with the worker extension's own decoder
(``megatron_eopd.rollout.transports.decode_bucket``) and copies every tensor into its own
preallocated copy of the model on its device, which is what vLLM's ``load_weights`` does with
them.  The sender streams the model's HF-named tensors (random, in ``--dtype``, on ``--device``)
in buckets of ``--bucket-mb`` through ``encoded_bucket`` and a ``multiprocessing`` pipe (pickled,
as vLLM's RPC pickles them), waiting for each bucket's acknowledgement like ``collective_rpc``.
On CUDA the receiver sees only the sender's GPU, by UUID in its ``CUDA_VISIBLE_DEVICES``, so it
numbers it ``cuda:0`` as an engine beside a rank of a node would.

Time: one full-model sync, median of ``--repeats`` after one warm-up.  ``match``: the receiver's
float64 sum of every tensor equals the sender's.

    python tools/bench_weight_transport.py                                   # CPU, Qwen3-0.6B
    python tools/bench_weight_transport.py --device cuda --models 0.6b,1.7b,4b
    python tools/bench_weight_transport.py --models tiny --repeats 1         # seconds; the test suite
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import time
from pathlib import Path

# Runnable from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from megatron_eopd.models.qwen3 import QWEN3_PRESETS, Qwen3Arch, expected_hf_shapes  # noqa: E402
from megatron_eopd.rollout.transports import BYTES, IPC, decode_bucket, encoded_bucket  # noqa: E402

MODELS = {
    "tiny": Qwen3Arch(hidden_size=64, num_layers=2, num_attention_heads=4, num_kv_heads=2, head_dim=16,
                      ffn_hidden_size=128, vocab_size=512, tie_word_embeddings=True),
    "0.6b": QWEN3_PRESETS["Qwen3-0.6B"],
    "1.7b": QWEN3_PRESETS["Qwen3-1.7B"],
    "4b": QWEN3_PRESETS["Qwen3-4B"],
}
GIB = 1024**3


def _receiver(conn, shapes: dict, dtype: torch.dtype, device: str, visible) -> None:
    """The stand-in worker: decode, copy into its own parameters, acknowledge; on ``None``, report checksums."""
    if visible is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = visible
    device = torch.device(device)
    params = {name: torch.empty(shape, dtype=dtype, device=device) for name, shape in shapes.items()}
    conn.send("ready")
    while True:
        payload = conn.recv()
        if payload is None:
            conn.send(sum(float(p.double().sum()) for p in params.values()))
            return
        count = 0
        for name, tensor in decode_bucket(payload, device):
            params[name].copy_(tensor)
            count += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        conn.send(count)


def _buckets(named: list, limit: int):
    bucket, size = [], 0
    for name, tensor in named:
        bucket.append((name, tensor))
        size += tensor.numel() * tensor.element_size()
        if size >= limit:
            yield bucket
            bucket, size = [], 0
    if bucket:
        yield bucket


def _one_sync(conn, named: list, transport: str, limit: int) -> float:
    start = time.perf_counter()
    for bucket in _buckets(named, limit):
        with encoded_bucket(transport, bucket) as payload:
            conn.send(payload)
            assert conn.recv() == len(bucket)
    return time.perf_counter() - start


def bench_model(name: str, args) -> list[dict]:
    arch = MODELS[name]
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    shapes = expected_hf_shapes(arch)
    gen = torch.Generator(device=device).manual_seed(0)
    named = [(n, torch.randn(s, generator=gen, device=device, dtype=torch.float32).to(dtype)) for n, s in shapes.items()]
    expected = sum(float(t.double().sum()) for _, t in named)
    num_bytes = sum(t.numel() * t.element_size() for _, t in named)
    visible, receiver_device = None, "cpu"
    if device.type == "cuda":
        gpu_uuid = str(torch.cuda.get_device_properties(device).uuid)
        visible = gpu_uuid if gpu_uuid.startswith("GPU-") else f"GPU-{gpu_uuid}"
        receiver_device = "cuda:0"
    rows = []
    context = multiprocessing.get_context("spawn")
    for transport in args.transports:
        parent, child = context.Pipe()
        process = context.Process(target=_receiver, args=(child, shapes, dtype, receiver_device, visible))
        process.start()
        try:
            assert parent.recv() == "ready"
            times = [_one_sync(parent, named, transport, int(args.bucket_mb * 2**20))
                     for _ in range(args.repeats + 1)][1:]
            parent.send(None)
            received = parent.recv()
        finally:
            process.join(60)
            if process.is_alive():
                process.kill()
        seconds = statistics.median(times)
        rows.append(dict(model=name, transport=transport, gib=num_bytes / GIB, seconds=seconds,
                         rate=num_bytes / GIB / seconds, match=received == expected))
        # As it happens, so that a run stopped by a time limit still shows what it measured.
        print(f"[bench_weight_transport] {name} {transport}: {seconds:.3f} s, {rows[-1]['rate']:.2f} GiB/s",
              file=sys.stderr, flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="0.6b", help=f"comma-separated, from {list(MODELS)}")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--bucket-mb", type=float, default=512.0, help="rollout.sync_bucket_mb")
    parser.add_argument("--transports", default=f"{BYTES},{IPC}", help="comma-separated, from bytes, ipc")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.transports = [t.strip() for t in args.transports.split(",") if t.strip()]
    if not models or any(m not in MODELS for m in models):
        parser.error(f"--models: choose from {list(MODELS)}, got {models}")
    if not args.transports or any(t not in (BYTES, IPC) for t in args.transports):
        parser.error(f"--transports: choose from {[BYTES, IPC]}, got {args.transports}")
    if args.repeats < 1 or not args.bucket_mb > 0:
        parser.error("--repeats must be >= 1 and --bucket-mb > 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")

    rows = [row for name in models for row in bench_model(name, args)]
    print(f"\nWeight transport into another process ({args.device}, {args.dtype}, bucket {args.bucket_mb:g} MiB, "
          f"median of {args.repeats})")
    header = f"{'model':6} {'transport':9} {'GiB':>7} {'sync s':>8} {'GiB/s':>7} {'match':>5}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['model']:6} {r['transport']:9} {r['gib']:7.2f} {r['seconds']:8.3f} {r['rate']:7.2f} "
              f"{'yes' if r['match'] else 'NO':>5}")
    return 0 if all(r["match"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
