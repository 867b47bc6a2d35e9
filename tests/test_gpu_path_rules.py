"""Rules the GPU path depends on, checked on CPU (issue 9: runs on GPU without transformer-engine).

- Megatron's fusion flags follow what is installed, never "CUDA is visible".
- ``build_qwen3_gpt`` returns every parameter on the platform's device, in ``params_dtype``.
- Tensors handed to collectives are created on :func:`collective_device` (NCCL reduces CUDA only).
- The converter reports its own error and leaves no staging directory, whatever fails.
"""

from __future__ import annotations

import contextlib
import sys
import weakref
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

from megatron_eopd.models.qwen3.architecture import Qwen3Arch
from megatron_eopd.platform import distributed as platform_dist
from megatron_eopd.platform import mcore_compat

ARCH = Qwen3Arch(hidden_size=64, num_layers=2, num_attention_heads=4, num_kv_heads=2, head_dim=32,
                 ffn_hidden_size=128, vocab_size=301, tie_word_embeddings=False)
FLAGS = ("apply_rope_fusion", "persist_layer_norm", "masked_softmax_fusion", "bias_dropout_fusion",
         "bias_activation_fusion")


def _probes(value: bool) -> dict:
    return {"rope_fusion": value, "persist_layer_norm": value, "masked_softmax_fusion": value, "jit_fusion": value}


# --------------------------------------------------------------------------- capability probes


def test_probes_see_what_imports(tmp_path, monkeypatch):
    """The softmax probe needs all three compiled extensions; a broken one counts as absent."""
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in mcore_compat.SOFTMAX_EXTENSIONS:
        monkeypatch.delitem(sys.modules, name, raising=False)
    mcore_compat.fused_kernels_available.cache_clear()
    try:
        names = list(mcore_compat.SOFTMAX_EXTENSIONS)
        for name in names[:-1]:
            (tmp_path / f"{name}.py").write_text("")
        assert not mcore_compat.fused_kernels_available()["masked_softmax_fusion"]  # one missing

        (tmp_path / f"{names[-1]}.py").write_text("raise OSError('undefined symbol: c10::cuda')\n")
        mcore_compat.fused_kernels_available.cache_clear()
        assert not mcore_compat.fused_kernels_available()["masked_softmax_fusion"]  # one broken

        (tmp_path / f"{names[-1]}.py").write_text("")
        monkeypatch.delitem(sys.modules, names[-1], raising=False)
        mcore_compat.fused_kernels_available.cache_clear()
        assert mcore_compat.fused_kernels_available()["masked_softmax_fusion"]
    finally:
        mcore_compat.fused_kernels_available.cache_clear()
        for name in mcore_compat.SOFTMAX_EXTENSIONS:
            sys.modules.pop(name, None)


def test_probes_on_this_machine():
    """Without transformer-engine and apex (as here and on the lent GPU image) those fusions are absent."""
    import importlib.util

    found = mcore_compat.fused_kernels_available()
    assert set(found) == {"rope_fusion", "persist_layer_norm", "masked_softmax_fusion", "jit_fusion"}
    if importlib.util.find_spec("transformer_engine") is None:  # then the project's Triton RoPE, if Triton imports
        assert found["rope_fusion"] == (importlib.util.find_spec("triton") is not None)
    if importlib.util.find_spec("apex") is None:
        assert found["persist_layer_norm"] is False
    if importlib.util.find_spec("scaled_masked_softmax_cuda") is None:
        assert found["masked_softmax_fusion"] is False


# --------------------------------------------------------------------------- fusion flags


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_nothing_installed_means_every_fusion_off(monkeypatch, device):
    from megatron_eopd.models.qwen3.model import fusion_flags, qwen3_transformer_config

    monkeypatch.setattr(mcore_compat, "fused_kernels_available", lambda: _probes(False))
    assert fusion_flags(torch.device(device)) == dict.fromkeys(FLAGS, False)
    config = qwen3_transformer_config(ARCH, tp=1, pp=1, device=torch.device(device))
    assert {f: getattr(config, f) for f in FLAGS} == dict.fromkeys(FLAGS, False)
    assert config.use_cpu_initialization == (device == "cpu")


def test_installed_kernels_are_used_on_cuda_only(monkeypatch):
    from megatron.core.models.common.embeddings import rope_utils

    from megatron_eopd.models.qwen3.model import fusion_flags, qwen3_transformer_config

    monkeypatch.setattr(mcore_compat, "fused_kernels_available", lambda: _probes(True))
    # TransformerConfig checks TE's fused RoPE itself; stand one in as an installed TE would.
    monkeypatch.setattr(rope_utils, "fused_apply_rotary_pos_emb", lambda *a, **k: None)
    config = qwen3_transformer_config(ARCH, tp=1, pp=1, device=torch.device("cuda"))
    got = {f: getattr(config, f) for f in FLAGS}
    # persist_layer_norm is apex's LayerNorm kernel; Qwen3's RMSNorm never uses it.
    assert got == {**dict.fromkeys(FLAGS, True), "persist_layer_norm": False}
    assert fusion_flags(torch.device("cpu")) == dict.fromkeys(FLAGS, False)


def test_rope_fusion_without_transformer_engine_installs_the_triton_kernel(monkeypatch):
    """Where TE is absent, building a CUDA config with apply_rope_fusion puts the project's kernel in
    the slot Megatron's config check and RoPE call read; with TE's in place, it is left alone."""
    pytest.importorskip("triton")
    from megatron.core.models.common.embeddings import rope_utils

    from megatron_eopd.models import rope
    from megatron_eopd.models.qwen3.model import qwen3_transformer_config

    monkeypatch.setattr(mcore_compat, "fused_kernels_available", lambda: _probes(True))
    monkeypatch.setattr(mcore_compat, "te_fused_rope", lambda: False)
    monkeypatch.setattr(rope_utils, "fused_apply_rotary_pos_emb", None)
    config = qwen3_transformer_config(ARCH, tp=1, pp=1, device=torch.device("cuda"))
    assert config.apply_rope_fusion
    assert rope_utils.fused_apply_rotary_pos_emb is rope.fused_apply_rotary_pos_emb

    def te_kernel(*args, **kwargs):
        raise AssertionError("not called here")

    monkeypatch.setattr(rope_utils, "fused_apply_rotary_pos_emb", te_kernel)
    monkeypatch.setattr(mcore_compat, "te_fused_rope", lambda: True)
    assert rope.ensure_fused_rope() == rope.ROPE_FROM_TE
    assert rope_utils.fused_apply_rotary_pos_emb is te_kernel


@pytest.mark.parametrize("missing", ["rope_fusion", "masked_softmax_fusion", "jit_fusion"])
def test_each_flag_follows_its_own_probe(monkeypatch, missing):
    from megatron_eopd.models.qwen3.model import fusion_flags

    monkeypatch.setattr(mcore_compat, "fused_kernels_available", lambda: {**_probes(True), missing: False})
    flags = fusion_flags(torch.device("cuda"))
    off = {"rope_fusion": {"apply_rope_fusion"}, "masked_softmax_fusion": {"masked_softmax_fusion"},
           "jit_fusion": {"bias_dropout_fusion", "bias_activation_fusion"}}[missing] | {"persist_layer_norm"}
    assert {f for f, on in flags.items() if not on} == off


# --------------------------------------------------------------------------- placement


def _placement(model) -> set:
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    assert len(tensors) >= 17
    return {(t.device.type, t.dtype) for _, t in tensors}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_build_places_every_tensor_in_params_dtype(model_parallel, dtype):
    from megatron_eopd.models.qwen3.model import build_qwen3_gpt

    model = build_qwen3_gpt(ARCH, params_dtype=dtype, layer_spec="local")
    assert _placement(model) == {(platform_dist.current_platform().device.type, dtype)}
    norms = [n for n, _ in model.named_parameters() if "layernorm" in n]
    assert len(norms) == 4 * ARCH.num_layers + 1


def test_build_moves_the_model_to_the_platform_device(model_parallel, monkeypatch):
    """Where the model ends up is the platform's device, not wherever Megatron created each tensor."""
    from megatron_eopd.models.qwen3.model import build_qwen3_gpt

    # "meta" stands for a device other than the one tensors are created on (cuda on the GPU path).
    monkeypatch.setattr(platform_dist, "default_device", lambda: torch.device("meta"))
    model = build_qwen3_gpt(ARCH, params_dtype=torch.bfloat16, layer_spec="local", perform_initialization=False)
    assert _placement(model) == {("meta", torch.bfloat16)}


# --------------------------------------------------------------------------- collectives


def test_collective_device_follows_the_backend(monkeypatch):
    assert platform_dist._backend_device_types  # noqa: B018 - helper exists
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    for backend, expected in (("gloo", ["cpu"]), ("nccl", ["cuda"]), ("cpu:gloo,cuda:nccl", ["cpu", "cuda"])):
        monkeypatch.setattr(dist, "get_backend", lambda group=None, b=backend: b)
        assert platform_dist._backend_device_types() == expected
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    assert platform_dist.collective_device() == torch.device("cpu")
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "cpu:gloo,cuda:nccl")
    monkeypatch.setattr(platform_dist, "default_device", lambda: torch.device("cpu"))
    assert platform_dist.collective_device() == torch.device("cpu")


SENTINEL = torch.device("cpu", 0)  # equal to no tensor's device, so only explicit requests match


class _CreatedOnCollectiveDevice(TorchFunctionMode):
    """Remembers tensors made by a torch call that asked for ``SENTINEL`` as their device."""

    def __init__(self):
        super().__init__()
        self.tagged: dict[int, weakref.ref] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        asked = kwargs.get("device")
        if asked is None and func is torch.Tensor.to and len(args) > 1 and isinstance(args[1], (str, torch.device)):
            asked = args[1]
        if asked is not None and not isinstance(asked, int) and torch.device(asked) == SENTINEL \
                and isinstance(out, torch.Tensor):
            self.tagged[id(out)] = weakref.ref(out)
        return out

    def made_here(self, tensor) -> bool:
        ref = self.tagged.get(id(tensor))
        return ref is not None and ref() is tensor


def _guard_collectives(monkeypatch, mode, seen: list):
    """Wrap torch.distributed's tensor collectives: a call from this project must pass a tensor
    created on collective_device() (``mode`` None: a tensor on the real collective_device())."""
    import megatron_eopd

    root = str(Path(megatron_eopd.__file__).parent)

    def wrap(name, real):
        def guarded(*args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(root):
                tensors = [a for a in args if isinstance(a, torch.Tensor)]
                tensors += [t for a in args if isinstance(a, list) for t in a if isinstance(t, torch.Tensor)]
                for t in tensors:
                    ok = mode.made_here(t) if mode is not None else t.device == platform_dist.collective_device()
                    assert ok, f"{name} from {caller} got a tensor not made on collective_device()"
                seen.append(name)
            return real(*args, **kwargs)

        return guarded

    for name in ("all_reduce", "all_gather", "broadcast", "send", "recv", "reduce_scatter", "reduce",
                 "all_gather_into_tensor", "reduce_scatter_tensor"):
        if hasattr(dist, name):
            monkeypatch.setattr(dist, name, wrap(name, getattr(dist, name)))


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    from megatron_eopd.testing.tiny_qwen3 import make_tiny_qwen3

    return make_tiny_qwen3(tmp_path_factory.mktemp("hf") / "tiny", seed=3, num_layers=2)


def test_converter_collectives_use_the_collective_device(tiny_hf, tmp_path, monkeypatch):
    from megatron_eopd.checkpoint.convert import hf_to_mcore_main

    seen: list = []
    if torch.cuda.is_available():  # NCCL: the tensors' real device is the check
        mode, context = None, contextlib.nullcontext()
    else:  # gloo reduces CPU tensors anyway: check they were *asked for* on collective_device()
        monkeypatch.setattr(platform_dist, "collective_device", lambda group=None: SENTINEL)
        mode = context = _CreatedOnCollectiveDevice()
    _guard_collectives(monkeypatch, mode, seen)
    with context:
        rc = hf_to_mcore_main(["--hf-dir", str(tiny_hf), "--output", str(tmp_path / "ckpt"), "--dtype", "fp32",
                               "--layer-spec", "local"])
    assert rc == 0
    assert "all_reduce" in seen  # the ranks' agreement ran through the guard


# --------------------------------------------------------------------------- converter failure path


def _no_staging_left(output: Path) -> bool:
    return not list(output.parent.glob(f".{output.name}.*")) and not output.exists()


def test_original_error_survives_a_failing_agreement(tiny_hf, tmp_path, monkeypatch):
    """A bug after staging began: its own error comes out, even though the agreement collective also fails."""
    from megatron_eopd.checkpoint import convert, mcore_dist

    def broken_save(*_a, **_k):
        raise ValueError("bug while saving")

    def broken_agreement(_failed):
        raise RuntimeError("No backend type associated with device type cpu")

    monkeypatch.setattr(mcore_dist, "save_mcore_checkpoint", broken_save)
    monkeypatch.setattr(convert, "_agree_on_failure", broken_agreement)
    output = tmp_path / "ckpt"
    with pytest.raises(ValueError, match="bug while saving"):
        convert.hf_to_mcore_main(["--hf-dir", str(tiny_hf), "--output", str(output), "--dtype", "fp32",
                                  "--layer-spec", "local"])
    assert _no_staging_left(output), list(tmp_path.iterdir())


def test_failing_agreement_after_success_removes_staging(tiny_hf, tmp_path, monkeypatch):
    from megatron_eopd.checkpoint import convert

    def broken_agreement(_failed):
        raise RuntimeError("collective failed")

    monkeypatch.setattr(convert, "_agree_on_failure", broken_agreement)
    output = tmp_path / "ckpt"
    with pytest.raises(RuntimeError, match="collective failed"):
        convert.hf_to_mcore_main(["--hf-dir", str(tiny_hf), "--output", str(output), "--dtype", "fp32",
                                  "--layer-spec", "local"])
    assert _no_staging_left(output), list(tmp_path.iterdir())


def test_failure_on_another_rank_fails_this_one(tiny_hf, tmp_path, monkeypatch):
    from megatron_eopd.checkpoint import convert

    monkeypatch.setattr(convert, "_agree_on_failure", lambda _failed: True)
    output = tmp_path / "ckpt"
    with pytest.raises(RuntimeError, match="another rank"):
        convert.hf_to_mcore_main(["--hf-dir", str(tiny_hf), "--output", str(output), "--dtype", "fp32",
                                  "--layer-spec", "local"])
    assert _no_staging_left(output), list(tmp_path.iterdir())


def test_bad_input_still_exits_2(tmp_path, capsys):
    from megatron_eopd.checkpoint.convert import EXIT_BAD_INPUT, hf_to_mcore_main

    rc = hf_to_mcore_main(["--hf-dir", str(tmp_path / "nope"), "--output", str(tmp_path / "out")])
    assert rc == EXIT_BAD_INPUT and "does not exist" in capsys.readouterr().err


def test_cpu_layer_names_tensor_types_as_megatron_optimizers_expect(model_parallel):
    """On CPU, ``tensor.type()`` answers with the CUDA type name (Megatron's optimizers sort parameters by
    it, the distributed optimizer refuses others); ``tensor.type(dtype)`` still converts; CUDA is untouched."""
    from megatron_eopd.platform import cpu_compat

    if not cpu_compat.is_enabled():
        pytest.skip("the CPU compatibility layer is only active on machines without CUDA")
    assert torch.zeros(2).type() == "torch.cuda.FloatTensor"
    assert torch.zeros(2, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
    converted = torch.zeros(2).type(torch.float64)
    assert converted.dtype == torch.float64 and converted.device.type == "cpu"
    assert torch.zeros(2).type("torch.DoubleTensor").dtype == torch.float64
