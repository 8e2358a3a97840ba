"""`lmstack serve` end to end: start the command as a subprocess on a free port (with a
--chat-template file), call the API with the openai client, stop it; and its one-line
errors for bad arguments."""
from __future__ import annotations

import subprocess
import sys
import time

import httpx
import openai

from lmstack.cli.main import main
from lmstack.tokenizer import Tokenizer


# lmstack's own chat format written as Jinja, with a system turn of its own: proof that
# --chat-template replaced the run directory's built-in template.
TEMPLATE = ("<|system|>Be brief.<|end|>{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def test_serve_command_end_to_end(run_dir, port, tmp_path):
    template = tmp_path / "brief.jinja"
    template.write_text(TEMPLATE)
    cmd = [sys.executable, "-m", "lmstack.cli.main", "serve", str(run_dir), "--port", str(port),
           "--api-key", "sk-cli", "--max-num-seqs", "8", "--log-level", "warning", "--chat-template", str(template)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        client = openai.OpenAI(base_url=url + "/v1", api_key="sk-cli", max_retries=0)
        r = client.chat.completions.create(model=run_dir.name, messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=4, temperature=0)
        assert r.choices[0].finish_reason in ("stop", "length")
        tok = Tokenizer.load(run_dir / "tokenizer.json")
        messages = [{"role": "user", "content": "hi"}]
        want = tok.apply_chat_template([{"role": "system", "content": "Be brief."}] + messages)
        assert r.usage.prompt_tokens == len(want)
        view = httpx.post(url + "/v1/internal/tokenize", json={"messages": messages},
                          headers={"Authorization": "Bearer sk-cli"}).json()
        assert [t["id"] for t in view["tokens"]] == want
        info = httpx.get(url + "/v1/internal/model_info", headers={"Authorization": "Bearer sk-cli"}).json()
        assert info["chat_tuned_reason"] != "the server was given an engine, not a folder"   # it reads run_dir
        assert httpx.get(url + "/").text.startswith("<!doctype html>")
        assert "lmstack_requests_total" in httpx.get(url + "/metrics").text
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_serve_rejects_bad_model_dirs_in_one_line(tmp_path, capsys):
    assert main(["serve", str(tmp_path / "nope")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not found" in err
    assert main(["serve", str(tmp_path)]) == 1          # exists, but holds no model
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "config.json" in err


def test_serve_production_flags_fail_in_one_line(run_dir, tmp_path, capsys):
    cases = [(["--log-requests", str(tmp_path / "r.jsonl"), "--shadow", str(tmp_path / "nope")],
              "--shadow " + str(tmp_path / "nope") + ": model directory not found"),
             (["--shadow", str(run_dir)], "give log_path (--log-requests)"),
             (["--ab-model", str(run_dir)], "needs both the B model and a percentage"),
             (["--log-requests", str(tmp_path / "r.jsonl"), "--log-sample", "2"], "sample must be a number in [0, 1.0]")]
    for flags, needle in cases:
        assert main(["serve", str(run_dir), *flags]) == 1
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and needle in err, err
