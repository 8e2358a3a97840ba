"""SamplingParams: vLLM defaults, normalization, and one clear ValueError per bad field."""
import dataclasses

import pytest

from lmstack.infer.sampling_params import SamplingParams


def test_defaults_match_vllm():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1.0, 1.0, 0, 0.0)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert p.max_tokens == 16 and p.min_tokens == 0 and p.logprobs is None and p.seed is None
    assert p.stop == [] and p.stop_token_ids == [] and not p.ignore_eos and p.skip_special_tokens
    assert not p.greedy and not p.needs_penalties and not p.top_k_enabled


def test_normalization_and_derived():
    p = SamplingParams(stop="\n", stop_token_ids=(3, 4), temperature=0.0, top_k=-1)
    assert p.stop == ["\n"] and p.stop_token_ids == [3, 4]
    assert p.greedy and not p.top_k_enabled
    assert SamplingParams(stop=["a", "b"]).stop == ["a", "b"]
    assert SamplingParams(repetition_penalty=1.1).needs_penalties
    assert SamplingParams(max_tokens=None).max_tokens is None
    # dataclasses.replace re-validates
    with pytest.raises(ValueError, match="top_p"):
        dataclasses.replace(p, top_p=0.0)


@pytest.mark.parametrize("field,value,words", [
    ("n", 0, ">= 1"),
    ("temperature", -0.1, ">= 0"),
    ("temperature", float("nan"), ">= 0"),
    ("top_p", 0.0, "(0, 1]"),
    ("top_p", 1.5, "(0, 1]"),
    ("top_k", -2, ">= 1"),
    ("top_k", 2.5, "integer"),
    ("min_p", 1.1, "[0, 1]"),
    ("presence_penalty", 2.5, "[-2, 2]"),
    ("frequency_penalty", -3, "[-2, 2]"),
    ("repetition_penalty", 0.0, "> 0"),
    ("max_tokens", 0, ">= 1"),
    ("min_tokens", -1, ">= 0"),
    ("logprobs", 21, "[0, 20]"),
    ("logprobs", -1, "[0, 20]"),
    ("stop", 5, "string"),
    ("stop", [""], "non-empty"),
    ("stop_token_ids", [-1], ">= 0"),
    ("seed", "x", "integer"),
    ("temperature", True, "number"),
])
def test_invalid_values_name_field_value_and_range(field, value, words):
    with pytest.raises(ValueError) as e:
        SamplingParams(**{field: value})
    msg = str(e.value)
    assert f"SamplingParams.{field}" in msg and words in msg
    if field not in ("stop_token_ids", "stop"):
        assert repr(value) in msg or str(value) in msg


def test_min_tokens_must_not_exceed_max_tokens():
    with pytest.raises(ValueError, match=r"min_tokens must be <= max_tokens=4, got 5"):
        SamplingParams(max_tokens=4, min_tokens=5)
    assert SamplingParams(max_tokens=None, min_tokens=100).min_tokens == 100
