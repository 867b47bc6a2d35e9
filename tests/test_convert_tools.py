"""The conversion tools as a user runs them: single process, real files, bad inputs refused cleanly."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch

from megatron_eopd.checkpoint import HFSafetensors
from megatron_eopd.checkpoint.convert import hf_to_mcore_main, mcore_to_hf_main
from megatron_eopd.testing.tiny_qwen3 import make_tiny_qwen3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {
        "untied": make_tiny_qwen3(root / "untied", seed=1, tie_word_embeddings=False, max_shard_size="100KB"),
        "tied": make_tiny_qwen3(root / "tied", seed=2, tie_word_embeddings=True),
    }


def _leftovers(output: Path) -> list[Path]:
    return sorted(output.parent.glob(f".{output.name}.*")) + ([output] if output.exists() else [])


def _assert_same_tensors(a: Path, b: Path) -> None:
    ra, rb = HFSafetensors(a), HFSafetensors(b)
    assert set(ra) == set(rb), set(ra) ^ set(rb)
    for name in ra:
        ta, tb = ra[name], rb[name]
        assert ta.dtype == tb.dtype and torch.equal(ta, tb), name


@pytest.mark.parametrize("kind", ["untied", "tied"])
def test_round_trip_is_bit_identical_and_loads_in_transformers(tiny, tmp_path, kind):
    src = tiny[kind]
    ckpt, out = tmp_path / "mcore", tmp_path / "hf"
    assert hf_to_mcore_main(["--hf-dir", str(src), "--output", str(ckpt), "--tp", "2", "--pp", "2",
                             "--dtype", "fp32"]) == 0
    meta = json.loads((ckpt / "eopd_checkpoint.json").read_text())
    assert meta["tensor_model_parallel_size"] == 2 and meta["padded_vocab_size"] == 384
    assert (ckpt / "hf" / "tokenizer.json").is_file() and (ckpt / "release" / "metadata.json").is_file()
    shard_args = ["--max-shard-size", "60KB"] if kind == "untied" else []
    assert mcore_to_hf_main(["--mcore-dir", str(ckpt), "--output", str(out), *shard_args]) == 0
    _assert_same_tensors(src, out)
    assert (out / "model.safetensors.index.json").is_file() == (kind == "untied")
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).is_file(), name
    assert not _leftovers(tmp_path / "x") and not list(tmp_path.glob(".*tmp*"))

    from transformers import AutoModelForCausalLM

    tokens = torch.tensor([[5, 17, 42, 299, 3, 250, 7, 300]])
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)(tokens).logits
        got = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(tokens).logits
    assert torch.equal(ref, got)


def test_bf16_conversion_and_dtype_override(tiny, tmp_path):
    ckpt, out = tmp_path / "mcore", tmp_path / "hf"
    assert hf_to_mcore_main(["--hf-dir", str(tiny["tied"]), "--output", str(ckpt), "--dtype", "bf16"]) == 0
    assert mcore_to_hf_main(["--mcore-dir", str(ckpt), "--output", str(out)]) == 0
    src, got = HFSafetensors(tiny["tied"]), HFSafetensors(out)
    name = "model.layers.1.mlp.up_proj.weight"
    assert got[name].dtype == torch.bfloat16 and torch.equal(got[name], src[name].to(torch.bfloat16))
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


# --------------------------------------------------------------------------- bad inputs


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(hf_dir: Path, **changes) -> None:
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg.update(changes)
    (hf_dir / "config.json").write_text(json.dumps(cfg))


def _rewrite_weights(hf_dir: Path, edit) -> None:
    from safetensors.torch import save_file

    tensors = dict(HFSafetensors(hf_dir).items())
    edit(tensors)
    save_file(tensors, str(hf_dir / "model.safetensors"), metadata={"format": "pt"})


def _bad_input_cases():
    def unsupported(d):
        _edit_config(d, model_type="llama", architectures=["LlamaForCausalLM"])

    def missing(d):
        _rewrite_weights(d, lambda t: t.pop("model.layers.2.mlp.down_proj.weight"))

    def extra(d):
        _rewrite_weights(d, lambda t: t.update({"model.layers.9.mlp.down_proj.weight": torch.zeros(2)}))

    def shape(d):
        _rewrite_weights(d, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": torch.zeros(32, 64)}))

    def corrupted(d):
        path = d / "model.safetensors"
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])  # truncated download

    def corrupted_header(d):
        path = d / "model.safetensors"
        data = bytearray(path.read_bytes())
        data[0:8] = struct.pack("<Q", 10**12)  # header length beyond the file
        path.write_bytes(bytes(data))

    return [
        (unsupported, [], "unsupported architecture"),
        (missing, [], "missing tensors .*model.layers.2.mlp.down_proj.weight"),
        (extra, [], "extra tensors .*model.layers.9.mlp.down_proj.weight"),
        (shape, [], r"shape mismatch for model.layers.0.self_attn.k_proj.weight: checkpoint has \[32, 64\]"),
        (corrupted, [], "corrupted safetensors file"),
        (corrupted_header, [], "corrupted safetensors file"),
        (None, ["--tp", "3"], "TP=3 does not divide num_attention_heads=4"),
        (None, ["--tp", "4"], "TP=4 does not divide num_key_value_heads=2"),
        (None, ["--pp", "3"], "PP=3 does not divide num_hidden_layers=4"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_input_cases())))
def test_hf_to_mcore_refuses_bad_input(tiny, tmp_path, capsys, case):
    edit, extra_args, message = _bad_input_cases()[case]
    hf_dir = _copy(tiny["tied"], tmp_path / "src")
    if edit is not None:
        edit(hf_dir)
    output = tmp_path / "out"
    rc = hf_to_mcore_main(["--hf-dir", str(hf_dir), "--output", str(output), *extra_args])
    err = capsys.readouterr().err
    assert rc == 2
    assert __import__("re").search(message, err), err
    assert not _leftovers(output)


def test_tp_not_dividing_ffn_is_refused(tiny, tmp_path, capsys):
    hf_dir = _copy(tiny["tied"], tmp_path / "src")
    _edit_config(hf_dir, num_attention_heads=4, num_key_value_heads=4, intermediate_size=130)
    rc = hf_to_mcore_main(["--hf-dir", str(hf_dir), "--output", str(tmp_path / "out"), "--tp", "4"])
    assert rc == 2 and "TP=4 does not divide intermediate_size (FFN)=130" in capsys.readouterr().err
    assert not _leftovers(tmp_path / "out")


def test_missing_shard_of_sharded_checkpoint(tiny, tmp_path, capsys):
    hf_dir = _copy(tiny["untied"], tmp_path / "src")
    next(hf_dir.glob("model-00002-of-*.safetensors")).unlink()
    rc = hf_to_mcore_main(["--hf-dir", str(hf_dir), "--output", str(tmp_path / "out")])
    assert rc == 2 and "named in the index is missing" in capsys.readouterr().err
    assert not _leftovers(tmp_path / "out")


def test_existing_output_needs_overwrite(tiny, tmp_path, capsys):
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("user data")
    rc = hf_to_mcore_main(["--hf-dir", str(tiny["tied"]), "--output", str(output)])
    assert rc == 2 and "already exists (pass --overwrite" in capsys.readouterr().err
    assert (output / "keep.txt").read_text() == "user data"
    # mcore -> hf refuses too, before reading anything
    rc = mcore_to_hf_main(["--mcore-dir", str(tmp_path / "nope"), "--output", str(output)])
    assert rc == 2 and "does not exist" in capsys.readouterr().err
    assert hf_to_mcore_main(["--hf-dir", str(tiny["tied"]), "--output", str(output), "--overwrite",
                             "--dtype", "fp32"]) == 0
    assert not (output / "keep.txt").exists() and (output / "eopd_checkpoint.json").is_file()
    assert not list(tmp_path.glob(".out.*"))
    hf_out = tmp_path / "hf"
    hf_out.mkdir()
    rc = mcore_to_hf_main(["--mcore-dir", str(output), "--output", str(hf_out)])
    assert rc == 2 and "already exists" in capsys.readouterr().err


def test_mcore_to_hf_refuses_non_checkpoint_and_mismatched_tensors(tiny, tmp_path, capsys):
    rc = mcore_to_hf_main(["--mcore-dir", str(tiny["tied"]), "--output", str(tmp_path / "a")])
    assert rc == 2 and "not a megatron-eopd checkpoint" in capsys.readouterr().err
    assert not _leftovers(tmp_path / "a")
    # A checkpoint whose config claims more layers than its tensors hold: missing tensors.
    ckpt = tmp_path / "mcore"
    assert hf_to_mcore_main(["--hf-dir", str(tiny["tied"]), "--output", str(ckpt), "--dtype", "fp32"]) == 0
    _edit_config(ckpt / "hf", num_hidden_layers=6)
    rc = mcore_to_hf_main(["--mcore-dir", str(ckpt), "--output", str(tmp_path / "b")])
    assert rc == 2 and "does not match its Qwen3 config" in capsys.readouterr().err
    assert not _leftovers(tmp_path / "b")


def test_tools_run_as_scripts(tiny, tmp_path):
    """The CLI files themselves (a fresh process opens its own world-size-1 group)."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, str(root / "tools" / "convert_hf_to_mcore.py"), "--hf-dir", str(tiny["tied"]),
         "--output", str(tmp_path / "m"), "--tp", "3"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2 and "TP=3 does not divide" in proc.stderr
    assert not _leftovers(tmp_path / "m")
