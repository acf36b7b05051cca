"""One accumulated input statistic per distinct input tensor of a decoder layer.

Linear layers handed the very same tensor (q/k/v projections, gate/up) see identical inputs, so
their Hessians are identical: the first layer to see a tensor owns the statistic and accumulates
it, and the layers hooked right after it on the same tensor share it instead of computing it
again (a third of the accumulation time on a llama-style layer). GPTQ, pruning and the GGUF
export's GPTQ all hook their layers this way.
"""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

from torch import Tensor

S = TypeVar("S")


class SharedInputs(Generic[S]):
    def __init__(self, new: Callable[[], S]):
        self._new = new
        self.entries: dict[str, S] = {}  # layer name -> its statistic (the owner's object when shared)
        self.owners: dict[str, str] = {}  # layer name -> the name that accumulates its statistic
        self._last: tuple[Tensor | None, str | None] = (None, None)  # the previous hook's input and owner

    def observe(self, name: str, x: Tensor) -> S | None:
        """Record that layer `name` was called on `x`; returns the statistic it must fold `x` into,
        or None when `name` shares the statistic of the layer called just before on the same `x`."""
        if name not in self.entries:
            last_x, last_owner = self._last
            owner = last_owner if last_x is x and last_owner is not None else name
            self.owners[name] = owner
            self.entries[name] = self.entries[owner] if owner != name else self._new()
        owner = self.owners[name]
        self._last = (x, owner)
        return self.entries[name] if owner == name else None

    def forget(self, name: str) -> None:
        """Drop `name`'s statistic (it starts again on its next call)."""
        self.entries.pop(name, None)
        self.owners.pop(name, None)

    def groups(self) -> dict[str, list[str]]:
        """Owner name -> the names sharing its statistic (the owner first), in call order."""
        out: dict[str, list[str]] = {}
        for name, owner in self.owners.items():
            out.setdefault(owner, []).append(name)
        return out
