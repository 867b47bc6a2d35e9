"""The trainer's per-token inputs to the loss equal an independent float64 Hugging Face computation.

One iteration's phases run in-process on the real session (rollout, packing into micro-batches,
Megatron teacher scoring, Megatron student log-probs), with a teacher that reads the problem in
another template than the student (``chat_non_thinking``: its prompt is longer by Qwen3's empty think
block, so every response position sits elsewhere in the two views) and sees ``<|im_end|>`` where the
student wrote ``<|endoftext|>``.  Reference: ``transformers`` models in float64 on each sequence alone,
unpadded.  A one-token misalignment anywhere would move the values by far more than the tolerance,
which the test checks too.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

TOLERANCE = 1e-4  # fp32 Megatron against float64 HF; a shifted position is off by ~1 nat
TOPK = 16


@pytest.fixture(scope="module", params=[True, False], ids=["fused-output-layer", "logits"])
def session(tmp_path_factory, request):
    from megatron_eopd.data.synthetic import ENDOFTEXT, IM_END, build_task_tokenizer
    from megatron_eopd.testing.tiny_qwen3 import make_tiny_qwen3
    from megatron_eopd.trainer.config import load_train_config
    from megatron_eopd.trainer.session import open_session

    root = tmp_path_factory.mktemp("reference")
    shapes = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, ffn_hidden_size=128,
                  tokenizer=build_task_tokenizer(), eos_tokens=(IM_END, ENDOFTEXT), max_position_embeddings=512)
    # init_std 0.2: peaked, position-dependent distributions, so a misaligned position shows.
    teacher = make_tiny_qwen3(root / "teacher", seed=21, **shapes)
    student = make_tiny_qwen3(root / "student", seed=22, tie_word_embeddings=True, **shapes)
    config = load_train_config("tiny_cpu", [
        f"run.dir={root / 'run'}", f"student.hf_dir={student}", f"teacher.hf_dir={teacher}",
        "teacher.prompt_style=chat_non_thinking", "rollout.engine=hf", "rollout.sampling.max_tokens=20",
        "train.prompts_per_iteration=8", "train.mini_batch_size=4", "train.micro_batch_size=2",
        f"loss.topk={TOPK}", "logging.tensorboard=false", "logging.progress=false",
        f"train.fused_output_layer={str(request.param).lower()}",
    ])
    opened = open_session(config)
    yield opened
    opened.close()


@pytest.fixture(scope="module")
def iteration_one(session):
    from megatron_eopd.trainer import phases
    from megatron_eopd.trainer.student import old_logprobs

    samples = phases.rollout(session, 1)
    steps = phases.make_steps(session, samples)
    teacher = phases.teacher_statistics(session, steps, 1)
    student = [old_logprobs(session.student.chunks, step, tp_group=phases._tp_group(),
                            true_vocab_size=session.vocab_size, fused_head=session.config.fused_head)
               for step in steps]
    return steps, teacher, student


def _hf_logprobs(model_dir: str, prompt: list[int], response: list[int]) -> torch.Tensor:
    """float64 log-softmax at the positions that predict ``response`` ([R, V])."""
    from transformers import AutoModelForCausalLM

    model = _hf_logprobs.cache.get(model_dir)
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
        _hf_logprobs.cache[model_dir] = model
    sequence = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(sequence).logits[0]
    return torch.log_softmax(logits[len(prompt) - 1 : len(prompt) + len(response) - 1, : model.config.vocab_size], -1)


_hf_logprobs.cache = {}


def _per_sample(steps, values):
    """(sample, its micro-batch's response mask, the micro-batch's values, its row) for every sample."""
    for step, per_micro_batch in zip(steps, values):
        for mb, value in zip(step.student, per_micro_batch):
            mask = mb.extras["mask"]
            for row, index in enumerate(mb.extras["samples"]):
                yield step.samples[index], mask, value, row


def test_views_differ_as_the_teacher_reads_them(session, iteration_one):
    from megatron_eopd.data.qwen3_templates import EMPTY_THINK

    steps, _, _ = iteration_one
    samples = [s for step in steps for s in step.samples]
    assert len(samples) == 8  # two optimizer steps of two micro-batches
    empty_think = session.tokenizer.encode(EMPTY_THINK, add_special_tokens=False)
    for s in samples:
        assert s.teacher_prompt_ids[: len(s.prompt_ids)] == s.prompt_ids
        assert s.teacher_prompt_ids[len(s.prompt_ids):] == empty_think
        assert s.teacher_response_ids[:-1] == s.response_ids[:-1]
        if s.response_ids[-1] == session.special.endoftext:
            assert s.teacher_response_ids[-1] == session.special.im_end


def test_teacher_statistics_match_float64_hf(session, iteration_one):
    steps, teacher, _ = iteration_one
    shifted_error = 0.0
    checked = 0
    for sample, mask, out, row in _per_sample(steps, teacher):
        stats = out.stats
        rows = lambda x: x.reshape(mask.shape + x.shape[1:])[row][mask[row]]  # noqa: E731
        ref = _hf_logprobs(session.config.teacher.hf_dir, sample.teacher_prompt_ids, sample.teacher_response_ids)
        labels = torch.tensor(sample.teacher_response_ids)
        ref_sampled = ref.gather(-1, labels[:, None])[:, 0]
        ref_entropy = -(ref.exp() * ref).sum(-1)
        ref_top_lp, ref_top_ids = ref.topk(TOPK, dim=-1)
        torch.testing.assert_close(rows(stats.sampled_logprob).double(), ref_sampled, atol=TOLERANCE, rtol=0)
        torch.testing.assert_close(rows(stats.entropy).double(), ref_entropy, atol=TOLERANCE, rtol=0)
        torch.testing.assert_close(rows(stats.topk_logprobs).double(), ref_top_lp, atol=TOLERANCE, rtol=0)
        # Ids compared where the reference's k-th and (k+1)-th values are not a near-tie.
        assert (rows(stats.topk_ids)[:, 0] == ref_top_ids[:, 0]).all()
        if len(labels) > 2:
            shifted_error = max(shifted_error, (rows(stats.sampled_logprob)[1:].double() - ref_sampled[:-1]).abs().max().item())
        checked += len(labels)
    assert checked > 20
    assert shifted_error > 100 * TOLERANCE  # the comparison would see a one-position slip


def test_student_logprobs_match_float64_hf(session, iteration_one):
    steps, _, student = iteration_one
    for sample, mask, value, row in _per_sample(steps, student):
        got = value.reshape(mask.shape)[row][mask[row]].double()
        ref = _hf_logprobs(session.config.student.hf_dir, sample.prompt_ids, sample.response_ids)
        expected = ref.gather(-1, torch.tensor(sample.response_ids)[:, None])[:, 0]
        torch.testing.assert_close(got, expected, atol=TOLERANCE, rtol=0)
        # The sampler reported what the trainer recomputes (the importance ratio starts at 1).
        torch.testing.assert_close(torch.tensor(sample.rollout_logprobs, dtype=torch.float64), expected,
                                   atol=TOLERANCE, rtol=0)
