"""`mptool eval --tasks` with a local lm-eval task YAML (offline, no hub)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mptool.cli import app
from test_cli import save_tiny

TASKS = Path(__file__).parent / "data" / "tasks"


def test_local_multiple_choice_task(tmp_path, tokenizer_dir, text_file):
    model = save_tiny("llama", tokenizer_dir, tmp_path / "m")
    # lm-eval resolves data_files against the working directory: point the copy at this checkout.
    yaml_text = (TASKS / "austen_mc.yaml").read_text().replace(
        "tests/data/tasks/austen_mc.jsonl", str(TASKS / "austen_mc.jsonl"))
    task = tmp_path / "austen_mc.yaml"
    task.write_text(yaml_text)
    out = tmp_path / "eval.json"
    res = CliRunner().invoke(app, ["eval", str(model), "--data", str(text_file), "--eval-tokens", "256",
                                   "--tasks", str(task), "--out", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    acc = data["tasks"]["austen_mc"]["acc,none"]
    assert 0.0 <= acc <= 1.0 and acc * 6 == round(acc * 6)  # 6 questions: a multiple of 1/6
    assert data["perplexity"]["tokens"] == 255


def test_missing_task_file(tmp_path, tokenizer_dir):
    model = save_tiny("llama", tokenizer_dir, tmp_path / "m")
    res = CliRunner().invoke(app, ["eval", str(model), "--tasks", str(tmp_path / "nope.yaml")])
    assert res.exit_code == 2 and "does not exist" in res.output


def test_unknown_task_fails_before_any_work_and_function_tags_are_read(tmp_path, tokenizer_dir):
    """A misspelled task name is one line before the model loads; a task YAML with lm-eval's
    ``!function`` tags still yields its name."""
    from mptool.evaluate import resolve_tasks

    model = save_tiny("llama", tokenizer_dir, tmp_path / "m")
    res = CliRunner().invoke(app, ["eval", str(model), "--tasks", "hellaswagg"])
    assert res.exit_code == 2 and "lm-eval knows no task 'hellaswagg'" in res.output, res.output
    yaml_text = (TASKS / "austen_mc.yaml").read_text().replace(
        "tests/data/tasks/austen_mc.jsonl", str(TASKS / "austen_mc.jsonl"))
    task = tmp_path / "tagged.yaml"
    task.write_text(yaml_text + "process_docs: !function utils.process_docs\n")
    (tmp_path / "utils.py").write_text("def process_docs(dataset):\n    return dataset\n")
    _, names = resolve_tasks([str(task)])
    assert names == ["austen_mc"]


def test_incomplete_task_file_and_empty_entries_fail_before_the_model_loads(tmp_path):
    """Found before the perplexity run, in one line: a task YAML lm-eval cannot build (it raises a
    bare TypeError for a missing doc_to_target) and an empty --tasks entry (``a.yaml,``, which
    would have meant every YAML in the working directory)."""
    yaml_text = (TASKS / "austen_mc.yaml").read_text().replace(
        "tests/data/tasks/austen_mc.jsonl", str(TASKS / "austen_mc.jsonl"))
    task = tmp_path / "incomplete.yaml"
    task.write_text("\n".join(ln for ln in yaml_text.splitlines() if not ln.startswith("doc_to_target")))
    missing_model = tmp_path / "not-loaded"  # never reached: the tasks are checked first
    for tasks, says in ((str(task), "lm-eval cannot build task 'austen_mc' from"),
                        (f"{task},", "has an empty entry")):
        res = CliRunner().invoke(app, ["eval", str(missing_model), "--tasks", tasks])
        lines = [ln for ln in res.output.splitlines() if ln.strip()]
        assert res.exit_code == 2 and len(lines) == 1 and says in lines[0], res.output


def test_a_task_whose_data_file_is_not_found_says_where_paths_are_read_from(tmp_path, monkeypatch):
    """The shipped YAML names its JSONL relative to the repository root: run from elsewhere, the
    message says where relative paths are resolved, not that the YAML is incomplete."""
    from mptool.errors import MptoolError
    from mptool.evaluate import resolve_tasks

    monkeypatch.chdir(tmp_path)
    with pytest.raises(MptoolError, match="paths in a task YAML .* are read from the working directory") as err:
        resolve_tasks([str(TASKS / "austen_mc.yaml")])
    assert "needs task, dataset_path" not in str(err.value)


def test_registered_task_without_the_hub_fails_before_the_model_loads(tmp_path, tokenizer_dir, monkeypatch):
    """A registered task (its data set on the hub) with the hub unreachable is one line at once,
    not half a minute of download retries after the perplexity run; offline mode (the tests'
    HF_HUB_OFFLINE=1) tries the cache, also before the model loads."""
    import mptool.models as models

    model = save_tiny("llama", tokenizer_dir, tmp_path / "m")

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the task was found unusable")

    monkeypatch.setattr(models, "load_model", no_load)
    res = CliRunner().invoke(app, ["eval", str(model), "--tasks", "hellaswag", "--out", str(tmp_path / "e.json")])
    assert res.exit_code == 2 and "lm-eval cannot build task 'hellaswag'" in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1 and not (tmp_path / "e.json").exists()
    monkeypatch.setattr(models, "hub_unreachable", lambda reads_cache=False: "the hub (huggingface.co) cannot be reached from here")
    res = CliRunner().invoke(app, ["eval", str(model), "--tasks", "hellaswag"])
    assert res.exit_code == 2, res.output
    assert "loads its data set from the hub, and the hub (huggingface.co) cannot be reached" in res.output
