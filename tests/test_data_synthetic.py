"""The synthetic arithmetic task: problems, valid paths, the ideal teacher's entropies, tokenizer, models."""

from __future__ import annotations

import math
import random
from collections import defaultdict
from itertools import permutations

import pytest

from megatron_eopd.data import qwen3_templates
from megatron_eopd.data import synthetic as task


def test_problems_are_deterministic_distinct_and_the_splits_disjoint():
    train = task.generate_problems(3000, seed=0, split="train")
    assert train == task.generate_problems(3000, seed=0, split="train")
    assert train[:50] != task.generate_problems(50, seed=1, split="train")
    test = task.generate_problems(400, seed=0, split="test")
    assert len({r.problem for r in train}) == 3000 and len({r.id for r in train + test}) == 3400
    # Disjoint up to reordering: no test problem is a permutation of a training problem.
    train_sets = {tuple(sorted(task.parse_problem(r))) for r in train}
    assert not train_sets & {tuple(sorted(task.parse_problem(r))) for r in test}
    for record in train[:200] + test[:200]:
        operands = task.parse_problem(record)
        assert task.MIN_OPERANDS <= len(operands) <= task.MAX_OPERANDS
        assert all(0 <= x <= 9 for x in operands) and len(set(operands)) == len(operands)
        assert record.answer == str(sum(operands))
        assert task.format_problem(operands) == record.problem
    assert task.format_problem([3, 5, 2, 7]) == "Add 3, 5, 2 and 7."


def test_the_long_task_is_a_named_source_with_longer_chains_and_its_own_disjoint_split():
    from megatron_eopd.data import DataError, load_prompt_records

    train = load_prompt_records(task.LONG_SOURCE, split="train")
    test = load_prompt_records(task.LONG_SOURCE, split="test", limit=300)
    assert len(train) == 4096 and len(test) == 300
    counts = {len(task.parse_problem(r)) for r in train + test}
    assert counts == {6, 7, 8}  # every length of the long task occurs, none of the default's
    assert {r.source for r in train + test} == {task.LONG_SOURCE}
    assert not ({tuple(sorted(task.parse_problem(r))) for r in train}
                & {tuple(sorted(task.parse_problem(r))) for r in test})
    for record in test[:50]:
        assert record.answer == str(sum(task.parse_problem(record)))
        assert task.is_valid_solution(record, task.sample_solution(record, random.Random(0)))
    # The default source is unchanged by the registry.
    assert load_prompt_records(task.SOURCE, split="test", limit=5) == task.generate_problems(5, split="test")
    with pytest.raises(DataError, match="unknown synthetic task 'synthetic:arith-hard'; known: synthetic:arith, "
                                        "synthetic:arith-long"):
        load_prompt_records("synthetic:arith-hard")


def test_sampled_paths_are_valid_varied_and_end_in_the_boxed_answer():
    record = task.generate_problems(1, seed=5)[0]
    rng = random.Random(0)
    paths = {task.sample_solution(record, rng) for _ in range(3000)}
    assert len(paths) == math.factorial(len(task.parse_problem(record)))  # every order of the numbers
    for path in paths:
        assert task.is_valid_solution(record, path)
        assert path.endswith(f"\\boxed{{{record.answer}}}") and len(path) < 70
    lengths = [len(task.sample_solution(r, rng)) for r in task.generate_problems(300, seed=1)]
    assert sum(lengths) / len(lengths) < 60


@pytest.mark.parametrize(
    "solution, valid",
    [
        ("3+5=8,8+2=10,10+7=17. \\boxed{17}", True),
        ("7+2=9,9+5=14,14+3=17. \\boxed{17}", True),
        ("2+7=9,3+5=8,8+9=17. \\boxed{17}", False),  # a second pair instead of the running total
        ("7+2=9,9+5=14,3+14=17. \\boxed{17}", False),  # the running total goes first
        ("3+5=8,8+2=10,10+7=18. \\boxed{18}", False),  # wrong sum
        ("3+5=8,8+2=10,10+7=17. \\boxed{18}", False),  # box disagrees with the work
        ("3+3=6,6+2=8,8+7=15. \\boxed{15}", False),  # uses 3 twice
        ("3+5=8,8+2=10. \\boxed{10}", False),  # leaves 7 out
        ("03+5=8,8+2=10,10+7=17. \\boxed{17}", False),  # leading zero
        ("3+5=8, 8+2=10, 10+7=17. \\boxed{17}", False),  # not the task's format
        ("3+5=8,8+2=10,10+7=17. \\boxed{17}.", False),
    ],
)
def test_is_valid_solution(solution, valid):
    assert task.is_valid_solution("Add 3, 5, 2 and 7.", solution) is valid


def _brute_force_entropies(problem: str, solution: str):
    """Entropies by enumerating every path of the sampler with its probability, then conditioning on
    the token sequence (the closing prefix is one token, as the task tokenizer has it)."""
    paths = defaultdict(float)
    operands = task.parse_problem(problem)
    closing = "\x01"  # stands for the one-token ". \\boxed{"

    for order in permutations(range(len(operands))):
        values = [operands[i] for i in order]
        total, steps = values[0], []
        for x in values[1:]:
            steps.append(f"{total}+{x}={total + x}")
            total += x
        paths[",".join(steps) + closing + f"{total}}}" + "\0"] += 1 / math.factorial(len(operands))  # \0: end

    assert math.isclose(sum(paths.values()), 1.0)
    full = solution.replace(task.FINAL_PREFIX, closing) + "\0"
    out = []
    for t in range(len(full)):
        mass = defaultdict(float)
        for text, p in paths.items():
            if text.startswith(full[:t]):
                mass[text[t]] += p
        z = sum(mass.values())
        out.append(-sum(m / z * math.log(m / z) for m in mass.values()))
    return out


@pytest.mark.parametrize(
    "operands",
    [[3, 5, 2, 7], [0, 1, 2, 5], [4, 6, 2, 1, 9], [9, 3, 7, 1, 0], [8, 7, 6, 5, 4], [5, 0, 8, 4]],
)
def test_ideal_entropies_match_brute_force_enumeration(operands):
    problem = task.format_problem(operands)
    tokenizer = task.build_task_tokenizer()
    rng = random.Random(sum(operands))
    for _ in range(6):
        solution = task.sample_solution(problem, rng)
        expected = _brute_force_entropies(problem, solution)
        got = task.ideal_branch_entropies(problem, solution)
        assert len(got) == len(tokenizer.encode(solution, add_special_tokens=False)) + 1
        assert got == pytest.approx(expected, abs=1e-12)


def test_branch_points_carry_ln_k_and_everything_else_is_certain():
    problem = "Add 3, 5, 2 and 7."
    ent = task.ideal_branch_entropies(problem, "3+5=8,8+2=10,10+7=17. \\boxed{17}")
    high = {i: h for i, h in enumerate(ent) if h > 1e-12}
    # First number of 4, second of 3, then 2 left (the running total "8+" is copied), then 1.
    assert high == pytest.approx({0: math.log(4), 2: math.log(3), 8: math.log(2)})


def test_ideal_high_entropy_fraction():
    """A perfect teacher is above tau = 0.8 nats on the first two or three picks of each solution
    (4, 5 or 3 options), 8-9% of the tokens; a trained one is uncertain on more (make run logs it)."""
    records = task.generate_problems(400, seed=0, split="train")
    fraction = task.ideal_high_entropy_fraction(records, samples_per_problem=2, tau=0.8)
    assert 0.08 <= fraction <= 0.30, fraction


# ---------------------------------------------------------------- tokenizer and models

@pytest.fixture(scope="module")
def tokenizer():
    return task.build_task_tokenizer()


def test_tokenizer_is_character_level_with_qwen_specials_last(tokenizer):
    assert len(tokenizer) == 96 + 3 + len(task.TASK_PHRASES)
    specials = [tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")]
    assert specials == [96, 97, 98]
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.eos_token == "<|im_end|>"
    ids = qwen3_templates.special_token_ids(tokenizer)
    assert (ids.endoftext, ids.im_start, ids.im_end) == (96, 97, 98)
    text = "3+5=8,8+2=10"
    assert tokenizer.encode(text, add_special_tokens=False) == [task.TASK_ALPHABET.index(c) for c in text]
    closing = tokenizer.encode(text + task.final_text(10), add_special_tokens=False)[len(text):]
    assert closing == [tokenizer.convert_tokens_to_ids(task.FINAL_PREFIX)] + [task.TASK_ALPHABET.index(c) for c in "10}"]


def test_tokenizer_round_trips_task_text_exactly(tokenizer):
    rng = random.Random(0)
    texts = ["  double  spaces , and ' quotes \" ~`{}\n\nnewlines\n", "".join(task.TASK_ALPHABET)]
    for record in task.generate_problems(20, seed=2):
        prompt = qwen3_templates.format_teacher_prompt(record.problem)
        texts += [prompt, prompt + task.sample_solution(record, rng) + "<|im_end|>", record.problem]
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids) == text
    assert tokenizer.decode(ids, skip_special_tokens=True) == text.replace("<|im_start|>", "").replace("<|im_end|>", "")


def test_chat_template_matches_the_qwen3_prompt_format(tokenizer):
    problem = "Add 1, 2, 3, 4 and 5."
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": qwen3_templates.user_message(problem)}], tokenize=False, add_generation_prompt=True
    )
    assert rendered == qwen3_templates.format_prompt(problem)
    ids = tokenizer.encode(rendered, add_special_tokens=False)
    # The instruction and the roles are one token each; the problem stays character level.
    assert len(ids) == 1 + 1 + len(problem) + 1 + 1 + 1 + 1 + 1 + 1
    for phrase in task.TASK_PHRASES:
        assert len(tokenizer.encode(phrase, add_special_tokens=False)) == 1, phrase


@pytest.mark.parametrize("role", ["teacher", "student"])
def test_task_models_load_in_transformers(tmp_path, tokenizer, role):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    path = task.make_task_model(tmp_path / role, role=role, seed=1)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    shape = task.TASK_MODEL_SHAPES[role]
    cfg = model.config
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers, cfg.head_dim) == (
        len(tokenizer), shape["hidden_size"], shape["num_layers"], 32)
    assert cfg.tie_word_embeddings is shape["tie_word_embeddings"] and cfg.max_position_embeddings == 512
    tied = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert tied is shape["tie_word_embeddings"]
    assert model.model.embed_tokens.weight.std().item() == pytest.approx(0.02, rel=0.2)  # normal init scale
    assert GenerationConfig.from_pretrained(path).eos_token_id == [98, 96]
    loaded_tok = AutoTokenizer.from_pretrained(path)
    text = qwen3_templates.format_prompt("Add 1, 2, 3, 4 and 5.")
    ids = loaded_tok.encode(text, add_special_tokens=False)
    assert ids == tokenizer.encode(text, add_special_tokens=False) and loaded_tok.decode(ids) == text
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), len(tokenizer)) and torch.isfinite(logits).all()
    # Near-uniform at init: entropy close to ln(V) (a 0.2 init scale would be far from it).
    probs = logits[0, -1].softmax(-1)
    assert -(probs * probs.log()).sum().item() > 0.9 * math.log(len(tokenizer))
    other = AutoModelForCausalLM.from_pretrained(task.make_task_model(tmp_path / "again", role=role, seed=1))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))


@pytest.mark.vllm
def test_vllm_serves_a_task_model_with_the_hf_models_log_probs(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from megatron_eopd.rollout import RolloutConfig, SamplingConfig, create_rollout_engine
    from megatron_eopd.rollout.engine import vllm_importable
    from megatron_eopd.rollout.parity import hf_sequence_logprobs

    if not vllm_importable():
        pytest.skip("vllm is not importable in this environment")
    path = task.make_task_model(tmp_path / "student", role="student", seed=0)  # tied embeddings
    tokenizer = task.build_task_tokenizer()
    prompt = tokenizer.encode(qwen3_templates.format_prompt("Add 1, 2, 3, 4 and 5."), add_special_tokens=False)
    config = RolloutConfig(engine="vllm", dtype="float32", enforce_eager=True, max_model_len=512,
                           show_progress=False, sampling=SamplingConfig(max_tokens=64))
    engine = create_rollout_engine(config, path)
    try:
        batch = engine.generate([prompt], SamplingConfig(n=2, max_tokens=12, seed=0))
    finally:
        engine.close()
    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for sample in batch.results[0].samples:
        assert sample.token_ids and all(0 <= t < len(task.build_task_tokenizer()) for t in sample.token_ids)
        expected = hf_sequence_logprobs(hf_model, [prompt + sample.token_ids])[0][len(prompt) - 1 :]
        assert torch.tensor(sample.logprobs) == pytest.approx(expected.float(), abs=2e-3)
