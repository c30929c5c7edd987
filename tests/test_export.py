"""`mptool export`: every target on tiny models of every family, checked against PyTorch.

Fast tests use tiny random models (2 layers). Tests marked ``slow`` start vLLM (CPU build) or use
the real SmolLM2-135M; they still run in CI. vLLM start-up dominates, so the vLLM checks of the
four tiny families and the "vLLM alone" check share one fresh vLLM process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import FAMILIES, SAMPLE_TEXT, tiny_model
from mptool.cli import app
from mptool.config import load_config
from mptool.errors import MptoolError, ParityError
from mptool.exporters import ExportConfig, export
from mptool.exporters.config import OnnxConfig, ParityConfig, VllmConfig
from test_cli import save_tiny

runner = CliRunner()
# vLLM's CPU attention refuses head_dim 16 (the default tiny models); 64 works.
VLLM_TINY = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                 intermediate_size=256)


def run(*args) -> object:
    return runner.invoke(app, [str(a) for a in args])


def record(out: Path) -> dict:
    return json.loads((out / "export.json").read_text())


def assert_nothing_left(out: Path) -> None:
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.tmp-*")), list(out.parent.iterdir())


def assert_checks_passed(rec: dict) -> None:
    """Every logits check within its bound; every greedy check token-identical (tiny: no ties)."""
    assert rec["parity"], rec
    for name, check in rec["parity"].items():
        if "max_abs_diff" in check:
            assert check["max_abs_diff"] <= check["bound"], name
        greedy = check.get("greedy", check if "tokens_matched" in check else None)
        if greedy is not None:
            assert greedy["identical"] and greedy["tokens_matched"] == greedy["prompts"] * greedy["new_tokens"], name


@torch.no_grad()
def greedy(model, ids: list[int], n: int) -> list[int]:
    """transformers' own greedy generate (EOS suppressed for n steps), the independent reference."""
    x = torch.tensor([ids])
    return model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=n,
                          min_new_tokens=n)[0, len(ids):].tolist()


def tamper(monkeypatch, *modules, weight: str = "layers.0.mlp.down_proj.weight",
           edit=lambda t: t + 1.0) -> None:
    """Make every written checkpoint differ from the source: ``edit`` applied to one weight (by
    default +1 on every element of a down_proj) after saving."""
    import mptool.exporters.hf as hf
    from safetensors.torch import load_file, save_file

    original = hf.save_checkpoint

    def save_then_tamper(model, tokenizer, folder, *args, **kwargs):
        original(model, tokenizer, folder, *args, **kwargs)
        path = next(Path(folder).glob("*.safetensors"))
        tensors = load_file(str(path))
        name = next(k for k in tensors if k.endswith(weight))
        tensors[name] = edit(tensors[name])
        save_file(tensors, str(path), metadata={"format": "pt"})

    for module in (hf, *modules):
        monkeypatch.setattr(module, "save_checkpoint", save_then_tamper)


# ------------------------------------------------------------------- hf


def test_hf_export_reloads_with_the_same_logits(family, tokenizer_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    src = save_tiny(family, tokenizer_dir, tmp_path / "src")
    out = tmp_path / "hf"
    rec = export(ExportConfig(model=str(src), target="hf", out=str(out)))
    assert_checks_passed(rec)
    assert rec["dtype"] == "float32" and rec["parity"]["transformers_logits"]["max_abs_diff"] == 0.0
    config = json.loads((out / "config.json").read_text())
    assert config["head_dim"] == tiny_model(family).config.head_dim
    for name in ("model.safetensors", "tokenizer.json", "generation_config.json", "README.md", "export.json"):
        assert (out / name).is_file(), name
    saved = record(out)
    assert saved["target"] == "hf" and saved["tolerance"] == {"atol": 1e-5, "rtol": 1e-5}
    again = load_config(ExportConfig, out / "export-config.yaml")
    assert again == ExportConfig(model=str(src.resolve()), target="hf", out=str(out), dtype="float32")
    assert saved["sizes"]["total_bytes"] >= saved["sizes"]["files"]["model.safetensors"] > 0
    assert saved["seconds"] >= 0  # rounded: a tiny export can take < 0.05 s
    ids = torch.randint(3, 300, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(out).eval()(ids).logits
        b = tiny_model(family)(ids).logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_hf_export_keeps_the_source_dtype_by_default(tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    src = tmp_path / "src"
    tiny_model("qwen3").to(torch.bfloat16).save_pretrained(src)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(src)
    rec = export(ExportConfig(model=str(src), target="hf", out=str(tmp_path / "hf")))
    assert rec["dtype"] == "bfloat16" and json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"
    assert_checks_passed(rec)


@pytest.mark.parametrize("foreign", ['[1, 2]', '{"accuracy": 0.5, "pruned": 3}', '{"dense": "x"}'])
def test_a_report_json_another_tool_wrote_is_ignored(foreign, tokenizer_dir, tmp_path, monkeypatch):
    """A ``report.json`` without mptool's marker is not a pruning report: the export's card has
    none (it crashed on it); `export .` names its output after the folder, not runs/-hf."""
    src = save_tiny("llama", tokenizer_dir, tmp_path / "mine")
    (src / "report.json").write_text(foreign)
    monkeypatch.chdir(src)
    cfg = ExportConfig(model=".", target="hf")
    assert cfg.resolved_out() == Path("runs") / "mine-hf"
    rec = export(ExportConfig(model=".", target="hf", out=str(tmp_path / "hf")))
    assert_checks_passed(rec)
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "## Pruning report" not in card and "structured-pruning" not in card


@pytest.fixture
def pruned_tiny(tokenizer_dir, text_file, tmp_path) -> Path:
    """A tiny Llama (8 heads on hidden 128) pruned to 3 KV groups x 2 heads: written as Mistral."""
    src = save_tiny("llama", tokenizer_dir, tmp_path / "dense")
    out = tmp_path / "pruned"
    res = run("compress", src, "--method", "wanda-sp", "--kv-heads", "3", "--heads-per-group", "2",
              "--ffn", "128", "--data", text_file, "--eval-data", text_file, "--calib-tokens", "512",
              "--seq-len", "128", "--eval-tokens", "512", "--recovery-steps", "0", "--out", out)
    assert res.exit_code == 0, res.output
    assert json.loads((out / "config.json").read_text())["architectures"] == ["MistralForCausalLM"]
    return out


def test_hf_export_of_a_pruned_model_shards_and_carries_the_report(pruned_tiny, tmp_path):
    out = tmp_path / "hf"
    res = run("export", pruned_tiny, "--target", "hf", "--dtype", "bf16", "--max-shard-size", "100KB",
              "--out", out)
    assert res.exit_code == 0, res.output
    assert "transformers_logits" in res.output and "wrote" in res.output
    rec = record(out)
    assert rec["dtype"] == "bfloat16" and rec["tolerance"]["rtol"] == 1e-4
    assert_checks_passed(rec)
    logits = rec["parity"]["transformers_logits"]
    # the reload (upcast) equals the source with bf16-rounded weights; bf16 arithmetic is recorded
    assert logits["max_abs_diff"] == 0.0
    assert logits["in_dtype"]["dtype"] == "bfloat16" and 0 < logits["in_dtype"]["max_abs_diff"]
    assert 0.0 <= logits["in_dtype"]["top1_agreement"] <= 1.0
    shards = sorted(out.glob("model-*.safetensors"))
    from safetensors import safe_open

    n = sum(len(list(safe_open(str(f), framework="pt").keys())) for f in shards)
    assert logits["weights"] == {"tensors": n, "identical": n}
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["head_dim"] == 16 and config["num_attention_heads"] == 6 and config["dtype"] == "bfloat16"
    card = (out / "README.md").read_text()
    report = json.loads((pruned_tiny / "report.json").read_text())
    assert "## Pruning report" in card and "pruned" in card.split("---")[1]
    for needle in ("| dense | 4 | 2 | 8 | 256 |", "| pruned | 3 | 2 | 6 | 128 |",
                   f"{report['dense']['total_params']:,}", f"{report['pruned']['total_params']:,}",
                   f"{report['pruned']['perplexity']['ppl']:.2f}", "wanda-sp", "mptool compress"):
        assert needle in card, needle
    assert json.loads((out / "report.json").read_text()) == report


# ------------------------------------------------------------------- onnx


def test_onnx_export_matches_torch_prefill_decode_and_greedy(family, tokenizer_dir, tmp_path):
    src = save_tiny(family, tokenizer_dir, tmp_path / "src")
    out = tmp_path / "onnx"
    rec = export(ExportConfig(model=str(src), target="onnx", out=str(out)))
    assert_checks_passed(rec)
    assert set(rec["parity"]) == {"onnxruntime_prefill_logits", "onnxruntime_decode_logits",
                                  "onnxruntime_genai_greedy"}
    assert rec["onnx"]["attention_op"] == "GroupQueryAttention"
    for name in ("model.onnx", "model.onnx.data", "genai_config.json", "tokenizer.json", "README.md"):
        assert (out / name).is_file(), name
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # staging and builder cache gone
    genai = json.loads((out / "genai_config.json").read_text())
    assert genai["model"]["decoder"]["session_options"]["provider_options"] == []


def test_onnx_export_applies_mistrals_sliding_window(tokenizer_dir, tmp_path):
    """Mistral applies its window in every layer without saying so in ``layer_types``; the
    builder windows only the layers that list marks, so the ONNX model attended past the window
    and the short probes could not tell. The export now marks them and checks a sequence that
    runs past the window (prefill and decode), against an independent run of both models."""
    from transformers import AutoModelForCausalLM

    from mptool.exporters.onnx import DECODE_STEPS, onnx_logits

    src = save_tiny("mistral", tokenizer_dir, tmp_path / "src", sliding_window=16)
    out = tmp_path / "onnx"
    rec = export(ExportConfig(model=str(src), target="onnx", out=str(out)))
    assert_checks_passed(rec)
    beyond = rec["parity"]["onnxruntime_beyond_window_logits"]
    assert beyond["tokens"] == 16 + 16 + DECODE_STEPS and beyond["max_abs_diff"] <= beyond["bound"]
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    full = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, sliding_window=None).eval()
    ids = torch.randint(3, model.config.vocab_size, (1, 60), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref, unwindowed = model(ids).logits, full(ids).logits
    got = onnx_logits(out, ids, ["CPUExecutionProvider"])[0]
    assert (ref - unwindowed).abs().max() > 100 * (got - ref).abs().max()  # the window matters here
    assert torch.allclose(got, ref, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_onnx_fp16_runs_on_the_cpu_provider(family, tokenizer_dir, tmp_path):
    src = save_tiny(family, tokenizer_dir, tmp_path / "src")
    out = tmp_path / "onnx16"
    rec = export(ExportConfig(model=str(src), target="onnx", dtype="fp16", out=str(out)))
    assert_checks_passed(rec)
    assert rec["dtype"] == "float16" and rec["onnx"]["execution_provider_built"] == "cuda"
    assert 0 < rec["max_abs_diff"] <= rec["parity"]["onnxruntime_prefill_logits"]["bound"]


def test_onnx_fp16_for_the_cuda_provider_names_cuda(tokenizer_dir, tmp_path):
    src = save_tiny("qwen2", tokenizer_dir, tmp_path / "src")
    out = tmp_path / "onnx16"
    rec = export(ExportConfig(model=str(src), target="onnx", dtype="float16", out=str(out),
                              onnx=OnnxConfig(provider="cuda")))
    assert_checks_passed(rec)
    genai = json.loads((out / "genai_config.json").read_text())
    assert "cuda" in genai["model"]["decoder"]["session_options"]["provider_options"][0]


def test_onnx_export_of_a_pruned_model(pruned_tiny, tmp_path):
    out = tmp_path / "onnx"
    res = run("export", pruned_tiny, "--target", "onnx", "--out", out)
    assert res.exit_code == 0, res.output
    rec = record(out)
    assert_checks_passed(rec)
    genai = json.loads((out / "genai_config.json").read_text())["model"]["decoder"]
    assert (genai["num_attention_heads"], genai["num_key_value_heads"], genai["head_size"]) == (6, 3, 16)
    assert "## Pruning report" in (out / "README.md").read_text()


def test_probe_windows_are_consecutive_text_tokens_at_seeded_offsets():
    from mptool.exporters.common import probe_ids

    stream = list(range(1000, 1100))
    ids = probe_ids(None, None, (4, 10), seed=3, stream=stream)
    assert ids.shape == (4, 10)
    assert all(row[0] >= 1000 and row[-1] < 1100 and torch.equal(row, torch.arange(int(row[0]), int(row[0]) + 10))
               for row in ids)
    assert torch.equal(ids, probe_ids(None, None, (4, 10), seed=3, stream=stream))
    assert not torch.equal(ids, probe_ids(None, None, (4, 10), seed=4, stream=stream))
    with pytest.raises(MptoolError, match="has 5 tokens; the parity checks need windows of 10"):
        probe_ids(None, None, (1, 10), seed=0, stream=stream[:5])


def test_parity_text_checks_the_onnx_export_on_windows_of_the_text(tokenizer_dir, tmp_path, monkeypatch):
    """--parity-text: the logits check and the greedy prompts are windows of the text's tokens (the
    reference logits are computed on exactly those), recorded in export.json and the model card."""
    import mptool.exporters.common as common
    from mptool.exporters.common import reference_logits

    src = save_tiny("llama", tokenizer_dir, tmp_path / "src")
    text = tmp_path / "serve.txt"
    text.write_text(SAMPLE_TEXT * 3)
    seen = []
    monkeypatch.setattr(common, "reference_logits", lambda model, ids: seen.append(ids) or reference_logits(model, ids))
    out = tmp_path / "onnx"
    res = run("export", src, "--target", "onnx", "--parity-text", text, "--out", out)
    assert res.exit_code == 0, res.output
    rec = record(out)
    assert_checks_passed(rec)
    assert rec["probe"] == f"windows of the text {text}" and rec["config"]["parity"]["text"] == str(text)
    assert f"on windows of the text {text}" in (out / "README.md").read_text()
    from transformers import AutoTokenizer
    stream = AutoTokenizer.from_pretrained(src)(SAMPLE_TEXT * 3, add_special_tokens=False)["input_ids"]
    flat = " " + " ".join(map(str, stream)) + " "
    (ids,) = seen
    assert ids.shape == (2, 32)
    assert all(" " + " ".join(map(str, row.tolist())) + " " in flat for row in ids)


# ------------------------------------------------------------------- failures leave nothing


@pytest.mark.parametrize("target", ["hf", "onnx", "vllm"])
def test_a_tampered_weight_fails_the_export_and_leaves_nothing(target, tokenizer_dir, tmp_path, monkeypatch):
    import mptool.exporters.vllm as vllm_exporter

    src = save_tiny("llama", tokenizer_dir, tmp_path / "src", **VLLM_TINY)
    out = tmp_path / target
    tamper(monkeypatch, vllm_exporter)
    with pytest.raises(ParityError, match=r"max \|logit diff\| [0-9.e+-]+ exceeds the tolerance"):
        export(ExportConfig(model=str(src), target=target, out=str(out)))
    assert_nothing_left(out)


def test_cli_parity_failure_exits_2_with_the_measured_difference(tokenizer_dir, tmp_path, monkeypatch):
    src = save_tiny("qwen2", tokenizer_dir, tmp_path / "src")
    out = tmp_path / "hf"
    tamper(monkeypatch)
    res = run("export", src, "--target", "hf", "--out", out)
    assert res.exit_code == 2, res.output
    last = res.output.strip().splitlines()[-1]
    assert last.startswith("error:") and "exceeds the tolerance" in last and "x over" in last, last
    assert "on random token ids: --parity-text FILE checks on text like the one you serve" in last, last
    assert_nothing_left(out)
    short = tmp_path / "short.txt"
    short.write_text("A few words.")
    res = run("export", src, "--target", "hf", "--parity-text", short, "--out", out)
    assert res.exit_code == 2 and "tokens; the parity checks need 32" in res.output.strip().splitlines()[-1], res.output
    assert_nothing_left(out)


def test_greedy_mismatch_names_the_first_differing_token():
    from mptool.exporters.common import compare_tokens

    logits = torch.zeros(4, 10)
    logits[:, 3] = 1.0
    reference = [([3, 3, 3, 3], logits)]
    with pytest.raises(ParityError, match="first differing token at position 2 of prompt 0: engine chose 5"):
        compare_tokens([[3, 3, 5, 3]], reference, tie_tol=1e-3, what="engine")
    logits[2, 5] = 1.0 - 1e-5  # a tie: either token is a correct greedy choice
    result = compare_tokens([[3, 3, 5, 7]], reference, tie_tol=1e-3, what="engine")
    assert result["ties"] == [{"prompt": 0, "position": 2, "engine": 5, "torch": 3,
                               "logit_gap": pytest.approx(1e-5, abs=1e-6)}]
    # a token PyTorch suppressed (EOS before the requested length) is a failure, never a tie
    logits[2, 9] = 5.0
    with pytest.raises(ParityError, match="the engine chose 9, a token PyTorch suppresses"):
        compare_tokens([[3, 3, 9, 3]], reference, tie_tol=1e-3, what="engine")
    with pytest.raises(ParityError, match="the engine answered 0 prompts, PyTorch 1"):
        compare_tokens([], reference, tie_tol=1e-3, what="engine")


@pytest.mark.parametrize("args, needle", [
    (["--target", "tflite"], "--target 'tflite' is not one of hf, onnx, vllm"),
    (["--target", "onnx", "--dtype", "bfloat16"], "choose float32, float16"),
    (["--target", "onnx", "--dtype", "float32", "--onnx-provider", "cuda"], "needs --dtype float16"),
    (["--target", "onnx", "--onnx-provider", "tpu"], "is not one of cpu, cuda"),
    (["--target", "vllm", "--tp", "0"], "must list positive"),
    (["--target", "hf", "--tp", "3"], "tp (--tp) applies to --target vllm only; --target hf would ignore it"),
    (["--target", "hf", "--no-engine-check"], "vllm.engine_check (--engine-check/--no-engine-check) applies to "
                                               "--target vllm only"),
    (["--target", "vllm", "--onnx-provider", "cuda"], "onnx.provider (--onnx-provider) applies to --target onnx"),
    (["--target", "onnx", "--max-shard-size", "1GB"], "applies to --target hf and vllm only"),
    (["--target", "onnx", "--dtype", "bf16"], "choose float32, float16 (aliases fp32, fp16, half, float)"),
    (["--target", "hf", "--parity-text", "nope/missing.txt"], "--parity-text: data path nope/missing.txt does not exist"),
])
def test_bad_options_are_refused_before_any_work(args, needle, tokenizer_dir, tmp_path):
    src = save_tiny("llama", tokenizer_dir, tmp_path / "src")
    out = tmp_path / "o"
    res = run("export", src, *args, "--out", out)
    assert res.exit_code == 2 and needle in res.output, res.output
    assert_nothing_left(out)


def test_vllm_check_lengths_fit_a_short_context_model(tokenizer_dir, tmp_path):
    """The check engine's default 256 positions are capped at a 128-position model's own (it was
    refused); with the engine check off, the greedy sizes it would use are not judged."""
    from mptool.exporters import validate

    src = save_tiny("llama", tokenizer_dir, tmp_path / "short", max_position_embeddings=128)
    cfg = ExportConfig(model=str(src), target="vllm", out=str(tmp_path / "o"))
    assert cfg.vllm_check_len(128) == 128 and validate(cfg) == []
    long = ExportConfig(model=str(src), target="vllm", out=str(tmp_path / "o"),
                        parity=ParityConfig(prompt_len=120, new_tokens=16))
    assert any("= 136 is longer than the vLLM check's context, 128 tokens" in p for p in validate(long))
    long.vllm.engine_check = False
    assert validate(long) == []


@pytest.mark.parametrize("recipe, needle", [
    ("parity:\n  new_tokens: 40\n", "parity.new_tokens applies to --target onnx and vllm only"),
    ("target: onnx\nparity:\n  seq_len: 400\n", "parity.seq_len 400 is longer than the model's context "
                                                 "(max_position_embeddings 256)"),
    ("target: onnx\nparity:\n  prompt_len: 250\n  new_tokens: 10\n", "parity.prompt_len + parity.new_tokens = 260 "
                                                                      "is longer than the model's context (256)"),
    ("target: vllm\nparity:\n  prompt_len: 250\n  new_tokens: 10\nvllm:\n  max_model_len: 512\n",
     "= 260 is longer than the vLLM check's context, 256 tokens (vllm.max_model_len 512, capped at the model's"),
    ("target: vllm\nparity:\n  prompt_len: 190\n  new_tokens: 20\nvllm:\n  max_model_len: 200\n",
     "= 210 is longer than the vLLM check's context, 200 tokens (vllm.max_model_len 200); shorten them"),
    ("max_shard_size: 2G\n", "max_shard_size '2G' must be a size such as 500MB or 2GB"),
    ("target: vllm\nvllm:\n  engine_tp: [0]\n", "vllm.engine_tp [0] must list positive"),
    ("target: onnx\nparity:\n  seq_len: 1\n", "parity.seq_len 1 must exceed the 4 decode steps"),
    ("target: vllm\nvllm:\n  kv_cache_gib: 0\n", "vllm.kv_cache_gib 0 must be at least 1"),
    ("target: vllm\nvllm:\n  timeout_s: -1\n", "vllm.timeout_s -1 must be at least 1"),
])
def test_bad_recipe_values_are_refused_before_any_work(recipe, needle, tokenizer_dir, tmp_path):
    src = save_tiny("llama", tokenizer_dir, tmp_path / "src")
    (tmp_path / "r.yaml").write_text(recipe)
    out = tmp_path / "o"
    res = run("export", src, "--config", tmp_path / "r.yaml", "--out", out)
    assert res.exit_code == 2 and needle in res.output, res.output
    assert_nothing_left(out)


def test_outputs_that_would_delete_or_break_inputs_are_refused(tokenizer_dir, tmp_path):
    """--overwrite never replaces a folder holding the model; a file, or a path under a file, is
    no output folder; an unreadable config.json is one line, not a traceback."""
    src = save_tiny("llama", tokenizer_dir, tmp_path / "runs" / "src")
    before = sorted(p.name for p in src.iterdir())
    res = run("export", src, "--out", tmp_path / "runs", "--overwrite")
    assert res.exit_code == 2 and "holds the input" in res.output, res.output
    assert sorted(p.name for p in src.iterdir()) == before
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out, needle in ((afile, "is a file; give a folder"), (afile / "sub", "is a file, not a folder")):
        res = run("export", src, "--out", out, "--overwrite")
        assert res.exit_code == 2 and needle in res.output, res.output
    assert afile.read_text() == "x" and not list(tmp_path.glob(".afile*"))
    broken = save_tiny("llama", tokenizer_dir, tmp_path / "broken")
    (broken / "config.json").write_text("{")
    res = run("export", broken, "--out", tmp_path / "o")
    assert res.exit_code == 2 and "is not a readable JSON model config" in res.output, res.output
    assert_nothing_left(tmp_path / "o")
    (broken / "config.json").write_text("[]")  # JSON, but not a config
    res = run("export", broken, "--out", tmp_path / "o")
    assert res.exit_code == 2 and "config.json holds a JSON list, not the object of model settings" in \
        " ".join(res.output.split()), res.output
    assert_nothing_left(tmp_path / "o")


def test_an_existing_output_is_kept_without_overwrite(tokenizer_dir, tmp_path):
    src = save_tiny("llama", tokenizer_dir, tmp_path / "src")
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    res = run("export", src, "--target", "hf", "--out", out)
    assert res.exit_code == 2 and "--overwrite" in res.output
    assert (out / "keep.txt").read_text() == "mine"


def test_export_help_has_an_example():
    res = run("export", "--help")
    assert res.exit_code == 0 and "Example: mptool export" in res.output


def test_yaml_recipe_and_flags_build_the_same_config(tmp_path):
    recipe = tmp_path / "export.yaml"
    recipe.write_text("target: vllm\ntp: [1, 2]\nvllm:\n  engine_check: false\nparity:\n  new_tokens: 8\n")
    cfg = load_config(ExportConfig, recipe, {"dtype": "fp32", "tp": None})
    assert cfg == ExportConfig(target="vllm", tp=[1, 2], dtype="fp32",
                               vllm=VllmConfig(engine_check=False), parity=cfg.parity)
    assert cfg.parity.new_tokens == 8 and cfg.resolved_dtype() == "float32"
    recipe.write_text("target: vllm\nvllm:\n  tp: 2\n")
    with pytest.raises(MptoolError, match="unknown config key"):
        load_config(ExportConfig, recipe)


# ------------------------------------------------------------------- vllm: legality


def test_vllm_refuses_an_illegal_tp_with_the_reason_and_the_nearest_legal_shapes(tokenizer_dir, tmp_path):
    # 3 heads of 64 on 3 KV heads: the dense SmolLM2 layout scaled down (9 heads there)
    src = save_tiny("llama", tokenizer_dir, tmp_path / "src", hidden_size=192, num_attention_heads=3,
                    num_key_value_heads=3, head_dim=64, intermediate_size=256)
    out = tmp_path / "o"
    res = run("export", src, "--target", "vllm", "--tp", "1,2", "--out", out)
    assert res.exit_code == 2, res.output
    for needle in ("3 attention heads are not divisible by 2", "3 KV heads are not divisible by 2",
                   "must be divisible by tensor parallel size (2)", "Nearest legal shapes",
                   "--kv-heads 2 --heads-per-group 1", "or export with --tp 1"):
        assert needle in res.output, needle
    assert_nothing_left(out)


def test_vllm_refuses_a_qwen3_o_proj_bias_it_would_drop(tokenizer_dir, tmp_path):
    """vLLM's Qwen3 has no o_proj bias: such a checkpoint loaded, lost the bias and failed greedy
    parity only after the engine start, with a hint about random ids. Now one line, up front."""
    src = save_tiny("qwen3", tokenizer_dir, tmp_path / "src", attention_bias=True)
    out = tmp_path / "o"
    res = run("export", src, "--target", "vllm", "--out", out)
    assert res.exit_code == 2, res.output
    text = " ".join(res.output.split())
    assert "vLLM's Qwen3 builds o_proj without one" in text and "Traceback" not in res.output
    assert "accepted for --target vllm: Qwen3 with attention_bias false" in text
    assert_nothing_left(out)
    plain = save_tiny("qwen3", tokenizer_dir, tmp_path / "plain")
    from mptool.exporters.vllm import dropped_by_vllm

    assert dropped_by_vllm(plain) == []


def test_vllm_export_without_the_engine_writes_the_serve_command(tokenizer_dir, tmp_path):
    src = save_tiny("qwen3", tokenizer_dir, tmp_path / "src", **VLLM_TINY)
    out = tmp_path / "v"
    rec = export(ExportConfig(model=str(src), target="vllm", tp=[1, 2], out=str(out),
                              vllm=VllmConfig(engine_check=False)))
    assert rec["dtype"] == "bfloat16" and rec["vllm"]["tp_legal"] == [1, 2]
    assert rec["vllm"]["engine_checks"] == [{"skipped": "turned off (vllm.engine_check: false)"}]
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    script = (out / "serve.sh").read_text()
    assert os.access(out / "serve.sh", os.X_OK)
    assert 'exec vllm serve "$HERE" --served-model-name v --dtype bfloat16 --tensor-parallel-size "$TP"' in script
    res = subprocess.run(["bash", str(out / "serve.sh")], env={**os.environ, "TP": "4"}, capture_output=True, text=True)
    assert res.returncode == 2 and "use one of: 1 2" in res.stderr
    assert "vllm serve . --served-model-name v --dtype bfloat16 --tensor-parallel-size 2" in (out / "SERVE.md").read_text()
    assert rec["vllm"]["serve_command"] == f"vllm serve {out} --dtype bfloat16 --tensor-parallel-size 2"


def test_an_empty_engine_tp_list_records_why_nothing_was_loaded(tokenizer_dir, tmp_path):
    src = save_tiny("qwen3", tokenizer_dir, tmp_path / "src", **VLLM_TINY)
    rec = export(ExportConfig(model=str(src), target="vllm", out=str(tmp_path / "v"), vllm=VllmConfig(engine_tp=[])))
    assert rec["vllm"]["engine_checks"] == [{"skipped": "no tensor-parallel size to load (vllm.engine_tp: [])"}]


def test_vllm_cpu_check_is_skipped_with_the_reason_for_head_dim_16(tokenizer_dir, tmp_path):
    pytest.importorskip("vllm")
    src = save_tiny("mistral", tokenizer_dir, tmp_path / "src")
    rec = export(ExportConfig(model=str(src), target="vllm", out=str(tmp_path / "v")))
    assert rec["vllm"]["engine_checks"] == [{"skipped": "vLLM's CPU attention does not support head_dim 16"}]


# ------------------------------------------------------------------- vllm: real loads


@pytest.mark.slow
def test_vllm_export_generates_the_same_greedy_tokens_as_transformers(tokenizer_dir, tmp_path):
    pytest.importorskip("vllm")
    src = save_tiny("llama", tokenizer_dir, tmp_path / "src", **VLLM_TINY)
    out = tmp_path / "v"
    res = run("export", src, "--target", "vllm", "--out", out)
    assert res.exit_code == 0, res.output
    rec = record(out)
    assert_checks_passed(rec)
    check = rec["parity"]["vllm_greedy_tp1"]
    assert check["engine_dtype"] == "float32" and check["greedy"]["tokens_matched"] == 48
    assert "start-up" in (out / "SERVE.md").read_text()
    # what serve.sh serves, vLLM computing in bf16: recorded beside the fp32 reference, not bounded
    served = rec["parity"]["vllm_served_dtype"]
    assert served["engine_dtype"] == rec["dtype"] == "bfloat16" and served["tp"] == 1, served
    s = served["served"]
    assert s["prompts"] == 3 and s["new_tokens"] == 16 and len(s["prefix_tokens"]) == 3
    assert all(0 <= n <= 16 for n in s["prefix_tokens"]) and s["mean_prefix"] == sum(s["prefix_tokens"]) / 3
    assert "vLLM computing in bfloat16, as `serve.sh` does" in (out / "SERVE.md").read_text()


def test_greedy_agreement_counts_the_tokens_before_the_first_difference():
    from mptool.exporters.common import greedy_agreement

    logits = torch.zeros(4, 8)
    reference = [([1, 2, 3, 4], logits), ([5, 6, 7, 0], logits), ([1, 1, 1, 1], logits)]
    got = greedy_agreement([[1, 2, 3, 4], [5, 6, 0, 0], [2, 1, 1, 1]], reference)
    assert got["prefix_tokens"] == [4, 2, 0] and got["mean_prefix"] == 2.0
    assert got["first_token_agree"] == 2 and not got["all_identical"] and got["new_tokens"] == 4


FRESH_VLLM = textwrap.dedent('''
    import json, os, sys

    if __name__ == "__main__":
        from vllm import LLM, SamplingParams

        job = json.load(open(sys.argv[1]))
        out = {"tokens": {}}
        for name, folder in job["load"].items():
            llm = LLM(model=folder, dtype="float32", enforce_eager=True, max_model_len=128,
                      max_num_seqs=4, distributed_executor_backend="uni")
            params = SamplingParams(temperature=0.0, max_tokens=job["n"], min_tokens=job["n"])
            res = llm.generate([{"prompt_token_ids": p} for p in job["prompts"]], params, use_tqdm=False)
            out["tokens"][name] = [list(r.outputs[0].token_ids) for r in res]
            del llm
        try:
            LLM(model=job["refuse"], dtype="float32", enforce_eager=True, max_model_len=128,
                tensor_parallel_size=2)
            out["refused"] = None
        except Exception as e:
            out["refused"] = str(e)
        out["mptool_imported"] = sorted(m for m in sys.modules if m.split(".")[0] in ("mptool", "exporters"))
        json.dump(out, open(sys.argv[2], "w"))
        sys.stdout.flush()
        os._exit(0)
''')


@pytest.mark.slow
def test_a_fresh_vllm_process_loads_every_family_and_refuses_9_heads_on_tp2(tokenizer_dir, tmp_path):
    """vLLM alone (no mptool import) loads the vllm exports of all four families, matches
    transformers' greedy tokens, and refuses the dense SmolLM2 with tensor parallel 2."""
    pytest.importorskip("vllm")
    from transformers import AutoModelForCausalLM

    from mptool.exporters.vllm import engine_env
    from mptool.models import default_model_dir

    folders, prompts, n = {}, [[5, 17, 42, 99, 7, 150], [200, 3, 64, 81]], 8
    for family in FAMILIES:
        src = save_tiny(family, tokenizer_dir, tmp_path / f"src-{family}", **VLLM_TINY)
        out = tmp_path / f"vllm-{family}"
        export(ExportConfig(model=str(src), target="vllm", tp=[1, 2], out=str(out),
                            vllm=VllmConfig(engine_check=False)))
        folders[family] = str(out)
    job, result = tmp_path / "job.json", tmp_path / "result.json"
    job.write_text(json.dumps({"load": folders, "prompts": prompts, "n": n, "refuse": str(default_model_dir())}))
    script = tmp_path / "fresh_vllm.py"
    script.write_text(FRESH_VLLM)
    proc = subprocess.run([sys.executable, str(script), str(job), str(result)], cwd=tmp_path,
                          env={**engine_env(1), "TMPDIR": str(tmp_path)}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and result.exists(), proc.stderr[-3000:]
    data = json.loads(result.read_text())
    assert data["mptool_imported"] == []
    for family, folder in folders.items():
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        want = [greedy(model, p, n) for p in prompts]
        assert data["tokens"][family] == want, family
    assert "Total number of attention heads (9) must be divisible by tensor parallel size (2)" in data["refused"]


# ------------------------------------------------------------------- hf + onnx alone


FRESH_HF_ONNX = textwrap.dedent('''
    import json, sys

    import onnxruntime_genai as og
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_dir, onnx_dir, text, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    ids = tokenizer(text, return_tensors="pt").input_ids
    hf = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                        min_new_tokens=n)[0, ids.shape[1]:].tolist()
    og_model = og.Model(onnx_dir)
    og_ids = [int(i) for i in og.Tokenizer(og_model).encode(text)]
    params = og.GeneratorParams(og_model)
    params.set_search_options(do_sample=False, max_length=len(og_ids) + n, min_length=len(og_ids) + n)
    generator = og.Generator(og_model, params)
    generator.append_tokens(og_ids)
    onnx = []
    while not generator.is_done():
        generator.generate_next_token()
        onnx.append(int(generator.get_next_tokens()[0]))
    print(json.dumps({"hf_ids": ids[0].tolist(), "og_ids": og_ids, "hf": hf, "onnx": onnx,
                      "mptool_imported": sorted(m for m in sys.modules
                                                if m.split(".")[0] in ("mptool", "exporters"))}))
''')


def fresh_hf_onnx(hf_dir: Path, onnx_dir: Path, tmp_path: Path, text: str, n: int = 8) -> dict:
    script = tmp_path / "fresh_hf_onnx.py"
    script.write_text(FRESH_HF_ONNX)
    env = {**os.environ, "ORT_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(script), str(hf_dir), str(onnx_dir), text, str(n)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_fresh_process_loads_the_hf_and_onnx_exports_alone(tokenizer_dir, tmp_path):
    src = save_tiny("llama", tokenizer_dir, tmp_path / "src", initializer_range=0.2)
    export(ExportConfig(model=str(src), target="hf", out=str(tmp_path / "hf")))
    export(ExportConfig(model=str(src), target="onnx", out=str(tmp_path / "onnx")))
    data = fresh_hf_onnx(tmp_path / "hf", tmp_path / "onnx", tmp_path, SAMPLE_TEXT[:60])
    assert data["mptool_imported"] == []
    assert data["og_ids"] == data["hf_ids"]  # the shipped tokenizer is the same in both engines
    assert data["onnx"] == data["hf"] and len(data["hf"]) == 8


# ------------------------------------------------------------------- the real model


@pytest.fixture(scope="session")
def smollm2_pruned(tmp_path_factory) -> Path:
    """The default SmolLM2-135M pruned one-shot to 2 KV groups x 3 heads (6 heads), FFN 768."""
    out = tmp_path_factory.mktemp("real") / "smol-pruned"
    res = run("compress", "--method", "wanda-sp", "--kv-heads", "2", "--heads-per-group", "3", "--ffn", "768",
              "--recovery-steps", "0", "--calib-tokens", "2048", "--eval-tokens", "1024", "--out", out)
    assert res.exit_code == 0, res.output
    return out


@pytest.mark.slow
def test_real_pruned_smollm2_through_hf_and_onnx(smollm2_pruned, tmp_path):
    hf, onnx = tmp_path / "hf", tmp_path / "onnx"
    assert run("export", smollm2_pruned, "--target", "hf", "--out", hf).exit_code == 0
    assert run("export", smollm2_pruned, "--target", "onnx", "--out", onnx).exit_code == 0
    for out in (hf, onnx):
        rec = record(out)
        assert rec["shape"]["num_heads"] == 6 and rec["shape"]["num_kv_heads"] == 2
        assert rec["shape"]["intermediate_size"] == 768 and rec["shape"]["parameters"] == 85_854_528
        for name, check in rec["parity"].items():
            if "max_abs_diff" in check:
                assert check["max_abs_diff"] <= check["bound"], name
            else:
                assert check["tokens_matched"] + len(check["ties"]) * check["new_tokens"] >= check["new_tokens"]
        card = (out / "README.md").read_text()
        assert "## Pruning report" in card and "| pruned | 2 | 3 | 6 | 768 |" in card
    data = fresh_hf_onnx(hf, onnx, tmp_path, "Anne Elliot walked along the shore at Lyme,", n=16)
    assert data["og_ids"] == data["hf_ids"] and data["onnx"] == data["hf"] and data["mptool_imported"] == []


@pytest.mark.slow
def test_real_smollm2_vllm_dense_refused_on_tp2_pruned_runs_on_tp2(smollm2_pruned, tmp_path):
    pytest.importorskip("vllm")
    from mptool.models import default_model_dir

    dense = tmp_path / "dense-vllm"
    res = run("export", default_model_dir(), "--target", "vllm", "--tp", "1,2", "--out", dense)
    assert res.exit_code == 2 and "9 attention heads are not divisible by 2" in res.output, res.output
    assert "--kv-heads 2 --heads-per-group 3" in res.output or "Nearest legal" in res.output
    assert_nothing_left(dense)

    # fp32: this one-shot pruned model (no recovery) is not bf16-safe: rounding its weights to bf16
    # alone moves its logits by 8.8 (of 31.8), which the bf16 check refuses. Legal for TP 1 and 2;
    # loaded for real with TP 2 only (the TP 1 load path is the tiny test's; each load costs ~30 s).
    recipe = tmp_path / "export.yaml"
    recipe.write_text("vllm:\n  engine_tp: [2]\n")
    out = tmp_path / "pruned-vllm"
    res = run("export", smollm2_pruned, "--target", "vllm", "--tp", "1,2", "--dtype", "float32",
              "--config", recipe, "--out", out)
    assert res.exit_code == 0, res.output
    rec = record(out)
    assert rec["vllm"]["tp_legal"] == [1, 2] and rec["dtype"] == "float32"
    check = rec["parity"]["vllm_greedy_tp2"]
    assert check["engine_dtype"] == "float32" and check["startup_s"] > 0
    assert check["greedy"]["identical"] and check["greedy"]["tokens_matched"] == 48, check
    assert check["greedy"]["logprob_max_abs_diff"] < 0.01
    assert "TP=2 ./serve.sh" in (out / "SERVE.md").read_text()


def test_summary_prints_brackets_as_text(capsys):
    """A skip reason such as "pip install 'mptool[gpu]'" is text, not rich markup (a GPU run once
    printed "(pip install 'mptool', or )")."""
    from mptool.exporters import print_summary

    reason = "vLLM is not installed (pip install 'mptool[cpu]', or [gpu])"
    print_summary({"target": "vllm", "dtype": "bfloat16", "parity": {"vllm_engine": {"skipped": reason}},
                   "out": "/tmp/x[1]", "sizes": {"total_bytes": 1000}, "seconds": 1.0,
                   "vllm": {"serve_command": "vllm serve x"}})
    printed = " ".join(capsys.readouterr().out.split())
    assert "'mptool[cpu]', or [gpu])" in printed and "/tmp/x[1]" in printed


def test_one_changed_weight_element_fails_a_bf16_export(tokenizer_dir, tmp_path, monkeypatch):
    """A change too small for any logit bound against the unrounded fp32 source (one element of one
    matrix) fails the export: the written tensors must equal the source's in the written dtype."""
    def nudge(t):
        t[0, 0] += 0.0625
        return t

    tamper(monkeypatch, weight="layers.1.mlp.up_proj.weight", edit=nudge)
    src = save_tiny("llama", tokenizer_dir, tmp_path / "src")
    out = tmp_path / "hf"
    with pytest.raises(ParityError, match="exceeds the tolerance|written tensors differ"):
        export(ExportConfig(model=str(src), target="hf", dtype="bfloat16", out=str(out)))
    assert_nothing_left(out)
