"""One HTTP request = several engine requests (prompts x n); their events merged for asyncio.

The engine calls back from its own thread; `call_soon_threadsafe` hands each event to the
event loop. Callers `cancel()` in a `finally` when they stop reading for any reason (finished,
client gone, error), which frees the batch slots and KV rows of whatever still generates.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from llmquant.serve.events import TokenEvent
from llmquant.serve.sampling import SamplingParams

DISCONNECT_POLL_S = 1.0


@dataclass
class ChoiceTimes:
    arrived: float
    first: float | None = None
    last: float | None = None


class Fanout:
    def __init__(self, engine, metrics=None):
        self.engine, self.metrics = engine, metrics
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, TokenEvent]] = asyncio.Queue()
        self.handles = []
        self.open: set[int] = set()
        self.times: dict[int, ChoiceTimes] = {}

    def submit(self, index: int, prompt_ids: list[int], params: SamplingParams) -> None:
        def on_event(event: TokenEvent, index=index) -> None:
            self.loop.call_soon_threadsafe(self._deliver, index, event)

        self.times[index] = ChoiceTimes(arrived=time.perf_counter())
        self.handles.append(self.engine.submit(prompt_ids, params, on_event))
        self.open.add(index)

    def cancel(self) -> None:
        for handle in self.handles:
            handle.cancel()

    async def events(self, request=None):
        """(choice index, event) until every choice has finished. With a starlette `request`,
        stops (cancelling the rest) when the client disconnects."""
        while self.open:
            try:
                index, event = await asyncio.wait_for(self.queue.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if request is not None and await request.is_disconnected():
                    self.cancel()
                    return
                continue
            if event.finish_reason is not None:
                self.open.discard(index)
            yield index, event

    def _deliver(self, index: int, event: TokenEvent) -> None:
        # Observed here, not where events are consumed: a choice whose client has gone still
        # counts (its abort above all).
        self._observe(index, event)
        self.queue.put_nowait((index, event))

    def _observe(self, index: int, event: TokenEvent) -> None:
        t = self.times[index]
        now = time.perf_counter()
        if event.token_id is not None:
            if t.first is None:
                t.first = now
                if self.metrics:
                    self.metrics.ttft.observe(now - t.arrived)
            elif self.metrics:
                self.metrics.tpot.observe(now - t.last)
            t.last = now
        if event.finish_reason is not None and self.metrics:
            self.metrics.e2e.observe(now - t.arrived)
            self.metrics.finished.labels(event.finish_reason).inc()
            self.metrics.generation_tokens.inc(event.num_generated)
