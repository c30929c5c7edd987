"""`mptool bench` on tiny models: the ideal counts by hand, the result schema, every bad input.

No test asserts a speed: timings on a shared CI core mean nothing; the schema, the arithmetic and
the refusals do.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from conftest import tiny_model
from mptool.benchmarks.cli import register

runner = CliRunner()
app = typer.Typer()
register(app)


@app.command()
def _other() -> None:  # a second command keeps "bench" a subcommand, as in the real app
    pass


def run(*args) -> object:
    return runner.invoke(app, ["bench", *[str(a) for a in args]])


def save(tokenizer_dir: Path, out: Path, family: str = "llama", **overrides) -> Path:
    from transformers import AutoTokenizer

    tiny_model(family, **overrides).save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out


PRUNED = dict(num_attention_heads=4, num_key_value_heads=2, intermediate_size=128)


@pytest.fixture
def pair(tmp_path, tokenizer_dir) -> tuple[Path, Path]:
    """The tiny Llama (8 heads / 4 KV heads / FFN 256) and a uniform prune of its shape."""
    return save(tokenizer_dir, tmp_path / "dense"), save(tokenizer_dir, tmp_path / "pruned", **PRUNED)


# ---------------------------------------------------------------- the ideal, by hand


def dims(**overrides):
    from conftest import tiny_config
    from mptool.shapes import Dims

    return Dims.from_config(tiny_config("llama", **overrides))


def test_ideal_counts_equal_a_hand_count():
    from mptool.benchmarks import ideal

    dense, pruned = dims(), dims(**PRUNED)
    # Tiny Llama: hidden 128, 2 layers, head_dim 16, vocab 320, untied embeddings.
    # Dense layer matmuls: q 128*8*16 = 16384, k+v 2*128*4*16 = 16384, o 8*16*128 = 16384,
    # gate+up+down 3*128*256 = 98304 -> 147456. Pruned (4 heads, 2 KV, FFN 128): 8192 + 8192 +
    # 8192 + 49152 = 73728.
    assert ideal.layer_matmul_params(dense) == 147456
    assert ideal.layer_matmul_params(pruned) == 73728
    # Prefill of P = 16: matmuls 16 * 2 * 2 layers * 147456 = 9437184; attention per layer
    # 2 * 8 heads * 16 * P (P + 1) = 69632, two layers 139264; LM head on the last token
    # 2 * 320 * 128 = 81920. Total 9658368, per token 603648.
    assert ideal.prefill_flops(dense, 16) == 9437184 + 139264 + 81920
    assert ideal.prefill_flops_per_token(dense, 16) == 603648
    # Pruned: 16 * 2 * 2 * 73728 = 4718592 + 2 * (2 * 4 * 16 * 16 * 17) = 69632 + 81920
    # = 4870144, per token 304384.
    assert ideal.prefill_flops_per_token(pruned, 16) == 304384
    # Decode, fp32, batch 4, P = 16, N = 4: mean context P + N/2 = 18.
    # Dense weights read: all 377472 params minus the untied embedding table (320*128 = 40960)
    # = 336512 -> 1346048 bytes. KV per token: 2 layers * 2 (k, v) * 4 KV heads * 16 * 4 bytes
    # = 1024; per sequence 1024 * 18 + one embedding row 128 * 4 = 18944. Step: 1346048
    # + 4 * 18944 = 1421824; per output token / 4 = 355456.
    assert ideal.kv_bytes_per_token(dense, 4) == 1024
    assert ideal.weight_bytes_read(dense, 4) == 1346048
    assert ideal.decode_bytes_per_token(dense, 4, ideal.decode_context(16, 4), 4) == 355456
    # Pruned: 230016 params - 40960 = 189056 -> 756224 bytes; KV 2*2*2*16*4 = 512 per token,
    # 512 * 18 + 512 = 9728 per sequence; step 756224 + 4 * 9728 = 795136; per token 198784.
    assert ideal.decode_bytes_per_token(pruned, 4, 18, 4) == 198784
    limit = ideal.ideal(dense, pruned, batch_size=4, prompt_len=16, new_tokens=4, dtype_bytes=4)
    assert limit.prefill == pytest.approx(603648 / 304384)
    assert limit.decode == pytest.approx(355456 / 198784)
    # End to end, each phase at its own ideal: 1 s prefill + 3 x 1 s decode.
    assert limit.output(1.0, 1.0, 4) == pytest.approx(4 / (304384 / 603648 + 3 * 198784 / 355456))


def test_tied_embeddings_are_read_once_as_the_lm_head():
    from mptool.benchmarks import ideal
    from mptool.shapes import total_params

    d = dims(tie_word_embeddings=True)
    assert ideal.weight_bytes_read(d, 2) == 2 * total_params(d)
    # the looked-up rows are in the table already read as the LM head: a sequence adds only its KV
    assert ideal.decode_bytes_per_step(d, 4, 18, 2) == 2 * total_params(d) + 4 * ideal.kv_bytes_per_token(d, 2) * 18


# ---------------------------------------------------------------- the result document


def _check_stats(stats: dict, n: int) -> None:
    assert set(stats) == {"median", "min", "max", "q1", "q3", "n", "samples"}
    assert stats["n"] == n == len(stats["samples"])
    assert stats["min"] <= stats["q1"] <= stats["median"] <= stats["q3"] <= stats["max"]
    assert stats["min"] > 0


def test_result_schema_torch_and_onnxruntime(pair, tmp_path):
    engines = ["torch"]
    try:
        import onnxruntime_genai  # noqa: F401

        engines.append("onnxruntime")
    except ImportError:  # pragma: no cover - the cpu extra is not installed
        pass
    out = tmp_path / "res" / "bench"
    res = run(*pair, "--engine", ",".join(engines), "--batch-sizes", "1,2", "--prompt-lens", "8",
              "--new-tokens", "3", "--warmup", "0", "--repeats", "2", "--out", out,
              "--cache-dir", tmp_path / "cache")
    assert res.exit_code == 0, res.output
    for ext in (".json", ".md", ".png"):
        assert out.with_name("bench" + ext).stat().st_size > 0
    if "onnxruntime" in engines:  # one built entry per model, no build folder left over
        built = tmp_path / "cache" / "onnxruntime"
        assert len([p for p in built.iterdir() if (p / "genai_config.json").is_file()]) == 2
        assert not list(built.glob(".*.tmp-*"))
    doc = json.loads(out.with_name("bench.json").read_text())
    assert doc["schema"] == "mptool.bench/1"
    assert doc["command"].startswith("mptool bench ") and "--engine " + ",".join(engines) in doc["command"]
    assert set(doc) >= {"command", "argv", "created", "config", "host", "models", "engines", "results", "wall_s"}
    assert doc["config"]["batch_sizes"] == [1, 2] and doc["config"]["repeats"] == 2
    assert doc["models"]["dense"]["dims"]["num_heads"] == 8
    assert doc["models"]["pruned"]["dims"]["num_kv_heads"] == 2
    assert doc["models"]["dense"]["params"] == 377472
    assert set(doc["engines"]) == set(engines)
    for engine in engines:
        for role in ("dense", "pruned"):
            info = doc["engines"][engine][role]
            assert {"versions", "dtype", "device", "threads", "mode"} <= set(info)
            assert info["dtype"] == "float32" and info["device"] == "cpu"
    assert len(doc["results"]) == 2 * len(engines)
    for r in doc["results"]:
        assert r["engine"] in engines and r["prompt_len"] == 8 and r["new_tokens"] == 3
        for role in ("dense", "pruned"):
            assert set(r[role]) == {"ttft_s", "tpot_s", "decode_tok_s", "output_tok_s"}
            for stats in r[role].values():
                _check_stats(stats, 2)
        for key in ("ttft", "decode", "output"):
            assert r["ideal"][key] > 1
            assert r["measured_over_ideal"][key] == pytest.approx(r["speedup"][key] / r["ideal"][key])
        assert r["speedup"]["decode"] == pytest.approx(
            r["pruned"]["decode_tok_s"]["median"] / r["dense"]["decode_tok_s"]["median"])
        counts = r["ideal"]["counts"]
        assert r["ideal"]["ttft"] == pytest.approx(
            counts["prefill_flops_per_token"]["dense"] / counts["prefill_flops_per_token"]["pruned"])
    md = out.with_name("bench.md").read_text()
    assert doc["command"] in md and md.count("\n| ") == 1 + len(doc["results"])
    assert "speed-up / ideal" in res.output  # the terminal table


def test_yaml_recipe_builds_the_same_config(tmp_path):
    from mptool.benchmarks.config import BenchConfig, VllmOptions
    from mptool.config import load_config, save_config
    from mptool.errors import MptoolError

    cfg = BenchConfig(dense="a", pruned="b", engines=["vllm"], batch_sizes=[8], vllm=VllmOptions(eager=True))
    save_config(cfg, tmp_path / "bench.yaml")  # the output path saved absolute, the rest as given
    assert load_config(BenchConfig, tmp_path / "bench.yaml") == dataclasses.replace(cfg, out=os.path.abspath(cfg.out))
    assert load_config(BenchConfig, None, {"dense": "a", "pruned": "b", "engines": ["vllm"],
                                           "batch_sizes": [8], "vllm.eager": True}) == cfg
    (tmp_path / "bad.yaml").write_text("vllm:\n  eagre: true\n")
    with pytest.raises(MptoolError, match="vllm.eagre"):
        load_config(BenchConfig, tmp_path / "bad.yaml")


# ---------------------------------------------------------------- refusals: one line, exit 2


@pytest.mark.parametrize("args, says", [
    (["--engine", "tensorrt"], "engine tensorrt is not supported; accepted: torch, onnxruntime, vllm"),
    (["--batch-sizes", "1,0"], "batch size 0 must be at least 1"),
    (["--batch-sizes", "1,x"], "--batch-sizes '1,x' must be comma-separated integers"),
    (["--prompt-lens", "-4"], "prompt length -4 must be at least 1"),
    (["--new-tokens", "1"], "new tokens 1 must be at least 2"),
    (["--repeats", "0"], "repeats 0 must be at least 1"),
    (["--dtype", "int3"], "dtype int3 is not accepted by torch"),
    (["--device", "tpu"], "device tpu is not supported; accepted: cpu, cuda"),
    (["--threads", "999"], "threads 999 must be between 1 and"),
    (["--prompt-lens", "300"], "exceeds the dense model's max_position_embeddings 256"),
    (["--seed", "-1"], "--seed -1 must be a whole number from 0 to 4294967295"),
    (["--engine", "onnxruntime", "--dtype", "float16", "--device", "cpu"],
     "dtype float16 is not run by onnxruntime-genai on the CPU"),
])
def test_cli_rejects_bad_arguments(pair, tmp_path, args, says):
    res = run(*pair, "--out", tmp_path / "o", *args)
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), res.output
    assert says in " ".join(res.output.split()), res.output
    assert not (tmp_path / "o.json").exists()


def test_cli_rejects_missing_folder_and_other_family(pair, tmp_path, tokenizer_dir):
    dense, pruned = pair
    res = run(dense, tmp_path / "nowhere")
    assert res.exit_code == 2 and "pruned model folder" in res.output and "does not exist" in res.output
    (tmp_path / "a.txt").write_text("text")
    res = run(dense, tmp_path / "a.txt")
    assert res.exit_code == 2 and f"pruned model folder {tmp_path / 'a.txt'} is a file" in " ".join(res.output.split())
    res = run()
    assert res.exit_code == 2 and "give the dense model folder" in res.output

    other_vocab = save(tokenizer_dir, tmp_path / "vocab", vocab_size=300)
    res = run(dense, other_vocab)
    assert res.exit_code == 2 and "different vocabularies (dense 320, pruned 300" in res.output

    res = run(dense, dense)
    assert res.exit_code == 2 and "DENSE and PRUNED are the same folder" in res.output
    res = run(pruned, dense)
    assert res.exit_code == 2 and "is larger than the dense one" in " ".join(res.output.split()), res.output
    assert "swapped? the order is DENSE PRUNED" in " ".join(res.output.split())

    qwen = save(tokenizer_dir, tmp_path / "qwen", family="qwen2", hidden_size=128)
    res = run(dense, qwen)
    assert res.exit_code == 2 and "different families (dense llama, pruned qwen2)" in res.output
    for r in (res,):
        assert len([ln for ln in r.output.splitlines() if ln.strip()]) == 1


def test_bad_outputs_are_refused_before_any_measurement(pair, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out, says in (("", "names no file"), (afile / "res", "is a file, not a folder")):
        res = run(*pair, "--out", out)
        assert res.exit_code == 2 and says in " ".join(res.output.split()), res.output
    assert afile.read_text() == "x"


def test_out_never_overwrites_a_model_file_or_a_foreign_file(pair, tmp_path):
    dense, pruned = pair
    config = dense / "config.json"
    before = config.read_bytes()
    res = run(dense, pruned, "--out", dense / "config")
    assert res.exit_code == 2 and "is inside the input model folder" in " ".join(res.output.split()), res.output
    notes = tmp_path / "notes.md"
    notes.write_text("mine")
    res = run(dense, pruned, "--out", tmp_path / "notes")
    assert res.exit_code == 2 and "which is not an earlier `mptool bench` result" in " ".join(res.output.split())
    assert config.read_bytes() == before and notes.read_text() == "mine"
    other = tmp_path / "other.json"  # a JSON with a "schema" key that is not mptool bench's
    other.write_text('{"schema": "https://example.org/s.json"}')
    res = run(dense, pruned, "--out", tmp_path / "other")
    assert res.exit_code == 2 and "which is not an earlier `mptool bench` result" in " ".join(res.output.split())
    assert other.read_text() == '{"schema": "https://example.org/s.json"}'


def test_an_unusable_cache_dir_is_refused_before_any_measurement(pair, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for cache, says in ((afile, "--cache-dir {} is a file; give a folder"),
                        (afile / "sub", "--cache-dir {}: {} is a file, not a folder")):
        res = run(*pair, "--engine", "onnxruntime", "--cache-dir", cache)
        assert res.exit_code == 2 and says.format(cache, afile) in " ".join(res.output.split()), res.output
    assert afile.read_text() == "x"


def test_repeated_sizes_a_dtype_alias_and_a_json_out_are_read_as_meant(pair, tmp_path):
    """--batch-sizes 1,1 measures once; --dtype fp32 is float32; --out x.json is the stem x (not
    x.json.json); --out ending in a slash is refused."""
    out = tmp_path / "x.json"
    res = run(*pair, "--engine", "torch", "--batch-sizes", "1,1", "--prompt-lens", "8,8", "--new-tokens", "2",
              "--warmup", "0", "--repeats", "1", "--dtype", "fp32", "--out", out)
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    assert len(doc["results"]) == 1 and doc["config"]["batch_sizes"] == [1] and doc["config"]["dtype"] == "float32"
    assert not (tmp_path / "x.json.json").exists() and (tmp_path / "x.md").is_file()
    res = run(*pair, "--out", f"{tmp_path}/dir/")
    assert res.exit_code == 2 and "ends with a slash, as a folder does" in res.output
    notes = tmp_path / "x.md"  # the table, edited by its user an hour after the run
    notes.write_text("my notes")
    os.utime(notes, (out.stat().st_mtime + 3600, out.stat().st_mtime + 3600))
    res = run(*pair, "--engine", "torch", "--batch-sizes", "1", "--prompt-lens", "8", "--out", tmp_path / "x")
    assert res.exit_code == 2 and "changed after the `mptool bench` result beside it" in " ".join(res.output.split())
    assert notes.read_text() == "my notes"


def test_every_problem_is_named_at_once(pair):
    res = run(*pair, "--engine", "tensorrt", "--batch-sizes", "0", "--repeats", "0")
    assert res.exit_code == 2
    text = " ".join(res.output.split())
    assert "tensorrt" in text and "batch size 0" in text and "repeats 0" in text


def test_onnxruntime_needs_a_tokenizer(tmp_path):
    pytest.importorskip("onnxruntime_genai")
    tiny_model("llama").save_pretrained(tmp_path / "d")
    tiny_model("llama", **PRUNED).save_pretrained(tmp_path / "p")
    res = run(tmp_path / "d", tmp_path / "p", "--engine", "onnxruntime")
    assert res.exit_code == 2 and "has no tokenizer.json" in res.output


# ---------------------------------------------------------------- vLLM (slow: two engine starts)


@pytest.mark.slow
def test_vllm_engine_end_to_end(tmp_path, tokenizer_dir, monkeypatch):
    """vLLM's CPU backend needs head_dim 64; eager mode keeps the two start-ups short. What the
    engine leaves in its temporary folder (vllm_dist_* rendezvous files) goes with the run."""
    pytest.importorskip("vllm")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    dense = save(tokenizer_dir, tmp_path / "d64", num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    pruned = save(tokenizer_dir, tmp_path / "p64", num_attention_heads=2, num_key_value_heads=1,
                  head_dim=64, intermediate_size=128)
    out = tmp_path / "v"
    res = run(dense, pruned, "--engine", "vllm", "--eager", "--batch-sizes", "1,2", "--prompt-lens", "8",
              "--new-tokens", "3", "--warmup", "1", "--repeats", "1", "--out", out)
    assert res.exit_code == 0, res.output
    doc = json.loads(out.with_name("v.json").read_text())
    info = doc["engines"]["vllm"]["dense"]
    assert info["mode"] == "eager" and info["dtype"] == "bfloat16" and info["startup_s"] > 0
    assert [r["batch_size"] for r in doc["results"]] == [1, 2]
    for r in doc["results"]:
        _check_stats(r["pruned"]["tpot_s"], 1)
    assert sorted(p.name for p in scratch.iterdir()) == []


def test_a_silent_child_engine_is_stopped_at_its_deadline(tmp_path):
    """A child engine that never answers is killed (with its process group) and the bench fails
    with one line naming the deadline, instead of hanging."""
    import subprocess
    import sys

    from mptool.benchmarks.engines import ChildRunner
    from mptool.errors import MptoolError

    runner = object.__new__(ChildRunner)  # the protocol only: no engine to start
    runner.model_dir, runner.failed, runner.timeout_s = "m", False, 1
    runner.log_path = tmp_path / "child.log"
    runner._log = open(runner.log_path, "w")
    runner.proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, text=True, start_new_session=True)
    runner._start_reader()
    with pytest.raises(MptoolError, match="did not answer within 1 s on m and was stopped"):
        runner._call({"prompts": [[1]], "new_tokens": 2})
    assert runner.proc.poll() is not None and runner.failed and runner.log_path.exists()


def test_rates_are_the_inverted_time_statistics_with_an_even_count():
    """Two repeats of 10 and 30 ms per token: the median decode rate at batch 4 is 4 / 20 ms, the
    figure beside the 20 ms median (a median of the two rates would say 266.7)."""
    from types import SimpleNamespace

    from mptool.benchmarks.sweep import figures

    samples = [SimpleNamespace(ttft_s=0.1, tpot_s=t, total_s=0.1 + 7 * t) for t in (0.010, 0.030)]
    f = figures(samples, batch_size=4, new_tokens=8)
    assert f["tpot_s"]["median"] == pytest.approx(0.020)
    assert f["decode_tok_s"]["median"] == pytest.approx(200.0)
    assert (f["decode_tok_s"]["min"], f["decode_tok_s"]["max"]) == pytest.approx((4 / 0.030, 4 / 0.010))
    _check_stats(f["decode_tok_s"], 2)
    assert f["output_tok_s"]["median"] == pytest.approx(32 / (0.1 + 7 * 0.020))


def test_broken_or_incomplete_weights_are_refused_before_any_measurement(pair, tmp_path):
    """transformers would fill a missing tensor with random values (and bench would time it);
    a truncated file would end in a SafetensorError traceback. Both: one line, before any engine."""
    from safetensors.torch import load_file, save_file

    dense, pruned = pair
    weights = load_file(pruned / "model.safetensors")
    weights.pop("model.layers.1.mlp.down_proj.weight")
    save_file(weights, pruned / "model.safetensors", metadata={"format": "pt"})
    res = run(dense, pruned, "--out", tmp_path / "o")
    assert res.exit_code == 2 and len([ln for ln in res.output.splitlines() if ln.strip()]) == 1, res.output
    assert "1 missing keys, e.g. model.layers.1.mlp.down_proj.weight" in " ".join(res.output.split())
    blob = (dense / "model.safetensors").read_bytes()
    (dense / "model.safetensors").write_bytes(blob[:20_000])
    res = run(dense, pruned, "--out", tmp_path / "o")
    text = " ".join(res.output.split())
    assert res.exit_code == 2 and "model.safetensors is not a readable safetensors file" in text, res.output
    assert "Traceback" not in res.output and not (tmp_path / "o.json").exists()
