"""Calibration statistics for MoE experts: the tokens routed to each expert, and a fallback.

An expert's Hessian (GPTQ) and activation ranges come from the calibration tokens the router sends
it, as in the model's real use. An expert that receives fewer than `min_expert_tokens` of them
would be calibrated on almost nothing (or not at all), so after the routed pass its statistics are
collected again from *every* calibration token (the expert runs on all of them; the layer's output
still sums the routed contributions only). `moe_calibration: all` does that for every expert from
the start (llm-compressor's `calibrate_all_experts`). The report gives each expert's routed count
and says which experts used the fallback.
"""

from __future__ import annotations

from torch import nn

from llmquant.arch.experts import LinearExperts

ALL_TOKENS = "statistics from all"  # how a note says that an expert was calibrated on every token


class ExpertCalibration:
    """Counts the tokens routed to the experts under `root` (names prefixed with `prefix`) during
    calibration passes and switches experts with too few of them to every token."""

    def __init__(self, root: nn.Module, prefix: str, mode: str, min_tokens: int, total_tokens: int):
        self.min_tokens, self.total_tokens = min_tokens, total_tokens
        self.experts = {f"{prefix}{n}": m for n, m in root.named_modules() if isinstance(m, LinearExperts)}
        self.routed: dict[str, int] = {}  # expert Linear name -> routed calibration tokens
        self.all_tokens: set[str] = set()  # expert Linear names whose statistics saw every token
        for name, experts in self.experts.items():
            experts.count_routed(True)
            if mode == "all":
                experts.all_tokens = set(range(len(experts)))
                self.all_tokens |= set(self._linear_names(name, experts, range(len(experts))))

    @staticmethod
    def _linear_names(name: str, experts: LinearExperts, indices) -> list[str]:
        return [f"{name}.{e}.{proj}" for e in indices for proj in experts[e].projection_names]

    def fallback(self) -> set[str]:
        """After a routed pass: experts that saw fewer than min_tokens now run on every token.
        Returns the names of their Linear layers (whose statistics must be collected again)."""
        names: set[str] = set()
        for name, experts in self.experts.items():
            counts = experts.routed_tokens.tolist()
            for e, count in enumerate(counts):
                for linear in self._linear_names(name, experts, [e]):
                    self.routed[linear] = count
            low = {e for e, count in enumerate(counts) if count < self.min_tokens} - experts.all_tokens
            experts.all_tokens |= low
            names |= set(self._linear_names(name, experts, sorted(low)))
        self.all_tokens |= names
        return names

    def finish(self) -> None:
        """Stop counting; experts run on their routed tokens only again."""
        for experts in self.experts.values():
            experts.count_routed(False)
            experts.all_tokens = set()

    def note(self, linear: str) -> str | None:
        """The report's note for an expert Linear layer (None for layers outside experts)."""
        if linear not in self.routed:
            return None
        routed = self.routed[linear]
        if linear in self.all_tokens:
            why = "moe_calibration: all" if routed >= self.min_tokens else f"fewer than {self.min_tokens}"
            return f"expert: {routed} routed tokens ({why}): {ALL_TOKENS} {self.total_tokens} calibration tokens"
        return f"expert: {routed} routed calibration tokens"

    def annotate(self, entry) -> None:
        """Add an expert layer's routed count and calibration note to its LayerReport."""
        note = self.note(entry.name)
        if note is not None:
            entry.note = "; ".join(n for n in (entry.note, note) if n)
            entry.calibration_tokens = self.routed[entry.name]
