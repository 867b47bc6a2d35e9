"""The EOPD objective on vocabulary-sharded logits: pure math (torch and torch.distributed only).

- :mod:`.vocab_parallel`: exact full-vocabulary statistics of TP-sharded logits (log Z, log-probs
  at global ids, entropy, forward/reverse KL, top-k) with custom autograd functions.
- :mod:`.teacher_stats`: the compact per-token teacher statistics the loss consumes.
- :mod:`.eopd_loss`: the loss, its config and its diagnostics.
"""

from .eopd_loss import FKL_MODES, GATES, RKL_MODES, EOPDLossConfig, entropy_gate, eopd_loss
from .teacher_stats import TeacherTokenStats, compute_teacher_stats
from .vocab_parallel import (
    DistributionSummary,
    LogSoftmaxStats,
    TokenTerms,
    VocabShard,
    vocab_parallel_entropy,
    vocab_parallel_kl,
    vocab_parallel_log_softmax_stats,
    vocab_parallel_logprobs,
    vocab_parallel_summary,
    vocab_parallel_token_terms,
    vocab_parallel_topk,
)

__all__ = [
    "EOPDLossConfig",
    "FKL_MODES",
    "GATES",
    "RKL_MODES",
    "entropy_gate",
    "eopd_loss",
    "TeacherTokenStats",
    "compute_teacher_stats",
    "DistributionSummary",
    "LogSoftmaxStats",
    "TokenTerms",
    "VocabShard",
    "vocab_parallel_entropy",
    "vocab_parallel_kl",
    "vocab_parallel_log_softmax_stats",
    "vocab_parallel_logprobs",
    "vocab_parallel_summary",
    "vocab_parallel_token_terms",
    "vocab_parallel_topk",
]
