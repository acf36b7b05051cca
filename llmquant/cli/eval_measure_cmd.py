"""`llmquant eval agreement | remote | throughput | load`: one measurement each, thin flags over
`eval.agreement.agreement`, `eval.remote.remote_perplexity`, `eval.throughput.offline_throughput`
and `eval.loadgen.load_test`."""

from __future__ import annotations

import argparse
import json

from llmquant.cli.common import add_model_arguments, model_kwargs
from llmquant.cli.eval_flags import add_data_arguments, add_output_argument, check_output, eval_data_from_args, \
    positive_int, write_output
from llmquant.errors import InvalidConfigError


def _add_endpoint_args(parser: argparse.ArgumentParser) -> None:
    net = parser.add_argument_group("server")
    net.add_argument("--base-url", required=True, metavar="URL",
                     help="the OpenAI-compatible API, e.g. http://127.0.0.1:8000/v1")
    net.add_argument("--api-key", default=None, help="sent as a Bearer token (default: $OPENAI_API_KEY if set)")
    net.add_argument("--model", default=None, dest="served_model", metavar="NAME",
                     help="the served model's name (default: the first /v1/models lists)")
    net.add_argument("--tokenizer", default=None, metavar="SOURCE",
                     help="folder, Hub id or .gguf whose tokenizer the served model uses (default: the demo model)")


def _emit(result, args, summary: str) -> int:
    print(summary)
    if args.output is not None:
        write_output(args.output, json.dumps(result.to_dict(), indent=2))
        print(f"result written to {args.output}")
    return 0


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected numbers >= 1, got {text!r}")
    return values


# ---- agreement ------------------------------------------------------------------------------

def add_agreement(metrics: argparse._SubParsersAction) -> None:
    parser = metrics.add_parser(
        "agreement", help="KL divergence and top-1 agreement against a base model",
        description="Feed MODEL and BASE the same perplexity windows and compare their next-token distributions: "
        "mean / median / p99 KL(P_base || P_model) in nats over the whole vocabulary, and the share of positions "
        "where both pick the same most likely token (as llama.cpp's --kl-divergence reports). Both must share a "
        "tokenizer.")
    add_model_arguments(parser)
    parser.add_argument("--base", default=None, metavar="SOURCE",
                        help="the reference model (default: the built-in demo model); --dtype, --device, "
                        "--allow-pickle and --trust-remote-code apply to both models, --revision to MODEL only")
    parser.add_argument("--base-revision", default=None, metavar="REV",
                        help="Hub branch, tag or commit of BASE (Hub ids only)")
    add_data_arguments(parser)
    add_output_argument(parser)
    parser.set_defaults(handler=run_agreement)


def run_agreement(args) -> int:
    check_output(args.output)
    from llmquant.eval.agreement import agreement, summarize

    result = agreement(args.model, args.base, eval_data_from_args(args), base_revision=args.base_revision,
                       progress=True)
    return _emit(result, args, summarize(result))


# ---- remote perplexity ----------------------------------------------------------------------

def add_remote(metrics: argparse._SubParsersAction) -> None:
    parser = metrics.add_parser(
        "remote", help="perplexity (and top-1 agreement) of a model behind an OpenAI-compatible server",
        description="Perplexity of the model as a server serves it: the same windows as `eval perplexity`, sent as "
        "token-id prompts to /v1/completions with echo=true, max_tokens=0, logprobs=1 (vLLM, llmquant serve and "
        "others support this). With --base, also the top-1 agreement with a local model. KL divergence is not "
        "computed over HTTP: servers return only a few alternatives per token.")
    _add_endpoint_args(parser)
    parser.add_argument("--base", default=None, metavar="SOURCE",
                        help="a local model (same tokenizer) to measure top-1 agreement against")
    add_data_arguments(parser, batch_help="windows per request")
    add_output_argument(parser)
    parser.set_defaults(handler=run_remote)


def run_remote(args) -> int:
    check_output(args.output)
    from llmquant.eval.remote import remote_perplexity

    r = remote_perplexity(args.base_url, args.served_model, eval_data_from_args(args), api_key=args.api_key,
                          tokenizer=args.tokenizer, base=args.base, progress=True)
    top1 = f", top-1 agreement with {r.base} {100 * r.top1_agreement:.2f}%" if r.top1_agreement is not None else ""
    summary = (f"perplexity {r.perplexity:.4f} ({r.nll_per_token:.4f} nats/token, {r.bits_per_byte:.4f} bits/byte)"
               f"{top1}\nmodel      {r.model}\nmethod     {r.method['window']}-token windows, stride "
               f"{r.method['stride']}, {r.num_tokens_scored:,} tokens scored\ntext       {r.method['scored']}")
    return _emit(r, args, summary)


# ---- offline throughput ---------------------------------------------------------------------

def add_throughput(metrics: argparse._SubParsersAction) -> None:
    parser = metrics.add_parser(
        "throughput", help="prefill and decode speed through our engine, load time, memory, size",
        description="Offline throughput through the serving engine (no HTTP): prefill tokens/s for one prompt of "
        "each length (capped by the context), decode tokens/s with B requests batched together, peak memory (RSS "
        "on CPU, allocated on CUDA), load time and checkpoint size. Greedy, EOS ignored, held-out corpus prompts.")
    add_model_arguments(parser)
    parser.add_argument("--prefill-lengths", type=_int_list, default=[128, 512, 2048], metavar="L,L",
                        help="prompt lengths (default: 128,512,2048)")
    parser.add_argument("--batch-sizes", type=_int_list, default=[1, 8, 32], metavar="B,B",
                        help="decode batch sizes (default: 1,8,32)")
    parser.add_argument("--decode-tokens", type=positive_int, default=32, metavar="N",
                        help="tokens generated per request in the decode runs (default: 32)")
    parser.add_argument("--prompt-tokens", type=positive_int, default=64, metavar="N",
                        help="prompt length of the decode runs (default: 64)")
    add_output_argument(parser)
    parser.set_defaults(handler=run_throughput)


def run_throughput(args) -> int:
    check_output(args.output)
    from llmquant.eval.throughput import offline_throughput

    r = offline_throughput(args.model, prefill_lengths=args.prefill_lengths, batch_sizes=args.batch_sizes,
                           decode_tokens=args.decode_tokens, prompt_tokens=args.prompt_tokens, progress=True,
                           **model_kwargs(args))
    lines = [f"model      {r.model} ({r.method['dtype']}, {r.method['device']}, {r.method['torch_threads']} threads)"]
    lines += [f"prefill    {p['prompt_tokens']:>5} tokens: {p['tokens_per_s']:,.0f} tok/s" for p in r.prefill]
    lines += [f"decode     batch {d['batch_size']:>3}: {d['tokens_per_s']:,.1f} tok/s" for d in r.decode]
    mem = r.cuda_peak_allocated_bytes or r.peak_rss_bytes
    lines.append(f"memory     peak {'CUDA allocated' if r.cuda_peak_allocated_bytes else 'RSS'} "
                 f"{(mem or 0) / 2**20:,.0f} MiB; load {r.load_seconds or 0:.1f} s; checkpoint "
                 f"{(r.checkpoint_bytes or 0) / 2**20:,.1f} MiB")
    lines += [f"note       {s}" for s in r.skipped]
    return _emit(r, args, "\n".join(lines))


# ---- online load ----------------------------------------------------------------------------

def add_load(metrics: argparse._SubParsersAction) -> None:
    parser = metrics.add_parser(
        "load", help="online load test of an OpenAI-compatible server (TTFT, TPOT, ITL, E2E)",
        description="Send streaming completion requests at a fixed concurrency or as a Poisson process, and report "
        "successful / failed requests, requests/s, output tokens/s, and TTFT, TPOT, ITL and end-to-end latency "
        "(mean, p50, p90, p99) with the definitions of vLLM's benchmark_serving.py.")
    _add_endpoint_args(parser)
    load = parser.add_argument_group("load")
    load.add_argument("--concurrency", type=positive_int, default=None, metavar="C",
                      help="requests in flight (default: 8 without --request-rate, else unlimited)")
    load.add_argument("--request-rate", type=float, default=None, metavar="R",
                      help="Poisson arrivals per second (default: as fast as --concurrency allows)")
    load.add_argument("--num-prompts", type=positive_int, default=32, metavar="N", help="requests (default: 32)")
    load.add_argument("--input-len", type=positive_int, default=128, metavar="T", help="prompt tokens (default: 128)")
    load.add_argument("--output-len", type=positive_int, default=64, metavar="T",
                      help="tokens to generate per request (default: 64)")
    load.add_argument("--prompts", choices=("dataset", "synthetic"), default="dataset",
                      help="held-out corpus text (default) or random token ids")
    load.add_argument("--seed", type=int, default=0, help="seed for synthetic prompts and Poisson gaps")
    add_output_argument(parser)
    parser.set_defaults(handler=run_load)


def run_load(args) -> int:
    check_output(args.output)
    from llmquant.eval.loadgen import load_test

    if args.request_rate is not None and args.request_rate <= 0:
        raise InvalidConfigError(f"--request-rate must be positive, got {args.request_rate}.")
    concurrency = args.concurrency if args.concurrency or args.request_rate else 8
    r = load_test(args.base_url, args.served_model, api_key=args.api_key, tokenizer=args.tokenizer,
                  concurrency=concurrency, request_rate=args.request_rate, num_prompts=args.num_prompts,
                  input_len=args.input_len, output_len=args.output_len, prompts=args.prompts, seed=args.seed,
                  progress=True)

    def row(name, stats):
        return (f"{name:<10} mean {stats['mean']:,.1f}  p50 {stats['p50']:,.1f}  p90 {stats['p90']:,.1f}  "
                f"p99 {stats['p99']:,.1f} ms")

    lines = [f"model      {r.model}",
             f"requests   {r.completed} ok, {r.failed} failed in {r.duration_s:.2f} s: {r.request_throughput:.2f} req/s, "
             f"{r.output_throughput:,.1f} output tok/s, {r.total_token_throughput:,.1f} total tok/s",
             row("TTFT", r.ttft_ms), row("TPOT", r.tpot_ms), row("ITL", r.itl_ms), row("E2E", r.e2e_ms)]
    lines += [f"error      {e}" for e in r.errors]
    return _emit(r, args, "\n".join(lines))


METRICS = [add_agreement, add_remote, add_throughput, add_load]
