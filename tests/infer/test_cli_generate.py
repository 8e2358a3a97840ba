"""`LLM(run_dir)` with a real tokenizer, and `lmstack generate` end to end on a toy run dir."""
from __future__ import annotations

import pytest

from lmstack.cli.main import main
from lmstack.infer import LLM, SamplingParams
from lmstack.tokenizer import Tokenizer
from tests.infer.conftest import tiny_model

TEXT = "the cat sat on the mat. the dog sat on the log. héllo wörld 🙂 " * 20


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    tok = Tokenizer.train(TEXT, vocab_size=300)
    model = tiny_model(4, vocab_size=tok.n_vocab, context_length=64)
    model.save_pretrained(d)
    tok.save(d / "tokenizer.json")
    return d


def test_llm_loads_run_dir_and_detokenizes(run_dir):
    llm = LLM(str(run_dir), block_size=8)
    out = llm.generate("the cat", SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0]
    comp = out.outputs[0]
    assert out.prompt == "the cat" and out.prompt_token_ids == llm.tokenizer.encode("the cat")
    assert comp.text == llm.tokenizer.decode(comp.token_ids)   # incremental == one-shot decode
    assert llm.engine.eos_token_id == llm.tokenizer.eot_token


def test_cli_generate_streams_same_text(run_dir, capsys):
    llm = LLM(str(run_dir), block_size=8)
    want = llm.generate("the dog", SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0].outputs[0].text
    rc = main(["generate", str(run_dir), "the dog", "--temperature", "0", "--max-tokens", "12",
               "--ignore-eos", "true", "--stats", "true"])
    captured = capsys.readouterr()
    assert rc == 0 and captured.out == want + "\n"
    assert "ttft=" in captured.err and "tokens/s=" in captured.err
    rc = main(["generate", str(run_dir), "the dog", "--temperature", "0", "--max-tokens", "12",
               "--ignore-eos", "true", "--speculative", "ngram"])
    assert rc == 0 and capsys.readouterr().out == want + "\n"


def test_cli_generate_errors(run_dir, tmp_path, capsys):
    assert main(["generate", str(tmp_path / "nope"), "hi"]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert main(["generate", str(run_dir), "hi", "--top-p", "2"]) == 1
    assert "top_p" in capsys.readouterr().err


STATS = {"spec_method": "ngram", "spec_num_speculative_tokens": 4, "spec_adaptive": False, "spec_backoff": True,
         "spec_proposed_tokens": 20, "spec_accepted_tokens": 1, "spec_acceptance_rate": 0.05}


def test_speculation_report_against_plain_steps():
    from lmstack.cli.generate import speculation_report
    # 5 plain steps of 10 ms (100 tok/s); 5 verify steps of 30 ms giving 6 tokens:
    # (6 + 5) tokens / 0.2 s = 55 tok/s = 0.55x
    line, warning = speculation_report(STATS, [0.01] * 5, [0.03] * 5, 6)
    assert line.startswith("speculative ngram (k=4, adaptive lookahead off, back-off on): 1 of 20 drafted tokens "
                           "accepted (5%), 1.20 tokens per verify step; 0.55x the speed of plain decoding")
    assert warning.startswith("warning: speculation cost more than it saved")
    # verify steps of 12 ms giving 15 tokens: (15 + 5) / 0.11 s = 181.8 tok/s = 1.82x, no warning
    (line,) = speculation_report(STATS, [0.01] * 5, [0.012] * 5, 15)
    assert "1.82x the speed of plain decoding" in line
    # no plain step to compare with: 1.2 tokens per verify step is flagged
    line, warning = speculation_report({**STATS, "spec_backoff": False}, [], [0.03] * 5, 6)
    assert "back-off off" in line and "add --speculative-backoff true" in warning
    assert speculation_report(STATS, [], [0.03] * 5, 10) == [speculation_report(STATS, [], [0.03] * 5, 10)[0]]


def test_step_meter_accounts_for_every_decoded_token(run_dir):
    from lmstack.cli.generate import StepMeter
    llm = LLM(str(run_dir), block_size=8, max_num_seqs=1,
              speculative={"method": "ngram", "num_speculative_tokens": 4, "backoff": True})
    engine = llm.engine
    engine.add_request("the cat sat", SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    meter = StepMeter(engine)
    while engine.has_unfinished_requests():
        engine.step()
        meter.after_step()
    # the first token comes with the prefill; every other one from a plain or a verify step
    assert meter.spec_tokens + len(meter.plain) == 40 - 1
    assert len(meter.spec) == engine.speculator.steps


def test_cli_generate_reports_speculation(run_dir, capsys):
    args = ["generate", str(run_dir), "héllo", "--temperature", "0", "--max-tokens", "16", "--ignore-eos", "true",
            "--speculative", "ngram"]
    assert main(args) == 0
    assert "speculative ngram (k=4, adaptive lookahead off, back-off off): " in capsys.readouterr().err
    assert main(args + ["--speculative-backoff", "true"]) == 0
    assert "back-off on)" in capsys.readouterr().err
