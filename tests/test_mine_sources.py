"""Stage 2's real knowledge sources (issue 26): published descriptions files keyed by name,
wnid or ILSVRC order; WordNet 3.0; and what a real chat server sends that our fake did not
(streamed answers, null content, reasoning, special tokens, answers cut by the token limit,
prose and markdown instead of short lines).

Menon & Vondrick's published file and the ILSVRC wnid list are read from ../shared/ when
that folder is there (the project does not ship the file); those tests skip otherwise.
WordNet is checked against the real database when /usr/share/wordnet has one, and against
a small fixture file always.
"""
import contextlib
import importlib
import io
import json
import os
import sys
import threading
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["no_proxy"] = os.environ["NO_PROXY"] = "127.0.0.1,localhost"  # the server is local

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import common  # noqa: E402

mine = importlib.import_module("02_mine")

SHARED = os.path.join(REPO, "..", "shared", "descriptions")
MENON = os.path.join(SHARED, "descriptors_imagenet.json")
REAL_WORDNET = "/usr/share/wordnet"


def names_and_ids(dataset):
    names = [n for s in common.SPLITS for _, n in common.split_classes(dataset, s)]
    return names, mine.class_ids(dataset, None)


def load(path, dataset, keys):
    names, ids = names_and_ids(dataset)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        found = mine.load_descriptions_file(str(path), names, keys, ids)
    return found, out.getvalue()


# ----------------------------------------------------------------------------------
# Descriptions files: keys by name, wnid or ILSVRC order

def test_the_wnid_list_is_the_sorted_ilsvrc_list():
    wnids = mine.read_lines(mine.ILSVRC_WNIDS)
    assert len(wnids) == 1000 == len(set(wnids)) and wnids == sorted(wnids)
    for dataset in ("mini-imagenet", "tiered-imagenet"):
        assert set(names_and_ids(dataset)[1].values()) <= set(wnids)
    if os.path.exists(os.path.join(SHARED, "ilsvrc2012_wnids.txt")):  # the project's own copy
        assert wnids == mine.read_lines(os.path.join(SHARED, "ilsvrc2012_wnids.txt"))


def test_ilsvrc_order_maps_the_ith_key_to_the_ith_wnid(tmp_path):
    wnids = mine.read_lines(mine.ILSVRC_WNIDS)
    path = tmp_path / "menon-like.json"  # keys that say nothing: order alone names the class
    path.write_text(json.dumps({f"key {i}": [f"statement {i}"] for i in range(1000)}))
    found, said = load(path, "mini-imagenet", "ilsvrc-order")
    names, ids = names_and_ids("mini-imagenet")
    assert len(found) == 100 and all(found[n] == [f"statement {wnids.index(ids[n])}"]
                                     for n in names)
    line, = said.splitlines()
    assert "matched 100 of 100 classes" in line and "900 keys are no class" in line
    path.write_text(json.dumps({f"key {i}": ["x"] for i in range(999)}))
    with pytest.raises(common.UserError, match="has 999 keys, not the 1000 ILSVRC-2012"):
        load(path, "mini-imagenet", "ilsvrc-order")


def test_wnid_keys(tmp_path):
    names, ids = names_and_ids("mini-imagenet")
    path = tmp_path / "by-wnid.json"
    path.write_text(json.dumps({ids[n]: [f"a {n} seen up close"] for n in names}))
    found, _ = load(path, "mini-imagenet", "wnid")
    assert found == {n: [f"a {n} seen up close"] for n in names}


def test_an_unmatched_class_and_a_shared_text_are_reported(tmp_path):
    names, _ = names_and_ids("mini-imagenet")
    def key(n):  # case and _ as some files write them
        return n.upper().replace(" ", "_")
    data = {key(n): [f"a {n}"] for n in names[1:]}
    data["not a class"] = ["something"]
    data[key(names[2])] = data[key(names[3])] = ["a small bird"]
    path = tmp_path / "by-name.json"
    path.write_text(json.dumps(data))
    found, said = load(path, "mini-imagenet", "name")
    lines = said.splitlines()
    assert len(found) == 99 and names[0] not in found
    assert "matched 99 of 100 classes; not in the file: " + repr(names[0]) in lines[0]
    assert "1 keys are no class of this dataset (e.g. 'not a class')" in lines[0]
    assert len(lines) == 2 and "2 classes receive the same descriptions" in lines[1]
    assert f"{names[2]!r} = {names[3]!r}" in lines[1]


@pytest.mark.skipif(not os.path.exists(MENON), reason="../shared/descriptions/ is absent")
def test_menon_and_vondrick_file_by_order_and_by_name():
    by_order, said = load(MENON, "mini-imagenet", "ilsvrc-order")
    assert len(by_order) == 100 and "matched 100 of 100" in said
    assert sum(map(len, by_order.values())) / 100 > 4  # about 5.8 descriptors per class
    by_name, said = load(MENON, "mini-imagenet", "name")
    assert len(by_name) >= 60 and "not in the file" in said  # some names differ (e.g. robin)
    assert all(by_name[n] == by_order[n] for n in by_name)  # where names match, the same class
    tiered, said = load(MENON, "tiered-imagenet", "ilsvrc-order")
    assert len(tiered) == 608 and "'cassette player' = 'tape player'" in said  # the same lists
    # a name that stands for two classes: by name, tiered's maillot (n03710721, the tank suit)
    # would get the key 'maillot' of n03710637; key order gives it its own descriptors
    tiered_by_name, _ = load(MENON, "tiered-imagenet", "name")
    assert tiered_by_name["maillot"] != tiered["maillot"]


def test_key_flag_errors(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"a": ["b"]}))
    base = ["--run", str(tmp_path / "run"), "--dataset", "toy-tiny", "--clip", "toy-clip-tiny",
            "--sources", "templates,files", "--descriptions", str(path)]
    for extra, message in [(["--descriptions-keys", "index"], "--descriptions-keys index: give"),
                           (["--descriptions-keys", "name,wnid"], "one per --descriptions file"),
                           (["--descriptions-keys", "wnid"], "needs classes with ids")]:
        with pytest.raises(common.UserError, match=message) as e:
            mine.main(base + extra)
        assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------------
# WordNet: statements of a wnid come from its synset

# two synsets as data.noun writes them (house finch verbatim from WordNet 3.0; finch with its
# pointers shortened; a made-up one with a usage example and an instance hypernym)
FIXTURE = (
    "  1 This software and database is being provided to you, the LICENSEE, by  \n"
    "01529672 05 n 01 finch 0 001 @ 01525720 n 0000 | any of numerous small songbirds with "
    "short stout bills adapted for crushing seeds  \n"
    "01532829 05 n 03 house_finch 0 linnet 2 Carpodacus_mexicanus 0 002 @ 01529672 n 0000 "
    "#m 01532664 n 0000 | small finch originally of the western United States and Mexico  \n"
    "09999999 05 n 02 glass_thing 0 Vitrum(p) 0 001 @i 01529672 n 0000 | a clear object; "
    "it may hold water; \"the glass thing broke\"  \n")
HOUSE_FINCH = ["a house finch, small finch originally of the western United States and Mexico.",
               "a linnet.", "a Carpodacus mexicanus.", "a house finch, a kind of finch."]


def wordnet(folder, names, ids):
    return mine.wordnet_source(str(folder), names, ids)


def test_wordnet_statements_come_from_the_synset(tmp_path):
    (tmp_path / "data.noun").write_text(FIXTURE)
    ids = {"house finch": "n01532829", "glass thing": "n09999999", "dodo": "n00000001"}
    table, failed, source = wordnet(tmp_path, list(ids), ids)
    assert [t for t, _ in table["house finch"]] == HOUSE_FINCH
    assert [t for t, _ in table["glass thing"]] == [  # definitions, not the usage example
        "a glass thing, a clear object.", "a glass thing, it may hold water.", "a Vitrum.",
        "a glass thing, a kind of finch."]
    assert failed == {"dodo": "n00000001 is no noun synset of WordNet 3.0"}
    assert source["kind"] == "wordnet" and source["file_id"]


@pytest.mark.skipif(not os.path.exists(os.path.join(REAL_WORDNET, "data.noun")),
                    reason="no WordNet 3.0 in /usr/share/wordnet (Debian package wordnet-base)")
def test_wordnet_statements_from_the_real_database():
    names, ids = names_and_ids("mini-imagenet")
    table, failed, _ = wordnet(REAL_WORDNET, names, ids)
    assert not failed and len(table) == 100
    assert [t for t, _ in table["house finch"]] == HOUSE_FINCH
    assert all(any(", a kind of " in t for t, _ in table[n]) for n in names)  # every one has one


def test_wordnet_errors(tmp_path):
    with pytest.raises(common.UserError, match="install the package wordnet-base") as e:
        wordnet(tmp_path / "nowhere", ["house finch"], {"house finch": "n01532829"})
    assert "\n" not in str(e.value)
    with pytest.raises(common.UserError, match="needs classes that are ImageNet wnids"):
        mine.main(["--run", str(tmp_path / "run"), "--dataset", "toy-tiny", "--clip",
                   "toy-clip-tiny", "--sources", "templates,wordnet"])


# ----------------------------------------------------------------------------------
# What real servers send

SMOLLM2 = """Here are 10 short visual descriptions of a jellyfish:

1. **Shaped**: The jellyfish has tentacles like a large ball of jellybeans. It can also grow to \
be huge, and its bell pulses slowly through the dark water while the long arms trail far \
behind it like ribbons in the wind.
2. **Color:** Translucent pink with a glowing orange rim
- Texture: soft, slimy and see-through
*Parts: a bell and its long arms*

I hope these descriptions help you picture a jellyfish!"""


SMOLLM2_STATEMENTS = [
    "The jellyfish has tentacles like a large ball of jellybeans.",
    "It can also grow to be huge",
    "its bell pulses slowly through the dark water while the long arms trail far behind it "
    "like ribbons in the wind.",
    "Translucent pink with a glowing orange rim", "soft, slimy and see-through",
    "a bell and its long arms"]


def test_prose_and_markdown_are_read_as_sentences_and_clauses():
    assert mine.parse_descriptions(SMOLLM2) == SMOLLM2_STATEMENTS


def test_answer_text_drops_reasoning_and_special_tokens_and_a_cut_sentence():
    assert mine.answer_text("<think>the user wants...</think>\n- a red fox") == "- a red fox"
    assert mine.answer_text("<think>still thinking when the tokens ran out") == ""
    assert mine.answer_text("- a red fox<|im_end|>\n<|im_start|>user\nmore") == "- a red fox"
    assert mine.answer_text("- a red fox</s>junk") == "- a red fox"
    cut = "- a red fox\n- a bushy tail. It has a white tip and bla"
    assert mine.answer_text(cut, "length") == "- a red fox\n- a bushy tail."
    assert mine.answer_text(cut, "stop") == cut


def completion(message, finish="stop"):
    return json.dumps({"choices": [{"index": 0, "finish_reason": finish, "message": message}]})


def events(*pieces):
    chunks = [{"choices": [{"index": 0, "delta": {"content": p}, "finish_reason": None}]}
              for p in pieces]
    chunks.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    return "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"


# model -> (content type, body)
ANSWERS = {
    "stream": ("text/event-stream", events("- a red", " fox\n", "- a bushy tail\n")),
    "null": ("application/json", completion({"role": "assistant", "content": None})),
    "reasoning": ("application/json", completion({"role": "assistant", "content": "- a red fox",
                                                  "reasoning_content": "- not this"})),
    "think-only": ("application/json", completion({"content": "<think>hmm", "role": "x"},
                                                  "length")),
    "stop-token": ("application/json", completion({"content": "- a red fox<|eot_id|>- junk"})),
    "length": ("application/json", completion({"content": "- a red fox\n- a bushy t"}, "length")),
    "prose": ("application/json", completion({"content": SMOLLM2})),
    "chatter": ("application/json", completion({"content": "I hope this helps!"})),
}


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        self.server.bodies.append(body)
        kind, data = ANSWERS[body["model"]]
        data = data.encode()
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads, srv.bodies = True, []
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}/v1/chat/completions"
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.mark.parametrize("model,expected", [
    ("stream", ["a red fox", "a bushy tail"]),   # server-sent events, though none were asked for
    ("reasoning", ["a red fox"]),                # the reasoning field is not the answer
    ("stop-token", ["a red fox"]),               # the text after a special token is no answer
    ("length", ["a red fox"]),                   # the line the token limit cut is dropped
    ("prose", SMOLLM2_STATEMENTS),
])
def test_what_real_servers_send(server, model, expected):
    assert mine.parse_descriptions(mine.chat(server.url, model, "hi", timeout=5)) == expected


@pytest.mark.parametrize("model", ["null", "think-only"])
def test_an_answer_with_no_text_is_empty(server, model):
    with pytest.raises(mine.LLMError, match="empty answer") as e:
        mine.chat(server.url, model, "hi", timeout=5)
    assert e.value.retry


def test_max_tokens_is_sent_only_when_given(server):
    mine.chat(server.url, "prose", "hi", timeout=5)
    mine.chat(server.url, "prose", "hi", timeout=5, max_tokens=64)
    assert "max_tokens" not in server.bodies[-2] and server.bodies[-1]["max_tokens"] == 64


def test_a_model_whose_answers_are_unusable_is_still_asked(server, tmp_path):
    """A server that answers is working: answers with no usable description fail their
    classes, but do not make the client give up on the model (only a server's failures do)."""
    args = types.SimpleNamespace(run=str(tmp_path), llm_prompt="Describe the {name}.", llm_n=5,
                                 llm_timeout=5, llm_retries=0, llm_backoff=0, llm_give_up=2,
                                 llm_workers=1, llm_max_tokens=0)
    before = len(server.bodies)
    answers, failed = mine.ask_llms([("m", server.url, "chatter")],
                                    [f"class {i}" for i in range(6)], args, None)
    assert len(server.bodies) - before == 6 and not answers["m"]
    assert set(failed["m"].values()) == {"no usable description in the answer (off-topic?)"}
