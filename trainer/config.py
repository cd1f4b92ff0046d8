"""One config system for the trainer: a dataclass, CLI flags generated from it, and an
optional JSON/TOML file given with ``--config``.

Precedence: dataclass defaults < model preset < config file < explicit CLI flags.
Everything is validated up front (torchtitan style), before any process group or model exists.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

# name -> (vocab_size, width, depth, heads, seq_len). Parameter counts are approximate
# (tied embeddings): the CPU default is ~10M, the largest GPU preset ~1B.
PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(vocab_size=256, width=64, depth=2, heads=4, seq_len=32),          # ~0.1M, tests
    "cpu-10m": dict(vocab_size=4096, width=384, depth=5, heads=6, seq_len=256),    # ~10M
    "gpt2-124m": dict(vocab_size=50304, width=768, depth=12, heads=12, seq_len=1024),
    "gpt2-350m": dict(vocab_size=50304, width=1024, depth=24, heads=16, seq_len=1024),
    "gpt2-774m": dict(vocab_size=50304, width=1280, depth=36, heads=20, seq_len=1024),
    "gpt-1b": dict(vocab_size=50304, width=2048, depth=18, heads=16, seq_len=2048),
}

AMP_MODES = ("none", "bf16", "fp16")
REMAT_MODES = ("none", "selective", "full")
DEVICES = ("auto", "cpu", "cuda")


class ConfigError(ValueError):
    """Raised when the configuration is inconsistent; the message names the field and the fix."""


@dataclass
class TrainConfig:
    """All knobs of a training run. Field names double as ``--flag-names`` (``_`` -> ``-``)."""

    # model (None = take it from the preset)
    preset: str = "cpu-10m"
    vocab_size: int | None = None
    width: int | None = None
    depth: int | None = None
    heads: int | None = None
    seq_len: int | None = None
    # data / optimisation
    seed: int = 1337
    batch_size: int = 8          # global sequences per micro-batch, split evenly across ranks
    grad_accum: int = 1          # micro-batches per optimizer step
    steps: int = 200             # optimizer steps in total
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 10
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0       # 0 disables clipping
    # memory techniques
    amp: str = "none"
    remat: str = "none"
    device: str = "auto"
    deterministic: bool = True
    # run directory, logging, validation
    out_dir: str = "runs/default"
    log_every: int = 1
    val_every: int = 50          # 0 disables validation
    val_batches: int = 2
    step_delay: float = 0.0      # seconds slept after each step: stands in for a bigger model in demos/kill tests
    # checkpointing (through ckptstore.Checkpointer)
    ckpt_every_steps: int = 50   # 0 disables the step trigger
    ckpt_every_seconds: float = 0.0  # 0 disables the time trigger
    keep_last: int = 3
    keep_every: int | None = None
    keep_best: int = 1           # how many best-val_loss checkpoints to keep; 0 disables
    remote: str | None = None
    remote_keep_last: int | None = None
    compression: str = "zstd"
    memory: bool = False         # a memory tier (tmpfs) in front of the disk: resume from it after a crash
    resume: str = "never"        # never | auto | <step>
    # modes
    find_batch_size: bool = False
    config: str | None = field(default=None, metadata={"help": "JSON or TOML file with any of these fields"})

    # ---- derived -------------------------------------------------------------------
    def model_dims(self) -> dict[str, int]:
        """The preset's model dimensions with explicit overrides applied."""
        dims = dict(PRESETS[self.preset])
        for key in dims:
            value = getattr(self, key)
            if value is not None:
                dims[key] = value
        return dims

    @property
    def ckpt_dir(self) -> str:
        """Local tier of the checkpointer, inside the run directory."""
        return str(Path(self.out_dir) / "checkpoints")

    @property
    def metrics_path(self) -> str:
        return str(Path(self.out_dir) / "metrics.jsonl")

    def to_dict(self) -> dict[str, Any]:
        """Plain-data view (JSON-able), stored in every checkpoint."""
        return dataclasses.asdict(self)

    # ---- validation ----------------------------------------------------------------
    def validate(self, world_size: int = 1) -> "TrainConfig":
        """Check every field; raise ConfigError naming the first problem found."""

        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        need(self.preset in PRESETS, f"--preset {self.preset!r} unknown; choose one of {sorted(PRESETS)}")
        need(self.amp in AMP_MODES, f"--amp {self.amp!r} unknown; choose one of {AMP_MODES}")
        need(self.remat in REMAT_MODES, f"--remat {self.remat!r} unknown; choose one of {REMAT_MODES}")
        need(self.device in DEVICES, f"--device {self.device!r} unknown; choose one of {DEVICES}")
        dims = self.model_dims()
        for key, value in dims.items():
            need(value > 0, f"--{key.replace('_', '-')} must be positive, got {value}")
        need(dims["width"] % dims["heads"] == 0,
             f"--width {dims['width']} must be divisible by --heads {dims['heads']}")
        need(dims["vocab_size"] >= 8, "--vocab-size must be at least 8 for the synthetic data")
        need(self.steps > 0, f"--steps must be positive, got {self.steps}")
        need(self.grad_accum > 0, f"--grad-accum must be positive, got {self.grad_accum}")
        need(self.batch_size > 0 and self.batch_size % world_size == 0,
             f"--batch-size {self.batch_size} must be a positive multiple of the world size {world_size}")
        need(0 <= self.warmup_steps <= self.steps, f"--warmup-steps must be in [0, --steps], got {self.warmup_steps}")
        need(self.lr > 0 and 0 <= self.min_lr <= self.lr, "need --lr > 0 and 0 <= --min-lr <= --lr")
        need(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "--beta1/--beta2 must be in [0, 1)")
        need(self.grad_clip >= 0, "--grad-clip must be >= 0 (0 disables it)")
        need(self.ckpt_every_steps >= 0 and self.ckpt_every_seconds >= 0,
             "--ckpt-every-steps/--ckpt-every-seconds must be >= 0 (0 disables the trigger)")
        need(self.val_every >= 0 and self.val_batches > 0, "need --val-every >= 0 and --val-batches > 0")
        need(self.keep_last >= 1, "--keep-last must be >= 1")
        need(self.log_every >= 1 and self.step_delay >= 0, "need --log-every >= 1 and --step-delay >= 0")
        need(self.resume in ("never", "auto") or self.resume.isdigit(),
             f"--resume must be 'never', 'auto' or a step number, got {self.resume!r}")
        return self


def _bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {text!r}")


def _scalar_type(f: dataclasses.Field) -> Any:
    hint = str(f.type)
    if "bool" in hint:
        return _bool
    if "int" in hint:
        return int
    if "float" in hint:
        return float
    return str


_CHOICES: dict[str, Sequence[str]] = {"preset": tuple(PRESETS), "amp": AMP_MODES,
                                      "remat": REMAT_MODES, "device": DEVICES}


def build_parser() -> argparse.ArgumentParser:
    """Argument parser with one ``--flag`` per TrainConfig field (all default to 'not given')."""
    parser = argparse.ArgumentParser(prog="python -m trainer", description=__doc__.split("\n\n")[0],
                                     argument_default=argparse.SUPPRESS)
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = f.metadata.get("help", f"default: {default}")
        extra: dict[str, Any] = {"nargs": "?", "const": True} if "bool" in str(f.type) else {}
        if f.name in _CHOICES:
            extra["choices"] = _CHOICES[f.name]
        parser.add_argument(flag, dest=f.name, type=_scalar_type(f), help=help_text, **extra)
    return parser


def load_file(path: str) -> dict[str, Any]:
    """Read a JSON or TOML config file into a flat dict of field values."""
    text = Path(path).read_text()
    data = tomllib.loads(text) if path.endswith(".toml") else json.loads(text)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a table/object of config fields at the top level")
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown config keys {unknown}; see `python -m trainer --help`")
    return data


def parse_config(argv: Sequence[str] | None = None) -> TrainConfig:
    """Build a TrainConfig from CLI flags and an optional ``--config`` file (flags win)."""
    cli = vars(build_parser().parse_args(argv))
    values: dict[str, Any] = {}
    if cli.get("config"):
        values.update(load_file(cli["config"]))
    values.update(cli)
    return TrainConfig(**values)
