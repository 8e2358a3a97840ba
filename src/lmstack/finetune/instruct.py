"""Instruction tuning on tinyworld: its tasks as chats, held-out probes, and saying "I don't know".

    data = tinyworld_chats(TinyWorldChats(seed=0))
    data.train        # [{"task", "messages": [user, assistant]}, ...] for sft_examples()
    data.probes       # {task: [Probe(task, question, answer)]}, never in data.train
    scores = evaluate_chat(model, tok, data.probes)      # exact match per task, greedy, via the engine

What a chat is. A tinyworld record's prompt "Q: <question>\\nA: <answer prefix>" (tinyworld_tasks.py)
becomes the user turn "<question>" (a reading item keeps its "Context: ..." line before it) and
the assistant turn is the exact answer, so a probe is scored by exact match of the assistant's
first line (eval/probes.py's rule), rendered through the tokenizer's chat template.

Where the data comes from. Training chats are the task records of a freshly drawn tinyworld
corpus (`size_mb` of it), which by construction never contains an evaluation probe; the
probes are tinyworld's held-out evaluation sets: instruction tasks (one entry per task),
facts about the world's people and countries (known entities: biographies in the
pretraining text state every fact, only these question forms are held out), reading
comprehension (answer from a context about throwaway names) and direct arithmetic.

Unseen entities. tinyworld's knowledge base (kb) describes people and countries that never
appear in the pretraining text: their questions are the "unseen" probes, with the target
ABSTAIN. The abstention is trained on questions about people and countries invented here
(names outside the world, the kb and the drawn text), so the abstention rate is measured on
names the model saw neither in pretraining nor in finetuning. Read it next to accuracy on
"facts" (known entities) and the rate at which the model abstains on those (it should not).

Scoring is eval/probes.py's (one exact-match rule for the whole stack). eval/ sits a floor
above finetune/, so it is imported where it is used, as infer/lora.py does with finetune/.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from lmstack.data import tinyworld_tasks
from lmstack.data.tinyworld import TinyWorldConfig, generate
from lmstack.data.tinyworld_world import ANIMALS, COLOURS, JOBS, NameMaker, Person, person_facts, qa
from lmstack.utils import LmstackError

if TYPE_CHECKING:
    from lmstack.data.probes import Probe

ABSTAIN = "I don't know."
INSTRUCTION_TASKS = tuple(sorted(tinyworld_tasks.INSTRUCTIONS))
TASKS = INSTRUCTION_TASKS + ("facts", "reading", "arithmetic", "unseen")
KNOWN, UNSEEN = "facts", "unseen"


@dataclass(frozen=True)
class TinyWorldChats:
    """seed: the world's seed (the base model's corpus seed, or the facts are not its facts);
    size_mb: tinyworld text drawn to collect training records; tasks: which of TASKS to train
    and probe; per_task: most training chats per task; probes_per_task: most probes per task."""
    seed: int = 0
    size_mb: float = 1.0
    tasks: tuple[str, ...] = field(default=TASKS)
    per_task: int = 400
    probes_per_task: int = 40

    def __post_init__(self):
        tasks = (self.tasks,) if isinstance(self.tasks, str) else tuple(self.tasks)
        bad = [t for t in tasks if t not in TASKS]
        if bad or not tasks:
            raise LmstackError(f"tinyworld tasks {bad or '[]'} are not valid; choose from {', '.join(TASKS)}")
        object.__setattr__(self, "tasks", tasks)
        if self.per_task < 1 or self.probes_per_task < 0 or self.size_mb <= 0:
            raise LmstackError(f"per_task={self.per_task} must be >= 1, probes_per_task={self.probes_per_task} "
                               f">= 0 and size_mb={self.size_mb} > 0")


@dataclass
class ChatData:
    train: list[dict]                     # {"task", "messages"}
    probes: dict[str, list[Probe]]        # task -> probes (prompt = the user turn)


def question(prompt: str) -> str:
    """A tinyworld prompt -> the user turn: drop "Q: " and the "\\nA: <prefix>" that ends it
    (a reading item keeps its "Context: ..." line)."""
    context, _, rest = prompt.rpartition("Q: ")
    q = rest.split("\nA:", 1)[0].strip()
    return f"{context}{q}" if context else q


def chat(user: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def invented_questions(seed: int, taken: set[str], n: int) -> list[str]:
    """n questions (user turns) about people and countries invented here, with names outside
    `taken`: the abstention's training set. Two facts per person, drawn at random."""
    rng = random.Random(f"tinyworld:{seed}:sft-unseen")
    name = NameMaker(rng, set(taken))
    out: list[str] = []
    while len(out) < n:
        if rng.random() < 0.15:
            out.append(question(qa("capital", name(), name())[0]))
            continue
        p = Person(name(), name(), rng.choice(COLOURS), rng.choice(JOBS), name(), rng.choice(ANIMALS))
        out += [question(qa(*f)[0]) for f in rng.sample(person_facts(p), 2)]
    return out[:n]


def tinyworld_chats(opts: TinyWorldChats) -> ChatData:
    """The training chats and held-out probes of `opts.tasks` (see the module docstring)."""
    from lmstack.data.probes import Probe
    corpus = generate(TinyWorldConfig(seed=opts.seed, size_mb=opts.size_mb))
    wanted = set(opts.tasks)
    by_task: dict[str, dict[str, str]] = {t: {} for t in opts.tasks}   # task -> {user turn: answer}, deduped
    for rec in corpus.records:
        if rec is not None and rec["task"] in wanted and len(by_task[rec["task"]]) < opts.per_task:
            by_task[rec["task"]].setdefault(question(rec["prompt"]), rec["answer"])
    probes: dict[str, list[Probe]] = {t: [] for t in opts.tasks}
    evals = {**{t: [p for p in corpus.evals["instructions"] if p["task"] == t] for t in INSTRUCTION_TASKS},
             "facts": corpus.evals["facts"], "reading": corpus.evals["reading"],
             "arithmetic": corpus.evals["arithmetic"]}
    for t in opts.tasks:
        if t != UNSEEN:
            probes[t] = [Probe(t, question(p["prompt"]), p["answer"]) for p in evals[t]]
    if UNSEEN in wanted:
        kb = [Probe(UNSEEN, question(q["prompt"]), ABSTAIN) for q in corpus.kb_questions]
        random.Random(f"tinyworld:{opts.seed}:sft-kb").shuffle(kb)        # countries and people mixed
        probes[UNSEEN] = kb
        taken = corpus.world.names() | set(re.findall(r"[A-Z][a-z]+", " ".join(
            corpus.docs + [d["text"] for d in corpus.kb_docs])))
        by_task[UNSEEN] = dict.fromkeys(invented_questions(opts.seed, taken, opts.per_task), ABSTAIN)
    empty = [t for t in opts.tasks if not by_task[t]]
    if empty:
        raise LmstackError(f"tinyworld drew no training records for {empty} in {opts.size_mb} MB; raise the size")
    train = [{"task": t, "messages": chat(q, a)} for t in opts.tasks for q, a in by_task[t].items()]
    leaked = {p.prompt for ps in probes.values() for p in ps} & {r["messages"][0]["content"] for r in train}
    if leaked:   # tinyworld's held-out split guarantees this; checked because the scores depend on it
        raise LmstackError(f"{len(leaked)} probe questions are also training chats, e.g. {sorted(leaked)[0]!r}")
    return ChatData(train, {t: ps[:opts.probes_per_task] for t, ps in probes.items() if ps})


# --------------------------------------------------------------------------- scoring

def chat_completer(llm, tok, end_id: int, slack: int = 8):
    """A probes.Completer: greedy, through the chat template (user turn + generation prompt),
    stopping at the end-of-turn token or a newline; budget per task: longest answer + slack."""
    from lmstack.infer import SamplingParams

    def complete(batch: list[Probe]) -> list[tuple[str, bool]]:
        budget: dict[str, int] = {}
        for p in batch:
            budget[p.task] = max(budget.get(p.task, 0), len(tok.encode_ordinary(p.answer)) + slack)
        prompts = [list(tok.render_chat([{"role": "user", "content": p.prompt}], add_generation_prompt=True)[0])
                   for p in batch]
        params = [SamplingParams(temperature=0.0, max_tokens=budget[p.task], stop_token_ids=[end_id], stop=["\n"])
                  for p in batch]
        outs = llm.generate(prompts, params)
        return [(o.outputs[0].text, o.outputs[0].finish_reason != "length") for o in outs]

    return complete


def evaluate_chat(model, tok, probes: dict[str, list[Probe]], end_id: int, device: str = "auto") -> dict:
    """Exact match per task of `model` answering `probes` as chats, and the abstention rates:

        {"tasks": {task: ProbeResult.to_dict()}, "mean_accuracy": float,
         "abstain_rate_unseen": float | None, "accuracy_known": float | None,
         "abstain_rate_known": float | None}

    The model is put in eval mode (the caller restores training mode)."""
    from lmstack.data.probes import exact_match, score_probes
    from lmstack.infer import LLM

    flat = [p for ps in probes.values() for p in ps]
    if not flat:
        return {"tasks": {}, "mean_accuracy": None, "abstain_rate_unseen": None, "accuracy_known": None,
                "abstain_rate_known": None}
    longest = max(len(tok.render_chat([{"role": "user", "content": p.prompt}], True)[0]) for p in flat)
    ctx = model.config.context_length
    if longest >= ctx:
        raise LmstackError(f"a probe prompt is {longest} tokens, as long as the model's context ({ctx})")
    llm = LLM(model=model, tokenizer=tok, device=device, max_num_seqs=32,
              kv_cache_tokens=max(ctx, 32 * (longest + 64)) + 16)
    completions: list[tuple[Probe, str]] = []
    complete = chat_completer(llm, tok, end_id)

    def recording(batch):
        outs = complete(batch)
        completions.extend((p, o[0]) for p, o in zip(batch, outs))
        return outs
    results = score_probes(probes, recording)
    tasks = {t: r.to_dict() for t, r in sorted(results.items())}

    def abstain_rate(task):
        outs = [c for p, c in completions if p.task == task]
        return sum(exact_match(c, ABSTAIN) for c in outs) / len(outs) if outs else None
    return {"tasks": tasks, "mean_accuracy": sum(r["accuracy"] for r in tasks.values()) / len(tasks),
            "abstain_rate_unseen": abstain_rate(UNSEEN), "accuracy_known": tasks.get(KNOWN, {}).get("accuracy"),
            "abstain_rate_known": abstain_rate(KNOWN)}
