"""The two ways a weight bucket crosses into a vLLM worker: raw bytes, and an IPC handle to one packed buffer.

Every tensor must come out bit-identical (dtype, shape, values) in another process; the IPC buffer
must outlive the send and then disappear; a bucket that cannot be shared is refused by name.  On
CUDA the same cross-process check runs through a real CUDA IPC handle, with the child seeing the
GPU under another index.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle

import pytest
import torch

from megatron_eopd.rollout import transports
from megatron_eopd.rollout.transports import TransportError, decode_bucket, encoded_bucket, resolve_transport


def _bucket(device="cpu") -> list[tuple[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(3)
    tensors = {
        "model.embed_tokens.weight": torch.randn(37, 16, generator=gen).to(torch.bfloat16),
        "model.layers.0.self_attn.q_norm.weight": torch.randn(8, generator=gen),
        "odd.fp16": torch.randn(3, 5, 7, generator=gen).to(torch.float16),  # 210 bytes: not aligned
        "counts": torch.randint(-5, 5, (11,), generator=gen),
        "scalar": torch.tensor(2.5),
        "empty": torch.empty(0, 4),
        "transposed": torch.randn(6, 4, generator=gen).t(),  # not contiguous
    }
    return [(name, t.to(device)) for name, t in tensors.items()]


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.cpu(), b.cpu())


def _decode_in_child(payload: dict, device: str, visible, queue) -> None:
    if visible is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = visible
    try:
        pairs = [(name, t.cpu().clone()) for name, t in decode_bucket(payload, torch.device(device))]
        queue.put(pickle.dumps(pairs))
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        queue.put(pickle.dumps(repr(exc)))


def _decode_in_another_process(payload: dict, device: str, visible=None):
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_decode_in_child, args=(payload, device, visible, queue))
    child.start()
    result = pickle.loads(queue.get(timeout=120))
    child.join(60)
    assert not isinstance(result, str), result
    return result


@pytest.mark.parametrize("transport", ["bytes", "ipc"])
def test_a_bucket_comes_out_bit_identical_in_this_process(transport):
    bucket = _bucket()
    with encoded_bucket(transport, bucket) as payload:
        assert payload["transport"] == transport
        pairs = [(name, t.clone()) for name, t in decode_bucket(payload, torch.device("cpu"))]
    assert [n for n, _ in pairs] == [n for n, _ in bucket]
    for (name, got), (_, sent) in zip(pairs, bucket):
        assert _same(got, sent), name


@pytest.mark.parametrize("transport", ["bytes", "ipc"])
def test_a_bucket_comes_out_bit_identical_in_another_process(transport):
    bucket = _bucket()
    with encoded_bucket(transport, bucket) as payload:
        pairs = _decode_in_another_process(payload, "cpu")
    for (name, got), (_, sent) in zip(pairs, bucket):
        assert _same(got, sent), name


def test_the_ipc_payload_carries_a_handle_not_the_tensors():
    bucket = [("w", torch.randn(512, 512))]  # 1 MiB
    with encoded_bucket("ipc", bucket) as payload:
        path = payload["file"]
        assert os.path.exists(path) and len(pickle.dumps(payload)) < 1024
    assert not os.path.exists(path), "the shared file must be gone once the bucket was sent"
    with encoded_bucket("bytes", bucket) as payload:
        assert len(pickle.dumps(payload)) > 512 * 512 * 4


def test_the_shared_file_is_removed_when_the_send_fails():
    with pytest.raises(RuntimeError, match="rpc failed"):
        with encoded_bucket("ipc", _bucket()) as payload:
            path = payload["file"]
            raise RuntimeError("rpc failed")
    assert not os.path.exists(path)


def test_a_full_shm_is_refused_before_anything_is_written(monkeypatch, tmp_path):
    monkeypatch.setattr(transports, "_shm_directory", lambda: str(tmp_path))
    monkeypatch.setattr(transports, "_shm_free_bytes", lambda: 40 * 1024)
    with pytest.raises(TransportError, match=r"too little for a .* MiB weight bucket.*sync_transport=bytes"):
        with encoded_bucket("ipc", _bucket()):
            pass
    assert list(tmp_path.iterdir()) == []


def test_an_ipc_bucket_must_sit_on_one_device():
    with pytest.raises(TransportError, match="one device"):
        with encoded_bucket("ipc", [("a", torch.ones(2)), ("b", torch.ones(2, device="meta"))]):
            pass


def test_auto_shares_by_handle_unless_shm_lacks_room_for_a_cpu_bucket(monkeypatch):
    free = transports._shm_free_bytes()
    assert free > transports.SHM_HEADROOM_BYTES, "this machine's /dev/shm is too small for the test"
    assert resolve_transport("auto", torch.device("cpu"), 1 << 20) == "ipc"
    assert resolve_transport("auto", torch.device("cpu"), free) == "bytes"
    assert resolve_transport("auto", torch.device("cuda", 3), free) == "ipc"  # GPU buffers never touch /dev/shm
    assert resolve_transport("bytes", torch.device("cuda", 3)) == "bytes"
    monkeypatch.setattr(transports, "_shm_free_bytes", lambda: 0)
    with encoded_bucket("auto", _bucket()) as payload:
        assert payload["transport"] == "bytes"
    with pytest.raises(ValueError, match="sync_transport must be one of"):
        resolve_transport("nccl", torch.device("cpu"))


def test_an_unknown_payload_is_named():
    with pytest.raises(ValueError, match="unknown weight transport 'carrier-pigeon'"):
        decode_bucket({"transport": "carrier-pigeon"}, torch.device("cpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_cuda_bucket_crosses_by_cuda_ipc_to_a_process_that_numbers_the_gpu_differently():
    """The engine sees its GPU as cuda:0 (its CUDA_VISIBLE_DEVICES names only that GPU); the trainer's index may differ."""
    index = torch.cuda.device_count() - 1
    device = torch.device("cuda", index)
    bucket = _bucket(device)
    gpu_uuid = str(torch.cuda.get_device_properties(device).uuid)
    with encoded_bucket("auto", bucket) as payload:
        assert payload["transport"] == "ipc" and "cuda" in payload
        visible = gpu_uuid if gpu_uuid.startswith("GPU-") else f"GPU-{gpu_uuid}"  # CUDA_VISIBLE_DEVICES' UUID form
        pairs = _decode_in_another_process(payload, "cuda:0", visible=visible)
    for (name, got), (_, sent) in zip(pairs, bucket):
        assert _same(got, sent), name


def test_a_cuda_handle_for_a_gpu_this_process_cannot_see_is_named(monkeypatch):
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)  # the engine sees no GPU (or none of the trainer's)
    payload = {"transport": "ipc", "cuda": pickle.dumps((rebuild_cuda_tensor, (None,) * 15)),
               "device_uuid": "5a1e-not-here", "size": 256, "items": [("w", "float32", [4], 0)]}
    with pytest.raises(TransportError, match="trainer's GPU 5a1e-not-here is not visible to this engine process"):
        list(decode_bucket(payload, torch.device("cpu")))
