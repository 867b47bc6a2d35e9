"""Saved rollouts (``logging.save_rollouts``) hold enough to recompute an iteration outside the project.

The trainer runs one EOPD iteration through its command line (``tools/train_eopd.py``, the
``tiny_cpu`` preset, the transformers sampler, one mini-batch of 8 responses in two micro-batches).
Then, from ``rollouts/iter_0000001.jsonl`` and the two Hugging Face directories alone (transformers
in float64 and plain torch; nothing of the project's objective or trainer), the test recomputes the
iteration's loss and gradient and compares them with what the trainer logged and did:

- ``loss``, its two terms, the gate fraction and the teacher entropy in ``metrics.jsonl``;
- ``grad_norm`` (the first optimizer step's gradient norm, before clipping);
- the weights after that step (``final_hf``): AdamW's first step from the reference gradient.

The teacher reads the problem in another template than the student (``chat_non_thinking``), so
every response token sits at another position in its view, and one response ends in
``<|endoftext|>``, which the teacher must see as ``<|im_end|>``.  The reference with a wrong tau,
or without that substitution, is checked to miss the trainer's numbers by far more than the
tolerance: the comparison can fail.  Before the run, cheap checks of the record builder, the
atomic write and the resume rule.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# The loss's settings for the run and for the reference.  tau sits inside the teacher entropies of
# these random models (0.9-4.1 nats, median 3.4), so the gate splits the tokens (checked below); the
# preset's 0.8 would open it everywhere.
TAU, ALPHA, TOPK, CLIP_EPS = 3.0, 1.0, 16, 0.2
LR, CLIP_GRAD, ADAM_EPS = 3.0e-4, 1.0, 1.0e-8
RESPONSES = 8
# train.seed 4 draws a response that stops at <|endoftext|> (checked, not assumed).
RUN = ["rollout.engine=hf", "train.seed=4", "train.iterations=1", f"train.prompts_per_iteration={RESPONSES}",
       f"train.mini_batch_size={RESPONSES}", "train.micro_batch_size=4", "rollout.sampling.max_tokens=24",
       "teacher.prompt_style=chat_non_thinking", f"loss.tau={TAU}", f"loss.alpha={ALPHA}",
       f"loss.topk={TOPK}", f"loss.clip_eps_low={CLIP_EPS}", f"loss.clip_eps_high={CLIP_EPS}",
       f"optim.lr={LR}", f"optim.min_lr={LR}", "optim.lr_schedule=constant", "optim.weight_decay=0.0",
       f"optim.clip_grad={CLIP_GRAD}", f"optim.adam_eps={ADAM_EPS}", "logging.tensorboard=false",
       "logging.progress=false"]
# fp32 Megatron against float64 transformers: terms of a few nats, means over 183 tokens.  Observed:
# the loss within 5e-7, grad_norm within 2e-7 relative, the update within 2e-4 lr.  The wrong
# references miss by 6e-3 (loss) and 3e-4 relative (grad_norm) at least.
LOSS_ATOL = 1e-5
GRAD_NORM_RTOL = 1e-5
UPDATE_ATOL = 0.02 * LR  # a gradient of the wrong sign moves a weight by 2 lr the other way
LOGPROB_ATOL = 1e-4  # per token, as the trainer's reference test


# --------------------------------------------------------------------------- the schema, without a run


def _fake_session(tmp_path, mode="eopd"):
    from megatron_eopd.data.synthetic import build_task_tokenizer

    config = SimpleNamespace(train=SimpleNamespace(mode=mode, seed=5, mini_batch_size=2))
    return SimpleNamespace(config=config, tokenizer=build_task_tokenizer(), platform=SimpleNamespace(rank=0),
                           run_dir=tmp_path)


def _sample(tokenizer, index, text, gold, **fields):
    from megatron_eopd.trainer.batch import Sample

    ids = tokenizer.encode(text, add_special_tokens=False)
    return Sample(index, [1, 2], [1, 2, 3], ids, ids, [-0.5] * len(ids), "stop", gold,
                  prompt_id=f"p{index}", **fields)


def test_records_carry_the_grade_the_trainer_computed(tmp_path):
    from megatron_eopd.trainer import phases

    session = _fake_session(tmp_path)
    tok = session.tokenizer
    samples = [_sample(tok, 0, "3+5=8. \\boxed{8}", "8", request_seed=11),
               _sample(tok, 1, "3+5=9. \\boxed{9}", "8", request_seed=12),
               _sample(tok, 2, "3+5=8", "8", request_seed=13)]
    assert phases.grade(session, samples) == pytest.approx(1 / 3)
    records = phases.rollout_records(session, samples, iteration=7)
    assert [(r["extracted_answer"], r["correct"], r["grade_reason"]) for r in records] == [
        ("8", True, "correct"), ("9", False, "wrong"), (None, False, "no_boxed_answer")]
    assert [r["response_text"] for r in records] == ["3+5=8. \\boxed{8}", "3+5=9. \\boxed{9}", "3+5=8"]
    assert [r["mini_batch"] for r in records] == [0, 0, 1]  # mini_batch_size 2
    assert [r["request_seed"] for r in records] == [11, 12, 13]
    assert {r["seed"] for r in records} == {5 * 1_000_003 + 7 * 7_919}
    assert records[0]["prompt_id"] == "p0" and records[0]["gold_answer"] == "8"
    assert records[0]["teacher_prompt_ids"] == [1, 2, 3] and records[0]["rollout_logprobs"][0] == -0.5
    json.dumps(records)  # JSON-ready as they are


def test_sft_records_have_no_engine_or_teacher_fields(tmp_path):
    from megatron_eopd.trainer import phases

    session = _fake_session(tmp_path, mode="sft")
    samples = [_sample(session.tokenizer, 0, "3+5=8. \\boxed{8}", "8")]
    phases.grade(session, samples)
    (record,) = phases.rollout_records(session, samples, iteration=3)
    assert record["rollout_logprobs"] is None and record["teacher_response_ids"] is None
    assert record["teacher_prompt_ids"] is None and record["request_seed"] is None
    assert record["seed"] == 5 * 1_000_003 + 3 and record["correct"] is True


def test_a_crashed_write_leaves_no_file_and_a_resume_drops_later_iterations(tmp_path):
    from megatron_eopd.trainer.saved_rollouts import RolloutLog

    log = RolloutLog(tmp_path)
    for iteration in (1, 2, 3):
        log.write(iteration, [{"iteration": iteration, "k": 0}, {"iteration": iteration, "k": 1}])
    assert sorted(p.name for p in log.directory.iterdir()) == [
        "iter_0000001.jsonl", "iter_0000002.jsonl", "iter_0000003.jsonl"]
    assert [json.loads(line)["k"] for line in log.path(2).read_text().splitlines()] == [0, 1]

    def dies_halfway():
        yield {"iteration": 4, "k": 0}
        raise KeyboardInterrupt  # the process dies while the file is written

    with pytest.raises(KeyboardInterrupt):
        log.write(4, dies_halfway())
    assert not log.path(4).exists()
    assert [p.name for p in log.directory.glob(".tmp-*")] == [".tmp-iter_0000004.jsonl"]

    # Resumed from the checkpoint of iteration 1: iterations 2 and 3 will run again.
    resumed = RolloutLog(tmp_path, resume_from=1)
    assert sorted(p.name for p in resumed.directory.iterdir()) == ["iter_0000001.jsonl"]
    resumed.write(2, [{"iteration": 2, "k": 5}])
    assert json.loads(resumed.path(2).read_text())["k"] == 5


def test_the_switch_is_a_typed_field_off_by_default_and_on_in_tiny_cpu():
    from megatron_eopd.config import ConfigError
    from megatron_eopd.trainer.config import EOPDTrainConfig, load_train_config

    assert EOPDTrainConfig().logging.save_rollouts is False
    assert load_train_config("tiny_cpu").logging.save_rollouts is True
    assert load_train_config("eopd_qwen3_1.7b").logging.save_rollouts is False
    with pytest.raises(ConfigError, match="save_rollouts"):
        load_train_config("tiny_cpu", ["logging.save_rollouts=sometimes"])


# --------------------------------------------------------------------------- one real iteration


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    from megatron_eopd.data.synthetic import ENDOFTEXT, IM_END, build_task_tokenizer
    from megatron_eopd.testing.tiny_qwen3 import make_tiny_qwen3

    root = tmp_path_factory.mktemp("saved_rollouts")
    shapes = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                  ffn_hidden_size=128, tokenizer=build_task_tokenizer(), eos_tokens=(IM_END, ENDOFTEXT),
                  max_position_embeddings=512)
    teacher = make_tiny_qwen3(root / "teacher", seed=21, **shapes)
    student = make_tiny_qwen3(root / "student", seed=22, tie_word_embeddings=True, **shapes)
    run_dir = root / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    command = [sys.executable, str(REPO / "tools" / "train_eopd.py"), "--config", "tiny_cpu",
               f"run.dir={run_dir}", f"student.hf_dir={student}", f"teacher.hf_dir={teacher}", *RUN]
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    (metrics,) = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    saved = run_dir / "rollouts" / "iter_0000001.jsonl"
    rows = [json.loads(line) for line in saved.read_text().splitlines()]
    return {"student": str(student), "teacher": str(teacher), "run_dir": run_dir, "metrics": metrics,
            "rows": rows}


# Everything below reads only the JSONL file, the metrics and the HF directories.

def _load(model_dir: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()


def _response_logprobs(model, prompt: list, response: list) -> torch.Tensor:
    """log-softmax [R, V] at the positions that predict ``response`` after ``prompt`` (alone, unpadded)."""
    logits = model(torch.tensor([prompt + response])).logits[0]
    return torch.log_softmax(logits[len(prompt) - 1 : len(prompt) + len(response) - 1], dim=-1)


def _special_ids(model_dir: str) -> tuple[int, int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return tuple(tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"]))


def reference_iteration(rows, student, teacher, special_ids, *, tau=TAU, swap_end_of_turn=True) -> dict:
    """EOPD's loss of one mini-batch at its first optimizer step, and its gradient, in float64.

    Per response token t: A_t = log p(y_t) - log q_old(y_t) (the teacher's log-prob of its view of
    the token), r_t = q(y_t) / q_old(y_t) (1 in value at the first step, q_old = q detached),
    L_rkl = max(-r A, -clip(r, 1 - eps, 1 + eps) A); L_fkl = sum over the teacher's top-k of
    p~ (log p~ - log q), p~ the teacher renormalised on its top-k, log q the student's full
    log-softmax; loss = sum_t (L_rkl + alpha 1[H_t > tau] L_fkl) / (all response tokens).
    """
    endoftext, im_end = special_ids
    student.zero_grad(set_to_none=True)
    rkl, fkl, gates, entropies = [], [], [], []
    for row in rows:
        response = row["response_ids"]
        teacher_response = list(response)
        if swap_end_of_turn and endoftext in response:  # the chat teacher ends its turn with <|im_end|>
            teacher_response[response.index(endoftext)] = im_end
        with torch.no_grad():
            log_p = _response_logprobs(teacher, row["teacher_prompt_ids"], teacher_response)
        log_q = _response_logprobs(student, row["prompt_ids"], response)
        log_q_y = log_q.gather(-1, torch.tensor(response)[:, None])[:, 0]
        log_q_old = log_q_y.detach()
        ratio = torch.exp(log_q_y - log_q_old)
        advantage = log_p.gather(-1, torch.tensor(teacher_response)[:, None])[:, 0] - log_q_old
        rkl.append(torch.maximum(-ratio * advantage, -ratio.clamp(1 - CLIP_EPS, 1 + CLIP_EPS) * advantage))
        entropy = -(log_p.exp() * log_p).sum(-1)
        top_log_p, top_ids = log_p.topk(TOPK, dim=-1)
        log_p_tilde = top_log_p - top_log_p.logsumexp(-1, keepdim=True)
        fkl.append((log_p_tilde.exp() * (log_p_tilde - log_q.gather(-1, top_ids))).sum(-1))
        gates.append((entropy > tau).double())
        entropies.append(entropy)
    rkl, fkl, gates, entropies = (torch.cat(x) for x in (rkl, fkl, gates, entropies))
    tokens = rkl.numel()
    loss_rkl, loss_fkl = rkl.sum() / tokens, (ALPHA * gates * fkl).sum() / tokens
    (loss_rkl + loss_fkl).backward()
    gradients = {name: p.grad.detach().clone() for name, p in student.named_parameters()}
    loss_rkl, loss_fkl = loss_rkl.item(), loss_fkl.item()
    return {"loss": loss_rkl + loss_fkl, "loss_rkl": loss_rkl, "loss_fkl": loss_fkl,
            "gate_fraction": float(gates.mean()), "teacher_entropy": float(entropies.mean()),
            "num_response_tokens": tokens, "gradients": gradients,
            "grad_norm": math.sqrt(sum(float((g * g).sum()) for g in gradients.values()))}


@pytest.fixture(scope="module")
def models(run):
    return _load(run["student"]), _load(run["teacher"]), _special_ids(run["student"])


@pytest.fixture(scope="module")
def reference(run, models):
    student, teacher, special = models
    return reference_iteration(run["rows"], student, teacher, special)


def test_the_file_holds_the_iterations_samples(run, models):
    from transformers import AutoTokenizer

    rows, student = run["rows"], models[0]
    endoftext, im_end = models[2]
    tokenizer = AutoTokenizer.from_pretrained(run["student"])
    assert len(rows) == RESPONSES
    assert {(r["iteration"], r["mini_batch"]) for r in rows} == {(1, 0)}
    assert len({r["seed"] for r in rows}) == 1 and len({r["request_seed"] for r in rows}) == RESPONSES
    assert all(r["prompt_id"].startswith("arith-train-") and r["gold_answer"] for r in rows)
    for r in rows:
        assert r["response_text"] == tokenizer.decode(r["response_ids"], skip_special_tokens=True)
        if r["extracted_answer"] is not None:  # random models: no right answer, at most a stray box
            assert "\\boxed{" + r["extracted_answer"] + "}" in r["response_text"] and r["correct"] is False
        ends_turn = r["response_ids"][-1] in (endoftext, im_end)
        assert r["finish_reason"] == ("stop" if ends_turn else "length")
        # The engine's log-prob of each sampled token is the student's (float64, one sequence alone).
        with torch.no_grad():
            log_q = _response_logprobs(student, r["prompt_ids"], r["response_ids"])
        expected = log_q.gather(-1, torch.tensor(r["response_ids"])[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(r["rollout_logprobs"], dtype=torch.float64), expected,
                                   atol=LOGPROB_ATOL, rtol=0)
    assert sum(len(r["response_ids"]) for r in rows) == run["metrics"]["num_response_tokens"]


def test_loss_and_gradient_norm_recomputed_from_the_files(run, models, reference):
    metrics, rows = run["metrics"], run["rows"]
    student, teacher, special = models
    endoftext, im_end = special
    # The comparison covers both things that could go quietly wrong: the gate splits the tokens, and
    # a response ends in <|endoftext|>, which the file's teacher view shows as <|im_end|>.
    assert 0.2 < reference["gate_fraction"] < 0.9
    swapped = [r for r in rows if r["response_ids"][-1] == endoftext]
    assert swapped and all(r["teacher_response_ids"] == r["response_ids"][:-1] + [im_end] for r in swapped)
    for key in ("loss", "loss_rkl", "loss_fkl", "gate_fraction", "teacher_entropy"):
        assert metrics[key] == pytest.approx(reference[key], abs=LOSS_ATOL, rel=0), key
    assert metrics["clip_fraction"] == 0.0  # ratio 1 at the first step
    assert metrics["grad_norm"] == pytest.approx(reference["grad_norm"], rel=GRAD_NORM_RTOL)

    # The recomputation can fail: a wrong tau (the preset's 0.8) or a teacher that is shown the
    # student's <|endoftext|> misses the logged loss and gradient norm by far more than the tolerances.
    for wrong in (dict(tau=0.8), dict(swap_end_of_turn=False)):
        other = reference_iteration(rows, student, teacher, special, **wrong)
        assert abs(other["loss"] - metrics["loss"]) > 100 * LOSS_ATOL, wrong
        assert abs(other["grad_norm"] / metrics["grad_norm"] - 1) > 10 * GRAD_NORM_RTOL, wrong


def test_the_first_step_is_adamw_on_the_reference_gradient(run, reference):
    """The weights after the step (``final_hf``) moved by AdamW's first update of the clipped
    reference gradient g: -lr g / (|g| + eps) elementwise, i.e. about -lr sign(g)."""
    from safetensors.torch import load_file

    def weights(model_dir):
        out = {}
        for path in sorted(Path(model_dir).glob("*.safetensors")):
            out.update(load_file(str(path)))
        return out

    before, after = weights(run["student"]), weights(run["run_dir"] / "final_hf")
    norm = reference["grad_norm"]
    scale = min(1.0, CLIP_GRAD / (norm + 1e-6))  # Megatron's clipping: the norm before, plus 1e-6
    checked = decided = 0
    for name, gradient in reference["gradients"].items():
        gradient = gradient * scale
        expected = -LR * gradient / (gradient.abs() + ADAM_EPS)
        moved = after[name].double() - before[name].double()
        # Where |g| is near Adam's eps the update depends on fp32 rounding of g; elsewhere it is +-lr.
        clear = gradient.abs() > 1e-6
        torch.testing.assert_close(moved[clear], expected[clear], atol=UPDATE_ATOL, rtol=0)
        checked += moved.numel()
        decided += int(clear.sum())
    assert checked == sum(t.numel() for t in before.values())
    assert decided > 0.99 * checked
