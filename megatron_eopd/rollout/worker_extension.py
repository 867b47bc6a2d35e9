"""Code that runs *inside* vLLM's worker processes to receive new weights (``worker_extension_cls``).

vLLM mixes :class:`WeightSyncWorkerExtension` into its worker class; the trainer side calls its
methods through ``LLM.collective_rpc``.  An update is three calls, so a large model streams through
in buckets without ever being whole in one message:

    eopd_begin_weight_update()        vLLM's layer-wise reload: layers whose kernels repack weights
                                      after loading (vLLM-CPU does) get their checkpoint form back
    eopd_load_weight_bucket(payload)  ``model.load_weights`` on (HF name, tensor) pairs; vLLM's own
                                      loader fuses q/k/v and gate/up and shards for its TP
    eopd_finish_weight_update()       re-run the post-load processing; report parameters never written

``eopd_reload_from_dir(path)`` runs the same three steps over a HF directory's safetensors files.

A payload is ``{"transport": name, ...}`` from :mod:`megatron_eopd.rollout.transports` (raw bytes in
the message, or a CUDA-IPC / shared-memory handle); :func:`~megatron_eopd.rollout.transports.decode_bucket`
turns it back into (name, tensor) pairs.

Keep this module light: it is imported by every vLLM worker process.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Optional

import torch

from megatron_eopd.rollout.transports import decode_bucket

def _layerwise_reload_api():
    """vLLM's layer-wise reload hooks (vLLM >= 0.1x with in-place reload), or None on older releases."""
    try:
        from vllm.model_executor.model_loader.reload import (
            finalize_layerwise_reload,
            initialize_layerwise_reload,
        )
    except ImportError:
        return None
    return initialize_layerwise_reload, finalize_layerwise_reload


def refresh_tied_embedding_kernels(model: torch.nn.Module, reprocessed: Optional[set[str]] = None) -> int:
    """Re-prepare the kernels of every embedding / LM-head module that shares its weight with another.

    vLLM's layer-wise reload re-processes only the module through which a tied weight was loaded
    (the embedding).  The LM head tied to it keeps whatever its quant method prepared from the old
    values: on vLLM-CPU that is a prepacked GEMM copy, so sampling would use a stale LM head (the
    parity probe caught exactly this).  Re-running the unquantized embedding method's
    post-processing is idempotent (it keeps the weight), and a no-op on GPU.

    ``reprocessed``: qualified names of parameters (``model.embed_tokens.weight``) whose module the
    reload has just processed; those modules are skipped.  On vLLM-CPU each processing packs the
    whole vocabulary x hidden matrix for oneDNN (622 MB and 0.3-0.4 s for Qwen3-0.6B in fp32), and
    the embedding's pack is never used by a lookup.  Returns the number of modules refreshed.
    """
    try:
        from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod
    except ImportError:
        return 0
    owners: dict[int, list[tuple[str, torch.nn.Module]]] = {}
    for prefix, module in model.named_modules():
        for local, param in module.named_parameters(recurse=False):
            owners.setdefault(id(param), []).append((f"{prefix}.{local}" if prefix else local, module))
    refreshed = 0
    for modules in owners.values():
        if len(modules) < 2:
            continue
        for name, module in modules:
            method = getattr(module, "quant_method", None)
            if isinstance(method, UnquantizedEmbeddingMethod) and name not in (reprocessed or ()):
                method.process_weights_after_loading(module)
                refreshed += 1
    return refreshed


# vLLM's layer-wise reload logs "<Layer>: Failed to load weights" for every layer that has loadable
# tensors but received none.  In a weight update that is the rotary embedding (its cos/sin cache is
# computed, never a checkpoint tensor) and an LM head tied to the embedding (written through the
# embedding): two warnings per engine and sync, thousands over a run, each sounding like a failure.
# A parameter that really was not written is reported by eopd_finish_weight_update instead, and a
# strict sync (the default) stops on it, so the message is dropped while an update finishes.
RELOAD_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"
RELOAD_FALLBACK_MESSAGE = "%s: Failed to load weights"


class _DropReloadFallbackWarnings(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg != RELOAD_FALLBACK_MESSAGE


@contextlib.contextmanager
def reload_fallback_warnings_dropped():
    """While active, vLLM's per-layer reload-fallback warning (see :data:`RELOAD_FALLBACK_MESSAGE`) is not logged."""
    logger = logging.getLogger(RELOAD_LOGGER)
    dropper = _DropReloadFallbackWarnings()
    logger.addFilter(dropper)
    try:
        yield
    finally:
        logger.removeFilter(dropper)


class WeightSyncWorkerExtension:
    """Mixed into vLLM's worker class: ``self`` is the worker (``model_runner``, ``vllm_config``)."""

    def _eopd_model(self) -> torch.nn.Module:
        return (
            self.model_runner.get_model()
            if hasattr(self.model_runner, "get_model")
            else self.model_runner.model
        )

    def eopd_begin_weight_update(self) -> None:
        from vllm.config import set_current_vllm_config

        model = self._eopd_model()
        self._eopd_loaded: set[str] = set()
        # Read the device now: during a layer-wise reload the parameters sit on the meta device.
        self._eopd_device = next(model.parameters()).device
        api = _layerwise_reload_api()
        if api is not None:
            with set_current_vllm_config(self.vllm_config):
                api[0](model)

    def eopd_load_weight_bucket(self, payload: dict[str, Any]) -> int:
        """Load one bucket; returns the number of tensors received."""
        from vllm.config import set_current_vllm_config

        if not hasattr(self, "_eopd_loaded"):
            raise RuntimeError("eopd_load_weight_bucket called outside eopd_begin/finish_weight_update")
        model = self._eopd_model()
        pairs = list(decode_bucket(payload, self._eopd_device))
        with set_current_vllm_config(self.vllm_config):
            loaded = model.load_weights(iter(pairs))
        if loaded:
            self._eopd_loaded.update(loaded)
        return len(pairs)

    def eopd_finish_weight_update(self) -> list[str]:
        """Finish the update; returns the model's parameters that no bucket wrote (stale ones)."""
        from vllm.config import set_current_vllm_config

        model = self._eopd_model()
        api = _layerwise_reload_api()
        loaded = getattr(self, "_eopd_loaded", set())
        with set_current_vllm_config(self.vllm_config), reload_fallback_warnings_dropped():
            if api is not None:
                api[1](model, self.vllm_config.model_config)
            # The layer-wise reload processed every module a tensor was loaded through (all of a
            # layer's elements arrive, so it processes while loading); without it nothing was.
            self._eopd_tied_refreshed = refresh_tied_embedding_kernels(model, loaded if api is not None else None)
        # State derived from old weights must not survive the update.
        for reset in ("reset_lora_state", "reset_encoder_cache", "reset_mm_cache"):
            fn = getattr(self.model_runner, reset, None)
            if callable(fn):
                fn()
        not_updated = sorted(name for name, _ in model.named_parameters() if name not in loaded)
        del self._eopd_loaded
        return not_updated

    def eopd_reload_from_dir(self, hf_dir: str) -> list[str]:
        """Reload every weight from a HF directory's safetensors; returns parameters no file wrote.

        The same begin / load / finish path as an in-memory update (one tensor at a time, read
        lazily), so a directory that lacks a tensor is reported exactly like a bucket that lacks it.
        """
        from pathlib import Path

        from safetensors import safe_open
        from vllm.config import set_current_vllm_config

        files = sorted(Path(hf_dir).glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors files in {hf_dir}")
        self.eopd_begin_weight_update()
        model = self._eopd_model()
        try:
            for file in files:
                with safe_open(str(file), framework="pt", device="cpu") as handle:
                    for name in handle.keys():
                        pair = (name, handle.get_tensor(name).to(self._eopd_device))
                        with set_current_vllm_config(self.vllm_config):
                            loaded = model.load_weights(iter([pair]))
                        if loaded:
                            self._eopd_loaded.update(loaded)
        finally:
            not_updated = self.eopd_finish_weight_update()
        return not_updated

    def eopd_mask_output_rows(self, first_padded_row: int) -> None:
        """Set the logits of output rows ``first_padded_row`` and on to -inf, for sampling and for the
        reported log-probs alike (a hook on the model's logits processor: it returns the gathered,
        whole-vocabulary logits, and runs outside any CUDA graph)."""
        processor = self._eopd_model().logits_processor
        previous = getattr(self, "_eopd_row_mask", None)
        if previous is not None:
            previous.remove()

        def mask(module, inputs, logits):
            if logits is not None:
                logits[..., first_padded_row:] = float("-inf")
            return logits

        self._eopd_row_mask = processor.register_forward_hook(mask)

    def eopd_tied_kernels_refreshed(self) -> int:
        """How many tied embedding / LM-head modules the last update re-prepared (tests read it)."""
        return int(getattr(self, "_eopd_tied_refreshed", 0))

    def eopd_parameter_checksum(self) -> float:
        """Sum of all parameters (float64): a cheap way for tests to see that weights changed."""
        model = self._eopd_model()
        return float(sum(p.detach().double().sum() for p in model.parameters()))
