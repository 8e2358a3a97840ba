"""Every stage's model on the same held-out sets, and what retrieval adds: the measure and rag stages.

measure: for each model of the run (pretrained or imported, sft, dpo, grpo, quantized), greedy,
through the engine and the model's chat template, on sets none of them trained on:
    instruction_em      exact match on tinyworld's instruction tasks (mean over tasks)
    abstain_unseen      "I don't know." on questions about entities never seen (tinyworld's KB)
    known_acc, abstain_known   accuracy on facts about known entities (the assistant turn started
                        with the answer prefix, as the base model's plain probes are), and how often it
                        abstains there when asked without it
    pref_acc            held-out preference pairs of the DPO stage's tasks whose chosen answer gets
                        the higher log-prob
    arith_em            held-out arithmetic (GRPO's task and prompts: the chat question), exact answer
and, for the quantized model against the model it was made from, the file size and the decode
speed (tokens/s, the same greedy workload on both, alternated, best of rounds). Written to
RUN/measure.json; `effects` turns two rows into each stage's measured effect for the report.

rag: the final model answers the knowledge base's questions closed-book and with BM25 retrieval
(lmstack.rag.evaluate_rag), each grounded prompt asked as one user turn of its chat template
(`ChatAsker`): the format SFT's "grounded" chats teach (lmstack.finetune.instruct).
"""
from __future__ import annotations

import math
import time
from pathlib import Path

from lmstack.pipeline.chat_stages import as_chat_question, model_dir
from lmstack.pipeline.options import RunOptions, model_chain
from lmstack.pipeline.runner import Run
from lmstack.utils import atomic_write_json

LABELS = {"pretrain": "pretrained", "import": "imported", "sft": "SFT", "dpo": "DPO", "grpo": "GRPO",
          "quantize": "quantized"}
METRICS = {   # key -> (label, higher is better)
    "instruction_em": ("instruction tasks, exact match", True),
    "abstain_unseen": ("\"I don't know\" on unseen entities", True),
    "known_acc": ("known facts, accuracy", True),
    "known_acc_plain": ("known facts, plain prompt (base model)", True),
    "abstain_known": ("\"I don't know\" on known entities", False),
    "pref_acc": ("held-out preference accuracy", True),
    "arith_em": ("arithmetic, exact match", True),
}


def _world(o: RunOptions) -> int:
    return o.seed if o.corpus == "tinyworld" else 0


def pair_tasks(o: RunOptions) -> tuple[str, ...]:
    """The preference pairs measured: the kind the DPO stage trains on (its held-out ones)."""
    return tuple(o.dpo_config.get("tasks") or ("arithmetic", "instruction"))


def heldout_sets(o: RunOptions) -> dict:
    """The sets every model is measured on (the same for all: drawn from the seed alone)."""
    from lmstack.align.data import tinyworld_pairs, tinyworld_prompts
    from lmstack.finetune.instruct import TinyWorldChats, tinyworld_chats
    chats = tinyworld_chats(TinyWorldChats(seed=_world(o), size_mb=0.2, per_task=1, probes_per_task=o.measure_probes))
    pairs = tinyworld_pairs(seed=_world(o), n=o.measure_pairs, heldout=True, tasks=pair_tasks(o)) \
        if o.measure_pairs else []
    return {"probes": chats.probes, "pairs": pairs,
            "arith": tinyworld_prompts(seed=_world(o), n=o.measure_arith, heldout=True) if o.measure_arith else []}


def load_chat_model(folder: Path, device: str):
    """(model in eval mode, chat tokenizer, end-of-turn id) of a model folder."""
    import torch

    from lmstack.finetune.data import TemplateChat, chat_tokenizer
    from lmstack.model import Transformer
    from lmstack.tokenizer import Tokenizer
    from lmstack.tokenizer.chat import END
    from lmstack.utils import pick_device
    model = Transformer.from_pretrained(folder, dtype=torch.float32).to(pick_device(device)).eval()
    chat = chat_tokenizer(Tokenizer.load(folder / "tokenizer.json"), folder)
    end = chat.end_token if isinstance(chat, TemplateChat) else END
    return model, chat, chat.special_tokens[end]


def score_model(model, chat, end_id: int, sets: dict, device: str) -> dict:
    from lmstack.align.data import prompt_ids, tokenize_pairs
    from lmstack.align.evaluate import exact_match, preference_accuracy
    from lmstack.align.rollout import RolloutEngine
    from lmstack.finetune.instruct import INSTRUCTION_TASKS, evaluate_chat
    from lmstack.tokenizer.chat import has_chat_tokens
    r = evaluate_chat(model, chat, sets["probes"], end_id, device)
    inst = [r["tasks"][t]["accuracy"] for t in INSTRUCTION_TASKS if t in r["tasks"]]
    row = {"instruction_em": sum(inst) / len(inst) if inst else None, "abstain_unseen": r["abstain_rate_unseen"],
           "known_acc": r["accuracy_known"], "abstain_known": r["abstain_rate_known"],
           "tasks": {t: v["accuracy"] for t, v in r["tasks"].items()},
           "n": {t: v["n"] for t, v in r["tasks"].items()}}
    ctx = model.config.context_length
    # lmstack.align's chat format knows lmstack's chat tokens only; other templates: plain text
    fmt, tok = ("chat", chat) if has_chat_tokens(chat) else ("plain", chat.tok)
    if sets["pairs"]:
        pairs = tokenize_pairs(tok, sets["pairs"], fmt, ctx, source="held-out pair")
        pref = preference_accuracy(model, pairs)
        row["pref_acc"], row["pref_margin"] = pref["logp_acc"], pref["margin_logp"]
        row["n"]["pref_acc"] = len(pairs)
    if sets["arith"]:
        stops = {"stop_token_ids": [end_id]} if fmt == "chat" else \
            {"stop_token_ids": [tok.eot_token] if tok.eot_token is not None else [], "stop": ["\n"]}
        engine = RolloutEngine(model, tok, max_completion_len=8, max_num_seqs=32, **stops)
        recs = [as_chat_question(r) for r in sets["arith"]] if fmt == "chat" else sets["arith"]
        ids = [prompt_ids(tok, rec["prompt"], fmt) for rec in recs]
        row["arith_em"] = exact_match(engine, recs, ids)["exact_match"]
        row["arith_examples"] = [{"prompt": r["prompt"], "answer": r["answer"], "completion": g[0].text}
                                 for r, g in zip(recs[:8], engine.sample(ids[:8], 1, seed=0, greedy=True))]
        row["n"]["arith_em"] = len(ids)
    row["n"]["instruction_em"] = sum(r["tasks"][t]["n"] for t in INSTRUCTION_TASKS if t in r["tasks"])
    for key, task in (("abstain_unseen", "unseen"), ("known_acc", "facts"), ("abstain_known", "facts")):
        if task in r["tasks"]:
            row["n"][key] = r["tasks"][task]["n"]
    return row


def decode_speed(models: dict, tok, rounds: int = 2, n_prompts: int = 8, max_tokens: int = 48) -> dict:
    """Greedy decode tokens/s of each model on one workload, the models alternated, best of rounds."""
    from lmstack.infer import LLM, SamplingParams
    prompts = [[tok.eot_token if tok.eot_token is not None else 0] + list(range(10 + i, 20 + i))
               for i in range(n_prompts)]
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    engines = {k: LLM(model=m, tokenizer=tok, max_num_seqs=n_prompts) for k, m in models.items()}
    best = {k: 0.0 for k in models}
    for _ in range(rounds):
        for k, llm in engines.items():
            t0 = time.perf_counter()
            outs = llm.generate(prompts, params)
            n = sum(len(o.outputs[0].token_ids) for o in outs)
            best[k] = max(best[k], n / (time.perf_counter() - t0))
    return best


def measure(run: Run) -> dict:
    o = run.opts
    sets = heldout_sets(o)
    rows: dict[str, dict] = {}
    for stage in model_chain(o):
        t0 = time.perf_counter()
        model, chat, end_id = load_chat_model(model_dir(run, stage), o.device)
        rows[stage] = score_model(model, chat, end_id, sets, o.device)
        rows[stage]["seconds"] = time.perf_counter() - t0
        run.log(f"[measure] {LABELS[stage]}: " + ", ".join(f"{k} {v:.3f}" for k, v in rows[stage].items()
                                                           if k in METRICS and v is not None))
    chain = model_chain(o)
    ev = _read_json(run.dir / "eval.json") if chain[0] == "pretrain" else None
    facts = [r for r in (ev or {}).get("probes", []) if r.get("task") == "facts"]
    if facts:      # the pretrained model on known facts as it was trained to answer them: plain "Q: ... A:"
        rows["pretrain"]["known_acc_plain"] = facts[0]["accuracy"]
        rows["pretrain"]["n"]["known_acc_plain"] = facts[0]["n"]
    if "quantize" in chain:
        import torch

        from lmstack.model import Transformer
        from lmstack.tokenizer import Tokenizer
        src = model_dir(run, chain[chain.index("quantize") - 1])
        q = model_dir(run, "quantize")
        models = {name: Transformer.from_pretrained(d, dtype=torch.float32).eval() for name, d in
                  (("float", src), ("quantized", q))}
        speed = decode_speed(models, Tokenizer.load(q / "tokenizer.json"))
        rows["quantize"].update(tokens_per_s=speed["quantized"], float_tokens_per_s=speed["float"],
                                file_mb=_mb(q), float_file_mb=_mb(src))
    atomic_write_json(run.dir / "measure.json", {"models": chain, "rows": rows,
                                                  "effects": effects(chain, rows)})
    numbers = {}
    for stage in chain:
        for k in METRICS:
            if rows[stage].get(k) is not None:
                numbers[f"{stage}_{k}"] = rows[stage][k]
    return numbers


def _read_json(path: Path):
    import json
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _mb(folder: Path) -> float:
    return round(sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 2**20, 3)


# --------------------------------------------------------------------------- effects
# (stage, metric, compared with: the model it started from, or "base")
CLAIMS = [("sft", "instruction_em", "base"), ("sft", "abstain_unseen", "base"), ("sft", "known_acc", "base"),
          ("dpo", "pref_acc", "input"), ("grpo", "arith_em", "input"), ("quantize", "instruction_em", "input"),
          ("quantize", "arith_em", "input"), ("quantize", "pref_acc", "input")]


def _se(p: float, n: int) -> float:
    """Standard error of a proportion, with p smoothed as (k + 1) / (n + 2) so 0 and 1 get one too."""
    n = max(n, 1)
    q = (p * n + 1) / (n + 2)
    return math.sqrt(q * (1 - q) / n)


def verdict(a: float, b: float, n_a: int, n_b: int, higher_is_better: bool = True) -> tuple[str, float]:
    """(verdict, noise) of a change a -> b of two proportions measured on n_a and n_b questions: it
    counts when it exceeds two standard errors of the difference (binomial)."""
    noise = 2 * math.sqrt(_se(a, n_a) ** 2 + _se(b, n_b) ** 2)
    delta = b - a
    if abs(delta) <= noise:
        return (f"no effect at this budget (change {100 * delta:+.1f} points is within noise, "
                f"+/-{100 * noise:.1f})"), noise
    better = (delta > 0) == higher_is_better
    return f"{'improves' if better else 'worsens'} by {100 * abs(delta):.1f} points (noise +/-{100 * noise:.1f})", noise


def effects(chain: list[str], rows: dict) -> list[dict]:
    """Each stage's effect as measured: before -> after on the same held-out set, and a verdict
    (`verdict`); the quantized model must stay within 2 points of its float model. Known facts are
    compared with the pretrained model asked as it was trained (plain "Q: ... A:", the evaluate
    stage's probes) when there is one: in the chat format a base model answers nothing."""
    out = []
    for stage, key, against in CLAIMS:
        if stage not in chain or chain.index(stage) == 0:
            continue
        ref = chain[0] if against == "base" else chain[chain.index(stage) - 1]
        ref_key = "known_acc_plain" if key == "known_acc" and "known_acc_plain" in rows[ref] else key
        a, b = rows[ref].get(ref_key), rows[stage].get(key)
        if a is None or b is None:
            continue
        n = rows[stage].get("n", {}).get(key) or 1
        n_ref = rows[ref].get("n", {}).get(ref_key) or n
        text, noise = verdict(a, b, n_ref, n, METRICS[key][1])
        delta = b - a
        if stage == "quantize":
            text = (f"within 2 points of the float model ({100 * delta:+.1f})" if abs(delta) <= 0.02 else
                    f"NOT within 2 points of the float model ({100 * delta:+.1f})")
        out.append({"stage": stage, "metric": METRICS[key][0], "key": key,
                    "from": LABELS[ref] + (" (plain prompt)" if ref_key != key else ""), "before": a, "after": b,
                    "n": n, "delta": delta, "noise": noise, "verdict": text})
    return out


# --------------------------------------------------------------------------- rag
class ChatAsker:
    """lmstack.rag's view of an engine (generate(prompts, params), .engine, .tokenizer) over a chat
    model: each grounded prompt 'Context: [1] ...\\nQ: where does Bolo live?\\nA: Bolo lives in' is
    asked as the user turn 'Context: [1] ...\\nwhere does Bolo live?' (finetune.instruct.question)
    with the assistant turn started by the prompt's answer prefix 'Bolo lives in' (SFT answers fact
    questions with that statement), so the completion is the answer alone; it stops at the end of
    the turn."""

    def __init__(self, llm, chat, end_id: int):
        self.llm, self.chat, self.end_id = llm, chat, end_id
        self.engine, self.tokenizer = llm.engine, llm.tokenizer

    def generate(self, prompts: list[str], params):
        import dataclasses

        from lmstack.finetune.instruct import answer_prefix, question
        ids = []
        for p in prompts:
            turn = self.chat.render_chat([{"role": "user", "content": question(p)}], add_generation_prompt=True)[0]
            ids.append(list(turn) + list(self.chat.encode_ordinary(answer_prefix(p))))
        stops = list(params.stop_token_ids or []) + [self.end_id]
        return self.llm.generate(ids, dataclasses.replace(params, stop_token_ids=stops))


def rag(run: Run) -> dict:
    from lmstack.infer import LLM
    from lmstack.rag import BM25Retriever, Index, evaluate_rag, tinyworld_kb
    from lmstack.tokenizer import Tokenizer
    o = run.opts
    folder = model_dir(run, model_chain(o)[-1])
    docs, questions = tinyworld_kb(_world(o))
    questions = questions[:o.rag_questions]
    index = Index.build([(d["id"], d["text"]) for d in docs], Tokenizer.load(folder / "tokenizer.json"))
    model, chat, end_id = load_chat_model(folder, o.device)
    llm = ChatAsker(LLM(model=model, tokenizer=chat, device=o.device, max_num_seqs=32), chat, end_id)
    closed = evaluate_rag(llm, None, questions)
    with_rag = evaluate_rag(llm, BM25Retriever(index), questions, k=3)
    text, _ = verdict(closed["accuracy"], with_rag["accuracy"], closed["n"], with_rag["n"])
    atomic_write_json(run.dir / "rag.json", {"model": str(folder), "closed_book": closed, "bm25_top3": with_rag,
                                             "verdict": "retrieval " + text})
    return {"questions": len(questions), "closed_book_acc": closed["accuracy"], "rag_acc": with_rag["accuracy"],
            "recall@3": with_rag.get("recall@3"), "citation_precision": with_rag.get("citation_precision")}


def estimate_measure(o: RunOptions, tok_s: float) -> float:
    per_model = (o.measure_probes * 9 + o.measure_arith) * 0.03 + o.measure_pairs * 0.005
    return per_model * len(model_chain(o)) * 4000 / tok_s + 10


def estimate_rag(o: RunOptions, tok_s: float) -> float:
    return o.rag_questions * 0.05 * 4000 / tok_s + 5
