"""The EOPD trainer: ``train(config)`` runs the recipe in ``loop.py`` (entry point: ``tools/train_eopd.py``)."""

from megatron_eopd.trainer.config import EOPDTrainConfig, load_train_config, plan_layout
from megatron_eopd.trainer.loop import train

__all__ = ["EOPDTrainConfig", "load_train_config", "plan_layout", "train"]
