"""Fixtures for the serving tests: a tiny random model saved as a run dir, and a real
uvicorn server for it on a free loopback port (started once per session, in a thread)."""
from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch

TEXT = ("Once upon a time there was a little cat who liked to sit on a warm mat. The quick brown fox "
        "jumps over the lazy dog. Alice counted: one, two, three, four, five. Bob said hello to the "
        "world and the world said hello back. ") * 20
SPECIALS = ["<|endoftext|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
CONTEXT = 256
MAX_N = 4             # the session server's --max-n


def train_tokenizer():
    from lmstack.tokenizer import Tokenizer

    return Tokenizer.train([TEXT], vocab_size=400, special_tokens=SPECIALS)


def build_run_dir(path: Path, context_length: int = CONTEXT) -> Path:
    from lmstack.model import ModelConfig, Transformer

    tok = train_tokenizer()
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny", vocab_size=tok.n_vocab, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                             context_length=context_length)
    Transformer(cfg).save_pretrained(path)
    tok.save(path / "tokenizer.json")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    app: object
    run_dir: Path

    @property
    def state(self):
        return self.app.state.lm

    def metric(self, name: str) -> float:
        for line in httpx.get(self.url + "/metrics").text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise KeyError(name)


def start_server(app, timeout: float = 60.0):
    """Run `app` under uvicorn in a daemon thread; returns (url, stop)."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if not thread.is_alive():
            raise RuntimeError("server thread died during startup")
        time.sleep(0.1)
    else:
        raise RuntimeError("server did not start")

    def stop():
        server.should_exit = True
        thread.join(timeout=10)

    return url, stop


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory) -> Path:
    return build_run_dir(tmp_path_factory.mktemp("serve_run"))


@pytest.fixture(scope="session")
def server(run_dir):
    from lmstack.serve.app import create_app

    app = create_app(str(run_dir), max_n=MAX_N, max_body_bytes=64 * 1024,
                     engine_kwargs={"max_num_seqs": 64, "kv_cache_tokens": 8192})
    url, stop = start_server(app)
    yield Server(url=url, app=app, run_dir=run_dir)
    stop()


@pytest.fixture(scope="session")
def launch():
    """`url, stop = launch(app)`: another server, for tests that need other flags."""
    return start_server


@pytest.fixture
def port() -> int:
    return free_port()
