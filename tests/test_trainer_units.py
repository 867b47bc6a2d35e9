"""Units of the trainer: packing and moving per-token values between the student's and the teacher's
views, the per-DP-rank split of mini-batches, the teacher-statistics guard, and the rollout fleet's
engine placement, prompt split and gather (two HF engines under torchrun against one engine).

References are written out independently: position-by-position loops over ``prompt + response``,
hand-computed rank lists and shard bounds, and one engine sampling every prompt in one call.

Run as a script (``python tests/test_trainer_units.py fleet-worker MODEL_DIR OUT``) under torchrun,
this file is also the fleet's two-rank worker.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_eopd.trainer.batch import ResponsePlacement, Sample, pack, step_batches
from megatron_eopd.trainer.rollouts import engine_host_ranks, shard_bounds

PAD = 0
FLEET_SEED = 4242
FLEET_PROMPTS = 7  # uneven over two engines: 4 + 3


# --------------------------------------------------------------------------- batch.py: pack


def _reference_pack(prompts, responses, length, rows):
    """Plain lists: the model reads sequence[:-1], predicts sequence[1:]; a position is a response
    position when the token it predicts is a response token."""
    tokens = [[PAD] * length for _ in range(rows)]
    labels = [[PAD] * length for _ in range(rows)]
    mask = [[False] * length for _ in range(rows)]
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        sequence = list(prompt) + list(response)
        for j in range(len(sequence) - 1):
            tokens[i][j] = sequence[j]
            labels[i][j] = sequence[j + 1]
            mask[i][j] = j + 1 >= len(prompt)  # the label sequence[j+1] belongs to the response
    return tokens, labels, mask


def test_pack_matches_a_position_by_position_reference():
    prompts = [[11, 12, 13], [21], [31, 32, 33, 34, 35]]
    responses = [[14, 15], [22, 23, 24, 25], [36]]
    view = pack(prompts, responses, pad_id=PAD, length=8, rows=4)
    tokens, labels, mask = _reference_pack(prompts, responses, 8, 4)
    assert view.tokens.tolist() == tokens
    assert view.labels.tolist() == labels
    assert view.mask.tolist() == mask
    assert view.length == 8
    # The shift, read back: the labels under the mask are exactly each response, in order, and the
    # token at a response position is the one just before its label.
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        row_mask = view.mask[i]
        assert view.labels[i][row_mask].tolist() == response
        first = len(prompt) - 1
        assert row_mask.nonzero().view(-1).tolist() == list(range(first, first + len(response)))
        assert view.tokens[i, first].item() == prompt[-1]
    # The filler row (rows=4 for 3 samples) is all padding with an empty mask.
    assert view.tokens[3].tolist() == [PAD] * 8 and not view.mask[3].any()


def test_pack_default_shape_and_overflow():
    view = pack([[1, 2], [3]], [[4], [5, 6, 7]], pad_id=PAD)
    assert tuple(view.tokens.shape) == (2, 3)  # longest sequence is 1 + 3 = 4 tokens -> 3 positions
    with pytest.raises(ValueError, match="do not fit"):
        pack([[1, 2, 3]], [[4, 5]], pad_id=PAD, length=3)
    with pytest.raises(ValueError, match="do not fit"):
        pack([[1], [2]], [[3], [4]], pad_id=PAD, rows=1)


# --------------------------------------------------------------------------- batch.py: ResponsePlacement


def _reference_move(values, source_mask, target_mask):
    """Row-major walk: the k-th response position of the source lands on the k-th of the target."""
    picked = [values[i][j] for i in range(len(source_mask)) for j in range(len(source_mask[i])) if source_mask[i][j]]
    zero = torch.zeros_like(values[0][0])
    out = [[zero.clone() for _ in row] for row in target_mask]
    k = 0
    for i in range(len(target_mask)):
        for j in range(len(target_mask[i])):
            if target_mask[i][j]:
                out[i][j] = picked[k]
                k += 1
    assert k == len(picked)
    return torch.stack([torch.stack(row) for row in out])


def _two_views(seed=0, n=5):
    """Student and teacher prompts of different lengths (the teacher's longer, like its think block)
    behind the same responses."""
    rng = random.Random(seed)
    student_prompts = [[rng.randrange(3, 90) for _ in range(rng.randint(1, 6))] for _ in range(n)]
    teacher_prompts = [p + [rng.randrange(3, 90) for _ in range(rng.randint(0, 4))] for p in student_prompts]
    responses = [[rng.randrange(3, 90) for _ in range(rng.randint(1, 7))] for _ in range(n)]
    return student_prompts, teacher_prompts, responses


@pytest.mark.parametrize("trailing", [(), (3,)])
def test_response_placement_student_to_teacher_and_back(trailing):
    student_prompts, teacher_prompts, responses = _two_views()
    student = pack(student_prompts, responses, pad_id=PAD)
    teacher = pack(teacher_prompts, responses, pad_id=PAD)
    torch.manual_seed(0)
    values = torch.randn(tuple(student.mask.shape) + trailing)

    moved = ResponsePlacement.between(student.mask, teacher.mask).move(values)
    assert torch.equal(moved, _reference_move(values, student.mask.tolist(), teacher.mask.tolist()))
    # Semantics: response token t of sample i sits at P_i - 1 + t in either view.
    for i, response in enumerate(responses):
        for t in range(len(response)):
            assert torch.equal(moved[i, len(teacher_prompts[i]) - 1 + t], values[i, len(student_prompts[i]) - 1 + t])
    assert not moved[~teacher.mask].any()

    back = ResponsePlacement.between(teacher.mask, student.mask).move(moved)
    assert torch.equal(back[student.mask], values[student.mask])
    assert not back[~student.mask].any()


def test_response_placement_refuses_different_counts():
    a = torch.tensor([[True, True, False]])
    b = torch.tensor([[True, False, False]])
    with pytest.raises(ValueError, match="2 response positions in the source view, 1 in the target"):
        ResponsePlacement.between(a, b)


# --------------------------------------------------------------------------- batch.py: step_batches


def _samples(n, seed=1):
    student_prompts, teacher_prompts, responses = _two_views(seed, n)
    out = []
    for i in range(n):
        # The teacher's copy ends in its end-of-turn token where the student wrote another one.
        teacher_response = responses[i][:-1] + [99]
        out.append(Sample(prompt_index=i, prompt_ids=student_prompts[i], teacher_prompt_ids=teacher_prompts[i],
                          response_ids=responses[i], teacher_response_ids=teacher_response,
                          rollout_logprobs=[-0.5] * len(responses[i]), finish_reason="stop"))
    return out


@pytest.mark.parametrize("uniform_length", [False, True])
@pytest.mark.parametrize("mini,micro,dp", [(6, 1, 3), (6, 2, 3), (4, 2, 1), (6, 2, 2), (12, 3, 1)])
def test_step_batches_split_per_dp_rank(mini, micro, dp, uniform_length):
    samples = _samples(12)
    per_rank = mini // dp
    by_rank = [step_batches(samples, mini_batch_size=mini, micro_batch_size=micro, dp_rank=r, dp_size=dp,
                            pad_id=PAD, device="cpu", uniform_length=uniform_length) for r in range(dp)]
    assert all(len(steps) == 12 // mini for steps in by_rank)
    assert len({len(s.prompt_ids) + len(s.response_ids) for s in samples}) > 3  # lengths differ: sorting matters

    def seq_len(s, teacher=False):
        return (len(s.teacher_prompt_ids) + len(s.teacher_response_ids) if teacher
                else len(s.prompt_ids) + len(s.response_ids)) - 1

    for m in range(12 // mini):
        mini_batch = samples[m * mini:(m + 1) * mini]
        assert sum(by_rank[r][m].num_response_tokens for r in range(dp)) == sum(len(s.response_ids) for s in mini_batch)
        union = sorted(s.prompt_index for r in range(dp) for s in by_rank[r][m].samples)
        assert union == sorted(s.prompt_index for s in mini_batch)  # every sample once, on one rank
        for r in range(dp):
            step = by_rank[r][m]
            mine = step.samples
            assert [seq_len(s) for s in mine] == sorted((seq_len(s) for s in mine), reverse=True)  # longest first
            assert len(step.samples) == per_rank
            assert len(step.student) == len(step.teacher) == -(-per_rank // micro)
            used, computed = step.student_positions
            assert used == sum(seq_len(s) for s in mine)
            assert computed == sum(mb.tokens.numel() for mb in step.student) >= used
            for view, teacher in ((step.student, False), (step.teacher, True)):
                assert {mb.tokens.shape[0] for mb in view} == {micro}
                for k, mb in enumerate(view):
                    rows = step.samples[k * micro:(k + 1) * micro]
                    own = max(seq_len(s, teacher) for s in rows)
                    longest = max(seq_len(s, teacher) for s in mine)
                    assert mb.tokens.shape[1] == (longest if uniform_length else own), (k, teacher)
                # Token counts: the masks hold exactly this rank's response tokens.
                assert sum(int(mb.extras["mask"].sum()) for mb in view) == step.num_response_tokens
                for k, mb in enumerate(view):
                    rows = mb.extras["samples"]
                    assert rows == list(range(k * micro, min((k + 1) * micro, per_rank)))
                    assert torch.equal(mb.position_ids, torch.arange(mb.tokens.shape[1]).expand_as(mb.tokens))
                    for row, index in enumerate(rows):
                        s = step.samples[index]
                        prompt = s.teacher_prompt_ids if teacher else s.prompt_ids
                        response = s.teacher_response_ids if teacher else s.response_ids
                        ref_tokens, ref_labels, ref_mask = _reference_pack([prompt], [response],
                                                                           mb.tokens.shape[1], 1)
                        assert mb.tokens[row].tolist() == ref_tokens[0]
                        assert mb.extras["labels"][row].tolist() == ref_labels[0]
                        assert mb.extras["mask"][row].tolist() == ref_mask[0]
                    for row in range(len(rows), micro):  # filler rows of a short last micro-batch
                        assert not mb.extras["mask"][row].any()


def test_balance_over_ranks_is_near_the_best_equal_count_split():
    """Against the exhaustive optimum of the largest rank load over all equal-count splits (small cases),
    and a preset's shape (a mini-batch of 32 over DP=8, responses of 200-4,096 tokens) against slicing."""
    import itertools
    import random

    from megatron_eopd.trainer.batch import balance_over_ranks

    for seed in range(40):
        rng = random.Random(seed)
        ranks, per_rank = rng.choice([(2, 3), (3, 2), (2, 4)])
        lengths = [rng.randint(1, 100) for _ in range(ranks * per_rank)]
        shares = balance_over_ranks(lengths, ranks, per_rank)
        assert sorted(i for share in shares for i in share) == list(range(len(lengths)))
        assert all(len(share) == per_rank for share in shares)
        assert all([lengths[i] for i in share] == sorted((lengths[i] for i in share), reverse=True) for share in shares)
        best = min(max(sum(lengths[i] for i in order[r * per_rank:(r + 1) * per_rank]) for r in range(ranks))
                   for order in itertools.permutations(range(len(lengths))))
        assert max(sum(lengths[i] for i in share) for share in shares) <= best + max(lengths) / 2, seed
    assert balance_over_ranks([8, 7, 6, 5, 4, 3, 2, 1], 2, 4) == [[0, 3, 4, 7], [1, 2, 5, 6]]  # 18 and 18 tokens
    sliced, dealt = [], []
    for seed in range(50):
        rng = random.Random(seed)
        lengths = [150 + rng.randint(200, 4096) for _ in range(32)]
        mean = sum(lengths) / 8
        sliced.append(max(sum(lengths[r * 4:(r + 1) * 4]) for r in range(8)) / mean)
        dealt.append(max(sum(lengths[i] for i in share) for share in balance_over_ranks(lengths, 8, 4)) / mean)
    assert max(dealt) < 1.1 < sorted(sliced)[len(sliced) // 2], (max(dealt), sorted(sliced)[len(sliced) // 2])
    with pytest.raises(ValueError, match="5 items do not fit 2 ranks of 2"):
        balance_over_ranks([1] * 5, 2, 2)


def test_length_grouped_micro_batches_compute_less_padding():
    """Sorted and padded per micro-batch, a step computes fewer positions than padded to its longest;
    the same samples, tokens and response positions either way."""
    samples = _samples(12, seed=3)
    kwargs = dict(mini_batch_size=12, micro_batch_size=3, dp_rank=0, dp_size=1, pad_id=PAD, device="cpu")
    (own,), (uniform,) = (step_batches(samples, **kwargs, uniform_length=u) for u in (False, True))
    (used, computed_own), (_, computed_uniform) = own.student_positions, uniform.student_positions
    assert used < computed_own < computed_uniform, (used, computed_own, computed_uniform)
    assert [s.prompt_index for s in own.samples] == [s.prompt_index for s in uniform.samples]
    for a, b in zip(own.student, uniform.student):
        width = a.tokens.shape[1]
        assert torch.equal(a.tokens, b.tokens[:, :width]) and not b.extras["mask"][:, width:].any()
        assert torch.equal(a.extras["mask"], b.extras["mask"][:, :width])


# --------------------------------------------------------------------------- the teacher-statistics guard


def _stats(n=6, k=4, **poison):
    from megatron_eopd.objective import TeacherTokenStats

    values = dict(entropy=torch.rand(n), sampled_logprob=-torch.rand(n), topk_ids=torch.arange(n * k).view(n, k),
                  topk_logprobs=-torch.rand(n, k), log_z=torch.rand(n))
    for name, (index, value) in poison.items():
        values[name].view(-1)[index] = value
    return TeacherTokenStats(**values)


def test_teacher_statistics_guard_names_iteration_and_statistic():
    from megatron_eopd.trainer.student import NonFiniteError, check_teacher_outputs
    from megatron_eopd.trainer.teacher import TeacherOutputs

    healthy = [[TeacherOutputs(_stats())], [TeacherOutputs(_stats(topk_logprobs=(3, float("-inf"))))]]
    check_teacher_outputs(healthy, iteration=5)  # -inf is a log-probability; no error
    check_teacher_outputs([], iteration=5)  # a stage that holds no statistics

    cases = [({"entropy": (2, float("nan"))}, "entropy"), ({"sampled_logprob": (0, float("-inf"))}, "sampled_logprob"),
             ({"topk_logprobs": (5, float("nan"))}, "topk_logprobs"), ({"log_z": (1, float("inf"))}, "log_z")]
    for poison, name in cases:
        outputs = healthy + [[TeacherOutputs(_stats()), TeacherOutputs(_stats(**poison))]]
        with pytest.raises(NonFiniteError, match=rf"^iteration 7: non-finite teacher statistics \({name}\)"):
            check_teacher_outputs(outputs, iteration=7)
    logits = torch.zeros(6, 10)
    logits[4, 2] = float("nan")
    with pytest.raises(NonFiniteError, match=r"teacher statistics \(logits\)"):
        check_teacher_outputs([[TeacherOutputs(_stats(), logits)]], iteration=1)


# --------------------------------------------------------------------------- rollouts.py: placement and shards


@pytest.mark.parametrize("world,per_node,engines,tp,expected", [
    (16, 8, 1, 2, [0, 8]),  # one engine per node, vLLM TP 2
    (16, 8, 4, 2, [0, 2, 4, 6, 8, 10, 12, 14]),  # the 4B preset
    (8, 8, 8, 1, [0, 1, 2, 3, 4, 5, 6, 7]),  # the 0.6B / 1.7B presets
    (8, 8, 2, 4, [0, 4]),
    (12, 8, 2, 1, [0, 4, 8]),  # a partial second node: 12 is no rank
    (2, 8, 1, 1, [0]),  # fewer ranks than a node: the node is the ranks there are
    (2, 2, 2, 1, [0, 1]),
    (1, 1, 1, 1, [0]),
    (1, 8, 1, 4, [0]),  # a lone process lends its engine the node's other GPUs
])
def test_engine_host_ranks(world, per_node, engines, tp, expected):
    assert engine_host_ranks(world, per_node, engines, tp) == expected


@pytest.mark.parametrize("world,per_node,engines,tp,message", [
    (16, 8, 3, 1, "engines_per_node=3 does not divide the 8 ranks"),
    (16, 8, 4, 4, "tensor_parallel_size=4 exceeds the 2 GPUs per engine"),
    (4, 8, 8, 1, "engines_per_node=8 does not divide the 4 ranks"),
    (8, 8, 8, 2, "tensor_parallel_size=2 exceeds the 1 GPUs per engine"),  # engines would share GPUs
])
def test_engine_host_ranks_refuses_impossible_placements(world, per_node, engines, tp, message):
    with pytest.raises(ValueError, match=message):
        engine_host_ranks(world, per_node, engines, tp)


def test_ranks_per_node_trusts_local_world_size_only_inside_that_launch(monkeypatch):
    from megatron_eopd.platform import launch_ranks_per_node

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")  # left behind by vLLM's in-process workers, say
    assert launch_ranks_per_node(8, 8) == 8  # a dry run planning another launch
    monkeypatch.setenv("WORLD_SIZE", "16")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert launch_ranks_per_node(16, 8) == 4  # torchrun's word inside the launch
    assert launch_ranks_per_node(8, 8) == 8  # not this launch
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert launch_ranks_per_node(16, 8) == 8


@pytest.mark.parametrize("n,shards,expected", [
    (7, 2, [(0, 4), (4, 7)]),
    (8, 2, [(0, 4), (4, 8)]),
    (8, 3, [(0, 3), (3, 6), (6, 8)]),
    (1, 2, [(0, 1), (1, 1)]),
    (0, 2, [(0, 0), (0, 0)]),
    (128, 8, [(16 * i, 16 * (i + 1)) for i in range(8)]),
])
def test_shard_bounds(n, shards, expected):
    assert shard_bounds(n, shards) == expected


def test_shard_bounds_cover_every_prompt_once():
    for n in range(0, 40):
        for shards in range(1, 9):
            bounds = shard_bounds(n, shards)
            assert len(bounds) == shards and bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))  # contiguous, in order
            sizes = [end - start for start, end in bounds]
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


# --------------------------------------------------------------------------- rollouts.py: the fleet


def _fleet_config(engines_per_node):
    from megatron_eopd.rollout import RolloutConfig, SamplingConfig

    return RolloutConfig(engine="hf", dtype="float32", show_progress=False, max_model_len=256,
                         engines_per_node=engines_per_node,
                         sampling=SamplingConfig(n=2, temperature=1.0, max_tokens=10, seed=FLEET_SEED))


def _fleet_prompts(model_dir, count):
    from transformers import AutoTokenizer

    from megatron_eopd.data import qwen3_templates
    from megatron_eopd.data.synthetic import task_records

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return [tokenizer.encode(qwen3_templates.format_prompt(r.problem, "train"), add_special_tokens=False)
            for r in task_records("train", n=count)]


def _token_ids(results):
    return [[list(s.token_ids) for s in r.samples] for r in results]


def _count_engine_calls(fleet):
    calls = []
    if fleet.engine is not None:
        generate = fleet.engine.generate

        def counting(prompts, sampling=None, **kwargs):
            calls.append(len(prompts))
            return generate(prompts, sampling, **kwargs)

        fleet.engine.generate = counting
    return calls


def _fleet_worker(model_dir: str, out_path: str) -> None:
    """One rank of the two-engine fleet (torchrun, gloo); rank 0 writes what it saw."""
    import dataclasses

    import torch.distributed as dist

    from megatron_eopd.trainer.rollouts import RolloutFleet

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    config = _fleet_config(engines_per_node=2)
    fleet = RolloutFleet(config, Path(model_dir), ranks_per_node=8)  # torchrun's LOCAL_WORLD_SIZE=2 wins
    calls = _count_engine_calls(fleet)
    prompts = _fleet_prompts(model_dir, FLEET_PROMPTS)
    out = {"hosts": fleet.hosts}
    for label, batch, seed in (("seven", prompts, FLEET_SEED), ("one", prompts[:1], FLEET_SEED + 1)):
        sampling = dataclasses.replace(config.sampling, seed=seed)
        mine = _token_ids(fleet.generate(batch, sampling))
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        out[label] = everyone
        if dist.get_rank() == 0:  # the reference: one engine, every prompt in one (uncounted) call
            out[f"{label}_one_engine"] = _token_ids(type(fleet.engine).generate(fleet.engine, batch, sampling).results)
    all_calls = [None] * dist.get_world_size()
    dist.all_gather_object(all_calls, calls)
    out["calls"] = all_calls
    if dist.get_rank() == 0:
        Path(out_path).write_text(json.dumps(out))
    fleet.close()
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def task_student(tmp_path_factory):
    from megatron_eopd.data.synthetic import make_task_model

    return make_task_model(tmp_path_factory.mktemp("fleet") / "student", role="student", seed=5)


def test_one_engine_fleet_is_the_engine(task_student):
    """World size 1: the fleet hosts its engine on rank 0 and returns its results unchanged."""
    from megatron_eopd.trainer.rollouts import RolloutFleet

    config = _fleet_config(engines_per_node=1)
    fleet = RolloutFleet(config, task_student, ranks_per_node=1)
    try:
        assert fleet.hosts == [0] and fleet.engine is not None
        prompts = _fleet_prompts(task_student, 3)
        got = _token_ids(fleet.generate(prompts, config.sampling))
        assert got == _token_ids(fleet.engine.generate(prompts, config.sampling).results)
        assert [len(samples) for samples in got] == [2, 2, 2]
    finally:
        fleet.close()


def test_two_engines_split_and_gather_like_one(task_student, tmp_path):
    """Two ranks, one HF engine each: 7 prompts split 4 + 3, results gathered to both ranks in prompt
    order and identical to one engine sampling all 7 with the same request seeds; 1 prompt leaves
    the second engine idle."""
    out = tmp_path / "fleet.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)  # a fresh two-rank launch, whatever launched pytest
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         __file__, "fleet-worker", str(task_student), str(out)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    seen = json.loads(out.read_text())
    assert seen["hosts"] == [0, 1]
    assert seen["calls"] == [[4, 1], [3]]  # rank 0: prompts 0-3, then the single prompt; rank 1: 4-6, then none
    for label, count in (("seven", FLEET_PROMPTS), ("one", 1)):
        rank0, rank1 = seen[label]
        assert rank0 == rank1  # gathered to every rank
        assert len(rank0) == count and all(len(samples) == 2 for samples in rank0)
        assert rank0 == seen[f"{label}_one_engine"]
    # Not a degenerate comparison: the sampled responses differ between prompts and samples.
    flat = [tuple(s) for samples in seen["seven"][0] for s in samples]
    assert len(set(flat)) > len(flat) // 2


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "fleet-worker":
    _fleet_worker(sys.argv[2], sys.argv[3])


def test_non_finite_gradients_are_seen_in_main_grad_or_grad():
    from megatron_eopd.trainer.student import _non_finite_gradients

    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2))
    assert not _non_finite_gradients([model])  # no gradient yet
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    assert not _non_finite_gradients([model])
    model[1].bias.grad[0] = float("nan")
    assert _non_finite_gradients([model])
    model[1].bias.grad[0] = 0.0
    model[0].weight.main_grad = torch.full_like(model[0].weight, float("inf"))  # Megatron's fp32 buffer wins
    assert _non_finite_gradients([model])
    del model[0].weight.main_grad
    # Finite values whose sum overflows float32 are finite gradients; +inf and -inf that cancel are not.
    model[0].weight.grad = torch.full_like(model[0].weight, 3e38)
    assert torch.isinf(model[0].weight.grad.sum()) and not _non_finite_gradients([model])
    model[0].weight.grad[0, :2] = torch.tensor([float("inf"), float("-inf")])
    assert _non_finite_gradients([model])
    model[0].weight.grad = torch.ones_like(model[0].weight)
    bf16 = torch.nn.Linear(4, 4).to(torch.bfloat16)
    bf16.weight.grad = torch.ones_like(bf16.weight)
    assert not _non_finite_gradients([model, bf16])
    bf16.weight.grad[3, 3] = float("-inf")
    assert _non_finite_gradients([model, bf16])


def test_the_fleet_returns_cached_gpu_memory_before_an_engine_starts_or_wakes(task_student, monkeypatch):
    """The engines are other processes on the trainer's GPUs: what the allocator caches must go back first."""
    from megatron_eopd.platform import distributed as platform_dist
    from megatron_eopd.trainer import rollouts
    from megatron_eopd.trainer.rollouts import RolloutFleet

    events = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: events.append("empty_cache"))
    platform_dist.release_cached_memory(torch.device("cpu"))
    assert events == []  # nothing to return off CUDA
    platform_dist.release_cached_memory(torch.device("cuda", 1))
    assert events == ["empty_cache"]

    events.clear()
    monkeypatch.setattr(rollouts, "release_cached_memory", lambda device: events.append(("release", str(device))))
    fleet = RolloutFleet(_fleet_config(engines_per_node=1), task_student, ranks_per_node=1, device="cpu")
    try:
        assert events == [("release", "cpu")]  # before the engine was created
        engine = fleet.engine
        monkeypatch.setattr(engine, "wake_up", lambda: events.append("wake_up"))
        monkeypatch.setattr(fleet.syncer, "sync", lambda chunks, **options: events.append("sync"))
        fleet.wake_up()
        fleet.sync([])
        assert events[1:] == [("release", "cpu"), "wake_up", ("release", "cpu"), "sync"]
    finally:
        fleet.close()


# --------------------------------------------------------------------------- models.py: the student's optimizer


def test_the_students_adam_runs_fused_and_steps_as_adamw_in_float64(model_parallel, tmp_path):
    """Megatron falls back to torch's AdamW here (no transformer-engine, no apex); the student runs
    torch's fused kernel, and one step moves every parameter as AdamW written out in float64."""
    from megatron_eopd.platform.mcore_compat import torch_adam_optimizers
    from megatron_eopd.testing.tiny_qwen3 import make_tiny_qwen3
    from megatron_eopd.trainer.config import ModelSpec, OptimConfig
    from megatron_eopd.trainer.models import build_student

    hf_dir = make_tiny_qwen3(tmp_path / "student", seed=3, num_layers=2)
    optim = OptimConfig(lr=1e-2, weight_decay=0.1, clip_grad=0.0, lr_schedule="constant")
    student = build_student(ModelSpec(hf_dir=str(hf_dir)), torch.float32, optim, total_steps=4)
    inner = torch_adam_optimizers(student.optimizer)
    assert inner and all(group["fused"] for opt in inner for group in opt.param_groups)
    decay = {id(p): group["weight_decay"] for opt in inner for group in opt.param_groups for p in group["params"]}
    assert sorted(set(decay.values())) == [0.0, 0.1]  # Megatron keeps norms and biases out of the decay

    gen = torch.Generator().manual_seed(0)
    params = [p for chunk in student.chunks for p in chunk.parameters()]
    before = {id(p): p.detach().double().clone() for p in params}
    grads = {id(p): torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params}
    student.optimizer.zero_grad()
    for p in params:
        p.main_grad.copy_(grads[id(p)])  # Megatron's fp32 gradient buffer, as backward leaves it
    student.optimizer.step()

    b1, b2, eps, lr = optim.adam_beta1, optim.adam_beta2, optim.adam_eps, optim.lr
    for p in params:
        g = grads[id(p)]
        m_hat, v_hat = (1 - b1) * g / (1 - b1), (1 - b2) * g * g / (1 - b2)
        expected = before[id(p)] * (1 - lr * decay[id(p)]) - lr * m_hat / (v_hat.sqrt() + eps)
        assert torch.allclose(p.detach().double(), expected, rtol=0, atol=1e-6), p.shape
