"""Sample text from a trained model: `python -m jaxgpt.sample RUN_DIR|EXPORT_DIR [--prompt TEXT] ...`.

SRC is a run folder (its latest checkpoint, or --step) or a folder written by `python -m jaxgpt.export` (read back
into JAX through the importer's conversion). Every prompt (--prompt, repeatable, default a newline; or
--prompt-file, the whole file) gets --num-samples samples, all generated as one batch (jaxgpt.generate); each is
printed with its prompt, followed by the throughput. Sampling follows nanoGPT: --temperature (0 or --greedy:
argmax), --top-k, and optionally --top-p (nucleus). Generation stops at --max-new-tokens or at <|endoftext|>.

Softmax variants fit prompt + new tokens into block_size (their learned positions); linear mixers have no such
limit and run past block_size, the context length they were trained on.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from flax import nnx

from jaxgpt.checkpoint import abstract_params, load_run
from jaxgpt.convert import torch_to_jax
from jaxgpt.errors import UserError, cli_main
from jaxgpt.export import read_hf_folder
from jaxgpt.generate import Generation, Sampling, generate
from jaxgpt.model import GPT, init_model
from jaxgpt.spec.config import Config
from jaxgpt.tokenizer import EOT, get_tokenizer

SEPARATOR = "---------------"


def is_export(path: Path) -> bool:
    """Whether `path` is a Hugging Face model folder (an export) rather than a run or checkpoints folder."""
    return (path / "model.safetensors").is_file()


def load_model(src: str | Path, step: int | None = None) -> tuple[GPT, Config, int]:
    """The model of a run folder's checkpoint (latest, or `step`) or of an exported folder -> (model, config,
    step)."""
    src = Path(src)
    if not src.exists():
        raise UserError(f"{src} does not exist (expected a run folder or an exported model folder)")
    if is_export(src):
        if step is not None:
            raise UserError(f"{src} is an exported model (one step); --step applies to run folders")
        cfg, step, torch_sd = read_hf_folder(src)
        try:
            params = torch_to_jax(torch_sd, nnx.to_pure_dict(abstract_params(cfg)))
        except (KeyError, ValueError) as e:
            raise UserError(f"{src}: weights do not fit the model {cfg.model}: {e}") from None
    else:
        cfg, state = load_run(src, step)
        step, params = state.step, nnx.to_pure_dict(state.params)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: init_model(cfg.model, cfg.seed)), nnx.Param)
    nnx.replace_by_pure_dict(abstract, params)
    return nnx.merge(graphdef, abstract), cfg, step


def read_prompts(prompts: list[str] | None, prompt_file: str | None) -> list[str]:
    """The prompts of the command line: --prompt-file's text, or each --prompt (default one newline)."""
    if prompt_file is not None:
        if prompts:
            raise UserError("give --prompt or --prompt-file, not both")
        path = Path(prompt_file)
        if not path.is_file():
            raise UserError(f"prompt file {path} " + ("is a folder, not a file" if path.is_dir() else "does not exist"))
        try:
            prompts = [path.read_text(encoding="utf-8")]
        except UnicodeDecodeError as e:
            raise UserError(f"prompt file {path} is not UTF-8 text (byte {e.start})") from None
    prompts = prompts or ["\n"]
    if any(not p for p in prompts):
        raise UserError("empty prompt: give at least one character (nanoGPT's default is a newline)")
    return prompts


def report(gen: Generation) -> str:
    """One line of throughput: prefill and decode tokens/s, and the compile time they exclude."""
    rows, prompt = gen.tokens.shape[0], gen.prompt_tokens
    return (f"{rows} samples x {gen.steps} new tokens: decode {gen.decode_tokens_per_second:.1f} tokens/s, "
            f"prefill {rows * prompt / gen.prefill_seconds:.1f} tokens/s ({rows} x {prompt} prompt tokens), "
            f"compile {gen.compile_seconds:.1f} s")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jaxgpt.sample", description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="run folder (or its checkpoints folder) or exported model folder")
    p.add_argument("--prompt", action="append", help="prompt text (repeat for several; default: a newline)")
    p.add_argument("--prompt-file", help="read one prompt from this file")
    p.add_argument("--num-samples", type=int, default=10, help="samples per prompt")
    p.add_argument("--max-new-tokens", type=int, default=500)
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    p.add_argument("--greedy", action="store_true", help="argmax (same as --temperature 0)")
    p.add_argument("--top-k", type=int, default=200, help="keep the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, help="keep the most likely tokens up to this probability mass")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--step", type=int, help="checkpoint step of a run folder (default: the latest)")
    return p


@cli_main
def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    prompts = read_prompts(args.prompt, args.prompt_file)
    if args.num_samples < 1:
        raise UserError(f"--num-samples must be >= 1, got {args.num_samples}")
    if args.top_k < 0:
        raise UserError(f"--top-k must be >= 0 (0: all tokens), got {args.top_k}")
    enc = get_tokenizer()
    sampling = Sampling(temperature=0.0 if args.greedy else args.temperature, top_k=args.top_k or None,
                        top_p=args.top_p, vocab_limit=enc.n_vocab)
    model, cfg, step = load_model(args.src, args.step)
    encoded = [enc.encode(p, allowed_special={"<|endoftext|>"}) for p in prompts]
    rows = [ids for ids in encoded for _ in range(args.num_samples)]
    gen = generate(model, rows, args.max_new_tokens, sampling, seed=args.seed, eot=EOT)
    print(f"{cfg.variant} (step {step}), {len(rows)} samples")
    for prompt, new in zip([p for p in prompts for _ in range(args.num_samples)], gen.rows()):
        print(prompt + enc.decode([t for t in new if t != EOT]))
        print(SEPARATOR)
    print(report(gen))


if __name__ == "__main__":
    main()
