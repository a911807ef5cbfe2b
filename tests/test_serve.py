"""`doit serve`: the default spec's release served by the real llama-server, asked through its
OpenAI-compatible API, stopped with Ctrl-C; a busy port and a variant that is not built are refused."""

import json
import signal
import subprocess
import sys
import urllib.request

import pytest
from helpers import REPO, _free_port, doit

from stages import accuracy
from stages.ground.spec import load_spec

pytestmark = pytest.mark.slow


def start_serving(spec, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "doit", "run", "-f", str(REPO / "dodo.py"), "serve", *args,
                             f"spec={spec}"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def chat(url: str, messages: list[dict], max_tokens: int) -> tuple[str, str]:
    body = {"messages": messages, "temperature": 0, "max_tokens": max_tokens}
    request = urllib.request.Request(url + "/v1/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        choice = json.loads(response.read())["choices"][0]
    return choice["message"]["content"], choice["finish_reason"]  # "stop": it ended its turn; "length": cut off


def test_doit_serve_answers_in_the_trained_style_and_stops_on_ctrl_c(default_build):
    spec_path = default_build["spec"]
    port = _free_port()
    server = start_serving(spec_path, "variant=Q4_K_M", f"port={port}")
    try:
        lines = []
        for line in server.stdout:  # until it says where it serves
            lines.append(line)
            if line.startswith("serving "):
                break
        assert f"http://127.0.0.1:{port}/v1" in lines[-1], "".join(lines)
        assert f"curl http://127.0.0.1:{port}/v1/chat/completions" in next(server.stdout)  # an example to try

        # Held-out questions asked as a chat client asks them: answered in the trained style ("Answer: …"),
        # ending the turn by itself. (llama-server's defaults, flash attention included, as Docker Model
        # Runner runs it; the parity task compares every answer with the eval's, kernel for kernel.)
        spec = load_spec(spec_path)
        model = spec.models[0]
        for turns, _ in accuracy.conversations(model.eval, model.train)[:5]:
            answer, finish = chat(f"http://127.0.0.1:{port}", list(turns), 48)
            assert answer.startswith("Answer:") and finish == "stop", (answer, finish)

        busy = doit(spec_path, "serve", "variant=Q4_K_M", f"port={port}", check=False)
        assert busy.returncode != 0 and f"port {port} on 127.0.0.1 is in use" in busy.output
        assert "Traceback" not in busy.output
    finally:
        server.send_signal(signal.SIGINT)
        rest, _ = server.communicate(timeout=60)
    assert server.returncode == 0, rest
    assert "stopped serving smollm2-demo Q4_K_M" in rest


def test_doit_serve_refuses_a_variant_that_is_not_built_naming_those_that_are(default_build):
    refused = doit(default_build["spec"], "serve", "variant=Q2_K", check=False)
    assert refused.returncode != 0 and "Traceback" not in refused.output
    assert "smollm2-demo Q2_K is not a built release" in refused.output
    assert "built: Q4_K_M, Q8_0, lora" in refused.output
