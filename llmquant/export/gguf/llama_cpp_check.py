"""Running a written GGUF file in llama.cpp and comparing its next-token distributions with ours.

llama-cpp-python is not a dependency of llmquant (it builds llama.cpp from source); it is often
installed in an environment of its own. `find_llama_cpp_python` finds a Python that can import
it: the one given, or this one. The file runs there in a child process on held-out token ids
(the same ids, no re-tokenization), and the child's logits come back as a .npy file; KL divergence
and top-1 agreement are computed here against our runtime's logits on the same ids.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

_CHILD = r"""
import sys, numpy as np, llama_cpp
path, ids_file, out_file = sys.argv[1:4]
ids = np.load(ids_file).tolist()
llm = llama_cpp.Llama(model_path=path, n_ctx=len(ids), n_batch=len(ids), logits_all=True, verbose=False)
llm.eval(ids)
np.save(out_file, np.asarray(llm.scores[:len(ids)], dtype=np.float32))
"""


def find_llama_cpp_python(python: str | None) -> str | None:
    """A Python that imports llama_cpp: `python` if given (checked by the run), else this one, or None."""
    if python:
        return python
    return sys.executable if importlib.util.find_spec("llama_cpp") is not None else None


def llama_cpp_logits(python: str, path: Path, ids: list[int]) -> np.ndarray:
    with tempfile.TemporaryDirectory() as tmp:
        ids_file, out_file = Path(tmp) / "ids.npy", Path(tmp) / "logits.npy"
        np.save(ids_file, np.asarray(ids, dtype=np.int64))
        proc = subprocess.run([python, "-c", _CHILD, str(path), str(ids_file), str(out_file)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"llama.cpp ({python}) could not run {path}:\n{proc.stderr[-2000:]}")
        return np.load(out_file)


def compare_with_llama_cpp(python: str, path: Path, model, ids: list[int]) -> dict:
    """Mean KL(ours || llama.cpp) per token and top-1 agreement over `ids`' positions."""
    theirs = torch.from_numpy(llama_cpp_logits(python, path, ids)).float()
    with torch.inference_mode():
        ours = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float()
    logp, logq = torch.log_softmax(ours, -1), torch.log_softmax(theirs, -1)
    kl = (logp.exp() * (logp - logq)).sum(-1)
    top1 = (ours.argmax(-1) == theirs.argmax(-1)).float().mean()
    return {"tokens": len(ids), "kl_mean": float(kl.mean()), "kl_max": float(kl.max()), "top1_agreement": float(top1),
            "python": python}
