"""A Hub dataset requested offline fails with a message that says what to do instead.

`datasets` and `huggingface_hub` read HF_HUB_OFFLINE when they are imported, so the
check runs in a fresh interpreter with offline mode on and an empty cache.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

_SCRIPT = """
import json
from llmquant.data import load_text_split
from llmquant.errors import DataSourceError
try:
    load_text_split("wikitext:wikitext-2-raw-v1", "evaluation")
except DataSourceError as e:
    print(json.dumps({"error": type(e).__name__, "message": str(e)}))
else:
    print(json.dumps({"error": None}))
"""


def test_hub_dataset_while_offline_is_a_clear_data_source_error(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               HF_HOME=str(tmp_path / "hf"), HF_DATASETS_CACHE=str(tmp_path / "datasets"))
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    outcome = json.loads(proc.stdout.strip().splitlines()[-1])
    assert outcome["error"] == "DataSourceError"
    message = outcome["message"]
    assert "wikitext" in message and "HF_HUB_OFFLINE" in message
    assert "builtin" in message and ".txt" in message  # says what to use instead


def test_unresolvable_hub_fails_fast_instead_of_retrying(monkeypatch):
    import time

    import pytest

    from llmquant.data import hub, load_text_split
    from llmquant.errors import DataSourceError

    # Stand-in for a machine without DNS: the check is ours, everything after it is real.
    monkeypatch.setattr(hub, "hub_host_resolves", lambda: False)
    for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(variable, raising=False)
    start = time.perf_counter()
    with pytest.raises(DataSourceError) as info:
        load_text_split("llmquant-tests/no-such-dataset", "evaluation")
    assert time.perf_counter() - start < 15  # huggingface_hub's own retries take ~25 s
    assert "cannot be reached" in str(info.value)
    assert "no-such-dataset" in str(info.value)
