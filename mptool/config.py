"""Typed configs, one per command, shared by the CLI, YAML recipes and the Python API.

``load_config(CompressConfig, "recipe.yaml", {"target.ffn": 768})`` and
``CompressConfig(target=TargetConfig(ffn=768))`` build the same object. Unknown keys are
refused with the list of accepted ones; the resolved config is saved beside every artefact.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from mptool.errors import MptoolError

if typing.TYPE_CHECKING:
    from mptool.maskprune import MaskPruneConfig
    from mptool.recover import RecoveryConfig

T = TypeVar("T")


@dataclass
class TargetConfig:
    """An explicit uniform target; unset fields keep the dense size."""

    kv_heads: int | None = None
    """KV groups kept per layer (whole-group granularity: smaller KV cache)."""
    heads_per_group: int | None = None
    """Query heads kept in each kept KV group (head granularity; keeps the KV cache)."""
    ffn: int | None = None
    """FFN channels (intermediate size) kept per layer."""

    def is_set(self) -> bool:
        return any(v is not None for v in (self.kv_heads, self.heads_per_group, self.ffn))


@dataclass
class DataConfig:
    """Training/calibration text and the held-out evaluation text."""

    train: str | None = None
    """Plain text, folder of .txt, JSONL (field "text"), a `datasets` folder, or a hub dataset
    name. None: the embedded Austen corpus, five novels (Persuasion is held out)."""
    eval: str | None = None
    """Held-out evaluation text, same formats. None: Austen's Persuasion (never trained on)."""
    seq_len: int = 256
    """Tokens per training/calibration block."""
    calib_tokens: int = 16384
    """Calibration tokens for activation-aware scores (wanda-sp, flap)."""
    order: str = "shuffled"
    """How training and calibration blocks are drawn: "shuffled" (blocks of the whole text, up to
    4 M tokens, in a fixed random order) or "sequential" (the text's first tokens, in order: a
    small budget then sees only the first document)."""


@dataclass
class PplConfig:
    """The perplexity protocol (see mptool.evaluate.PplProtocol)."""

    window: int | None = None
    """Tokens per forward pass; None: 1024, or the model's context (max_position_embeddings)
    when that is shorter."""
    stride: int | None = None
    """Tokens the window advances; None: the window (non-overlapping windows)."""
    max_tokens: int = 16384

    DEFAULT_WINDOW = 1024

    def protocol(self, text: str, context: int | None = None) -> Any:
        """The :class:`mptool.evaluate.PplProtocol` these settings declare for ``text`` on a model
        whose context is ``context`` tokens."""
        from mptool.evaluate import PplProtocol

        window = self.window_for(context)
        return PplProtocol(window, self.stride or window, self.max_tokens, text)

    def window_for(self, context: int | None = None) -> int:
        """The window: the one given, else 1024, or ``context`` where that is shorter."""
        return self.window or min(self.DEFAULT_WINDOW, context or self.DEFAULT_WINDOW)

    def problems(self) -> list[str]:
        """What is wrong with these settings (one line each)."""
        out = []
        if self.window is not None and self.window < 2:
            out.append(f"ppl.window (--window) {self.window} must be >= 2")
        elif self.stride is not None and self.stride < 1:
            out.append(f"ppl.stride (--stride) {self.stride} must be >= 1 and at most the window")
        elif self.stride is not None and self.window is not None and self.stride > self.window:
            out.append(f"ppl.stride (--stride) {self.stride} must be in [1, window {self.window}]")
        if self.max_tokens < 2:
            out.append(f"ppl.max_tokens (--eval-tokens) {self.max_tokens} must be >= 2")
        return out

    def context_problems(self, context: int | None) -> list[str]:
        """An explicit window longer than the model's context: RoPE past the positions a model was
        built for gives a perplexity that measures extrapolation, not the model."""
        if context and self.window is not None and self.window > context:
            return [f"ppl.window (--window) {self.window} is longer than the model's context "
                    f"(max_position_embeddings {context}): give ppl.window {context} or less "
                    f"(--window on eval, the recipe's ppl.window on compress)"]
        window = self.window_for(context)
        if self.stride is not None and self.stride > window:
            why = " on this model (its context)" if self.window is None and window == context else ""
            return [f"ppl.stride (--stride) {self.stride} is longer than the window, {window} tokens{why}: "
                    f"give ppl.stride {window} or less"]
        return []


def _maskprune_config():
    from mptool.maskprune import MaskPruneConfig

    return MaskPruneConfig()


def _recovery_config():
    from mptool.recover import RecoveryConfig

    return RecoveryConfig()


WEIGHT_DTYPE_BYTES = {"float32": 4, "bfloat16": 2}
"""The weight dtypes ``compress --dtype`` accepts, with their size (``plan`` sizes a recipe by it)."""


@dataclass
class CompressConfig:
    """`mptool compress`: prune a model to a uniform target and write a plain checkpoint."""

    model: str | None = None
    """HF model folder (config.json + *.safetensors) or hub id; None: embedded SmolLM2-135M."""
    method: str = "maskprune"
    """Pruning method: maskprune (learned masks, the default), or one-shot magnitude, wanda-sp, flap."""
    ratio: float | None = None
    """Fraction of prunable parameters to remove, in (0, 1); used when no explicit target."""
    split: str = "balanced"
    """One-shot methods with --ratio: how the budget is split between unit types. "balanced": the
    legal target whose kept attention fraction is closest to its kept FFN fraction (the classic
    rule); "kd": every legal target within the budget is scored by the KD loss, on one probe batch,
    of the dense model with only the method's units at that target kept, and the lowest wins
    (MaskPrune's own shape rule, no training). MaskPrune picks its split by the same KD rule
    at its initial masks (maskprune.snap_frac)."""
    compensate: bool | None = None
    """Least-squares compensation of the pruned units (:mod:`mptool.compensate`, every method):
    the kept columns of each o_proj / down_proj absorb the dense model's linear prediction of the
    dropped heads and channels from the kept ones, from input Gram matrices of the calibration
    text (host memory while pruning: ``layers x ((heads x head_dim)^2 + intermediate^2) x 8``
    bytes, 0.6 GB for SmolLM2-135M, 57 GB for Llama-3-8B). MaskPrune trains with it (the teacher
    runs without). Same shapes, no training tokens. None (auto, the default): on when the Gram
    matrices of every process take at most half the host's available memory; True / False:
    always / never (the plain cut). docs/maskprune.md has the measurements."""
    target: TargetConfig = field(default_factory=TargetConfig)
    tp: list[int] = field(default_factory=lambda: [1])
    """Tensor-parallel sizes the result must load with in vLLM."""
    ffn_multiple: int = 64
    """FFN widths are multiples of this (kernel-friendly)."""
    data: DataConfig = field(default_factory=DataConfig)
    ppl: PplConfig = field(default_factory=PplConfig)
    maskprune: "MaskPruneConfig" = field(default_factory=_maskprune_config)
    recovery: "RecoveryConfig" = field(default_factory=_recovery_config)
    """LoRA + distillation after slicing (any method; steps: 0 turns it off)."""
    out: str = "runs/compressed"
    """Output folder (written atomically)."""
    overwrite: bool = False
    """Replace an existing output folder."""
    seed: int = 0
    trust_remote_code: bool = False
    """Allow custom model code from the model folder or hub (only when you trust it)."""
    dtype: str = "float32"  # one of WEIGHT_DTYPE_BYTES
    """Dtype the weights are held, trained against and written in: float32, or bfloat16 (half the
    weight memory, e.g. on GPUs; LoRA and masks stay fp32, merged into bf16 weights)."""
    device: str = "auto"
    """Where training and evaluation run: auto (cuda:LOCAL_RANK when a GPU is there, else cpu), cpu, cuda."""
    sharding: str = "ddp"
    """Under torchrun: ddp (every process holds the model) or fsdp (weights, LoRA and optimiser sharded)."""

    DEFAULT_RATIO = 0.2

    @property
    def ratio_or_default(self) -> float:
        """--ratio, or DEFAULT_RATIO when neither a ratio nor a target was given."""
        return self.ratio if self.ratio is not None else self.DEFAULT_RATIO


@dataclass
class EvalConfig:
    """`mptool eval`: held-out perplexity and optional lm-eval tasks."""

    model: str | None = None
    data: str | None = None
    """Evaluation text; None: Austen's Persuasion."""
    ppl: PplConfig = field(default_factory=PplConfig)
    tasks: list[str] = field(default_factory=list)
    """lm-eval task names (online) or paths to local task YAML files/folders."""
    limit: int | None = None
    """Examples per lm-eval task (None: all)."""
    out: str | None = None
    """JSON file for the results (default: <model>/eval.json when the model is a folder)."""
    trust_remote_code: bool = False


@dataclass
class ShapesConfig:
    """`mptool shapes`: legal uniform targets near a ratio."""

    model: str | None = None
    ratio: float = 0.5
    tp: list[int] = field(default_factory=lambda: [1])
    ffn_multiple: int = 64


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], where)
    if _is_dataclass_type(tp):
        if value is None:  # an empty section (every key commented out): its defaults
            value = {}
        if not isinstance(value, dict):
            raise MptoolError(f"{where} must be a mapping, got {value!r}")
        return from_dict(tp, value, where + ".")
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise MptoolError(f"{where} must be a list, got {value!r}")
        return [_coerce(v, item, where) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise MptoolError(f"{where} must be true or false, got {value!r}")
    if tp in (int, float, str):
        if isinstance(value, bool) or (tp is str and not isinstance(value, (str, int, float))):
            raise MptoolError(f"{where} must be {'a number' if tp is not str else 'text'}"
                              f"{' (an integer)' if tp is int else ''}, got {value!r}")  # true is not 1
        try:
            out = tp(value)
        except (TypeError, ValueError):
            raise MptoolError(f"{where} must be {tp.__name__}, got {value!r}") from None
        if tp is int and isinstance(value, float) and value != out:
            raise MptoolError(f"{where} must be an integer, got {value!r}")
        return out
    return value


def _hints(cls: type) -> dict[str, Any]:
    from mptool.maskprune import MaskPruneConfig
    from mptool.recover import RecoveryConfig

    return typing.get_type_hints(cls, localns={"MaskPruneConfig": MaskPruneConfig,
                                               "RecoveryConfig": RecoveryConfig})


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build ``cls`` from a (nested) dict; unknown keys are a user error."""
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise MptoolError(
            f"unknown config key(s) {', '.join(prefix + u for u in unknown)}; accepted: "
            f"{', '.join(prefix + n for n in sorted(names))}"
        )
    return cls(**{k: _coerce(v, hints[k], prefix + k) for k, v in data.items()})


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


class _RecipeLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (plain YAML keeps the last,
    so a recipe's first ``ratio:`` would be dropped without a word)."""


def _mapping_without_duplicates(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict:
    seen = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: PyYAML merges it below, and a
            continue                                   # key merged in may be overridden here
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} is given twice (line {key_node.start_mark.line + 1}); keep one", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node)


_RecipeLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def load_config(cls: type[T], path: str | Path | None = None,
                overrides: dict[str, Any] | None = None) -> T:
    """Defaults, then a YAML recipe, then non-None dotted overrides (CLI flags)."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path).expanduser()
        if p.is_dir():
            raise MptoolError(f"config file {path} is a folder; give a YAML recipe file")
        if not p.is_file():
            raise MptoolError(f"config file {path} does not exist; give a YAML recipe file")
        try:
            loaded = yaml.load(p.read_text(encoding="utf-8"), Loader=_RecipeLoader)  # noqa: S506 (a SafeLoader)
        except UnicodeDecodeError:
            raise MptoolError(f"config file {path} is not UTF-8 text; give a YAML recipe file") from None
        except yaml.YAMLError as e:
            raise MptoolError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise MptoolError(f"config file {path} must hold a mapping of config keys")
        data = loaded or {}
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            if node.get(part) is None:  # absent, or an empty section in the recipe
                node[part] = {}
            elif not isinstance(node[part], dict):
                raise MptoolError(f"{part} in the recipe must be a mapping of {part} keys, got {node[part]!r}; "
                                  f"the command line cannot set {dotted} in it")
            node = node[part]
        node[leaf] = value
    cfg = from_dict(cls, data)
    if isinstance(getattr(cfg, "out", None), str):  # "~/runs/x" from a recipe is the user's home, as in a shell
        cfg.out = os.path.expanduser(cfg.out)
    return cfg


_PATH_FIELDS = ("model", "data", "train", "eval", "text", "out")


def with_absolute_paths(cfg: T) -> T:
    """``cfg`` (nested configs too) with the local paths it names made absolute: the output folder
    always, an input where it exists here. A saved config, and ``--resume`` that reads it back,
    then mean the same folders from any working directory; hub ids and dataset names stay as given."""
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            changes[f.name] = with_absolute_paths(value)
        elif f.name in _PATH_FIELDS and isinstance(value, str) and value:
            path = os.path.expanduser(value)
            if f.name == "out" or os.path.exists(path):
                changes[f.name] = os.path.abspath(path)
    return dataclasses.replace(cfg, **changes)


def to_saved(cfg: Any) -> str:
    """The YAML of a resolved config as written beside an artefact (paths absolute)."""
    return yaml.safe_dump(to_dict(with_absolute_paths(cfg)), sort_keys=False)


def save_config(cfg: Any, path: Path) -> None:
    path.write_text(to_saved(cfg))


SEED_MAX = 2**32 - 1  # numpy's bound; torch and random accept it too


def seed_problems(seed: object, name: str = "--seed") -> list[str]:
    """A seed every random generator the run seeds accepts (one line)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX:
        return [f"{name} {seed!r} must be a whole number from 0 to {SEED_MAX}"]
    return []
