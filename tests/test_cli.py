"""The CLI end to end on tiny models, and every bad input: one line, non-zero exit, nothing left."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import plant_massive_channel, tiny_model
from mptool.cli import app

runner = CliRunner()


def save_tiny(family: str, tokenizer_dir: Path, out: Path, **overrides) -> Path:
    from transformers import AutoTokenizer

    model = tiny_model(family, **overrides)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def tiny_dir(tmp_path, tokenizer_dir) -> Path:
    return save_tiny("llama", tokenizer_dir, tmp_path / "tiny-llama")


def small(text_file: Path) -> list[str]:
    return ["--data", str(text_file), "--eval-data", str(text_file), "--calib-tokens", "512",
            "--seq-len", "128", "--eval-tokens", "512", "--recovery-steps", "0"]


@pytest.mark.parametrize("method", ["magnitude", "wanda-sp", "flap"])
def test_compress_writes_a_plain_uniform_checkpoint(method, tiny_dir, text_file, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "pruned"
    res = run("compress", tiny_dir, "--method", method, "--kv-heads", "2", "--heads-per-group", "1",
              "--ffn", "128", *small(text_file), "--out", out)
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    assert n == report["pruned"]["total_params"] == report["pruned"]["params_counted"]
    assert report["dense"]["total_params"] == report["dense"]["params_counted"]
    for layer in model.model.layers:
        assert layer.self_attn.q_proj.out_features == 2 * 16
        assert layer.self_attn.k_proj.out_features == 2 * 16
        assert layer.mlp.down_proj.in_features == 128
    assert report["pruned"]["perplexity"]["ppl"] > 1 and report["dense"]["perplexity"]["tokens"] > 100
    keeps = json.loads((out / "keeps.json").read_text())
    assert len(keeps) == 2 and all(len(k["ffn"]) == 128 for k in keeps)
    assert (out / "mptool-config.yaml").is_file() and (out / "tokenizer.json").is_file()
    # these tiny runs evaluate on their training file: said on the console and in the report
    assert report["held_out_warning"] == f"--data and --eval-data are the same ({text_file})"
    assert "not on held-out text" in " ".join(res.output.split())


def test_a_copy_of_the_training_text_as_eval_data_is_flagged(tmp_path, text_file):
    """Same text under another name: found by verbatim passages, not only by the same path; a
    different text is not flagged."""
    from types import SimpleNamespace

    from conftest import SAMPLE_TEXT
    from mptool.compress import held_out_overlap

    copy = tmp_path / "held-out.txt"
    copy.write_text(text_file.read_text())
    cfg = SimpleNamespace(train=str(text_file), eval=str(copy))
    why = held_out_overlap(cfg, [text_file.read_text()], copy.read_text())
    assert why == f"3 of 3 passages of the evaluation text ({copy}) appear word for word in --data {text_file}"
    other = " ".join(reversed(SAMPLE_TEXT.split())) * 40
    assert held_out_overlap(cfg, [text_file.read_text()], other) is None


@pytest.mark.parametrize("splits", [("train", "test"), ("train", "validation"), ("train",), None])
def test_one_datasets_folder_for_both_texts_is_held_out_only_with_two_splits(tmp_path, splits):
    """--data DS --eval-data DS reads DS's train split for training and its test (or validation)
    split for evaluation: held out; with one split, or a plain Dataset, both read the same rows."""
    from types import SimpleNamespace

    import datasets

    from mptool.compress import held_out_overlap

    rows = datasets.Dataset.from_dict({"text": ["one", "two"]})
    ds = rows if splits is None else datasets.DatasetDict({s: rows for s in splits})
    ds.save_to_disk(str(tmp_path / "ds"))
    why = held_out_overlap(SimpleNamespace(train=str(tmp_path / "ds"), eval=str(tmp_path / "ds")))
    assert why == (None if splits and len(splits) == 2 else f"--data and --eval-data are the same ({tmp_path / 'ds'})")


@pytest.mark.parametrize("order", [None, "sequential"])
def test_compress_draws_its_blocks_in_the_asked_order(order, tiny_dir, text_file, tmp_path, monkeypatch):
    """One cut of the training text in ``data.order`` (default shuffled: the whole text's blocks in
    the fixed random order; --data-order sequential: its first ones): MaskPrune trains on its first
    20 blocks (8 steps x 2 + 2 recovery steps x 2) and calibration (flap, the masks' initialisation)
    sees its first 4 (512 calibration tokens of 128)."""
    import mptool.baselines as B
    from transformers import AutoTokenizer

    from mptool.data import token_blocks
    from mptool.maskprune import MaskPrune

    seen, trained = [], []
    real_calibrate, real_init = B.calibrate, MaskPrune.__init__
    monkeypatch.setattr(B, "calibrate", lambda model, blocks, **kw: (seen.append(blocks.clone()), real_calibrate(model, blocks, **kw))[1])

    def init(self, model, blocks, *a, **kw):
        trained.append(blocks.clone())
        real_init(self, model, blocks, *a, **kw)

    monkeypatch.setattr(MaskPrune, "__init__", init)
    out = tmp_path / "pruned"
    flags = [] if order is None else ["--data-order", order]
    res = run("compress", tiny_dir, *maskprune_args(text_file, tmp_path), *flags, "--out", out)
    assert res.exit_code == 0, res.output
    tok, text = AutoTokenizer.from_pretrained(tiny_dir), [text_file.read_text()]
    expect = token_blocks(tok, text, 128, 20 * 128, order=order or "shuffled")
    assert len(trained) == 1 and torch.equal(trained[0], expect)
    assert len(seen) == 1 and torch.equal(seen[0], expect[:4])
    other = token_blocks(tok, text, 128, 20 * 128, order="sequential" if order is None else "shuffled")
    assert not torch.equal(trained[0], other)
    assert json.loads((out / "report.json").read_text())["config"]["data"]["order"] == (order or "shuffled")


def test_a_stop_says_how_to_resume_and_a_stop_before_any_checkpoint_leaves_nothing(tiny_dir, text_file, tmp_path,
                                                                                   monkeypatch):
    args = maskprune_args(text_file, tmp_path)  # checkpoints every 2 steps
    early, late = tmp_path / "early", tmp_path / "late"
    res = killed_run(tiny_dir, args, early, monkeypatch, dies_at=1)
    assert res.exit_code != 0 and "--resume" not in res.output
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith((".early", "early"))) == []
    res = killed_run(tiny_dir, args, late, monkeypatch, dies_at=3)
    ckpt = tmp_path / "late.ckpt"
    assert res.exit_code != 0 and (ckpt / "trainer.json").is_file()
    assert f"mptool compress --resume {ckpt}" in " ".join(res.output.split()), res.output
    res = run("compress", tiny_dir, *args, "--out", late)  # the same command again, not --resume
    assert_clean_failure(res, late, f"{ckpt} holds the checkpoint of an interrupted run",
                         f"--resume {ckpt}, or pass --overwrite")
    assert (ckpt / "trainer.json").is_file()
    # --overwrite starts afresh: stopped before its own first checkpoint, nothing of either run is left
    res = killed_run(tiny_dir, [*args, "--overwrite"], late, monkeypatch, dies_at=1)
    assert res.exit_code != 0 and "--resume" not in res.output
    assert not ckpt.exists() and not (tmp_path / ".late.ckpt.work").exists()


def test_a_folder_where_the_checkpoint_goes_that_mptool_did_not_write_is_refused_not_deleted(
        tiny_dir, text_file, tmp_path, monkeypatch):
    import shutil

    args = ["--method", "magnitude", "--kv-heads", "2", "--heads-per-group", "1", "--ffn", "128", *small(text_file)]
    for name, flags in (("x.ckpt", []), ("x.ckpt", ["--overwrite"]), (".x.ckpt.work", ["--overwrite"])):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "precious.txt").write_text("keep")
        res = run("compress", tiny_dir, *args, *flags, "--out", tmp_path / "x")
        assert_clean_failure(res, tmp_path / "x", f"{folder} exists and was not written by mptool compress",
                             "move it, or give another --out")
        assert (folder / "precious.txt").read_text() == "keep"
        shutil.rmtree(folder)
    model = tmp_path / "m.ckpt"  # the input model itself sits where --out m keeps its checkpoint
    shutil.copytree(tiny_dir, model)
    res = run("compress", model, *args, "--out", tmp_path / "m")
    assert_clean_failure(res, tmp_path / "m", f"{model}, where a run with --out", "is or holds an input")
    assert (model / "config.json").is_file()
    (tmp_path / "x.ckpt").mkdir()
    monkeypatch.chdir(tmp_path / "x.ckpt")
    res = run("compress", tiny_dir, *args, "--out", tmp_path / "x")  # the current directory is the checkpoint's
    assert_clean_failure(res, tmp_path / "x", "is or holds an input or the current directory")
    assert (tmp_path / "x.ckpt").is_dir()


def test_compress_with_ratio_and_yaml_recipe(tiny_dir, text_file, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"method: flap\nratio: 0.5\nffn_multiple: 32\nrecovery:\n  steps: 0\ndata:\n  train: {text_file}\n"
                      f"  eval: {text_file}\n  calib_tokens: 512\n  seq_len: 128\nppl:\n  max_tokens: 512\n")
    out = tmp_path / "r"
    res = run("compress", tiny_dir, "--config", recipe, "--method", "wanda-sp", "--out", out)
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "wanda-sp"  # the flag overrides the recipe
    assert report["config"]["ffn_multiple"] == 32  # the recipe overrides the default
    assert 0.45 <= report["prunable_removed"] <= 0.55


def maskprune_args(text_file: Path, tmp_path: Path, rec_steps: int = 2) -> list[str]:
    recipe = tmp_path / "mp.yaml"
    recipe.write_text("maskprune:\n  steps: 8\n  batch_size: 2\n  checkpoint_every: 2\n  lr_mask: 0.2\n"
                      f"recovery:\n  steps: {rec_steps}\n  batch_size: 2\n")
    return [*small(text_file)[:-2], "--ratio", "0.5", "--ffn-multiple", "32", "--config", str(recipe)]


def killed_run(tiny_dir: Path, args: list[str], out: Path, monkeypatch, dies_at: int = 3):
    """``mptool compress`` killed (KeyboardInterrupt) when mask learning reaches step ``dies_at``;
    returns the CLI result. Its checkpoint is ``<out>.ckpt``."""
    from mptool.maskprune import MaskPrune

    original = MaskPrune.step

    def dying_step(self):
        if self.state.step == dies_at:
            raise KeyboardInterrupt  # a kill between checkpoints
        return original(self)

    with monkeypatch.context() as m:
        m.setattr(MaskPrune, "step", dying_step)
        return run("compress", tiny_dir, *args, "--out", out)


def test_maskprune_select_wanda_sp_keeps_the_shape_and_cuts_the_dense_weights(tiny_dir, text_file, tmp_path):
    """select: wanda-sp = MaskPrune's learned shape, cut from the dense weights by wanda-sp: the
    same checkpoint, tensor for tensor, as the one-shot method at that shape."""
    from safetensors.torch import load_file

    recipe = tmp_path / "sel.yaml"
    recipe.write_text("maskprune:\n  steps: 6\n  batch_size: 2\n  checkpoint_every: 0\n  lr_mask: 0.2\n"
                      "  select: wanda-sp\n")
    mp, one = tmp_path / "mp", tmp_path / "one"
    res = run("compress", tiny_dir, *small(text_file), "--ratio", "0.5", "--ffn-multiple", "32",
              "--config", recipe, "--out", mp)
    assert res.exit_code == 0, res.output
    t = json.loads((mp / "report.json").read_text())["pruned"]
    res = run("compress", tiny_dir, "--method", "wanda-sp", "--kv-heads", t["kv_heads"], "--heads-per-group",
              t["heads_per_group"], "--ffn", t["ffn"], *small(text_file), "--out", one)
    assert res.exit_code == 0, res.output
    assert json.loads((mp / "keeps.json").read_text()) == json.loads((one / "keeps.json").read_text())
    a, b = load_file(mp / "model.safetensors"), load_file(one / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    bad = tmp_path / "bad.yaml"
    bad.write_text("maskprune:\n  select: best\n")
    res = run("compress", tiny_dir, *small(text_file), "--config", bad, "--out", tmp_path / "never")
    assert res.exit_code != 0 and "maskprune.select 'best' is not one of learned, magnitude, wanda-sp, flap" in res.output
    assert not (tmp_path / "never").exists()
    bad.write_text("maskprune:\n  init: random\n")
    res = run("compress", tiny_dir, *small(text_file), "--config", bad, "--out", tmp_path / "never")
    assert res.exit_code != 0 and "maskprune.init 'random' is not one of magnitude, wanda-sp, flap, ones" in res.output
    assert not (tmp_path / "never").exists()
    bad.write_text("maskprune:\n  snap_frac: 1.5\n")
    res = run("compress", tiny_dir, *small(text_file), "--config", bad, "--out", tmp_path / "never")
    assert res.exit_code != 0 and "maskprune.snap_frac 1.5 must be in [0, 1]" in res.output
    assert not (tmp_path / "never").exists()
    res = run("compress", tiny_dir, *small(text_file), "--recovery-adapter", "reuse", "--out", tmp_path / "never")
    assert res.exit_code != 0 and "recovery.adapter 'reuse' is not one of continue, fresh" in res.output
    assert not (tmp_path / "never").exists()
    # knobs a continued adapter cannot honour are refused, not ignored; a fresh adapter takes them
    for body, needle in (("recovery:\n  lora_r: 8\n", "recovery.lora_r 8 differs from maskprune.lora_r 16"),
                         ("recovery:\n  teacher: cache\n", "recovery.teacher cache needs a fresh adapter"),
                         ("recovery:\n  lr_schedule: step\n", "recovery.lr_schedule 'step' is not one of")):
        bad.write_text(body)
        res = run("compress", tiny_dir, *small(text_file), "--recovery-steps", "1", "--config", bad,
                  "--out", tmp_path / "never")
        assert res.exit_code != 0 and needle in res.output, res.output
        assert not (tmp_path / "never").exists()


def test_resolved_recovery_takes_mask_learnings_adapter_knobs():
    """A fresh adapter without its own rank takes mask learning's; a continued adapter is
    checkpointed when either phase asks (one model, one setting)."""
    from mptool.compress import resolve
    from mptool.config import CompressConfig, from_dict

    cfg = resolve(from_dict(CompressConfig, {"maskprune": {"lora_r": 8, "lora_alpha": 16},
                                             "recovery": {"adapter": "fresh", "grad_checkpointing": True}}))
    assert (cfg.recovery.lora_r, cfg.recovery.lora_alpha) == (8, 16)
    assert (cfg.maskprune.grad_checkpointing, cfg.recovery.grad_checkpointing) == (False, True)
    cfg = resolve(from_dict(CompressConfig, {"recovery": {"grad_checkpointing": True}}))  # continued
    assert (cfg.recovery.lora_r, cfg.recovery.lora_alpha) == (16, 32)
    assert (cfg.maskprune.grad_checkpointing, cfg.recovery.grad_checkpointing) == (True, True)


def test_one_shot_split_kd_is_maskprunes_shape_rule(tiny_dir, text_file, tmp_path):
    """--split kd: a one-shot method chooses its target the way MaskPrune fixes its shape before
    the first step (KD of each legal candidate on the same probe batch). With flap, whose scores
    also initialise MaskPrune's masks by default, the result is MaskPrune's shape cut by flap
    (select: flap), unit for unit, with the same candidate scores."""
    recipe = tmp_path / "sel.yaml"
    recipe.write_text("maskprune:\n  steps: 2\n  batch_size: 2\n  checkpoint_every: 0\n  select: flap\n")
    mp, kd, bal = tmp_path / "mp", tmp_path / "kd", tmp_path / "bal"
    common = [tiny_dir, *small(text_file), "--ratio", "0.5", "--ffn-multiple", "32", "--config", recipe]
    assert run("compress", *common, "--out", mp).exit_code == 0
    res = run("compress", *common, "--method", "flap", "--split", "kd", "--out", kd)
    assert res.exit_code == 0, res.output
    a, b = json.loads((mp / "report.json").read_text()), json.loads((kd / "report.json").read_text())
    assert json.loads((mp / "keeps.json").read_text()) == json.loads((kd / "keeps.json").read_text())
    cands = a["maskprune"]["candidate_kd"]
    assert list(b["candidate_kd"]) == list(cands) and len(cands) > 1
    assert b["candidate_kd"] == pytest.approx(cands, rel=1e-3)
    best = min(b["candidate_kd"], key=b["candidate_kd"].get)
    assert best == "kv_heads={kv_heads} heads_per_group={heads_per_group} ffn={ffn}".format(**b["pruned"])
    assert b["prunable_removed"] >= 0.5
    # the default split is the fixed rule, with no candidate scoring
    assert run("compress", *common, "--method", "flap", "--out", bal).exit_code == 0
    assert "candidate_kd" not in json.loads((bal / "report.json").read_text())
    explicit = [tiny_dir, *small(text_file), "--method", "flap", "--ffn", "64"]
    for args, needle in [([*common, "--method", "wanda-sp", "--split", "best"], "--split 'best' is not one of"),
                         ([*common, "--split", "kd"], "--split kd is for one-shot methods"),
                         ([*explicit, "--split", "kd"], "give --ratio, not an explicit target")]:
        res = run("compress", *args, "--out", tmp_path / "never")
        assert res.exit_code != 0 and needle in res.output, res.output
        assert not (tmp_path / "never").exists()


def test_maskprune_is_the_default_and_reports_a_uniform_result(tiny_dir, text_file, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "mp"
    res = run("compress", tiny_dir, *maskprune_args(text_file, tmp_path), "--out", out)
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "maskprune"
    assert report["maskprune"]["final_violation"] == 0.0 and report["maskprune"]["steps"] == 8
    assert report["prunable_removed"] >= 0.5 and report["recovery"]["steps"] == 2
    assert "before_recovery" in report and report["recovery"]["adapter"] == "continued"
    # recovery trains on new text: the 8 x 2 blocks of mask learning are followed by 2 x 2 more
    assert report["recovery"]["blocks"] == 8 * 2 + 2 * 2 and report["recovery"]["first_block"] == 8 * 2
    assert report["maskprune"]["tokens"] == 4 * report["recovery"]["tokens"] > 0  # 8 x 2 blocks, then 2 x 2
    model = AutoModelForCausalLM.from_pretrained(out)
    shapes = {(l.self_attn.q_proj.out_features, l.self_attn.k_proj.out_features, l.mlp.down_proj.in_features)
              for l in model.model.layers}
    assert len(shapes) == 1
    assert sum(p.numel() for p in model.parameters()) == report["pruned"]["total_params"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("phase", "mask") == "mask"] == list(range(1, 9))
    assert [r["step"] for r in rows if r.get("phase") == "recovery"] == [1, 2]
    for png in ("training.png", "kept_units.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "mp.ckpt").exists()  # checkpoints go once the result is written


@pytest.mark.parametrize("dies_at,legacy", [(5, True), (10, False)])
def test_killed_run_resumes_to_the_same_result(tiny_dir, text_file, tmp_path, monkeypatch, dies_at, legacy):
    """Killed in mask learning (step 5) or in the recovery that continues it (its third step, after
    the checkpoint at step 10): resumed, the same checkpoint as a run never killed. ``legacy``: the
    run trained on sequential blocks and its checkpoint's config predates ``data.order`` and
    ``maskprune.protect`` and ``compensate`` (no such keys) and writes out that era's default
    window, 1024, longer than the tiny model's context (256); the resume must keep the order the
    run started with and its plain cut (no compensation), not take today's defaults, and evaluate
    with today's default window (the context), not refuse the 1024. Not legacy: the run trains with
    compensation (the default) and resumes to the same weights."""
    import yaml
    from safetensors.torch import load_file

    full = tmp_path / "full"
    args = maskprune_args(text_file, tmp_path, rec_steps=3) + (["--data-order", "sequential", "--no-compensate"]
                                                                if legacy else [])
    assert run("compress", tiny_dir, *args, "--out", full).exit_code == 0

    out = tmp_path / "killed"
    res = killed_run(tiny_dir, args, out, monkeypatch, dies_at)  # checkpoints every 2 steps
    assert res.exit_code != 0 and not out.exists()
    ckpt = tmp_path / "killed.ckpt"
    state = json.loads((ckpt / "trainer.json").read_text())["state"]
    assert state["step"] == dies_at // 2 * 2 and state["frozen_at"] == (8 if dies_at > 8 else None)
    if legacy:
        saved = yaml.safe_load((ckpt / "compress-config.yaml").read_text())
        assert saved["data"].pop("order") == "sequential"
        assert saved["ppl"]["window"] is None and "protect" in saved["maskprune"]
        saved["ppl"]["window"] = 1024
        del saved["maskprune"]["protect"]
        assert saved.pop("compensate") is False
        (ckpt / "compress-config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    res = run("compress", "--resume", ckpt)
    assert res.exit_code == 0, res.output
    assert json.loads((out / "keeps.json").read_text()) == json.loads((full / "keeps.json").read_text())
    a, b = load_file(str(full / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r.get("phase", "mask"), r["step"]) for r in rows] == [*(("mask", i) for i in range(1, 9)),
                                                                   *(("recovery", i) for i in range(1, 4))]
    # the perplexity at the cut, measured before the kill, is in the resumed run's report too
    full_report, report = (json.loads((p / "report.json").read_text()) for p in (full, out))
    assert report["before_recovery"]["ppl"] == pytest.approx(full_report["before_recovery"]["ppl"], rel=1e-5)



def test_a_run_started_with_relative_paths_resumes_from_another_folder(tiny_dir, text_file, tmp_path, monkeypatch):
    """The checkpoint's config names the model, the texts and --out as absolute paths: resumed from
    another working directory (a scheduler's resubmission), the run finds its inputs and writes
    where it was started to; the saved mptool-config.yaml reruns from anywhere too."""
    import os
    import shutil

    import yaml

    start, elsewhere = tmp_path / "start", tmp_path / "elsewhere"
    start.mkdir(), elsewhere.mkdir()
    shutil.copytree(tiny_dir, start / "model")
    shutil.copy(text_file, start / "text.txt")
    monkeypatch.chdir(start)
    args = [a.replace(str(text_file), "text.txt") for a in maskprune_args(text_file, tmp_path)]
    res = killed_run(Path("model"), args, Path("out"), monkeypatch, dies_at=5)
    assert res.exit_code != 0 and (start / "out.ckpt").is_dir()
    saved = yaml.safe_load((start / "out.ckpt" / "compress-config.yaml").read_text())
    assert (saved["model"], saved["data"]["train"], saved["out"]) == (
        str(start / "model"), str(start / "text.txt"), str(start / "out"))
    monkeypatch.chdir(elsewhere)
    res = run("compress", "--resume", os.path.relpath(start / "out.ckpt"))
    assert res.exit_code == 0, res.output
    assert (start / "out" / "model.safetensors").is_file() and not (elsewhere / "out").exists()
    recipe = yaml.safe_load((start / "out" / "mptool-config.yaml").read_text())
    assert recipe["data"]["eval"] == str(start / "text.txt") and recipe["out"] == str(start / "out")
    res = run("compress", "--config", start / "out" / "mptool-config.yaml", "--method", "magnitude",
              "--out", "again")
    assert res.exit_code == 0, res.output
    assert (elsewhere / "again" / "model.safetensors").is_file()

@pytest.mark.parametrize("method", ["flap", "magnitude"])
def test_compensation_changes_only_the_kept_columns_of_o_and_down(method, tiny_dir, text_file, tmp_path, monkeypatch):
    """--no-compensate is the plain cut; the default adds the least-squares compensation to the
    kept columns of o_proj/down_proj only: the same units kept, every other tensor identical."""
    from safetensors.torch import load_file

    outs = {}
    for flag in ("--compensate", "--no-compensate"):
        out = outs[flag] = tmp_path / flag.strip("-")
        res = run("compress", tiny_dir, "--method", method, "--kv-heads", "2", "--heads-per-group", "1",
                  "--ffn", "64", *small(text_file), "--ffn-multiple", "32", flag, "--out", out)
        assert res.exit_code == 0, res.output
        saved = (out / "mptool-config.yaml").read_text()
        assert f"compensate: {str(flag == '--compensate').lower()}" in saved
        assert json.loads((out / "report.json").read_text())["compensated"] is (flag == "--compensate")
    a, b = (load_file(outs[f] / "model.safetensors") for f in ("--compensate", "--no-compensate"))
    assert json.loads((outs["--compensate"] / "keeps.json").read_text()) == \
        json.loads((outs["--no-compensate"] / "keeps.json").read_text())
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    assert changed and all(k.endswith(("o_proj.weight", "down_proj.weight")) for k in changed), changed
    # the default (auto) turns it off, saying so, where the Gram matrices would crowd the host
    import mptool.compensate

    monkeypatch.setattr(mptool.compensate, "available_bytes", lambda: 1)
    auto = tmp_path / "auto"
    res = run("compress", tiny_dir, "--method", method, "--kv-heads", "2", "--heads-per-group", "1",
              "--ffn", "64", *small(text_file), "--ffn-multiple", "32", "--out", auto)
    assert res.exit_code == 0, res.output
    assert "compensation off: its Gram matrices need" in res.output
    assert "compensate: false" in (auto / "mptool-config.yaml").read_text()
    c = load_file(auto / "model.safetensors")
    assert all(torch.equal(c[k], b[k]) for k in b)


def test_shapes_lists_legal_targets_as_json(tiny_dir):
    res = run("shapes", tiny_dir, "--ratio", "0.5", "--tp", "1,2", "--ffn-multiple", "32", "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["targets"] and data["dense"]["num_attention_heads"] == 8
    for t in data["targets"]:
        assert t["prunable_params"] <= data["budget_prunable_params"]
        assert t["num_attention_heads"] % 2 == 0 and t["ffn"] % 32 == 0


def test_eval_writes_json(tiny_dir, text_file, tmp_path):
    out = tmp_path / "eval.json"
    res = run("eval", tiny_dir, "--data", text_file, "--eval-tokens", "300", "--window", "128",
              "--stride", "64", "--out", out)
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    p = data["perplexity"]
    assert p["tokens"] == 299 and p["protocol"]["stride"] == 64 and p["ppl"] > 1


def test_eval_out_never_overwrites_an_input_or_a_foreign_file(tiny_dir, text_file, tmp_path):
    """--out replaces only an earlier eval result: never the corpus it reads, a model's
    config.json, or any other file."""
    config = Path(tiny_dir) / "config.json"
    notes = tmp_path / "notes.json"  # another tool's JSON with a perplexity key is not ours either
    notes.write_text('{"perplexity": 12.3, "model": "my notes"}')
    before = {p: p.read_bytes() for p in (Path(text_file), config, notes)}
    for out in before:
        res = run("eval", tiny_dir, "--data", text_file, "--eval-tokens", "300", "--window", "128", "--out", out)
        assert res.exit_code == 2 and "is not an earlier `mptool eval` result" in " ".join(res.output.split())
        assert len([ln for ln in res.output.splitlines() if ln.strip()]) == 1, res.output
    assert {p: p.read_bytes() for p in before} == before
    out = tmp_path / "again.json"
    for _ in range(2):  # its own result is replaced
        res = run("eval", tiny_dir, "--data", text_file, "--eval-tokens", "300", "--window", "128", "--out", out)
        assert res.exit_code == 0, res.output
    assert json.loads(out.read_text())["perplexity"]["tokens"] == 300 - 3  # 3 windows of 128
    assert json.loads(out.read_text())["mptool_eval"] == 1


def test_tilde_in_out_is_the_home_folder_everywhere(tiny_dir, text_file, tmp_path, monkeypatch):
    """A recipe's `out: ~/runs/x` was checked under $HOME but written to ./~/runs/x, so a second
    run replaced it without --overwrite; now both are the home folder."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.yaml").write_text("out: ~/runs/x\n")
    res = run("compress", tiny_dir, "--method", "flap", "--ratio", "0.5", *small(text_file), "--config",
              tmp_path / "r.yaml")
    assert res.exit_code == 0, res.output
    assert (home / "runs" / "x" / "report.json").is_file() and not (tmp_path / "~").exists()
    (home / "runs" / "x" / "notes.txt").write_text("mine")
    res = run("compress", tiny_dir, "--method", "flap", "--ratio", "0.5", *small(text_file), "--config",
              tmp_path / "r.yaml")
    assert res.exit_code == 2 and "exists and is not empty" in res.output
    assert (home / "runs" / "x" / "notes.txt").read_text() == "mine"
    res = run("eval", tiny_dir, "--data", text_file, "--eval-tokens", "300", "--out", "~/e.json")
    assert res.exit_code == 0 and (home / "e.json").is_file() and not (tmp_path / "~").exists()


def test_tilde_in_config_is_the_home_folder(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "s.yaml").write_text("ratio: 0.5\nffn_multiple: 32\n")
    res = run("shapes", tiny_dir, "--config", "~/s.yaml", "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["ffn_multiple"] == 32, res.output


def test_a_typed_config_error_names_the_field_and_the_reason(tmp_path):
    """Qwen3's config is a typed dataclass: `head_dim: null` fails with the field on one line and
    the reason on the next; both reach the user."""
    config = tiny_model("qwen3").config.to_dict()
    config["head_dim"] = None
    (tmp_path / "q3").mkdir()
    (tmp_path / "q3" / "config.json").write_text(json.dumps(config))
    res = run("shapes", tmp_path / "q3")
    assert_clean_failure(res, tmp_path / "o", "Validation error for field 'head_dim':",
                         "Field 'head_dim' expected int, got NoneType")


def test_a_recipe_that_gives_a_key_twice_or_is_not_yaml_is_refused(tiny_dir, text_file, tmp_path):
    """YAML keeps the last of two equal keys: the first would be dropped without a word."""
    recipe = tmp_path / "r.yaml"
    out = tmp_path / "o"
    recipe.write_text("ratio: 0.5\nmaskprune:\n  steps: 2\nratio: 0.25\n")
    res = run("compress", tiny_dir, *small(text_file), "--config", recipe, "--out", out)
    assert_clean_failure(res, out, f"config file {recipe} is not valid YAML: key 'ratio' is given twice (line 4)")
    recipe.write_text("maskprune:\n  steps: 2\n  steps: 3\n")
    res = run("compress", tiny_dir, *small(text_file), "--config", recipe, "--out", out)
    assert_clean_failure(res, out, "key 'steps' is given twice (line 3)")
    recipe.write_text("maskprune: [steps: 2\n")
    res = run("compress", tiny_dir, *small(text_file), "--config", recipe, "--out", out)
    assert_clean_failure(res, out, f"config file {recipe} is not valid YAML")


def test_an_empty_out_is_refused_by_every_command(tiny_dir, text_file, tmp_path, monkeypatch):
    """eval took --out '' for its default (it wrote into the model folder); export named it '.'."""
    monkeypatch.chdir(tmp_path)
    for args in (["eval", tiny_dir, "--data", text_file], ["export", tiny_dir, "--target", "hf"],
                 ["compress", tiny_dir, *small(text_file)]):
        res = run(*args, "--out", "")
        assert_clean_failure(res, tmp_path / "none", "--out '' names no")
    assert not (tiny_dir / "eval.json").exists()


def test_eval_keeps_a_foreign_eval_json_in_the_model_folder(tiny_dir, text_file):
    """The default result file MODEL/eval.json replaces only an earlier eval result."""
    mine = tiny_dir / "eval.json"
    mine.write_text('{"my": "notes"}')
    res = run("eval", tiny_dir, "--data", text_file, "--eval-tokens", "300")
    assert res.exit_code == 0 and "is not an earlier `mptool eval` result and is kept" in " ".join(res.output.split())
    assert mine.read_text() == '{"my": "notes"}'
    mine.unlink()
    for _ in range(2):  # its own result is written, then replaced
        assert run("eval", tiny_dir, "--data", text_file, "--eval-tokens", "300").exit_code == 0
    assert json.loads(mine.read_text())["perplexity"]["tokens"] > 0


def test_eval_on_a_full_disk_is_one_line_and_leaves_nothing(tiny_dir, text_file, tmp_path, monkeypatch):
    import errno
    import pathlib

    def full(self, target):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pathlib.Path, "replace", full)
    out = tmp_path / "e.json"
    res = run("eval", tiny_dir, "--data", text_file, "--eval-tokens", "300", "--out", out)
    assert res.exit_code == 2 and f"cannot write {out}: No space left on device" in " ".join(res.output.split())
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith((".e.json", "e.json"))) == []


def test_eval_stride_defaults_to_the_window_and_bad_protocols_fail_first(tiny_dir, text_file, tmp_path):
    out = tmp_path / "eval.json"
    res = run("eval", tiny_dir, "--data", text_file, "--eval-tokens", "300", "--window", "128", "--out", out)
    assert res.exit_code == 0, res.output
    p = json.loads(out.read_text())["perplexity"]
    assert p["protocol"]["stride"] == 128 and p["tokens"] == 300 - 3  # 3 windows, each first token unscored
    for args, needle in ((["--eval-tokens", "1"], "ppl.max_tokens (--eval-tokens) 1 must be >= 2"),
                         (["--stride", "0"], "ppl.stride (--stride) 0 must be >= 1 and at most the window"),
                         (["--window", "64", "--stride", "65"], "ppl.stride (--stride) 65 must be in [1, window 64]"),
                         (["--out", f"{tmp_path}/newdir/"], "ends with a slash, as a folder does"),
                         (["--out", tmp_path], "is a folder; give a file path")):
        res = run("eval", tiny_dir, "--data", text_file, *args)
        assert res.exit_code == 2 and needle in res.output, res.output


def test_windows_and_blocks_longer_than_the_context_are_refused(tiny_dir, text_file, tmp_path):
    """The tiny model declares 256 positions: the default window shrinks to it, an explicit longer
    --window, --stride or --seq-len is refused before any training, naming the limit."""
    out = tmp_path / "eval.json"
    res = run("eval", tiny_dir, "--data", text_file, "--eval-tokens", "600", "--out", out)
    assert res.exit_code == 0, res.output
    p = json.loads(out.read_text())["perplexity"]
    assert p["protocol"]["window"] == p["protocol"]["stride"] == 256 and p["tokens"] == 600 - 3
    for args, needle in ((["--window", "512"], "(--window) 512 is longer than the model's context "
                          "(max_position_embeddings 256): give ppl.window 256 or less"),
                         (["--stride", "300"], "give ppl.stride 256 or less")):
        res = run("eval", tiny_dir, "--data", text_file, "--eval-tokens", "600", *args, "--out", out)
        assert res.exit_code == 2 and needle in res.output, res.output
    comp = tmp_path / "c"
    res = run("compress", tiny_dir, "--method", "magnitude", "--ratio", "0.5", *small(text_file),
              "--seq-len", "512", "--calib-tokens", "1024", "--out", comp)
    assert_clean_failure(res, comp, "(--seq-len) 512 is longer than the model's context", "256 or less")


def test_shapes_says_when_no_ratio_can_help(tokenizer_dir, tmp_path):
    """One query head cannot be split over 2 ranks: "try a smaller --ratio" would send the user
    round in circles; the message names the tp sizes instead."""
    one = save_tiny("llama", tokenizer_dir, tmp_path / "one-head", num_attention_heads=1, num_key_value_heads=1,
                    head_dim=128)
    res = run("shapes", one, "--ratio", "0.3", "--tp", "2")
    assert_clean_failure(res, tmp_path / "o", "(1 query heads, 1 KV heads) loads with tp 2 at any ratio")
    res = run("shapes", one, "--ratio", "0.99")  # the dense row is shown, then why nothing fits
    assert res.exit_code == 2 and "give --ratio" in res.output.strip().splitlines()[-1], res.output
    for method in ("flap", "maskprune"):  # compress: the same, before any work
        res = run("compress", one, "--method", method, "--ratio", "0.3", "--tp", "2", "--out", tmp_path / "o")
        assert_clean_failure(res, tmp_path / "o", "loads with tp 2 at any ratio; drop the tp sizes")
    # heads 6 over 3 KV heads split over 3 ranks; FFN 64 has no multiple of 64 that 3 divides: name the
    # FFN and the multiple that works (48 = 3 x 16), not the heads
    narrow = save_tiny("qwen2", tokenizer_dir, tmp_path / "narrow", intermediate_size=64)
    says = "no FFN width of this model (dense 64) is both a multiple of 64 and divisible by tp 3; give --ffn-multiple 16 or less"
    assert_clean_failure(run("shapes", narrow, "--ratio", "0.3", "--tp", "3"), tmp_path / "o", says)
    assert_clean_failure(run("compress", narrow, "--method", "flap", "--ratio", "0.3", "--tp", "3", "--out",
                             tmp_path / "o"), tmp_path / "o", says)
    res = run("shapes", narrow, "--ratio", "0.25", "--tp", "3", "--ffn-multiple", "16", "--json")
    rows = json.loads(res.output)["targets"] if res.exit_code == 0 else None
    assert rows and all(row["ffn"] % 48 == 0 for row in rows), res.output


def test_only_the_dense_shape_legal_is_not_answered_with_ratio_0(tiny_dir):
    """tp 8 keeps all 8 heads and an FFN step of 256 keeps the whole FFN: no --ratio in (0, 1)
    helps, so the message names the options that do."""
    res = run("shapes", tiny_dir, "--ratio", "0.5", "--ffn-multiple", "256", "--tp", "8")
    assert res.exit_code == 2 and "give --ratio" not in res.output
    assert ("no legal target smaller than the dense shape with tp 8 and FFN multiple 256, at any ratio; give a "
            "smaller --ffn-multiple or other tp sizes") in " ".join(res.output.split()), res.output


@pytest.mark.parametrize("method", ["flap", "maskprune"])
def test_a_ratio_beyond_every_legal_shape_names_the_largest_that_fits(tiny_dir, tmp_path, method):
    """The message names tp, the FFN multiple and the largest --ratio that has a legal shape; that
    ratio then works."""
    res = run("compress", tiny_dir, "--method", method, "--ratio", "0.95", "--tp", "2", "--out", tmp_path / "o")
    assert_clean_failure(res, tmp_path / "o", "no legal target keeps at most 5.0% of prunable parameters with tp 2 "
                                              "and FFN multiple 64: the smallest legal one keeps")
    largest = res.output.split("give --ratio ")[1].split()[0]
    res = run("shapes", tiny_dir, "--ratio", largest, "--tp", "2", "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["targets"], res.output


def test_plan_and_shapes_name_their_own_bad_flags(tiny_dir, tmp_path):
    res = run("plan", tiny_dir, "--gpus", "1,x")
    assert res.exit_code == 2 and "--gpus '1,x' must be comma-separated integers" in res.output, res.output
    res = run("plan", tiny_dir, "--dtype-bytes", "3")
    assert res.exit_code == 2 and "--dtype-bytes 3 is not a weight size" in res.output, res.output
    res = run("plan", tiny_dir, "--seq-len", "512", "--batch-size", "8")
    assert res.exit_code == 2 and "--seq-len 512 is longer than the model's context" in res.output, res.output
    res = run("plan", tiny_dir, "--gpus", "1,1", "--seq-len", "128", "--json")
    assert res.exit_code == 0 and {r["gpus"] for r in json.loads(res.stdout)["rows"]} == {1}, res.output
    assert len(json.loads(res.stdout)["rows"]) == len({(r["sharding"], r["phase"]) for r in json.loads(res.stdout)["rows"]})
    res = run("shapes", tiny_dir, "--ffn-multiple", "0")
    assert res.exit_code == 2 and "--ffn-multiple 0 must be >= 1" in res.output, res.output
    (tmp_path / "s.yaml").write_text("tp: [0]\n")
    res = run("shapes", tiny_dir, "--config", tmp_path / "s.yaml")
    assert res.exit_code == 2 and "must list positive tensor-parallel sizes" in res.output, res.output


def test_help_has_examples():
    for cmd in ("compress", "shapes", "eval"):
        res = run(cmd, "--help")
        assert res.exit_code == 0 and "Example: mptool " + cmd in res.output


# ------------------------------------------------------------------- bad inputs


def assert_clean_failure(res, out: Path, *needles: str) -> None:
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1, res.output
    assert lines[0].startswith("error:")
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.tmp-*"))


@pytest.mark.parametrize("args, needle", [
    (["compress", "--ratio", "abc"], "Invalid value for '--ratio'"),
    (["compress", "--no-such-flag"], "No such option: --no-such-flag"),
    (["bogus"], "No such command 'bogus'"),
    (["export", "--target"], "'--target' requires an argument"),
])
def test_usage_errors_are_one_line_too(args, needle, tmp_path):
    """Typer's multi-line error panel becomes the same one line as mptool's own errors."""
    res = run(*args)
    assert_clean_failure(res, tmp_path / "none", needle, "--help')")


def test_a_bare_mptool_still_prints_the_whole_help():
    res = run()
    assert res.exit_code == 2
    assert "compress" in res.output and "shapes" in res.output and len(res.output.splitlines()) > 5


def test_weights_that_do_not_match_the_config_are_refused(tiny_dir, text_file, tmp_path):
    """transformers would fill a missing tensor with random values and only log it."""
    from safetensors.torch import load_file, save_file

    weights = load_file(tiny_dir / "model.safetensors")
    weights.pop("model.layers.1.mlp.down_proj.weight")
    save_file(weights, tiny_dir / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "o"
    res = run("compress", tiny_dir, *small(text_file), "--method", "flap", "--out", out)
    assert_clean_failure(res, out, "weights do not match its config.json", "missing keys",
                         "model.layers.1.mlp.down_proj.weight")


def test_weights_holding_nan_are_named_by_every_command_that_runs_the_model(tiny_dir, text_file, tmp_path):
    """A NaN in the source weights: compress and eval used to finish with perplexity nan (exit 0),
    export blamed its probe text. Loading now names the tensor, before any work, and nothing is
    written; past loading (a run that diverges, activations that overflow) perplexity and the
    exporters' parity check say the same of the logits."""
    from safetensors.torch import load_file, save_file

    weights = load_file(tiny_dir / "model.safetensors")
    weights["model.layers.1.mlp.down_proj.weight"][3, 5] = float("nan")
    save_file(weights, tiny_dir / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "o"
    res = run("compress", tiny_dir, *small(text_file), "--method", "flap", "--out", out)
    says = "weights hold NaN or Inf (model.layers.1.mlp.down_proj.weight)"
    assert_clean_failure(res, out, says)
    res = run("eval", tiny_dir, "--data", text_file, "--eval-tokens", "256", "--out", tmp_path / "e.json")
    assert_clean_failure(res, tmp_path / "e.json", says)
    res = run("export", tiny_dir, "--target", "hf", "--out", out)  # found inside its progress display
    assert res.exit_code == 2 and res.output.strip().splitlines()[-1].startswith("error:"), res.output
    assert says in res.output.strip().splitlines()[-1] and not out.exists()
    assert not list(out.parent.glob(f".{out.name}.tmp-*"))


def test_logits_that_are_not_finite_are_named_past_loading(monkeypatch):
    """What loading cannot see (weights going NaN in training, activations overflowing): the
    perplexity names the weights, or says they are finite; an export's parity check refuses
    PyTorch's own non-finite logits instead of blaming the engine."""
    from mptool.errors import MptoolError, ParityError
    from mptool.evaluate import PplProtocol, perplexity
    from mptool.exporters.common import Tolerance, compare_logits

    model = tiny_model("llama")
    ids = torch.arange(1, 40)
    protocol = PplProtocol(window=16, stride=16, max_tokens=40, text="ids")
    real = model.forward
    monkeypatch.setattr(model, "forward", lambda *a, **k: type("Out", (), {"logits": real(*a, **k).logits * float("inf")})())
    with pytest.raises(MptoolError, match="logits are not finite .* the weights are finite, so activations overflow"):
        perplexity(model, ids, protocol)
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight[0, 0] = float("nan")
    with pytest.raises(MptoolError, match=r"weights hold NaN or Inf \(model.layers.0.self_attn.o_proj.weight\)"):
        perplexity(model, ids, protocol)
    ref = torch.zeros(2, 5)
    ref[1, 2] = float("nan")
    with pytest.raises(ParityError, match="PyTorch's own logits are not finite"):
        compare_logits(torch.zeros(2, 5), ref, Tolerance(1e-3, 0.0), "probe")


@pytest.mark.parametrize("damage,says", [
    ("truncate", "model.safetensors is not a readable safetensors file"),
    ("folder", "model.safetensors is not a readable safetensors file"),
    ("tokenizer", "its tokenizer files do not load"),
])
def test_damaged_files_in_a_model_folder_are_named(tiny_dir, text_file, tmp_path, damage, says):
    """Library errors (a safetensors header, a tokenizer's JSON) name the file that is wrong."""
    weights = tiny_dir / "model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "folder":
        weights.unlink()
        weights.mkdir()
    else:
        (tiny_dir / "tokenizer.json").write_text("{not json")
    out = tmp_path / "o"
    res = run("compress", tiny_dir, *small(text_file), "--method", "flap", "--out", out)
    assert_clean_failure(res, out, says)


def test_missing_model_path(tmp_path, text_file):
    out = tmp_path / "o"
    res = run("compress", tmp_path / "nope", *small(text_file), "--out", out)
    assert_clean_failure(res, out, "does not exist")


def test_folder_without_weights(tmp_path, text_file, tiny_dir):
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((tiny_dir / "config.json").read_text())
    out = tmp_path / "o"
    res = run("compress", bare, *small(text_file), "--out", out)
    assert_clean_failure(res, out, "safetensors")


def test_a_bf16_source_written_as_float32_says_so(tmp_path, text_file, tokenizer_dir):
    """compress trains and writes in --dtype (float32 by default): a bf16 source doubles in size,
    which the run now says and the report records."""
    import torch

    src = tmp_path / "bf16"
    model = tiny_model("llama").to(torch.bfloat16)
    model.save_pretrained(src)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(src)
    out = tmp_path / "o"
    res = run("compress", src, "--method", "magnitude", "--ratio", "0.5", *small(text_file), "--out", out)
    assert res.exit_code == 0, res.output
    assert "the source weights are bfloat16; training runs and the result is written in float32" in " ".join(res.output.split())
    assert json.loads((out / "report.json").read_text())["dtype"] == {"source": "bfloat16", "written": "float32"}
    res = run("compress", src, "--method", "magnitude", "--ratio", "0.5", *small(text_file), "--dtype", "bfloat16",
              "--out", tmp_path / "o16")
    assert res.exit_code == 0 and "the source weights are" not in res.output, res.output


def test_an_onnx_export_folder_is_named_as_such(tmp_path, text_file):
    """eval/compress take Hugging Face folders; an ONNX Runtime folder (genai_config.json, no
    config.json) is named as one instead of only 'has no config.json'."""
    onnx = tmp_path / "model-onnx"
    onnx.mkdir()
    (onnx / "genai_config.json").write_text("{}")
    out = tmp_path / "o"
    res = run("compress", onnx, *small(text_file), "--out", out)
    assert_clean_failure(res, out, "has no config.json (it is an ONNX Runtime folder")


def test_a_tokenizer_larger_than_the_embedding_is_refused(tmp_path, text_file, tokenizer_dir):
    """A tokenizer from another model: its ids past the embedding table would crash mid-run."""
    src = save_tiny("llama", tokenizer_dir, tmp_path / "small-vocab", vocab_size=200)
    for cmd in (["compress", src, *small(text_file), "--out", tmp_path / "o"],
                ["eval", src, "--data", text_file, "--eval-tokens", "300"],
                ["export", src, "--target", "hf", "--out", tmp_path / "o"]):
        res = run(*cmd)
        errors = [ln for ln in res.output.splitlines() if ln.startswith("error:")]  # export also shows its progress
        assert res.exit_code == 2 and len(errors) == 1, res.output
        assert "its tokenizer has 320 tokens but the model's embedding has 200 rows" in errors[0]
        assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.tmp-*"))


@pytest.mark.parametrize("change,says", [
    ({"num_attention_heads": 0}, "num_attention_heads 0; each must be a whole number >= 1"),
    ({"num_hidden_layers": 0}, "num_hidden_layers 0; each must be a whole number >= 1"),
    ({"num_key_value_heads": 3}, "num_attention_heads 8, not a multiple of num_key_value_heads 3"),
    ({"hidden_size": "128"}, "hidden_size '128'; each must be a whole number >= 1"),
])
def test_a_config_whose_sizes_describe_no_model(tiny_dir, text_file, tmp_path, change, says):
    """0 heads or layers were a ZeroDivisionError; 3 KV groups for 8 heads gave a wrong dense row."""
    config = json.loads((tiny_dir / "config.json").read_text())
    (tiny_dir / "config.json").write_text(json.dumps({**config, **change}))
    out = tmp_path / "o"
    assert_clean_failure(run("shapes", tiny_dir, "--ratio", "0.5"), out, says)
    assert_clean_failure(run("compress", tiny_dir, *small(text_file), "--out", out), out, says)


def test_text_holding_an_added_token_past_the_embedding_is_refused(tmp_path, tokenizer_dir):
    """Chat markers added to the tokenizer (ids 320, 321) but not to the 320-row embedding: the
    text that holds one is refused by name before the run, not an IndexError inside it."""
    from transformers import AutoTokenizer

    src = save_tiny("llama", tokenizer_dir, tmp_path / "chat")
    tok = AutoTokenizer.from_pretrained(src)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.save_pretrained(src)
    chat = tmp_path / "chat.txt"
    chat.write_text(("<|im_start|>user It is a truth universally acknowledged.<|im_end|> " * 60))
    out = tmp_path / "o"
    for cmd in (["eval", src, "--data", chat, "--eval-tokens", "256"],
                ["compress", src, "--method", "flap", "--ratio", "0.5", "--data", chat, "--eval-data", chat,
                 "--calib-tokens", "512", "--seq-len", "64", "--eval-tokens", "256", "--recovery-steps", "0",
                 "--out", out]):
        res = run(*cmd)
        errors = [ln for ln in res.output.splitlines() if ln.startswith("error:")]  # compress shows its target first
        assert res.exit_code == 2 and len(errors) == 1, res.output
        assert "holds token '<|im_" in errors[0] and "but the model's embedding has 320 rows" in errors[0]
        assert not out.exists() and not list(tmp_path.glob(".o*"))


def test_a_model_folder_without_a_tokenizer(tmp_path, text_file, tiny_dir):
    bare = tmp_path / "no-tokenizer"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((tiny_dir / name).read_bytes())
    out = tmp_path / "o"
    assert_clean_failure(run("compress", bare, *small(text_file), "--out", out), out,
                         "has no tokenizer (tokenizer.json, tokenizer.model or vocab.json)")


def test_pickle_weights_are_refused(tmp_path, text_file, tiny_dir):
    pkl = tmp_path / "pkl"
    pkl.mkdir()
    (pkl / "config.json").write_text((tiny_dir / "config.json").read_text())
    torch.save({}, pkl / "pytorch_model.bin")
    out = tmp_path / "o"
    assert_clean_failure(run("compress", pkl, *small(text_file), "--out", out), out, "safetensors")


def test_unsupported_architecture(tmp_path, text_file, tokenizer_dir):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=320)).save_pretrained(gpt)
    out = tmp_path / "o"
    res = run("compress", gpt, *small(text_file), "--out", out)
    assert_clean_failure(res, out, "unsupported architecture 'gpt2'", "llama", "qwen3")


def test_target_larger_than_dense(tiny_dir, text_file, tmp_path):
    out = tmp_path / "o"
    res = run("compress", tiny_dir, "--ffn", "4096", *small(text_file), "--out", out)
    assert_clean_failure(res, out, "exceeds the dense model")


def test_illegal_target_names_nearest(tiny_dir, text_file, tmp_path):
    out = tmp_path / "o"
    res = run("compress", tiny_dir, "--ffn", "100", *small(text_file), "--out", out)
    assert_clean_failure(res, out, "not a multiple of 64", "Nearest legal")


def test_a_ratio_far_below_the_nearest_legal_shape_is_pointed_out(tiny_dir, text_file, tmp_path):
    """--ratio 0.01 on the tiny model: the smallest legal cut is one FFN step of 64 (16.7%);
    the run says so instead of quietly removing 17 times what was asked."""
    out = tmp_path / "o"
    res = run("compress", tiny_dir, "--method", "flap", "--ratio", "0.01", *small(text_file), "--out", out)
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    removed = report["prunable_removed"]
    # the grid's smallest cut is one 64-channel FFN step of the 256 (8.3%); flap's balanced split,
    # which keeps attention and FFN at about the same fraction, takes two (16.7%)
    assert report["ratio"] == {"asked": 0.01, "largest_legal_removes": pytest.approx(1 / 12, abs=1e-6)}
    assert removed == pytest.approx(1 / 6, abs=1e-3)
    text = " ".join(res.output.split())
    assert ("note: --ratio 0.01 asked for 1.0% and 16.7% was removed: the largest legal uniform shape within it "
            "removes 8.3%, but flap chose a smaller one by the balanced split") in text, text


def test_maskprune_at_the_default_ratio_says_when_its_shape_rule_cut_more(tiny_dir, text_file, tmp_path):
    """No --ratio: the default 0.2 is what the note and report.json compare against; where the KD
    shape rule picks a smaller shape than the largest legal one, the note says the method chose it."""
    out = tmp_path / "o"
    res = run("compress", tiny_dir, *small(text_file), "--max-steps", "2", "--out", out)
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    assert report["ratio"]["asked"] == 0.2 and report["ratio"]["largest_legal_removes"] == pytest.approx(2 / 9)
    text = " ".join(res.output.split())
    chose = "but maskprune chose a smaller one by its KD shape rule"
    if report["prunable_removed"] > 0.2 + 0.02 + 1e-6 and report["prunable_removed"] > 2 / 9 + 1e-6:
        assert chose in text, text
    else:
        assert chose not in text


def test_overwrite_never_deletes_the_recipe_it_runs(tiny_dir, text_file, tmp_path):
    """A hand-written recipe kept in the output folder would go with the folder; the folder's own
    mptool-config.yaml (written anew) may be rerun into it."""
    out = tmp_path / "o"
    res = run("compress", tiny_dir, "--method", "flap", "--ratio", "0.5", *small(text_file), "--out", out)
    assert res.exit_code == 0, res.output
    mine = out / "my-recipe.yaml"
    mine.write_text("method: magnitude\n")
    res = run("compress", tiny_dir, *small(text_file), "--config", mine, "--out", out, "--overwrite")
    assert_clean_failure(res, tmp_path / "never", f"--config {mine} lies inside --out {out}")
    assert mine.read_text() == "method: magnitude\n"
    res = run("compress", "--config", out / "mptool-config.yaml", "--out", out, "--overwrite")
    assert res.exit_code == 0, res.output
    assert json.loads((out / "report.json").read_text())["method"] == "flap"


def test_a_short_training_text_is_said_and_recorded(tiny_dir, tmp_path, text_file):
    """Fewer tokens than --calib-tokens and the training steps need: the run goes on (the blocks
    are reused) but says so, and report.json records what was used, not what was asked."""
    short = tmp_path / "short.txt"
    short.write_text(text_file.read_text()[:1500])
    out = tmp_path / "o"
    res = run("compress", tiny_dir, "--method", "flap", "--ratio", "0.5", "--data", short, "--eval-data", text_file,
              "--calib-tokens", "2048", "--seq-len", "64", "--eval-tokens", "256", "--recovery-steps", "4",
              "--out", out)
    assert res.exit_code == 0, res.output
    used = json.loads((out / "report.json").read_text())["data_used"]
    assert used["calib_blocks_asked"] == 32 and 0 < used["calib_blocks"] == used["distinct_train_blocks"] < 16
    assert used["train_blocks"] == 16  # 4 recovery steps x the default batch of 4
    text = " ".join(res.output.split())
    assert (f"calibration uses {used['calib_blocks']} of the 32 asked (--calib-tokens); training passes over "
            f"{used['distinct_train_blocks']} distinct blocks") in text, text


@pytest.mark.parametrize("ratio", ["0", "1", "1.5", "-0.2"])
def test_ratio_outside_unit_interval(tiny_dir, text_file, tmp_path, ratio):
    out = tmp_path / "o"
    res = run("compress", tiny_dir, "--ratio", ratio, *small(text_file), "--out", out)
    assert_clean_failure(res, out, "outside (0, 1)")


@pytest.mark.parametrize("seed", ["-1", "99999999999999999999"])
def test_seed_outside_what_the_generators_accept(tiny_dir, text_file, tmp_path, seed):
    """An OverflowError traceback from torch.manual_seed before: now one line, nothing written."""
    out = tmp_path / "o"
    res = run("compress", tiny_dir, "--seed", seed, *small(text_file), "--out", out)
    assert_clean_failure(res, out, f"--seed {seed} must be a whole number from 0 to 4294967295")
    res = run("export", tiny_dir, "--target", "hf", "--seed", seed, "--out", out)
    errors = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert res.exit_code == 2 and len(errors) == 1 and "parity.seed (--seed)" in errors[0], res.output
    assert not out.exists()


@pytest.mark.parametrize("flag,value,needle", [("--sharding", "zero3", "not one of ddp, fsdp"),
                                                ("--device", "tpu", "not one of auto, cpu, cuda")])
def test_unknown_sharding_or_device(tiny_dir, text_file, tmp_path, flag, value, needle):
    out = tmp_path / "o"
    res = run("compress", tiny_dir, flag, value, *small(text_file), "--out", out)
    assert_clean_failure(res, out, needle)


def test_cuda_asked_without_a_gpu(tiny_dir, text_file, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    out = tmp_path / "o"
    res = run("compress", tiny_dir, "--device", "cuda", *small(text_file), "--out", out)
    assert_clean_failure(res, out, "no CUDA GPU")


def test_empty_text_file(tiny_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n ")
    out = tmp_path / "o"
    res = run("compress", tiny_dir, "--data", empty, "--out", out)
    assert_clean_failure(res, out, "empty")


def test_unknown_recipe_key(tiny_dir, tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("rato: 0.5\n")
    out = tmp_path / "o"
    res = run("compress", tiny_dir, "--config", recipe, "--out", out)
    assert_clean_failure(res, out, "unknown config key(s) rato", "accepted:")


@pytest.mark.parametrize("args,recipe,needle", [
    (["--max-steps", "0"], "", "maskprune.steps (--max-steps) 0 must be >= 1"),
    (["--recovery-steps", "-1"], "", "recovery.steps (--recovery-steps) -1 must be >= 0"),
    (["--max-tokens", "0"], "", "maskprune.max_tokens (--max-tokens) 0 must be >= 1"),
    ([], "maskprune:\n  dual: exactt\n", "maskprune.dual 'exactt' is not one of ascent, exact"),
    ([], "maskprune:\n  forward: bin\n", "maskprune.forward 'bin' is not one of binary, scaled"),
    ([], "maskprune:\n  mask_norm: typewise\n", "maskprune.mask_norm 'typewise' is not one of shared, per_type"),
    ([], "maskprune:\n  lr_mask_schedule: step\n", "maskprune.lr_mask_schedule 'step' is not one of constant, linear"),
    ([], "recovery:\n  teacher: disk\n", "recovery.teacher 'disk' is not one of memory, cache"),
    ([], "recovery:\n  batch_size: 0\n", "recovery.batch_size 0 must be a positive multiple of the 1 processes"),
    (["--seq-len", "64"], "data: corpus.txt\n", "data in the recipe must be a mapping of data keys"),
    (["--ffn-multiple", "0"], "", "--ffn-multiple 0 must be >= 1"),
    (["--calib-tokens", "100"], "", "data.calib_tokens (--calib-tokens) 100 must be at least one block"),
    (["--eval-tokens", "-5"], "", "ppl.max_tokens (--eval-tokens) -5 must be >= 2"),
    (["--data-order", "random"], "", "data.order (--data-order) 'random' is not one of sequential, shuffled"),
    ([], "recovery:\n  lr: -1\n", "recovery.lr -1.0 must be a finite number in (0, inf)"),
    ([], "maskprune:\n  max_grad_norm: 0\n", "maskprune.max_grad_norm 0.0 must be a finite number in (0, inf)"),
    ([], "maskprune:\n  lr_mask: .nan\n", "maskprune.lr_mask nan must be a finite number in [0, inf)"),
    ([], "maskprune:\n  temperature: 0\n", "maskprune.temperature 0.0 must be a finite number in (0, inf)"),
    ([], "maskprune:\n  mask_beta: 1\n", "maskprune.mask_beta 1.0 must be a finite number in [0, 1)"),
])
def test_bad_training_knobs_fail_before_any_work(tiny_dir, text_file, tmp_path, args, recipe, needle):
    """Knobs that used to fail late (after training) or with a traceback: one line, up front."""
    out = tmp_path / "o"
    extra = []
    if recipe:
        (tmp_path / "r.yaml").write_text(recipe)
        extra = ["--config", tmp_path / "r.yaml"]
    res = run("compress", tiny_dir, *small(text_file), *args, *extra, "--out", out)
    assert_clean_failure(res, out, needle)


def test_an_empty_recipe_section_takes_flags():
    from mptool.config import CompressConfig, load_config

    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write("recovery:\nmaskprune:\n")
    cfg = load_config(CompressConfig, f.name, {"recovery.steps": 5})
    assert cfg.recovery.steps == 5 and cfg.maskprune.steps == CompressConfig().maskprune.steps
    Path(f.name).unlink()



def test_a_recipe_merge_key_is_yaml_not_a_duplicate(tmp_path):
    """``<<: *anchor`` merges a block; a key merged in may be overridden beside it (YAML's rule),
    and only a key written twice by hand is refused."""
    from mptool.config import CompressConfig, load_config

    (tmp_path / "r.yaml").write_text("recovery: &r {steps: 7, lr: 0.001}\n"
                                     "maskprune:\n  <<: {steps: 5, lr_mask: 0.01}\n  steps: 9\n")
    cfg = load_config(CompressConfig, tmp_path / "r.yaml")
    assert (cfg.maskprune.steps, cfg.maskprune.lr_mask) == (9, 0.01)
    assert (cfg.recovery.steps, cfg.recovery.lr) == (7, 0.001)

@pytest.mark.parametrize("recipe, says", [
    ("maskprune:\n  steps: true\n", "maskprune.steps must be a number (an integer), got True"),
    ("maskprune:\n  lr_mask: false\n", "maskprune.lr_mask must be a number, got False"),
    ("method: [flap]\n", "method must be text, got ['flap']"),
])
def test_recipe_values_of_the_wrong_kind_are_refused(tmp_path, recipe, says):
    """YAML's true is Python's 1: it used to run 1 step; a list became the text "['flap']"."""
    from mptool.config import CompressConfig, load_config
    from mptool.errors import MptoolError

    (tmp_path / "r.yaml").write_text(recipe)
    with pytest.raises(MptoolError, match=re.escape(says)):
        load_config(CompressConfig, tmp_path / "r.yaml")


def test_out_naming_a_file_is_refused_and_the_file_kept(tiny_dir, text_file, tmp_path):
    out = tmp_path / "report.json"
    out.write_text("{}")
    for extra in ([], ["--overwrite"]):
        res = run("compress", tiny_dir, *small(text_file), *extra, "--out", out)
        assert res.exit_code == 2 and "is a file; give a folder" in res.output, res.output
        assert out.read_text() == "{}"


def test_overwrite_never_replaces_a_folder_holding_the_inputs(tiny_dir, text_file, tmp_path):
    before = sorted(p.name for p in tmp_path.iterdir())
    res = run("compress", tiny_dir, *small(text_file), "--out", tmp_path, "--overwrite")
    assert res.exit_code == 2 and "holds the input" in res.output, res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before and (tiny_dir / "config.json").is_file()


def test_resume_refuses_flags_it_would_ignore(tmp_path):
    ckpt = tmp_path / "x.ckpt"
    ckpt.mkdir()
    (ckpt / "compress-config.yaml").write_text("method: maskprune\n")
    res = run("compress", "--resume", ckpt, "--recovery-steps", "60", "--out", tmp_path / "y")
    assert res.exit_code == 2 and "--out, --recovery-steps cannot change it" in res.output, res.output
    assert not (tmp_path / "y").exists()


def test_a_failed_one_shot_run_leaves_no_work_folder(tiny_dir, text_file, tmp_path, monkeypatch):
    import mptool.recover

    def broken(*a, **kw):
        raise RuntimeError("out of memory in recovery")

    monkeypatch.setattr(mptool.recover, "recover", broken)
    out = tmp_path / "o"
    res = run("compress", tiny_dir, "--method", "flap", "--ratio", "0.5", "--ffn-multiple", "32",
              *small(text_file), "--recovery-steps", "1", "--out", out)
    assert res.exit_code != 0 and isinstance(res.exception, RuntimeError)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["tiny-llama", text_file.name])


def test_existing_output_is_not_overwritten(tiny_dir, text_file, tmp_path):
    out = tmp_path / "keep"
    out.mkdir()
    (out / "precious.txt").write_text("x")
    res = run("compress", tiny_dir, *small(text_file), "--out", out)
    assert res.exit_code == 2 and "--overwrite" in res.output
    assert (out / "precious.txt").read_text() == "x"


def test_the_documented_recipe_is_the_defaults():
    """recipes/maskprune.yaml lists every knob at its default: it cannot drift from the code."""
    import yaml

    from mptool.config import CompressConfig, load_config, to_dict

    path = Path(__file__).parent.parent / "recipes" / "maskprune.yaml"
    assert yaml.safe_load(path.read_text()) == to_dict(CompressConfig())
    assert load_config(CompressConfig, path) == CompressConfig()


def test_compress_keeps_a_channel_that_writes_massive_activations(tokenizer_dir, text_file, tmp_path):
    """A channel planted to write 1e4 x more than its neighbours is found on the calibration text,
    named in the report and kept in the checkpoint; maskprune.protect 0 turns that off."""
    from transformers import AutoTokenizer

    model = tiny_model("llama")
    plant_massive_channel(model, 1, 37)
    src = tmp_path / "massive"
    model.save_pretrained(src)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(src)
    out = tmp_path / "o"
    res = run("compress", src, "--ratio", "0.5", "--max-steps", "3", *small(text_file), "--ffn-multiple", "32",
              "--out", out)
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    assert report["protected_ffn"] == {"1": [37]}
    assert 37 in json.loads((out / "keeps.json").read_text())[1]["ffn"]
    (tmp_path / "off.yaml").write_text("maskprune:\n  protect: 0\n")
    res = run("compress", src, "--config", tmp_path / "off.yaml", "--ratio", "0.5", "--max-steps", "3",
              *small(text_file), "--ffn-multiple", "32", "--out", tmp_path / "off")
    assert res.exit_code == 0, res.output
    assert "protected_ffn" not in json.loads((tmp_path / "off" / "report.json").read_text())
    (tmp_path / "low.yaml").write_text("maskprune:\n  protect: 1\n")
    res = run("compress", src, "--config", tmp_path / "low.yaml", "--ratio", "0.5", "--max-steps", "3",
              *small(text_file), "--ffn-multiple", "32", "--out", tmp_path / "low")
    assert res.exit_code == 2, res.output  # refused after the calibration pass that finds them
    last = [ln for ln in res.output.strip().splitlines() if ln.strip()][-1]
    assert last.startswith("error: maskprune.protect 1") and "more than 1/8" in last and "or 0 for none" in last
    assert not (tmp_path / "low").exists() and not list(tmp_path.glob(".low*"))


def test_bf16_weights_give_a_bf16_uniform_checkpoint(tiny_dir, text_file, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "o"
    res = run("compress", tiny_dir, "--ratio", "0.5", "--max-steps", "4", "--dtype", "bfloat16",
              *small(text_file), "--ffn-multiple", "32", "--out", out)
    assert res.exit_code == 0, res.output
    weights = load_file(str(out / "model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    report = json.loads((out / "report.json").read_text())
    assert report["pruned"]["prunable_kept"] <= 0.5 + 1e-9
    ffn = {t.shape[0] for k, t in weights.items() if k.endswith("up_proj.weight")}
    assert len(ffn) == 1  # uniform
    assert report["pruned"]["perplexity"]["ppl"] < 10 * report["dense"]["perplexity"]["ppl"]


def test_report_table_collects_compress_reports(tiny_dir, text_file, tmp_path, capsys):
    """benchmarks/report_table.py: one row per report with its shape, tokens and perplexities;
    anything that is not a compress report is refused with one line."""
    from mptool.benchmarks.report_table import main as table

    out = tmp_path / "mag"
    args = [a for a in small(text_file) if a not in ("--recovery-steps", "0")]
    res = run("compress", tiny_dir, "--method", "magnitude", "--ratio", "0.5", "--ffn-multiple", "32",
              *args, "--recovery-steps", "3", "--out", out)
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    table(["--out", str(tmp_path / "t"), str(out)])
    rows = json.loads((tmp_path / "t.json").read_text())["rows"]
    assert len(rows) == 1
    r = rows[0]
    assert r["run"] == "mag" and r["method"] == "magnitude + recovery"
    assert r["target"] == [report["pruned"][k] for k in ("kv_heads", "heads_per_group", "ffn")]
    assert r["ppl"] == report["pruned"]["perplexity"]["ppl"]
    assert r["ppl_before_recovery"] == report["before_recovery"]["ppl"]
    assert r["train_tokens"] == r["recovery_tokens"] == report["recovery"]["tokens"] > 0
    assert f"{r['ppl']:.2f}" in (tmp_path / "t.md").read_text()
    bogus = tmp_path / "bogus.json"
    bogus.write_text('{"method": "x"}')
    with pytest.raises(SystemExit) as e:
        table(["--out", str(tmp_path / "u"), str(bogus)])
    assert "not an mptool compress report" in str(e.value) and not (tmp_path / "u.json").exists()


def test_version_names_mptool_and_the_installed_engines():
    """`mptool --version`: the package version (the one pyproject.toml declares) and the installed
    versions of the libraries a bug report needs, without running a command."""
    import tomllib

    import torch
    import transformers

    from mptool import __version__

    declared = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"]["version"]
    res = run("--version")
    assert res.exit_code == 0, res.output
    first, second = res.output.strip().splitlines()
    assert first.startswith(f"mptool {__version__} (Python ") and __version__ == declared
    assert f"torch {torch.__version__}" in second and f"transformers {transformers.__version__}" in second


def test_a_recipe_that_is_not_utf8_text_or_is_a_folder_is_refused(tiny_dir, tmp_path):
    recipe = tmp_path / "bin.yaml"
    recipe.write_bytes(bytes(range(128, 256)) * 8)
    for command in ("shapes", "plan", "eval"):
        res = run(command, tiny_dir, "--config", recipe)
        assert res.exit_code == 2 and "is not UTF-8 text; give a YAML recipe file" in res.output, res.output
    res = run("shapes", tiny_dir, "--config", tmp_path)
    assert res.exit_code == 2 and "is a folder; give a YAML recipe file" in res.output, res.output


def test_plan_refuses_a_batch_it_cannot_split_and_a_gpu_memory_that_is_not_a_number(tiny_dir):
    res = run("plan", tiny_dir, "--batch-size", "3", "--gpus", "1,2")
    assert res.exit_code == 2 and "cannot be split evenly over 2 GPUs" in res.output, res.output
    assert "e.g. 4" in res.output
    for mem in ("nan", "inf", "0"):
        res = run("plan", tiny_dir, "--gpu-mem", mem)
        assert res.exit_code == 2 and "--gpu-mem a finite number of GiB" in " ".join(res.output.split()), res.output


def test_eval_limit_below_one_is_refused_before_any_work(tiny_dir, text_file, tmp_path):
    out = tmp_path / "e.json"
    res = run("eval", tiny_dir, "--data", text_file, "--limit", "0", "--tasks", "x", "--out", out)
    assert_clean_failure(res, out, "--limit 0 must be >= 1")


@pytest.mark.parametrize("damage, needle", [
    ("trainer.json", "trainer.json is not the JSON a mptool checkpoint writes"),
    ("state.safetensors", "state.safetensors is not a readable safetensors file"),
    ("compress-config.yaml", "compress-config.yaml is not a YAML mapping of compress settings"),
    ("optimizer.safetensors:gone", "not a complete mptool checkpoint (no optimizer.safetensors)"),
    ("model", "was written for another model: its zg masks have shape (2, 4), this model's (2, 2)"),
])
def test_resume_from_a_damaged_or_foreign_checkpoint_is_one_line(tiny_dir, text_file, tmp_path, monkeypatch,
                                                                   tokenizer_dir, damage, needle):
    """Each damage fails in one line, the files are checked before the model loads, and a resume
    that fails leaves the checkpoint as it was."""
    import yaml

    out = tmp_path / "killed"
    assert killed_run(tiny_dir, maskprune_args(text_file, tmp_path), out, monkeypatch).exit_code != 0
    ckpt = tmp_path / "killed.ckpt"
    name, _, how = damage.partition(":")
    if name == "model":  # the recorded model replaced by one with 2 KV heads
        other = save_tiny("llama", tokenizer_dir, tmp_path / "other", num_key_value_heads=2)
        saved = yaml.safe_load((ckpt / "compress-config.yaml").read_text())
        (ckpt / "compress-config.yaml").write_text(yaml.safe_dump({**saved, "model": str(other)}))
    elif how == "gone":
        (ckpt / name).unlink()
    elif name.endswith(".yaml"):
        (ckpt / name).write_text("- a list\n- not a mapping\n")
    else:
        (ckpt / name).write_bytes((ckpt / name).read_bytes()[:7])
    before = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    work = sorted(p.name for p in tmp_path.iterdir())
    res = run("compress", "--resume", ckpt)
    last = [ln for ln in res.output.strip().splitlines() if ln.strip()][-1]
    assert res.exit_code == 2 and last.startswith("error:") and needle in last, res.output
    assert "Traceback" not in res.output
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == work and not out.exists()


def test_sigterm_removes_the_half_written_output(tokenizer_dir, tmp_path):
    """timeout(1), a scheduler or torchrun stop a command with SIGTERM: it unwinds like Ctrl-C and
    leaves no temporary folder."""
    import signal
    import subprocess
    import sys
    import time

    src = save_tiny("llama", tokenizer_dir, tmp_path / "src")
    out = tmp_path / "onnx"
    log = tmp_path / "stderr.txt"  # why, if it ever ends otherwise
    with log.open("w") as err:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "mptool"), "export", str(src), "--target", "onnx",
                                 "--out", str(out)], stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.monotonic() + 300
    while not list(tmp_path.glob(".onnx.tmp-*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the export ended before its temporary folder was seen"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM, log.read_text()[-3000:]
    assert not out.exists() and not list(tmp_path.glob(".onnx.tmp-*"))


def test_sigterm_during_an_extension_import_still_exits_as_terminated(monkeypatch):
    """A SIGTERM that lands while an extension module initialises surfaces as ImportError
    (pybind11's "initialization failed", seen in CI); the exit status is still 128 + SIGTERM."""
    import signal

    from mptool import cli

    def app_importing_an_extension():
        try:
            cli._terminated(signal.SIGTERM, None)  # what the signal does mid-import
        except SystemExit:
            raise ImportError("initialization failed") from None

    monkeypatch.setattr(cli, "app", app_importing_an_extension)
    monkeypatch.setattr(cli, "_SIGNALLED", [])
    monkeypatch.setattr(signal, "signal", lambda *a: None)  # leave the test process's handlers alone
    with pytest.raises(SystemExit) as stop:
        cli.main()
    assert stop.value.code == 128 + signal.SIGTERM

    def app_with_a_bug():
        raise ImportError("a real one")

    monkeypatch.setattr(cli, "app", app_with_a_bug)
    monkeypatch.setattr(cli, "_SIGNALLED", [])
    with pytest.raises(ImportError, match="a real one"):  # no signal: the error is not disguised
        cli.main()


def test_a_model_with_its_own_code_is_refused_naming_the_flag_and_its_code_never_runs(tiny_dir, tmp_path):
    import shutil

    remote = tmp_path / "remote"
    shutil.copytree(tiny_dir, remote)
    marker = tmp_path / "ran"
    (remote / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    config = json.loads((remote / "config.json").read_text())
    config.update(model_type="evilllama", auto_map={"AutoConfig": "evil.EvilConfig",
                                                    "AutoModelForCausalLM": "evil.EvilModel"})
    (remote / "config.json").write_text(json.dumps(config))
    for command in ("shapes", "eval"):
        res = run(command, remote)
        assert res.exit_code == 2 and "only with --trust-remote-code" in " ".join(res.output.split()), res.output
    assert not marker.exists()


def test_resume_into_an_occupied_out_names_the_flag_it_accepts(tiny_dir, text_file, tmp_path, monkeypatch):
    out = tmp_path / "killed"
    assert killed_run(tiny_dir, maskprune_args(text_file, tmp_path), out, monkeypatch).exit_code != 0
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    res = run("compress", "--resume", tmp_path / "killed.ckpt")
    text = " ".join(res.output.split())
    assert res.exit_code == 2 and "pass --overwrite to replace it" in text and "another --out" not in text, res.output
    assert (out / "notes.txt").read_text() == "mine"


def test_resume_expands_a_home_path(tmp_path, monkeypatch):
    """--resume=~/x reaches the CLI unexpanded (no shell expands after '='); it names the folder in HOME."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "x.ckpt").mkdir()
    (tmp_path / "x.ckpt" / "compress-config.yaml").write_text("method: maskprune\n")
    res = run("compress", "--resume=~/x.ckpt")
    assert res.exit_code == 2 and f"--resume {tmp_path / 'x.ckpt'} is not a complete mptool checkpoint (no " \
        "trainer.json" in " ".join(res.output.split()), res.output


def test_shapes_with_no_legal_target_exits_2_after_the_listing(tiny_dir):
    for extra in ([], ["--json"]):
        res = run("shapes", tiny_dir, "--ratio", "0.9999", *extra)
        assert res.exit_code == 2, res.output
        assert ("error: no legal target keeps at most 0.0% of prunable parameters with tp 1 and FFN multiple 64: "
                "the smallest legal one keeps") in " ".join(res.output.split()), res.output
    res = run("shapes", tiny_dir, "--ratio", "0.5")
    assert res.exit_code == 0 and "error" not in res.output


def test_overwrite_never_deletes_mptools_cache(tiny_dir, text_file, tmp_path, monkeypatch):
    """The converted default model and the corpus are inputs whenever they are defaulted:
    `--out ~/.cache/mptool --overwrite` deleted both (and exited 0)."""
    import mptool.models as models

    cache = tmp_path / "cache"
    for name in ("smollm2-135m-instruct", "austen"):
        (cache / name).mkdir(parents=True)
        (cache / name / "keep.txt").write_text(name)
    monkeypatch.setattr(models, "CACHE_DIR", cache)
    for out in (cache, cache / "austen", tmp_path):
        res = run("compress", tiny_dir, "--method", "flap", "--ratio", "0.5", *small(text_file), "--out", out,
                  "--overwrite")
        assert res.exit_code == 2 and "mptool's cache" in res.output, res.output
    res = run("export", tiny_dir, "--target", "hf", "--out", cache, "--overwrite")
    assert res.exit_code == 2 and "mptool's cache" in res.output, res.output
    assert sorted(p.read_text() for p in cache.glob("*/keep.txt")) == ["austen", "smollm2-135m-instruct"]
    res = run("compress", tiny_dir, "--method", "flap", "--ratio", "0.5", *small(text_file), "--out",
              cache / "new")  # a new folder inside the cache deletes nothing
    assert res.exit_code == 0, res.output


def test_tilde_in_data_paths_is_the_home_folder(tiny_dir, text_file, tmp_path, monkeypatch):
    """A recipe's `data: {train: ~/c.txt}` gets no shell expansion; it was refused as missing."""
    import shutil

    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(text_file, home / "c.txt")
    monkeypatch.setenv("HOME", str(home))
    (tmp_path / "r.yaml").write_text("data:\n  train: ~/c.txt\n  eval: ~/c.txt\n")
    res = run("compress", tiny_dir, "--method", "flap", "--ratio", "0.5", "--calib-tokens", "512", "--seq-len",
              "128", "--eval-tokens", "512", "--recovery-steps", "0", "--out", tmp_path / "o", "-c", tmp_path / "r.yaml")
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "o" / "report.json").read_text())["pruned"]["perplexity"]["tokens"] > 0
    res = run("eval", tiny_dir, "--data", "~/c.txt", "--eval-tokens", "300", "--out", tmp_path / "e.json")
    assert res.exit_code == 0 and json.loads((tmp_path / "e.json").read_text())["perplexity"]["tokens"] > 0, res.output


def test_a_short_evaluation_text_is_said_and_recorded(tiny_dir, text_file, tmp_path):
    """An evaluation text shorter than --eval-tokens was measured silently (2 tokens scored)."""
    short = tmp_path / "short.txt"
    short.write_text("Anne Elliot walked.")
    args = ["--data", text_file, "--eval-data", short, "--calib-tokens", "512", "--seq-len", "128",
            "--eval-tokens", "512", "--recovery-steps", "0"]
    res = run("compress", tiny_dir, "--method", "flap", "--ratio", "0.5", *args, "--out", tmp_path / "o")
    assert res.exit_code == 0, res.output
    used = json.loads((tmp_path / "o" / "report.json").read_text())["data_used"]
    assert used["eval_tokens_asked"] == 512 and 1 < used["eval_tokens"] < 20
    assert f"the evaluation text holds {used['eval_tokens']} tokens of the 512 asked" in " ".join(res.output.split())
    res = run("eval", tiny_dir, "--data", short, "--eval-tokens", "300", "--out", tmp_path / "e.json")
    assert res.exit_code == 0 and "too few to compare models by" in " ".join(res.output.split()), res.output


@pytest.mark.parametrize("native", [False, True])
def test_bf16_autocast_only_where_the_device_runs_it_natively(native, monkeypatch, tiny_dir, text_file, tmp_path):
    """bf16 on a CPU without AVX512/AMX runs PyTorch's reference kernels (a MaskPrune step took
    400-1,170 s there against ~3.5 s): training falls back to fp32 autocast-free, says so, and the
    report records what was asked and used."""
    import torch

    from mptool import maskprune

    monkeypatch.setattr(maskprune, "native_bf16", lambda kind: native)
    with maskprune.autocast(True, "cpu"):
        assert torch.is_autocast_enabled("cpu") is native
    with maskprune.autocast(False, "cpu"):
        assert not torch.is_autocast_enabled("cpu")
    out = tmp_path / "o"
    res = run("compress", tiny_dir, *small(text_file), "--max-steps", "2", "--out", out)
    assert res.exit_code == 0, res.output
    said = "no native bf16 matrix products" in " ".join(res.output.split())
    assert said is not native, res.output
    report = json.loads((out / "report.json").read_text())
    assert report["bf16_autocast"] == {"asked": True, "native": native, "used": native}
