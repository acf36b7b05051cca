"""`llmquant --help` answers without importing torch, transformers or any command module, and
lists exactly what the full parser lists."""

from __future__ import annotations

import subprocess
import sys
import time

from llmquant.cli import COMMANDS, build_parser


def test_top_level_help_of_the_light_parser_equals_the_full_one():
    assert build_parser([]).format_help() == build_parser().format_help()


def test_help_imports_no_heavy_module_and_answers_fast():
    code = ("import sys, time; t = time.perf_counter(); from llmquant.cli import main\n"
            "try: main(['--help'])\nexcept SystemExit: pass\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'datasets')"
            " or m in {%s})\n"
            "print('HEAVY', heavy, 'SECONDS', time.perf_counter() - t, file=sys.stderr)"
            % ", ".join(repr(module) for module, _ in COMMANDS.values()))
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    wall = time.perf_counter() - start
    assert "usage: llmquant" in out.stdout and all(name in out.stdout for name in COMMANDS)
    assert "HEAVY [] SECONDS" in out.stderr, out.stderr
    # The interpreter itself starts in ~50 ms; importing torch alone takes over a second here.
    # A generous bound that still fails if torch is imported on the way.
    assert wall < 2.0, f"llmquant --help took {wall:.2f} s"


def test_a_command_still_gets_its_full_flags():
    out = subprocess.run([sys.executable, "-m", "llmquant", "quantize", "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert "--group-size" in out and "--gptq" in out
