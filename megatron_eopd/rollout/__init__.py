"""Student rollouts (vLLM, or a Hugging Face fallback), weight sync from Megatron, and the parity probe.

The engine modules import vLLM / transformers lazily: importing this package is cheap.
"""

from megatron_eopd.rollout.engine import (
    ParityProbeConfig,
    RolloutBatch,
    RolloutConfig,
    RolloutEngine,
    RolloutEngineError,
    RolloutEngineUnavailableError,
    RolloutResult,
    RolloutSample,
    SamplingConfig,
    create_rollout_engine,
)
from megatron_eopd.rollout.parity import ParityProbeError, ParityReport
from megatron_eopd.rollout.weight_sync import SyncReport, WeightSyncer, WeightSyncError

# Engines, their settings and results, and the weight sync with its probe's report; the probe's
# building blocks (probe sequences, per-route log-probs, comparisons) stay in .parity.
__all__ = [
    "ParityProbeConfig",
    "ParityProbeError",
    "ParityReport",
    "RolloutBatch",
    "RolloutConfig",
    "RolloutEngine",
    "RolloutEngineError",
    "RolloutEngineUnavailableError",
    "RolloutResult",
    "RolloutSample",
    "SamplingConfig",
    "SyncReport",
    "WeightSyncError",
    "WeightSyncer",
    "create_rollout_engine",
]
