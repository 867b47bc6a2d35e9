"""The slower fallback engine: samples from the Hugging Face (transformers) model in this process.

Used only when ``rollout.engine="hf"`` is configured (never as a silent substitute for vLLM), so
that the pipeline runs where vLLM is missing and the engine interface stays tested there.  Token by
token with a KV cache, the ``n`` samples of a prompt decoded together, and with
``rollout.hf_prompt_batch`` > 1 several prompts too (left-padded): each prompt still samples from its
own seeded generator, so only the floating-point rounding of the batched forward can differ.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional, Union

import torch

from megatron_eopd.rollout.engine import (
    NamedTensors,
    Prompts,
    RolloutBatch,
    RolloutConfig,
    RolloutEngine,
    RolloutResult,
    RolloutSample,
    SamplingConfig,
    WeightLoadReport,
)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _eos_ids(model) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config):
        eos = getattr(source, "eos_token_id", None) if source is not None else None
        if eos is None:
            continue
        ids.update([int(eos)] if isinstance(eos, int) else [int(e) for e in eos])
        if ids:
            break  # generation_config wins, as in vLLM
    return ids


def _top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Logits with everything outside the smallest set of tokens of mass >= top_p set to -inf."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    # Drop a token when the mass before it already reaches top_p (the top token always stays).
    drop_sorted = (torch.cumsum(probs, dim=-1) - probs) >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


class HFRolloutEngine(RolloutEngine):
    """Rollouts from ``transformers``' ``AutoModelForCausalLM``; same interface and outputs as vLLM."""

    name = "hf"

    def __init__(self, config: RolloutConfig, model_dir: Union[str, Path]):
        super().__init__(config, model_dir)
        from transformers import AutoModelForCausalLM

        dtype = _DTYPES.get(config.dtype, "auto")
        self.device = torch.device(config.hf_device)
        self.model = (
            AutoModelForCausalLM.from_pretrained(str(self.model_dir), dtype=dtype).to(self.device).eval()
        )
        self.eos_token_ids = _eos_ids(self.model)

    # ------------------------------------------------------------------ sampling

    def _stops_and_budget(self, prompt_len: int, sampling: SamplingConfig) -> tuple[set[int], int]:
        max_new = sampling.max_tokens
        if self.config.max_model_len is not None:
            max_new = min(max_new, self.config.max_model_len - prompt_len)
        return self.eos_token_ids | set(sampling.stop_token_ids), max(max_new, 0)

    def _generator(self, seed: Optional[int]) -> torch.Generator:
        generator = torch.Generator(device=self.device)
        generator.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, ()).item()))
        return generator

    def _choose(self, logits: torch.Tensor, sampling: SamplingConfig,
                generators: list[torch.Generator]) -> tuple[torch.Tensor, list[int], list[float]]:
        """One decoding step's token per row and its log-prob, as vLLM reports it.

        ``logits`` holds ``sampling.n`` consecutive rows per generator (one generator per prompt).
        Returns the chosen ids as a tensor (the next step's input) and, copied to the host once per
        step rather than per row, as lists with their log-probs.
        """
        logits = logits.float()
        logits[:, self.padded_rows.start:self.padded_rows.stop] = float("-inf")
        raw = torch.log_softmax(logits, dim=-1)
        if sampling.temperature == 0:
            choice, reported = logits.argmax(dim=-1), raw
        else:
            processed = torch.log_softmax(_top_p_filter(logits / sampling.temperature, sampling.top_p), dim=-1)
            probs, n = processed.exp(), sampling.n
            choice = torch.cat([torch.multinomial(probs[i * n:(i + 1) * n], 1, generator=generator)
                                for i, generator in enumerate(generators)]).squeeze(-1)
            reported = processed if self.config.logprobs_mode == "processed" else raw
        picked = reported.gather(-1, choice[:, None]).squeeze(-1)
        return choice, choice.tolist(), picked.tolist()

    @torch.no_grad()
    def _sample_prompts(
        self, prompts: list[list[int]], sampling: SamplingConfig, seeds: list[Optional[int]]
    ) -> list[list[RolloutSample]]:
        """``sampling.n`` samples of each prompt, all rows decoded together; prompt ``i`` draws its
        rows' tokens from a generator seeded with ``seeds[i]``, as a prompt decoded alone does."""
        n = sampling.n
        rows = [(i, prompt) for i, prompt in enumerate(prompts) for _ in range(n)]
        width = max(len(p) for p in prompts)
        budgets = [self._stops_and_budget(len(p), sampling) for p in prompts]
        generators = [self._generator(seed) for seed in seeds]
        # Left padding puts every row's next token in the last column; the mask hides the padding and
        # positions count real tokens only, so a row computes what it would alone (up to rounding).
        pad = 0
        ids = torch.tensor([[pad] * (width - len(p)) + p for _, p in rows], dtype=torch.long, device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for _, p in rows], dtype=torch.long,
                            device=self.device)
        tokens: list[list[int]] = [[] for _ in rows]
        logprobs: list[list[float]] = [[] for _ in rows]
        finished = [False] * len(rows)
        done = [budgets[i][1] == 0 for i, _ in rows]
        step_input, past = ids, None
        for step in range(max(b for _, b in budgets)):
            positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -step_input.shape[1]:]
            # Only the last position's logits: at Qwen3's 151,936 rows the prompt's would cost the
            # first step prompt-length times a decode step.
            out = self.model(input_ids=step_input, attention_mask=mask, position_ids=positions,
                             past_key_values=past, use_cache=True, logits_to_keep=1)
            past = out.past_key_values
            choice, chosen, chosen_logprobs = self._choose(out.logits[:, -1, :], sampling, generators)
            for row, (i, _) in enumerate(rows):
                if done[row]:
                    continue
                tokens[row].append(chosen[row])
                logprobs[row].append(chosen_logprobs[row])
                finished[row] = chosen[row] in budgets[i][0]
                done[row] = finished[row] or len(tokens[row]) >= budgets[i][1]
            if all(done):
                break
            step_input = choice[:, None]
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
        samples = [RolloutSample(tokens[r], logprobs[r], "stop" if finished[r] else "length") for r in range(len(rows))]
        return [samples[i * n:(i + 1) * n] for i in range(len(prompts))]

    @torch.no_grad()
    def _sample_prompt(
        self, prompt: list[int], sampling: SamplingConfig, seed: Optional[int]
    ) -> list[RolloutSample]:
        n = sampling.n
        generator = self._generator(seed)
        stop, max_new = self._stops_and_budget(len(prompt), sampling)
        tokens: list[list[int]] = [[] for _ in range(n)]
        logprobs: list[list[float]] = [[] for _ in range(n)]
        finished = [False] * n
        step_input = torch.tensor([prompt] * n, dtype=torch.long, device=self.device)
        past = None
        for _ in range(max_new):
            out = self.model(input_ids=step_input, past_key_values=past, use_cache=True, logits_to_keep=1)
            past = out.past_key_values
            choice, chosen, chosen_logprobs = self._choose(out.logits[:, -1, :], sampling, [generator])
            for row in range(n):
                if finished[row]:
                    continue
                tok = chosen[row]
                tokens[row].append(tok)
                logprobs[row].append(chosen_logprobs[row])
                finished[row] = tok in stop
            if all(finished):
                break
            step_input = choice[:, None]
        return [RolloutSample(tokens[r], logprobs[r], "stop" if finished[r] else "length") for r in range(n)]

    def generate(
        self,
        prompts: Prompts,
        sampling: Optional[SamplingConfig] = None,
        *,
        show_progress: Optional[bool] = None,
    ) -> RolloutBatch:
        from tqdm.auto import tqdm

        sampling = self._sampling(sampling)
        results = []
        bar = tqdm(
            total=len(prompts) * sampling.n,
            desc="HF rollouts",
            unit="sample",
            disable=not self._show_progress(show_progress),
        )
        prompts = [[int(t) for t in prompt] for prompt in prompts]
        step = self.config.hf_prompt_batch
        with bar:
            for start in range(0, len(prompts), step):
                group = prompts[start:start + step]
                seeds = [sampling.request_seed(start + i) for i in range(len(group))]
                if step == 1:
                    decoded = [self._sample_prompt(group[0], sampling, seeds[0])]
                else:
                    decoded = self._sample_prompts(group, sampling, seeds)
                results += [RolloutResult(prompt, samples) for prompt, samples in zip(group, decoded)]
                bar.update(sampling.n * len(group))
        return RolloutBatch(results)

    @torch.no_grad()
    def score(self, sequences: Prompts) -> list[torch.Tensor]:
        scored = []
        for seq in sequences:
            ids = torch.tensor([list(seq)], dtype=torch.long, device=self.device)
            logits = self.model(input_ids=ids).logits[0].float()
            logits[:, self.padded_rows.start:self.padded_rows.stop] = float("-inf")
            logp = torch.log_softmax(logits, dim=-1)
            scored.append(logp[:-1].gather(-1, ids[0, 1:, None]).squeeze(-1).cpu())
        return scored

    # ------------------------------------------------------------------ weights

    @torch.no_grad()
    def load_weights(self, named_tensors: NamedTensors, *, method: str = "memory") -> WeightLoadReport:
        start = time.perf_counter()
        state = self.model.state_dict(keep_vars=True)
        written: set[str] = set()
        num_bytes = 0
        for name, tensor in named_tensors:
            if name not in state:
                raise KeyError(f"{name!r} is not a parameter of the Hugging Face model in {self.model_dir}")
            target = state[name]
            if tuple(target.shape) != tuple(tensor.shape):
                raise ValueError(f"{name}: got shape {list(tensor.shape)}, model has {list(target.shape)}")
            target.data.copy_(tensor.to(device=target.device, dtype=target.dtype))
            written.add(name)
            num_bytes += tensor.numel() * tensor.element_size()
        # Tied parameters appear once in named_parameters(), under the name HF saves.
        not_updated = sorted(n for n, _ in self.model.named_parameters() if n not in written)
        return WeightLoadReport(method, len(written), num_bytes, time.perf_counter() - start, not_updated)

    def load_weights_from_dir(self, hf_dir: Union[str, Path]) -> WeightLoadReport:
        from safetensors.torch import load_file

        files = sorted(Path(hf_dir).glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors files in {hf_dir}")

        def stream():
            for f in files:
                yield from load_file(str(f)).items()

        return self.load_weights(stream(), method="disk")

    def close(self) -> None:
        self.model = None
