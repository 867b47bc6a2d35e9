"""Student rollouts (vLLM, or a Hugging Face fallback), weight sync from Megatron, and the parity probe.

The engine modules import vLLM / transformers lazily: importing this package is cheap.
"""

from megatron_eopd.rollout.engine import (
    ParityProbeConfig,
    RolloutBatch,
    RolloutConfig,
    RolloutEngine,
    RolloutEngineUnavailableError,
    RolloutResult,
    RolloutSample,
    SamplingSettings,
    WeightLoadReport,
    create_rollout_engine,
    vllm_importable,
)
from megatron_eopd.rollout.parity import (
    ParityProbeError,
    ParityReport,
    check_parity,
    compare_logprobs,
    hf_sequence_logprobs,
    megatron_sequence_logprobs,
    probe_sequences,
)
from megatron_eopd.rollout.weight_sync import SyncReport, WeightSyncer, WeightSyncError

__all__ = [
    "ParityProbeConfig",
    "ParityProbeError",
    "ParityReport",
    "RolloutBatch",
    "RolloutConfig",
    "RolloutEngine",
    "RolloutEngineUnavailableError",
    "RolloutResult",
    "RolloutSample",
    "SamplingSettings",
    "SyncReport",
    "WeightLoadReport",
    "WeightSyncError",
    "WeightSyncer",
    "check_parity",
    "compare_logprobs",
    "create_rollout_engine",
    "hf_sequence_logprobs",
    "megatron_sequence_logprobs",
    "probe_sequences",
    "vllm_importable",
]
