"""`python -m mptool.benchmarks.exports` on a tiny model: the record matches what was written,
a refused export is recorded with its reason, bad arguments are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import SAMPLE_TEXT, tiny_model
from mptool.benchmarks import exports


def save(tokenizer_dir: Path, out: Path) -> Path:
    from transformers import AutoTokenizer

    tiny_model("llama").save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out


def test_records_each_export_and_each_refusal(tokenizer_dir, tmp_path):
    src = save(tokenizer_dir, tmp_path / "src")
    keep, results = tmp_path / "keep", tmp_path / "results"
    # the tiny Llama has 8 heads on 4 KV heads: tp 3 is illegal and refused before any work
    assert exports.main([f"tiny={src}", "--targets", "hf:fp32 vllm:float32:3", "--tag", "t",
                         "--results", str(results), "--keep", str(keep)]) == 0
    result = json.loads((results / "exports_t.json").read_text())
    ok, refused = result["rows"]
    assert (ok["model"], ok["target"], ok["dtype"], ok["ok"], ok["rc"]) == ("tiny", "hf", "float32", True, 0)
    written = keep / "tiny-hf-float32"
    # export.json states the size of everything but itself
    assert ok["total_bytes"] == sum(p.stat().st_size for p in written.rglob("*")
                                    if p.is_file() and p.name != "export.json")
    assert (ok["shape"]["num_heads"], ok["shape"]["num_kv_heads"], ok["shape"]["intermediate_size"]) == (8, 4, 256)
    check = ok["parity"]["transformers_logits"]
    assert check["max_abs_diff"] <= check["bound"]
    assert refused["ok"] is False and refused["rc"] == 2 and not (keep / "tiny-vllm-float32-tp3").exists()
    assert "not divisible by 3" in refused["error"]
    table = (results / "exports_t.md").read_text().splitlines()
    rows = [ln for ln in table if ln.startswith("| tiny ")]
    assert len(rows) == 2 and "refused (exit 2)" in rows[1] and f"{ok['total_bytes'] / 1e6:.1f} MB" in rows[0]
    header = next(ln for ln in table if ln.startswith("| model"))
    assert all(row.count("|") == header.count("|") for row in rows)  # no cell breaks the table
    assert f"{check['weights']['identical']}/" in rows[0]
    assert result["probe"] == "random token ids" and "parity checks on random token ids" in table[0]
    text = tmp_path / "serve.txt"
    text.write_text(SAMPLE_TEXT * 3)
    assert exports.main([f"tiny={src}", "--targets", "hf:fp32", "--tag", "x", "--results", str(results),
                         "--parity-text", str(text)]) == 0
    result = json.loads((results / "exports_x.json").read_text())
    (row,) = result["rows"]
    assert row["ok"] and result["probe"] == f"windows of the text {text}" and row["command"].endswith(f"--parity-text {text}")


@pytest.mark.parametrize("args, says", [
    (["nolabel"], "expected LABEL=PATH"),
    (["a=/no/such/folder"], "is not a folder"),
    (["a=default", "--targets", "tflite:float32"], "TARGET one of hf, onnx, vllm"),
    (["a=default", "--targets", "onnx:bfloat16"], "dtype must be one of float32, float16"),
    (["a=default", "--targets", "hf:float32:2"], "for vllm only"),
])
def test_bad_arguments_are_refused(args, says, capsys):
    with pytest.raises(SystemExit) as exc:
        exports.main(args)
    assert exc.value.code == 2 and says in capsys.readouterr().err
