"""Prompt data for training and evaluation: prompt records and the resumable prompt stream, answer
grading, and (as submodules) the Qwen3 prompt templates and the synthetic arithmetic task.

Templates: ``from megatron_eopd.data import qwen3_templates`` (``format_prompt``, ...).
"""

from megatron_eopd.data import qwen3_templates
from megatron_eopd.data.grading import Grade, extract_last_boxed, grade_answer, grade_batch
from megatron_eopd.data.prompts import DataError, PromptItem, PromptRecord, PromptStream, load_prompt_records

__all__ = [
    "DataError",
    "Grade",
    "PromptItem",
    "PromptRecord",
    "PromptStream",
    "extract_last_boxed",
    "grade_answer",
    "grade_batch",
    "load_prompt_records",
    "qwen3_templates",
]
