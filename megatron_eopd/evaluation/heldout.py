"""Held-out evaluation on the synthetic task's test split: what ``make run`` and ``make replicate`` report.

The tiny models were SFT'd on the training template (the chat user turn with the paper's training
suffix), so they are asked that way; the paper's eval suffix would be a prompt they never saw.  The
report has the JSON format of ``tools/evaluate.py`` (every sample's ``correct`` flag kept), so Avg@n
and Pass@k can be recomputed from the samples.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Optional

from megatron_eopd.data import load_prompt_records, qwen3_templates, synthetic
from megatron_eopd.evaluation import metrics as eval_metrics
from megatron_eopd.evaluation import runner

# The benchmark name under which held-out results are stored, whichever synthetic task they come from
# (the report's settings name the source).
HELDOUT = "synthetic_arith_test"


@dataclasses.dataclass(frozen=True)
class HeldoutSettings:
    """How the held-out problems are sampled: the paper's temperature 1.0 / top-p 0.8 by default."""

    problems: int = 64
    source: str = synthetic.SOURCE  # which synthetic task's test split (data/synthetic.py TASKS)
    first_problem: int = 0  # index of the first test-split problem used (validation sets start later)
    samples: int = 8
    temperature: float = 1.0
    top_p: float = 0.8
    max_tokens: int = 96
    seed: int = 2026
    engine: str = "hf"
    # The transformers sampler decodes this many prompts together (the tiny models' prompts are a few
    # dozen tokens: one at a time, Python overhead per decoding step dominated the evaluation).
    hf_prompt_batch: int = 64


def evaluate_heldout(model_dir: Path, settings: HeldoutSettings, output: Optional[Path] = None) -> dict:
    """Sample ``settings.samples`` answers per held-out problem and grade them; the report is written
    atomically to ``output`` when given and returned."""
    from transformers import AutoTokenizer

    from megatron_eopd.rollout import RolloutConfig, create_rollout_engine

    started = time.time()
    records = load_prompt_records(settings.source, split="test",
                                  limit=settings.first_problem + settings.problems)[settings.first_problem:]
    benchmark = runner.Benchmark(HELDOUT, f"{settings.source} (test split)", records)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    prompts = [tokenizer.encode(qwen3_templates.format_prompt(r.problem, "train"), add_special_tokens=False)
               for r in records]
    stops = runner.eval_stop_token_ids(tokenizer)
    sampling = runner.eval_sampling(n=settings.samples, temperature=settings.temperature, top_p=settings.top_p,
                                    max_tokens=settings.max_tokens, seed=settings.seed, stop_token_ids=stops)
    engine_config = RolloutConfig(engine=settings.engine, sampling=sampling, dtype="float32", enforce_eager=True,
                                  max_model_len=512, seed=settings.seed, show_progress=False,
                                  sleep_between_phases=False, hf_prompt_batch=settings.hf_prompt_batch)
    with create_rollout_engine(engine_config, model_dir) as engine:
        batch = engine.generate(prompts, sampling)
    graded = runner.grade_generations([benchmark], batch.results, tokenizer)
    table = eval_metrics.summarize(runner.correctness(graded))
    recorded = runner.EvalSettings(
        model=str(Path(model_dir).resolve()), model_kind="hf", benchmarks=[HELDOUT],
        sources={HELDOUT: benchmark.source}, n=settings.samples, temperature=settings.temperature,
        top_p=settings.top_p, max_tokens=settings.max_tokens, seed=settings.seed, engine=settings.engine,
        prompt_style="chat", prompt_purpose="train", limit=settings.problems, max_model_len=512, dtype="float32",
        stop_token_ids=stops)
    report = {
        "format": runner.OUTPUT_FORMAT,
        "format_version": runner.OUTPUT_FORMAT_VERSION,
        "settings": dataclasses.asdict(recorded),
        "metrics": table,
        "table": eval_metrics.markdown_table(table),
        "diagnostics": runner.diagnostics(graded),
        "timing": {"total_s": time.time() - started},
        "results": graded,
    }
    if output is not None:
        runner.write_json_atomic(Path(output), report)
    return report
