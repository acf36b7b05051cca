"""Resolve model sources in a fresh process, as the CLI would, and report each outcome as JSON.

huggingface_hub reads HF_ENDPOINT, HF_HOME and HF_HUB_OFFLINE once, at import time, so tests that
set them run this script in its own interpreter. Several cases share one interpreter (starting one
costs seconds: llmquant imports torch) as long as they need the same environment.

    python resolve_runner.py '[{"case": "gated", "source": "org/x", "revision": null,
                                "allow_pickle": false}, ...]'

Prints one line per case: {"case", "source": {...}} on success, {"case", "error": <LLMQuantError
class>, "message"} on a user error. Any other exception is a bug and ends the run with a traceback.
"""

from __future__ import annotations

import json
import sys

from llmquant.errors import LLMQuantError
from llmquant.loading import resolve_source


def main() -> int:
    for request in json.loads(sys.argv[1]):
        outcome: dict = {"case": request["case"]}
        try:
            source = resolve_source(request["source"], revision=request.get("revision"),
                                    allow_pickle=request.get("allow_pickle", False))
            outcome["source"] = {"kind": source.kind, "name": source.name, "path": str(source.path),
                                 "revision": source.revision, "describe": source.describe()}
        except LLMQuantError as e:
            outcome.update(error=type(e).__name__, message=str(e))
        print(json.dumps(outcome), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
