"""Every keyword of `llmquant.quantize(...)` and flag of `llmquant quantize`, defined once.

Each row names the keyword (also the CLI flag's `dest`), what it fills — a recipe field, or a
field of one of the option objects (LoadOptions, VerifyOptions, RunOptions) — and its CLI
spelling and help. `quantize()` sorts its keyword arguments with this table, the CLI parser is
built from it, and `build_recipe` applies the recipe rows in table order. A new flag is one
row here (plus, for a new recipe field, the field itself).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Callable

from llmquant.config import overrides
from llmquant.config.args import ACTIVATION_OBSERVERS, WEIGHT_OBSERVERS
from llmquant.config.fields import reject_unknown_keys
from llmquant.config.options import LoadOptions, RunOptions, VerifyOptions
from llmquant.config.presets import PRESETS
from llmquant.config.sparsity import PRUNE_METHODS
from llmquant.config.recipe import GROUP_SIZE_FALLBACKS, MOE_CALIBRATION_MODES, Recipe, recipe_from_scheme
from llmquant.errors import InvalidConfigError

DEFAULT_SCHEME = "W4A16"
RECIPE, LOAD, VERIFY, RUN = "recipe", "load", "verification", "run"
OPTION_CLASSES = {LOAD: LoadOptions, VERIFY: VerifyOptions, RUN: RunOptions}

WHAT, OBSERVERS, GPTQ, PRUNE, SELF_DISTILL, DATA, MEMORY, CHECK, HUB = (
    "what to quantize", "observers (how ranges are chosen)",
    "GPTQ (rounding that corrects each column's error with the next columns)",
    "pruning (weights set to zero before rounding; with --gptq, inside GPTQ's pass with the mask held fixed)",
    "self-distillation (the original model teaches its quantized copy; same checkpoint format)",
    "calibration data (activation schemes and GPTQ)", "memory (models larger than RAM or the GPU)",
    "verification", "publishing")


@dataclass(frozen=True)
class Flag:
    name: str  # the keyword of quantize(), and the dest of the CLI flag
    into: str  # RECIPE, or the option object it fills (LOAD, VERIFY, RUN)
    flags: tuple[str, ...] = ()  # CLI spellings; (): the CLI declares it for every command (cli/common.py)
    help: str = ""
    group: str | None = None  # CLI help section
    cli: dict = field(default_factory=dict)  # argparse: type, choices, action, nargs, const, metavar
    negative: tuple[str, ...] = ()  # the opposite switch, same dest: (spelling, help)
    exclusive: str | None = None  # flags with the same id cannot be given together
    path: str | None = None  # a recipe field set as is ("calibration.num_samples")
    apply: Callable | None = None  # a recipe change that is not one field (overrides.py)

    def default(self) -> Any:
        """The CLI default: "not given" for the recipe, the option object's default otherwise."""
        if self.into == RECIPE:
            return None
        return {f.name: f.default for f in dataclasses.fields(OPTION_CLASSES[self.into])}[self.name]


def _alpha(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number in [0, 1], got {text!r}") from None


QUANTIZE_FLAGS: tuple[Flag, ...] = (
    # ---- where it goes ----
    Flag("output", RUN, ("-o", "--output"),
         "output folder (default: ./<model name>-<scheme>); written atomically"),
    Flag("overwrite", RUN, ("--overwrite",), "replace the output folder if it exists",
         cli=dict(action="store_true")),
    # ---- the recipe ----
    Flag("scheme", RECIPE, ("--scheme",), "a named scheme (default W4A16); see the list below", WHAT,
         cli=dict(type=str.upper, choices=list(PRESETS))),
    Flag("recipe", RECIPE, ("--recipe",), "a YAML recipe (configs/quant/*.yaml); flags override it", WHAT),
    Flag("group_size", RECIPE, ("--group-size",), "INT4/INT8 group size (32, 64, 128)", WHAT,
         cli=dict(type=int), apply=overrides.group_size),
    Flag("symmetric", RECIPE, ("--symmetric",), "symmetric weights (no zero point)", WHAT,
         cli=dict(action="store_true"), negative=("--asymmetric", "asymmetric weights (zero points; INT only)"),
         exclusive="symmetric", path="quantize.weights.symmetric"),
    Flag("activations", RECIPE, ("--activations",),
         "activation scales per token at run time, or per tensor from calibration", WHAT,
         cli=dict(choices=("dynamic", "static")), apply=overrides.activations),
    Flag("targets", RECIPE, ("--targets",), "modules to quantize: class names (Linear), exact names, or re:REGEX",
         WHAT, cli=dict(nargs="+", metavar="PATTERN"), apply=overrides.targets),
    Flag("ignore", RECIPE, ("--ignore",), "modules to keep in full precision (default: lm_head)", WHAT,
         cli=dict(nargs="+", metavar="PATTERN"), apply=overrides.ignore),
    Flag("group_size_fallback", RECIPE, ("--group-size-fallback",),
         "for layers whose width the group size does not divide: fail (default), quantize per channel, or skip",
         WHAT, cli=dict(choices=GROUP_SIZE_FALLBACKS), path="quantize.group_size_fallback"),
    Flag("observer", RECIPE, ("--observer",),
         "minmax: full range; percentile: clip at --percentile; mse: search the clipping that minimizes "
         "weight error (weights only). Applies to weights and to static activations", OBSERVERS,
         cli=dict(choices=WEIGHT_OBSERVERS), apply=overrides.observer),
    Flag("percentile", RECIPE, ("--percentile",), "e.g. 99.9 or 99.99 (default 99.99)", OBSERVERS,
         cli=dict(type=float), apply=overrides.percentile),
    Flag("activation_observer", RECIPE, ("--act-observer",), "observer for static activations only", OBSERVERS,
         cli=dict(choices=ACTIVATION_OBSERVERS), apply=overrides.activation_observer),
    Flag("activation_percentile", RECIPE, ("--act-percentile",), "percentile for static activations only",
         OBSERVERS, cli=dict(type=float), apply=overrides.activation_percentile),
    Flag("smoothquant", RECIPE, ("--smoothquant",),
         "SmoothQuant before quantizing (activation schemes; on by default for W8A8): move activation "
         "outliers into the weights with migration strength ALPHA in [0, 1], or 'auto' (the default) to "
         "search the best value per layer", WHAT,
         cli=dict(type=_alpha, nargs="?", const="auto", metavar="ALPHA"),
         negative=("--no-smoothquant", "turn SmoothQuant off"), exclusive="smoothquant",
         apply=overrides.smoothquant),
    Flag("gptq", RECIPE, ("--gptq",),
         "quantize with GPTQ on the calibration data instead of plain rounding (after SmoothQuant when both "
         "run), decoder layer by decoder layer; same checkpoint format", GPTQ,
         cli=dict(action="store_true"), negative=("--no-gptq", "plain rounding even if the recipe says GPTQ"),
         apply=overrides.gptq),
    Flag("gptq_block_size", RECIPE, ("--gptq-block-size",), "columns per error-feedback block (default 128)",
         GPTQ, cli=dict(type=int), apply=overrides.gptq_field("gptq_block_size")),
    Flag("gptq_dampening", RECIPE, ("--gptq-dampening",),
         "fraction of the Hessian's mean diagonal added before inverting it (default 0.01)", GPTQ,
         cli=dict(type=float), apply=overrides.gptq_field("gptq_dampening")),
    Flag("act_order", RECIPE, ("--act-order",),
         "round the most active input columns first (on by default with --gptq; groups stay static, so the "
         "checkpoint needs no g_idx)", GPTQ, cli=dict(action=argparse.BooleanOptionalAction),
         apply=overrides.gptq_field("act_order")),
    Flag("weighted_clipping", RECIPE, ("--weighted-clipping",),
         "INT weights: choose each group's clipping by the error it causes on the calibration inputs, not by "
         "the weights alone (on by default with --gptq)", GPTQ, cli=dict(action=argparse.BooleanOptionalAction),
         apply=overrides.gptq_field("weighted_clipping")),
    Flag("gptq_refit_rounds", RECIPE, ("--gptq-refit-rounds",),
         "least-squares refits of the INT scales to the rounded values, each after a GPTQ pass (default 1; "
         "0 turns it off)", GPTQ, cli=dict(type=int, metavar="N"), apply=overrides.gptq_field("gptq_refit_rounds")),
    Flag("awq", RECIPE, ("--awq",),
         "weight-only schemes: search activation-aware per-channel scales (AWQ) and fold them into the "
         "preceding norm / up_proj before rounding (composes with --gptq)", GPTQ,
         cli=dict(action="store_true"), apply=overrides.awq),
    Flag("target_bits", RECIPE, ("--target-bits",),
         "mixed precision (W4A16 schemes): measure each layer's sensitivity (KL of the output with only that "
         "layer quantized) and move the most sensitive layers to W8A16 until the average bits per weight "
         "(scales included) reaches B; one checkpoint, one config group per scheme", WHAT,
         cli=dict(type=float, metavar="B"), exclusive="mixed", apply=overrides.mixed_precision),
    Flag("max_ppl_increase", RECIPE, ("--max-ppl-increase",),
         "mixed precision: upgrade sensitive layers until the estimated perplexity increase is at most P percent",
         WHAT, cli=dict(type=float, metavar="P"), exclusive="mixed", apply=overrides.mixed_precision),
    Flag("prune", RECIPE, ("--prune",),
         "prune the targeted layers before rounding: magnitude (|W|), wanda (|W| x input norm, per output row) "
         "sparsegpt (error feedback with the calibration Hessian) or admm (gradual mask, least-squares weights: "
         "the lowest error)", PRUNE,
         cli=dict(choices=PRUNE_METHODS), negative=("--no-prune", "no pruning even if the recipe asks for it"),
         exclusive="prune", apply=overrides.sparsity_field("method")),
    Flag("sparsity", RECIPE, ("--sparsity",),
         "fraction of each pruned layer's weights set to zero (unstructured; default 0.5)", PRUNE,
         cli=dict(type=float, metavar="F"), apply=overrides.sparsity_field("sparsity")),
    Flag("sparsity_pattern", RECIPE, ("--sparsity-pattern",),
         "unstructured (default) or N:M, e.g. 2:4 (at most 2 nonzero weights in every 4 consecutive inputs: "
         "the layout of NVIDIA's sparse tensor cores) or 4:8", PRUNE, cli=dict(metavar="PATTERN"),
         apply=overrides.sparsity_field("pattern")),
    Flag("sparsity_allocation", RECIPE, ("--sparsity-allocation",),
         "uniform (default): every pruned layer gets --sparsity; outlier: per decoder layer, fewer zeros where "
         "more of the input-weighted weights are outliers (OWL), averaging to --sparsity (unstructured only)",
         PRUNE, cli=dict(choices=("uniform", "outlier")), apply=overrides.sparsity_field("allocation")),
    Flag("prune_iterations", RECIPE, ("--prune-iterations",), "admm: iterations per layer (default 20)", PRUNE,
         cli=dict(type=int, metavar="N"), apply=overrides.sparsity_field("iterations")),
    Flag("self_distill", RECIPE, ("--self-distill",),
         "after quantizing, train what the checkpoint format lets change (scales, zero points, norms; "
         "--self-distill-train adds rounding) so the quantized model matches the original's top-k "
         "predictions: first each decoder layer's outputs, then STEPS end-to-end steps (default 200) on the "
         "calibration split; the result is the same scheme and layout", SELF_DISTILL,
         cli=dict(type=int, nargs="?", const=True, metavar="STEPS"),
         negative=("--no-self-distill", "no self-distillation even if the recipe asks for it"),
         exclusive="self_distill", apply=overrides.self_distill),
    Flag("self_distill_loss", RECIPE, ("--self-distill-loss",),
         "kl: match the original's top-k log-probs (default); ce: plain next-token cross-entropy, no teacher",
         SELF_DISTILL, cli=dict(choices=("kl", "ce")), apply=overrides.self_distill_field("loss")),
    Flag("self_distill_train", RECIPE, ("--self-distill-train",),
         "what is trained: scales, zero_points, rounding (a bounded offset per integer code), norms "
         "(default: scales zero_points norms)", SELF_DISTILL,
         cli=dict(nargs="+", choices=("scales", "zero_points", "rounding", "norms"), metavar="PART"),
         apply=overrides.self_distill_field("train")),
    Flag("resume", RUN, ("--resume",),
         "continue an interrupted GPTQ run at the layer it reached (its progress is kept in OUTPUT.resume/ "
         "until the checkpoint is saved); the settings must be the same", GPTQ, cli=dict(action="store_true")),
    Flag("stream", RUN, ("--stream",),
         "read the model one decoder layer at a time from its safetensors files, so that memory holds one "
         "layer and the calibration activations, not the model (default: stream when the plan printed "
         "first says the whole model would not fit)", MEMORY, cli=dict(action="store_true"),
         negative=("--no-stream", "load the whole model into memory, whatever the plan says"), exclusive="stream"),
    Flag("max_shard_size", RUN, ("--max-shard-size",),
         "largest checkpoint shard, e.g. 5GB (default), 500MB or 2GiB; bigger checkpoints are split with a "
         "model.safetensors.index.json, as transformers writes them", MEMORY, cli=dict(metavar="SIZE")),
    Flag("dataset", RECIPE, ("--dataset",),
         "builtin (default), a .txt/.jsonl/.parquet file, or a Hub dataset name[:config]", DATA,
         path="calibration.dataset"),
    Flag("dataset_config", RECIPE, ("--dataset-config",), "Hub dataset configuration", DATA,
         path="calibration.config_name"),
    Flag("text_field", RECIPE, ("--text-field",), "column holding the text (jsonl/parquet/Hub)", DATA,
         path="calibration.text_field"),
    Flag("num_samples", RECIPE, ("--num-samples",), "calibration samples (default 128)", DATA,
         cli=dict(type=int), path="calibration.num_samples"),
    Flag("seq_len", RECIPE, ("--seq-len",), "tokens per sample (default 512)", DATA, cli=dict(type=int),
         path="calibration.seq_len"),
    Flag("seed", RECIPE, ("--seed",), "which windows are drawn (default 0)", DATA, cli=dict(type=int),
         path="calibration.seed"),
    Flag("moe_calibration", RECIPE, ("--moe-calibration",),
         "MoE experts: calibrate each expert on the tokens routed to it (routed, default; an expert routed "
         "fewer than --min-expert-tokens falls back to every token), or every expert on every calibration "
         "token (all)", DATA, cli=dict(choices=MOE_CALIBRATION_MODES), path="calibration.moe_calibration"),
    Flag("min_expert_tokens", RECIPE, ("--min-expert-tokens",),
         "with --moe-calibration routed: experts routed fewer tokens are calibrated on every token (default 128)",
         DATA, cli=dict(type=int, metavar="N"), path="calibration.min_expert_tokens"),
    # ---- how the source is loaded: the CLI declares these for every command (cli/common.py) ----
    Flag("revision", LOAD), Flag("dtype", LOAD), Flag("device", LOAD), Flag("allow_pickle", LOAD),
    Flag("trust_remote_code", LOAD),
    # ---- checking and publishing the result ----
    Flag("verify", VERIFY, ("--no-verify",), "skip reloading the output and comparing it with the original",
         CHECK, cli=dict(action="store_false")),
    Flag("verify_tokens", VERIFY, ("--verify-tokens",), "held-out tokens compared (default 2048)", CHECK,
         cli=dict(type=int)),
    Flag("push_to_hub", RUN, ("--push-to-hub",),
         "then upload the output folder to this Hub repository with a model card, as `llmquant push OUTPUT "
         "REPO_ID` does (token from HF_TOKEN or `hf auth login`)", HUB, cli=dict(metavar="REPO_ID")),
    Flag("private", RUN, ("--private",), "with --push-to-hub: create the repository private", HUB,
         cli=dict(action="store_true")),
    # progress: the CLI spells it -q/--quiet, as every command does (it also quiets the libraries).
    Flag("progress", RUN),
)
FLAGS_BY_NAME = {f.name: f for f in QUANTIZE_FLAGS}


def split_keywords(values: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Sort keyword arguments by what they fill: {RECIPE: {...}, LOAD: {...}, VERIFY: {...}, RUN: {...}}.
    An unknown keyword is refused with the valid ones."""
    reject_unknown_keys(values, FLAGS_BY_NAME, "the arguments of quantize()")
    out: dict[str, dict[str, Any]] = {RECIPE: {}, LOAD: {}, VERIFY: {}, RUN: {}}
    for name, value in values.items():
        out[FLAGS_BY_NAME[name].into][name] = value
    return out


def options(kind: str, base=None, **values):
    """The option object `kind` (LOAD, VERIFY or RUN): `base` (or the defaults) with `values` over it."""
    cls = OPTION_CLASSES[kind]
    if base is not None and not isinstance(base, cls):
        raise InvalidConfigError(f"{kind} must be a {cls.__name__}, got {type(base).__name__}.")
    return dataclasses.replace(base, **values) if base is not None else cls(**values)


def build_recipe(*, scheme: str | None = None, recipe: str | os.PathLike | Recipe | None = None,
                 **values: Any) -> Recipe:
    """A recipe from a file / object or a preset name, with the recipe keywords of the table
    (group_size=..., num_samples=..., gptq=True ...) layered on top; None means "not given"."""
    reject_unknown_keys(values, [f.name for f in QUANTIZE_FLAGS if f.into == RECIPE and f.name not in
                                 ("scheme", "recipe")], "the recipe arguments")
    if recipe is not None and scheme is not None:
        raise InvalidConfigError("Pass either a recipe or a scheme, not both (a recipe names its scheme).")
    if isinstance(recipe, str) and recipe.upper() in PRESETS and not os.path.exists(recipe):
        raise InvalidConfigError(f"{recipe!r} is a scheme name, not a recipe file: pass scheme={recipe!r} "
                                 f"(--scheme {recipe.upper()}).")
    if recipe is None:
        base = recipe_from_scheme(scheme or DEFAULT_SCHEME)
    else:
        base = recipe if isinstance(recipe, Recipe) else Recipe.load(recipe)
    given = {k: v for k, v in values.items() if v is not None}
    if not given:
        return base
    data = base.to_dict()
    for flag in QUANTIZE_FLAGS:  # table order: `activations` before the observers that depend on it
        if flag.name in given:
            if flag.apply is not None:
                flag.apply(data, given[flag.name], given)
            else:
                overrides.set_path(data, flag.path, given[flag.name])
    built = Recipe.from_dict(data)
    # A preset's group size adapts to the model unless a group size was asked for.
    return dataclasses.replace(built, adapt_group_size=base.adapt_group_size and "group_size" not in given)
