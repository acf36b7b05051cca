"""`llmquant quantize`: flags over `llmquant.quantize(...)`, same names."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from llmquant.cli.common import add_model_arguments, model_kwargs
from llmquant.errors import InvalidConfigError
from llmquant.config.args import ACTIVATION_OBSERVERS, WEIGHT_OBSERVERS
from llmquant.config.presets import PRESETS
from llmquant.config.recipe import GROUP_SIZE_FALLBACKS

EPILOG = """\
schemes:
  W8A16        INT8 weights per output channel
  W4A16        INT4 weights per group (default; group 128, or 64/32 when the model's widths
               need it; mse clipping search)
  W4A16_ASYM   INT4 weights per group with zero points (better INT4 quality; vLLM loads it,
               transformers not yet: see README)
  W8A8         INT8 weights per channel + INT8 activations (dynamic per token; --activations
               static), after SmoothQuant (--no-smoothquant to skip it)
  FP8          FP8 E4M3 weights per tensor + activations static per tensor (calibrated)
  FP8_DYNAMIC  FP8 weights per channel + activations dynamic per token, after SmoothQuant
  FP8_W        FP8 weights per channel, activations in the model dtype

examples:
  llmquant quantize --scheme W4A16 --group-size 64 --observer mse --output smol-w4a16
  llmquant quantize org/model --scheme FP8 --observer percentile --percentile 99.99 --output out/
  llmquant quantize --scheme W4A16 --group-size 64 --gptq --output smol-w4a16-gptq
  llmquant quantize --scheme W4A16 --group-size 64 --gptq --target-bits 5 --output smol-mixed
  llmquant quantize --scheme W4A16 --gptq --output out/ --resume   # continue an interrupted run
  llmquant quantize --scheme W8A8 --gptq --output smol-w8a8-gptq   # SmoothQuant, then GPTQ
  llmquant quantize ./my-model --recipe configs/quant/w8a8.yaml --output out/
  llmquant quantize org/model --scheme W8A8 --output out/ --push-to-hub me/model-W8A8
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quantize", help="quantize a model and save a compressed-tensors checkpoint",
        description="Quantize a model's Linear layers and save a checkpoint that vLLM, transformers "
        "and llmquant load. Prints a per-layer error report and checks the saved folder against the "
        "original model on held-out text.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("-o", "--output", default=None,
                   help="output folder (default: ./<model name>-<scheme>); written atomically")
    p.add_argument("--overwrite", action="store_true", help="replace the output folder if it exists")
    what = p.add_argument_group("what to quantize")
    what.add_argument("--scheme", type=str.upper, choices=list(PRESETS), default=None,
                      help="a named scheme (default W4A16); see the list below")
    what.add_argument("--recipe", default=None, help="a YAML recipe (configs/quant/*.yaml); flags override it")
    what.add_argument("--group-size", type=int, default=None, help="INT4/INT8 group size (32, 64, 128)")
    sym = what.add_mutually_exclusive_group()
    sym.add_argument("--symmetric", dest="symmetric", action="store_true", default=None,
                     help="symmetric weights (no zero point)")
    sym.add_argument("--asymmetric", dest="symmetric", action="store_false",
                     help="asymmetric weights (zero points; INT only)")
    what.add_argument("--activations", choices=("dynamic", "static"), default=None,
                      help="activation scales per token at run time, or per tensor from calibration")
    what.add_argument("--targets", nargs="+", default=None, metavar="PATTERN",
                      help="modules to quantize: class names (Linear), exact names, or re:REGEX")
    what.add_argument("--ignore", nargs="+", default=None, metavar="PATTERN",
                      help="modules to keep in full precision (default: lm_head)")
    what.add_argument("--group-size-fallback", choices=GROUP_SIZE_FALLBACKS, default=None,
                      help="for layers whose width the group size does not divide: fail (default), "
                      "quantize per channel, or skip")
    obs = p.add_argument_group("observers (how ranges are chosen)")
    obs.add_argument("--observer", choices=WEIGHT_OBSERVERS, default=None,
                     help="minmax: full range; percentile: clip at --percentile; mse: search the "
                     "clipping that minimizes weight error (weights only). Applies to weights and "
                     "to static activations")
    obs.add_argument("--percentile", type=float, default=None, help="e.g. 99.9 or 99.99 (default 99.99)")
    obs.add_argument("--act-observer", dest="activation_observer", choices=ACTIVATION_OBSERVERS, default=None,
                     help="observer for static activations only")
    obs.add_argument("--act-percentile", dest="activation_percentile", type=float, default=None,
                     help="percentile for static activations only")
    sq = what.add_mutually_exclusive_group()
    sq.add_argument("--smoothquant", type=_alpha, nargs="?", const="auto", default=None, metavar="ALPHA",
                    help="SmoothQuant before quantizing (activation schemes; on by default for W8A8): move "
                    "activation outliers into the weights with migration strength ALPHA in [0, 1], or "
                    "'auto' (the default) to search the best value per layer")
    sq.add_argument("--no-smoothquant", dest="smoothquant", action="store_false", help="turn SmoothQuant off")
    gq = p.add_argument_group("GPTQ (rounding that corrects each column's error with the next columns)")
    gq.add_argument("--gptq", dest="gptq", action="store_true", default=None,
                    help="quantize with GPTQ on the calibration data instead of plain rounding (after "
                    "SmoothQuant when both run), decoder layer by decoder layer; same checkpoint format")
    gq.add_argument("--no-gptq", dest="gptq", action="store_false", help="plain rounding even if the recipe says GPTQ")
    gq.add_argument("--gptq-block-size", type=int, default=None, help="columns per error-feedback block (default 128)")
    gq.add_argument("--gptq-dampening", type=float, default=None,
                    help="fraction of the Hessian's mean diagonal added before inverting it (default 0.01)")
    gq.add_argument("--act-order", dest="act_order", action=argparse.BooleanOptionalAction, default=None,
                    help="round the most active input columns first (on by default with --gptq; groups stay "
                    "static, so the checkpoint needs no g_idx)")
    gq.add_argument("--weighted-clipping", dest="weighted_clipping", action=argparse.BooleanOptionalAction,
                    default=None, help="INT weights: choose each group's clipping by the error it causes on the "
                    "calibration inputs, not by the weights alone (on by default with --gptq)")
    gq.add_argument("--gptq-refit-rounds", dest="refit_rounds", type=int, default=None, metavar="N",
                    help="least-squares refits of the INT scales to the rounded values, each after a GPTQ pass "
                    "(default 1; 0 turns it off)")

    gq.add_argument("--awq", dest="awq", action="store_true", default=None,
                    help="weight-only schemes: search activation-aware per-channel scales (AWQ) and fold them "
                    "into the preceding norm / up_proj before rounding (composes with --gptq)")
    mixg = what.add_mutually_exclusive_group()
    mixg.add_argument("--target-bits", type=float, default=None, metavar="B",
                      help="mixed precision (W4A16 schemes): measure each layer's sensitivity (KL of the output "
                      "with only that layer quantized) and move the most sensitive layers to W8A16 until the "
                      "average bits per weight (scales included) reaches B; one checkpoint, one config group "
                      "per scheme")
    mixg.add_argument("--max-ppl-increase", type=float, default=None, metavar="P",
                      help="mixed precision: upgrade sensitive layers until the estimated perplexity increase "
                      "is at most P percent")
    gq.add_argument("--resume", action="store_true",
                    help="continue an interrupted GPTQ run at the layer it reached (its progress is kept in "
                    "OUTPUT.resume/ until the checkpoint is saved); the settings must be the same")
    cal = p.add_argument_group("calibration data (activation schemes and GPTQ)")
    cal.add_argument("--dataset", default=None,
                     help="builtin (default), a .txt/.jsonl/.parquet file, or a Hub dataset name[:config]")
    cal.add_argument("--dataset-config", default=None, help="Hub dataset configuration")
    cal.add_argument("--text-field", default=None, help="column holding the text (jsonl/parquet/Hub)")
    cal.add_argument("--num-samples", type=int, default=None, help="calibration samples (default 128)")
    cal.add_argument("--seq-len", type=int, default=None, help="tokens per sample (default 512)")
    cal.add_argument("--seed", type=int, default=None, help="which windows are drawn (default 0)")
    cal.add_argument("--moe-calibration", choices=["routed", "all"], default=None,
                     help="MoE experts: calibrate each expert on the tokens routed to it (routed, default; an "
                     "expert routed fewer than --min-expert-tokens falls back to every token), or every expert "
                     "on every calibration token (all)")
    cal.add_argument("--min-expert-tokens", type=int, default=None, metavar="N",
                     help="with --moe-calibration routed: experts routed fewer tokens are calibrated on every "
                     "token (default 128)")
    ver = p.add_argument_group("verification")
    ver.add_argument("--no-verify", dest="verify", action="store_false",
                     help="skip reloading the output and comparing it with the original")
    ver.add_argument("--verify-tokens", type=int, default=2048, help="held-out tokens compared (default 2048)")
    hub = p.add_argument_group("publishing")
    hub.add_argument("--push-to-hub", default=None, metavar="REPO_ID",
                     help="then upload the output folder to this Hub repository with a model card, as "
                     "`llmquant push OUTPUT REPO_ID` does (token from HF_TOKEN or `hf auth login`)")
    hub.add_argument("--private", action="store_true", help="with --push-to-hub: create the repository private")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(handler=run)


def _alpha(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number in [0, 1], got {text!r}") from None


def default_output(model: str | None, scheme: str) -> Path:
    name = Path(str(model).rstrip("/")).name if model else "SmolLM2-135M-Instruct"
    name = re.sub(r"\.gguf$", "", name)
    return Path.cwd() / f"{name}-{scheme}"


def run(args: argparse.Namespace) -> int:
    from llmquant.quant.pipeline.quantize import quantize

    if args.output is None:
        args.output = default_output(args.model, args.scheme or (Path(args.recipe).stem if args.recipe else "W4A16"))
    gptq = args.gptq
    refinements = {k: getattr(args, k) for k in ("weighted_clipping", "refit_rounds")
                   if getattr(args, k) is not None}
    if refinements:  # GPTQ options: they turn GPTQ on, over the recipe's other GPTQ settings
        if gptq is False:
            raise InvalidConfigError("GPTQ options (--weighted-clipping, --gptq-refit-rounds) "
                                     "were given with --no-gptq.")
        gptq = refinements
    result = quantize(
        args.model, output=args.output, scheme=args.scheme, recipe=args.recipe, group_size=args.group_size,
        symmetric=args.symmetric, observer=args.observer, percentile=args.percentile,
        activation_observer=args.activation_observer, activation_percentile=args.activation_percentile,
        activations=args.activations, targets=args.targets, ignore=args.ignore,
        group_size_fallback=args.group_size_fallback, dataset=args.dataset, dataset_config=args.dataset_config,
        text_field=args.text_field, num_samples=args.num_samples, seq_len=args.seq_len, seed=args.seed,
        smoothquant=args.smoothquant, gptq=gptq, gptq_block_size=args.gptq_block_size,
        gptq_dampening=args.gptq_dampening, act_order=args.act_order, awq=args.awq, target_bits=args.target_bits,
        max_ppl_increase=args.max_ppl_increase, moe_calibration=args.moe_calibration,
        min_expert_tokens=args.min_expert_tokens, resume=args.resume,
        overwrite=args.overwrite, verify=args.verify, verify_tokens=args.verify_tokens,
        push_to_hub=args.push_to_hub, private=args.private, progress=not args.quiet, **model_kwargs(args))
    report = result.report
    print(f"\n{result.recipe.name}: {result.recipe.scheme.describe()}")
    for line in report.summary_lines(warnings=False):
        print(line)
    if result.verification is not None:
        print(f"verification (reloaded checkpoint vs original): {result.verification.describe()}")
    size = f", {report.checkpoint_bytes / 1e6:.1f} MB" if report.checkpoint_bytes else ""
    print(f"saved {result.output_dir}{size} in {result.seconds:.1f} s "
          f"(per-layer report: {result.output_dir}/quantization_report.md)")
    if result.push is not None:
        from llmquant.cli.push_cmd import print_result

        print_result(result.push)
    for line in report.warnings():  # last, where it is seen
        print(line)
    sys.stdout.flush()
    return 0
