"""`python -m mptool.benchmarks.precision` on a tiny model: the figures it records are the ones it
claims (a planted massive activation is found where it was put), bad arguments are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import SAMPLE_TEXT, tiny_model
from mptool.benchmarks import precision


def save(tokenizer_dir: Path, out: Path, plant: bool) -> Path:
    from transformers import AutoTokenizer

    model = tiny_model("llama")
    if plant:  # the last layer writes ~1e3 x its FFN activity into residual channel 5 at every token
        with torch.no_grad():
            model.model.layers[-1].mlp.down_proj.weight[5].fill_(1e3)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out


def test_records_drift_per_probe_layer_and_projection_and_finds_a_planted_massive_activation(tokenizer_dir, tmp_path):
    plain, planted = save(tokenizer_dir, tmp_path / "plain", False), save(tokenizer_dir, tmp_path / "planted", True)
    text = tmp_path / "t.txt"
    text.write_text(SAMPLE_TEXT * 3)
    result = precision.main([f"plain={plain}", f"planted={planted}", "--dtype", "bfloat16", "--text", str(text),
                             "--random-shape", "2x16", "--text-shape", "2x32", "--tag", "t",
                             "--results", str(tmp_path)])
    assert json.loads((tmp_path / "precision_t.json").read_text()) == json.loads(json.dumps(result))
    layers = tiny_model("llama").config.num_hidden_layers
    for name, r in result["models"].items():
        assert set(r["compute"]) == {"random", "text"} and len(r["layers"]) == layers
        assert set(r["weights"]) == {"all", *precision.PROJECTIONS}
        # bf16 rounding moves a random fp32 model's logits, by less than their size
        assert 0 < r["weights"]["all"]["max_abs_diff"] < r["weights"]["all"]["ref_max_abs"]
        assert 0 < r["compute"]["random"]["max_abs_diff"] and all(v > 0 for v in r["layers"])
        assert all(0 <= f <= 1 for f in r["massive"]["fraction_over_10pct"].values())
    m = result["models"]["planted"]["massive"]
    assert (m["layer"], m["channel"]) == (layers - 1, 5) and m["peak"] > 100
    assert result["models"]["plain"]["massive"]["peak"] < m["peak"]
    table = (tmp_path / "precision_t.md").read_text()
    assert "| planted |" in table and f"{layers - 1}, 5, " in table


@pytest.mark.parametrize("args, says", [
    (["a=default", "--random-shape", "4"], "BATCHxLEN"),
    (["a=default", "--text", "no/such/file.txt"], "does not exist"),
    (["nolabel"], "expected LABEL=PATH"),
])
def test_bad_arguments_are_refused(args, says, capsys):
    with pytest.raises(SystemExit) as exc:
        precision.main(args)
    assert exc.value.code == 2 and says in capsys.readouterr().err
