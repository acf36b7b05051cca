"""`llmquant distill`: flags over `llmquant.distill(...)`, same names."""

from __future__ import annotations

import argparse
import sys

from llmquant.cli.commands import summary
from llmquant.cli.common import add_model_arguments, model_kwargs
from llmquant.distill.losses import DIVERGENCES
from llmquant.distill.recipe import MIXED_PRECISION, OPTIMIZERS, TEACHER_MODES

EPILOG = """\
examples:
  llmquant distill --student-layers 15 --steps 300 --output smol-15L
  llmquant distill org/teacher --student-layers 12 --intermediate-size 1024 --output student/
  llmquant distill org/teacher --student-config student.json --steps 2000 --output student/
  llmquant distill --recipe configs/distill/layer_drop_kd.yaml --output student/
  llmquant distill --student-layers 15 --qat-scheme W4A16 --qat-group-size 64 --output smol-15L-w4a16
  llmquant distill org/teacher --student-layers 15 --teacher-endpoint http://127.0.0.1:8000/v1 --output s/
  llmquant distill org/model --self model-W4A16/ --steps 200 --output model-W4A16-sd/
  llmquant distill --self model-W4A16/ --teacher-endpoint http://gpu-box:8000/v1 --output model-W4A16-sd/

Self-distillation (--self QUANTIZED): the teacher is the original model and the student its own
quantized folder; only what the checkpoint format can hold trains (scales, zero points, norms;
--self-train adds rounding), first each decoder layer against the original's outputs
(--block-steps), then --steps end-to-end steps on the original's top-k log-probs (KL with a
bucket for the rest of the vocabulary; --self-loss ce trains on plain cross-entropy instead).
The output is the same compressed-tensors checkpoint, verified against the original.
With --teacher-endpoint the original is served elsewhere (no ORIGINAL argument): its top-20
log-probs fill the cache once and only the end-to-end steps run (--block-steps needs the
original's layer outputs); the result is not verified against the original.

The student: --student-layers N keeps the N decoder layers that change the residual stream
most on training text (1 - cos(input, output)); --keep-layers lists them instead;
--intermediate-size / --kv-heads prune MLP neurons / KV groups by activation magnitude;
--student-config builds a fresh model (any architecture, the teacher's tokenizer).

The loss: (1 - kd_weight) * next-token cross-entropy + kd_weight * divergence (forward KL,
reverse KL or generalized JSD, temperature-scaled), optionally + hidden-state loss (recipe).
--teacher-mode offline computes the teacher's top-k log-probs once into --teacher-cache (or
fills it from --teacher-endpoint, any OpenAI-compatible server with prompt logprobs) and
trains without the teacher in memory.

Ctrl-C writes a resumable checkpoint into <output>.checkpoints (or --checkpoint-dir); run the
same command with --resume to continue exactly where it stopped.
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "distill", help=summary("distill"),
        description="Make a student from a teacher (drop layers, prune width, or a fresh config), train it "
        "with knowledge distillation (optionally quantization-aware) and save it as an ordinary checkpoint "
        "(or a compressed-tensors one after QAT).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p, positional="teacher")
    p.add_argument("-o", "--output", required=True, help="output folder; written atomically at the end")
    p.add_argument("--overwrite", action="store_true", help="replace the output folder if it exists")
    p.add_argument("--recipe", default=None, help="a YAML recipe (configs/distill/*.yaml); flags override it")
    s = p.add_argument_group("the student")
    s.add_argument("--student-layers", type=int, default=None, metavar="N",
                   help="keep the N most important decoder layers of the teacher")
    s.add_argument("--keep-layers", type=int, nargs="+", default=None, metavar="I",
                   help="keep exactly these decoder layers (0-based)")
    s.add_argument("--intermediate-size", type=int, default=None, help="prune MLP neurons to this many per layer")
    s.add_argument("--kv-heads", dest="num_key_value_heads", type=int, default=None, metavar="N",
                   help="prune KV groups (with their query heads) to this many per layer")
    s.add_argument("--student-config", default=None, metavar="FILE",
                   help="a fresh student from this config.json / .yaml (same tokenizer as the teacher)")
    s.add_argument("--student-init", default=None, metavar="FOLDER",
                   help="start from this model folder as it is, e.g. `llmquant prune`'s output: its zero "
                   "weights stay zero through training (recovery of a pruned model; with --qat-scheme too)")
    d = p.add_argument_group("data and training")
    d.add_argument("--data", "--dataset", dest="dataset", default=None,
                   help="builtin (default), a .txt/.jsonl/.parquet file, or a Hub dataset name[:config]; "
                   "its training split (the held-out split is kept for perplexity)")
    d.add_argument("--text-field", default=None, help="column holding the text (jsonl/parquet/Hub)")
    d.add_argument("--steps", type=int, default=None, help="optimizer steps (default 200)")
    d.add_argument("--batch-size", type=int, default=None, help="sequences per micro-batch (default 4)")
    d.add_argument("--grad-accum", type=int, default=None, help="micro-batches per optimizer step (default 1)")
    d.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 256)")
    d.add_argument("--lr", type=float, default=None, help="peak learning rate (default 1e-4)")
    d.add_argument("--mixed-precision", choices=MIXED_PRECISION, default=None, help="autocast dtype (default bf16)")
    d.add_argument("--optimizer", choices=OPTIMIZERS, default=None,
                   help="adamw (default) or adamw_8bit (bitsandbytes, where installed)")
    d.add_argument("--eval-every", type=int, default=None, help="held-out perplexity every N steps (0: never)")
    d.add_argument("--eval-tokens", type=int, default=None, help="held-out tokens per evaluation (default 8192)")
    d.add_argument("--save-every", type=int, default=None, help="resumable checkpoint every N steps")
    d.add_argument("--seed", type=int, default=None, help="data order seed (default 0)")
    d.add_argument("--checkpoint-dir", default=None, help="resumable checkpoints (default <output>.checkpoints)")
    d.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    k = p.add_argument_group("distillation loss")
    k.add_argument("--divergence", choices=DIVERGENCES, default=None, help="default forward_kl")
    k.add_argument("--temperature", type=float, default=None, help="softening temperature (default 2)")
    k.add_argument("--kd-weight", type=float, default=None,
                   help="weight of the divergence against cross-entropy, in [0, 1] (default 0.9; 0: CE only)")
    k.add_argument("--hidden-weight", type=float, default=None,
                   help="weight of the hidden-state loss (online teacher; default 0)")
    t = p.add_argument_group("teacher")
    t.add_argument("--teacher-mode", choices=TEACHER_MODES, default=None,
                   help="online: the teacher runs every step; offline: read its top-k log-probs from a cache")
    t.add_argument("--teacher-cache", default=None, help="offline cache folder (built when missing)")
    t.add_argument("--top-k", type=int, default=None, help="teacher log-probs kept per token (default 32)")
    t.add_argument("--teacher-endpoint", default=None, metavar="URL",
                   help="fill the cache from an OpenAI-compatible server (e.g. http://127.0.0.1:8000/v1); "
                   "the key comes from OPENAI_API_KEY")
    t.add_argument("--teacher-endpoint-model", default=None, help="model name at the endpoint (default: its first)")
    q = p.add_argument_group("quantization-aware training")
    q.add_argument("--qat-scheme", type=str.upper, default=None,
                   help="train through this `llmquant quantize` scheme's grid (W4A16, W8A16, W8A8, ...) and save "
                   "the quantized checkpoint")
    q.add_argument("--qat-group-size", type=int, default=None, help="INT4 group size (default: one that fits)")
    sd = p.add_argument_group("self-distillation (the teacher's own quantized copy as the student)")
    sd.add_argument("--self", dest="self_quantized", default=None, metavar="QUANTIZED",
                    help="a folder from `llmquant quantize` of the teacher: train its scales / zero points / norms "
                    "to match the teacher (uses --steps, --batch-size, --seq-len, --lr, --seed, --top-k, --data)")
    sd.add_argument("--block-steps", type=int, default=None, metavar="N",
                    help="steps per decoder layer before the end-to-end steps (default 40; 0: skip)")
    sd.add_argument("--self-train", nargs="+", default=None, metavar="PART",
                    choices=("scales", "zero_points", "rounding", "norms"),
                    help="what trains: scales, zero_points, rounding, norms (default: scales zero_points norms)")
    sd.add_argument("--self-loss", choices=("kl", "ce"), default=None,
                    help="kl: the teacher's top-k log-probs (default); ce: cross-entropy, no teacher")
    sd.add_argument("--rounding-lr", type=float, default=None,
                    help="learning rate of zero points and rounding offsets, in integer steps (default 0.005)")
    sd.add_argument("--tokens", type=int, default=None,
                    help="calibration tokens trained on (default 65536)")
    h = p.add_argument_group("publish")
    h.add_argument("--push-to-hub", default=None, metavar="REPO_ID",
                   help="then publish the output folder to this Hub repository with a model card "
                   "(as `llmquant push`; token from HF_TOKEN or `hf auth login`)")
    h.add_argument("--private", action="store_true", help="with --push-to-hub: create the repository private")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(handler=run)


# Flags that shape a student or a KD loss: meaningless with --self (the student is the quantized folder).
NOT_WITH_SELF = ("student_layers", "keep_layers", "intermediate_size", "num_key_value_heads", "student_config",
                 "student_init",
                 "grad_accum", "mixed_precision", "optimizer", "eval_every", "eval_tokens", "save_every",
                 "divergence", "temperature", "kd_weight", "hidden_weight", "teacher_mode", "teacher_cache",
                 "qat_scheme", "qat_group_size", "recipe")
SELF_ONLY = ("block_steps", "self_train", "self_loss", "rounding_lr", "tokens")


def run(args: argparse.Namespace) -> int:
    if args.self_quantized is not None:
        return run_self(args)
    given = [f"--{k.replace('_', '-')}" for k in SELF_ONLY if getattr(args, k) is not None]
    if given:
        from llmquant.errors import InvalidConfigError

        raise InvalidConfigError(f"{', '.join(given)} belong to self-distillation: add --self QUANTIZED_FOLDER.")
    from llmquant.distill.api import distill

    result = distill(
        args.teacher, output=args.output, recipe=args.recipe, student_layers=args.student_layers,
        keep_layers=args.keep_layers, intermediate_size=args.intermediate_size,
        num_key_value_heads=args.num_key_value_heads, student_config=args.student_config,
        student_init=args.student_init, dataset=args.dataset,
        text_field=args.text_field, steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
        seq_len=args.seq_len, lr=args.lr, mixed_precision=args.mixed_precision, optimizer=args.optimizer,
        eval_every=args.eval_every, eval_tokens=args.eval_tokens, save_every=args.save_every, seed=args.seed,
        divergence=args.divergence,
        temperature=args.temperature, kd_weight=args.kd_weight, hidden_weight=args.hidden_weight,
        teacher_mode=args.teacher_mode, teacher_cache=args.teacher_cache, top_k=args.top_k,
        teacher_endpoint=args.teacher_endpoint, teacher_endpoint_model=args.teacher_endpoint_model,
        qat_scheme=args.qat_scheme, qat_group_size=args.qat_group_size, checkpoint_dir=args.checkpoint_dir,
        resume=args.resume, overwrite=args.overwrite, progress=not args.quiet, push_to_hub=args.push_to_hub,
        private=args.private, **model_kwargs(args))
    last = result.history[-1] if result.history else {}
    print(f"\ntrained {len(result.history)} steps, {result.seconds_per_step:.2f} s/step; final loss "
          f"{last.get('loss', float('nan')):.4f}" + (f" (CE {last['ce']:.4f})" if "ce" in last else ""))
    for e in result.evals:
        print(f"held-out perplexity at step {e['step']}: {e['perplexity']:.3f}")
    if result.quantization:
        print(f"quantized {result.quantization['scheme']}")
    print(f"saved {result.output_dir} in {result.seconds:.1f} s (report: {result.output_dir}/distill_report.json)")
    if result.push is not None:
        print(f"pushed to {result.push.pr_url or result.push.commit_url}")
    sys.stdout.flush()
    return 0


def run_self(args: argparse.Namespace) -> int:
    from llmquant.distill.self_api import self_distill
    from llmquant.errors import InvalidConfigError
    from llmquant.quant.pipeline.report import held_out_change

    given = [f"--{k.replace('_', '-')}" for k in NOT_WITH_SELF if getattr(args, k, None) is not None]
    if given:
        raise InvalidConfigError(f"{', '.join(given)} cannot be used with --self: the student is the quantized "
                                 "folder and the loss is fixed by --self-loss.")
    result = self_distill(
        args.teacher, args.self_quantized, output=args.output, dataset=args.dataset, text_field=args.text_field,
        checkpoint_dir=args.checkpoint_dir, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet,
        push_to_hub=args.push_to_hub, private=args.private, steps=args.steps, block_steps=args.block_steps,
        lr=args.lr, rounding_lr=args.rounding_lr, tokens=args.tokens, batch_size=args.batch_size,
        seq_len=args.seq_len, train=args.self_train, loss=args.self_loss, top_k=args.top_k, seed=args.seed,
        teacher_endpoint=args.teacher_endpoint, teacher_endpoint_model=args.teacher_endpoint_model,
        **model_kwargs(args))
    h = result.report["held_out"]
    if h:
        print(f"\n{held_out_change(h)}")
    if result.verification:
        v = result.verification
        print(f"verification (reloaded vs original): mean KL {v['kl_mean']:.5f}, top-1 agreement "
              f"{100 * v['top1_agreement']:.2f}% over {v['tokens']} held-out tokens")
    print(f"saved {result.output_dir} in {result.seconds:.1f} s (report: {result.output_dir}/quantization_report.md)")
    if result.push is not None:
        print(f"pushed to {result.push.pr_url or result.push.commit_url}")
    sys.stdout.flush()
    return 0
