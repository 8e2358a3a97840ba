"""`lmstack align rm|dpo|grpo|ppo RUN --out ...` end to end on a tiny model: every command writes
the run (metrics, model, summary with held-out numbers before/after, samples, figures)."""
import json

import pytest

from lmstack.cli.main import main

COMMON = ["--format", "plain", "--max-steps", "3", "--n-train", "32", "--n-eval", "8", "--eval-every", "2",
          "--batch-size", "4", "--lr", "1e-3", "--max-completion-len", "4", "--n-samples", "2"]


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_every_command_end_to_end(run_dir, tmp_path, capsys):
    runs = {"rm": [], "dpo": ["--tasks", "arithmetic,instruction"],
            "grpo": ["--group-size", "4", "--prompts-per-rollout", "2", "--rewards", "exact_answer,integer_format",
                     "--loss-type", "dr_grpo"],
            "ppo": ["--reward-model", str(tmp_path / "rm"), "--prompts-per-rollout", "8", "--ppo-epochs", "2"]}
    for method, extra in runs.items():
        out = tmp_path / method
        assert main(["align", method, str(run_dir), "--out", str(out)] + COMMON + extra) == 0, method
        summary = json.loads((out / "summary.json").read_text())
        assert summary["method"] == method and summary["before"] and summary["after"]
        assert summary["train"]["steps"] == 3
        rows = read(out / "metrics.jsonl")
        assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3]
        assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
        assert summary["figures"] and all(p.endswith(".png") for p in summary["figures"])
        if method != "rm":
            samples = json.loads((out / "samples.json").read_text())
            assert len(samples) == 2 and {"prompt", "before", "after"} <= set(samples[0])
    grpo = read(tmp_path / "grpo" / "metrics.jsonl")
    first = lambda rows: next(r for r in rows if r["split"] == "train")               # noqa: E731
    assert {"reward", "reward_exact_answer", "reward_integer_format", "kl", "clip_frac", "completion_len"} <= \
        set(first(grpo))
    assert [r["step"] for r in grpo if r["split"] == "sample"] == [0, 2]               # held-out exact match
    ppo = read(tmp_path / "ppo" / "metrics.jsonl")
    assert {"score", "kl", "kl_coef", "value_loss", "policy_loss"} <= set(first(ppo))
    dpo = read(tmp_path / "dpo" / "metrics.jsonl")
    assert [r["step"] for r in dpo if r["split"] == "val"] == [0, 2, 3]                # step 0: the start model
    from lmstack.infer import LLM, SamplingParams
    out = LLM(str(tmp_path / "grpo")).generate(["Q: what is 2+3?\nA: 2+3="], SamplingParams(max_tokens=3))
    assert out[0].outputs[0].token_ids                                              # the engine loads the result


def test_recipe_and_unknown_flags(run_dir, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("format: plain\nmax_steps: 1\nn_train: 16\nn_eval: 8\nbatch_size: 4\nbeta: 0.2\n")
    assert main(["align", "dpo", str(run_dir), "--out", str(tmp_path / "d"), "--recipe", str(recipe)]) == 0
    summary = json.loads((tmp_path / "d" / "summary.json").read_text())
    assert summary["config"]["beta"] == 0.2
    start = read(tmp_path / "d" / "metrics.jsonl")[0]             # the starting model's held-out line, step 0
    assert start == {"step": 0, "split": "val", **summary["before"]}
    assert (tmp_path / "d" / "tokenizer.json").read_bytes() == (run_dir / "tokenizer.json").read_bytes()
    with pytest.raises(SystemExit):
        main(["align", "dpo", str(run_dir), "--out", str(tmp_path / "x"), "--bta", "0.1"])
    assert "--beta" in capsys.readouterr().err
    assert main(["align", "ppo", str(run_dir), "--out", str(tmp_path / "p")]) == 1          # no --reward-model
    assert "reward_model" in capsys.readouterr().err


def test_shipped_recipes_are_valid():
    from pathlib import Path

    import yaml

    from lmstack.align.config import AlignConfig
    from lmstack.cli.options import from_dict
    recipes = sorted((Path(__file__).resolve().parents[2] / "recipes" / "align").glob("*.yaml"))
    assert {p.stem for p in recipes} == {"rm", "dpo", "ppo", "grpo", "grpo-cot"}
    for p in recipes:
        data = yaml.safe_load(p.read_text())
        method = p.stem.split("-")[0]                       # grpo-cot.yaml: a grpo recipe
        extra = {"reward_model": "runs/rm"} if method == "ppo" else {}
        cfg = from_dict(AlignConfig, {"method": method, "model": "runs/x", **data, **extra})
        assert cfg.method == method


def test_chat_format_runs_stop_at_the_end_of_turn(run_dir, tmp_path):
    """An SFT-style model: prompts through the chat template, completions end at <|end|>."""
    common = ["--format", "chat", "--max-steps", "2", "--n-train", "16", "--n-eval", "8", "--batch-size", "4",
              "--max-completion-len", "4"]
    assert main(["align", "dpo", str(run_dir), "--out", str(tmp_path / "d")] + common) == 0
    assert main(["align", "grpo", str(run_dir), "--out", str(tmp_path / "g"), "--group-size", "2",
                 "--prompts-per-rollout", "2"] + common) == 0
    from lmstack.align.runner import _stops, load_policy
    _, tok, _ = load_policy(str(run_dir))
    assert _stops(tok, "chat")["stop_token_ids"][0] == tok.special_tokens["<|end|>"]
