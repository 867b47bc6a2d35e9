"""tools/bench_model.py: the --quick CPU run prints its table, the FLOPs formula counts what the
model computes, and an out-of-memory configuration becomes a row instead of a crash."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
TOOL = REPO_ROOT / "tools" / "bench_model.py"


def _tool():
    spec = importlib.util.spec_from_file_location("bench_model_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _table_rows(text: str, first_header: str) -> list[list[str]]:
    """Cells of the Markdown table whose header row starts with ``first_header``."""
    rows, inside = [], False
    for line in text.splitlines():
        if line.startswith(f"| {first_header} |"):
            inside, rows = True, []
            continue
        if inside:
            if not line.startswith("|"):
                break
            if not line.startswith("|---"):
                rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def test_quick_cpu_run_prints_a_row_per_framework_and_micro_batch():
    proc = subprocess.run(
        [sys.executable, str(TOOL), "--quick", "--device", "cpu"],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONWARNINGS="ignore"),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    rows = _table_rows(out, "framework / variant")
    assert rows, out
    tokens_per_s = {}
    for cells in rows:
        variant, model, step, seq, mb, ms, tps = cells[:7]
        tokens_per_s[(variant.split()[0], model, step, int(seq), int(mb))] = float(tps.replace(",", ""))
        assert float(ms) > 0 and cells[8] == "n/a" and cells[9] == "n/a", cells  # MFU, peak: n/a on CPU
    for framework in ("megatron", "megatron-fused", "hf"):
        for mb in (1, 2):
            assert tokens_per_s[(framework, "tiny", "fwd+bwd", 64, mb)] > 0, out
            assert tokens_per_s[(framework, "tiny-untied (teacher)", "fwd", 64, mb)] > 0, out
    # hf-liger is skipped on the CPU, with a note
    assert {k[0] for k in tokens_per_s} == {"megatron", "megatron-fused", "hf"}
    assert "hf sdpa+liger" in out and "skipped" in out
    # The formula is stated with the table, the best micro-batch is read off, the targets follow.
    assert "MFU = [6·N·T + 12·L·(H_q·d_head)·s·T] / t / peak_flops" in out
    assert "Best tokens/s per framework" in out
    best_rows = _table_rows(out.split("Best tokens/s per framework", 1)[1], "framework / variant")
    assert len(best_rows) == 6 and all(int(r[4]) in (1, 2) for r in best_rows), out
    assert "67.1k" in out and "41.7k" in out and "27.1k" in out


def test_recompute_option_runs_recomputing_students_only():
    """``--recompute full``: the Megatron students run with it (and say so), the forward-only teacher without."""
    proc = subprocess.run(
        [sys.executable, str(TOOL), "--quick", "--device", "cpu", "--recompute", "full",
         "--frameworks", "megatron,megatron-fused", "--micro-batches", "1"],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONWARNINGS="ignore"),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = _table_rows(proc.stdout, "framework / variant")
    labels = {(cells[1], cells[0]) for cells in rows}
    assert labels == {
        ("tiny", "megatron (local spec, sdpa attn, full recompute)"),
        ("tiny", "megatron-fused (local spec, sdpa attn, fused head, full recompute)"),
        ("tiny-untied (teacher)", "megatron (local spec, sdpa attn)"),
        ("tiny-untied (teacher)", "megatron-fused (local spec, sdpa attn, fused head)"),
    }, labels
    assert all(float(cells[6].replace(",", "")) > 0 for cells in rows), proc.stdout


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_flops_formula_matches_an_independent_count(tied):
    """N = the HF model's parameters without the input embedding; the matmul FLOPs torch counts in
    a forward + backward equal the formula less the (elementwise) norm weights' share."""
    from torch.utils.flop_counter import FlopCounterMode

    bench = _tool()
    arch = bench.QUICK_ARCHS["tiny" if tied else "tiny-untied"]
    # eager attention: its QK^T and PV are matmuls the counter sees (CPU SDPA kernels are not counted).
    model = bench.build_hf(arch, torch.float32, torch.device("cpu"), attn_implementation="eager")
    params = dict(model.named_parameters(remove_duplicate=False))  # a tied lm_head is listed too
    n_independent = sum(p.numel() for name, p in params.items() if "embed_tokens" not in name)
    assert bench.flops_parameters(arch) == n_independent
    norm_params = sum(p.numel() for name, p in params.items() if "norm" in name)
    assert norm_params > 0

    seq, mb = 48, 2
    ids = torch.randint(0, arch.vocab_size, (mb, seq), generator=torch.Generator().manual_seed(0))
    counter = FlopCounterMode(display=False)
    with counter:
        loss = model(input_ids=ids, labels=ids).loss
        forward = counter.get_total_flops()
        loss.backward()
    total = counter.get_total_flops()
    # transformers 5.17 builds the RoPE angle table as a matmul (inv_freq @ positions), 5.19 as a
    # product the counter ignores: not model FLOPs either way, and only forward (a buffer, no grad).
    rope_table = sum(sum(ops.values()) for module, ops in counter.get_flop_counts().items()
                     if module.endswith(".rotary_emb"))
    tokens = mb * seq
    assert forward - rope_table == bench.model_flops(arch, seq, mb, training=False) - 2 * norm_params * tokens
    assert total - rope_table == bench.model_flops(arch, seq, mb, training=True) - 6 * norm_params * tokens
    # The hand-written formula for one configuration of a real preset (the reference's 0.596e9).
    assert bench.flops_parameters(bench.QWEN3_PRESETS["Qwen3-0.6B"]) == 596_049_920


def test_peak_flops_by_device_name():
    bench = _tool()
    assert bench.peak_flops_for("NVIDIA H100 80GB HBM3") == 989.4e12
    assert bench.peak_flops_for("NVIDIA H200") == 989.4e12
    assert bench.peak_flops_for("NVIDIA A100-SXM4-80GB") == 312e12
    assert bench.peak_flops_for("NVIDIA H100 PCIe") == 756e12
    assert bench.peak_flops_for("Tesla T4") is None and bench.peak_flops_for(None) is None


def test_out_of_memory_gives_a_row_and_the_run_goes_on(monkeypatch, capsys):
    """A forward pre-hook on the real, built model raises CUDA's OutOfMemoryError for micro-batch 2:
    that configuration prints "out of memory", the others (and the next framework) still run; any
    other error still surfaces."""
    bench = _tool()
    real_build = bench.build_model
    raised = []

    def build_with_oom_at_mb2(framework, arch, args, device, training=True):
        model = real_build(framework, arch, args, device, training=training)

        def hook(module, args_, kwargs):
            tokens = args_[0] if args_ else kwargs["input_ids"]
            if tokens.shape[0] == 2:
                raised.append(framework)
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.27 GiB (injected)")

        model.register_forward_pre_hook(hook, with_kwargs=True)
        return model

    monkeypatch.setattr(bench, "build_model", build_with_oom_at_mb2)
    report = bench.main(["--quick", "--device", "cpu", "--frameworks", "megatron,hf", "--teacher", "none",
                         "--micro-batches", "1,2,3", "--warmup", "0"])
    got = [(r["framework"], r["micro_batch"], r["status"]) for r in report["rows"]]
    assert got == [("megatron", 1, "ok"), ("megatron", 2, "out of memory"), ("megatron", 3, "out of memory"),
                   ("hf", 1, "ok"), ("hf", 2, "out of memory"), ("hf", 3, "out of memory")]
    assert raised == ["megatron", "hf"]  # mb 3 is not tried once mb 2 did not fit
    assert "injected" in report["rows"][1]["note"] and "not tried" in report["rows"][2]["note"]
    out = capsys.readouterr().out
    oom_lines = [line for line in out.splitlines() if "| out of memory |" in line]
    assert len(oom_lines) == 4, out
    assert all(r["tokens_per_s"] > 0 for r in report["rows"] if r["status"] == "ok")

    def build_with_bug(framework, arch, args, device, training=True):
        model = real_build(framework, arch, args, device, training=training)
        model.register_forward_pre_hook(lambda *_: (_ for _ in ()).throw(RuntimeError("shape mismatch")))
        return model

    monkeypatch.setattr(bench, "build_model", build_with_bug)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        bench.main(["--quick", "--device", "cpu", "--frameworks", "hf", "--teacher", "none",
                    "--micro-batches", "1"])
    assert "INCOMPLETE" in capsys.readouterr().out
