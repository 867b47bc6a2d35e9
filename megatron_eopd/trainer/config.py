"""The trainer's root config: the components' own configs (loss, rollout) plus the run's sections.

One typed tree, built from defaults <- a YAML preset (``megatron_eopd/configs/NAME.yaml`` or a path)
<- dotted command-line overrides (``loss.tau=1.0``), by :func:`load_train_config`.  Everything that
can be checked without weights, data or GPUs is checked here (:func:`plan_layout`), so a bad key, a
wrong type or an impossible layout stops the run before anything starts.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal, Optional

from megatron_eopd.config import ConfigError, build_config
from megatron_eopd.models.qwen3 import QWEN3_PRESETS, Qwen3Arch, padded_vocab_size, parse_hf_config, validate_parallelism
from megatron_eopd.models.qwen3.model import RECOMPUTE_FULL, RECOMPUTE_MODES
from megatron_eopd.objective import EOPDLossConfig
from megatron_eopd.objective.fused_head import DEFAULT_BLOCK_ELEMENTS
from megatron_eopd.platform import launch_ranks_per_node
from megatron_eopd.rollout import RolloutConfig
from megatron_eopd.trainer.rollouts import engine_host_ranks

GPU_MEMORY_GIB = 80  # the memory plan is for 80 GB GPUs (A100/H100)
PRESET_DIR = Path(__file__).resolve().parent.parent / "configs"
PromptStyle = Literal["chat", "chat_non_thinking", "plain"]


@dataclass
class ModelSpec:
    """A model: its HF directory (architecture, tokenizer, initial weights) and optional Megatron checkpoint.

    ``checkpoint``: a directory written by ``tools/convert_hf_to_mcore.py`` (or a trainer's export),
    loaded instead of the HF safetensors (faster at scale; reshards to any TP/PP).  ``arch``: a Qwen3
    preset name (``Qwen3-4B`` ...) that stands in for the HF config where it is not at hand, e.g.
    in a dry run on a laptop.  ``prompt_style``: how this model reads a problem (``chat``: ChatML
    user turn; ``chat_non_thinking``: plus Qwen3's empty think block, the paper's teacher; ``plain``).
    """

    hf_dir: str = ""
    checkpoint: Optional[str] = None
    arch: Optional[str] = None
    prompt_style: PromptStyle = "chat"

    def __post_init__(self):
        if self.arch is not None and self.arch not in QWEN3_PRESETS:
            raise ValueError(f"arch {self.arch!r} is not a Qwen3 preset; known: {sorted(QWEN3_PRESETS)}")

    def architecture(self, what: str) -> Qwen3Arch:
        """The architecture from the HF config when present, else the ``arch`` preset."""
        if self.hf_dir and (Path(self.hf_dir) / "config.json").is_file():
            return parse_hf_config(self.hf_dir)
        if self.arch is not None:
            return QWEN3_PRESETS[self.arch]
        raise ConfigError(
            f"{what}.hf_dir={self.hf_dir!r} holds no config.json and {what}.arch is not set: point it at a "
            f"Hugging Face Qwen3 directory, or name a preset architecture for a dry run ({what}.arch=Qwen3-1.7B); "
            "the tiny_cpu preset's models are made by `python tools/run_tiny.py --prepare-only` (or `make run`)")


@dataclass
class ParallelConfig:
    """Model parallelism; data parallelism is what the world size leaves (world / (TP * PP))."""

    tensor: int = 1
    pipeline: int = 1
    gpus_per_node: int = 8  # for engine placement and dry runs; torchrun's LOCAL_WORLD_SIZE wins when set
    nodes: int = 1  # the nodes a preset is planned for: a dry run's default world; a launch's comes from torchrun

    def __post_init__(self):
        if self.tensor < 1 or self.pipeline < 1 or self.gpus_per_node < 1 or self.nodes < 1:
            raise ValueError(f"parallel sizes must be >= 1, got {self}")

    @property
    def planned_world_size(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass
class DataConfig:
    """Training prompts: a JSONL file, a Hugging Face dataset (hub name or local path) or ``synthetic:arith``."""

    source: str = "synthetic:arith"
    split: str = "train"
    problem_key: str = "problem"
    answer_key: str = "answer"
    id_key: str = "id"
    max_prompt_tokens: int = 1024
    limit: Optional[int] = None

    def __post_init__(self):
        if not self.source:
            raise ValueError("data.source is empty")
        if self.max_prompt_tokens < 1:
            raise ValueError(f"data.max_prompt_tokens must be >= 1, got {self.max_prompt_tokens}")


@dataclass
class TrainConfig:
    """One iteration: ``prompts_per_iteration`` prompts x ``rollout.sampling.n`` responses, split into
    mini-batches of ``mini_batch_size`` responses (one optimizer step each), each accumulated over
    micro-batches of ``micro_batch_size`` sequences per data-parallel rank.

    ``mode``: ``eopd`` distils from the teacher; ``sft`` trains the model on reference solutions
    (the synthetic task provides them), e.g. to make the tiny demo's teacher.
    ``iterations``: None = ``epochs`` passes over the prompts.  ``sft_end_token`` ends each reference
    solution in SFT mode (``<|im_end|>`` for a chat model, ``<|endoftext|>`` for a base model).
    ``fused_output_layer``: the student's and the teacher's output layers run inside the loss and
    the teacher statistics, over blocks of response tokens, so no [tokens, V/TP] logits (nor their
    gradient) exist; the losses are those of the logits up to matmul rounding.  The full-vocabulary
    loss options (``loss.fkl_mode=full``, ``loss.rkl_mode=analytic``) always use the logits.
    ``recompute``: the student's activation recomputation; ``full`` keeps only each transformer
    layer's input for backward and runs the layer again there (Megatron's full granularity, one
    layer at a time): the same gradients for about a third more student compute, and room for
    longer responses or a larger micro-batch.
    """

    mode: Literal["eopd", "sft"] = "eopd"
    iterations: Optional[int] = None
    epochs: int = 1
    prompts_per_iteration: int = 128
    mini_batch_size: int = 32
    micro_batch_size: int = 1
    seed: int = 1234
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    sft_end_token: str = "<|im_end|>"
    fused_output_layer: bool = True
    recompute: Literal[RECOMPUTE_MODES] = "none"  # the tuple of modes is the literal's values

    def __post_init__(self):
        for name in ("epochs", "prompts_per_iteration", "mini_batch_size", "micro_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.iterations is not None and self.iterations < 1:
            raise ValueError(f"train.iterations must be >= 1 (or null for whole epochs), got {self.iterations}")


@dataclass
class OptimConfig:
    """AdamW with a cosine schedule and no warm-up by default (the paper's)."""

    lr: float = 3e-6
    min_lr: float = 0.0
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    lr_schedule: Literal["cosine", "constant", "linear"] = "cosine"
    warmup_steps: int = 0

    def __post_init__(self):
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr):
            raise ValueError(f"optim needs lr > 0 and 0 <= min_lr <= lr, got lr={self.lr} min_lr={self.min_lr}")
        if self.warmup_steps < 0 or self.clip_grad < 0:
            raise ValueError("optim.warmup_steps and optim.clip_grad must be >= 0")


@dataclass
class CheckpointConfig:
    """Save every ``save_interval`` iterations and at the end; keep the newest ``keep_last``."""

    save_interval: int = 20
    keep_last: int = 2
    export_final_hf: bool = True

    def __post_init__(self):
        if self.save_interval < 1 or self.keep_last < 1:
            raise ValueError("checkpoint.save_interval and checkpoint.keep_last must be >= 1")


@dataclass
class LoggingConfig:
    """What a run reports as it goes, besides ``metrics.jsonl``.

    ``save_rollouts``: rank 0 writes every iteration's samples to ``rollouts/iter_NNNNNNN.jsonl`` in
    the run directory (token ids, the engine's log-probs, the teacher's view, the grade), enough to
    recompute the iteration's loss outside the trainer (README, "Saved rollouts").
    """

    tensorboard: bool = True
    progress: bool = True  # rank 0's progress bar and summary lines
    # A summary line every N iterations and after the last; None: a tenth of the run; 0: none (the bar only).
    summary_every: Optional[int] = None
    save_rollouts: bool = False

    def __post_init__(self):
        if self.summary_every is not None and self.summary_every < 0:
            raise ValueError(f"logging.summary_every must be >= 0 (or null for a tenth of the run), "
                             f"got {self.summary_every}")

    def summary_interval(self, iterations: int) -> int:
        """Iterations between summary lines (0: no summary lines)."""
        return max(1, iterations // 10) if self.summary_every is None else self.summary_every


@dataclass
class EvalConfig:
    """Benchmark evaluation during training, with the rollout engines right after the weight sync.

    Off by default (``every: 0``).  Every ``every`` iterations, and after the last one, the student
    samples ``n`` answers (``temperature``, ``top_p``; ``max_tokens`` None = ``rollout.sampling.max_tokens``)
    to the first ``limit`` problems of each benchmark in ``data_dir`` (``<name>.jsonl``), prompted with
    the paper's zero-shot ``\\boxed{}`` instruction in ``student.prompt_style``.  Rank 0 grades them;
    ``eval/<benchmark>/avg@n``, ``eval/<benchmark>/pass@k`` and ``eval/mean/...`` join that
    iteration's metrics.  The same ``seed`` every time, so successive evaluations differ by the weights.
    """

    every: int = 0
    benchmarks: list[str] = field(default_factory=lambda: [
        "math500", "amc23", "minerva_math", "olympiadbench", "aime24", "aime25"])
    data_dir: str = "data/math"
    limit: Optional[int] = None
    n: int = 8
    temperature: float = 1.0
    top_p: float = 0.8
    max_tokens: Optional[int] = None
    seed: int = 0
    grading_timeout: float = 5.0

    def __post_init__(self):
        if self.every < 0 or self.n < 1 or self.seed < 0:
            raise ValueError(f"eval.every must be >= 0, eval.n >= 1 and eval.seed >= 0; got {self.every}, "
                             f"{self.n}, {self.seed}")
        if self.every and not self.benchmarks:
            raise ValueError("eval.benchmarks is empty")
        if any(v is not None and v < 1 for v in (self.limit, self.max_tokens)):
            raise ValueError("eval.limit and eval.max_tokens must be >= 1 (or null)")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or not self.grading_timeout > 0:
            raise ValueError(f"eval needs temperature >= 0, 0 < top_p <= 1 and grading_timeout > 0; got "
                             f"{self.temperature}, {self.top_p}, {self.grading_timeout}")


@dataclass
class RunConfig:
    dir: str = "runs/eopd"
    device: Literal["auto", "cpu", "cuda"] = "auto"


@dataclass
class EOPDTrainConfig:
    """The whole run.  ``rollout.sampling.n`` is the number of responses per prompt."""

    run: RunConfig = field(default_factory=RunConfig)
    student: ModelSpec = field(default_factory=ModelSpec)
    teacher: ModelSpec = field(default_factory=lambda: ModelSpec(prompt_style="chat_non_thinking"))
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: EOPDLossConfig = field(default_factory=EOPDLossConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def fused_head(self) -> bool:
        """Whether the output layers run inside the loss: ``train.fused_output_layer``, unless the
        loss reads the teacher's full logits (``loss.fkl_mode=full`` / ``loss.rkl_mode=analytic``)."""
        return self.train.fused_output_layer and not self.loss.needs_teacher_logits


def preset_path(name_or_path: str) -> Path:
    """A preset name (``eopd_qwen3_4b``) or a YAML path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        return path
    candidate = PRESET_DIR / f"{name_or_path}.yaml"
    if not candidate.is_file():
        known = sorted(p.stem for p in PRESET_DIR.glob("*.yaml") if not p.stem.startswith("_"))
        raise ConfigError(f"unknown config preset {name_or_path!r}; known presets: {', '.join(known)}")
    return candidate


def load_train_config(name_or_path: str, overrides: Iterable[str] = ()) -> EOPDTrainConfig:
    return build_config(EOPDTrainConfig, preset_path(name_or_path), overrides)


# --------------------------------------------------------------------------- the parallel layout


@dataclass(frozen=True)
class Layout:
    """What a run does per iteration on a given world size, and roughly what it needs per GPU."""

    world_size: int
    tensor_parallel: int
    pipeline_parallel: int
    data_parallel: int
    nodes: int
    rollout_engines: int
    rollout_engine_gpus: list[str]  # each engine's local GPU indices ("2,3"), the same on every node
    responses_per_iteration: int
    optimizer_steps_per_iteration: int
    micro_batches_per_step: int
    iterations: Optional[int]
    memory_gib: dict

    def describe(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "memory_gib"}
        if self.iterations is None:
            out["iterations"] = "train.epochs x (prompts // train.prompts_per_iteration), counted when the data loads"
        out["expected_memory_per_gpu_gib"] = self.memory_gib
        return out


def plan_layout(config: EOPDTrainConfig, world_size: int, *, num_prompts: Optional[int] = None) -> Layout:
    """Check the layout for ``world_size`` ranks; :class:`ConfigError` names the first impossibility."""
    tp, pp = config.parallel.tensor, config.parallel.pipeline
    if world_size < 1:
        raise ConfigError(f"world size must be >= 1, got {world_size}")
    if world_size % (tp * pp):
        raise ConfigError(
            f"world size {world_size} is not divisible by parallel.tensor * parallel.pipeline = {tp} * {pp}"
        )
    dp = world_size // (tp * pp)
    student = config.student.architecture("student")
    try:
        validate_parallelism(student, tp, pp, padded_vocab_size(student.vocab_size, tp))
    except ValueError as exc:
        raise ConfigError(f"student at parallel.tensor={tp}, parallel.pipeline={pp}: {exc}") from exc
    teacher = None
    if config.train.mode == "eopd":
        teacher = config.teacher.architecture("teacher")
        try:
            validate_parallelism(teacher, tp, pp, padded_vocab_size(teacher.vocab_size, tp))
        except ValueError as exc:
            raise ConfigError(f"teacher at parallel.tensor={tp}, parallel.pipeline={pp}: {exc}") from exc
        if teacher.vocab_size != student.vocab_size:
            raise ConfigError(
                f"teacher vocabulary ({teacher.vocab_size}) differs from the student's ({student.vocab_size}):"
                " the loss compares distributions token by token, so both must use one tokenizer"
            )
    train = config.train
    responses = train.prompts_per_iteration * config.rollout.sampling.n
    if responses % train.mini_batch_size:
        raise ConfigError(
            f"train.prompts_per_iteration * rollout.sampling.n = {responses} responses do not split into "
            f"mini-batches of train.mini_batch_size = {train.mini_batch_size}"
        )
    if train.mini_batch_size % (dp * train.micro_batch_size):
        raise ConfigError(
            f"train.mini_batch_size = {train.mini_batch_size} is not a multiple of data-parallel size {dp} x "
            f"train.micro_batch_size = {train.micro_batch_size}"
        )
    if config.eval.every and config.train.mode != "eopd":
        raise ConfigError("eval.every > 0 samples with the rollout engines; only train.mode=eopd starts them")
    iterations = train.iterations
    if iterations is None and num_prompts is not None:
        iterations = max(1, train.epochs * (num_prompts // train.prompts_per_iteration))
    if iterations is not None and config.optim.warmup_steps >= iterations * (responses // train.mini_batch_size):
        raise ConfigError(
            f"optim.warmup_steps = {config.optim.warmup_steps} must be below the run's "
            f"{iterations * (responses // train.mini_batch_size)} optimizer steps (iterations x mini-batches)"
        )
    nodes = max(1, math.ceil(world_size / config.parallel.gpus_per_node))
    engines, engine_gpus = 0, []
    if config.train.mode == "eopd":
        # The fleet's own placement (inside a torchrun launch its LOCAL_WORLD_SIZE wins over
        # parallel.gpus_per_node, as there), so a layout the engines cannot take fails here and not
        # after the models are built.
        ranks_per_node = launch_ranks_per_node(world_size, config.parallel.gpus_per_node)
        engine_tp = config.rollout.tensor_parallel_size
        try:
            hosts = engine_host_ranks(world_size, ranks_per_node, config.rollout.engines_per_node, engine_tp)
        except ValueError as exc:
            raise ConfigError(f"rollout engines at world size {world_size}: {exc}") from exc
        engines = len(hosts)
        # An engine takes its host rank's GPU and the TP - 1 after it (rollout/vllm_engine.py).
        engine_gpus = [",".join(str(g) for g in range(host, host + engine_tp)) for host in hosts if host < ranks_per_node]
    return Layout(
        world_size=world_size,
        tensor_parallel=tp,
        pipeline_parallel=pp,
        data_parallel=dp,
        nodes=nodes,
        rollout_engines=engines,
        rollout_engine_gpus=engine_gpus,
        responses_per_iteration=responses,
        optimizer_steps_per_iteration=responses // train.mini_batch_size,
        micro_batches_per_step=train.mini_batch_size // (dp * train.micro_batch_size),
        iterations=iterations,
        memory_gib=estimate_memory_gib(config, student, teacher, tp, pp, dp),
    )


def _student_activation_bytes(recompute: str, student: Qwen3Arch, tokens: int, tp: int, pp: int) -> float:
    layer = 34 * student.hidden_size * tokens / tp  # everything one layer keeps for backward
    layers = student.num_layers / pp
    if recompute == RECOMPUTE_FULL:
        return 2 * student.hidden_size * tokens * layers + layer
    return layer * layers


def estimate_memory_gib(config: EOPDTrainConfig, student: Qwen3Arch, teacher: Optional[Qwen3Arch],
                        tp: int, pp: int, dp: int) -> dict:
    """A per-GPU memory plan in GiB (an estimate from sizes, not a measurement).

    Student: bf16 weights (2 B/param) and fp32 gradient buffer (4 B) per model-parallel shard, plus
    fp32 master weights and two Adam moments (12 B), sharded over DP by the distributed optimizer.
    Teacher: bf16 weights only.  Activations: about 34 bytes x hidden per token per layer for a
    micro-batch held by one stage; with ``train.recompute=full`` the stage keeps each layer's bf16
    input (2 bytes x hidden per token, replicated over TP) and one layer's activations live at a time.
    The loss: the bf16 logits shard and its gradient for the micro-batch; with the output layer fused
    into the loss (the default) one block of them with an fp32 working copy, plus the fp32
    accumulator of the output weight's gradient.  The rollout engine's share is
    ``rollout.gpu_memory_utilization`` of an 80 GB GPU while it is awake (during sampling, next to
    the resident weights and optimizer states); asleep it holds none.
    """
    gib = 1024**3
    shard = tp * pp
    sequence = config.data.max_prompt_tokens + config.rollout.sampling.max_tokens
    tokens = config.train.micro_batch_size * sequence
    student_params = student.total_parameters() / shard
    out = {
        "student_weights_and_grads": student_params * (2 + 4) / gib,
        "optimizer_states": student_params * 12 / max(dp, 1) / gib,
        "student_activations": _student_activation_bytes(config.train.recompute, student, tokens, tp, pp) / gib,
    }
    if teacher is not None:
        out["teacher_weights"] = teacher.total_parameters() / shard * 2 / gib
        out["teacher_activations"] = 4 * teacher.hidden_size * tokens / tp / gib  # forward only: one layer live
    vocab_shard = padded_vocab_size(student.vocab_size, tp) // tp
    if config.fused_head:
        block = min(tokens, max(1, DEFAULT_BLOCK_ELEMENTS["cuda"] // vocab_shard)) * vocab_shard
        out["output_layer_blocks"] = (block * (2 + 2 + 4) + vocab_shard * student.hidden_size * 4) / gib
    else:
        out["logits_shards"] = 2 * tokens * vocab_shard * 2 / gib
    resident = sum(v for k, v in out.items() if "weights" in k or "optimizer" in k)
    out["peak_while_training"] = sum(out.values())  # the engine sleeps: it holds no GPU memory
    engine = (config.rollout.gpu_memory_utilization or 0.85) * GPU_MEMORY_GIB
    out["peak_while_sampling"] = resident + engine  # models resident, engine awake with its KV cache
    return {k: round(v, 2) for k, v in out.items()}
