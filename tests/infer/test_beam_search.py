"""Beam search matches `transformers` generate(num_beams=...) beam for beam.

The algorithm (`beam_search_ids`) is checked against HF on a tiny random Llama whose
next-token log-probabilities are the step function, so no engine is needed; the
`LLM.beam_search` wrapper is checked the same way through the engine when it exists.
"""
import pytest
import torch

from lmstack.infer.beam_search import beam_search_ids

transformers = pytest.importorskip("transformers")

VOCAB = 48


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   bos_token_id=None, eos_token_id=None, pad_token_id=None)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():   # sharper distributions than the default init so beams really diverge
        model.lm_head.weight.mul_(20.0)
    return model


def hf_step_fn(model, k):
    @torch.no_grad()
    def step(queries):
        assert len({len(q) for q in queries}) == 1          # one prompt per call: equal lengths, no padding
        top = model(torch.tensor(queries)).logits[:, -1].float().log_softmax(-1).topk(k)
        return [dict(zip(i, v)) for i, v in zip(top.indices.tolist(), top.values.tolist())]
    return step


def hf_beams(model, prompt, W, max_tokens, length_penalty, early_stopping, eos):
    gen = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         num_beams=W, num_return_sequences=W, do_sample=False, max_new_tokens=max_tokens,
                         length_penalty=length_penalty, early_stopping=early_stopping, eos_token_id=eos,
                         pad_token_id=eos if eos is not None else 0, output_scores=True,
                         return_dict_in_generate=True)
    return gen.sequences.tolist(), gen.sequences_scores.tolist()


def pick_eos(model, prompt):
    """The greedy continuation's 3rd token, so some beams end early (and others do not)."""
    with torch.no_grad():
        ids = list(prompt)
        for _ in range(3):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
        return ids[-1]


@pytest.mark.parametrize("length_penalty,early_stopping,use_eos", [
    (1.0, False, True), (1.0, True, True), (0.0, "never", True), (2.0, "never", True),
    (-1.0, False, True), (1.0, False, False),
])
def test_beam_search_matches_transformers(hf_model, length_penalty, early_stopping, use_eos):
    W, max_tokens = 3, 7
    for prompt in ([5, 9, 2, 33], [1, 17]):
        eos = pick_eos(hf_model, prompt) if use_eos else None
        ours = beam_search_ids(hf_step_fn(hf_model, 2 * W), [prompt], beam_width=W, max_tokens=max_tokens,
                               length_penalty=length_penalty, early_stopping=early_stopping,
                               eos_token_id=eos)[0].sequences
        ref_seqs, ref_scores = hf_beams(hf_model, prompt, W, max_tokens, length_penalty, early_stopping, eos)
        assert len(ours) == W
        for seq, ref, ref_score in zip(ours, ref_seqs, ref_scores):
            # HF pads shorter (EOS-ended) beams with the pad id after the end
            assert ref[:len(seq.tokens)] == seq.tokens, (seq.tokens, ref)
            assert seq.tokens[:len(prompt)] == prompt and seq.num_prompt_tokens == len(prompt)
            assert abs(seq.score - ref_score) < 1e-4
            n = len(seq.token_ids)
            assert abs(seq.score - seq.cum_logprob / n ** length_penalty) < 1e-9
            if use_eos and seq.token_ids[-1] == eos:
                assert seq.finish_reason == "stop"
            else:
                assert seq.finish_reason == "length" and n == max_tokens
        assert [s.score for s in ours] == sorted((s.score for s in ours), reverse=True)


def test_eos_path_is_exercised(hf_model):
    # guard against a vacuous parity test: with the chosen EOS, some returned beam ends early
    reasons = set()
    for prompt in ([5, 9, 2, 33], [1, 17]):
        out = beam_search_ids(hf_step_fn(hf_model, 6), [prompt], beam_width=3, max_tokens=7,
                              eos_token_id=pick_eos(hf_model, prompt))[0]
        reasons |= {s.finish_reason for s in out.sequences}
    assert reasons == {"stop", "length"}


def test_fake_scorer_hand_checked():
    # A 3-token "model": after any sequence, log-probs depend only on the last token.
    table = {0: {0: -0.1, 1: -2.5, 2: -3.0}, 1: {0: -3.0, 1: -0.2, 2: -2.0}, 2: {0: -0.5, 1: -1.0, 2: -3.0}}

    def step(queries):
        return [dict(table[q[-1]]) for q in queries]

    out = beam_search_ids(step, [[2]], beam_width=2, max_tokens=2, length_penalty=0.0)[0].sequences
    # step 1 from [2]: 0 (-0.5), 1 (-1.0); step 2: [0,0] -0.6, [1,1] -1.2, [0,1] -3.0 ...
    assert [s.token_ids for s in out] == [[0, 0], [1, 1]]
    assert [round(s.cum_logprob, 6) for s in out] == [-0.6, -1.2]
    with pytest.raises(ValueError, match="beam_width"):
        beam_search_ids(step, [[2]], beam_width=11)


def _table_step(table):
    return lambda queries: [dict(table[q[-1]]) for q in queries]


def test_only_top_w_candidates_may_finish():
    # W=1. Step 1 from [2]: 0 (-0.5) is best, EOS=1 (-1.0) is 2nd: outside the top W, so it is
    # NOT a finished hypothesis even though it would beat the final beam [0, 0] (-3.5).
    table = {0: {0: -3.0, 1: -3.5, 2: -4.0}, 1: {0: -1.0, 1: -1.0, 2: -1.0}, 2: {0: -0.5, 1: -1.0, 2: -3.0}}
    out = beam_search_ids(_table_step(table), [[2]], beam_width=1, max_tokens=2, length_penalty=0.0,
                          eos_token_id=1)[0].sequences
    assert [s.token_ids for s in out] == [[0, 0]] and out[0].finish_reason == "length"
    assert abs(out[0].cum_logprob + 3.5) < 1e-9


def test_early_stopping_modes_hand_checked():
    # W=1, length_penalty=1. Step 1: EOS [1] finishes first (cum -0.3, score -0.3); the live beam
    # [0] has cum -0.5. True stops now (W hypotheses done). False estimates the live beam at the
    # current length, -0.5 / 1 < -0.3, and stops. "never" estimates it at max_tokens=3,
    # -0.5 / 3 > -0.3, so it continues: [0, 0, 0] ends with cum -0.6, score -0.2 > -0.3.
    table = {0: {0: -0.05, 1: -3.0, 2: -4.0}, 1: {0: -1.0, 1: -1.0, 2: -1.0}, 2: {1: -0.3, 0: -0.5, 2: -3.0}}
    run = lambda es: beam_search_ids(_table_step(table), [[2]], beam_width=1, max_tokens=3,  # noqa: E731
                                     length_penalty=1.0, early_stopping=es, eos_token_id=1)[0].sequences
    assert [s.token_ids for s in run(True)] == [[1]] and run(True)[0].finish_reason == "stop"
    assert [s.token_ids for s in run(False)] == [[1]]
    never = run("never")
    assert [s.token_ids for s in never] == [[0, 0, 0]] and abs(never[0].score + 0.2) < 1e-9
    # ignore_eos: EOS is an ordinary token
    out = beam_search_ids(_table_step(table), [[2]], beam_width=1, max_tokens=3, eos_token_id=1,
                          ignore_eos=True)[0].sequences
    assert out[0].token_ids == [1, 0, 0] and out[0].finish_reason == "length"


def test_llm_beam_search_matches_transformers(hf_model, tmp_path):
    """The engine-backed wrapper: LLM.beam_search on the imported HF model equals HF's beams."""
    import json

    infer = pytest.importorskip("lmstack.infer")
    prompt = [5, 9, 2, 33]
    eos = pick_eos(hf_model, prompt)
    hf_model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["eos_token_id"] = eos                            # the engine stops beams on the model's EOS
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    llm = infer.LLM(str(tmp_path), device="cpu", dtype=torch.float32)
    W, max_tokens = 2, 6
    out = llm.beam_search([prompt], beam_width=W, max_tokens=max_tokens)[0].sequences
    ref_seqs, ref_scores = hf_beams(hf_model, prompt, W, max_tokens, 1.0, False, eos)
    assert len(out) == W
    for seq, ref, ref_score in zip(out, ref_seqs, ref_scores):
        assert ref[:len(seq.tokens)] == seq.tokens
        assert abs(seq.score - ref_score) < 1e-4
    assert {s.finish_reason for s in out} == {"stop", "length"}
