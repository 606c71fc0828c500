"""Configuration as data: model sizes, the training recipe, config files and `key=value` overrides.

A run is described by one `Config` (training recipe) holding one `ModelConfig` (architecture). Both are
frozen dataclasses; config files in `configs/` (TOML) and `--set key=value` overrides are applied on top of
the defaults, and every unknown key is an error naming the valid ones.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError

CONFIG_DIR = Path(__file__).resolve().parent.parent.parent / "configs"  # the repository's configs/


@dataclass(frozen=True)
class ModelConfig:
    """GPT-2 architecture plus the four variant axes (docs/variants.md)."""

    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2's 50257 padded to a multiple of 64
    bias: bool = False
    dropout: float = 0.0
    embedding: str = "default"
    norm: str = "layernorm"
    loss: str = "ce"
    mixer: str = "softmax"
    dtype: str = "auto"  # compute dtype: auto (bfloat16 on GPU, float32 on CPU) | bfloat16 | float32
    linear_attn_backend: str = "auto"  # linear-attention ops: auto (pallas on GPU, xla elsewhere) | xla | pallas

    def __post_init__(self):
        for name in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise UserError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}): head_dim = n_embd / n_head"
            )
        if self.vocab_size < 50257:
            raise UserError(f"vocab_size must hold the GPT-2 vocabulary (>= 50257), got {self.vocab_size}")
        if self.dtype not in ("auto", "bfloat16", "float32"):
            raise UserError(f"dtype must be one of auto, bfloat16, float32; got {self.dtype!r}")
        if self.linear_attn_backend not in ("auto", "xla", "pallas"):
            raise UserError(f"linear_attn_backend must be one of auto, xla, pallas; got {self.linear_attn_backend!r}")
        if self.dropout != 0.0:
            raise UserError("dropout is fixed at 0 by the benchmark recipe")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


MODEL_PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(n_layer=4, n_head=4, n_embd=128, block_size=128),
    "gpt2-124m": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024),
    "gpt2-345m": dict(n_layer=24, n_head=16, n_embd=1024, block_size=1024),
    "gpt2-1.5b": dict(n_layer=48, n_head=25, n_embd=1600, block_size=1024),
}

# The only recipe keys a variant's CONFIG_OVERRIDES may change.
OVERRIDABLE_BY_VARIANT = ("learning_rate", "weight_decay", "warmup_iters", "min_lr", "grad_clip")


@dataclass(frozen=True)
class Config:
    """The training recipe and the model it trains.

    Defaults are the CPU demo run (tiny preset, a few minutes on 2 cores; the tiny model takes a higher lr);
    the benchmark schedules (lr 6e-4 -> 6e-5, batch x accum) are the files in configs/.
    """

    model_size: str = "tiny"
    model: ModelConfig = field(default_factory=lambda: ModelConfig(**MODEL_PRESETS["tiny"]))
    variant: str = "baseline"
    # batch: tokens per iteration = batch_size * grad_accum * block_size
    batch_size: int = 8
    grad_accum: int = 1
    max_iters: int = 400
    # AdamW with linear warmup then cosine decay to min_lr at lr_decay_iters (default max_iters)
    learning_rate: float = 2e-3
    min_lr: float = 2e-4
    warmup_iters: int = 40
    lr_decay_iters: int = 0  # 0 means max_iters
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping
    # evaluation / logging / checkpoints
    eval_interval: int = 50
    eval_iters: int = 10
    log_interval: int = 10
    ckpt_interval: int = 0  # 0 means eval_interval
    keep_checkpoints: int = 3
    seed: int = 1337
    # devices: a (data, fsdp) mesh such as "data=2,fsdp=2" (empty: all devices on data); see jaxgpt/sharding.py
    mesh: str = ""
    remat: bool = False  # recompute each block's activations in the backward pass (less memory, more compute)
    data: str = ""  # empty: the embedded default corpus
    out: str = ""  # empty: runs/<variant>-<model_size>

    def __post_init__(self):
        for name in ("batch_size", "grad_accum", "max_iters", "eval_interval", "eval_iters", "log_interval"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup_iters < 0 or self.lr_decay_iters < 0 or self.ckpt_interval < 0:
            raise UserError("warmup_iters, lr_decay_iters and ckpt_interval must be >= 0")
        if self.keep_checkpoints < 1:
            raise UserError(f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        for name in ("learning_rate", "eps"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise UserError(f"{name} must be a finite number > 0, got {getattr(self, name)}")
        for name in ("min_lr", "weight_decay", "grad_clip"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise UserError(f"{name} must be a finite number >= 0, got {getattr(self, name)}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise UserError(f"{name} must be in [0, 1), got {getattr(self, name)}")

    def check_schedule(self) -> Config:
        """The rules between fields, for a recipe once it is complete (defaults, config file, variant, overrides);
        -> self. Not part of construction, so a saved run's config always loads."""
        if self.min_lr > self.learning_rate:
            raise UserError(f"min_lr ({self.min_lr:g}) must be <= learning_rate ({self.learning_rate:g})")
        if self.warmup_iters > self.max_iters:
            raise UserError(f"warmup_iters ({self.warmup_iters}) must be <= max_iters ({self.max_iters}); "
                            "set it with --set warmup_iters=N")
        if self.lr_decay_iters and self.lr_decay_iters < self.warmup_iters:
            raise UserError(f"lr_decay_iters ({self.lr_decay_iters}) must be 0 (max_iters) or >= warmup_iters "
                            f"({self.warmup_iters})")
        return self

    @property
    def decay_iters(self) -> int:
        return self.lr_decay_iters or self.max_iters

    @property
    def checkpoint_every(self) -> int:
        return self.ckpt_interval or self.eval_interval

    @property
    def tokens_per_iter(self) -> int:
        return self.batch_size * self.grad_accum * self.model.block_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        d = dict(d)
        model = ModelConfig(**d.pop("model"))
        return cls(model=model, **d)


def _field_types(cls: type) -> dict[str, type]:
    return {k: v for k, v in typing.get_type_hints(cls).items() if k in {f.name for f in dataclasses.fields(cls)}}


def _coerce(key: str, value: Any, typ: type) -> Any:
    """Convert a TOML value or a command-line string to the field's type, with a clear error."""
    if isinstance(value, str) and typ is not str:
        text = value.strip()
        if typ is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise UserError(f"{key}: expected true/false, got {value!r}")
        try:
            if typ is int and "e" in text.lower():  # 2e3 is an int; 2.5e0 and 1e999 are not
                number = float(text)
                if not number.is_integer():
                    raise ValueError(text)
                return int(number)
            return typ(text)
        except (ValueError, OverflowError):
            raise UserError(f"{key}: expected {typ.__name__}, got {value!r}") from None
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise UserError(f"{key}: expected {typ.__name__}, got {value!r}")
    return value


def apply_overrides(cfg: Config, overrides: dict[str, Any], source: str = "override") -> Config:
    """Return `cfg` with `overrides` applied; keys are recipe fields or `model.<field>`.

    `model_size` switches the architecture preset (keeping the variant axes and dtype).
    """
    recipe_types = _field_types(Config)
    model_types = _field_types(ModelConfig)
    recipe: dict[str, Any] = {}
    model: dict[str, Any] = {}
    for key, value in overrides.items():
        name = key.removeprefix("model.")
        if key.startswith("model.") or (name in model_types and name not in recipe_types):
            if name not in model_types:
                raise UserError(f"unknown {source} key {key!r}; model keys: {', '.join(sorted(model_types))}")
            model[name] = _coerce(key, value, model_types[name])
        elif key in recipe_types and key != "model":
            recipe[key] = _coerce(key, value, recipe_types[key])
        else:
            valid = sorted(set(recipe_types) - {"model"}) + [f"model.{k}" for k in sorted(model_types)]
            raise UserError(f"unknown {source} key {key!r}; valid keys: {', '.join(valid)}")
    base_model = cfg.model
    if "model_size" in recipe:
        size = recipe["model_size"]
        if size not in MODEL_PRESETS:
            raise UserError(f"unknown model_size {size!r}; valid: {', '.join(MODEL_PRESETS)}")
        base_model = dataclasses.replace(base_model, **MODEL_PRESETS[size])
    return dataclasses.replace(cfg, **recipe, model=dataclasses.replace(base_model, **model))


def parse_set_args(items: list[str]) -> dict[str, str]:
    """Parse `--set key=value` strings."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set expects key=value, got {item!r}")
        out[key.strip()] = value
    return out


def available_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.toml"))


def load_config_file(name_or_path: str) -> dict[str, Any]:
    """Read a TOML config (a name in configs/ or a path) into flat overrides (`[model]` -> `model.<key>`)."""
    path = Path(name_or_path)
    if path.suffix != ".toml" and not path.exists():  # a name, possibly with a dot (gpt2-1.5b)
        path = CONFIG_DIR / f"{name_or_path}.toml"
    if not path.is_file():
        raise UserError(f"config {name_or_path!r} not found; available: {', '.join(available_configs())} (or a .toml path)")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"config {path}: {e}") from None
    flat = {k: v for k, v in raw.items() if k != "model"}
    model = raw.get("model", {})
    if not isinstance(model, dict):
        raise UserError(f"config {path}: 'model' must be a table ([model]); use model_size for presets")
    flat.update({f"model.{k}": v for k, v in model.items()})
    return flat
