"""Stage 2's language-model client against servers that misbehave (issue 22): redirects that
would carry the key elsewhere, answers that crashed the stage (content parts that are not
text, JSON nested thousands deep, lone surrogates), answers that never end, rate limits with
Retry-After, user:password@ URLs; and descriptions files too big or too odd to mine as given.

Every server here binds 127.0.0.1, answers a bounded number of requests and stops by itself
(after its requests or its lifetime, whichever comes first).
"""
import contextlib
import importlib
import io
import json
import os
import re
import sys
import threading
import time
import types
from http.server import BaseHTTPRequestHandler, HTTPServer

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["no_proxy"] = os.environ["NO_PROXY"] = "127.0.0.1,localhost"  # the servers are local

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402

mine = importlib.import_module("02_mine")

SECRET = "sk-hostile-DO-NOT-SEND-9191"
PASSWORD = "pw-in-the-url-DO-NOT-WRITE-5150"
TINY = ["--dataset", "toy-tiny", "--clip", "toy-clip-tiny", "--device", "cpu"]


@contextlib.contextmanager
def local_server(answer, max_requests=20, lifetime=60.0):
    """An HTTP server on 127.0.0.1 whose every request is answered by answer(handler, body);
    it records (path, headers, body) of each request in .requests and stops by itself after
    max_requests requests or `lifetime` seconds (or when the with-block ends)."""
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            srv.requests.append((self.path, dict(self.headers), body))
            srv.times.append(time.monotonic())
            try:
                answer(self, body)
            except (BrokenPipeError, ConnectionResetError):  # the client stopped reading
                pass
            self.close_connection = True

        do_GET = do_POST

        def log_message(self, *args):
            pass

    srv = HTTPServer(("127.0.0.1", 0), Handler)
    srv.timeout, srv.requests, srv.times = 0.2, [], []
    stop, deadline = threading.Event(), time.monotonic() + lifetime

    def loop():
        while (not stop.is_set() and len(srv.requests) < max_requests
               and time.monotonic() < deadline):
            srv.handle_request()
    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}/v1"
    try:
        yield srv
    finally:
        stop.set()
        thread.join(5)
        srv.server_close()


def send(handler, code=200, data=b"", headers=()):
    handler.send_response(code)
    for k, v in headers:
        handler.send_header(k, v)
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


def completion(content):
    """The body of a chat completion whose message content is `content` (any JSON value)."""
    message = {"role": "assistant", "content": content}
    return json.dumps({"choices": [{"index": 0, "finish_reason": "stop",
                                    "message": message}]}).encode()


def good(handler, body):
    send(handler, 200, completion("- a red fox\n- a bushy tail"),
         [("Content-Type", "application/json")])


def llm_args(run, **kw):
    return types.SimpleNamespace(**{
        "run": str(run), "llm_prompt": "Describe the {name} in {n} lines.", "llm_n": 5,
        "llm_timeout": 5, "llm_retries": 0, "llm_backoff": 0, "llm_give_up": 0, "llm_workers": 1,
        "llm_max_tokens": 0,
        **kw})


# ----------------------------------------------------------------------------------
# A redirect is refused: the key never goes to the host a server names

@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_redirect_is_refused_and_the_target_never_gets_the_key(code, tmp_path):
    with local_server(good) as target:
        location = f"{target.url}/chat/completions"
        with local_server(lambda h, b: send(h, code, b"", [("Location", location)])) as redirector:
            url = mine.parse_llm_spec(f"{redirector.url}@m")[1]
            error = None
            try:
                mine.chat(url, "m", "hi", key=SECRET, timeout=5)
            except mine.LLMError as e:
                error = e
            assert [h.get("Authorization") for _, h, _ in target.requests] == []  # the key stays
            assert re.fullmatch(rf"HTTP {code} redirect not followed .*", str(error))
            assert not error.retry  # a redirect will not fix itself
            # ...and in a run it is a failure of that model like any other; nothing is retried
            src = f"llm:m@{redirector.url}"
            answers, failed = mine.ask_llms([(src, url, "m")], ["red fox", "grey wolf"],
                                            llm_args(tmp_path, llm_retries=2), SECRET)
            assert answers[src] == {} and set(failed[src]) == {"red fox", "grey wolf"}
            assert all("not followed" in r for r in failed[src].values())
            assert len(redirector.requests) == 3  # one request per question, no retry
        assert target.requests == []  # never asked, so never sent the key
    assert not os.path.exists(tmp_path / "cache" / "llm")


def test_a_server_that_echoes_the_key_in_its_status_line_is_not_quoted(tmp_path):
    def echo(handler, body):  # the reason phrase of the status line holds the request's key
        handler.send_response(500, handler.headers.get("Authorization"))
        handler.send_header("Content-Length", "0")
        handler.end_headers()
    with local_server(echo) as srv:
        url = mine.parse_llm_spec(f"{srv.url}@m")[1]
        with pytest.raises(mine.LLMError) as e:
            mine.chat(url, "m", "hi", key=SECRET, timeout=5)
    assert str(e.value) == "HTTP 500 Internal Server Error" and SECRET not in str(e.value)


# ----------------------------------------------------------------------------------
# Answers that crashed the stage: a bad answer is a failure (retried), or its good part is used

NESTED = 100_000  # JSON nested this deep makes Python's json raise RecursionError

# name -> (the body sent, the descriptions expected, or the requests made before the failure:
# 2 where the answer is broken (retried once), 1 where it holds no description (not retried)
ANSWERS = {
    "text parts that are numbers or null": (
        completion([{"type": "text", "text": 5}, {"type": "text", "text": None},
                    {"type": "text", "text": "a red fox\n"}, {"type": "image"}]), ["a red fox"]),
    "no text part is a string": (completion([{"type": "text", "text": 3.5}]), 2),
    "a body nested thousands deep": (b"[" * NESTED + b"]" * NESTED, 2),
    "content nested thousands deep": (completion("[" * NESTED), 1),
    "content that is a nested JSON list": (completion("[" * NESTED + "]" * NESTED), 1),
    "a lone surrogate in the content": (b'{"choices": [{"message": {"content": '
                                        b'"- a red \\ud800 fox\\n- a bushy tail"}}]}',
                                        ["a red \ufffd fox", "a bushy tail"]),
}


@pytest.mark.parametrize("case", list(ANSWERS))
def test_a_bad_answer_is_a_failure_not_a_crash(case, tmp_path):
    body, expected = ANSWERS[case]
    with local_server(lambda h, b: send(h, 200, body)) as srv:
        url = mine.parse_llm_spec(f"{srv.url}@m")[1]
        answers, failed = mine.ask_llms([("m", url, "m")], ["red fox"],
                                        llm_args(tmp_path, llm_retries=1), None)
    if isinstance(expected, int):
        assert answers["m"] == {} and "red fox" in failed["m"]
        assert len(srv.requests) == expected
        assert not os.path.exists(tmp_path / "cache" / "llm")
    else:
        assert answers["m"] == {"red fox": expected} and not failed["m"]
        cached = list((tmp_path / "cache" / "llm").iterdir())  # written in UTF-8, and read back
        assert len(cached) == 1 and json.loads(cached[0].read_text("utf-8"))["content"]
        again, _ = mine.ask_llms([("m", url, "m")], ["red fox"], llm_args(tmp_path), None)
        assert again == answers


def test_a_lone_surrogate_in_the_cache_or_a_descriptions_file_is_cleaned_when_read(tmp_path):
    """A descriptions file (or a cache file) with "\\ud800": the stage writes its results
    (before, it failed at the very last write, after all the work)."""
    names = [n for s in common.SPLITS for n in common.class_names("toy-tiny")[s]]
    path = tmp_path / "d.json"
    path.write_text('{"%s": ["a red \\ud800 shape", "a pointy shape"], "odd \\udfff name": ["x y"]}'
                    % names[0], encoding="utf-8")
    run = tmp_path / "run"
    with contextlib.redirect_stdout(io.StringIO()):
        mine.main(["--run", str(run), *TINY, "--sources", "templates,files",
                   "--descriptions", str(path), "--image-weight", "0"])
    doc = json.loads((run / "02_descriptions.json").read_text("utf-8"))
    texts = [c["text"] for c in doc["splits"]["train"][names[0]]["candidates"]
             if c["source"] != "templates"]
    assert texts == ["a red \ufffd shape", "a pointy shape"]
    # a hand-made cache file holding one: the class is answered from it, cleaned
    url = "http://127.0.0.1:9/v1/chat/completions"
    args = llm_args(tmp_path)
    prompt = args.llm_prompt.format(name="red fox", n=5)
    cache = mine.llm_cache_path(args.run, url, "m", prompt, "red fox")
    os.makedirs(os.path.dirname(cache))
    with open(cache, "w", encoding="utf-8") as f:
        f.write('{"content": "- a red \\ud800 fox"}')
    answers, _ = mine.ask_llms([("m", url, "m")], ["red fox"], args, None)
    assert answers["m"] == {"red fox": ["a red \ufffd fox"]}


# ----------------------------------------------------------------------------------
# The size of an answer is capped: memory, cache and the descriptions JSON stay small

def huge(handler, body):  # a valid completion of 15 MB
    send(handler, 200, completion("- a red fox\n" + "- more\n" * (15 << 17)))


def endless(handler, body):  # a chunked answer that never ends (here: until 30 s or 64 MB)
    handler.send_response(200)
    handler.send_header("Transfer-Encoding", "chunked")
    handler.end_headers()
    chunk, t0 = b"x" * 65536, time.monotonic()
    for _ in range(1024):
        if time.monotonic() - t0 > 30:
            break
        handler.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))


def one_word(n):
    return lambda handler, body: send(handler, 200, completion("a" + "b" * n))


@pytest.mark.parametrize("answer,reason", [
    (huge, "over 256 KiB"),                   # 15 MB: not read past the cap, nothing cached
    (endless, "over 256 KiB"),                # stops at the cap, long before the timeout
    (one_word(6 << 20), "over 256 KiB"),      # 6 MB in one word
    (one_word(100_000), "no usable description"),  # under the cap, but no short description
])
def test_an_answer_is_read_up_to_a_cap(answer, reason, tmp_path):
    with local_server(answer) as srv:
        url = mine.parse_llm_spec(f"{srv.url}@m")[1]
        t0 = time.monotonic()
        answers, failed = mine.ask_llms([("m", url, "m")], ["red fox"],
                                        llm_args(tmp_path, llm_timeout=20), None)
        took = time.monotonic() - t0
    assert answers["m"] == {} and reason in failed["m"]["red fox"], failed
    assert took < 10
    assert not os.path.exists(tmp_path / "cache" / "llm")  # nothing cached


def test_statements_per_answer_are_capped():
    answer = "\n".join(f"- a red fox with {i} spots" for i in range(5000))
    assert len(mine.parse_descriptions(answer, 20)) == 20


# ----------------------------------------------------------------------------------
# 429 with Retry-After: the client waits as asked, never longer than --llm-timeout

@pytest.mark.parametrize("retry_after,timeout,wait", [("1", 5, 1.0), ("3600", 0.6, 0.6)])
def test_retry_after_is_honoured_within_the_timeout(retry_after, timeout, wait):
    with local_server(lambda h, b: send(h, 429, b"{}", [("Retry-After", retry_after)])) as srv:
        url = mine.parse_llm_spec(f"{srv.url}@m")[1]
        with pytest.raises(mine.LLMError, match="HTTP 429.*after 2 tries"):
            mine.ask(url, "m", "hi", timeout=timeout, retries=1, backoff=0)
    assert len(srv.times) == 2
    gap = srv.times[1] - srv.times[0]
    assert wait - 0.1 <= gap <= wait + 1.5, gap


def test_retry_after_forms():
    assert mine.retry_after({"Retry-After": "7"}) == 7
    assert mine.retry_after({"Retry-After": "nan"}) == 0
    assert mine.retry_after({}) == 0 == mine.retry_after(None)
    assert mine.retry_after({"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0  # in the past
    assert mine.retry_after({"Retry-After": "soon"}) == 0
    import email.utils
    later = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 < mine.retry_after({"Retry-After": later}) <= 30


# ----------------------------------------------------------------------------------
# user:password@ in --llm: refused in one line that says where the key goes; never written

@pytest.mark.parametrize("userinfo,model", [
    (f"user:{PASSWORD}@", "@good"),  # user:password@host
    (f"user:{PASSWORD}@", ""),       # ... and no @MODEL
    (f"{PASSWORD}@", "@good"),       # a key as the user name
])
def test_a_password_in_the_url_is_refused_and_never_written(userinfo, model, tmp_path, capsys):
    with local_server(good) as srv:
        spec = srv.url.replace("//", "//" + userinfo, 1) + model
        with pytest.raises(SystemExit) as e:
            common.run_main(lambda: mine.main(["--run", str(tmp_path / "run"), *TINY,
                                               "--llm", spec]))
        out, err = capsys.readouterr()
        assert srv.requests == []
    assert e.value.code == 2 and err.startswith("error: --llm ") and err.count("\n") == 1, err
    assert "user:password@" in err or "is not URL@MODEL" in err
    assert PASSWORD not in out + err
    assert not os.path.exists(tmp_path / "run") or os.listdir(tmp_path / "run") == []


def test_redaction_never_raises_nor_keeps_a_password():
    for spec in ["http://u:" + PASSWORD + "@h:1/v1@m", "http://u:" + PASSWORD + "@h/v1",
                 "http://[::1:" + PASSWORD + "@x/v1@m",
                 "https://h:notaport/v1?key=" + PASSWORD + "@m"]:
        assert PASSWORD not in mine.redact_spec(spec), spec
    assert mine.redact("http://[::1]:8000/v1?api_key=x") == "http://[::1]:8000/v1"


# ----------------------------------------------------------------------------------
# A descriptions file with thousands of strings for one class: capped, memory bounded

def test_a_class_with_thousands_of_descriptions_is_capped_in_bounded_memory(tmp_path, monkeypatch):
    names = common.class_names("toy-tiny")
    first = names["train"][0]
    path = tmp_path / "d.json"
    path.write_text(json.dumps({first: [f"a shape with {i} little marks" for i in range(3000)],
                                names["test"][0]: ["a shape"] * 20000,  # repeats count once
                                names["val"][0]: ["a" + "b" * (6 << 20)]}))  # cut as it is read
    block = getattr(mine, "SCORE_BLOCK", 1 << 24)
    einsum = torch.einsum

    def bounded_einsum(eq, *ops):  # every similarity tensor of the scores stays within the bound
        if eq == "nm,cjm->ncj":
            n, (C, nmax, _) = ops[0].shape[0], ops[1].shape
            assert n * C * nmax <= block, (n, C, nmax)
        return einsum(eq, *ops)
    monkeypatch.setattr(torch, "einsum", bounded_einsum)
    run = tmp_path / "run"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        mine.main(["--run", str(run), *TINY, "--sources", "templates,files",
                   "--descriptions", str(path), "--image-weight", "0"])
    said = f"1 classes have over {mine.FILE_STATEMENTS} descriptions (e.g. '{first}': 3000)"
    assert said in out.getvalue()
    doc = json.loads((run / "02_descriptions.json").read_text())
    cands = doc["splits"]["train"][first]["candidates"]
    files = [c["text"] for c in cands if c["source"] != "templates"]
    assert files == [f"a shape with {i} little marks" for i in range(mine.FILE_STATEMENTS)]
    assert doc["splits"]["test"][names["test"][0]]["candidates"][-1]["text"] == "a shape"
    long = doc["splits"]["val"][names["val"][0]]["candidates"][-1]["text"]
    assert long == "a" + "b" * (mine.TEXT_CHARS - 1)  # all the teacher reads of it
    assert (run / "02_descriptions.json").stat().st_size < 1 << 20


def test_scores_in_blocks_equal_the_scores_at_once(monkeypatch):
    torch.manual_seed(0)
    embs = [torch.nn.functional.normalize(torch.randn(n, 16), dim=1) for n in (7, 1, 30, 4)]
    images = torch.nn.functional.normalize(torch.randn(4, 16), dim=1)
    images[1] = float("nan")
    whole = mine.score_candidates(embs, images, k=2)
    monkeypatch.setattr(mine, "SCORE_BLOCK", 4 * 30 * 3)  # 3 rows at a time
    blocks = mine.score_candidates(embs, images, k=2)
    for a, b in zip(whole, blocks):
        for key in a:
            assert torch.allclose(a[key], b[key], atol=1e-6), key
