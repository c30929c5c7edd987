"""torchrun with 2 gloo processes gives the same result as 1 process (same seed, same global batch)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from test_cli import save_tiny

TOL = 1e-4  # max abs weight difference allowed: float reduction order differs across ranks


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("sharding,adapter", [("ddp", "continue"), ("fsdp", "continue"), ("fsdp", "fresh")])
def test_two_gloo_processes_match_one(tmp_path, tokenizer_dir, text_file, sharding, adapter):
    """Recovery continuing mask learning's adapter (the default) or a fresh adapter on the sliced model."""
    from safetensors.torch import load_file

    model = save_tiny("llama", tokenizer_dir, tmp_path / "m")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("maskprune:\n  steps: 6\n  batch_size: 4\n  bf16: false\n  checkpoint_every: 3\n"
                      f"recovery:\n  steps: 2\n  batch_size: 4\n  bf16: false\n  adapter: {adapter}\n")
    args = ["compress", str(model), "--data", str(text_file), "--eval-data", str(text_file),
            "--calib-tokens", "512", "--seq-len", "64", "--eval-tokens", "256", "--ratio", "0.5",
            "--ffn-multiple", "32", "--config", str(recipe)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPTOOL_QUIET": "1", "TMPDIR": str(tmp_path)}  # torchrun's torchelastic_* go with it
    one = subprocess.run([sys.executable, "-m", "mptool.cli", *args, "--out", str(tmp_path / "one")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", str(free_port()), "-m", "mptool.cli", *args,
                          "--sharding", sharding, "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    k1 = json.loads((tmp_path / "one" / "keeps.json").read_text())
    k2 = json.loads((tmp_path / "two" / "keeps.json").read_text())
    assert k1 == k2
    a = load_file(str(tmp_path / "one" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "model.safetensors"))
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= TOL, worst
    r1 = json.loads((tmp_path / "one" / "report.json").read_text())
    r2 = json.loads((tmp_path / "two" / "report.json").read_text())
    assert r1["maskprune"]["tokens"] == r2["maskprune"]["tokens"] == 6 * 4 * 64
    assert r1["recovery"]["adapter"] == r2["recovery"]["adapter"] == ("continued" if adapter == "continue" else "fresh")
    assert r1["recovery"]["tokens"] == r2["recovery"]["tokens"] == 2 * 4 * 64
    assert abs(r1["pruned"]["perplexity"]["ppl"] - r2["pruned"]["perplexity"]["ppl"]) <= 1e-3 * r1["pruned"]["perplexity"]["ppl"]
    # with several processes the dense (and before-recovery) perplexity is measured on the wrapped
    # model, each process a share of the windows: the same numbers as one process's whole model
    assert abs(r1["dense"]["perplexity"]["nll"] - r2["dense"]["perplexity"]["nll"]) <= 1e-5 * r1["dense"]["perplexity"]["nll"]
    assert r1["dense"]["perplexity"]["tokens"] == r2["dense"]["perplexity"]["tokens"]
    assert abs(r1["before_recovery"]["nll"] - r2["before_recovery"]["nll"]) <= 1e-3 * r1["before_recovery"]["nll"]
    # and the final one too, on the wrapped model before slicing or merging (the 1-process run
    # measures the written model: the pruned-perplexity check above compares the two)
    assert "measured_on" not in r1["pruned"]["perplexity"]
    assert "measured_on" in r2["pruned"]["perplexity"]
    # under FSDP rank 1 held a weightless skeleton and took its shards of rank 0's tensors: the
    # matching weights above are the proof that it got them
    assert "processes" not in r1
    assert r2["processes"]["count"] == 2 and r2["processes"]["sharding"] == sharding
    assert r2["processes"]["weights_loaded_by"] == ("rank 0" if sharding == "fsdp" else "every rank")
    # compensation ran (auto: the tiny model's Grams fit), from Grams shared out by layer
    assert r1["config"]["compensate"] is True, r1["config"]
    assert r2["processes"]["gram_matrices"] == "each rank its share of the layers"
    assert len(r2["processes"]["peak_rss_mb"]) == 2 and min(r2["processes"]["peak_rss_mb"]) > 0


def test_maskprune_shape_with_a_one_shot_selection_over_two_processes_matches_one(tmp_path, tokenizer_dir, text_file):
    """``select: flap`` (MaskPrune's learned shape, flap's units, compensation of the dense weights
    cut to them) under 2-process DDP: the Gram matrices split by layer during calibration and the
    final compensation solved on their owners, the same units and weights as one process."""
    from safetensors.torch import load_file

    model = save_tiny("llama", tokenizer_dir, tmp_path / "m")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("maskprune:\n  steps: 2\n  batch_size: 4\n  bf16: false\n  checkpoint_every: 0\n  select: flap\n"
                      "recovery:\n  steps: 1\n  batch_size: 4\n  bf16: false\n")
    args = ["compress", str(model), "--compensate", "--data", str(text_file), "--eval-data", str(text_file),
            "--calib-tokens", "512", "--seq-len", "64", "--eval-tokens", "256", "--ratio", "0.5",
            "--ffn-multiple", "32", "--config", str(recipe)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPTOOL_QUIET": "1", "TMPDIR": str(tmp_path)}
    one = subprocess.run([sys.executable, "-m", "mptool.cli", *args, "--out", str(tmp_path / "one")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", str(free_port()), "-m", "mptool.cli", *args, "--out", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert json.loads((tmp_path / "one" / "keeps.json").read_text()) == json.loads((tmp_path / "two" / "keeps.json").read_text())
    a, b = load_file(str(tmp_path / "one" / "model.safetensors")), load_file(str(tmp_path / "two" / "model.safetensors"))
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) <= TOL
    r2 = json.loads((tmp_path / "two" / "report.json").read_text())
    assert r2["processes"]["gram_matrices"] == "each rank its share of the layers"


@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_a_one_shot_method_with_a_kd_split_over_two_processes_matches_one(tmp_path, tokenizer_dir, text_file, sharding):
    """flap with the KD-chosen shape and compensation, then recovery, under 2 processes: with DDP
    every rank loads the weights, the Gram matrices are dealt out by layer and the candidates'
    and the final compensation solved on each layer's owner and handed out; with FSDP rank 0
    alone loads the weights, chooses the shape and cuts, and rank 1 takes its shards for
    recovery. Either way the same shape, units and weights as one process."""
    from safetensors.torch import load_file

    model = save_tiny("llama", tokenizer_dir, tmp_path / "m")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("recovery:\n  steps: 2\n  batch_size: 4\n  bf16: false\n")
    args = ["compress", str(model), "--method", "flap", "--split", "kd", "--compensate", "--data", str(text_file),
            "--eval-data", str(text_file), "--calib-tokens", "512", "--seq-len", "64", "--eval-tokens", "256",
            "--ratio", "0.5", "--ffn-multiple", "32", "--config", str(recipe)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPTOOL_QUIET": "1", "TMPDIR": str(tmp_path)}
    one = subprocess.run([sys.executable, "-m", "mptool.cli", *args, "--out", str(tmp_path / "one")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", str(free_port()), "-m", "mptool.cli", *args, "--sharding", sharding,
                          "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    r1, r2 = (json.loads((tmp_path / n / "report.json").read_text()) for n in ("one", "two"))
    assert r1["candidate_kd"] and r1["candidate_kd"].keys() == r2["candidate_kd"].keys()
    assert all(abs(r1["candidate_kd"][k] - r2["candidate_kd"][k]) <= 1e-3 for k in r1["candidate_kd"])
    assert json.loads((tmp_path / "one" / "keeps.json").read_text()) == json.loads((tmp_path / "two" / "keeps.json").read_text())
    a, b = load_file(str(tmp_path / "one" / "model.safetensors")), load_file(str(tmp_path / "two" / "model.safetensors"))
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) <= TOL
    if sharding == "ddp":  # rank 0 calibrated and dealt the Gram matrices out; each rank solved its layers for both
        assert r2["processes"]["weights_loaded_by"] == "every rank"
        assert r2["processes"]["gram_matrices"] == "each rank its share of the layers (rank 0 all of them while it calibrated)"
    else:  # rank 1 held a skeleton until recovery's FSDP wrap gave it its shards of rank 0's cut
        assert r2["processes"]["weights_loaded_by"] == "rank 0"
        assert r2["processes"]["gram_matrices"] == "rank 0 all layers"
    assert r1["recovery"]["tokens"] == r2["recovery"]["tokens"] > 0


def test_a_model_rank_0_cannot_load_stops_every_process(tmp_path, tokenizer_dir, text_file):
    """Under FSDP only rank 0 reads the weights; when they do not match the config, the other
    ranks (whose skeletons built fine from it) stop too, in seconds, instead of waiting at a
    collective, and rank 0's one-line error names the problem; nothing is written."""
    model = save_tiny("llama", tokenizer_dir, tmp_path / "m")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "intermediate_size": 2 * config["intermediate_size"]}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPTOOL_QUIET": "1", "TMPDIR": str(tmp_path)}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", str(free_port()), "-m", "mptool.cli", "compress", str(model),
                          "--data", str(text_file), "--eval-data", str(text_file), "--seq-len", "64",
                          "--max-steps", "2", "--sharding", "fsdp", "--out", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=300)
    said = " ".join((two.stdout + two.stderr).split())  # a narrow terminal wraps the lines
    assert two.returncode != 0, said[-3000:]
    assert "its weights do not match its config.json" in said, said[:3000]
    assert "another process of this run could not load the model" in said, said[:3000]
    assert not (tmp_path / "two").exists()


def test_resume_across_process_counts_and_sharding(tmp_path, tokenizer_dir):
    """Killed under 2-process FSDP and resumed in 1 process, or the reverse: the same result as a
    run that was never interrupted (checkpoints hold full tensors keyed by name)."""
    from safetensors.torch import load_file

    model = save_tiny("llama", tokenizer_dir, tmp_path / "m")
    worker = os.path.join(os.path.dirname(__file__), "dist_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}  # torchrun's torchelastic_* go with it

    def go(*args: str, procs: int = 1) -> None:
        launch = ([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs),
                   "--master-port", str(free_port())] if procs > 1 else [sys.executable])
        r = subprocess.run([*launch, worker, str(model), *args], env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]

    go(str(tmp_path / "c0"), "--out", str(tmp_path / "a.safetensors"))
    go(str(tmp_path / "c1"), "--stop-after", "3", "--sharding", "fsdp", procs=2)
    assert (tmp_path / "c1" / "optimizer.safetensors").is_file()
    go(str(tmp_path / "c1"), "--resume", "--out", str(tmp_path / "b.safetensors"))
    go(str(tmp_path / "c2"), "--stop-after", "3")
    go(str(tmp_path / "c2"), "--resume", "--sharding", "fsdp", "--out", str(tmp_path / "c.safetensors"), procs=2)
    a = load_file(str(tmp_path / "a.safetensors"))
    keeps = (tmp_path / "a.safetensors.json").read_text()
    for other in ("b", "c"):
        assert (tmp_path / f"{other}.safetensors.json").read_text() == keeps
        b = load_file(str(tmp_path / f"{other}.safetensors"))
        assert a.keys() == b.keys()
        worst = max((a[k] - b[k]).abs().max().item() for k in a)
        assert worst <= TOL, (other, worst)


def _union_worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from mptool import distributed as D

    dist.init_process_group("gloo", rank=rank, world_size=2, init_method=f"tcp://127.0.0.1:{port}")
    try:
        mask = torch.zeros(2, 4, dtype=torch.bool)
        mask[rank, rank] = True  # each rank found a different borderline channel
        torch.save(D.union(mask), os.path.join(out, f"{rank}.pt"))
        # the automatic compensation choice: on only where every rank found the memory
        agreed = [D.every(True), D.every(rank == 0), D.every(False)]
        # calibration results (scores, Gram matrices) are rank 0's on every rank, views included
        gram = torch.full((3, 4), float(rank), dtype=torch.float64)
        D.broadcast_(gram)
        D.broadcast_(gram.T[1:])  # a non-contiguous view is written back in place
        agreed.append(gram.eq(0).all().item())
        view = torch.full((3, 4), float(rank + 1))
        view[:, 0] = 7.0 + rank
        D.broadcast_(view.T[0])
        agreed.append(view[:, 0].tolist() == [7.0, 7.0, 7.0] and view[0, 1].item() == rank + 1)
        # rank 0's tensors, any shape and dtype, on ranks that know nothing of them beforehand
        mine = [torch.arange(6, dtype=torch.float64).reshape(2, 3), torch.tensor([True, False]),
                torch.ones(2, 2, 2, dtype=torch.bfloat16)] if rank == 0 else None
        got = D.from_rank0(mine)
        agreed.append([(t.dtype, tuple(t.shape)) for t in got] == [(torch.float64, (2, 3)), (torch.bool, (2,)),
                                                                    (torch.bfloat16, (2, 2, 2))]
                      and got[0].sum().item() == 15 and got[1].tolist() == [True, False])
        agreed.append(D.gather_floats(10.0 + rank) == [10.0, 11.0])
        with open(os.path.join(out, f"{rank}.every.json"), "w") as f:
            json.dump(agreed, f)
    finally:
        dist.destroy_process_group()


def test_ranks_agree_on_protected_channels_and_on_compensation(tmp_path):
    """The collectives compress relies on: a union over ranks, one decision for all (compensation
    only when every rank's host memory allows it), rank 0's values broadcast in place, rank 0's
    calibration results handed to ranks that know nothing of their shapes, and every rank's peak
    memory gathered for the report."""
    import torch.multiprocessing as mp

    mp.spawn(_union_worker, args=(free_port(), str(tmp_path)), nprocs=2)
    expected = torch.tensor([[True, False, False, False], [False, True, False, False]])
    for rank in (0, 1):
        assert torch.equal(torch.load(tmp_path / f"{rank}.pt", weights_only=True), expected)
        assert json.loads((tmp_path / f"{rank}.every.json").read_text()) == [True, False, False, True, True, True, True]


def _deal_worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from conftest import tiny_model

    from mptool import distributed as D
    from mptool.baselines import Scores, calibrate, select
    from mptool.compensate import compensate, grams_of
    from mptool.shapes import Target
    from mptool.surgery import materialize

    dist.init_process_group("gloo", rank=rank, world_size=2, init_method=f"tcp://127.0.0.1:{port}")
    try:
        model = tiny_model("llama", num_hidden_layers=3)  # the same weights on both ranks
        g = torch.Generator().manual_seed(3)
        scores = Scores(torch.rand(3, 4, 2, generator=g), torch.rand(3, 4, generator=g), torch.rand(3, 256, generator=g))
        keeps = select(scores, Target(3, 1, 96))
        result = {}
        grams = None
        if rank == 0:  # rank 0 alone calibrates, as compress does for a one-shot method
            blocks = torch.randint(0, 300, (4, 16), generator=torch.Generator().manual_seed(1))
            grams = grams_of(*calibrate(model, blocks, batch_size=2, gram=True))
            whole = materialize(model, keeps)
            compensate(model, keeps, *grams, into=whole)
            result["whole"] = {k: v.double().sum().item() for k, v in whole.state_dict().items()}
            result["plain"] = {k: v.double().sum().item() for k, v in materialize(model, keeps).state_dict().items()}
        sent = [None if grams is None else list(g) for g in (grams or (None, None))]
        dealt = [D.to_owners(lst) for lst in sent]
        # layer i's Grams on rank i % 2 only; rank 0 let go of those it sent
        result["held"] = [[t is not None for t in lst] for lst in dealt]
        result["rank0_left"] = None if rank else [[t is not None for t in lst] for lst in sent]
        pruned = materialize(model, keeps)
        compensate(model, keeps, *dealt, into=pruned, owner=D.owner)
        result["shared"] = {k: v.double().sum().item() for k, v in pruned.state_dict().items()}
        with open(os.path.join(out, f"{rank}.deal.json"), "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


def test_one_shot_grams_dealt_to_owners_compensate_as_one_process(tmp_path):
    """A one-shot method's Gram matrices, calibrated on rank 0, dealt out by layer
    (:func:`mptool.distributed.to_owners`) and solved by their owners: every rank ends with the
    weights one process computes from all of them, and none holds more than its share."""
    import torch.multiprocessing as mp

    mp.spawn(_deal_worker, args=(free_port(), str(tmp_path)), nprocs=2)
    r0, r1 = (json.loads((tmp_path / f"{r}.deal.json").read_text()) for r in (0, 1))
    assert r0["held"] == [[True, False, True]] * 2 and r1["held"] == [[False, True, False]] * 2
    assert r0["rank0_left"] == [[True, False, True]] * 2
    ref = r0["whole"]
    # compensation moved every o_proj and down_proj (3 layers), and nothing else
    moved = sorted(k for k in ref if abs(ref[k] - r0["plain"][k]) > 1e-6 * max(1.0, abs(ref[k])))
    assert moved == sorted(k for k in ref if "o_proj" in k or "down_proj" in k) and len(moved) == 6
    for shared in (r0["shared"], r1["shared"]):
        assert shared.keys() == ref.keys()
        assert all(abs(shared[k] - ref[k]) <= 1e-6 * max(1.0, abs(ref[k])) for k in ref)


def _rank0_worker(rank: int, port: int, folder: str, out: str) -> None:
    import torch.distributed as dist

    from mptool import distributed as D
    from mptool.baselines import calibrate, score
    from mptool.compensate import Compensator, grams_of
    from mptool.hooks import _projections
    from mptool.shapes import Dims
    from mptool.evaluate import PplProtocol, perplexity
    from mptool.families import get_adapter
    from mptool.models import load_model

    dist.init_process_group("gloo", rank=rank, world_size=2, init_method=f"tcp://127.0.0.1:{port}")
    try:
        model, _ = load_model(folder, weights=rank == 0)  # rank 1: a skeleton on the meta device
        result = {"skeleton": D.on_meta(model)}
        ids = torch.randint(0, 300, (70,), generator=torch.Generator().manual_seed(0))
        protocol = PplProtocol(window=16, stride=10, max_tokens=70, text="random")  # 7 overlapping windows
        blocks = torch.randint(0, 300, (9, 12), generator=torch.Generator().manual_seed(1))  # 5 batches of 2

        def summary(o_stats, d_stats) -> list[float]:
            flap = score(model, "flap", o_stats, d_stats)
            return [sorted({s.n for s in o_stats + d_stats}),
                    *(sum(getattr(s, k).sum().item() for s in o_stats + d_stats) for k in ("sum", "sumsq", "amax", "gram")),
                    flap.heads.sum().item(), flap.ffn.sum().item()]

        def deltas(grams, owner=None, seed=2) -> dict[str, float]:
            """Every compensation delta of one kept structure, from these Gram matrices."""
            d = Dims.from_config(model.config)
            g = torch.Generator().manual_seed(seed)
            heads = (torch.rand(d.num_layers, d.num_heads, generator=g) < 0.6).float()
            ffn = (torch.rand(d.num_layers, d.intermediate_size, generator=g) < 0.5).float()
            comp = Compensator(_projections(model), grams, d.head_dim, owner=owner, weight=lambda layer, j: (
                lambda w: w.full_tensor() if hasattr(w, "full_tensor") else w)(_projections(model)[layer][j].weight))
            comp.set(heads, ffn)
            comp.remove()
            return {f"{k[0]},{k[1]}": v[2].double().abs().sum().item() for k, v in comp.entries.items() if v[2] is not None}

        if rank == 0:
            result["whole"] = perplexity(model, ids, protocol)
            whole = calibrate(model, blocks, batch_size=2, gram=True)
            result["calibrated"] = summary(*whole)
            result["grams"] = [[s.gram.sum().item() for s in stats] for stats in whole]
            result["deltas"] = deltas(grams_of(*whole))
        D.fsdp_wrap(model, get_adapter(model.config).decoder_layers(model))
        result["sharded"] = perplexity(model, ids, protocol, split=True)
        result["calibrated_split"] = summary(*calibrate(model, blocks, batch_size=2, gram=True, split=True))
        # each layer's Gram matrices summed onto its owner only, batch by batch; the solves of
        # compensation run there and every rank gets every delta
        shared = calibrate(model, blocks, batch_size=2, gram=True, split=True, share_grams=True)
        result["shared_grams"] = [[None if s.gram is None else s.gram.sum().item() for s in stats] for stats in shared]
        result["shared_n"] = sorted({s.n for s in shared[0] + shared[1]})
        result["shared_deltas"] = deltas(grams_of(*shared), owner=D.owner)
        try:  # ranks asked for different kept units: an error on both, not a hang at a collective
            deltas(grams_of(*shared), owner=D.owner, seed=10 + rank)
            result["mismatch"] = None
        except RuntimeError as e:
            result["mismatch"] = str(e)
        result["rope"] = [b.sum().item() for _, b in sorted(model.named_buffers())]
        result["rng"] = torch.get_rng_state().sum().item()
        with open(os.path.join(out, f"{rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_rank0_weights_reach_skeletons_and_evaluation_splits_over_ranks(tmp_path, tokenizer_dir, family):
    """Rank 1 builds the model from its config on the meta device; FSDP shards the skeletons and
    fills them from rank 0 (weights, rotary buffers, RNG state): the sharded model, evaluated with
    the windows split over both ranks (an odd count, so one rank repeats one unscored), gives the
    perplexity of rank 0's whole model, and calibrated with the blocks split over both ranks, its
    statistics and scores."""
    import torch.multiprocessing as mp

    folder = save_tiny(family, tokenizer_dir, tmp_path / "m", num_hidden_layers=3)  # dealt 2 / 1 to the ranks
    mp.spawn(_rank0_worker, args=(free_port(), str(folder), str(tmp_path)), nprocs=2)
    r0, r1 = (json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1))
    assert (r0["skeleton"], r1["skeleton"]) == (False, True)
    assert r0["whole"]["tokens"] == r0["sharded"]["tokens"] == r1["sharded"]["tokens"] == 69
    assert abs(r0["sharded"]["nll"] - r0["whole"]["nll"]) <= 1e-6 * r0["whole"]["nll"]
    assert r1["sharded"]["nll"] == r0["sharded"]["nll"]
    assert r1["rope"] == r0["rope"] and r1["rng"] == r0["rng"]
    # calibration on the sharded model, 3 batches on rank 0 and 2 on rank 1 (which runs one more,
    # unrecorded), statistics summed over ranks: those of one process over all 9 blocks, and the
    # scores made with the gathered weights too
    for got in (r0["calibrated_split"], r1["calibrated_split"]):
        assert got[0] == r0["calibrated"][0] == [9 * 12]  # every projection saw every token once
        for a, b in zip(got[1:], r0["calibrated"][1:]):
            assert abs(a - b) <= 1e-9 * max(1.0, abs(b)), (got, r0["calibrated"])
    # shared Gram matrices: rank r holds those of layers r, r + 2, ... only, each equal to one
    # process's over all blocks (the other statistics still summed everywhere)
    for r, got in enumerate((r0, r1)):
        assert got["shared_n"] == [9 * 12]
        for held, whole in zip(got["shared_grams"], r0["grams"]):
            assert [g is not None for g in held] == [layer % 2 == r for layer in range(3)]
            for g, w in zip(held, whole):
                assert g is None or abs(g - w) <= 1e-9 * abs(w)
    # and the deltas each rank ends with, solved on the owners and broadcast, are those of one
    # process holding every Gram
    assert all("disagree on the kept units" in (r["mismatch"] or "") for r in (r0, r1)), (r0["mismatch"], r1["mismatch"])
    assert r0["deltas"] and r0["shared_deltas"].keys() == r1["shared_deltas"].keys() == r0["deltas"].keys()
    for key, want in r0["deltas"].items():
        assert r0["shared_deltas"][key] == r1["shared_deltas"][key]
        assert abs(r0["shared_deltas"][key] - want) <= 1e-5 * want, (key, r0["shared_deltas"][key], want)
