"""Everything a run holds, checked and built before the first iteration (:func:`open_session`).

Checks come first and cost nothing heavy: model directories, tokenizers (the teacher must read
the student's tokens), the data, the layout.  Only then are process groups, models, engines and
the run directory touched.  A resumed run (``--resume``, or a run directory holding a checkpoint)
restores weights, optimizer, schedule, RNGs and the prompt-stream position.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import yaml

from megatron_eopd import console
from megatron_eopd.config import ConfigError, to_dict
from megatron_eopd.data import PromptRecord, PromptStream, load_prompt_records, qwen3_templates
from megatron_eopd.models.qwen3 import check_teacher_student_compatible
from megatron_eopd.platform import Platform, init_distributed, init_model_parallel, launch_world_size
from megatron_eopd.platform.mcore_compat import describe_accelerators
from megatron_eopd.trainer.config import EOPDTrainConfig, Layout, ModelSpec, plan_layout
from megatron_eopd.trainer.metrics import MetricsLog
from megatron_eopd.trainer.models import build_student, build_teacher, run_dtype
from megatron_eopd.trainer.rollouts import RolloutFleet
from megatron_eopd.trainer.saved_rollouts import RolloutLog
from megatron_eopd.trainer.state import RunState, clean_partial_writes, latest_checkpoint, load_checkpoint
from megatron_eopd.trainer.student import Optimization


@dataclass
class Session:
    config: EOPDTrainConfig
    platform: Platform
    layout: Layout
    run_dir: Path
    tokenizer: Any
    special: qwen3_templates.Qwen3SpecialIds
    teacher_encode: Any
    stream: PromptStream
    student: Optimization
    teacher: Optional[list]
    fleet: Optional[RolloutFleet]
    log: MetricsLog
    state: RunState
    iterations: int
    vocab_size: int
    rollouts: Optional[RolloutLog] = None  # logging.save_rollouts
    # The engines loaded the files the student was loaded from, in the student's dtype: they already
    # hold its weights (a fresh start from student.hf_dir), so the first sync only probes.
    engines_hold_student: bool = False
    extras: dict = field(default_factory=dict)

    @property
    def config_dict(self) -> dict:
        return to_dict(self.config)

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def close(self) -> None:
        self.log.close()
        if self.fleet is not None:
            self.fleet.close()


def _check_model_dir(spec: ModelSpec, what: str) -> None:
    hf_dir = Path(spec.hf_dir) if spec.hf_dir else None
    if hf_dir is None or not (hf_dir / "config.json").is_file():
        raise ConfigError(f"{what}.hf_dir={spec.hf_dir!r} is not a Hugging Face model directory (no config.json)")
    if spec.checkpoint:
        if not (Path(spec.checkpoint) / "eopd_checkpoint.json").is_file():
            raise ConfigError(f"{what}.checkpoint={spec.checkpoint!r} is not a megatron-eopd checkpoint")
    elif not any(hf_dir.glob("*.safetensors")):
        raise ConfigError(f"{what}.hf_dir={spec.hf_dir!r} holds no *.safetensors weights")


def _token_count(config: EOPDTrainConfig, tokenizer) -> int:
    """The ids the objective and the teacher statistics range over: the tokenizer's, not the output
    layer's padded rows (Qwen3: 151,669 of 151,936), which the rollout engines never sample."""
    return min(len(tokenizer), config.student.architecture("student").vocab_size)


def load_tokenizer(hf_dir: str, what: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(hf_dir)
    except Exception as exc:  # noqa: BLE001 - any failure here is a bad model directory
        raise ConfigError(f"{what}.hf_dir={hf_dir!r}: the tokenizer does not load ({type(exc).__name__}: {exc})") from exc


def _check_same_tokenizer(student_tok, teacher_tok, student: ModelSpec, teacher: ModelSpec) -> None:
    if student_tok.get_vocab() != teacher_tok.get_vocab():
        raise ConfigError(
            f"teacher tokenizer ({teacher.hf_dir}, {len(teacher_tok)} tokens) differs from the student's "
            f"({student.hf_dir}, {len(student_tok)} tokens): the teacher must score the student's exact token ids"
        )


def prompt_encoder(tokenizer, style: str, purpose: str = "train"):
    """problem text -> prompt token ids, in the model's prompt style."""
    def encode(problem: str) -> list[int]:
        if style == "chat_non_thinking":
            text = qwen3_templates.format_teacher_prompt(problem, purpose, non_thinking=True)
        else:
            text = qwen3_templates.format_prompt(problem, purpose, chat=style == "chat")
        return tokenizer.encode(text, add_special_tokens=False)

    return encode


def check_inputs(config: EOPDTrainConfig) -> tuple[list[PromptRecord], Any, Any]:
    """Every check that needs files but no process group; raises :class:`ConfigError`.
    Returns the prompts and the student's and (eopd) the teacher's tokenizers, loaded once: at
    Qwen3's vocabulary each load costs a second or two."""
    from megatron_eopd.data import DataError

    _check_model_dir(config.student, "student")
    student_tok = load_tokenizer(config.student.hf_dir, "student")
    teacher_tok = None
    if config.train.mode == "eopd":
        _check_model_dir(config.teacher, "teacher")
        teacher_tok = load_tokenizer(config.teacher.hf_dir, "teacher")
        try:
            check_teacher_student_compatible(config.student.hf_dir, config.teacher.hf_dir)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        _check_same_tokenizer(student_tok, teacher_tok, config.student, config.teacher)
    elif not config.data.source.startswith("synthetic:"):
        raise ConfigError(f"train.mode=sft needs reference solutions; data.source={config.data.source!r} has none "
                          "(use synthetic:arith)")
    try:
        qwen3_templates.special_token_ids(student_tok)  # a Qwen-family tokenizer, or a clear error
        records = load_prompt_records(config.data.source, split=config.data.split, problem_key=config.data.problem_key,
                                      answer_key=config.data.answer_key, id_key=config.data.id_key,
                                      limit=config.data.limit)
    except (DataError, ValueError) as exc:
        raise ConfigError(str(exc)) from exc
    return records, student_tok, teacher_tok


def open_session(config: EOPDTrainConfig, *, resume: bool = False) -> Session:
    records, tokenizer, teacher_tokenizer = check_inputs(config)
    stream = PromptStream(records, prompt_encoder(tokenizer, config.student.prompt_style),
                          max_prompt_tokens=config.data.max_prompt_tokens, seed=config.train.seed)
    # The layout and the schedule (warm-up within the run) are checked before any process group starts.
    layout = plan_layout(config, launch_world_size(), num_prompts=len(stream))
    platform = init_distributed(device=config.run.device)
    if platform.rank == 0 and config.logging.progress:
        console.say_once(describe_accelerators(platform.device.type))
    run_dir = Path(config.run.dir)
    checkpoint_root = run_dir / "checkpoints"
    checkpoint = latest_checkpoint(checkpoint_root)
    if resume and checkpoint is None:
        raise ConfigError(f"--resume: {checkpoint_root} holds no checkpoint ('latest' pointer) to resume from")
    init_model_parallel(config.parallel.tensor, config.parallel.pipeline, seed=config.train.seed)
    random.seed(config.train.seed)
    torch.manual_seed(config.train.seed)
    if platform.rank == 0:
        checkpoint_root.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
    clean_partial_writes(checkpoint_root)
    dtype = run_dtype(config.train.precision, platform.device)
    steps = layout.iterations * layout.optimizer_steps_per_iteration
    student = build_student(config.student, dtype, config.optim, steps, recompute=config.train.recompute,
                            load=checkpoint is None)
    state = RunState()
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, student)
        stream.load_state_dict(state.data)
    teacher = fleet = None
    teacher_encode = None
    if config.train.mode == "eopd":
        teacher = build_teacher(config.teacher, dtype)
        teacher_encode = prompt_encoder(teacher_tokenizer, config.teacher.prompt_style)
        fleet = RolloutFleet(config.rollout, Path(config.student.hf_dir), ranks_per_node=config.parallel.gpus_per_node,
                             device=platform.device)
    if dist.is_initialized():
        dist.barrier()
    return Session(
        config=config, platform=platform, layout=layout, run_dir=run_dir, tokenizer=tokenizer,
        special=qwen3_templates.special_token_ids(tokenizer), teacher_encode=teacher_encode, stream=stream,
        student=student, teacher=teacher, fleet=fleet,
        log=MetricsLog(run_dir, tensorboard=config.logging.tensorboard, resume_from=state.iteration),
        state=state, iterations=layout.iterations, vocab_size=_token_count(config, tokenizer),
        rollouts=RolloutLog(run_dir, resume_from=state.iteration) if config.logging.save_rollouts else None,
        engines_hold_student=(checkpoint is None and config.student.checkpoint is None
                              and config.rollout.dtype != "auto" and getattr(torch, config.rollout.dtype, None) == dtype),
    )
