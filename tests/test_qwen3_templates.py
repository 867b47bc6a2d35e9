"""Qwen3 prompt formatting and the teacher's view of a student response (pure functions)."""

from __future__ import annotations

import pytest
import torch

from megatron_eopd.data.qwen3_templates import (
    EVAL_SUFFIX,
    TRAIN_SUFFIX,
    Qwen3SpecialIds,
    format_prompt,
    format_teacher_prompt,
    replace_first_token,
    special_token_ids,
    teacher_view_of_response,
    user_message,
)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    from megatron_eopd.testing.tiny_qwen3 import make_tiny_qwen3

    path = make_tiny_qwen3(tmp_path_factory.mktemp("tiny"), num_layers=1)
    return AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def special(tokenizer) -> Qwen3SpecialIds:
    return special_token_ids(tokenizer)


def test_suffixes_are_the_papers():
    assert TRAIN_SUFFIX == "Let's think step by step and output the final answer within \\boxed{}."
    assert EVAL_SUFFIX == "Please reason step by step, and put your final answer within \\boxed{}."
    assert user_message("  What is 1+1? ", "train") == "What is 1+1? " + TRAIN_SUFFIX
    assert user_message("What is 1+1?", "eval").endswith("within \\boxed{}.")
    with pytest.raises(ValueError, match="purpose"):
        user_message("x", "test")


def test_chat_prompt_matches_the_tokenizers_chat_template(tokenizer):
    problem = "what is two plus three ?"
    ours = format_prompt(problem, "train")
    theirs = tokenizer.apply_chat_template(
        [{"role": "user", "content": user_message(problem, "train")}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert ours == theirs
    assert ours.endswith("<|im_start|>assistant\n")
    assert format_prompt(problem, "eval", chat=False) == user_message(problem, "eval")


def test_teacher_prompt_adds_the_empty_think_block():
    student = format_prompt("find x", "train")
    teacher = format_teacher_prompt("find x", "train")
    assert teacher == student + "<think>\n\n</think>\n\n"
    assert format_teacher_prompt("find x", "train", non_thinking=False) == student


def test_special_ids_come_from_the_tokenizer(tokenizer, special):
    assert special.endoftext == tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert special.im_end == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert special.im_start == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert len({special.endoftext, special.im_end, special.im_start}) == 3


def test_special_ids_missing_token_is_an_error():
    class NoQwenTokens:
        unk_token_id = 0

        def convert_tokens_to_ids(self, token):
            return 0

    with pytest.raises(ValueError, match="<\\|endoftext\\|>"):
        special_token_ids(NoQwenTokens())


def test_teacher_view_replaces_only_the_first_endoftext(special):
    eot, im_end = special.endoftext, special.im_end
    # No eos (truncated response): unchanged copy.
    assert teacher_view_of_response([5, 6, 7], special) == [5, 6, 7]
    # Eos at the very end.
    assert teacher_view_of_response([5, 6, eot], special) == [5, 6, im_end]
    # Several eos: only the first.
    assert teacher_view_of_response([5, eot, 6, eot], special) == [5, im_end, 6, eot]
    # Padding after it (Qwen pads with <|endoftext|> too).
    assert teacher_view_of_response([5, 6, eot, eot, eot], special) == [5, 6, im_end, eot, eot]
    # Empty response.
    assert teacher_view_of_response([], special) == []
    # The input is not modified.
    original = [1, eot]
    teacher_view_of_response(original, special)
    assert original == [1, eot]


def test_teacher_view_on_batched_tensors(special):
    eot, im_end = special.endoftext, special.im_end
    batch = torch.tensor(
        [
            [5, 6, 7, 8],  # no eos
            [5, 6, 7, eot],  # at the very end
            [eot, 6, eot, 8],  # several, first at position 0
            [5, eot, eot, eot],  # padding after it
        ]
    )
    out = teacher_view_of_response(batch, special)
    expected = torch.tensor(
        [
            [5, 6, 7, 8],
            [5, 6, 7, im_end],
            [im_end, 6, eot, 8],
            [5, im_end, eot, eot],
        ]
    )
    assert torch.equal(out, expected)
    assert batch[1, 3] == eot, "input tensor must not be modified"
    assert torch.equal(teacher_view_of_response(batch[3], special), expected[3])
    with pytest.raises(ValueError, match="1-D or 2-D"):
        replace_first_token(batch[None], eot, im_end)


def test_real_qwen3_ids_when_given_real_numbers():
    # The function is id-agnostic: with Qwen3's real ids it does 151643 -> 151645.
    real = Qwen3SpecialIds(endoftext=151643, im_start=151644, im_end=151645)
    assert teacher_view_of_response([1, 151643, 151643], real) == [1, 151645, 151643]
