"""The subcommands of `llmquant`, listed once: what `llmquant --help` shows without importing any of
them, and the one-line help each command registers itself with."""

# name -> (module that registers the command's flags, the one line `llmquant --help` shows).
# `llmquant --help` must answer instantly, so it never imports a command's module: those pull in
# torch and transformers (seconds). Each command module registers itself with `summary(name)`.
COMMANDS = {
    "quantize": ("llmquant.cli.quantize_cmd", "quantize a model and save a compressed-tensors checkpoint"),
    "eval": ("llmquant.cli.eval_cmd", "measure models: perplexity, agreement, throughput, load, suites"),
    "serve": ("llmquant.cli.serve_cmd", "serve a model through an OpenAI-compatible HTTP API"),
    "distill": ("llmquant.cli.distill_cmd",
                "make a smaller student from a teacher and train it to match the teacher"),
    "prune": ("llmquant.cli.prune_cmd",
              "set weights to zero (SparseGPT, Wanda, magnitude; unstructured or 2:4) and save the model"),
    "export": ("llmquant.cli.export_cmd",
               "write a model or a quantized folder as a GGUF file for llama.cpp, checked code for code"),
    "push": ("llmquant.cli.push_cmd", "publish a model folder to the Hugging Face Hub with a model card"),
}


def summary(name: str) -> str:
    return COMMANDS[name][1]
