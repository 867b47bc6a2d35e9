"""The slower fallback engine: samples from the Hugging Face (transformers) model in this process.

Used only when ``rollout.engine="hf"`` is configured (never as a silent substitute for vLLM), so
that the pipeline runs where vLLM is missing and the engine interface stays tested there.  Token by
token with a KV cache, the ``n`` samples of a prompt decoded together.
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

    @torch.no_grad()
    def _sample_prompt(
        self, prompt: list[int], sampling: SamplingConfig, seed: Optional[int]
    ) -> list[RolloutSample]:
        n = sampling.n
        generator = torch.Generator(device=self.device)
        generator.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, ()).item()))
        stop = self.eos_token_ids | set(sampling.stop_token_ids)
        max_new = sampling.max_tokens
        if self.config.max_model_len is not None:
            max_new = min(max_new, self.config.max_model_len - len(prompt))
        tokens: list[list[int]] = [[] for _ in range(n)]
        logprobs: list[list[float]] = [[] for _ in range(n)]
        finished = [False] * n
        step_input = torch.tensor([prompt] * n, dtype=torch.long, device=self.device)
        past = None
        for _ in range(max(max_new, 0)):
            out = self.model(input_ids=step_input, past_key_values=past, use_cache=True)
            past = out.past_key_values
            logits = out.logits[:, -1, :].float()
            raw = torch.log_softmax(logits, dim=-1)
            if sampling.temperature == 0:
                choice = logits.argmax(dim=-1)
                reported = raw
            else:
                processed = torch.log_softmax(
                    _top_p_filter(logits / sampling.temperature, sampling.top_p), dim=-1
                )
                choice = torch.multinomial(processed.exp(), 1, generator=generator).squeeze(-1)
                reported = processed if self.config.logprobs_mode == "processed" else raw
            picked = reported.gather(-1, choice[:, None]).squeeze(-1)
            chosen, chosen_logprobs = choice.tolist(), picked.tolist()  # one host copy per step, not per row
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
        with bar:
            for i, prompt in enumerate(prompts):
                prompt = [int(t) for t in prompt]
                samples = self._sample_prompt(prompt, sampling, sampling.request_seed(i))
                results.append(RolloutResult(prompt, samples))
                bar.update(sampling.n)
        return RolloutBatch(results)

    @torch.no_grad()
    def score(self, sequences: Prompts) -> list[torch.Tensor]:
        scored = []
        for seq in sequences:
            ids = torch.tensor([list(seq)], dtype=torch.long, device=self.device)
            logp = torch.log_softmax(self.model(input_ids=ids).logits[0].float(), dim=-1)
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
