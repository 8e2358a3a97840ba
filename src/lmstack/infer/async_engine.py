"""`AsyncLLM`: the engine for servers. One background thread runs the step loop; asyncio
code submits requests and consumes streams without ever waiting on model compute.

    engine = AsyncLLM("runs/tiny")
    async for out in engine.generate("Hello", SamplingParams(max_tokens=32), request_id="r1"):
        print(out.outputs[0].text)          # cumulative text so far; out.finished at the end
    await engine.abort("r1"); engine.stats(); await engine.shutdown()
    await engine.update_weights(policy.state_dict())    # applied between two steps

Threading: only the engine thread touches the scheduler, the KV cache and the weights. The
event loop talks to it through a command queue (add / abort / update_weights, applied
before the next step, so a weight update never lands in the middle of a forward) and gets
outputs back through one `asyncio.Queue` per request, filled with
`loop.call_soon_threadsafe`. Validation (tokenizing, length checks) runs in the caller, so a
bad request raises `RequestError` at once and never reaches the loop; other requests are
unaffected. A request whose consumer stops iterating (client gone) is aborted. A request
that fails inside the engine ends with `RequestOutput.error` set (outputs.py); a failed
forward ends every request in it with the exception raised from its stream.
"""
from __future__ import annotations

import asyncio
import queue
import threading
import uuid
from typing import AsyncIterator

from lmstack.infer.engine import LLMEngine, RequestError
from lmstack.infer.outputs import RequestOutput
from lmstack.infer.sampling_params import SamplingParams


class AsyncLLM:
    def __init__(self, model, tokenizer=None, **engine_kwargs):
        self.engine = LLMEngine(model, tokenizer, **engine_kwargs)
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._wake = threading.Event()
        self._running = True
        self._stats = self.engine.stats()
        self._thread = threading.Thread(target=self._loop, name="lmstack-engine", daemon=True)
        self._thread.start()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def model(self):
        return self.engine.model

    # -- event-loop side ------------------------------------------------------------------
    @property
    def lora_names(self) -> list[str]:
        """The LoRA adapters served over the base (AsyncLLM(..., lora={name: dir}))."""
        return self.engine.lora_names

    async def generate(self, prompt, sampling_params: SamplingParams | None = None,
                       request_id: str | None = None, lora_request=None) -> AsyncIterator[RequestOutput]:
        """`lora_request`: an adapter name or a LoRARequest (infer/lora.py); None = the base."""
        if not self._running:
            raise RuntimeError("AsyncLLM has been shut down")
        request = self.engine.check_request(prompt, sampling_params, lora_request)   # raises RequestError now
        request_id = request_id if request_id is not None else uuid.uuid4().hex
        if request_id in self._streams:
            raise RequestError(f"request_id {request_id!r} is already in use")
        q: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), q)
        self._send(("add", request_id, request))
        finished = False
        try:
            while not finished:
                item = await q.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._send(("abort", request_id))

    async def abort(self, request_id: str) -> None:
        self._send(("abort", request_id))

    async def update_weights(self, weights) -> None:
        """`LLMEngine.update_weights` between two steps (requests in flight are preempted by
        recompute and go on under the new weights); raises its WeightsError here."""
        if not self._running:
            raise RuntimeError("AsyncLLM has been shut down")
        done = asyncio.get_running_loop().create_future()
        self._send(("update_weights", weights, done))
        await done

    def stats(self) -> dict:
        """Engine stats as of the last step (a snapshot; safe to call from any thread)."""
        return dict(self._stats)

    async def shutdown(self) -> None:
        self._running = False
        self._wake.set()
        await asyncio.to_thread(self._thread.join)

    def _send(self, command: tuple) -> None:
        self._commands.put(command)
        self._wake.set()

    # -- engine-thread side ---------------------------------------------------------------
    def _deliver(self, request_id: str, item) -> None:
        stream = self._streams.get(request_id)
        if stream is None:
            return
        loop, q = stream
        try:
            loop.call_soon_threadsafe(q.put_nowait, item)
        except RuntimeError:      # the consumer's loop is closed; nobody is listening
            pass

    def _apply_commands(self) -> None:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if cmd[0] == "add":
                _, rid, request = cmd
                if rid not in self._streams:       # abandoned before it started
                    continue
                try:
                    self.engine.add_request(request, request_id=rid)
                except RequestError as e:
                    self._deliver(rid, e)
            elif cmd[0] == "update_weights":
                _, weights, done = cmd
                try:
                    self.engine.update_weights(weights)
                    _settle(done, None)
                except Exception as e:
                    _settle(done, e)
            else:
                out = self.engine.abort_request(cmd[1])
                if out is not None:
                    self._deliver(cmd[1], out)

    def _loop(self) -> None:
        while self._running:
            self._apply_commands()
            if not self.engine.has_unfinished_requests():
                self._stats = self.engine.stats()
                self._wake.wait()
                self._wake.clear()
                continue
            try:
                outs = self.engine.step()
            except Exception as e:  # a failed forward fails its requests, not the server
                for rid in list(self.engine.requests):
                    self.engine.abort_request(rid)
                    self._deliver(rid, e)
                continue
            for out in outs:
                self._deliver(out.request_id, out)
            self._stats = self.engine.stats()
        for rid in list(self.engine.requests):   # shutdown: end every open stream
            out = self.engine.abort_request(rid)
            if out is not None:
                self._deliver(rid, out)
        while True:                              # and every weight update still queued
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                break
            if cmd[0] == "update_weights":
                _settle(cmd[2], RuntimeError("AsyncLLM shut down before the weight update was applied"))


def _settle(done: asyncio.Future, error: BaseException | None) -> None:
    """Complete an event-loop future from the engine thread."""
    def settle():
        if done.cancelled():
            return
        if error is None:
            done.set_result(None)
        else:
            done.set_exception(error)
    try:
        done.get_loop().call_soon_threadsafe(settle)
    except RuntimeError:      # the caller's loop is closed; nobody is waiting
        pass
