"""Bad input gets a clear error naming the record, the function or the model; a NaN in
training stops the run with the last good checkpoint intact (the Trainer's guarantee)."""
import json
import math

import pytest
import torch

from tests.align.conftest import tiny_model
from tests.align.toy import yes_no_pairs
from lmstack.align import AlignDataError, DPOObjective, PairBatches, reference_logps, tokenize_pairs
from lmstack.align.data import read_preference_jsonl
from lmstack.cli.main import main
from lmstack.train import NonFiniteLossError, TrainConfig, Trainer
from lmstack.train import checkpoint as ckpt


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("fmt", ["plain", "chat"])
def test_missing_fields_and_identical_answers_name_the_line(tok, tmp_path, fmt):
    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a?", "chosen": "yes", "rejected": "no"},
                                           {"prompt": "b?", "chosen": "yes"}])
    with pytest.raises(AlignDataError, match=r"p\.jsonl:2: .*missing \['rejected'\]"):
        tokenize_pairs(tok, read_preference_jsonl(f), fmt)
    f = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "a?", "chosen": "yes", "rejected": "no"},
                                           {"prompt": "b?", "chosen": "same", "rejected": "same"}])
    with pytest.raises(AlignDataError, match=r"q\.jsonl:2: chosen and rejected are the same"):
        tokenize_pairs(tok, read_preference_jsonl(f), fmt)


def test_tinyworld_response_is_accepted_as_chosen(tok):
    pairs = tokenize_pairs(tok, [{"prompt": "Q: what is 2+3?\nA: 2+3=", "response": "5", "rejected": "6"}], "plain")
    assert tok.decode(pairs[0].chosen.ids[pairs[0].prompt_len:]) == "5"


def test_pair_longer_than_the_context_is_named(tok):
    recs = yes_no_pairs(2, 0) + [{"prompt": "Q: " + "cat " * 100, "chosen": "a", "rejected": "b"}]
    with pytest.raises(AlignDataError, match=r"pair #2: prompt \+ chosen is \d+ tokens, longer than the model's "
                                             r"context \(96\)"):
        tokenize_pairs(tok, recs, "plain", max_len=96)


def test_reward_model_with_another_tokenizer_is_refused(run_dir, tmp_path, capsys):
    from lmstack.tokenizer import Tokenizer
    common = ["--format", "plain", "--max-steps", "1", "--n-train", "16", "--n-eval", "8", "--batch-size", "4"]
    assert main(["align", "rm", str(run_dir), "--out", str(tmp_path / "rm")] + common) == 0
    Tokenizer.train(["other text entirely"] * 3, vocab_size=300, show_progress=False).save(
        tmp_path / "rm" / "tokenizer.json")
    capsys.readouterr()
    rc = main(["align", "ppo", str(run_dir), "--out", str(tmp_path / "ppo"), "--reward-model",
               str(tmp_path / "rm")] + common)
    assert rc == 1 and "was trained with another tokenizer" in capsys.readouterr().err


def test_bad_reward_spec_and_chat_format_without_chat_tokens(run_dir, tmp_path, capsys):
    rc = main(["align", "grpo", str(run_dir), "--out", str(tmp_path / "g"), "--format", "plain", "--rewards",
               "nosuchmod:fn"])
    assert rc == 1 and "cannot load reward function 'nosuchmod:fn'" in capsys.readouterr().err


class NaNAfter(DPOObjective):
    """DPO whose loss turns NaN from the n-th call on (a diverging run)."""

    def __init__(self, n):
        super().__init__(0.1)
        self.n, self.calls = n, 0

    def loss(self, model, batch):
        self.calls += 1
        loss, m = super().loss(model, batch)
        return (loss * math.nan if self.calls >= self.n else loss), m


def test_nan_stops_with_the_last_good_checkpoint_intact(tok, tmp_path):
    model = tiny_model(0)
    pairs = tokenize_pairs(tok, yes_no_pairs(32, 1), "plain", 96)
    ref = reference_logps(model, pairs)
    cfg = TrainConfig(out=str(tmp_path / "run"), max_steps=10, batch_size=8, seq_len=96, lr=1e-3, warmup_steps=0,
                      eval_every=0, ckpt_every=2, tensorboard=False, device="cpu")
    with pytest.raises(NonFiniteLossError, match=r"loss=nan at step 3.*step_0000002"):
        Trainer(cfg, model, NaNAfter(3), PairBatches(pairs, 8, extras=ref)).fit()
    last = ckpt.latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert last.name == "step_0000002"
    weights, _, _ = ckpt.load_checkpoint(last)
    assert all(torch.isfinite(w).all() for w in weights.values())
    resumed = Trainer(TrainConfig(**{**cfg.__dict__, "resume": True, "max_steps": 4}), tiny_model(0),
                      DPOObjective(0.1), PairBatches(pairs, 8, extras=ref)).fit()
    assert resumed["resumed_from"] == 2 and resumed["steps"] == 4
