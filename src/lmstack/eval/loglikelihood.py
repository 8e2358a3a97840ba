"""Log-likelihood of continuations through the inference engine, lm-evaluation-harness's way.

    from lmstack.eval import loglikelihood, loglikelihood_rolling
    loglikelihood("runs/tiny", [("Q: 2+2=", "4"), ("Q: 2+2=", "5")], batch_size=16)
    # -> [(logprob_sum, is_greedy), ...]   one per (context, continuation) pair
    loglikelihood_rolling(llm, ["a whole document ..."])   # -> [logprob_sum of every token]

The rules are lm-eval's (`HFLM`), so the numbers agree with it on the same model:

* a pair is split as `_encode_pair` does: trailing whitespace of the context moves to the
  front of the continuation; the context's tokens are `encode(context)`, the continuation's
  are the tokens of `encode(context + continuation)` after the first len(context tokens);
  the model reads context tokens + continuation tokens;
* an empty context becomes the prefix token (BOS if the tokenizer names one, else
  end-of-text), unless the continuation already starts with it, in which case that first
  token is the context;
* text is encoded as the model's HF tokenizer encodes it: special-token text becomes the
  token, and where that tokenizer adds a BOS itself (Llama-style folders) so do we;
* a pair too long for the model keeps its last tokens (truncated from the left);
* `is_greedy`: every continuation token is the model's argmax at its position;
* a continuation with no tokens of its own (it merged into the context's last token)
  scores (0.0, True), log 1 (lm-eval asserts instead);
* rolling windows (perplexity) are `get_rolling_token_windows` + `make_disjoint_window`:
  the first window starts from the prefix token, each token is scored exactly once, with as
  much context as fits (`context_len` = 1: windows of `max_length` back to back, each
  reading the one token before it; larger: each window after the first reads the
  `context_len` tokens before it and predicts `max_length - context_len + 1`).

Lengths. The engine scores a prompt of at most `max_model_len - 1` tokens (it always samples
one token after it). lm-eval's `max_length` counts the model's input, which is one token
shorter than context + continuation, so ours is `max_model_len - 2`; pass HFLM that
`max_length` to compare truncated inputs.

How it runs. Each pair is an engine request for context + continuation with
`prompt_logprobs` on from the first continuation token (`prompt_logprobs_start`): the
engine returns log p(token | everything before) for those tokens, and its prefix cache may
serve the context's full KV blocks. Requests admitted in one step cannot share blocks, so a
request that reuses another's prefix is sent one engine call later:
* each context has a leader that computes it; its other choices follow in the next call and
  recompute only the part of the context's last block before the continuation. Where a
  choice is one token long (answers like " Paris") and others are too, or are longer, the
  leader scores the whole vocabulary at the first continuation position
  (`prompt_logprobs=-1`), which answers every one-token choice at once (lm-eval's logits
  cache does the same): the leader is a longer choice's own request where there is one,
  else context + one of the one-token choices;
* contexts are sorted, and each that shares at least one full block with an earlier one
  (few-shot prompts that open alike) follows the first context holding its longest shared
  prefix, one call later, finding those blocks cached: each distinct prefix is computed about
  once (a token trie of the contexts), the last partial block aside;
* each call takes the ready requests that compute the most tokens, and only those within
  1/8 of the first (or 8 tokens), so rows of one forward pass have similar lengths (little
  padding); `batch_size` caps the requests per call.
Multiple choice with 4 options computes each question once, not 4 times
(`llm.stats()["prompt_tokens"]` counts what was computed).

Batch size. Results agree across batch sizes to ~1e-5 on sums of tens of tokens, not bit for
bit: a float32 matmul over 1, 2-3 or >= 4 rows takes a different BLAS kernel (and summation
order), and the batch decides how many rows each forward has. Tests hold them within 1e-4.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from lmstack.utils import LmstackError

Pair = tuple[str, str]
TokenPair = tuple[list[int], list[int]]


# ------------------------------------------------------------------ the model
@dataclass(frozen=True)
class TextRules:
    """How text becomes scored ids for one model, as HFLM encodes it with the model's HF
    tokenizer: `prefix_token` stands for an empty context; `bos` is prepended to encoded text
    when that tokenizer adds a BOS itself (Llama-style folders; never for lmstack runs)."""
    tokenizer: object
    prefix_token: int
    bos: int | None = None

    def encode(self, text: str) -> list[int]:
        return encode(self.tokenizer, text, self.bos)

    def pair(self, context: str, continuation: str, memo: dict[str, list[int]] | None = None) -> TokenPair:
        return encode_pair(self.tokenizer, context, continuation, self.prefix_token, self.bos, memo)


def as_llm(model, **engine_kwargs):
    """(LLM, TextRules) for a run directory, a HF folder or an `LLM`."""
    from lmstack.infer import LLM

    if isinstance(model, LLM):
        return model, TextRules(model.tokenizer, prefix_token_id(model))
    if not isinstance(model, (str, Path)):
        raise LmstackError(f"model must be a run directory, a Hugging Face folder or an lmstack LLM, "
                           f"got {type(model).__name__}")
    # Small KV blocks: the prefix cache shares whole blocks, so each choice recomputes the part
    # of its context's last block before the continuation: at most 3 tokens with blocks of 4
    # instead of 15 with the engine's default 16; the block bookkeeping stays negligible.
    # A step budget that holds a batch of whole contexts: a context split over two steps costs a step.
    llm = LLM(str(model), **{"block_size": 4, "max_num_batched_tokens": 8192, **engine_kwargs})
    if llm.tokenizer is None:
        raise LmstackError(f"{model} has no tokenizer.json; text pairs need the model's tokenizer")
    folder = Path(model)
    return llm, TextRules(llm.tokenizer, prefix_token_id(llm, folder), added_bos(folder, llm.tokenizer))


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _token_name(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value if isinstance(value, str) else None


def prefix_token_id(llm, folder: Path | None = None) -> int:
    """The token an empty context stands for: the folder's BOS (tokenizer_config.json
    `bos_token`, if it is one of the tokenizer's tokens), else end-of-text, as lm-eval's
    `prefix_token_id` (bos_token_id, else eos_token_id)."""
    specials = getattr(llm.tokenizer, "special_tokens", {}) or {}
    if folder is not None:
        bos = _token_name(_json(folder / "tokenizer_config.json").get("bos_token"))
        if bos in specials:
            return specials[bos]
    eot = getattr(llm.tokenizer, "eot_token", None)
    if eot is not None:
        return eot
    if llm.engine.eos_token_id is not None:
        return llm.engine.eos_token_id
    raise LmstackError("the model has neither a BOS nor an end-of-text token to stand for an empty context")


def added_bos(folder: Path, tokenizer) -> int | None:
    """The BOS id the folder's HF tokenizer puts before every encoded text, or None:
    tokenizer_config.json `add_bos_token` when set (transformers rebuilds the post-processor
    from it), else a TemplateProcessing post-processor that starts with a special token."""
    specials = getattr(tokenizer, "special_tokens", {}) or {}
    config = _json(folder / "tokenizer_config.json")
    if isinstance(config.get("add_bos_token"), bool):
        return specials.get(_token_name(config.get("bos_token"))) if config["add_bos_token"] else None
    post = _json(folder / "tokenizer.json").get("post_processor")
    steps = post.get("processors", []) if isinstance(post, dict) and post.get("type") == "Sequence" else [post]
    for step in steps:
        if isinstance(step, dict) and step.get("type") == "TemplateProcessing" and step.get("single"):
            first = step["single"][0]
            name = first.get("SpecialToken", {}).get("id") if isinstance(first, dict) else None
            return specials.get(name)
    return None


def encode(tokenizer, text: str, bos: int | None = None) -> list[int]:
    """Text -> ids as the engine and a HF tokenizer do: special-token text becomes the token;
    with `bos`, that token first unless the text already starts with it (HFLM's rule)."""
    ids = tokenizer.encode(text, allowed_special="all")
    return [bos] + ids if bos is not None and ids[:1] != [bos] else ids


def encode_pair(tokenizer, context: str, continuation: str, prefix_token: int,
                bos: int | None = None, memo: dict[str, list[int]] | None = None) -> TokenPair:
    """(context ids, continuation ids) by lm-eval's rule (module docstring). `memo`: a dict
    that keeps each context's ids, so the choices of one question encode it once."""
    if context == "":
        cont = encode(tokenizer, continuation)          # HFLM: add_special_tokens=False here
        if cont and cont[0] == prefix_token:
            return cont[:1], cont[1:]
        return [prefix_token], cont
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = encode(tokenizer, context + continuation, bos)
    ctx = memo.get(context) if memo is not None else None
    if ctx is None:
        ctx = encode(tokenizer, context, bos)
        if memo is not None:
            memo[context] = ctx
    return ctx, whole[len(ctx):]


# ------------------------------------------------------------------ scoring token pairs
def fit(pair: TokenPair, max_prompt: int) -> tuple[list[int], int]:
    """(prompt ids, index of the first continuation token) for one pair, truncated from the
    left to `max_prompt` tokens. Raises when the continuation leaves no room for context."""
    ctx, cont = pair
    if len(cont) > max_prompt - 1:
        raise LmstackError(f"the continuation has {len(cont)} tokens; with at least one token of context "
                           f"it cannot fit the model's {max_prompt} scorable tokens")
    whole = (list(ctx) + list(cont))[-max_prompt:]
    return whole, len(whole) - len(cont)


def max_prompt_tokens(llm) -> int:
    """Longest prompt the engine scores: its context minus the one token it always samples."""
    return llm.engine.max_model_len - 1


def loglikelihood_tokens(llm, pairs: Sequence[TokenPair], batch_size: int = 16) -> list[tuple[float, bool]]:
    """(sum of log p(continuation token | before), all argmax) per (context ids, continuation
    ids) pair, in order. A pair with an empty continuation scores (0.0, True): log 1."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise LmstackError(f"batch_size must be a positive int, got {batch_size!r}")
    max_prompt = max_prompt_tokens(llm)
    prompts: list[tuple[list[int], int] | None] = []
    for i, pair in enumerate(pairs):
        if not pair[1]:
            prompts.append(None)
            continue
        try:
            prompts.append(fit(pair, max_prompt))
        except LmstackError as e:
            raise LmstackError(f"pair {i}: {e}") from None
    results: list[tuple[float, bool]] = [(0.0, True)] * len(pairs)
    ready = _plan_requests(prompts, llm.engine.block_manager.block_size)
    while ready:
        # the costliest first, and only requests of about its cost (1/8 or 8 tokens less), so
        # that the rows of a forward pass have similar lengths: little padding
        ready.sort(key=lambda r: -r.cost)
        n, top = 1, ready[0].cost
        while n < min(batch_size, len(ready)) and ready[n].cost >= top - max(8, top // 8):
            n += 1
        call, ready = ready[:n], ready[n:]
        _run(llm, call, prompts, results)
        ready += [r for done in call for r in done.then]
    return results


def _plan_requests(prompts, block: int) -> list["_Request"]:
    """The requests that can run first; each holds in `then` those that wait for it.

    A request whose prefix another computes waits for it: it is admitted in a later engine
    call, when those blocks are in the prefix cache (requests admitted together cannot share
    them). A context waits for the one that holds its longest shared prefix (`_parents`); a
    context's other choices wait for its leader."""
    groups: dict[tuple, list[int]] = {}                 # context ids -> its pairs, in order
    for i, p in enumerate(prompts):
        if p is not None:
            groups.setdefault(tuple(p[0][:p[1]]), []).append(i)
    contexts = sorted(groups)
    leads = [_plan(groups[c], prompts, block) for c in contexts]
    roots = []
    for i, (parent, cached) in enumerate(_parents(contexts, block)):
        if parent is None:
            roots.append(leads[i])
        else:
            leads[i].cached = cached
            leads[parent].then.append(leads[i])
    return roots


def _parents(contexts: list[tuple], block: int) -> list[tuple[int | None, int]]:
    """Sorted contexts -> (index of the context it waits for or None, tokens it finds cached).

    The longest prefix a context shares with any context before it in sorted order is the
    one it shares with the context just before it; counted in whole KV blocks (and leaving its
    last token to compute), that is what the prefix cache can serve. Of the contexts that hold
    that prefix, it waits for the first, so that chains stay as short as the prefixes nest
    (few-shot prompts: one level per shared example), not as long as the list."""
    out: list[tuple[int | None, int]] = []
    shared = [0] * len(contexts)                        # shared[i]: common prefix of i-1 and i
    for i, c in enumerate(contexts):
        if i:
            shared[i] = _common(contexts[i - 1], c)
        cached = min(shared[i], len(c) - 1) // block * block
        if cached == 0:
            out.append((None, 0))
            continue
        j = i - 1
        while j > 0 and shared[j] >= cached:            # contexts[j - 1] holds the prefix too
            j -= 1
        out.append((j, cached))
    return out


def _common(a: tuple, b: tuple) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@dataclass
class _Request:
    """One engine request: `prompt` scored from position `start`; `pairs` are the pairs it
    scores (a leader with `full` scores every one-token choice of its context from one row,
    and its own longer one, first in `pairs`, if it has one);
    `then`: the requests that reuse its blocks, admitted after it; `cached`: the tokens the
    prefix cache is expected to serve, so `cost` is the tokens it computes."""
    prompt: list[int]
    start: int
    pairs: list[int]
    full: bool = False
    then: list["_Request"] = field(default_factory=list)
    cached: int = 0

    @property
    def cost(self) -> int:
        return len(self.prompt) - self.cached


def _plan(members: list[int], prompts, block: int) -> _Request:
    """The leader of one context's pairs, the others in its `then`. Where one-token
    continuations and others meet (two or more one-token ones, or one and a longer one), the
    leader's row at the first continuation position is scored over the whole vocabulary: it
    answers every one-token continuation (lm-eval's logits cache does the same). That leader
    is the first longer continuation's own request (it scores itself too), else context + one
    of the one-token continuations; each other longer continuation is a request of its own.
    Otherwise the first pair leads. The others find the context's whole blocks before its
    last token cached."""
    ids, start = prompts[members[0]]
    reuse = (start - 1) // block * block
    ones = [i for i in members if len(prompts[i][0]) - start == 1]
    longer = [i for i in members if len(prompts[i][0]) - start > 1]
    if ones and (longer or len(ones) >= 2):
        prompt = prompts[longer[0]][0] if longer else ids[:start] + [prompts[ones[0]][0][-1]]
        return _Request(prompt, start, longer[:1] + ones, full=True,
                        then=[_Request(*prompts[i], [i], cached=reuse) for i in longer[1:]])
    alone = [_Request(*prompts[i], [i], cached=reuse) for i in members]
    alone[0].cached = 0
    alone[0].then = alone[1:]
    return alone[0]


def _run(llm, requests: list[_Request], prompts, results) -> None:
    from lmstack.infer import SamplingParams

    params = [SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=-1 if r.full else 0,
                             prompt_logprobs_start=r.start) for r in requests]
    outs = llm.generate([r.prompt for r in requests], params)
    for r, out in zip(requests, outs):
        if out.error is not None:
            raise LmstackError(f"pair {r.pairs[0]}: the engine failed it: {out.error}")
        if not r.full:
            results[r.pairs[0]] = _score(out, r.prompt, r.start)
            continue
        row = out.prompt_logprobs[r.start]                      # every token of the vocabulary
        for i in r.pairs:
            if len(prompts[i][0]) - r.start > 1:                 # the leader's own longer continuation
                results[i] = _score(out, r.prompt, r.start)
                continue
            lp = row[prompts[i][0][-1]]
            results[i] = (lp.logprob, lp.rank == 1)


def _score(out, ids: list[int], start: int) -> tuple[float, bool]:
    total, greedy = 0.0, True
    for pos in range(start, len(ids)):
        lp = out.prompt_logprobs[pos][ids[pos]]
        total += lp.logprob
        greedy = greedy and lp.rank == 1
    return total, greedy


# ------------------------------------------------------------------ the public API
def loglikelihood(model, pairs: Sequence[Pair], batch_size: int = 16) -> list[tuple[float, bool]]:
    """[(log p(continuation | context), is_greedy)] for (context, continuation) string pairs.

    `model`: a run directory, a Hugging Face folder, or an `lmstack.infer.LLM`. Splitting,
    empty contexts and truncation follow lm-eval's HFLM (module docstring); `batch_size`
    (requests per engine call) changes the speed, and the numbers only in float32 rounding."""
    llm, rules = as_llm(model)
    token_pairs, contexts = [], {}
    for i, pair in enumerate(pairs):
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(s, str) for s in pair)):
            raise LmstackError(f"pairs[{i}] must be a (context, continuation) pair of strings, got {pair!r:.80}")
        token_pairs.append(rules.pair(pair[0], pair[1], contexts))
    return loglikelihood_tokens(llm, token_pairs, batch_size)


def rolling_windows(tokens: list[int], prefix_token: int, max_length: int,
                    context_len: int = 1) -> Iterator[TokenPair]:
    """lm-eval's disjoint rolling windows over `tokens`: (context, continuation) pairs whose
    continuations partition `tokens`; each context + continuation holds <= max_length + 1
    tokens (the model reads max_length of them)."""
    if not 1 <= context_len <= max_length:
        raise LmstackError(f"context_len must be in [1, max_length={max_length}], got {context_len}")
    if not tokens:
        return
    pred_len = max_length - context_len + 1
    first = min(max_length, len(tokens))
    yield [prefix_token], tokens[:first]
    done = first
    while done < len(tokens):
        n = min(len(tokens) - done, pred_len)
        end = done + n
        window = tokens[max(end - max_length - 1, 0):end - 1]          # the model's input
        yield window[:len(window) - (n - 1)], tokens[end - n:end]    # context = input minus the scored part
        done = end


def loglikelihood_rolling(model, texts: Sequence[str], batch_size: int = 16, max_length: int | None = None,
                          context_len: int = 1) -> list[float]:
    """Sum of log p(token | context) over every token of each text (lm-eval's rolling
    loglikelihood; the first token is predicted from the prefix token). `max_length`
    defaults to the longest the engine scores (max_model_len - 2)."""
    llm, rules = as_llm(model)
    limit = max_prompt_tokens(llm) - 1
    max_length = limit if max_length is None else max_length
    if not 1 <= max_length <= limit:
        raise LmstackError(f"max_length must be in [1, {limit}] for this model (context "
                           f"{llm.engine.max_model_len}), got {max_length}")
    windows, owner = [], []
    for i, text in enumerate(texts):
        for w in rolling_windows(rules.encode(text), rules.prefix_token, max_length, context_len):
            windows.append(w)
            owner.append(i)
    totals = [0.0] * len(texts)
    for i, (lp, _) in zip(owner, loglikelihood_tokens(llm, windows, batch_size)):
        totals[i] += lp
    return totals
