"""The `self_distill:` recipe section: after quantizing, the original model teaches its own
quantized copy (llmquant/distill/self_distill.py runs it).

    self_distill:
      steps: 200              # end-to-end optimizer steps (0: block-wise only)
      block_steps: 40         # first, per decoder layer: match the original layer's outputs (0: skip)
      lr: 0.001               # log-scales and norms (a relative change per step)
      rounding_lr: 0.005      # rounding offsets and zero points (in units of one integer code)
      tokens: 65536           # calibration tokens trained on (tokens / seq_len windows)
      batch_size: 4
      seq_len: 512
      train: [scales, zero_points, norms]   # + rounding: a bounded offset per integer code
      loss: kl                # kl: the original's top-k log-probs; ce: plain next-token cross-entropy
      top_k: 32
      seed: 0
      held_out_tokens: 8192   # held-out perplexity before / after, for the report (0: not measured)

Only what the checkpoint format lets change is trained, so the result is the same
compressed-tensors layout: scales (stored dtype), zero points (integers in range), integer
codes (only with `rounding`) and the norms' weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llmquant.config.fields import check_fields, check_mapping, choices
from llmquant.errors import InvalidConfigError

TRAINABLE = ("scales", "zero_points", "rounding", "norms")
SELF_DISTILL_LOSSES = ("kl", "ce")
DEFAULT_TRAIN = ("scales", "zero_points", "norms")


@dataclass(frozen=True)
class SelfDistillConfig:
    steps: int = 200
    block_steps: int = 40
    lr: float = 1.0e-3
    rounding_lr: float = 5.0e-3
    tokens: int = 65536
    batch_size: int = 4
    seq_len: int = 512
    train: tuple[str, ...] = DEFAULT_TRAIN
    loss: str = field(default="kl", metadata=choices(SELF_DISTILL_LOSSES))
    top_k: int = 32
    seed: int = 0
    held_out_tokens: int = 8192

    def __post_init__(self) -> None:
        if isinstance(self.train, list):
            object.__setattr__(self, "train", tuple(self.train))
        check_fields(self, "self_distill")
        for name in ("steps", "block_steps", "held_out_tokens"):
            if getattr(self, name) < 0:
                raise InvalidConfigError(f"self_distill.{name} must be >= 0.")
        if self.steps == 0 and self.block_steps == 0:
            raise InvalidConfigError("self_distill needs steps > 0 or block_steps > 0 (both are 0: nothing to train).")
        for name in ("batch_size", "seq_len", "top_k"):
            if getattr(self, name) < 1:
                raise InvalidConfigError(f"self_distill.{name} must be a positive integer.")
        if self.seq_len < 16:
            raise InvalidConfigError("self_distill.seq_len must be at least 16.")
        if self.tokens < self.seq_len:
            raise InvalidConfigError(f"self_distill.tokens ({self.tokens}) must hold at least one window of "
                                     f"seq_len {self.seq_len}.")
        if self.lr <= 0 or self.rounding_lr <= 0:
            raise InvalidConfigError("self_distill.lr and rounding_lr must be positive.")
        unknown = [t for t in self.train if t not in TRAINABLE]
        if unknown or not self.train:
            raise InvalidConfigError(f"self_distill.train lists what is trained, from {', '.join(TRAINABLE)}; "
                                     f"got {list(self.train)}.")
        if self.loss not in SELF_DISTILL_LOSSES:
            raise InvalidConfigError(f"self_distill.loss must be one of {', '.join(SELF_DISTILL_LOSSES)}; "
                                     f"got {self.loss!r}.")

    @property
    def samples(self) -> int:
        """Training windows of seq_len tokens."""
        return self.tokens // self.seq_len

    def to_dict(self) -> dict:
        return {"steps": self.steps, "block_steps": self.block_steps, "lr": self.lr, "rounding_lr": self.rounding_lr,
                "tokens": self.tokens, "batch_size": self.batch_size, "seq_len": self.seq_len,
                "train": list(self.train), "loss": self.loss, "top_k": self.top_k, "seed": self.seed,
                "held_out_tokens": self.held_out_tokens}

    @classmethod
    def from_dict(cls, data: dict) -> "SelfDistillConfig":
        data = check_mapping_lists(data)
        return cls(**check_mapping(cls, data, "self_distill", example="{steps: 200, train: [scales, norms]}"))

    def describe(self) -> str:
        parts = []
        if self.block_steps:
            parts.append(f"{self.block_steps} steps per decoder layer")
        if self.steps:
            parts.append(f"{self.steps} end-to-end steps ({'KL on the original top-' + str(self.top_k) if self.loss == 'kl' else 'cross-entropy'})")
        return (f"self-distillation: {' then '.join(parts)} of {self.batch_size} x {self.seq_len} tokens, "
                f"training {', '.join(self.train)}")


def check_mapping_lists(data):
    """YAML gives `train` as a list; the field holds a tuple."""
    if isinstance(data, dict) and isinstance(data.get("train"), list):
        return {**data, "train": tuple(data["train"])}
    return data
