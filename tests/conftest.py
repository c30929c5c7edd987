"""Tiny random models of every supported family, built from configs (never downloaded)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

# Each family with the features that make it different: GQA everywhere, q/k/v biases (qwen2),
# per-head q/k norms (qwen3); the llama one has 8 heads on hidden 128 so 6 heads (3 groups x 2)
# do not divide the hidden size and must be written as Mistral.
TINY = {
    "llama": dict(hidden_size=128, num_attention_heads=8, num_key_value_heads=4, head_dim=16,
                  intermediate_size=256),
    "mistral": dict(hidden_size=128, num_attention_heads=8, num_key_value_heads=2, head_dim=16,
                    intermediate_size=192, sliding_window=None),
    "qwen2": dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=3, head_dim=16,
                  intermediate_size=160),
    "qwen3": dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                  intermediate_size=256),
}
FAMILIES = list(TINY)


def tiny_config(family: str, **overrides):
    from transformers import AutoConfig

    kw = dict(vocab_size=320, num_hidden_layers=2, max_position_embeddings=256,
              tie_word_embeddings=family in ("qwen2", "qwen3"), bos_token_id=1, eos_token_id=2,
              pad_token_id=0)
    kw.update(TINY[family])
    kw.update(overrides)
    return AutoConfig.for_model(family, **kw)


def tiny_model(family: str, seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides), dtype=torch.float32)
    # Random init leaves norms at 1 and biases at 0; perturb them so slicing bugs show.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def tokenizer_dir(tmp_path_factory) -> Path:
    """A small byte-level BPE tokenizer trained offline on a few sentences (vocab <= 320)."""
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def make_tokenizer(out: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = SAMPLE_TEXT.split(". ")
    tok.train_from_iterator(text * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    fast.save_pretrained(out)
    return out


SAMPLE_TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife. However little known the feelings or views of such a man may be "
    "on his first entering a neighbourhood, this truth is so well fixed in the minds of the "
    "surrounding families, that he is considered the rightful property of some one or other of "
    "their daughters. Sir Walter Elliot, of Kellynch Hall, in Somersetshire, was a man who, for "
    "his own amusement, never took up any book but the Baronetage. Emma Woodhouse, handsome, "
    "clever, and rich, with a comfortable home and happy disposition, seemed to unite some of "
    "the best blessings of existence. "
)


@pytest.fixture
def text_file(tmp_path) -> Path:
    p = tmp_path / "corpus.txt"
    p.write_text(SAMPLE_TEXT * 40)
    return p


def plant_massive_channel(model, layer: int, channel: int, scale: float = 1e4) -> None:
    """Make one FFN channel write ``scale`` times more into the residual stream."""
    from mptool.families import get_adapter

    a = get_adapter(model.config)
    down = getattr(a.ffn(a.decoder_layers(model)[layer]), a.down)
    with torch.no_grad():
        down.weight[:, channel] *= scale
