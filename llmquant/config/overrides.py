"""How a keyword argument (or CLI flag) changes a recipe, for those that are not one field.

Each function takes the recipe as a dict (`Recipe.to_dict()`), the value given, and every
recipe keyword given (some flags depend on others: `observer` also sets static activations'
observer unless `activation_observer` says otherwise), and edits the dict in place. The
table in flags.py names which function (or which plain field) each keyword sets; the edited
dict goes back through `Recipe.from_dict`, so it is validated like a recipe file.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from llmquant.config.recipe import AWQConfig, GPTQConfig, patterns
from llmquant.errors import InvalidConfigError

ACTIVATION_SCHEMES = "W8A8/FP8/FP8_DYNAMIC"
# The keywords that set one GPTQ field (and so turn GPTQ on); flags.py's table names them too.
GPTQ_FIELDS = {"gptq_block_size": "block_size", "gptq_dampening": "dampening", "act_order": "act_order",
               "weighted_clipping": "weighted_clipping", "gptq_refit_rounds": "refit_rounds"}


def set_path(data: dict, path: str, value: Any) -> None:
    """data["a"]["b"] = value for path "a.b"."""
    *parents, key = path.split(".")
    for p in parents:
        data = data[p]
    data[key] = value


def _name(data: dict) -> str:
    return data["quantize"]["scheme"] or "custom"


def _activations(data: dict, what: str) -> dict:
    acts = data["quantize"]["input_activations"]
    if acts is None:
        raise InvalidConfigError(f"{what} apply to schemes that quantize activations ({ACTIVATION_SCHEMES}), "
                                 f"not {_name(data)}.")
    return acts


def _static(data: dict) -> bool:
    acts = data["quantize"]["input_activations"]
    return acts is not None and not acts["dynamic"]


def group_size(data: dict, value: int, given: dict) -> None:
    data["quantize"]["weights"].update(strategy="group", group_size=value)


def observer(data: dict, value: str, given: dict) -> None:
    """The observer of every calibrated range: weights, and static activations (mse is a
    weight-only search, so static activations keep their own observer then)."""
    data["quantize"]["weights"]["observer"] = value
    if _static(data) and value in ("minmax", "percentile") and "activation_observer" not in given:
        data["quantize"]["input_activations"]["observer"] = value


def percentile(data: dict, value: float, given: dict) -> None:
    data["quantize"]["weights"]["percentile"] = value
    if _static(data) and "activation_percentile" not in given:
        data["quantize"]["input_activations"]["percentile"] = value


def activations(data: dict, value: str, given: dict) -> None:
    """"dynamic": scales per token at run time; "static": one scale per tensor from calibration."""
    acts = _activations(data, "--activations (static or dynamic)")
    if value not in ("static", "dynamic"):
        raise InvalidConfigError(f"activations must be 'static' or 'dynamic', got {value!r}.")
    acts.update(dynamic=value == "dynamic", strategy="token" if value == "dynamic" else "tensor")
    if value == "dynamic" and "activation_observer" not in given:
        acts["observer"] = "minmax"  # a dynamic scale is each token's own max


def activation_observer(data: dict, value: str, given: dict) -> None:
    _activations(data, "Activation options (--act-observer)")["observer"] = value


def activation_percentile(data: dict, value: float, given: dict) -> None:
    _activations(data, "Activation options (--act-percentile)")["percentile"] = value


def targets(data: dict, value, given: dict) -> None:
    if value:  # an empty list keeps the recipe's targets (nothing would be quantized otherwise)
        data["quantize"]["targets"] = list(patterns(value, "targets"))


def ignore(data: dict, value, given: dict) -> None:
    data["quantize"]["ignore"] = list(patterns(value, "ignore"))


def smoothquant(data: dict, value: float | str | bool, given: dict) -> None:
    """False: off; True: on with alpha "auto"; a number or "auto": that alpha."""
    if value is False:
        data["smoothquant"] = None
    else:
        data["smoothquant"] = {"alpha": "auto" if value is True else value}


def gptq(data: dict, value, given: dict) -> None:
    """False: plain rounding; True: GPTQ with the recipe's (or the default) settings; a GPTQConfig:
    GPTQ with its settings; a mapping of some of its fields: those over the recipe's settings."""
    if value is False:
        options = sorted(k for k in GPTQ_FIELDS if k in given)
        if options:
            raise InvalidConfigError(f"GPTQ options ({', '.join(options)}) were given with GPTQ turned off "
                                     "(--no-gptq or gptq=False); drop one or the other.")
        data["gptq"] = None
    elif value is True:
        data["gptq"] = data["gptq"] or dataclasses.asdict(GPTQConfig())
    elif isinstance(value, GPTQConfig):
        data["gptq"] = dataclasses.asdict(value)
    elif isinstance(value, dict):
        data["gptq"] = {**(data["gptq"] or dataclasses.asdict(GPTQConfig())), **value}
    else:
        raise InvalidConfigError(f"gptq must be true, false, a GPTQConfig or a mapping of its fields; got {value!r}.")


def gptq_field(name: str):
    """The setter of one GPTQ field: it turns GPTQ on, with the other fields as the recipe says."""
    def apply(data: dict, value, given: dict) -> None:
            data["gptq"] = {**(data["gptq"] or dataclasses.asdict(GPTQConfig())), GPTQ_FIELDS[name]: value}
    return apply


def awq(data: dict, value: bool, given: dict) -> None:
    data["awq"] = (data["awq"] or dataclasses.asdict(AWQConfig())) if value else None


def mixed_precision(data: dict, value: float, given: dict) -> None:
    """target_bits or max_ppl_increase: the goal of mixed precision (one of them), keeping the
    recipe's `high` scheme and sample count."""
    current = data["mixed_precision"] or {}
    keep = {k: current[k] for k in ("high", "samples") if k in current}
    data["mixed_precision"] = {**keep, "target_bits": given.get("target_bits"),
                               "max_ppl_increase": given.get("max_ppl_increase")}


def self_distill(data: dict, value, given: dict) -> None:
    """False: off; True: on with the recipe's (or the default) settings; an int: that many
    end-to-end steps; a mapping: those fields over the recipe's settings; `self_distill_loss` /
    `self_distill_train` (flags) change one field each."""
    from llmquant.config.self_distill import SelfDistillConfig

    if value is False:
        data["self_distill"] = None
        return
    current = data.get("self_distill") or SelfDistillConfig().to_dict()
    if value is True:
        changes = {}
    elif isinstance(value, bool) or not isinstance(value, (int, dict)):
        raise InvalidConfigError(f"self_distill must be true, false, a number of steps or a mapping of its "
                                 f"fields; got {value!r}.")
    elif isinstance(value, int):
        changes = {"steps": value}
    else:
        changes = dict(value)
    data["self_distill"] = {**current, **changes}


def self_distill_field(key: str):
    """The setter of one self-distillation field given as its own flag: it turns self-distillation on."""
    def apply(data: dict, value, given: dict) -> None:
        from llmquant.config.self_distill import SelfDistillConfig

        if given.get("self_distill") is False:
            raise InvalidConfigError(f"--self-distill-{key.replace('_', '-')} was given with self-distillation "
                                     "turned off; drop one or the other.")
        current = data.get("self_distill") or SelfDistillConfig().to_dict()
        data["self_distill"] = {**current, key: list(value) if isinstance(value, (list, tuple)) else value}
    return apply


def sparsity_field(key: str):
    """The setter of one pruning field (`prune` is the method): any of them turns pruning on with
    the recipe's (or the default) settings for the others; prune=False turns it off."""
    def apply(data: dict, value, given: dict) -> None:
        from llmquant.config.sparsity import SparsityConfig

        if key == "method" and value is False:
            data["sparsity"] = None
            return
        if given.get("prune") is False:
            raise InvalidConfigError(f"{key} was given with pruning turned off (--no-prune); drop one or the other.")
        current = data.get("sparsity") or {k: v for k, v in SparsityConfig().to_dict().items() if k != "sparsity"}
        data["sparsity"] = {**current, key: value}
    return apply
