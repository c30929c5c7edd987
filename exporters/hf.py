"""The hf target: a plain transformers folder, reloaded and checked against the source.

Written: ``*.safetensors`` (sharded above ``max_shard_size``, with the index), ``config.json``
with an explicit ``head_dim`` (several loaders still derive ``hidden_size // heads``, which is
wrong for pruned heads), the tokenizer, ``generation_config.json``, the pruning ``report.json``
when the source has one, and a model card ``README.md``.

Check: the written folder is reloaded with transformers in the written dtype and its logits on
fresh random token ids are compared with the fp32 source model (:data:`TOLERANCE`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from mptool.exporters.common import Tolerance, compare_logits, reference_logits

# Reloaded folder (computed in the written dtype, as users run it) vs the fp32 source:
# max |diff| <= atol + rtol * max |logit|. fp32 is a byte copy of the weights (measured 0).
# Measured on SmolLM2-135M, 2 x 32 random ids, max |logit| 33.7: bf16 max diff 1.96-2.59
# (5.8-7.7 %; rounding the weights alone gives 1.44), fp16 0.51 (1.5 %).
TOLERANCE: dict[str, Tolerance] = {
    "float32": Tolerance(atol=1e-5, rtol=1e-5),
    "bfloat16": Tolerance(atol=1e-2, rtol=0.15),
    "float16": Tolerance(atol=1e-2, rtol=0.04),
}

PHASES = ("write checkpoint", "reload and compare logits")

USAGE = """
```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{out}")
tokenizer = AutoTokenizer.from_pretrained("{out}")
```
"""


def save_checkpoint(model: Any, tokenizer: Any, folder: Path, dtype: str, max_shard_size: str,
                    source_folder: Path | None = None) -> None:
    """Write ``model`` as a plain transformers folder in ``dtype``.

    The model is cast in place (the caller owns it and has taken its fp32 reference before), so a
    large model is never held twice.

    Args:
        model: a supported causal LM.
        tokenizer: its tokenizer.
        folder: an existing, empty folder.
        dtype: ``float32``, ``bfloat16`` or ``float16``.
        max_shard_size: e.g. ``"2GB"``; larger checkpoints are split into shards plus an index.
        source_folder: the model's folder, for its pruning report (:data:`PROVENANCE`).
    """
    from transformers import GenerationConfig

    from mptool.shapes import Dims

    config = model.config
    config.head_dim = Dims.from_config(config).head_dim
    if not config.architectures:
        config.architectures = [type(model).__name__]
    model.to(getattr(torch, dtype))
    config.dtype = getattr(torch, dtype)
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(folder)
    if not (folder / "generation_config.json").exists():
        GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                         pad_token_id=getattr(config, "pad_token_id", None)).save_pretrained(folder)
    copy_provenance(source_folder, folder)


PROVENANCE = ("report.json", "mptool-config.yaml")
"""Files of a `mptool compress` folder that travel with every export: the pruning report and the
resolved config that reproduces the run."""


def copy_provenance(source_folder: Path | None, folder: Path) -> None:
    for name in PROVENANCE:
        if source_folder is not None and (source_folder / name).is_file():
            shutil.copy2(source_folder / name, folder / name)


def reload_and_compare(folder: Path, dtype: str, ids: torch.Tensor, ref: torch.Tensor,
                       tolerance: Tolerance, what: str) -> dict[str, Any]:
    """Reload ``folder`` with transformers in ``dtype`` and compare its logits with ``ref``."""
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype),
                                                    use_safetensors=True).eval()
    if reloaded.config.head_dim is None:  # pragma: no cover - save_checkpoint always writes it
        raise AssertionError("written config has no head_dim")
    got = reference_logits(reloaded, ids)
    del reloaded
    return compare_logits(got, ref, tolerance, what)


def export(src: Any, tmp: Path, dtype: str, cfg: Any, advance: Callable[..., None]) -> dict[str, Any]:
    """Write the hf target into ``tmp`` and check it; returns the parity record."""
    advance(0, info=PHASES[0])
    save_checkpoint(src.model, src.tokenizer, tmp, dtype, cfg.max_shard_size, src.folder)
    advance(1, info=PHASES[1])
    tol = TOLERANCE[dtype]
    logits = reload_and_compare(tmp, dtype, src.ids, src.ref_logits, tol,
                                f"hf export ({dtype}) reloaded with transformers")
    advance(1)
    return {"tolerance": tol.as_dict(), "max_abs_diff": logits["max_abs_diff"],
            "parity": {"transformers_logits": logits}}


def usage(out: Path, record: dict[str, Any]) -> str:
    return USAGE.format(out=out)


def read_report(folder: Path | None) -> dict[str, Any] | None:
    """The pruning report of a `mptool compress` folder, if any."""
    if folder is None or not (folder / "report.json").is_file():
        return None
    try:
        return json.loads((folder / "report.json").read_text())
    except ValueError:
        return None


def validate(cfg: Any, spec: Any) -> list[str]:
    """Nothing beyond the common checks: every supported model can be written as hf."""
    return []
