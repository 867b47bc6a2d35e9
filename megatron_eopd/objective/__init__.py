"""The EOPD objective on vocabulary-sharded logits: pure math (torch and torch.distributed only).

- :mod:`.vocab_parallel`: exact full-vocabulary statistics of TP-sharded logits (log Z, log-probs
  at global ids, entropy, forward/reverse KL, top-k) with custom autograd functions.
- :mod:`.teacher_stats`: the compact per-token teacher statistics the loss consumes.
- :mod:`.eopd_loss`: the loss, its config and its diagnostics.
- :mod:`.fused_head`: the output layer fused with the loss and the teacher statistics (from final
  hidden states and the output weight, block by block, without the full logits).
"""

from .eopd_loss import EOPDLossConfig, entropy_gate, eopd_loss, eopd_loss_from_hidden
from .teacher_stats import TeacherTokenStats, compute_teacher_stats, compute_teacher_stats_from_hidden
from .vocab_parallel import vocab_parallel_entropy, vocab_parallel_kl, vocab_parallel_logprobs, vocab_parallel_topk

# The loss and the teacher statistics (what the README shows) and the vocab-parallel primitives
# users call on their own logits; building blocks stay in their modules.
__all__ = [
    "EOPDLossConfig",
    "entropy_gate",
    "eopd_loss",
    "eopd_loss_from_hidden",
    "TeacherTokenStats",
    "compute_teacher_stats",
    "compute_teacher_stats_from_hidden",
    "vocab_parallel_entropy",
    "vocab_parallel_kl",
    "vocab_parallel_logprobs",
    "vocab_parallel_topk",
]
