"""`llmquant export [MODEL] --format gguf --output FILE.gguf`: flags over `llmquant.export(...)`."""

from __future__ import annotations

import argparse
import sys

from llmquant.cli.commands import summary
from llmquant.cli.common import add_trust_flags
from llmquant.runtime import DTYPE_NAMES

EPILOG = """\
file types (--type), as llama.cpp names them:
  Q4_0 Q4_1 Q5_0 Q5_1 Q8_0   one type in blocks of 32 (the output projection Q6_K or Q8_0, as llama.cpp)
  Q4_K_M Q4_K_S Q5_K_M Q5_K_S Q6_K   K-quant mixtures: blocks of 256, 6-bit sub-block scales;
                             _M keeps attention V and FFN down of some layers at Q6_K (llama.cpp's rules)
  F16 BF16 F32               unquantized
Rows whose length a type cannot hold fall back as llama.cpp does (Q4_K -> Q5_0, Q6_K -> Q8_0, ...).

From one of our quantized folders, INT4 symmetric / asymmetric and INT8 symmetric weights in groups
of 32 are carried over code for code (Q4_0 / Q4_1 / Q8_0; only the scales become f16, and the change
is reported). Other layouts are refused unless --requantize. From a float model, the weights are
quantized into the type: by GPTQ on calibration text (default) or by rounding (--method rtn).

The file is read back and checked code for code; where llama-cpp-python is importable (here, or in
the Python given by --llama-cpp-python), it also runs the file and reports KL divergence and top-1
agreement against llmquant's runtime on held-out text.

examples:
  llmquant export --type Q4_K_M --output smol-q4km.gguf             # demo model, GPTQ into Q4_K_M
  llmquant quantize --scheme W4A16 --group-size 32 --gptq --output smol-g32
  llmquant export smol-g32 --output smol-q4_0.gguf                  # lossless: our codes as Q4_0
  llmquant export org/model --type Q8_0 --method rtn --output model-q8.gguf
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help=summary("export"),
        description="Write a model, or one of llmquant's quantized folders, as a GGUF file that llama.cpp, "
        "Ollama and LM Studio load, and check the file: codes read back bit for bit, and (with "
        "llama-cpp-python) its outputs against llmquant's.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default=None,
                   help="a quantized folder from llmquant quantize, a Hub id, a local safetensors folder; "
                   "omitted: the built-in demo model")
    p.add_argument("--format", default="gguf", choices=("gguf",), help="the file format (default: gguf)")
    p.add_argument("--output", "-o", required=True, metavar="FILE.gguf", help="the file to write")
    p.add_argument("--type", default=None, metavar="TYPE",
                   help="file type (see below; default: a quantized folder's own type, else Q4_K_M)")
    p.add_argument("--method", default="gptq", choices=("gptq", "rtn"),
                   help="how float weights are quantized: GPTQ on calibration text (default) or rounding "
                   "with the scale search")
    p.add_argument("--requantize", action="store_true",
                   help="re-round quantized layers whose layout GGUF cannot hold (e.g. group 128) from their "
                   "dequantized weights; the added error is reported")
    cal = p.add_argument_group("calibration (GPTQ)")
    cal.add_argument("--dataset", default="builtin",
                     help="calibration text: builtin, a Hub dataset id, or a local .txt/.jsonl/.parquet file")
    cal.add_argument("--num-samples", type=int, default=128, help="calibration windows (default 128)")
    cal.add_argument("--seq-len", type=int, default=512, help="tokens per window (default 512)")
    cal.add_argument("--seed", type=int, default=0, help="which windows are drawn")
    cal.add_argument("--dampening", type=float, default=0.01, help="GPTQ Hessian dampening (default 0.01)")
    p.add_argument("--dtype", default="float32", choices=DTYPE_NAMES,
                   help="dtype the model is loaded and calibrated in (default float32; bfloat16 halves the memory "
                   "of a large model; GPTQ itself works in float32 one weight at a time)")
    p.add_argument("--llama-cpp-python", default=None, metavar="PYTHON",
                   help="a Python that can import llama_cpp, to run the file in llama.cpp after writing it "
                   "(default: this Python, if it can)")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip reading the file back and running it")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--revision", default=None, help="Hub branch, tag or commit (Hub ids only)")
    add_trust_flags(p)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from llmquant.config.recipe import CalibrationConfig
    from llmquant.export.gguf.api import export

    calibration = CalibrationConfig(dataset=args.dataset, num_samples=args.num_samples, seq_len=args.seq_len,
                                    seed=args.seed)
    result = export(args.model, args.output, format=args.format, type=args.type, method=args.method,
                    requantize=args.requantize, calibration=calibration, dampening=args.dampening, dtype=args.dtype,
                    overwrite=args.overwrite, verify=args.verify, llama_cpp_python=args.llama_cpp_python,
                    revision=args.revision, allow_pickle=args.allow_pickle,
                    trust_remote_code=args.trust_remote_code, progress=not args.quiet)
    for line in result.summary_lines():
        print(line)
    sys.stdout.flush()
    return 0
