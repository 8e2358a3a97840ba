"""The chat half of `lmstack run` (sft -> dpo -> grpo -> quantize -> measure -> rag -> report) on the
shared micro run: each stage's model and numbers, the measure stage against plain-torch references
(a greedy loop, summed log-probs), the effect verdicts, a failing stage and the rerun that continues,
and bad recipes refused before any work with the stage named."""
import json
import shutil

import pytest
import torch

from lmstack.cli.main import main
from lmstack.pipeline import RunOptions
from lmstack.pipeline.measure import effects
from lmstack.utils import LmstackError


def test_chat_stages_write_their_models_and_the_report(micro_run):
    run_dir, _ = micro_run
    for folder in ("sft", "dpo", "grpo", "quantized"):
        assert (run_dir / folder / "config.json").is_file() and (run_dir / folder / "tokenizer.json").is_file()
    q = json.loads((run_dir / "quantized" / "config.json").read_text())
    assert [t["method"] for t in q["transforms"] if t["kind"] == "quant"] == ["gptq"]
    m = json.loads((run_dir / "measure.json").read_text())
    assert m["models"] == ["pretrain", "sft", "dpo", "grpo", "quantize"]
    for row in m["rows"].values():
        assert {"instruction_em", "abstain_unseen", "known_acc", "pref_acc", "arith_em"} <= set(row)
    qrow = m["rows"]["quantize"]
    assert qrow["file_mb"] < qrow["float_file_mb"] and qrow["tokens_per_s"] > 0 and qrow["float_tokens_per_s"] > 0
    assert {e["stage"] for e in m["effects"]} == {"sft", "dpo", "grpo", "quantize"}
    rag = json.loads((run_dir / "rag.json").read_text())
    assert rag["closed_book"]["n"] == rag["bm25_top3"]["n"] == 4 and rag["bm25_top3"]["recall@3"] is not None
    html = (run_dir / "report.html").read_text()
    for text in ("Each stage&#x27;s effect, measured on held-out data", "Every stage&#x27;s model on the same",
                 "Retrieval: knowledge-base questions", f"lmstack serve {run_dir / 'quantized'}",
                 "http://127.0.0.1:8000/"):
        assert text in html, text
    for fig in ("stages.png", "sft_loss.png"):
        assert (run_dir / "figures" / fig).read_bytes()[:4] == b"\x89PNG"
    assert list((run_dir / "figures").glob("dpo_*.png")) and list((run_dir / "figures").glob("grpo_*.png"))


def _plain_greedy(model, ids: list[int], stop: int, n: int = 8) -> list[int]:
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(torch.tensor([ids + out]))[0, -1].argmax())
            out.append(nxt)
            if nxt == stop:
                break
    return out


def test_measure_matches_plain_torch(micro_run):
    """The arithmetic completions are a plain greedy loop's; the preference margin is the mean of
    summed response log-probs, chosen minus rejected, computed here with log_softmax."""
    from lmstack.align.data import tinyworld_pairs, tokenize_pairs
    from lmstack.model import Transformer
    from lmstack.pipeline.measure import heldout_sets
    from lmstack.tokenizer import Tokenizer
    from lmstack.tokenizer.chat import END
    run_dir, _ = micro_run
    m = json.loads((run_dir / "measure.json").read_text())
    model = Transformer.from_pretrained(run_dir / "sft").eval()
    tok = Tokenizer.load(run_dir / "sft" / "tokenizer.json")
    end = tok.special_tokens[END]
    row = m["rows"]["sft"]
    assert len(row["arith_examples"]) == 4
    for ex in row["arith_examples"]:
        ids = list(tok.render_chat([{"role": "user", "content": ex["prompt"]}], add_generation_prompt=True)[0])
        ref = [t for t in _plain_greedy(model, ids, end) if t != end]
        assert ex["completion"] == tok.decode(ref).split("\n")[0] or ex["completion"] == tok.decode(ref)

    opts = RunOptions(**{k: v for k, v in json.loads((run_dir / "summary.json").read_text())["recipe"].items()})
    sets = heldout_sets(opts)
    dpo_pairs = tinyworld_pairs(seed=0, n=40, heldout=True, tasks=tuple(opts.dpo_config["tasks"]))
    assert {p["task"] for p in sets["pairs"]} <= {p["task"] for p in dpo_pairs}     # the kind DPO trains on
    pairs = tokenize_pairs(tok, sets["pairs"], "chat", model.config.context_length)
    margins = []
    with torch.no_grad():
        for p in pairs:
            lp = []
            for seq in (p.chosen, p.rejected):
                ids = torch.tensor([seq.ids])
                logp = torch.log_softmax(model(ids)[0, :-1].float(), -1).gather(1, ids[0, 1:, None])[:, 0]
                lp.append(float((logp * torch.tensor(seq.loss_mask[1:], dtype=torch.float32)).sum()))
            margins.append(lp[0] - lp[1])
    assert row["pref_margin"] == pytest.approx(sum(margins) / len(margins), abs=1e-3)
    assert row["pref_acc"] == pytest.approx(sum(x > 0 for x in margins) / len(margins))


def test_rag_asks_the_final_chat_model_its_question_with_the_answer_prefix(micro_run):
    """The rag stage's answers come from the final (quantized) chat model, asked each grounded
    prompt as a user turn with the assistant turn started by the answer prefix: a plain greedy
    loop over those ids gives the same completion."""
    from lmstack.infer import LLM, SamplingParams
    from lmstack.pipeline.measure import ChatAsker, load_chat_model
    from lmstack.rag import BM25Retriever, Index, tinyworld_kb
    from lmstack.rag.grounded import render_prompt
    from lmstack.tokenizer import Tokenizer
    run_dir, _ = micro_run
    rag = json.loads((run_dir / "rag.json").read_text())
    assert rag["model"] == str(run_dir / "quantized")
    model, chat, end = load_chat_model(run_dir / "quantized", "cpu")
    docs, questions = tinyworld_kb(0)
    retriever = BM25Retriever(Index.build([(d["id"], d["text"]) for d in docs],
                                          Tokenizer.load(run_dir / "quantized" / "tokenizer.json")))
    asker = ChatAsker(LLM(model=model, tokenizer=chat, device="cpu"), chat, end)
    for q in questions[:2]:
        prompt = render_prompt(q["prompt"], retriever.search(q["prompt"], 3))
        out = asker.generate([prompt], SamplingParams(temperature=0.0, max_tokens=6))[0].outputs[0]
        head, _, last = prompt.rpartition("\nQ: ")
        user, prefix = last.split("\nA: ")
        ids = list(chat.render_chat([{"role": "user", "content": f"{head}\n{user}"}], True)[0]) + \
            list(chat.encode_ordinary(prefix))
        assert out.token_ids == [t for t in _plain_greedy(model, ids, end, 6) if t != end]


def test_effect_verdicts():
    rows = {"pretrain": {"instruction_em": 0.0, "n": {"instruction_em": 200}},
            "sft": {"instruction_em": 0.4, "pref_acc": 0.50, "arith_em": 0.10,
                    "n": {"instruction_em": 200, "pref_acc": 200, "arith_em": 100}},
            "dpo": {"instruction_em": 0.4, "pref_acc": 0.52, "arith_em": 0.10,
                    "n": {"instruction_em": 200, "pref_acc": 200, "arith_em": 100}},
            "quantize": {"instruction_em": 0.37, "pref_acc": 0.515, "arith_em": 0.10,
                         "n": {"instruction_em": 200, "pref_acc": 200, "arith_em": 100}}}
    out = {(e["stage"], e["key"]): e for e in effects(["pretrain", "sft", "dpo", "quantize"], rows)}
    assert out[("sft", "instruction_em")]["verdict"].startswith("improves by 40.0 points")
    assert out[("dpo", "pref_acc")]["verdict"].startswith("no effect at this budget")   # 2 points of 200 pairs
    assert out[("quantize", "instruction_em")]["verdict"].startswith("NOT within 2 points")
    assert out[("quantize", "pref_acc")]["verdict"].startswith("within 2 points")
    assert out[("quantize", "instruction_em")]["from"] == "DPO"        # compared with the model it was made from


def test_failing_stage_keeps_earlier_stages_and_rerun_continues(micro_run, tmp_path, capsys):
    run_dir, argv = micro_run
    shutil.copytree(run_dir, tmp_path / "copy")
    base = ["run", "--recipe", argv[2], "--out-dir", str(tmp_path), "--name", "copy"]
    # groups of 64 inputs do not divide the micro model's width (32): the quantize stage fails
    assert main(base + ["--quant-config", "{group_size: 64}"]) == 1
    err = capsys.readouterr().err
    assert "stage 'quantize' failed" in err and "group" in err and "continue from 'quantize'" in err
    summary = json.loads((tmp_path / "copy" / "summary.json").read_text())
    status = {s["name"]: s["status"] for s in summary["stages"]}
    assert status["quantize"] == "failed" and status["grpo"] == status["sft"] == "cached"
    before = (tmp_path / "copy" / "grpo" / "model.safetensors").stat().st_mtime_ns
    assert main(base + ["--quant-config", "{group_size: null}", "--stages", "quantize,measure"]) == 0
    summary = json.loads((tmp_path / "copy" / "summary.json").read_text())
    status = {s["name"]: s["status"] for s in summary["stages"]}
    assert status["quantize"] == status["measure"] == "ran" and status["grpo"] == "not selected"
    assert (tmp_path / "copy" / "grpo" / "model.safetensors").stat().st_mtime_ns == before


@pytest.mark.parametrize("stages, words", [
    (["corpus", "grpo", "sft"], "stage 'grpo' is listed before 'sft'"),
    (["pretrain", "grpo"], "stage 'grpo' aligns a chat model, but no 'sft' stage comes before it"),
    (["sft", "rlhf"], "unknown stage 'rlhf'"),
    (["import", "sft"], "stage 'import' needs base_model"),
    (["import", "pretrain"], "stages 'import' and 'pretrain' both make the base model"),
])
def test_impossible_recipes_name_the_stage(stages, words):
    with pytest.raises(LmstackError, match=words):
        RunOptions(stages=stages)
    with pytest.raises(LmstackError, match="base_model='hf' is read by stage 'import'"):
        RunOptions(base_model="hf")       # the default stages pretrain


def test_bad_stage_settings_fail_before_work(tmp_path, capsys):
    assert main(["run", "--out-dir", str(tmp_path), "--name", "x", "--sft-config", "{max_step: 3}"]) == 1
    err = capsys.readouterr().err
    assert "unknown sft_config key 'max_step'" in err and "max_steps" in err
    assert main(["run", "--out-dir", str(tmp_path), "--name", "x", "--grpo-config", "{group_size: 1}"]) == 1
    assert "stage 'grpo'" in capsys.readouterr().err
    assert main(["run", "--out-dir", str(tmp_path), "--name", "x", "--dpo-config", "{model: runs/x}"]) == 1
    assert "set by the pipeline" in capsys.readouterr().err
    assert not (tmp_path / "x" / "data").exists()
