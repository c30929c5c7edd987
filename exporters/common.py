"""What every exporter shares: tolerances, the PyTorch reference, token comparison, file facts.

An export is checked against the source model run by transformers in fp32:

* **logits** on fresh random token ids (or windows of the user's text, ``parity.text``):
  ``max |engine - torch| <= atol + rtol * max |torch|``
  (a :class:`Tolerance`, stated per target and dtype in each exporter, like optimum's
  ``ATOL_FOR_VALIDATION``);
* **greedy tokens** (onnx, vllm): ``new_tokens`` steps from random prompts with EOS suppressed in
  both, compared token by token. The one allowed difference is a *tie*: at the first differing
  step the reference's logits for its token and for the engine's token are within the logits
  tolerance, so either choice is correct and the two continuations may legitimately part. It is
  recorded in ``export.json``; any other difference is a :class:`~mptool.errors.ParityError` naming
  the prompt, the position and the logit gap.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from mptool.errors import MptoolError, ParityError


@dataclass(frozen=True)
class Tolerance:
    """Allowed logit error: ``atol + rtol * max |reference logit|``."""

    atol: float
    rtol: float

    def bound(self, reference: torch.Tensor) -> float:
        return self.atol + self.rtol * float(reference.abs().max())

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def compare_logits(got: torch.Tensor, ref: torch.Tensor, tol: Tolerance, what: str) -> dict[str, Any]:
    """Check ``got`` against ``ref`` (both ``[..., vocab]``) and return the measurement.

    Raises:
        ParityError: the max abs difference exceeds the tolerance bound (or is not finite).
    """
    got, ref = got.float(), ref.float()
    if got.shape != ref.shape:
        raise ParityError(f"{what}: logits shape {tuple(got.shape)} != PyTorch's {tuple(ref.shape)}")
    if not torch.isfinite(ref).all():
        raise ParityError(f"{what}: PyTorch's own logits are not finite: the source model's weights hold NaN or "
                          "Inf, or its activations overflow its dtype; export a checkpoint that computes finite logits")
    diff = float((got - ref).abs().max())
    bound = tol.bound(ref)
    result = {"max_abs_diff": diff, "bound": bound, "ref_max_abs": float(ref.abs().max()),
              "tolerance": tol.as_dict()}
    if not diff <= bound:  # also catches NaN
        raise ParityError(
            f"{what}: max |logit diff| {diff:.3g} exceeds the tolerance {bound:.3g} "
            f"(atol {tol.atol:g} + rtol {tol.rtol:g} x max |logit| {result['ref_max_abs']:.3g}), "
            f"{diff / bound if bound else float('inf'):.1f}x over"
        )
    return result


def special_ids(tokenizer: Any, config: Any, generation_config: Any = None) -> set[int]:
    """EOS ids (from config, generation config and tokenizer) that greedy checks suppress."""
    ids: set[int] = set()
    for source in (config, generation_config, tokenizer):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


def random_ids(tokenizer: Any, config: Any, shape: Sequence[int], seed: int) -> torch.Tensor:
    """Random token ids of ``shape``: real tokenizer tokens, never special ones."""
    vocab = min(int(config.vocab_size), len(tokenizer))
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    allowed = torch.tensor([i for i in range(vocab) if i not in special])
    g = torch.Generator().manual_seed(seed)
    return allowed[torch.randint(len(allowed), tuple(shape), generator=g)]


PROBE_TOKENS = 1 << 16
"""``parity.text``: the windows are drawn from the text's first this many tokens."""


def text_stream(tokenizer: Any, path_or_name: str) -> list[int]:
    """Token ids of ``parity.text`` (its documents joined by blank lines), at most :data:`PROBE_TOKENS`."""
    from mptool.data import _encode, load_texts

    return _encode(tokenizer, "\n\n".join(load_texts(path_or_name, role="eval")), PROBE_TOKENS)


def probe_ids(tokenizer: Any, config: Any, shape: Sequence[int], seed: int,
              stream: Sequence[int] | None = None) -> torch.Tensor:
    """The token ids a check feeds: :func:`random_ids`, or with ``stream`` (a text's token ids)
    ``shape[0]`` windows of ``shape[1]`` consecutive tokens at seeded random offsets."""
    if stream is None:
        return random_ids(tokenizer, config, shape, seed)
    n, length = shape
    if len(stream) < length:
        raise MptoolError(f"--parity-text has {len(stream)} tokens; the parity checks need windows of {length}: "
                          f"give a longer text")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(len(stream) - length + 1, (n,), generator=g).tolist()
    ids = torch.tensor(list(stream), dtype=torch.long)
    return torch.stack([ids[s:s + length] for s in starts])


@torch.no_grad()
def reference_logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    """fp32 logits of the PyTorch model on a full (unpadded) batch."""
    return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()


@torch.no_grad()
def reference_greedy(model: Any, prompts: Sequence[Sequence[int]], new_tokens: int,
                     suppress: Iterable[int]) -> list[tuple[list[int], torch.Tensor]]:
    """Greedy decoding with transformers (KV cache), ``suppress`` ids masked at every step.

    Returns, per prompt, the generated ids and the ``[new_tokens, vocab]`` raw fp32 logits of each
    step (before masking), which :func:`compare_tokens` needs to tell ties from errors.
    """
    suppress = sorted(set(suppress))
    out = []
    for prompt in prompts:
        ids = torch.tensor([list(prompt)])
        result = model(input_ids=ids, use_cache=True)
        tokens, steps = [], []
        for _ in range(new_tokens):
            logits = result.logits[0, -1].float()
            masked = logits.clone()
            if suppress:
                masked[suppress] = float("-inf")
            token = int(masked.argmax())
            tokens.append(token)
            steps.append(logits)
            result = model(input_ids=torch.tensor([[token]]), past_key_values=result.past_key_values,
                           use_cache=True)
        out.append((tokens, torch.stack(steps)))
    return out


def logprob_diff(engine_tokens: Sequence[Sequence[int]], engine_logprobs: Sequence[Sequence[float]],
                 reference: list[tuple[list[int], torch.Tensor]]) -> float:
    """Max |engine - torch| log-probability of the chosen tokens, up to each prompt's first difference."""
    worst = 0.0
    for got, lps, (want, logits) in zip(engine_tokens, engine_logprobs, reference):
        torch_lps = torch.log_softmax(logits.double(), dim=-1)
        for i, (a, b, lp) in enumerate(zip(got, want, lps)):
            if a != b:
                break
            worst = max(worst, abs(float(lp) - float(torch_lps[i, a])))
    return worst


def greedy_agreement(engine: Sequence[Sequence[int]], reference: list[tuple[list[int], torch.Tensor]]) -> dict[str, Any]:
    """How far an engine's greedy tokens follow PyTorch's, with no bound: per prompt, the tokens
    before the first difference. For a dtype whose rounding is expected to move near-ties (bf16)."""
    prefix = []
    for got, (want, _) in zip(engine, reference):
        n = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
        prefix.append(n)
    new = len(reference[0][0]) if reference else 0
    return {"prompts": len(reference), "new_tokens": new, "prefix_tokens": prefix,
            "mean_prefix": sum(prefix) / max(len(prefix), 1), "all_identical": all(n == new for n in prefix),
            "first_token_agree": sum(n > 0 for n in prefix)}


def compare_tokens(engine: Sequence[Sequence[int]], reference: list[tuple[list[int], torch.Tensor]],
                   tie_tol: float, what: str) -> dict[str, Any]:
    """Compare greedy tokens prompt by prompt; see the module docstring for the tie rule.

    Raises:
        ParityError: at the first differing position that is not a tie.
    """
    compared, ties = 0, []
    if len(engine) != len(reference):
        raise ParityError(f"{what}: the engine answered {len(engine)} prompts, PyTorch {len(reference)}")
    for p, (got, (want, logits)) in enumerate(zip(engine, reference)):
        got = list(got)
        if len(got) != len(want):
            raise ParityError(f"{what}: prompt {p} produced {len(got)} tokens, PyTorch {len(want)}")
        for i, (a, b) in enumerate(zip(got, want)):
            if a == b:
                compared += 1
                continue
            gap = float(logits[i, b] - logits[i, a])
            if gap < 0:  # PyTorch's choice is the argmax of the unsuppressed logits: ``a`` was suppressed
                raise ParityError(f"{what}: at position {i} of prompt {p} the engine chose {a}, a token PyTorch "
                                  f"suppresses (end of sequence before the requested length); PyTorch chose {b}")
            if gap <= tie_tol:
                ties.append({"prompt": p, "position": i, "engine": a, "torch": b, "logit_gap": gap})
                break
            raise ParityError(
                f"{what}: first differing token at position {i} of prompt {p}: engine chose {a}, "
                f"PyTorch {b} (logit gap {gap:.3g} > tolerance {tie_tol:.3g}; "
                f"{i} of {len(want)} tokens matched)"
            )
    return {"prompts": len(reference), "new_tokens": len(reference[0][0]) if reference else 0,
            "tokens_matched": compared, "identical": not ties, "ties": ties}


def make_shareable(folder: Path) -> None:
    """Ordinary permissions for everything written (safetensors and mkdtemp create private ones)."""
    umask = os.umask(0)
    os.umask(umask)
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~umask)
        for name in files:
            path = os.path.join(root, name)
            mode = 0o777 if os.access(path, os.X_OK) and name.endswith(".sh") else 0o666
            os.chmod(path, mode & ~umask)


def artefact_sizes(folder: Path) -> dict[str, Any]:
    """Bytes per file (relative paths) and in total."""
    files = {str(p.relative_to(folder)): p.stat().st_size
             for p in sorted(folder.rglob("*")) if p.is_file()}
    return {"total_bytes": sum(files.values()), "files": files}


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"
