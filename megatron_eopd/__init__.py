"""Entropy-Aware On-Policy Distillation (EOPD) of Qwen3 models on Megatron-Core.

Data path (one module per stage):
    prompts -> rollout (vLLM, student weights) -> teacher forward (TP/PP) -> teacher statistics
            -> student forward/backward (TP/PP) -> EOPD loss (megatron_eopd.objective)
            -> optimizer step -> weight sync to vLLM (+ parity probe) -> next iteration
"""

__version__ = "0.1.0"
