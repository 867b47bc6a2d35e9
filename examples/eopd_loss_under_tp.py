"""The EOPD loss on vocab-sharded logits, next to the same loss on full logits.

    torchrun --nproc_per_node 2 examples/eopd_loss_under_tp.py --tp 2    # CPU/gloo or GPU/NCCL

Every rank builds the same random teacher and student logits, keeps only its vocabulary shard, and
computes the teacher statistics and the loss with the TP group.  Rank 0 then recomputes both on
the full logits without any group and prints the two side by side: they agree to rounding, and
each rank's gradient is exactly its columns of the full gradient.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist

from megatron_eopd.objective import EOPDLossConfig, compute_teacher_stats, eopd_loss
from megatron_eopd.platform import init_distributed, init_model_parallel, shutdown


def make_inputs(tokens: int, vocab: int, seed: int, device: torch.device) -> dict[str, torch.Tensor]:
    """The same random inputs on every rank, every tensor on ``device`` (the collectives' device:
    NCCL reduces CUDA tensors only).  Drawn from a CPU generator so all devices see the same values."""
    gen = torch.Generator().manual_seed(seed)
    # Peaked and flat rows alike, so some tokens pass the entropy gate and some do not.
    scale = torch.rand(tokens, 1, generator=gen) * 20
    teacher = torch.randn(tokens, vocab, generator=gen) * scale
    student = torch.randn(tokens, vocab, generator=gen) * scale
    sampled = torch.randint(0, vocab, (tokens,), generator=gen)
    mask = torch.rand(tokens, generator=gen) > 0.1
    # The rollout policy differs a little from the current one, so the PPO clip is active on some tokens.
    drift = torch.randn(tokens, generator=gen) * 0.3
    old_logprobs = torch.log_softmax(student, -1).gather(1, sampled[:, None]).squeeze(1) + drift
    inputs = {"teacher_logits": teacher, "student_logits": student, "sampled": sampled, "mask": mask,
              "old_logprobs": old_logprobs}
    return {name: t.to(device) for name, t in inputs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--tau", type=float, default=0.8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    platform = init_distributed()
    init_model_parallel(tensor_parallel=args.tp)
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    if args.vocab % args.tp:
        raise SystemExit(f"--vocab {args.vocab} must be divisible by --tp {args.tp}")

    inputs = make_inputs(args.tokens, args.vocab, args.seed, platform.device)
    teacher_full, student_full = inputs["teacher_logits"], inputs["student_logits"]
    sampled, mask, old_logprobs = inputs["sampled"], inputs["mask"], inputs["old_logprobs"]
    config = EOPDLossConfig(tau=args.tau)

    def loss_on(teacher_logits, student_logits, tp_group):
        stats = compute_teacher_stats(teacher_logits, sampled, tp_group, topk=config.topk, response_mask=mask)
        student_logits = student_logits.detach().clone().requires_grad_(True)  # this rank's own leaf
        loss, metrics = eopd_loss(
            student_logits, sampled, mask, stats, old_logprobs=old_logprobs, config=config, group=tp_group
        )
        loss.backward()
        return loss.detach(), metrics, student_logits.grad

    shard = args.vocab // args.tp
    columns = slice(tp_rank * shard, (tp_rank + 1) * shard)
    loss, metrics, grad = loss_on(teacher_full[:, columns], student_full[:, columns], group)

    dense_loss, dense_metrics, dense_grad = loss_on(teacher_full, student_full, None)
    grad_error = (grad - dense_grad[:, columns]).abs().max()
    dist.all_reduce(grad_error, op=dist.ReduceOp.MAX)
    if platform.rank == 0:
        print(f"{'quantity':<18}{'TP=' + str(args.tp):>14}{'full logits':>14}")
        print(f"{'loss':<18}{loss.item():>14.8f}{dense_loss.item():>14.8f}")
        for key in ("teacher_entropy", "student_entropy", "gate_fraction", "fkl_gated", "rkl_estimate",
                    "clip_fraction"):
            print(f"{key:<18}{metrics[key].item():>14.8f}{dense_metrics[key].item():>14.8f}")
        print(f"max |loss difference| {abs(loss - dense_loss).item():.3e}")
        print(f"max |gradient difference| over all shards {grad_error.item():.3e}")
    shutdown()


if __name__ == "__main__":
    main()
