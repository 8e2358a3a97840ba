"""`lmstack run` end to end on a micro recipe: every artifact, caching on the second run, the
engine's greedy probe answers against a plain greedy loop, bad input at the door."""
import json

import pytest
import torch
import yaml

from lmstack.cli.main import main
from lmstack.pipeline.options import DEFAULT_STAGES

# micro_run: tests/pipeline/conftest.py (one micro run of every default stage, shared with test_chat_pipeline)


def test_artifacts(micro_run, capsys):
    run_dir, _ = micro_run
    for name in ("tokenizer.json", "model.safetensors", "config.json", "metrics.jsonl", "recipe.yaml",
                 "summary.json", "eval.json", "samples.json", "report.html", "figures/loss.png",
                 "figures/training.png", "figures/probes.png"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "figures/loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    summary = json.loads((run_dir / "summary.json").read_text())
    assert [s["name"] for s in summary["stages"]] == list(DEFAULT_STAGES)
    assert all(s["status"] == "ran" for s in summary["stages"])
    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    assert recipe["vocab_size"] == 300 and recipe["model_config"]["n_embd"] == 32

    html = (run_dir / "report.html").read_text()
    # loss, lr/grad-norm/throughput, probe bars; the chat stages' own figures are test_chat_pipeline's
    assert html.count("data:image/png;base64,") >= 3
    assert "<table" in html and "src='http" not in html     # self-contained
    for stage in DEFAULT_STAGES:                            # the report's own row too
        assert f"<td>{stage}</td>" in html
    samples = json.loads((run_dir / "samples.json").read_text())
    assert samples and samples[0]["prompt"][:20] in html.replace("&#x27;", "'").replace("&quot;", '"')

    ev = json.loads((run_dir / "eval.json").read_text())
    for key in ("val_loss", "val_perplexity", "unigram_entropy", "unigram_val_loss", "probes"):
        assert key in ev
    assert ev["val_perplexity"] == pytest.approx(torch.tensor(ev["val_loss"]).exp().item(), rel=1e-6)
    assert {r["task"] for r in ev["probes"]} >= {"arithmetic", "facts"}
    assert all(r["n"] == 2 for r in ev["probes"])


def test_model_and_tokenizer_load_and_engine_matches_plain_greedy(micro_run):
    from lmstack.model import Transformer
    from lmstack.tokenizer import Tokenizer

    run_dir, _ = micro_run
    tok = Tokenizer.load(run_dir / "tokenizer.json")
    assert tok.n_vocab == 300
    model = Transformer.from_pretrained(run_dir)
    model.eval()
    ev = json.loads((run_dir / "eval.json").read_text())
    checked = 0
    for r in ev["probes"]:
        for ex in r["examples"]:
            ids = tok.encode(ex["prompt"], allowed_special="all")
            new: list[int] = []
            with torch.no_grad():
                for _ in range(8):           # plain loop: full forward each step, argmax of the last position
                    nxt = int(model(torch.tensor([ids + new]))[0, -1].argmax())
                    if nxt == tok.eot_token:
                        break
                    new.append(nxt)
                    if "\n" in tok.decode(new):
                        break
            ref = tok.decode(new).split("\n")[0]
            # the engine's first line must start with the plain loop's first 8-token line
            assert ex["completion"].startswith(ref) or ref.startswith(ex["completion"]), (ex, ref)
            checked += 1
    assert checked >= 4


def test_second_run_is_cached(micro_run, capsys):
    run_dir, argv = micro_run
    before = (run_dir / "model.safetensors").stat().st_mtime_ns
    assert main(argv) == 0
    out = capsys.readouterr().out
    summary = json.loads((run_dir / "summary.json").read_text())
    status = {s["name"]: s["status"] for s in summary["stages"]}
    assert status == {**{n: "cached" for n in DEFAULT_STAGES[:-1]}, "report": "ran"}
    assert (run_dir / "model.safetensors").stat().st_mtime_ns == before
    assert "cached" in out and "report.html" in out


def test_bad_input_fails_before_work(tmp_path, capsys):
    assert main(["run", "--out-dir", str(tmp_path), "--name", "x", "--model-config", "{n_layers: 2}"]) == 1
    err = capsys.readouterr().err
    assert "unknown model_config key 'n_layers'" in err and "n_layer" in err
    assert not (tmp_path / "x" / "data").exists()
    bad = tmp_path / "bad.yaml"
    bad.write_text("vocab: 512\n")
    assert main(["run", "--recipe", str(bad), "--out-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "unknown recipe key 'vocab'" in err and "vocab_size" in err
    assert main(["run", "--out-dir", str(tmp_path), "--train-config", "{max_steps: 3}"]) == 1
    assert "top-level recipe key" in capsys.readouterr().err
    # bad values, not just bad keys, are caught before the corpus is built
    assert main(["run", "--out-dir", str(tmp_path), "--name", "y", "--model", "huge"]) == 1
    assert "unknown model preset 'huge'" in capsys.readouterr().err
    assert main(["run", "--out-dir", str(tmp_path), "--name", "y", "--train-config", "{schedule: foo}"]) == 1
    assert "schedule" in capsys.readouterr().err
    assert not (tmp_path / "y" / "data").exists()
