"""Qwen3 architecture facts: presets, parsing and validation of a Hugging Face ``config.json``.

Everything downstream (model building, the mapping table, the conversion tools) reads a
:class:`Qwen3Arch`, never the raw HF dict, so an unsupported config is refused in one place.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from megatron_eopd.errors import EOPDError

HF_ARCHITECTURE = "Qwen3ForCausalLM"
HF_MODEL_TYPE = "qwen3"

# Megatron-LM pads the vocabulary to a multiple of 128 (x TP).  We keep the padding independent of
# TP so a checkpoint converted at one TP loads at another: 128 is divisible by every TP up to 128.
DEFAULT_VOCAB_DIVISOR = 128


class UnsupportedArchitectureError(EOPDError, ValueError):
    """The HF config is not a Qwen3 model this code can represent exactly."""


class IncompatibleModelsError(EOPDError, ValueError):
    """Teacher and student cannot be paired (e.g. different vocabularies)."""


@dataclasses.dataclass(frozen=True)
class Qwen3Arch:
    """The facts of a Qwen3 dense model that determine every tensor's name and shape."""

    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden_size: int
    vocab_size: int
    tie_word_embeddings: bool
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 40_960

    @property
    def q_per_group(self) -> int:
        return self.num_attention_heads // self.num_kv_heads

    # ---------------------------------------------------------------- parameter counts
    def embedding_parameters(self) -> int:
        """Input embedding plus, when untied, the LM head."""
        one = self.vocab_size * self.hidden_size
        return one if self.tie_word_embeddings else 2 * one

    def layer_parameters(self) -> int:
        h, d = self.hidden_size, self.head_dim
        attention = h * self.num_attention_heads * d  # q_proj
        attention += 2 * h * self.num_kv_heads * d  # k_proj, v_proj
        attention += self.num_attention_heads * d * h  # o_proj
        attention += 2 * d  # q_norm, k_norm
        mlp = 3 * h * self.ffn_hidden_size  # gate, up, down
        return attention + mlp + 2 * h  # input and post-attention RMSNorm

    def non_embedding_parameters(self) -> int:
        return self.num_layers * self.layer_parameters() + self.hidden_size  # + final norm

    def total_parameters(self) -> int:
        return self.embedding_parameters() + self.non_embedding_parameters()

    # ---------------------------------------------------------------- HF round trip
    def to_hf_config(self, dtype: str = "bfloat16") -> dict:
        """A minimal ``config.json`` dict describing this architecture."""
        return {
            "architectures": [HF_ARCHITECTURE],
            "model_type": HF_MODEL_TYPE,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.ffn_hidden_size,
            "vocab_size": self.vocab_size,
            "tie_word_embeddings": self.tie_word_embeddings,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": "silu",
            "attention_bias": False,
            "use_sliding_window": False,
            "torch_dtype": dtype,
        }


# Published Qwen3 dense checkpoints (their HF config.json files).  Vocabulary 151,936 for all.
QWEN3_PRESETS: dict[str, Qwen3Arch] = {
    "Qwen3-0.6B": Qwen3Arch(1024, 28, 16, 8, 128, 3072, 151_936, tie_word_embeddings=True),
    "Qwen3-1.7B": Qwen3Arch(2048, 28, 16, 8, 128, 6144, 151_936, tie_word_embeddings=True),
    "Qwen3-4B": Qwen3Arch(2560, 36, 32, 8, 128, 9728, 151_936, tie_word_embeddings=True),
    "Qwen3-8B": Qwen3Arch(4096, 36, 32, 8, 128, 12288, 151_936, tie_word_embeddings=False),
}


def _rope_theta(cfg: Mapping[str, Any]) -> float:
    # transformers < 5 writes ``rope_theta`` at the top level; 5.x nests it in ``rope_parameters``.
    params = cfg.get("rope_parameters") or {}
    if "rope_theta" in cfg and cfg["rope_theta"] is not None:
        return float(cfg["rope_theta"])
    if "rope_theta" in params:
        return float(params["rope_theta"])
    return 10_000.0  # Qwen3Config's default


def _rope_scaling(cfg: Mapping[str, Any]) -> Optional[str]:
    scaling = cfg.get("rope_scaling")
    if scaling:
        return str(scaling.get("rope_type", scaling.get("type", scaling)))
    params = cfg.get("rope_parameters") or {}
    rope_type = params.get("rope_type", "default")
    return None if rope_type == "default" else str(rope_type)


def load_hf_config(source: Union[str, Path, Mapping[str, Any], Any]) -> dict:
    """A HF config as a plain dict, from a directory, a ``config.json`` path, a dict or a ``PretrainedConfig``."""
    if isinstance(source, Mapping):
        return dict(source)
    if hasattr(source, "to_dict"):
        return source.to_dict()
    path = Path(source)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no HF config.json at {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UnsupportedArchitectureError(f"{path} is not valid JSON: {exc}") from exc


def as_arch(config: Union["Qwen3Arch", str, Path, Mapping[str, Any], Any]) -> "Qwen3Arch":
    """``config`` itself when it is a :class:`Qwen3Arch`, else :func:`parse_hf_config` of it."""
    return config if isinstance(config, Qwen3Arch) else parse_hf_config(config)


def parse_hf_config(source: Union[str, Path, Mapping[str, Any], Any]) -> Qwen3Arch:
    """Validate a ``Qwen3ForCausalLM`` config and return its :class:`Qwen3Arch`.

    Raises :class:`UnsupportedArchitectureError` naming the first unsupported feature.
    """
    cfg = load_hf_config(source)
    archs = cfg.get("architectures") or []
    model_type = cfg.get("model_type")
    if model_type != HF_MODEL_TYPE or (archs and HF_ARCHITECTURE not in archs):
        raise UnsupportedArchitectureError(
            f"unsupported architecture: model_type={model_type!r}, architectures={archs!r}; "
            f"only {HF_ARCHITECTURE} (model_type {HF_MODEL_TYPE!r}) is supported"
        )
    problems = []
    if cfg.get("attention_bias", False):
        problems.append("attention_bias=True")
    if cfg.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={cfg.get('hidden_act')!r}")
    if cfg.get("use_sliding_window", False):
        problems.append("use_sliding_window=True")
    rope_scaling = _rope_scaling(cfg)
    if rope_scaling is not None:
        problems.append(f"rope scaling {rope_scaling!r}")
    if problems:
        raise UnsupportedArchitectureError(
            f"unsupported {HF_ARCHITECTURE} features: {', '.join(problems)}"
        )
    try:
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        arch = Qwen3Arch(
            hidden_size=hidden,
            num_layers=int(cfg["num_hidden_layers"]),
            num_attention_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            ffn_hidden_size=int(cfg["intermediate_size"]),
            vocab_size=int(cfg["vocab_size"]),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            rope_theta=_rope_theta(cfg),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 40_960)),
        )
    except KeyError as exc:
        raise UnsupportedArchitectureError(f"HF config lacks required field {exc.args[0]!r}") from exc
    if arch.num_attention_heads % arch.num_kv_heads:
        raise UnsupportedArchitectureError(
            f"num_attention_heads={arch.num_attention_heads} is not a multiple of "
            f"num_key_value_heads={arch.num_kv_heads}"
        )
    return arch


def padded_vocab_size(vocab_size: int, tp: int = 1, divisor: int = DEFAULT_VOCAB_DIVISOR) -> int:
    """Vocabulary rows held by Megatron's embedding/output layer (padding rows are zero).

    Independent of ``tp`` whenever ``tp`` divides ``divisor``, so checkpoints reshard across TP.
    """
    multiple = divisor * tp // math.gcd(divisor, tp)
    return -(-vocab_size // multiple) * multiple


def validate_parallelism(arch: Qwen3Arch, tp: int, pp: int, padded_vocab: Optional[int] = None) -> None:
    """Raise ``ValueError`` naming the first dimension that TP or PP does not divide."""
    if tp < 1 or pp < 1:
        raise ValueError(f"TP and PP must be >= 1, got TP={tp} PP={pp}")
    checks = [
        ("num_attention_heads", arch.num_attention_heads, tp),
        ("num_key_value_heads", arch.num_kv_heads, tp),
        ("intermediate_size (FFN)", arch.ffn_hidden_size, tp),
        ("num_hidden_layers", arch.num_layers, pp),
    ]
    if padded_vocab is not None:
        checks.append(("padded vocabulary", padded_vocab, tp))
    for what, size, parts in checks:
        if size % parts:
            kind = "TP" if parts == tp and what != "num_hidden_layers" else "PP"
            raise ValueError(f"{kind}={parts} does not divide {what}={size}")


def check_teacher_student_compatible(student: Any, teacher: Any) -> None:
    """Refuse a teacher/student pair that does not share the tokenizer's vocabulary.

    Accepts :class:`Qwen3Arch` objects or anything :func:`parse_hf_config` takes.  Per-token
    distillation compares distributions over the same ids, so the vocabularies (and hence the
    logits' width) must be identical; real Qwen checkpoints ship 151,936 and 152,064.
    """
    s, t = as_arch(student), as_arch(teacher)
    if s.vocab_size != t.vocab_size:
        raise IncompatibleModelsError(
            f"teacher and student vocabularies differ: student vocab_size={s.vocab_size}, "
            f"teacher vocab_size={t.vocab_size}; distillation needs one shared tokenizer and "
            f"identical vocabulary sizes (pick a teacher from the same tokenizer family, or "
            f"resize both embeddings to the same size before converting)"
        )
