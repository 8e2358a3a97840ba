"""Instruction tuning on tinyworld: its tasks as chats, held-out probes, and saying "I don't know".

    data = tinyworld_chats(TinyWorldChats(seed=0))
    data.train        # [{"task", "messages": [user, assistant]}, ...] for sft_examples()
    data.probes       # {task: [Probe(task, question, answer)]}, never in data.train
    scores = evaluate_chat(model, tok, data.probes)      # exact match per task, greedy, via the engine

What a chat is. A tinyworld record's prompt "Q: <question>\\nA: <answer prefix>" (tinyworld_tasks.py)
becomes the user turn "<question>" (a reading item keeps its "Context: ..." line before it) and
the assistant turn is the exact answer, so a probe is scored by exact match of the assistant's
first line (eval/probes.py's rule), rendered through the tokenizer's chat template. Fact-shaped
tasks (facts, reading, grounded) answer with the whole statement, "Bolo lives in Tinar", as
tinyworld's QA text does; their probes start the assistant turn with the answer prefix ("Bolo
lives in", read off the question: `answer_start`), as the base model's plain probes do, and score
the answer after it. Known entities get as many training questions as invented ones, in the same
forms, so "answer if known, abstain if not" is what SFT teaches. "grounded": a question about one
of three knowledge-base-style documents of invented entities, listed as retrieval lists its chunks
("Context: [1] ... [2] ... [3] ..."), the answer copied from it (the rag stage asks this way).

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
from lmstack.data.tinyworld import TinyWorldConfig, _kb, generate, with_context
from lmstack.data.tinyworld_world import (ANIMALS, COLOURS, JOBS, QUESTIONS, NameMaker, Person, held_out,
                                          person_facts, qa)
from lmstack.utils import LmstackError

if TYPE_CHECKING:
    from lmstack.data.probes import Probe

ABSTAIN = "I don't know."
INSTRUCTION_TASKS = tuple(sorted(tinyworld_tasks.INSTRUCTIONS))
TASKS = INSTRUCTION_TASKS + ("facts", "reading", "grounded", "arithmetic", "unseen")
KNOWN, UNSEEN, GROUNDED = "facts", "unseen", "grounded"
# fact questions are answered in tinyworld's own QA form, the sentence its answer prefix starts
# ("where does Bolo live?" -> "Bolo lives in Tinar"), as the pretraining text answers them; their
# probes are asked as the base model is, with that prefix starting the assistant turn (`answer_start`)
SENTENCE_TASKS = ("facts", "reading", "grounded")
GROUNDED_CHUNKS = 3       # chunks in a grounded chat's context: lmstack.rag's default top-k


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


def answer_prefix(prompt: str) -> str:
    """The answer prefix a tinyworld prompt ends with ('Q: where does Bolo live?\\nA: Bolo lives in'
    -> 'Bolo lives in'; '' when there is none)."""
    return prompt.rpartition("\nA:")[2].strip()


def reply(task: str, prompt: str, answer: str) -> str:
    """The assistant turn for a tinyworld record: the whole statement for a fact-shaped task
    (SENTENCE_TASKS: 'Bolo lives in Tinar'), else the bare answer."""
    prefix = answer_prefix(prompt) if task in SENTENCE_TASKS else ""
    return f"{prefix} {answer}" if prefix else answer


_QUESTION_RES = [(re.compile(re.escape(q).replace(re.escape("{s}"), r"(?P<s>\w+)") + "$"), prefix)
                 for q, prefix in QUESTIONS.values()]


def answer_start(task: str, user: str) -> str:
    """The start of the assistant turn a probe of `task` is asked with: for a fact-shaped task
    (SENTENCE_TASKS) the answer prefix of its question, read off the question alone ('...\\nwhere
    does Bolo live?' -> 'Bolo lives in', as tinyworld's plain prompts end); else ''."""
    if task not in SENTENCE_TASKS:
        return ""
    last = user.rpartition("\n")[2]
    for pattern, prefix in _QUESTION_RES:
        m = pattern.match(last)
        if m:
            return prefix.format(s=m["s"])
    raise LmstackError(f"no tinyworld question form matches {last!r} (task {task!r})")


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


def known_questions(corpus, seed: int, n: int) -> dict[str, str]:
    """Up to n {user turn: answer} about the world's own people and countries, in the question
    forms and proportions of `invented_questions` (so "answer if known, abstain if not" is the
    only difference the model can learn), from facts tinyworld does not hold out for evaluation."""
    rng = random.Random(f"tinyworld:{seed}:sft-known")
    world = corpus.world
    facts = [f for f in world.facts() if not held_out(seed, "fact", f[0], f[1])]
    capitals = [f for f in facts if f[0] == "capital"]
    people = [f for f in facts if f[0] != "capital"]
    out: dict[str, str] = {}
    for _ in range(20 * n):
        if len(out) >= n or not facts:
            break
        pool = capitals if (rng.random() < 0.15 and capitals) or not people else people
        f = rng.choice(pool)
        prompt, answer = qa(*f)
        out.setdefault(question(prompt), reply(KNOWN, prompt, answer))
    return out


def context_block(texts: list[str]) -> str:
    """Retrieved chunks as the retrieval prompt lists them: '[1] <text> [2] <text> ...'
    (lmstack.rag.grounded.render_prompt's context; a test keeps the two equal)."""
    return " ".join(f"[{i}] {t.strip()}" for i, t in enumerate(texts, start=1))


def grounded_chats(seed: int, taken: set[str], n: int, salt: str = "train",
                   chunks: int = GROUNDED_CHUNKS) -> dict[str, str]:
    """n {user turn: answer}: a question about one of `chunks` knowledge-base-style documents of
    invented entities (tinyworld's own kb generator: the documents retrieval finds), listed
    numbered in random order as retrieval puts them in the prompt; the answer is copied from it."""
    rng = random.Random(f"tinyworld:{seed}:sft-grounded:{salt}")
    names = NameMaker(rng, set(taken))
    out: dict[str, str] = {}
    while len(out) < n:
        _, docs, qs = _kb(rng, names, TinyWorldConfig(n_kb_countries=4, n_kb_people=12))
        text = {d["id"]: d["text"] for d in docs}
        for q in rng.sample(qs, len(qs)):
            others = rng.sample([d for d in text if d != q["doc_id"]], chunks - 1)
            listed = others[:]
            listed.insert(rng.randrange(chunks), q["doc_id"])
            user = question(with_context(context_block([text[d] for d in listed]), q["prompt"]))
            out.setdefault(user, reply(GROUNDED, q["prompt"], q["answer"]))
            if len(out) >= n:
                break
    return out


def tinyworld_chats(opts: TinyWorldChats) -> ChatData:
    """The training chats and held-out probes of `opts.tasks` (see the module docstring)."""
    from lmstack.data.probes import Probe
    corpus = generate(TinyWorldConfig(seed=opts.seed, size_mb=opts.size_mb))
    wanted = set(opts.tasks)
    by_task: dict[str, dict[str, str]] = {t: {} for t in opts.tasks}   # task -> {user turn: answer}, deduped
    for rec in corpus.records:
        if rec is not None and rec["task"] in wanted and len(by_task[rec["task"]]) < opts.per_task:
            task = rec["task"]
            by_task[task].setdefault(question(rec["prompt"]), reply(task, rec["prompt"], rec["answer"]))
    probes: dict[str, list[Probe]] = {t: [] for t in opts.tasks}
    evals = {**{t: [p for p in corpus.evals["instructions"] if p["task"] == t] for t in INSTRUCTION_TASKS},
             "facts": corpus.evals["facts"], "reading": corpus.evals["reading"],
             "arithmetic": corpus.evals["arithmetic"]}
    for t in opts.tasks:
        if t in evals:
            probes[t] = [Probe(t, question(p["prompt"]), p["answer"]) for p in evals[t]]
    if KNOWN in wanted:     # as many known-entity questions as invented ones, in the same forms
        for q, a in known_questions(corpus, opts.seed, opts.per_task).items():
            if len(by_task[KNOWN]) < opts.per_task:
                by_task[KNOWN].setdefault(q, a)
    taken = corpus.world.names() | set(re.findall(r"[A-Z][a-z]+", " ".join(
        corpus.docs + [d["text"] for d in corpus.kb_docs])))
    if GROUNDED in wanted:  # held-out probes from their own draw: other invented names
        by_task[GROUNDED] = grounded_chats(opts.seed, taken, opts.per_task)
        held = grounded_chats(opts.seed, taken | _names(by_task[GROUNDED]), opts.probes_per_task, "heldout")
        probes[GROUNDED] = [Probe(GROUNDED, q, a[len(answer_start(GROUNDED, q)):].strip()) for q, a in held.items()]
    if UNSEEN in wanted:
        kb = [Probe(UNSEEN, question(q["prompt"]), ABSTAIN) for q in corpus.kb_questions]
        random.Random(f"tinyworld:{opts.seed}:sft-kb").shuffle(kb)        # countries and people mixed
        probes[UNSEEN] = kb
        by_task[UNSEEN] = dict.fromkeys(invented_questions(opts.seed, taken, opts.per_task), ABSTAIN)
    empty = [t for t in opts.tasks if not by_task[t]]
    if empty:
        raise LmstackError(f"tinyworld drew no training records for {empty} in {opts.size_mb} MB; raise the size")
    train = [{"task": t, "messages": chat(q, a)} for t in opts.tasks for q, a in by_task[t].items()]
    leaked = {p.prompt for ps in probes.values() for p in ps} & {r["messages"][0]["content"] for r in train}
    if leaked:   # tinyworld's held-out split guarantees this; checked because the scores depend on it
        raise LmstackError(f"{len(leaked)} probe questions are also training chats, e.g. {sorted(leaked)[0]!r}")
    return ChatData(train, {t: ps[:opts.probes_per_task] for t, ps in probes.items() if ps})


def _names(chats: dict[str, str]) -> set[str]:
    return set(re.findall(r"[A-Z][a-z]+", " ".join(chats)))


# --------------------------------------------------------------------------- scoring

def chat_completer(llm, tok, end_id: int, slack: int = 8, prefill: bool = True):
    """A probes.Completer: greedy, through the chat template (user turn + generation prompt, then
    `answer_start` when `prefill`), stopping at the end-of-turn token or a newline; budget per
    task: longest answer + slack."""
    from lmstack.infer import SamplingParams

    def complete(batch: list[Probe]) -> list[tuple[str, bool]]:
        budget: dict[str, int] = {}
        for p in batch:
            budget[p.task] = max(budget.get(p.task, 0), len(tok.encode_ordinary(p.answer)) + slack)
        prompts = [list(tok.render_chat([{"role": "user", "content": p.prompt}], add_generation_prompt=True)[0])
                   + (list(tok.encode_ordinary(answer_start(p.task, p.prompt))) if prefill else []) for p in batch]
        params = [SamplingParams(temperature=0.0, max_tokens=budget[p.task], stop_token_ids=[end_id], stop=["\n"])
                  for p in batch]
        outs = llm.generate(prompts, params)
        return [(o.outputs[0].text, o.outputs[0].finish_reason != "length") for o in outs]

    return complete


def evaluate_chat(model, tok, probes: dict[str, list[Probe]], end_id: int, device: str = "auto") -> dict:
    """Exact match per task of `model` answering `probes` as chats, and the abstention rates:

        {"tasks": {task: ProbeResult.to_dict()}, "mean_accuracy": float,
         "abstain_rate_unseen": float | None, "accuracy_known": float | None,
         "abstain_rate_known": float | None}     # known entities asked without the answer prefix

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

    def abstain_rate(outs: list[str]):
        return sum(exact_match(c, ABSTAIN) for c in outs) / len(outs) if outs else None
    # known entities: how often the model abstains when free to (asked without the answer prefix)
    known = [c for c, _ in chat_completer(llm, tok, end_id, prefill=False)(probes[KNOWN])] if probes.get(KNOWN) else []
    return {"tasks": tasks, "mean_accuracy": sum(r["accuracy"] for r in tasks.values()) / len(tasks),
            "abstain_rate_unseen": abstain_rate([c for p, c in completions if p.task == UNSEEN]),
            "accuracy_known": tasks.get(KNOWN, {}).get("accuracy"), "abstain_rate_known": abstain_rate(known)}
