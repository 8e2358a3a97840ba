"""The engine on CUDA: same greedy tokens as on CPU (float32), bf16 runs end to end."""
from __future__ import annotations

import pytest
import torch

from lmstack.infer import LLM, SamplingParams
from tests.infer.conftest import tiny_model

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_cuda_greedy_matches_cpu():
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6], [7] * 30, list(range(40, 53))]
    sp = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    cpu = LLM(tiny_model(1), block_size=4, kv_cache_tokens=512, device="cpu").generate(prompts, sp)
    gpu_llm = LLM(tiny_model(1), block_size=4, kv_cache_tokens=512, device="cuda", max_num_batched_tokens=16)
    gpu = gpu_llm.generate(prompts, sp)
    assert [o.outputs[0].token_ids for o in gpu] == [o.outputs[0].token_ids for o in cpu]
    seeded = SamplingParams(max_tokens=16, temperature=1.0, seed=0, n=2)
    a = gpu_llm.generate(prompts, seeded)
    b = gpu_llm.generate(prompts, seeded)
    assert [c.token_ids for o in a for c in o.outputs] == [c.token_ids for o in b for c in o.outputs]
    gpu_llm.engine.block_manager.check_no_leaks()


def test_cuda_bf16_and_speculative_runs():
    llm = LLM(tiny_model(1), block_size=16, device="cuda", dtype="bfloat16",
              speculative={"method": "ngram", "num_speculative_tokens": 4})
    outs = llm.generate([[1, 2, 3, 1, 2, 3, 1, 2]] * 4, SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))
    assert all(len(o.outputs[0].token_ids) == 32 for o in outs)
    assert llm.stats()["spec_proposed_tokens"] > 0
