"""Tests of stage 2 (02_mine.py, SynMine) and the toy describer.

The chat client talks to a small chat-completions server started here on 127.0.0.1;
its models behave as named: good, slow (answers after the client's timeout), err500,
garbage (a body that is not JSON), empty (an empty answer), refuse. The pipeline runs
on the tiny toy world with the tiny stand-in teacher (trained once, cached).
"""
import contextlib
import functools
import importlib
import io
import json
import os
import re
import sys
import threading
import time
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["no_proxy"] = os.environ["NO_PROXY"] = "127.0.0.1,localhost"  # the test server is local

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import toyworld  # noqa: E402

mine = importlib.import_module("02_mine")

SECRET = "sk-test-DO-NOT-WRITE-4242"
PROMPT = "Describe the {name} in {n} lines."


class ChatHandler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        model, prompt = body["model"], body["messages"][-1]["content"]
        self.server.requests.append((model, prompt, self.headers.get("Authorization")))
        self.server.paths.append(self.path)
        name = re.match(r"Describe the (.+) in \d+ lines\.", prompt)
        name = name.group(1) if name else "thing"
        if model == "slow":
            time.sleep(1.0)
        if model == "err500":
            return self.reply(500, b'{"error": "boom"}')
        if model == "trickle":  # a byte every 0.05 s: each read is quick, the whole answer is not
            return self.reply(200, b" " * 40 + b'{"choices": []}', every=0.05)
        if model == "garbage":
            return self.reply(200, b"<html>this is not json</html>")
        content = {"empty": "", "refuse": "I'm sorry, but I can't help with that.",  # echo: as a careless proxy
                   "echo": f"- a {name}\n- a {name} from {self.path}\n- a {name} ({self.headers.get('Authorization')})"}.get(
            model, f"Here are some descriptions:\n1. a {name}\n- **it looks like a {name}**\n* a {name} in a photo\n\n")
        answer = {"id": "x", "object": "chat.completion", "model": model,
                  "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}]}
        self.reply(200, json.dumps(answer).encode())

    def reply(self, code, data, every=None):
        try:
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            for i in range(0, len(data), 1 if every else len(data) or 1):
                self.wfile.write(data[i:i + 1] if every else data)
                self.wfile.flush()
                if every:
                    time.sleep(every)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (the slow model)
            pass

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module", autouse=True)
def splits_once():
    """Render each tiny split once for the whole file (the stage only reads them)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(common, "load_split", functools.lru_cache(maxsize=None)(common.load_split))
        yield


@pytest.fixture(scope="module")
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), ChatHandler)
    srv.daemon_threads = True
    srv.requests, srv.paths = [], []
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}/v1"
    yield srv
    srv.shutdown()
    srv.server_close()


def count(srv, model=None):
    return sum(1 for m, _, _ in srv.requests if model is None or m == model)


# ----------------------------------------------------------------------------------
# The chat client

def test_chat_client_cases(server):
    _, url, _ = mine.parse_llm_spec(f"{server.url}@good")
    assert url.endswith("/v1/chat/completions")
    text = mine.chat(url, "good", PROMPT.format(name="red striped triangle", n=3), key=SECRET, timeout=5)
    assert mine.parse_descriptions(text) == ["a red striped triangle", "it looks like a red striped triangle",
                                             "a red striped triangle in a photo"]
    assert server.requests[-1][2] == f"Bearer {SECRET}"  # the key is sent as a Bearer token
    t0 = time.time()
    with pytest.raises(mine.LLMError, match="timeout"):
        mine.chat(url, "slow", "hi", timeout=0.3)
    assert time.time() - t0 < 0.9
    with pytest.raises(mine.LLMError, match="HTTP 500") as e:
        mine.chat(url, "err500", "hi", timeout=5)
    assert e.value.retry
    with pytest.raises(mine.LLMError, match="not JSON"):
        mine.chat(url, "garbage", "hi", timeout=5)
    with pytest.raises(mine.LLMError, match="empty"):
        mine.chat(url, "empty", "hi", timeout=5)
    with pytest.raises(mine.LLMError, match="timeout after 0.5s"):  # --llm-timeout bounds the whole answer
        mine.chat(url, "trickle", "hi", timeout=0.5)
    with pytest.raises(mine.LLMError, match="unreachable"):
        mine.chat("http://127.0.0.1:9/v1/chat/completions", "good", "hi", timeout=1)  # nothing listens there


def test_retries_are_bounded(server):
    _, url, _ = mine.parse_llm_spec(f"{server.url}@err500")
    before = count(server, "err500")
    with pytest.raises(mine.LLMError, match=r"HTTP 500.*after 3 tries"):
        mine.ask(url, "err500", "hi", retries=2, backoff=0, timeout=5)
    assert count(server, "err500") - before == 3


def test_parse_descriptions():
    answer = ('Sure! Here are 4 descriptions:\n\n1. **Bright red** feathers\n2) a short, conical beak;\n'
              '- "Brown streaks on the back"\n• bright red feathers\nI hope this helps:\n```\n')
    assert mine.parse_descriptions(answer) == ["Bright red feathers", "a short, conical beak", "Brown streaks on the back"]
    assert mine.parse_descriptions('["a round body", "long tail", 3]') == ["a round body", "long tail"]
    assert mine.parse_descriptions("I'm sorry, but I can't help with that.") == []


def test_cache_and_resume(server, tmp_path):
    names = ["red striped triangle", "blue dotted star", "green solid circle"]
    _, url, _ = mine.parse_llm_spec(f"{server.url}@good")
    llms = [(f"llm:good@{url}", url, "good")]
    args = types.SimpleNamespace(run=str(tmp_path), llm_prompt=PROMPT, llm_n=5, llm_timeout=5, llm_retries=0,
                                 llm_backoff=0, llm_give_up=5, llm_workers=2,
                                 llm_max_tokens=0)
    before = count(server)
    first, failed = mine.ask_llms(llms, names, args, SECRET)
    assert count(server) - before == 3 and not failed[llms[0][0]]
    again, _ = mine.ask_llms(llms, names, args, SECRET)  # a rerun: everything from the cache
    assert count(server) - before == 3 and again == first
    files = sorted((tmp_path / "cache" / "llm").iterdir())
    assert len(files) == 3
    files[0].unlink()  # as if the first run had stopped before this answer: only it is asked again
    resumed, _ = mine.ask_llms(llms, names, args, SECRET)
    assert count(server) - before == 4 and resumed == first
    args.llm_prompt = "Describe the {name} in {n} lines. Be brief."  # another prompt is another question
    mine.ask_llms(llms, names[:1], args, SECRET)
    assert count(server) - before == 5
    assert all(SECRET not in f.read_text() for f in (tmp_path / "cache" / "llm").iterdir())


def test_give_up_on_a_dead_model(server, tmp_path):
    _, url, _ = mine.parse_llm_spec(f"{server.url}@err500")
    args = types.SimpleNamespace(run=str(tmp_path), llm_prompt=PROMPT, llm_n=5, llm_timeout=5, llm_retries=0,
                                 llm_backoff=0, llm_give_up=2, llm_workers=1,
                                 llm_max_tokens=0)
    before = count(server, "err500")
    answers, failed = mine.ask_llms([("dead", url, "err500")], [f"class {i}" for i in range(6)], args, None)
    assert count(server, "err500") - before == 2 and not answers["dead"]
    assert len(failed["dead"]) == 6 and sum(r.startswith("skipped") for r in failed["dead"].values()) == 4


# ----------------------------------------------------------------------------------
# Mining

def test_mining_keeps_planted_correct_over_wrong():
    """Three classes in a world of attribute directions. Class 0 ("red triangle") has
    statements about red and about triangles, a planted correct one and a planted
    wrong one (it says blue, an attribute of class 1, and nothing backs it up)."""
    torch.manual_seed(0)
    basis = torch.eye(16)
    red, blue, green, triangle, circle, star, generic = basis[:7]

    def emb(*vs):
        v = sum(vs) + 0.05 * torch.randn(16)
        return F.normalize(v, dim=0)
    classes = [
        torch.stack([emb(red), emb(red, triangle), emb(triangle), emb(red, triangle),
                     emb(red, triangle),             # planted correct
                     emb(blue),                      # planted wrong
                     emb(generic)]),                 # says nothing
        torch.stack([emb(blue), emb(blue, circle), emb(circle), emb(blue, circle), emb(generic)]),
        torch.stack([emb(green), emb(green, star), emb(star), emb(green, star), emb(generic)]),
    ]
    scores = mine.score_candidates(classes, None, k=2)
    s = scores[0]["score"]
    assert s[4] > s[5] and s[4] > s[6]
    vec, w = mine.mine_vector(classes[0], s, keep=0.7, temperature=0.1)
    assert w[4] > 0 and w[5] == 0 and abs(w.sum() - 1) < 1e-5 and abs(vec.norm() - 1) < 1e-5
    # the image vote: class 0 has images that look red and triangular, class 1 has none
    images = torch.stack([F.normalize(red + triangle, dim=0), torch.full((16,), float("nan")),
                          F.normalize(green + star, dim=0)])
    with_images = mine.score_candidates(classes, images, image_weight=1.0, k=2)
    assert with_images[0]["image"][4] > with_images[0]["image"][5]
    assert torch.equal(with_images[1]["image"], torch.zeros(5))  # no images: no vote


def test_toy_describer():
    a = toyworld.describe("red striped triangle", seed=0)
    assert a == toyworld.describe("red striped triangle", seed=0) != toyworld.describe("red striped triangle", seed=1)
    assert len(a) == 12 and sum(not ok for _, ok in a) == 3  # round(0.3 * 10) wrong of the 10 specific ones
    assert all(isinstance(t, str) and t for t, _ in a)
    assert sum(not ok for _, ok in toyworld.describe("blue dotted star", wrong_rate=0.0)) == 0
    with pytest.raises(ValueError):
        toyworld.describe("house finch")


def test_toy_describer_misreads_a_class_consistently():
    """A misread class: one attribute is believed wrong, so the statements naming it are
    wrong even at wrong_rate 0 and the others right; a rate of 0 changes nothing."""
    name = "red striped triangle"
    assert toyworld.describe(name, misread_rate=0.0) == toyworld.describe(name)
    misread = toyworld.describe(name, wrong_rate=0.0, misread_rate=1.0)
    n_wrong = sum(not ok for _, ok in misread)
    assert 0 < n_wrong < len(misread) - 2  # statements that do not name the misread attribute stay right
    # over many classes, about misread_rate of them are misread
    names = [toyworld.class_name(a) for split in toyworld.make_classes().values() for a in split]
    n_misread = sum(any(not ok for _, ok in toyworld.describe(n, wrong_rate=0.0, misread_rate=0.2)) for n in names)
    assert 0.1 * len(names) < n_misread < 0.3 * len(names), n_misread


# ----------------------------------------------------------------------------------
# The whole stage on the tiny toy world

@pytest.fixture(scope="module")
def mined(server, tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    old = os.environ.get("OPENAI_API_KEY")
    os.environ["OPENAI_API_KEY"] = SECRET
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            mine.main(["--run", str(run), "--dataset", "toy-tiny", "--clip", "toy-clip-tiny", "--llm", "toy",
                       *[a for m in ("good", "err500", "slow", "garbage") for a in ("--llm", f"{server.url}@{m}")],
                       "--llm-prompt", PROMPT, "--llm-timeout", "0.3", "--llm-retries", "1", "--llm-backoff", "0",
                       "--llm-give-up", "3", "--llm-workers", "8", "--compare", "--episodes", "50"])
    finally:
        os.environ.pop("OPENAI_API_KEY") if old is None else os.environ.__setitem__("OPENAI_API_KEY", old)
    return types.SimpleNamespace(dir=run, output=out.getvalue())  # the run folder and what the stage printed


def test_one_vector_per_class(mined, server):
    ck = common.load_checkpoint(str(mined.dir / common.SEMANTICS), "mine", "run 02_mine.py")
    classes = common.class_names("toy-tiny")
    assert ck["classes"] == classes and ck["dataset"] == "toy-tiny" and ck["teacher"]["name"] == "toy-clip-tiny"
    for split in common.SPLITS:
        v = ck["state"][split]
        assert v.shape[0] == len(classes[split]) and torch.allclose(v.norm(dim=1), torch.ones(len(v)), atol=1e-5)
    assert count(server, "good") >= 100  # one question per class (100 in all splits)


def test_json_reports_candidates_and_failures(mined):
    doc = json.loads((mined.dir / "02_descriptions.json").read_text())
    cls = next(iter(doc["splits"]["test"].values()))
    sources = {c["source"] for c in cls["candidates"]}
    assert "templates" in sources and "toy@0" in sources and any(s.startswith("llm:good@") for s in sources)
    for c in cls["candidates"]:
        assert {"text", "source", "score", "kept", "weight"} <= set(c)
        assert ("correct" in c) == (c["source"] == "toy@0")  # only the toy describer knows the truth
    n_classes = sum(len(s) for s in doc["splits"].values())
    failures = {src.split("@")[0]: f for src, f in doc["failures"].items()}
    assert not failures["llm:good"]
    for bad in ("llm:err500", "llm:slow", "llm:garbage"):
        assert len(failures[bad]) == n_classes  # every class reported (failed or skipped after the give-up)
    assert "HTTP 500" in " ".join(failures["llm:err500"].values())
    assert "not JSON" in " ".join(failures["llm:garbage"].values())
    assert set(doc["compare"]["accuracy"]) >= {"templates only", "all candidates averaged", "SynMine"}
    assert doc["compare"]["wrong"] > 0 and 0 <= doc["compare"]["wrong_removed"] <= 1


def test_key_is_never_written(mined):
    for root, _, files in os.walk(mined.dir):
        for f in files:
            data = open(os.path.join(root, f), "rb").read()
            assert SECRET.encode() not in data, f
    assert SECRET not in mined.output
    # ...and the failures were said out loud, not only written down
    assert "WARNING: llm:err500@" in mined.output and "skipped" in mined.output


def test_earlier_json_is_a_descriptions_file(mined):
    names = [n for split in common.class_names("toy-tiny").values() for n in split]
    found = mine.load_descriptions_file(str(mined.dir / "02_descriptions.json"), names)
    doc = json.loads((mined.dir / "02_descriptions.json").read_text())
    first = next(iter(doc["splits"]["train"]))
    kept = [c["text"] for c in doc["splits"]["train"][first]["candidates"] if c["kept"] and c["source"] != "templates"]
    assert found[first] == kept and len(found) == len(names)


def test_templates_ablation(mined):
    mine.main(["--run", str(mined.dir), "--dataset", "toy-tiny", "--clip", "toy-clip-tiny", "--sources", "templates",
               "--out", "02_semantics_templates.pt"])
    ck = common.load_checkpoint(str(mined.dir / "02_semantics_templates.pt"), "mine", "run 02_mine.py")
    doc = json.loads((mined.dir / "02_descriptions_templates.json").read_text())
    assert ck["sources"] == ["templates"] and doc["checkpoint"] == "02_semantics_templates.pt"
    cands = next(iter(doc["splits"]["test"].values()))["candidates"]
    assert len(cands) == len(mine.TEMPLATES) and all(c["kept"] and c["weight"] == 0.125 for c in cands)
    assert (mined.dir / common.SEMANTICS).exists()  # the SynMine output is left alone


def test_one_line_errors(tmp_path, capsys):
    base = ["--run", str(tmp_path), "--dataset", "toy-tiny", "--clip", "toy-clip-tiny"]
    partial = tmp_path / "partial.json"
    one_class = toyworld.class_name(toyworld.make_classes()["train"][0])
    partial.write_text(json.dumps({one_class: ["a crimson wedge"], "house finch": ["a small bird"]}))
    cases = [
        (["--sources", "files", "--descriptions", str(partial)], "no candidate description for"),  # missing classes
        (["--sources", "llm", "--llm", "toy", "--sources", ""], "no knowledge source"),             # empty source list
        (["--sources", "llm,files", "--llm", "toy", "--sources", "files"], "no knowledge source"),
        (["--sources", "templates,files", "--llm", "toy"], "only the prompt templates"),
        (["--descriptions", str(tmp_path / "nope.json")], "not found"),
        (["--llm", "localhost:8000"], "is not URL@MODEL"),
    ]
    for extra, message in cases:
        with pytest.raises(SystemExit) as e:
            common.run_main(lambda: mine.main(base + extra))
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err, (extra, err)


def test_base_vectors_do_not_depend_on_val_or_novel_classes(tmp_path):
    """SynMine's specificity pools keep the splits apart: changing what is said about
    the novel classes leaves every base and val vector bit for bit the same."""
    classes = common.class_names("toy-tiny")
    said = {n: [f"a {n}", f"a photo of a {n} thing", "a small object"] for s in common.SPLITS for n in classes[s]}
    changed = dict(said, **{n: ["a big blue shape", "something odd", f"not a {n}"] for n in classes["test"]})
    vectors = []
    for i, descriptions in enumerate((said, changed)):
        path = tmp_path / f"d{i}.json"
        path.write_text(json.dumps(descriptions))
        run = tmp_path / f"run{i}"
        with contextlib.redirect_stdout(io.StringIO()):
            mine.main(["--run", str(run), "--dataset", "toy-tiny", "--clip", "toy-clip-tiny",
                       "--sources", "templates,files", "--descriptions", str(path)])
        vectors.append(common.load_checkpoint(str(run / common.SEMANTICS), "mine", "")["state"])
    assert torch.equal(vectors[0]["train"], vectors[1]["train"])
    assert torch.equal(vectors[0]["val"], vectors[1]["val"])
    assert not torch.allclose(vectors[0]["test"], vectors[1]["test"])  # the change did reach the novel classes


QUERY_SECRET = "sk-in-the-url-DO-NOT-WRITE-77"


def test_no_key_on_disk_or_stdout_when_the_url_holds_one_and_the_server_echoes_it(server, tmp_path, capsys,
                                                                                     monkeypatch):
    """Issue 15: a key in the endpoint's query string, and a server that echoes the request's
    Authorization header and URL in a successful answer: neither key reaches a file or the
    terminal (the lines that hold one are dropped), and the query string stays after the path."""
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    spec = f"{server.url}/?api_key={QUERY_SECRET}@echo"
    assert mine.parse_llm_spec(spec)[1] == f"{server.url}/chat/completions?api_key={QUERY_SECRET}"
    mine.main(["--run", str(tmp_path), "--dataset", "toy-tiny", "--clip", "toy-clip-tiny", "--sources", "llm,templates",
               "--llm", spec, "--llm-prompt", PROMPT, "--image-weight", "0", "--llm-workers", "8"])
    out, err = capsys.readouterr()
    assert f"/v1/chat/completions?api_key={QUERY_SECRET}" in server.paths
    for secret in (SECRET, QUERY_SECRET):
        assert secret not in out + err
        for root, _, files in os.walk(tmp_path):
            for f in files:
                assert secret.encode() not in open(os.path.join(root, f), "rb").read(), (secret, f)
    doc = json.loads((tmp_path / "02_descriptions.json").read_text())
    texts = [c["text"] for c in next(iter(doc["splits"]["test"].values()))["candidates"] if c["source"] != "templates"]
    assert len(texts) == 1 and " from " not in texts[0]  # the two echo lines were dropped, the description kept
    assert doc["config"]["llm"] == [f"{server.url}/@echo"]


HUNG_REQUEST = """
import os, signal, sys, threading, time
import common
mine = __import__("02_mine")
first = threading.Lock()
def ask(*a, **k):  # every request hangs; the first one brings a Ctrl-C
    if first.acquire(blocking=False):
        os.kill(os.getpid(), signal.SIGINT)
    time.sleep(600)
mine.ask = ask
common.run_main(lambda: mine.main(sys.argv[1:]))
"""


def test_ctrl_c_with_requests_in_flight_exits_at_once(tmp_path):
    """Issue 15: the stage exits on Ctrl-C without waiting for the requests in flight (here
    they would hang for 10 minutes), in one line; it starts with SIGINT ignored, as under
    `cmd &` in a script."""
    import signal
    import subprocess
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1", PYTHONPATH=repo)
    proc = subprocess.run([sys.executable, "-c", HUNG_REQUEST, "--run", str(tmp_path / "run"), "--dataset", "toy-tiny",
                           "--clip", "toy-clip-tiny", "--sources", "llm,templates", "--llm", "http://127.0.0.1:9/v1@m"],
                          cwd=repo, env=env, capture_output=True, text=True, timeout=120,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.endswith(f"interrupted: {common.INTERRUPTED}\n") and "Traceback" not in proc.stderr
    assert not os.path.exists(tmp_path / "run" / common.SEMANTICS)


# ----------------------------------------------------------------------------------
# A real dataset without a language model (issue 22): the default sources use what was given

@pytest.fixture(scope="module")
def tiny_open_clip(tmp_path_factory):
    """A real open_clip architecture at tiny widths (32-px images), registered by name."""
    import open_clip
    folder = tmp_path_factory.mktemp("tiny-clip")
    cfg = {"embed_dim": 16,
           "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16,
                          "patch_size": 16},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2,
                        "layers": 1}}
    (folder / "tiny-clip-mine-test.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(str(folder / "tiny-clip-mine-test.json"))
    return "tiny-clip-mine-test"


def test_real_dataset_without_llm_mines_templates_and_says_so(tmp_path, tiny_open_clip, capsys):
    """`run.sh mini-imagenet` passes no source flag: without --llm, stage 2 mines the prompt
    templates (the image vote included) instead of refusing after hours of stage 1."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    root = tmp_path / "mini"
    for s in common.SPLITS:
        for wnid, _ in common.split_classes("mini-imagenet", s):
            (root / s / wnid).mkdir(parents=True)
            for i in range(2 if s == "train" else 1):
                pixels = rng.integers(0, 256, (84, 84, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / s / wnid / f"{i}.jpg")
    run = tmp_path / "run"
    mine.main(["--run", str(run), "--dataset", "mini-imagenet", "--data-root", str(root),
               "--clip", tiny_open_clip, "--clip-pretrained", "random", "--device", "cpu",
               "--image-weight", "1"])  # the vote is off by default (chosen on val): cast it here
    out = capsys.readouterr().out
    said = [line for line in out.splitlines() if "no --llm" in line]
    assert len(said) == 1 and "SynMine mines the prompt templates" in said[0], out
    ck = common.load_checkpoint(str(run / common.SEMANTICS), "mine", "")
    assert ck["sources"] == ["templates"] and {s: len(v) for s, v in ck["state"].items()} == \
        {"train": 64, "val": 16, "test": 20}
    doc = json.loads((run / "02_descriptions.json").read_text())
    cands = next(iter(doc["splits"]["train"].values()))["candidates"]
    # mined (half kept, the image vote cast), not averaged as the templates-only ablation is
    assert sum(c["kept"] for c in cands) == 4 and any(c["image"] != 0 for c in cands)
