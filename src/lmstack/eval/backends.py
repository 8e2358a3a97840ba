"""What the harness and the judge can call: a local model (through the engine) or any
OpenAI-compatible endpoint, behind the same three methods.

    model = open_model("runs/tiny")                     # or a HF folder, an LLM, "http://host:8000"
    model.loglikelihood([(context, continuation), ...])   # [(logprob, is_greedy) | Failure]
    model.loglikelihood_rolling([text, ...])              # [(logprob, n_tokens) | Failure]
    model.generate([prompt, ...], max_tokens=32, stop=["\\n"], chat=False)   # [text | Failure]

An example that cannot be scored comes back as a `Failure` naming why (its prompt does not
fit the context, the endpoint answered an error or something that is not an OpenAI
response); the other examples are scored. A pair longer than the model's context fails here
rather than being cut from the left as lm-eval (and `loglikelihood()`) would: a harness
score should not quietly rest on questions the model never saw whole. A whole backend that cannot work (a model folder
that does not load, an endpoint that does not answer /v1/models) raises LmstackError at once.

Endpoints. Generation uses /v1/completions (`chat=False`: the prompt as text) or
/v1/chat/completions (`chat=True`: the prompt as one user message), greedy. Log-likelihood
uses /v1/completions with `echo: true, logprobs: 1, max_tokens: 1` on context +
continuation (lm-eval's trailing-space rule applied first): the continuation's tokens are
those whose `text_offset` is at or after the end of the context, `is_greedy` compares each
with the top log-prob at its position (lm-eval's OpenAI rule). Servers that refuse
echo + logprobs make those examples fail with the server's message. Rolling perplexity
needs the model's tokenizer for its windows and is local only.
"""
from __future__ import annotations

import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from lmstack.eval.loglikelihood import as_llm, encode, loglikelihood_tokens, max_prompt_tokens, rolling_windows
from lmstack.eval.tasks import Failure
from lmstack.utils import LmstackError


def open_model(spec, api_key: str | None = None, **local_kwargs):
    """A run directory / HF folder / LLM -> LocalModel(spec, **local_kwargs); an http(s)
    URL -> EndpointModel(spec, api_key=api_key)."""
    if isinstance(spec, str) and spec.startswith(("http://", "https://")):
        return EndpointModel(spec, api_key=api_key)
    if isinstance(spec, (str, Path)) and not Path(spec).is_dir():
        raise LmstackError(f"model {str(spec)!r} is not a directory (run or Hugging Face folder) or an http(s) URL")
    return LocalModel(spec, **local_kwargs)


class LocalModel:
    def __init__(self, model, batch_size: int = 32, **engine_kwargs):
        self.llm, self.rules = as_llm(model, **engine_kwargs)
        self.folder = Path(model) if isinstance(model, (str, Path)) else None
        self.name = str(model) if self.folder else type(model).__name__
        self.batch_size = batch_size
        self.max_prompt = max_prompt_tokens(self.llm)
        self._chat = None               # (render messages -> ids, stop token ids), built on first use

    def info(self) -> dict:
        return {"model": self.name, "backend": "local", "context_length": self.llm.engine.max_model_len}

    def loglikelihood(self, pairs) -> list:
        out: list = [None] * len(pairs)
        todo, token_pairs = [], []
        for i, (ctx, cont) in enumerate(pairs):
            pair = self.rules.pair(ctx, cont)
            if len(pair[0]) + len(pair[1]) > self.max_prompt:
                out[i] = Failure(f"context + continuation have {len(pair[0]) + len(pair[1])} tokens; the model "
                                 f"scores at most {self.max_prompt} (context {self.llm.engine.max_model_len})")
                continue
            todo.append(i)
            token_pairs.append(pair)
        for i, res in zip(todo, loglikelihood_tokens(self.llm, token_pairs, self.batch_size)):
            out[i] = res
        return out

    def loglikelihood_rolling(self, texts) -> list:
        windows, owner, counts = [], [], []
        for i, text in enumerate(texts):
            ids = self.rules.encode(text)
            counts.append(len(ids))
            for w in rolling_windows(ids, self.rules.prefix_token, self.max_prompt - 1):
                windows.append(w)
                owner.append(i)
        totals = [0.0] * len(texts)
        for i, (lp, _) in zip(owner, loglikelihood_tokens(self.llm, windows, self.batch_size)):
            totals[i] += lp
        return [(t, n) if n else Failure("the document is empty") for t, n in zip(totals, counts)]

    def generate(self, prompts, max_tokens: int = 32, stop=None, chat: bool = False) -> list:
        from lmstack.infer import SamplingParams

        out: list = [None] * len(prompts)
        todo, ids_list, params = [], [], []
        limit = self.llm.engine.max_model_len
        for i, prompt in enumerate(prompts):
            try:
                ids = self._prompt_ids(prompt, chat)
            except (LmstackError, ValueError, KeyError) as e:
                out[i] = Failure(f"the prompt cannot be rendered: {e}")
                continue
            if len(ids) >= limit:
                out[i] = Failure(f"the prompt has {len(ids)} tokens; the model's context is {limit} "
                                 f"(with room for >= 1 generated token)")
                continue
            todo.append(i)
            ids_list.append(ids)
            params.append(SamplingParams(temperature=0.0, max_tokens=min(max_tokens, limit - len(ids)),
                                         stop=list(stop or []) or None, stop_token_ids=self._stop_ids(chat)))
        for k in range(0, len(todo), self.batch_size):
            chunk = slice(k, k + self.batch_size)
            for i, res in zip(todo[chunk], self.llm.generate(ids_list[chunk], params[chunk])):
                out[i] = Failure(f"the engine failed: {res.error}") if res.error else res.outputs[0].text
        return out

    def _prompt_ids(self, prompt: str, chat: bool) -> list[int]:
        if not chat:
            return self.rules.encode(prompt)              # with the BOS the model's HF tokenizer adds, if any
        return self._chat_format()[0]([{"role": "user", "content": prompt}])

    def _stop_ids(self, chat: bool) -> list[int] | None:
        return self._chat_format()[1] if chat else None

    def _chat_format(self):
        """The folder's own Jinja chat template (as the server uses it), else lmstack's; and
        the token that ends the assistant's turn."""
        if self._chat is None:
            tok = self.llm.tokenizer
            specials = getattr(tok, "special_tokens", {}) or {}
            template = None
            if self.folder is not None:
                from lmstack.tokenizer.chat_template import ChatTemplate
                template = ChatTemplate.from_pretrained(self.folder)
            if template is not None:
                render = lambda m: encode(tok, template.render(m, add_generation_prompt=True))  # noqa: E731
                end = template.eos_token
            elif hasattr(tok, "apply_chat_template"):
                render = lambda m: list(tok.apply_chat_template(m, add_generation_prompt=True))  # noqa: E731
                end = "<|end|>"
            else:
                raise LmstackError("this model has no chat template")
            self._chat = (render, [specials[end]] if end in specials else None)
        return self._chat


class EndpointModel:
    def __init__(self, url: str, model: str | None = None, api_key: str | None = None, timeout: float = 120.0,
                 concurrency: int = 8):
        self.base = url.rstrip("/").removesuffix("/v1")
        self.api_key, self.timeout, self.concurrency = api_key, timeout, concurrency
        try:
            listing = self._request("GET", "/v1/models")
            self.name = model or listing["data"][0]["id"]
            self.context_length = listing["data"][0].get("max_model_len")
        except EndpointError as e:
            raise LmstackError(f"endpoint {self.base} is not usable: {e}") from None
        except (KeyError, IndexError, TypeError):
            raise LmstackError(f"endpoint {self.base}: /v1/models did not list a model (not an OpenAI-compatible "
                               f"server?); pass the model name") from None

    def info(self) -> dict:
        return {"model": self.name, "backend": "endpoint", "url": self.base, "context_length": self.context_length}

    # -- HTTP -----------------------------------------------------------------------------
    def _request(self, method: str, path: str, body: dict | None = None) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        if self.api_key:
            req.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            detail = e.read()[:300].decode("utf-8", "replace")
            raise EndpointError(f"HTTP {e.code} from {path}: {detail}") from None
        except (urllib.error.URLError, OSError) as e:
            raise EndpointError(f"cannot reach {self.base}{path}: {getattr(e, 'reason', e)}") from None
        try:
            out = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise EndpointError(f"{path} answered something that is not JSON: {raw[:80]!r}") from None
        if not isinstance(out, dict):
            raise EndpointError(f"{path} answered JSON that is not an object: {raw[:80]!r}")
        return out

    def _map(self, fn, items) -> list:
        """fn over items, `concurrency` requests in flight; an exception becomes that item's Failure."""
        def guarded(item):
            try:
                return fn(item)
            except EndpointError as e:
                return Failure(str(e))
            except (KeyError, IndexError, TypeError, ValueError) as e:
                return Failure(f"the endpoint's answer is not an OpenAI response ({type(e).__name__}: {e})")
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(guarded, items))

    # -- the three methods ----------------------------------------------------------------
    def generate(self, prompts, max_tokens: int = 32, stop=None, chat: bool = False) -> list:
        common = {"model": self.name, "max_tokens": max_tokens, "temperature": 0.0}
        if stop:
            common["stop"] = list(stop)

        def one(prompt: str):
            if chat:
                out = self._request("POST", "/v1/chat/completions",
                                    {**common, "messages": [{"role": "user", "content": prompt}]})
                text = out["choices"][0]["message"]["content"]
            else:
                text = self._request("POST", "/v1/completions", {**common, "prompt": prompt})["choices"][0]["text"]
            if not isinstance(text, str):
                raise TypeError(f"the completion text is {type(text).__name__}, not a string")
            return text
        return self._map(one, prompts)

    def loglikelihood(self, pairs) -> list:
        def one(pair):
            ctx, cont = pair
            n_spaces = len(ctx) - len(ctx.rstrip())
            if n_spaces:
                ctx, cont = ctx[:-n_spaces], ctx[-n_spaces:] + cont
            text = ctx + cont
            lp = self._request("POST", "/v1/completions", {"model": self.name, "prompt": text, "echo": True,
                                                           "logprobs": 1, "max_tokens": 1, "temperature": 0.0}
                               )["choices"][0]["logprobs"]
            total, greedy, n = 0.0, True, 0
            for off, value, top in zip(lp["text_offset"], lp["token_logprobs"], lp["top_logprobs"]):
                if off < len(ctx) or off >= len(text):     # the context, or the token generated after
                    continue
                if value is None:
                    raise ValueError("a continuation token has no log-prob")
                total += float(value)
                greedy = greedy and top is not None and float(value) >= max(map(float, top.values()))
                n += 1
            if n == 0:
                raise ValueError("no token of the echoed prompt starts inside the continuation")
            return total, greedy
        return self._map(one, pairs)

    def loglikelihood_rolling(self, texts) -> list:
        return [Failure("rolling-window perplexity needs the model's tokenizer; score the model locally "
                        "(its run directory or HF folder)")] * len(texts)


class EndpointError(Exception):
    """One request to an endpoint failed (HTTP error, unreachable, not JSON)."""
