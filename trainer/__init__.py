"""A small FSDP2 GPT trainer that checkpoints through ckptstore and resumes bit-exactly."""

from .config import PRESETS, TrainConfig, parse_config
from .model import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig", "PRESETS", "TrainConfig", "parse_config"]
