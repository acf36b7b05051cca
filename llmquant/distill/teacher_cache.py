"""Offline teacher logits: the teacher's top-k next-token log-probabilities, computed once and
stored as compact safetensors shards, so students train later without the teacher in memory.

Layout of a cache folder (written atomically):
    manifest.json                 k, seq_len, number of sequences, shard list, teacher, source
    shard-00000.safetensors       input_ids (n, T) int32, top_ids (n, T-1, k) int32,
                                  top_logprobs (n, T-1, k) float16
Row t of top_* is the teacher's distribution of token t+1 given tokens 0..t. Log-probs are at
temperature 1 over the full vocabulary; the training loss renormalizes them over the top-k.
About 6*k bytes per token: k = 32 costs 0.2 MB per 1,000 tokens, against 200 MB for full logits
over a 49k vocabulary in float32.

Two ways to fill it: a local teacher model, or any OpenAI-compatible server that returns
prompt log-probs (`/v1/completions` with `echo`, `logprobs: k`, `max_tokens: 0`; `llmquant
serve` and vLLM do), so one large served teacher feeds many students.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from llmquant.checkpoint.atomic import atomic_directory
from llmquant.errors import DataSourceError, InvalidConfigError

FORMAT = "llmquant-teacher-topk/1"
MANIFEST = "manifest.json"
PAD_LOGPROB = -1.0e4  # fills top-k slots an endpoint did not fill; exp() of it is exactly 0
DEFAULT_SHARD_SEQUENCES = 256
ENDPOINT_MAX_K = 20  # the most top log-probs an OpenAI-compatible endpoint returns per token


@dataclass
class TeacherCache:
    """A cache folder opened for reading; `get(indices)` returns one batch."""

    folder: Path
    manifest: dict

    @classmethod
    def open(cls, folder: str | os.PathLike) -> "TeacherCache":
        folder = Path(folder)
        path = folder / MANIFEST
        if not path.is_file():
            raise DataSourceError(f"{folder} is not a teacher cache (no {MANIFEST}); build one with "
                                  "llmquant distill --teacher-cache DIR, or fill_from_model / fill_from_endpoint.")
        manifest = json.loads(path.read_text(encoding="utf-8"))
        if manifest.get("format") != FORMAT:
            raise DataSourceError(f"{folder} holds format {manifest.get('format')!r}, expected {FORMAT!r}.")
        cache = cls(folder, manifest)
        cache._shards = {}
        return cache

    def __len__(self) -> int:
        return int(self.manifest["num_sequences"])

    @property
    def k(self) -> int:
        return int(self.manifest["k"])

    @property
    def seq_len(self) -> int:
        return int(self.manifest["seq_len"])

    def input_ids(self) -> torch.Tensor:
        """(N, T) int64, every sequence in order."""
        return torch.cat([self._shard(i)["input_ids"] for i in range(len(self.manifest["shards"]))]).long()

    def get(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input_ids (B, T) int64, top_ids (B, T-1, k) int64, top_logprobs (B, T-1, k) float32)."""
        per = int(self.manifest["shard_sequences"])
        rows = [[], [], []]
        for i in indices.tolist():
            shard = self._shard(i // per)
            j = i % per
            rows[0].append(shard["input_ids"][j])
            rows[1].append(shard["top_ids"][j])
            rows[2].append(shard["top_logprobs"][j])
        return (torch.stack(rows[0]).long(), torch.stack(rows[1]).long(), torch.stack(rows[2]).float())

    def _shard(self, index: int) -> dict[str, torch.Tensor]:
        if index not in self._shards:
            with safe_open(self.folder / self.manifest["shards"][index], framework="pt") as f:
                self._shards[index] = {k: f.get_tensor(k) for k in f.keys()}
        return self._shards[index]


def _write(folder: Path, sequences: torch.Tensor, top_ids: torch.Tensor, top_lp: torch.Tensor, *,
           teacher: str, source: str, shard_sequences: int, extra: dict | None = None) -> None:
    n, t = sequences.shape
    shards = []
    for s, start in enumerate(range(0, n, shard_sequences)):
        name = f"shard-{s:05d}.safetensors"
        end = start + shard_sequences
        save_file({"input_ids": sequences[start:end].to(torch.int32).contiguous(),
                   "top_ids": top_ids[start:end].to(torch.int32).contiguous(),
                   "top_logprobs": top_lp[start:end].to(torch.float16).contiguous()},
                  folder / name, metadata={"format": "pt"})
        shards.append(name)
    manifest = {"format": FORMAT, "k": int(top_ids.shape[-1]), "seq_len": t, "num_sequences": n,
                "shard_sequences": shard_sequences, "shards": shards, "teacher": teacher, "source": source,
                **(extra or {})}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")


@torch.no_grad()
def fill_from_model(model, sequences: torch.Tensor, output: str | os.PathLike, *, k: int = 32,
                    batch_size: int = 4, teacher: str = "", overwrite: bool = False,
                    shard_sequences: int = DEFAULT_SHARD_SEQUENCES, progress: bool = True) -> TeacherCache:
    """Run `model` over `sequences` (N, T) and store its top-k next-token log-probs."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    ids_out, lp_out = [], []
    try:
        for start in tqdm(range(0, len(sequences), batch_size), desc="teacher top-k", unit="batch",
                          disable=not progress, leave=False):
            batch = sequences[start:start + batch_size].to(device)
            logits = model(batch, use_cache=False).logits[:, :-1].float()  # (B, T-1, V)
            values, ids = torch.topk(torch.log_softmax(logits, dim=-1), k, dim=-1)
            ids_out.append(ids.cpu())
            lp_out.append(values.cpu())
    finally:
        model.train(was_training)
    with atomic_directory(output, overwrite=overwrite) as tmp:
        _write(tmp, sequences, torch.cat(ids_out), torch.cat(lp_out), teacher=teacher, source="local model",
               shard_sequences=shard_sequences)
    return TeacherCache.open(output)


def token_string_map(tokenizer) -> dict[str, int]:
    """Token text (each id decoded alone, as OpenAI logprobs report it) -> id, for the texts that
    name one id only; texts shared by several ids (e.g. partial UTF-8 bytes that all decode to
    U+FFFD) are left out, and resolved against the known prompt token where possible."""
    seen: dict[str, int] = {}
    ambiguous: set[str] = set()
    for i in range(len(tokenizer)):
        s = tokenizer.decode([i], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if s in seen:
            ambiguous.add(s)
        seen[s] = i
    return {s: i for s, i in seen.items() if s not in ambiguous}


def _post_json(url: str, body: dict, api_key: str | None, timeout: float) -> dict:
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        detail = e.read().decode(errors="replace")[:300]
        raise DataSourceError(f"The teacher endpoint {url} answered {e.code}: {detail}") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
        raise DataSourceError(f"Cannot reach the teacher endpoint {url}: {e}") from None


def fill_from_endpoint(base_url: str, tokenizer, sequences: torch.Tensor, output: str | os.PathLike, *,
                       model: str | None = None, k: int = 20, api_key: str | None = None,
                       overwrite: bool = False, timeout: float = 600.0,
                       shard_sequences: int = DEFAULT_SHARD_SEQUENCES, progress: bool = True) -> TeacherCache:
    """Fill a cache from an OpenAI-compatible server's prompt log-probs (k <= 20, the API limit).

    Each sequence is sent as token ids with `echo: true, logprobs: k, max_tokens: 0`; the
    returned top-k dicts are keyed by token text and mapped back to ids with the tokenizer
    (which must be the teacher's). Slots whose text cannot be mapped get PAD_LOGPROB."""
    if not 1 <= k <= ENDPOINT_MAX_K:
        raise InvalidConfigError(f"An OpenAI-compatible endpoint returns at most {ENDPOINT_MAX_K} top log-probs; "
                                 f"got k={k}.")
    api_key = api_key or os.environ.get("OPENAI_API_KEY")
    url = base_url.rstrip("/") + "/completions"
    if model is None:
        model = _first_model(base_url, api_key, timeout)
    text_to_id = token_string_map(tokenizer)
    n, t = sequences.shape
    top_ids = torch.zeros(n, t - 1, k, dtype=torch.int64)
    top_lp = torch.full((n, t - 1, k), PAD_LOGPROB, dtype=torch.float32)
    unmapped = 0
    for row in tqdm(range(n), desc="teacher top-k (endpoint)", unit="seq", disable=not progress, leave=False):
        prompt = sequences[row].tolist()
        reply = _post_json(url, {"model": model, "prompt": prompt, "max_tokens": 0, "echo": True,
                                 "logprobs": k, "temperature": 0}, api_key, timeout)
        entries = reply["choices"][0]["logprobs"]["top_logprobs"]
        if len(entries) != t:
            raise DataSourceError(f"The endpoint returned log-probs for {len(entries)} prompt tokens, "
                                  f"expected {t}; it may have re-tokenized the prompt.")
        for pos in range(1, t):  # entry pos predicts token pos from tokens < pos
            actual = prompt[pos]
            pairs = []
            for text, lp in (entries[pos] or {}).items():
                tid = text_to_id.get(text)
                if tid is None and text == tokenizer.decode([actual], skip_special_tokens=False,
                                                            clean_up_tokenization_spaces=False):
                    tid = actual
                if tid is None:
                    unmapped += 1
                    continue
                pairs.append((float(lp), tid))
            pairs.sort(reverse=True)
            for slot, (lp, tid) in enumerate(pairs[:k]):
                top_ids[row, pos - 1, slot] = tid
                top_lp[row, pos - 1, slot] = lp
    with atomic_directory(output, overwrite=overwrite) as tmp:
        _write(tmp, sequences, top_ids, top_lp, teacher=f"{model} at {base_url}", source="openai endpoint",
               shard_sequences=shard_sequences, extra={"unmapped_entries": unmapped})
    return TeacherCache.open(output)


def _first_model(base_url: str, api_key: str | None, timeout: float) -> str:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    req = urllib.request.Request(base_url.rstrip("/") + "/models", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            data = json.loads(r.read())["data"]
    except (urllib.error.URLError, TimeoutError, ConnectionError, KeyError, ValueError) as e:
        raise DataSourceError(f"Cannot list the models of {base_url}: {e}; pass the model name.") from None
    if not data:
        raise DataSourceError(f"{base_url} serves no model.")
    return data[0]["id"]
