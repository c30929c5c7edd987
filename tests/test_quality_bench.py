"""The quality benchmark and its variants sweep on a tiny model: the fairness rules of the table.

Every trained row must get the same training tokens, MaskPrune's rows must meet the budget with
the same counts in every layer, the ablations must compare at MaskPrune's own shape (the shape is
fixed before the first step, from the initial masks), and a "default" variant must reproduce the
table's MaskPrune + recovery row exactly (same data, seed and protocol).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import make_tokenizer, tiny_model


ARGS = ["--tokens", "512", "--seq-len", "32", "--batch-size", "2", "--calib-tokens", "128",
        "--eval-tokens", "192"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("tiny_llama")
    tiny_model("llama").save_pretrained(out)
    tok = make_tokenizer(tmp_path_factory.mktemp("tok"))
    AutoTokenizer.from_pretrained(tok).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def table(model_dir, tmp_path_factory) -> dict:
    from mptool.benchmarks import quality

    out = tmp_path_factory.mktemp("q") / "quality_tiny"
    quality.main(["--model", str(model_dir), "--ratios", "0.5", "--ablations", "--out", str(out), *ARGS])
    result = json.loads(out.with_suffix(".json").read_text())
    result["md"] = out.with_suffix(".md").read_text()
    return result


def test_every_trained_row_gets_the_same_tokens(table):
    trained = [r for r in table["rows"] if r["train_tokens"]]
    assert len(trained) >= 8
    # MaskPrune's rows count the steps they ran (mask learning + recovery), not the figure asked for
    assert {r["train_tokens"] for r in trained} == {512}
    assert {r["mask_blocks"] for r in trained if "mask_blocks" in r} == {16, 8}  # T alone; T/2 + T/2
    # each trained row records the configuration it ran where it differs from the recorded defaults
    assert all(r["recovery_config"] or r["method"] == "maskprune" for r in trained)
    rows = {r["method"]: r for r in trained if r["ratio"] == 0.5}
    assert rows["ablation: fixed multipliers (y=0.5) + recovery"]["maskprune_config"]["fixed_multiplier"] == 0.5
    assert rows["ablation: dual ascent with exact line search + recovery"]["maskprune_config"]["dual"] == "exact"
    lora_only = rows["ablation: LoRA only (LM loss, no distillation)"]
    assert lora_only["maskprune_config"]["kd_distill"] is False and lora_only["recovery_config"]["kd"] is False
    assert rows["maskprune + recovery"]["recovery_config"]["steps"] == 4  # 256 tokens of 2 x 32
    assert set(table["training"]["maskprune"]) >= set(rows["maskprune"]["maskprune_config"])
    # one Markdown line per JSON row, under a header and a separator
    assert len([ln for ln in table["md"].splitlines() if ln.startswith("| ")]) == len(table["rows"]) + 1
    # the CPU and its kernel level are recorded: they set the rounding that recovery amplifies
    env = table["environment"]
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and env["cpu"]


def test_maskprune_rows_meet_the_budget_and_ablations_share_its_shape(table):
    rows = {r["method"]: r for r in table["rows"] if r["ratio"] == 0.5}
    mp = rows["maskprune + recovery"]
    assert mp["prunable_kept"] <= 0.5 + 1e-9
    assert mp["final_violation"] == 0
    shape = (mp["kv_heads"], mp["heads_per_group"], mp["ffn"])
    ablations = [r for m, r in rows.items() if m.startswith("ablation")]
    assert len(ablations) == 3
    for r in ablations:
        assert (r["kv_heads"], r["heads_per_group"], r["ffn"]) == shape, r["method"]
    for r in table["rows"]:
        assert r["ppl"] > 1 and r["ppl_x_dense"] == pytest.approx(r["ppl"] / table["rows"][0]["ppl"])


def test_default_variant_reproduces_the_table_row(table, model_dir, tmp_path):
    from mptool.benchmarks import variants

    out = tmp_path / "v.jsonl"
    metrics = tmp_path / "metrics"
    rows = variants.main(["--model", str(model_dir), "--ratio", "0.5", "--out", str(out), *ARGS,
                          "--metrics-dir", str(metrics),
                          "--variants", '[{"name": "default"}, {"name": "frozen", "lr_mask": 0.0}, '
                                        '{"name": "fresh", "adapter": "fresh"}]'])
    assert [json.loads(ln)["name"] for ln in out.read_text().splitlines()] == ["default", "frozen", "fresh"]
    # per-step metrics: 4 mask steps + 4 continued recovery steps (512 tokens of 2 x 32); a fresh
    # adapter's recovery runs outside the trainer and writes none
    steps = {p.stem: [json.loads(ln) for ln in p.read_text().splitlines()] for p in metrics.glob("*.jsonl")}
    assert sorted(steps) == ["default", "fresh", "frozen"]
    assert [(r.get("phase", "mask"), r["step"]) for r in steps["default"]] == \
        [("mask", i) for i in range(1, 5)] + [("recovery", i) for i in range(1, 5)]
    assert len(steps["fresh"]) == 4 and all("kd" in r for r in steps["default"])
    mp = next(r for r in table["rows"] if r["method"] == "maskprune + recovery")
    assert rows[0]["ppl"] == pytest.approx(mp["ppl"], rel=1e-6)
    assert rows[0]["ppl_before_recovery"] == pytest.approx(mp["ppl_before_recovery"], rel=1e-6)
    assert rows[0]["mask_tokens"] + rows[0]["recovery_tokens"] == 512
    assert rows[1]["overrides"] == {"lr_mask": 0.0}
    # the same mask learning, then recovery on its adapter (masked model) or a fresh one (sliced):
    # the cut is the same model either way, the recovered ones differ
    assert (rows[0]["adapter"], rows[2]["adapter"]) == ("continue", "fresh")
    assert rows[2]["ppl_before_recovery"] == pytest.approx(rows[0]["ppl_before_recovery"], rel=1e-4)
    assert rows[2]["ppl"] != rows[0]["ppl"]


def test_oneshot_and_seeded_variants(table, model_dir, tmp_path):
    """A one-shot variant at a shape reproduces the table's one-shot + recovery row at that shape;
    another seed changes the LoRA initialisation and so the result, nothing else."""
    from mptool.benchmarks import variants

    flap = next(r for r in table["rows"] if r["method"] == "flap + recovery" and r["split"] == "fixed rule")
    shape = [flap["kv_heads"], flap["heads_per_group"], flap["ffn"]]
    rows = variants.main(["--model", str(model_dir), "--ratio", "0.5", "--out", str(tmp_path / "v.jsonl"), *ARGS,
                          "--variants", json.dumps([{"name": "flap", "oneshot": "flap", "shape": shape},
                                                    {"name": "seed 1", "seed": 1}])])
    assert rows[0]["ppl"] == pytest.approx(flap["ppl"], rel=1e-6)
    assert (rows[0]["mask_tokens"], rows[0]["recovery_tokens"]) == (0, 512)
    assert [rows[0][k] for k in ("kv_heads", "heads_per_group", "ffn")] == shape
    mp = next(r for r in table["rows"] if r["method"] == "maskprune + recovery")
    assert rows[1]["seed"] == 1 and rows[1]["overrides"] == {}
    assert rows[1]["ppl"] != pytest.approx(mp["ppl"], rel=1e-6)
    with pytest.raises(ValueError, match="shape"):
        variants.main(["--model", str(model_dir), "--out", str(tmp_path / "w.jsonl"), *ARGS,
                       "--variants", '[{"name": "x", "oneshot": "flap"}]'])


def test_data_order_is_recorded_and_changes_the_training_text(table, model_dir, tmp_path):
    """The table draws its blocks in mptool compress's default order (shuffled: from the whole text)
    and says so in JSON, command and Markdown; --data-order sequential trains the same one-shot row
    on the text's first blocks instead, to another result, on the same held-out text."""
    from mptool.benchmarks import variants
    from mptool.config import DataConfig

    assert DataConfig().order == "shuffled" == table["training"]["order"]
    assert table["command"].endswith("--data-order shuffled") and "shuffled blocks" in table["md"].splitlines()[0]
    flap = next(r for r in table["rows"] if r["method"] == "flap + recovery" and r["split"] == "fixed rule")
    shape = [flap["kv_heads"], flap["heads_per_group"], flap["ffn"]]
    row, = variants.main(["--model", str(model_dir), "--ratio", "0.5", "--out", str(tmp_path / "v.jsonl"), *ARGS,
                          "--data-order", "sequential",
                          "--variants", json.dumps([{"name": "flap", "oneshot": "flap", "shape": shape}])])
    assert row["data_order"] == "sequential" and row["command"].endswith("--data-order sequential")
    assert row["dense_ppl"] == pytest.approx(table["rows"][0]["ppl"], rel=1e-6)  # same held-out text
    assert row["ppl"] != pytest.approx(flap["ppl"], rel=1e-4)


def test_oneshot_recovery_in_phases(table, model_dir, tmp_path):
    """"phases" splits a one-shot row's recovery like MaskPrune's two phases: one phase of every
    token at rank 16 is the plain row; two phases train differently and report the perplexity
    between them; phases that do not add up to the budget are refused."""
    from mptool.benchmarks import variants

    flap = next(r for r in table["rows"] if r["method"] == "flap + recovery" and r["split"] == "fixed rule")
    shape = [flap["kv_heads"], flap["heads_per_group"], flap["ffn"]]
    rows = variants.main(["--model", str(model_dir), "--ratio", "0.5", "--out", str(tmp_path / "v.jsonl"), *ARGS,
                          "--variants", json.dumps([
                              {"name": "one", "oneshot": "flap", "shape": shape, "phases": [[512, 16]]},
                              {"name": "two", "oneshot": "flap", "shape": shape, "phases": [[256, 8], [256, 16]]}])])
    assert rows[0]["ppl"] == pytest.approx(flap["ppl"], rel=1e-6) and rows[0]["ppl_between_phases"] == []
    assert rows[1]["phases"] == [(256, 8), (256, 16)] and len(rows[1]["ppl_between_phases"]) == 1
    assert rows[1]["ppl"] != pytest.approx(flap["ppl"], rel=1e-6)
    with pytest.raises(ValueError, match="summing to 512"):
        variants.main(["--model", str(model_dir), "--out", str(tmp_path / "w.jsonl"), *ARGS, "--variants",
                       json.dumps([{"name": "x", "oneshot": "flap", "shape": shape, "phases": [[256, 8]]}])])


def test_variants_reject_bad_input(tmp_path, capsys):
    from mptool.benchmarks import variants

    with pytest.raises(SystemExit) as exc:
        variants.main(["--variants", "not json", "--out", str(tmp_path / "x.jsonl")])
    assert exc.value.code == 2
    assert "JSON list" in capsys.readouterr().err
    assert not (tmp_path / "x.jsonl").exists()


@pytest.mark.parametrize("tokens", ["500", "64"])  # not whole steps of 2 x 32; fewer than two steps
def test_a_budget_that_cannot_be_split_fairly_is_refused(tokens, tmp_path, capsys):
    """Every trained row must train on exactly --tokens: a budget that is not a whole number of
    steps (or cannot give each MaskPrune phase one) is refused before any model is loaded."""
    from mptool.benchmarks import quality, variants

    args = [*ARGS, "--tokens", tokens]  # the later --tokens wins
    with pytest.raises(SystemExit) as exc:
        quality.main(["--model", str(tmp_path / "absent"), "--out", str(tmp_path / "q"), *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--tokens must be a multiple of --batch-size x --seq-len = 64, at least 128" in err
    assert f"got {tokens}" in err
    with pytest.raises(SystemExit):
        variants.main(["--variants", '[{"name": "x"}]', "--out", str(tmp_path / "v.jsonl"), *args])
    assert not list(tmp_path.iterdir())


def test_oneshot_table_prunes_every_method_to_the_same_shape(model_dir, tmp_path):
    """The one-shot table: dense, then each method at each ratio cut to one balanced target (the
    methods differ only in which units they keep), counted parameters equal to the sliced model's,
    and the calibration's block order recorded in the JSON, the command and the Markdown."""
    from mptool.benchmarks import oneshot
    from mptool.baselines import METHODS

    out = tmp_path / "oneshot"
    result = oneshot.main(["--model", str(model_dir), "--ratios", "0.25,0.5", "--calib-tokens", "128",
                           "--seq-len", "32", "--eval-tokens", "192", "--out", str(out)])
    rows = result["rows"]
    assert [r["method"] for r in rows] == ["dense", *METHODS, *METHODS]
    for ratio in (0.25, 0.5):
        shapes = {(r["kv_heads"], r["heads_per_group"], r["ffn"], r["total_params"]) for r in rows if r["ratio"] == ratio}
        assert len(shapes) == 1
        assert next(iter(shapes))[3] < rows[0]["total_params"]
    assert len({r["ppl"] for r in rows}) == len(rows) and all(r["ppl"] > 1 for r in rows)
    assert result["calibration"]["tokens"] == 128 and result["calibration"]["order"] == "shuffled"
    assert result["command"].endswith("--data-order shuffled")
    assert json.loads(out.with_suffix(".json").read_text()) == result
    md = out.with_suffix(".md").read_text()
    assert "(shuffled blocks)" in md and len([ln for ln in md.splitlines() if ln.startswith("| ")]) == len(rows) + 1
