"""Load a model folder with ``vllm.LLM`` and write its greedy tokens as JSON.

Run as a script, in its own process (vLLM owns the process: thread binding, workers, shared
memory), by :mod:`mptool.exporters.vllm`; it imports vLLM and the standard library only, never
mptool, so it also shows that the export loads with vLLM alone::

    python vllm_check.py JOB.json RESULT.json

``JOB.json``: ``{"model", "dtype", "tp", "prompts": [[ids]], "new_tokens", "max_model_len",
"seed"}``. ``RESULT.json``: ``{"tokens": [[ids]], "import_s", "startup_s", "generate_s",
"vllm_version"}`` or ``{"error": "Type: message"}``. Greedy with EOS suppressed for
``new_tokens`` steps (``min_tokens``), prompts given as token ids.
"""

import json
import os
import sys
import time

# Python puts this script's folder first on sys.path, and it holds mptool's own vllm.py: drop it
# so that `import vllm` is the engine.
_HERE = os.path.dirname(os.path.realpath(__file__))
sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) != _HERE]


def main(job_path: str, result_path: str) -> int:
    with open(job_path) as f:
        job = json.load(f)
    started = time.perf_counter()
    try:
        import vllm
        from vllm import LLM, SamplingParams

        imported = time.perf_counter()
        llm = LLM(
            model=job["model"],
            dtype=job["dtype"],
            tensor_parallel_size=job["tp"],
            # one process per rank is only needed with tensor parallelism; in-process start-up
            # is ~3 s instead of ~25 s on CPU
            distributed_executor_backend="uni" if job["tp"] == 1 else "mp",
            enforce_eager=True,
            max_model_len=job["max_model_len"],
            max_num_seqs=max(1, len(job["prompts"])),
            seed=job["seed"],
            disable_log_stats=True,
        )
        loaded = time.perf_counter()
        params = SamplingParams(temperature=0.0, max_tokens=job["new_tokens"], min_tokens=job["new_tokens"],
                                logprobs=1)
        outputs = llm.generate([{"prompt_token_ids": p} for p in job["prompts"]], params, use_tqdm=False)
        completions = [o.outputs[0] for o in outputs]
        result = {
            "tokens": [list(c.token_ids) for c in completions],
            # raw log-probabilities (before the min_tokens EOS mask) of the chosen tokens
            "logprobs": [[step[t].logprob for t, step in zip(c.token_ids, c.logprobs)] for c in completions],
            "import_s": round(imported - started, 2),
            "startup_s": round(loaded - imported, 2),
            "generate_s": round(time.perf_counter() - loaded, 2),
            "vllm_version": vllm.__version__,
        }
    except Exception as e:  # reported to the parent, which turns it into one line
        lines = [ln for ln in str(e).splitlines() if ln.strip()]
        with open(result_path, "w") as f:
            json.dump({"error": f"{type(e).__name__}: {lines[0] if lines else ''}"}, f)
        raise
    with open(result_path, "w") as f:
        json.dump(result, f)
    if job["tp"] == 1:
        # Everything ran in this process (no workers to stop) and the result is on disk: skip
        # vLLM's interpreter-exit teardown, which takes ~5 s on a busy CPU.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
