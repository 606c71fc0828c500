"""Export an Orbax checkpoint to a Hugging Face folder, and import one back.

    python -m jaxgpt.export RUN_OR_CKPT_DIR OUT_DIR [--step N] [--format auto|gpt2|torch_ref] [--force]
    python -m jaxgpt.export --import HF_DIR RUN_DIR [--force]

Formats:
  gpt2       plain GPT-2 variants -> `GPT2LMHeadModel` (exact GELU: activation_function "gelu"; zero biases
             when bias=False). All `vocab_size` rows (50304, padding included) are kept, so the softmax
             normalises over the same rows as in JAX and log-probabilities match, not just logits.
  torch_ref  any variant -> a folder loaded by `AutoModelForCausalLM.from_pretrained(dir,
             trust_remote_code=True)`: config.json's auto_map points at `modeling_jaxgpt.py` (torch_ref.hf),
             and the folder carries the torch_ref and jaxgpt.spec modules it imports (`modeling_sources`), so
             it loads with torch and transformers alone (+ FLA for the linear mixers), without jaxgpt.
  auto       gpt2 where the variant is plain GPT-2, else torch_ref.
Every folder also holds the GPT-2 tokenizer (built offline from jaxgpt/assets/gpt2) and `jaxgpt.json`
(step, variant, full run config, val loss of that step when the run logged one), which the importer uses to
restore the exact Config. Folders are written to a temporary sibling and renamed when complete.

The importer reads either format (or any HF GPT-2 folder) through the same jaxgpt.convert functions, and
writes RUN_DIR/checkpoints/<step> (params, a fresh optimizer state, meta) plus RUN_DIR/config.json, which
`python -m jaxgpt.train --out RUN_DIR --resume` continues (with the same model settings).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import jax
import numpy as np
from flax import nnx

from jaxgpt import __version__
from jaxgpt.checkpoint import Checkpointer, TrainState, abstract_params, checkpoint_dir, load_run, make_meta
from jaxgpt.convert import hf_gpt2_to_torch, jax_to_torch, torch_to_hf_gpt2, torch_to_jax
from jaxgpt.data import staging_dir as _staging_dir
from jaxgpt.data.writer import check_out
from jaxgpt.errors import UserError, cli_main
from jaxgpt.losses import OUTPUT_TRANSFORMS
from jaxgpt.metrics import MetricsLog
from jaxgpt.optim import make_optimizer
from jaxgpt.spec.config import Config, ModelConfig
from jaxgpt.spec.variants import PRESETS
from jaxgpt.tokenizer import _ASSETS, EOT

if TYPE_CHECKING:
    from transformers import GPT2LMHeadModel, GPT2TokenizerFast

    from torch_ref.hf import JaxgptForCausalLM

FORMATS = ("auto", "gpt2", "torch_ref")
META_FILE = "jaxgpt.json"
MODELING_FILE = "modeling_jaxgpt.py"
PACKAGE_ROOT = Path(__file__).resolve().parent.parent  # holds jaxgpt/ and torch_ref/
MODELING_ENTRY = PACKAGE_ROOT / "torch_ref" / "hf.py"  # written as MODELING_FILE
SPEC_MODULE = re.compile(r"jaxgpt\.spec\.\w+")
SPEC_IMPORT = re.compile(r"^(\s*)from jaxgpt\.spec\.(\w+) import ", re.MULTILINE)


# ---------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------


def load_checkpoint(path: str | Path, step: int | None = None) -> tuple[Config, dict, dict]:
    """-> (run config, checkpoint meta, params as a nested pure dict of numpy arrays)."""
    cfg, state = load_run(path, step)
    return cfg, state.meta, jax.tree.map(np.asarray, nnx.to_pure_dict(state.params))


def save_checkpoint(run: Path, cfg: Config, params: dict, meta: dict) -> None:
    """Write params (pure dict) with a fresh optimizer state as RUN/checkpoints/<meta['step']>."""
    model_params = abstract_params(cfg)
    nnx.replace_by_pure_dict(model_params, jax.tree.map(jax.numpy.asarray, params))
    opt_state = make_optimizer(cfg).init(model_params)
    ckpt = Checkpointer(run / "checkpoints", keep=cfg.keep_checkpoints)
    try:
        ckpt.save(TrainState(model_params, opt_state, meta))
        ckpt.wait()
    finally:
        ckpt.close()
    (run / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")


def logged_val_loss(run: Path, step: int) -> float | None:
    """The val loss the run logged at `step` (metrics.jsonl next to checkpoints/), if any."""
    log = run / "metrics.jsonl"
    if not log.is_file():
        return None
    evals = [r["val_loss"] for r in MetricsLog(log).read() if r.get("kind") == "eval" and r.get("step") == step]
    return evals[-1] if evals else None


# ---------------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------------


def is_plain_gpt2(model: ModelConfig) -> bool:
    """Whether the model computes GPT-2's function: baseline embedding/norm/mixer and a loss that leaves the
    logits alone (the loss axis only changes training)."""
    baseline = PRESETS["baseline"]
    return model.loss not in OUTPUT_TRANSFORMS and all(
        getattr(model, axis) == getattr(baseline, axis) for axis in ("embedding", "norm", "mixer")
    )


def gpt2_tokenizer() -> GPT2TokenizerFast:
    """GPT2TokenizerFast from the shipped BPE files (vocab=/merges= objects; paths would build it empty)."""
    from transformers import GPT2TokenizerFast

    vocab = json.loads((_ASSETS / "encoder.json").read_text(encoding="utf-8"))
    lines = (_ASSETS / "vocab.bpe").read_text(encoding="utf-8").splitlines()[1:]  # first line: version
    merges = [tuple(line.split()) for line in lines if line.strip()]
    return GPT2TokenizerFast(vocab=vocab, merges=merges, model_max_length=int(1e30))


def _tensors(state_dict: dict[str, np.ndarray]) -> dict:
    import torch

    return {k: torch.tensor(v) for k, v in state_dict.items()}


def gpt2_model(model: ModelConfig, torch_sd: dict[str, np.ndarray]) -> GPT2LMHeadModel:
    """GPT2LMHeadModel holding a plain GPT-2's weights."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=model.vocab_size, n_positions=model.block_size, n_embd=model.n_embd, n_layer=model.n_layer,
        n_head=model.n_head, activation_function="gelu", layer_norm_epsilon=1e-5, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=EOT, eos_token_id=EOT, tie_word_embeddings=True,
    )
    hf = GPT2LMHeadModel(config)
    hf.load_state_dict(_tensors(torch_to_hf_gpt2(torch_sd)))
    return hf.eval()


def modeling_sources() -> dict[str, str]:
    """The model code of a torch_ref export: file name -> source text, flat in one folder.

    torch_ref/hf.py becomes MODELING_FILE; with it go the torch_ref modules it imports (relatively, `from .x
    import`) and the jaxgpt.spec modules those import, transitively. Each `from jaxgpt.spec.x import` becomes
    `from .x import`, so the folder imports only itself (transformers' remote-code loader copies the files a
    module imports relatively). Any other import of jaxgpt or torch_ref, or two modules of one flat name, is an
    error: the folder could not load on its own.
    """
    sources: dict[str, str] = {}
    origin: dict[str, Path] = {}
    todo = [(MODELING_FILE, MODELING_ENTRY)]
    while todo:
        name, path = todo.pop()
        if name in origin:
            if origin[name] != path:
                raise ValueError(f"{path} and {origin[name]} would both be {name} in an export folder")
            continue
        origin[name] = path
        text = path.read_text()
        spec_imports = 0
        for node in ast.walk(ast.parse(text, str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
                todo.append((f"{node.module}.py", path.parent / f"{node.module}.py"))
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and SPEC_MODULE.fullmatch(node.module):
                spec_imports += 1
                module = node.module.removeprefix("jaxgpt.spec.")
                todo.append((f"{module}.py", PACKAGE_ROOT / "jaxgpt" / "spec" / f"{module}.py"))
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or "."]
                if getattr(node, "level", 0) or any(m.split(".")[0] in ("jaxgpt", "torch_ref") for m in modules):
                    raise ValueError(f"{path}:{node.lineno}: an export folder cannot hold this import; torch_ref "
                                     "imports its own modules as `from .x import` and jaxgpt only as "
                                     "`from jaxgpt.spec.x import`")
        text, rewritten = SPEC_IMPORT.subn(r"\1from .\2 import ", text)
        if rewritten != spec_imports:
            raise ValueError(f"{path}: {spec_imports} jaxgpt.spec imports, {rewritten} rewritten")
        sources[name] = text
    return sources


def torch_ref_model(model: ModelConfig, torch_sd: dict[str, np.ndarray]) -> JaxgptForCausalLM:
    """JaxgptForCausalLM (torch_ref) holding the weights, its config pointing at the shipped modeling file."""
    from torch_ref.hf import JaxgptConfig, JaxgptForCausalLM

    config = JaxgptConfig(model=dataclasses.asdict(model), bos_token_id=EOT, eos_token_id=EOT)
    config.auto_map = {k: f"{MODELING_FILE[:-3]}.{c}" for k, c in
                       (("AutoConfig", "JaxgptConfig"), ("AutoModelForCausalLM", "JaxgptForCausalLM"))}
    try:
        hf = JaxgptForCausalLM(config)
    except KeyError as e:
        raise UserError(f"torch_ref has no implementation of {e} ({model}); cannot export this variant") from None
    hf.gpt.load_state_dict(_tensors(torch_sd))
    return hf.eval()


def export(src: str | Path, out: str | Path, step: int | None = None, fmt: str = "auto", force: bool = False) -> Path:
    """Export a checkpoint of `src` (run or checkpoints folder) to the HF folder `out`; returns `out`."""
    out = Path(out)
    if out.is_dir() and not force:
        raise UserError(f"{out} exists; pass --force to replace it")
    check_out(out, force, arg="OUT")  # before the checkpoint is read: no file in the way
    cfg, meta, params = load_checkpoint(src, step)
    plain = is_plain_gpt2(cfg.model)
    fmt = ("gpt2" if plain else "torch_ref") if fmt == "auto" else fmt
    if fmt == "gpt2" and not plain:
        raise UserError(f"variant {cfg.variant!r} is not plain GPT-2; export it with --format torch_ref")
    torch_sd = jax_to_torch(params)
    hf = gpt2_model(cfg.model, torch_sd) if fmt == "gpt2" else torch_ref_model(cfg.model, torch_sd)
    run = checkpoint_dir(src).parent
    info = {
        "format": fmt, "step": meta["step"], "variant": cfg.variant, "config": cfg.to_dict(),
        "val_loss": logged_val_loss(run, meta["step"]), "source": str(Path(src).resolve()),
        "jaxgpt_version": __version__,
    }
    with _staging_dir(out, force) as tmp:
        hf.save_pretrained(tmp)
        gpt2_tokenizer().save_pretrained(tmp)
        if fmt == "torch_ref":
            for name, text in modeling_sources().items():
                (tmp / name).write_text(text)
        (tmp / META_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return out


# ---------------------------------------------------------------------------------------------------
# Import
# ---------------------------------------------------------------------------------------------------


def config_from_hf(hf_config: dict) -> Config:
    """Config for a foreign HF GPT-2 folder (no jaxgpt.json): its architecture with biases, default recipe."""
    if hf_config.get("activation_function") != "gelu":
        print(f"note: the model uses activation {hf_config.get('activation_function')!r}; jaxgpt computes "
              "exact GELU, so its outputs will differ slightly", file=sys.stderr)
    model = ModelConfig(n_layer=hf_config["n_layer"], n_head=hf_config["n_head"], n_embd=hf_config["n_embd"],
                        block_size=hf_config["n_positions"], vocab_size=hf_config["vocab_size"], bias=True)
    return Config(model=model, model_size="custom")


def read_json(path: Path) -> dict:
    """A JSON object from `path`, or one line saying why it is not one."""
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} holds a JSON {type(data).__name__}, not an object")
    return data


def read_hf_folder(src: Path) -> tuple[Config, int, dict[str, np.ndarray]]:
    """An exported (or HF GPT-2) folder -> (run config, step, torch_ref state dict)."""
    from safetensors.numpy import load_file

    if not (src / "config.json").is_file() or not (src / "model.safetensors").is_file():
        raise UserError(f"{src} is not a Hugging Face model folder (needs config.json and model.safetensors)")
    hf_config = read_json(src / "config.json")
    meta = read_json(src / META_FILE) if (src / META_FILE).is_file() else None
    if meta is not None and not {"config", "step"} <= meta.keys():
        raise UserError(f"{src / META_FILE} lacks its 'config' or 'step' entry")
    if meta is None and hf_config.get("model_type") != "gpt2":
        raise UserError(f"{src}: model_type {hf_config.get('model_type')!r} without {META_FILE}; cannot import")
    cfg = Config.from_dict(meta["config"]) if meta else config_from_hf(hf_config)
    try:
        weights = load_file(str(src / "model.safetensors"))
    except Exception as e:  # safetensors raises its own SafetensorError (and OSError) for a damaged file
        raise UserError(f"{src / 'model.safetensors'} is not a readable safetensors file: {e}") from None
    if hf_config.get("model_type") == "gpt2":
        torch_sd = hf_gpt2_to_torch(weights, bias=cfg.model.bias)
    else:
        torch_sd = {k.removeprefix("gpt."): v for k, v in weights.items()}
    return cfg, meta["step"] if meta else 0, torch_sd


def import_folder(src: str | Path, run: str | Path, force: bool = False) -> Path:
    """Import an HF folder into a jaxgpt run folder `run` (checkpoints/<step>, config.json); returns `run`."""
    src, run = Path(src), Path(run)
    check_out(run, force, arg="OUT")
    if not src.is_dir():
        raise UserError(f"{src} does not exist or is not a folder")
    cfg, step, torch_sd = read_hf_folder(src)
    template = nnx.to_pure_dict(abstract_params(cfg))
    try:
        params = torch_to_jax(torch_sd, template)
    except (KeyError, ValueError) as e:
        raise UserError(f"{src}: weights do not fit the model {cfg.model}: {e}") from None
    meta = make_meta(cfg, step, cfg.data, imported_from=str(src.resolve()))
    with _staging_dir(run, force) as tmp:
        save_checkpoint(tmp, cfg, params, meta)
    return run


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jaxgpt.export", description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="run folder or checkpoints folder (with --import: an HF model folder)")
    p.add_argument("out", help="output HF folder (with --import: the jaxgpt run folder to create)")
    p.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    p.add_argument("--format", default="auto", choices=FORMATS, help="auto: gpt2 for plain GPT-2, else torch_ref")
    p.add_argument("--import", dest="import_", action="store_true", help="import SRC (HF folder) into run OUT")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    return p


@cli_main
def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if args.import_:
        out = import_folder(args.src, args.out, force=args.force)
        print(f"imported {args.src} into {out}/checkpoints; "
              f"continue with `python -m jaxgpt.train --out {out} --resume`")
    else:
        out = export(args.src, args.out, step=args.step, fmt=args.format, force=args.force)
        print(f"exported {args.src} to {out} ({json.loads((out / META_FILE).read_text())['format']})")


if __name__ == "__main__":
    main()
