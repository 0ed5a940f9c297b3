"""
Stage 2 of SynTrans: SynMine, training-free synergistic knowledge mining.

Paper component: "a training-free synergistic knowledge mining module (SynMine) facilitates
collaboration among large multimodal models to extract high-quality semantic knowledge" (Tang,
He, Qin, IJCAI 2025; docs/DESIGN.md, stage 2). Language models write what a class looks like;
the vision-language teacher (CLIP) reads every statement and keeps those its two modalities and
the other sources agree on. Nothing is trained.

What it does
  1. Gathers candidate descriptions of every class of every split from knowledge sources:
       llm        language models behind an OpenAI-compatible chat API (--llm URL@MODEL,
                  repeatable; answers cached in <run>/cache/llm/, a failing model is reported
                  and the run goes on), or --llm toy[@SEED]: the toy world's describer;
       files      descriptions files (--descriptions FILE, keys: --descriptions-keys), e.g.
                  Menon & Vondrick's published GPT-3 descriptors or an earlier 02_descriptions.json;
       wordnet    WordNet 3.0 (--sources wordnet, classes that are wnids): gloss and lemmas;
       templates  CLIP prompt templates of the bare class name, always available.
  2. Mines them with the teacher's text encoder E_T (cosines of L2-normalised embeddings):
       agree(t)    = mean of t's k best matches among the other candidates of its class c
       specific(t) = mean, over the other classes of c's pool (POOLS), of their k best matches
       image(t)    = base classes only: the match with c's mean image embedding minus the mean
                     match with the other base classes' images
       score(t)    = agree - specific + image_weight * image
     Per class the lowest-scoring (1 - keep) fraction is dropped and the rest are
     softmax(score / temperature)-weighted into one L2-normalised vector t_c.
  3. --compare: the teacher's zero-shot accuracy on the val (--split test: novel) classes with
     templates only, all candidates averaged and SynMine, and the wrong statements removed.

Inputs   class names of all splits, the teacher (--clip), the sources; base training images.
Outputs  <run>/02_semantics.pt: state = {"train": [C_train, m], "val": ..., "test": ...}, one
         vector per class; <run>/02_descriptions.json: every candidate with its source, scores,
         weight and whether it was kept; per source its failures. The API key is never written.

Our choices (not from the paper; reasons in docs/DESIGN.md): the scores above; k = 2; keep 50%
and temperature 0.3, chosen on val classes; --sources templates (the syntrans-templates
ablation) gives CLIP's plain prompt ensemble, the mean.
"""
import email.utils
import hashlib
import http
import http.client
import json
import os
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter

import torch
import torch.nn.functional as F

import common
import toyworld


# ----------------------------------------------------------------------------------
# The method: SynMine's scores and the weighted class vector (step 2 of the header)

# the classes each split's candidates are judged against by the specificity score:
# base classes only among themselves (nothing a base vector holds, which trains stages 3
# and 4, depends on a val or novel class), val and novel classes with the base classes
POOLS = {"train": ("train",), "val": ("train", "val"), "test": ("train", "test")}


# the similarities of a block of candidates with every candidate of the pool, [rows, C, nmax],
# hold at most this many numbers: a class with thousands of candidates is scored a block of
# rows at a time (memory stays bounded; a block that holds the whole class changes nothing)
SCORE_BLOCK = 1 << 24


def score_candidates(embs, images=None, image_weight=1.0, k=2):
    """Scores of every candidate (see the header). embs: one [n_c, m] tensor of
    L2-normalised text embeddings per class of one pool (POOLS above: specificity is
    judged against every class given); images: None or [C, m] mean image embeddings
    with NaN rows for classes that have no images (val and novel classes).
    Returns one dict of [n_c] tensors (agree, specific, image, score) per class."""
    C, m = len(embs), embs[0].shape[1]
    counts = torch.tensor([len(e) for e in embs])
    padded = torch.zeros(C, int(counts.max()), m)
    for c, e in enumerate(embs):
        padded[c, :len(e)] = e
    valid = torch.arange(padded.shape[1])[None] < counts[:, None]  # [C, nmax]
    rows = max(1, SCORE_BLOCK // (C * padded.shape[1]))
    has_image = None if images is None else ~torch.isnan(images).any(1)
    out = []
    for c, e in enumerate(embs):
        n = len(e)
        blocks = [text_scores(e[i:i + rows], i, c, padded, valid, k) for i in range(0, n, rows)]
        agree, specific = (torch.cat(x) for x in zip(*blocks))
        # the image vote of the base classes: own images against the other base classes' images
        image = torch.zeros(n)
        if has_image is not None and has_image[c] and image_weight:
            others = has_image.clone()
            others[c] = False
            image = e @ images[c] - ((e @ images[others].T).mean(1) if others.any() else 0)
        out.append({"agree": agree, "specific": specific, "image": image,
                    "score": agree - specific + image_weight * image})
    return out


def text_scores(e, first, c, padded, valid, k):
    """agree and specific ([rows] each) of the candidates e = embs[c][first:first + rows]
    against the pool's candidates (padded [C, nmax, m], valid [C, nmax]: see above)."""
    n, C, n_own = len(e), len(padded), int(valid[c].sum())
    sims = torch.einsum("nm,cjm->ncj", e, padded)
    sims = sims.masked_fill(~valid[None], float("-inf"))  # [n, C, nmax]
    # agreement: the k best matches among the other candidates of the same class
    # (a statement another one backs up is likely true; a hallucination stands alone)
    own = sims[:, c].clone()
    own[torch.arange(n), torch.arange(first, first + n)] = float("-inf")
    ka = min(k, n_own - 1)
    agree = own.topk(ka, -1).values.mean(-1) if ka > 0 else torch.ones(n)
    # specificity: per other class the mean of its k best matches (fewer if it has
    # fewer candidates), averaged over the other classes ("a small object" is generic)
    top = sims.topk(min(k, padded.shape[1]), -1).values      # [n, C, kk]
    ok = torch.isfinite(top)
    per_class = top.masked_fill(~ok, 0).sum(-1) / ok.sum(-1).clamp(min=1)  # [n, C]
    specific = ((per_class.sum(1) - per_class[:, c]) / (C - 1)) if C > 1 else torch.zeros(n)
    return agree, specific


def mine_vector(emb, score, keep=0.7, temperature=0.1):
    """Drop the lowest-scoring (1 - keep) fraction, softmax-weight the rest by score:
    returns (L2-normalised class vector [m], weights [n], 0 for dropped candidates)."""
    n_keep = max(1, round(keep * len(score)))
    kept = score.topk(n_keep).indices
    w = torch.zeros(len(score))
    w[kept] = torch.softmax(score[kept] / temperature, 0)
    return F.normalize(w @ emb, dim=0), w


def mean_vector(emb):
    return F.normalize(emb.mean(0), dim=0)


def score_in_pools(embs, splits, images=None, image_weight=1.0, k=2):
    """score_candidates for the classes of every split, each split scored within its pool
    (POOLS). embs: one [n_c, m] tensor per class; splits: the split of each class;
    images: None or [C, m] as in score_candidates. Returns one dict of scores per class."""
    scores = [None] * len(embs)
    for split, pool in POOLS.items():
        at = [i for i, s in enumerate(splits) if s in pool]
        pooled = score_candidates([embs[i] for i in at], None if images is None else images[at],
                                  image_weight, k)
        for i, sc in zip(at, pooled):
            if splits[i] == split:
                scores[i] = sc
    return scores


# ----------------------------------------------------------------------------------
# The knowledge sources (step 1 of the header). Each returns, per class name, its
# statements as (text, correct) pairs (`correct` is None unless the source knows, as
# the toy describer does), and a description of itself for the checkpoint and the JSON.

# CLIP's "a photo of a {}." and seven more of the 80 ImageNet prompts of its paper,
# the plain ones that suit any object class.
TEMPLATES = [
    "a photo of a {}.", "itap of a {}.", "a bad photo of the {}.", "a photo of the large {}.",
    "a photo of the small {}.", "a cropped photo of a {}.", "a blurry photo of a {}.",
    "a close-up photo of a {}.",
]
# what every language model is asked about every class (--llm-prompt)
PROMPT = ("List {n} short visual descriptions of a {name}, as it looks in a photo: its colours, "
          "shape, pattern, texture or parts. One description per line, each under 10 words, "
          "no numbering, no other text.")
SOURCE_KINDS = ("templates", "llm", "files", "wordnet")
SOURCES_DEFAULT = "templates,llm,files"  # --sources: every kind that was given (wordnet: if asked)


def templates_source(names):
    """CLIP's prompt templates of the bare class name: always available."""
    table = {n: [(t.format(n), None) for t in TEMPLATES] for n in names}
    return table, {"name": "templates", "kind": "templates", "templates": TEMPLATES}


def files_source(path, names, keys="name", ids=None):
    """A descriptions file (--descriptions; keys: --descriptions-keys, ids: {class name: id}).
    Also returns the classes it lacks."""
    found = load_descriptions_file(path, names, keys, ids)
    return ({n: [(t, None) for t in texts] for n, texts in found.items()},
            {n: "not in the file" for n in names if n not in found},
            {"name": f"file:{os.path.basename(path)}", "kind": "file", "keys": keys,
             "path": os.path.abspath(path), "file_id": common.file_id(path)})


def wordnet_source(folder, names, ids):
    """WordNet 3.0 (--sources wordnet): every ImageNet class is a noun synset whose offset is
    its wnid's digits. Its gloss (the definitions, not the usage examples), its other lemmas
    and its hypernyms' lemmas become statements: real, offline knowledge written by people."""
    if not all(re.fullmatch(r"n\d{8}", ids.get(n) or "") for n in names):
        raise common.UserError("--sources wordnet needs classes that are ImageNet wnids "
                               "(mini-imagenet, tiered-imagenet, or folders named n01234567)")
    synsets = read_wordnet(folder)
    table, failed = {}, {}
    for name in names:
        synset = synsets.get(ids[name][1:])
        if synset is None:
            failed[name] = f"{ids[name]} is no noun synset of WordNet 3.0"
            continue
        lemmas, gloss, hypernyms = synset
        said = [f"{article(name)} {name}, {d}." for d in gloss]
        said += [f"{article(w)} {w}." for w in lemmas if w.lower() != name.lower()]
        said += [f"{article(name)} {name}, a kind of {w}." for h in hypernyms if h in synsets
                 for w in synsets[h][0]]
        table[name] = [(t, None) for t in dict.fromkeys(said)]
    source = {"name": "wordnet", "kind": "wordnet", "path": os.path.abspath(folder),
              "file_id": common.file_id(os.path.join(folder, "data.noun"))}
    return table, failed, source


def llm_source(specs, names, args, key):
    """Language models (--llm): the toy describer (toyworld.py), and real ones asked through
    the client at the bottom of this file (answers cached). Returns ({source: table},
    {source: {class name: reason}} for the classes a model failed on, [source descriptions
    in the order of --llm])."""
    tables, failures, sources, remote = {}, {}, [], []
    for spec in specs:
        if spec == "toy" or spec.startswith("toy@"):  # the stand-in LLM of the toy world
            try:
                table, source = toyworld.describer_source(spec, names, args)
            except ValueError as e:
                raise common.UserError(str(e)) from None
            if source["name"] not in tables:
                tables[source["name"]] = table
                sources.append(source)
            continue
        base, url, model = parse_llm_spec(spec)
        src = f"llm:{model}@{redact(base)}"
        if any(src == r[0] for r in remote):
            continue
        remote.append((src, url, model))
        sources.append({"name": src, "kind": "llm", "endpoint": redact(url), "model": model,
                        "prompt": args.llm_prompt})
    if remote:
        try:
            args.llm_prompt.format(name="x", n=1)
        except (KeyError, IndexError, ValueError):
            raise common.UserError("--llm-prompt may hold only the placeholders {name} and {n}")
        env = "$" + args.llm_key_env
        print(f"asking {len(remote)} language model(s) about {len(names)} classes; key: "
              f"{env if key else 'none (' + env + ' is unset)'}")
        answers, failed = ask_llms(remote, names, args, key)
        for src, _, _ in remote:
            tables[src] = {n: [(t, None) for t in texts] for n, texts in answers[src].items()}
            failures[src] = failed[src]
    return tables, failures, sources


def gather(args, classes, key):
    """Candidates per class: {(split, class index): [{"text", "source", "correct"?}]}, the
    sources used, their failures ({source: {class name: reason}}) and the kinds asked for."""
    kinds = list(dict.fromkeys(k.strip() for k in args.sources.split(",") if k.strip()))
    bad = [k for k in kinds if k not in SOURCE_KINDS]
    if bad:
        raise common.UserError(f"--sources: unknown kind '{bad[0]}'; choose from "
                               f"{', '.join(SOURCE_KINDS)}")
    toy_world = args.dataset in common.TOY_TEACHERS.values()
    llm_specs = args.llm if args.llm is not None else (["toy"] if toy_world else [])
    use_llm = "llm" in kinds and llm_specs
    use_files = "files" in kinds and args.descriptions
    use_wordnet = "wordnet" in kinds
    if not ("templates" in kinds or use_llm or use_files or use_wordnet):
        raise common.UserError(f"no knowledge source: --sources '{args.sources}' selects none "
                               f"that was given (llm needs --llm URL@MODEL, files needs "
                               f"--descriptions FILE, templates and wordnet need nothing)")
    if args.sources == SOURCES_DEFAULT:
        # the default is every kind that was given: a language model is optional (README)
        if not use_llm:
            files = "the --descriptions files" if use_files else "no descriptions file"
            print(f"sources: no --llm, so no language model is asked: SynMine mines the prompt "
                  f"templates and {files} (add --llm URL@MODEL for a model's descriptions)")
    elif kinds != ["templates"] and not (use_llm or use_files or use_wordnet):
        raise common.UserError(f"--sources {args.sources}: only the prompt templates are "
                               f"available: give --llm URL@MODEL or --descriptions FILE for "
                               f"SynMine, or --sources templates for the templates-only ablation")
    all_classes = [(s, i, n) for s in common.SPLITS for i, n in enumerate(classes[s])]
    names = list(dict.fromkeys(n for _, _, n in all_classes))
    if not names:
        raise common.UserError(f"dataset '{args.dataset}' has no class names")
    per_source = {}  # source -> {class name: [(text, correct or None)]}
    failures = {}    # source -> {class name: reason}
    sources = []     # what each source is, for the checkpoint and the JSON (no secrets)
    if "templates" in kinds:
        per_source["templates"], source = templates_source(names)
        sources.append(source)
    keys = [k.strip() for k in args.descriptions_keys.split(",")]
    if use_files and (len(keys) not in (1, len(args.descriptions))
                      or not set(keys) <= set(DESCRIPTION_KEYS)):
        raise common.UserError(f"--descriptions-keys {args.descriptions_keys}: give one of "
                               f"{', '.join(DESCRIPTION_KEYS)} for every file, or a comma list "
                               f"of them, one per --descriptions file "
                               f"({len(args.descriptions)} given)")
    ids = (class_ids(args.dataset, args.data_root)
           if use_wordnet or (use_files and set(keys) != {"name"}) else {})
    if use_files:  # read first: a wrong path fails before any question is asked
        for path, how in zip(args.descriptions, keys * len(args.descriptions)
                             if len(keys) == 1 else keys):
            table, failed, source = files_source(path, names, how, ids)
            per_source[source["name"]], failures[source["name"]] = table, failed
            sources.append(source)
    if use_wordnet:
        per_source["wordnet"], failures["wordnet"], source = wordnet_source(args.wordnet, names,
                                                                            ids)
        sources.append(source)
    if use_llm:
        tables, failed, llms = llm_source(llm_specs, names, args, key)
        per_source.update(tables)
        failures.update(failed)
        sources += llms

    # Report every source that lacks classes, loudly, and go on with the others.
    for src, failed in failures.items():
        if failed:
            reasons = Counter(r.split(" (after")[0] for r in failed.values())
            summary = "; ".join(f"{r}: {c}" for r, c in reasons.most_common(3))
            print(f"WARNING: {src} gave nothing for {len(failed)} of {len(names)} classes "
                  f"({summary}); those classes use the other sources")

    # One candidate list per class; a source's repeated statements count once.
    candidates, missing = {}, []
    for split, i, name in all_classes:
        cands = []
        for src, table in per_source.items():
            seen = set()
            for text, correct in table.get(name, []):
                if text.lower() not in seen:
                    seen.add(text.lower())
                    cands.append({"text": text, "source": src,
                                  **({} if correct is None else {"correct": bool(correct)})})
        candidates[(split, i)] = cands
        if not cands:
            missing.append(name)
    if missing:
        raise common.UserError(f"no candidate description for {len(missing)} classes (e.g. "
                               f"'{missing[0]}'): add them to the descriptions file or use more "
                               f"sources (e.g. --sources templates,files)")
    return candidates, sources, failures, kinds


# ----------------------------------------------------------------------------------
# The run: flags, then main() (gather, encode, mine, measure, write)

def get_args():
    p = common.parser(__doc__)
    flag = common.flag
    flag(p, "--sources", default=SOURCES_DEFAULT,
         help="comma list of the source kinds to use, of: templates, llm, files, wordnet "
              "('templates' alone makes the syntrans-templates ablation); by default every "
              "kind that was given (llm with --llm, files with --descriptions); wordnet only "
              "when named")
    flag(p, "--llm", action="append", default=None, metavar="URL@MODEL",
         help="a chat-completions endpoint and model, e.g. "
              "http://localhost:8000/v1@qwen2.5-7b-instruct; repeatable; 'toy' or 'toy@SEED' is "
              "the toy world's describer (default: toy for the toy worlds, none otherwise)")
    flag(p, "--llm-key-env", default="OPENAI_API_KEY",
         help="environment variable holding the API key (sent as a Bearer token; never written)")
    flag(p, "--llm-prompt", default=PROMPT, help="the question, with {name} and {n} placeholders")
    flag(p, "--llm-n", type=int, default=10, within="[1, inf)",
         help="descriptions asked per class; at most twice this many are used")
    flag(p, "--llm-timeout", type=float, default=60.0, within="(0, inf)",
         help=f"seconds to wait for one whole answer (of which at most {ANSWER_BYTES >> 10} KiB "
              f"are read)")
    flag(p, "--llm-retries", type=int, default=2, within="[0, inf)",
         help="retries of a failed request (timeouts, HTTP 5xx/429, garbage)")
    flag(p, "--llm-backoff", type=float, default=2.0, within="[0, inf)",
         help="seconds before the first retry, doubling after each (longer where a server "
              "asks for it with Retry-After, up to --llm-timeout)")
    flag(p, "--llm-max-tokens", type=int, default=0, within="[0, inf)",
         help="max_tokens sent with each question (0: none sent, the server's default, which "
              "may be its whole context)")
    flag(p, "--llm-give-up", type=int, default=5, within="[0, inf)",
         help="after this many consecutive classes a model failed as a server (no answer: "
              "refused connections, timeouts, HTTP errors, garbage) its remaining classes are "
              "skipped (0: never); an answer with no usable description does not count")
    flag(p, "--llm-workers", type=int, default=4, within="[1, inf)",
         help="requests in flight at once")
    for name, kw in toyworld.DESCRIBER_FLAGS.items():  # --toy-*: the toy describer's own
        flag(p, name, **kw)
    flag(p, "--descriptions", action="append", default=[], metavar="FILE",
         help=f"JSON file: class key -> list of descriptions (or an earlier "
              f"02_descriptions.json; the first {FILE_STATEMENTS} of a class are used); "
              f"repeatable")
    flag(p, "--descriptions-keys", default="name", metavar="|".join(DESCRIPTION_KEYS),
         help="what the keys of a --descriptions file are: our readable class names, the "
              "classes' wnids (or other ids: data/splits/), or ilsvrc-order (the i-th key is "
              "the i-th sorted ILSVRC-2012 wnid, as Menon & Vondrick publish); a comma list "
              "gives one per file")
    flag(p, "--wordnet", default="/usr/share/wordnet", metavar="DIR",
         help="--sources wordnet: the WordNet 3.0 database folder (data.noun; the Debian "
              "package wordnet-base, or nltk's corpora/wordnet)")
    flag(p, "--keep", type=float, default=0.5, within="(0, 1]",
         help="fraction of each class's candidates kept")
    flag(p, "--temperature", type=float, default=0.3, within="(0, inf)",
         help="softmax temperature of the kept candidates' weights")
    flag(p, "--support-k", type=int, default=2, within="[1, inf)",
         help="k best matches used by the agreement and specificity scores")
    flag(p, "--image-weight", type=float, default=0.0, within="[0, inf)",
         help="weight of the base-class image vote (0, the default chosen on val classes: skip "
              "it, so base vectors are made as val and novel ones are, and do not load the "
              "base images; docs/RESULTS.md)")
    flag(p, "--compare", action="store_true",
         help="also measure teacher zero-shot accuracy on --split's classes: templates / all "
              "averaged / SynMine")
    flag(p, "--split", default="val", choices=["val", "test"],
         help="--compare: the classes measured (val chooses settings; test is the final report "
              "only)")
    flag(p, "--episodes", type=int, default=600, within="[1, inf)",
         help="--compare: fixed episodes")
    flag(p, "--ways", type=int, default=5, help="--compare: classes per episode")
    flag(p, "--queries", type=int, default=15, help="--compare: queries per class")
    flag(p, "--out", default=common.SEMANTICS,
         help="checkpoint name in the run folder; the JSON is named after it (02_semantics.pt "
              "-> 02_descriptions.json, 02_semantics_templates.pt -> "
              "02_descriptions_templates.json)")
    return p


def main(argv=None):
    args, device = common.start(get_args(), argv, "mine")
    t0 = time.time()
    out_path = os.path.join(args.run, args.out)
    stem = os.path.splitext(args.out)[0]
    json_path = os.path.join(args.run, stem.replace("semantics", "descriptions") + ".json"
                             if "semantics" in stem else stem + "_descriptions.json")
    key = os.environ.get(args.llm_key_env) or None  # read here, sent in a header, never stored

    common.check_teacher(args)  # a wrong or forgotten teacher is refused before any work
    # ---- class names of every split (read from the class lists: no image is loaded for them)
    classes = common.class_names(args.dataset, args.data_root)
    measured = None
    if args.compare:  # the zero-shot episodes, refused before anything is asked or encoded
        measured = common.load_split(args.dataset, args.split, args.data_root, args.image_size)
        common.check_episodes(measured, args.ways, 0, args.queries, "--ways or --queries",
                              min_shot=0)
    print(f"{args.dataset}: {', '.join(f'{len(classes[s])} {s}' for s in common.SPLITS)} "
          f"classes; device {device}")

    # ---- 1. candidates from every source
    candidates, sources, failures, kinds = gather(args, classes, key)
    order = [(s, i) for s in common.SPLITS for i in range(len(classes[s]))]
    n_cands = sum(len(candidates[c]) for c in order)
    per = {x["name"]: sum(c["source"] == x["name"] for k in order for c in candidates[k])
           for x in sources}
    print(f"{n_cands} candidates: {', '.join(f'{n} from {src}' for src, n in per.items())}")

    # ---- 2. encode with the teacher's text encoder; the image vote of the base classes
    teacher, preprocess, tokenizer, teacher_id = common.load_teacher(args.clip,
                                                                     args.clip_pretrained, device)
    texts = list(dict.fromkeys(c["text"] for k in order for c in candidates[k]))
    if args.compare:
        texts = list(dict.fromkeys(texts + [t.format(n) for n in classes[args.split]
                                            for t in TEMPLATES]))
    table = dict(zip(texts, encode_texts(teacher, tokenizer, texts, device)))
    embs = [torch.stack([table[c["text"]] for c in candidates[k]]) for k in order]
    templates_only = kinds == ["templates"]
    images = None
    if args.image_weight > 0 and classes["train"] and not templates_only:
        # the base images serve the image vote (their teacher embeddings are cached)
        train = common.load_split(args.dataset, "train", args.data_root, args.image_size)
        feats = common.teacher_image_features(args.run, teacher, preprocess, teacher_id, train,
                                              device)
        images = torch.full((len(order), feats.shape[1]), float("nan"))
        for i in range(len(classes["train"])):  # base classes come first in `order`
            images[i] = F.normalize(feats[train.labels == i].mean(0), dim=0)

    # ---- 3. score, keep, weight: one vector per class; each split scored within its pool
    scores = score_in_pools(embs, [s for s, _ in order], images, args.image_weight,
                            args.support_k)
    vectors = {s: [] for s in common.SPLITS}
    for k, e, sc in zip(order, embs, scores):
        if templates_only:  # the ablation: CLIP's prompt ensemble, no mining
            v, w = mean_vector(e), torch.full((len(e),), 1 / len(e))
        else:
            v, w = mine_vector(e, sc["score"], args.keep, args.temperature)
        vectors[k[0]].append(v)
        record = {s: sc[s] for s in ("score", "agree", "specific", "image")} | {"weight": w}
        for j, c in enumerate(candidates[k]):  # what the JSON holds of each candidate
            c.update({s: round(x[j].item(), 4) for s, x in record.items()}, kept=bool(w[j] > 0))
    state = {s: torch.stack(vectors[s]) if vectors[s] else torch.zeros(0, embs[0].shape[1])
             for s in common.SPLITS}
    wrong = print_kept([candidates[k] for k in order], sources, templates_only)

    # ---- 4. optionally, measure: teacher zero-shot on the val (or novel) classes
    report = None
    if args.compare:
        feats = common.teacher_image_features(args.run, teacher, preprocess, teacher_id, measured,
                                              device)
        keys = [k for k in order if k[0] == args.split]
        report = compare(args, feats, measured.labels, classes[args.split], table,
                         [candidates[k] for k in keys], state[args.split], sources, templates_only)
        report.update(wrong_removed_all=wrong[0], wrong_all=wrong[1], correct_kept_all=wrong[2])

    # ---- 5. write the vectors and the readable JSON (neither holds the key)
    config = vars(args) | {"llm": [redact_spec(s) for s in (args.llm or [])], "out": args.out}
    upstream = {x["name"]: x["file_id"] for x in sources if x["kind"] == "file"}
    doc = {"dataset": args.dataset, "teacher": teacher_id, "checkpoint": args.out,
           "config": config, "sources": sources, "failures": failures, "compare": report,
           "splits": {s: {n: {"kept": sum(c["kept"] for c in candidates[(s, i)]),
                              "candidates": candidates[(s, i)]}
                          for i, n in enumerate(classes[s])} for s in common.SPLITS}}
    common.save_checkpoint(out_path, "mine", config, args.dataset, classes, state,
                           upstream=upstream, teacher=teacher_id,
                           sources=[x["name"] for x in sources],
                           failures={src: len(f) for src, f in failures.items()},
                           together={json_path: json.dumps(doc, ensure_ascii=False, indent=1)})
    common.Log(args.run, args.out).write(classes={s: len(v) for s, v in state.items()},
                                         failures={s: len(f) for s, f in failures.items()},
                                         stage_seconds=round(time.time() - t0, 2))
    print(f"wrote {out_path} ({', '.join(f'{s} {tuple(state[s].shape)}' for s in common.SPLITS)}) "
          f"and {json_path} ({time.time() - t0:.0f}s)")


# ----------------------------------------------------------------------------------
# What mining did: kept statements, and --compare (step 3 of the header)

def print_kept(entries, sources, templates_only):
    """Print how many candidates mining kept, per source, and how many of the wrong ones it
    removed; returns wrong_removed(entries)."""
    flat = [c for cands in entries for c in cands]
    print(f"mining kept {sum(c['kept'] for c in flat)} of {len(flat)} candidates"
          + (" (templates only: plain prompt ensemble)" if templates_only else ""))
    for src in [x["name"] for x in sources]:
        mine_src = [c for c in flat if c["source"] == src]
        if mine_src:
            print(f"  {src}: kept {sum(c['kept'] for c in mine_src)} of {len(mine_src)}")
    removed, n_wrong, right_kept = wrong_removed(entries)
    if removed is not None:
        print(f"  wrong statements removed: {removed:.0%} of {n_wrong}; "
              f"correct ones kept: {right_kept:.0%}")
    return removed, n_wrong, right_kept


def compare(args, feats, labels, names, table, entries, mined, sources, templates_only):
    """--compare: the teacher's zero-shot accuracy on one split's classes (args.split) with
    templates only, all candidates averaged, SynMine and each source alone, and the weight
    shares; printed, and returned as the report for the JSON. feats [N, m] and labels [N]:
    the split's teacher image embeddings; names: its class names; table: text -> embedding;
    entries: each class's candidates; mined: SynMine's [C, m]."""
    def averaged(texts):  # one class vector per class: the mean of its texts' embeddings
        return torch.stack([mean_vector(torch.stack([table[t] for t in ts])) for ts in texts])
    rows = {"templates only": averaged([[t.format(n) for t in TEMPLATES] for n in names]),
            "all candidates averaged": averaged([[c["text"] for c in cands] for cands in entries]),
            "SynMine" + (" (= templates)" if templates_only else ""): mined}
    for x in sources:  # each source alone, averaged: who contributes what
        per = [[c["text"] for c in cands if c["source"] == x["name"]] for cands in entries]
        if x["name"] != "templates" and all(per):
            rows[f"{x['name']} only, averaged"] = averaged(per)
    accs = zero_shot(feats, labels, rows, args.ways, args.queries, args.episodes, args.seed)
    removed, n_wrong, right_kept = wrong_removed(entries)
    print(f"teacher zero-shot, {args.ways}-way, {len(names)} {args.split} classes, "
          f"{args.episodes} episodes x {args.queries} queries (mean +- 95% CI):")
    for name, (mean, ci) in accs.items():
        print(f"  {name:40s} {mean:6.2f} +- {ci:.2f}")
    if removed is not None:
        print(f"  wrong statements removed on {args.split} classes: {removed:.0%} of {n_wrong}; "
              f"correct ones kept: {right_kept:.0%}")
    shares = weight_shares(entries)
    for name, (n_share, w_share) in shares.items():
        print(f"  {name:40s} {n_share:6.1%} of the candidates, {w_share:6.1%} of the weight")
    return {"split": args.split,
            "shares": {n: {"candidates": a, "weight": b} for n, (a, b) in shares.items()},
            "ways": args.ways, "queries": args.queries, "episodes": args.episodes,
            "seed": args.seed,
            "accuracy": {name: {"mean": mean, "ci95": ci} for name, (mean, ci) in accs.items()},
            "wrong_removed": removed, "wrong": n_wrong, "correct_kept": right_kept}


def zero_shot(feats, labels, rows, ways, queries, episodes, seed):
    """Per-row (mean, ci95) of N-way zero-shot accuracy over fixed episodes: the
    queries of each episode are classified by cosine against the class vectors."""
    ep_classes, index = common.sample_episodes(labels, ways, 0, queries, episodes, seed)
    results = {}
    for name, vectors in rows.items():
        logits = torch.einsum("enqd,ecd->enqc", feats[index], vectors[ep_classes])
        results[name] = common.ci95(common.accuracy_from_logits(logits) * 100)
    return results


def wrong_removed(entries):
    """Fraction of the wrong candidates (those a source knows are wrong) that mining dropped."""
    wrong = [c for cands in entries for c in cands if c.get("correct") is False]
    right = [c for cands in entries for c in cands if c.get("correct") is True]
    return (sum(not c["kept"] for c in wrong) / len(wrong) if wrong else None, len(wrong),
            sum(c["kept"] for c in right) / len(right) if right else None)


def weight_shares(entries):
    """Per source, and for the statements a source knows are wrong: (share of the
    candidates, share of the mined weight), over the classes given (weights sum to 1
    per class, so a share of the weight is averaged over the classes)."""
    groups = {f"source {src}": lambda c, src=src: c["source"] == src
              for src in dict.fromkeys(c["source"] for cands in entries for c in cands)}
    groups["wrong statements"] = lambda c: c.get("correct") is False
    n = sum(len(cands) for cands in entries)
    return {name: (sum(is_in(c) for cands in entries for c in cands) / n,
                   sum(c["weight"] for cands in entries for c in cands if is_in(c)) / len(entries))
            for name, is_in in groups.items()}


# ----------------------------------------------------------------------------------
# Plumbing: the teacher's text encoder, the descriptions-file reader, and a client for
# language models behind an OpenAI-compatible chat-completions API (retries, a cache of
# answers, the key kept out of every file). Only this stage talks to language models.

TEXT_CHARS = 1000  # far more than 77 tokens of any text
DESCRIPTION_KEYS = ("name", "wnid", "ilsvrc-order")  # --descriptions-keys
# the 1,000 ILSVRC-2012 wnids, sorted: line i is class index i (--descriptions-keys ilsvrc-order)
ILSVRC_WNIDS = os.path.join(common.REPO, "data", "ilsvrc2012_wnids.txt")
FILE_STATEMENTS = 200  # a descriptions file's statements used per class (the first ones)
ANSWER_BYTES = 256 << 10  # bytes read of one answer (20 short lines are a few kB)


@torch.no_grad()
def encode_texts(model, tokenizer, texts, device, batch=256):
    """L2-normalised text embeddings [len(texts), m], with progress. CLIP reads 77 tokens at
    most (16 for the toy teacher), so each text is cut to TEXT_CHARS characters first (its
    tokenizer is super-linear in a long word) and its tokenizer truncates the rest."""
    from tqdm import tqdm
    texts = [t[:TEXT_CHARS] for t in texts]
    out = [model.encode_text(tokenizer(texts[i:i + batch]).to(device)).float()
           for i in tqdm(range(0, len(texts), batch), desc="encoding candidates",
                         disable=len(texts) <= batch)]
    return F.normalize(torch.cat(out), dim=-1).cpu()


def clean_text(text):
    """text with each lone surrogate (JSON's "\\ud800" reads as one; UTF-8 cannot hold it, so
    it would fail only when the results are written) replaced by U+FFFD."""
    return re.sub("[\ud800-\udfff]", "\ufffd", text)


def load_descriptions_file(path, names, keys="name", ids=None):
    """{class name: [texts]} from a JSON file: either class -> list of strings, or the
    02_descriptions.json of an earlier run (its kept non-template candidates). Cleaned as it
    is read: lone surrogates replaced (clean_text), each text cut to TEXT_CHARS characters
    (all the teacher reads of it), repeats dropped, at most FILE_STATEMENTS per class (the
    mining's time and memory grow with a class's candidates; the cut is said)."""
    where = f"--descriptions {path}"
    if not os.path.isfile(path):
        raise common.UserError(f"{where} not found" + (" (it is a folder)" * os.path.isdir(path)))
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise common.UserError(f"{where} is not valid JSON ({e})")
    except RecursionError:
        raise common.UserError(f"{where} is nested too deeply to be a descriptions file")
    if isinstance(data, dict) and isinstance(data.get("splits"), dict):  # a 02_descriptions.json
        try:
            data = {name: [c["text"] for c in entry.get("candidates", [])
                           if c.get("kept") and c.get("source") != "templates"]
                    for split in data["splits"].values() for name, entry in split.items()}
        except (AttributeError, KeyError, TypeError):
            raise common.UserError(f"{where} looks like a 02_descriptions.json but is damaged "
                                   f"(splits -> class -> candidates -> text): rerun the stage "
                                   f"that wrote it")
        keys = "name"  # (its classes are named by our readable names)
    if not isinstance(data, dict) or not all(isinstance(v, list) and all(isinstance(s, str)
                                                                         for s in v)
                                             for v in data.values()):
        raise common.UserError(f"{where} must map class names to lists of strings")
    data = {clean_text(n): texts for n, texts in data.items()}
    matched, unknown = match_keys(list(data), names, keys, ids, where)
    found = {}
    for n in (n for n in names if n in matched):
        texts, seen = [], set()
        for t in data[matched[n]]:
            t = clean_text(t.strip())[:TEXT_CHARS].strip()
            if t and t.lower() not in seen:
                seen.add(t.lower())
                texts.append(t)
        found[n] = texts
    cut = {n: len(t) for n, t in found.items() if len(t) > FILE_STATEMENTS}
    if cut:
        most = max(cut, key=cut.get)
        print(f"  {path}: {len(cut)} classes have over {FILE_STATEMENTS} descriptions (e.g. "
              f"'{most}': {cut[most]}): the first {FILE_STATEMENTS} of each are used")
        found = {n: t[:FILE_STATEMENTS] for n, t in found.items()}
    if not found:
        raise common.UserError(f"{where} names none of the {len(names)} classes of this dataset "
                               f"(e.g. '{names[0]}') with --descriptions-keys {keys}: is it the "
                               f"file of another dataset, or are its keys another kind?")
    # one line: what was matched, which classes were not, and what the file holds besides
    lacking = [n for n in names if n not in found]
    line = f"  {path} (keys: {keys}): matched {len(found)} of {len(names)} classes"
    if lacking:
        line += (f"; not in the file: {', '.join(repr(n) for n in lacking[:10])}"
                 + (f" and {len(lacking) - 10} more" if len(lacking) > 10 else ""))
    if unknown:
        line += f"; {len(unknown)} keys are no class of this dataset (e.g. '{unknown[0]}')"
    print(line)
    # two classes that receive the same text would get vectors that only their names tell apart
    same = {}
    for n, texts in found.items():
        same.setdefault(tuple(t.lower() for t in texts), []).append(n)
    same = [group for texts, group in same.items() if texts and len(group) > 1]
    if same:
        print(f"  {path}: {sum(map(len, same))} classes receive the same descriptions as "
              f"another: " + "; ".join(" = ".join(repr(n) for n in g) for g in same[:5])
              + (f" and {len(same) - 5} more groups" if len(same) > 5 else ""))
    return found


def match_keys(keys_in_file, names, keys, ids, where):
    """Which key of a descriptions file holds which class ({class name: key}), and the keys
    that are no class of this dataset. keys: "name" (our readable names; case, '_' and spaces
    as CLIP's tokenizer reads them), "wnid" (the ids of data/splits/, e.g. n01532829) or
    "ilsvrc-order" (the i-th key is the i-th sorted ILSVRC-2012 wnid: key order, not the key's
    text, names the class, as in Menon & Vondrick's file, whose keys were altered so that none
    repeat). The first key of a class wins."""
    def norm(n):
        return " ".join(n.replace("_", " ").lower().split())
    if keys == "name":
        index, of_key = {norm(n): n for n in names}, norm
    else:
        index = {ids[n]: n for n in names if ids.get(n)}
        if not index:
            raise common.UserError(f"{where}: --descriptions-keys {keys} needs classes with ids "
                                   f"(wnids of data/splits/); this dataset's have none: use name")
        of_key = {k: k for k in keys_in_file}.get
        if keys == "ilsvrc-order":
            wnids = read_lines(ILSVRC_WNIDS)
            if len(keys_in_file) != len(wnids):
                raise common.UserError(f"{where} has {len(keys_in_file)} keys, not the "
                                       f"{len(wnids)} ILSVRC-2012 classes that "
                                       f"--descriptions-keys ilsvrc-order maps by position")
            of_key = dict(zip(keys_in_file, wnids)).get
    matched, unknown = {}, []
    for k in keys_in_file:
        n = index.get(of_key(k))
        if n is None:
            unknown.append(k)
        else:
            matched.setdefault(n, k)
    return matched, unknown


def article(word):
    return "an" if word[:1].lower() in "aeiou" else "a"


def read_lines(path):
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def class_ids(dataset, root):
    """{readable class name: id}: the wnid (mini-/tiered-ImageNet), the CIFAR fine name, the
    folder of a folder dataset; {} for the toy worlds, whose classes have no other name."""
    if dataset.startswith("toy"):
        return {}
    lists = [common.folder_classes(root, s) if dataset == "folder"
             else common.split_classes(dataset, s) for s in common.SPLITS]
    return {name: cid for rows in lists for cid, name in rows}


def read_wordnet(folder):
    """The noun synsets of a WordNet 3.0 database: {offset (8 digits): (lemmas, gloss
    definitions, hypernym offsets)}, parsed from data.noun (its format: wndb(5WN)). A line is
    'offset lex_filenum n w_cnt(hex) word lex_id ... p_cnt ptr... | gloss'; a hypernym
    pointer is '@' (or '@i', an instance's) offset n 0000; the gloss is definitions and
    quoted usage examples, separated by ';'."""
    path = os.path.join(folder, "data.noun")
    if not os.path.isfile(path):
        raise common.UserError(f"--wordnet {folder}: no WordNet 3.0 database there (data.noun): "
                               f"install the package wordnet-base (apt-get install wordnet-base) "
                               f"or point --wordnet at nltk's corpora/wordnet folder")
    synsets = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith(" "):  # the licence at the top
                continue
            head, _, gloss = line.partition(" | ")
            fields = head.split()
            n_words = int(fields[3], 16)
            lemmas = [w.replace("_", " ") for w in fields[4:4 + 2 * n_words:2]]
            lemmas = [re.sub(r"\((?:a|p|ip)\)$", "", w) for w in lemmas]  # adjective markers
            at = 4 + 2 * n_words
            ptrs = [fields[at + 1 + 4 * i: at + 5 + 4 * i] for i in range(int(fields[at]))]
            hypernyms = [p[1] for p in ptrs if p[0] in ("@", "@i") and p[2] == "n"]
            parts = [g.strip() for g in gloss.strip().split(";")]
            definitions = [g for g in parts if g and not g.startswith('"')]
            synsets[fields[0]] = (lemmas, definitions, hypernyms)
    if not synsets:
        raise common.UserError(f"--wordnet {folder}: {path} holds no synset: is it WordNet's "
                               f"data.noun?")
    return synsets


class LLMError(Exception):
    """A failed request. The message is a short reason for the report: it never holds
    the key or a server's error body (which may echo a part of the key)."""

    def __init__(self, reason, retry=False, wait=0.0):
        super().__init__(reason)
        self.retry, self.wait = retry, wait  # wait: seconds the server asked for (Retry-After)


def parse_llm_spec(spec):
    """'URL@MODEL' -> (base URL, chat-completions endpoint, model). The model follows
    the last '@'; the endpoint is URL/chat/completions unless URL already ends so. A URL
    with user:password@ is refused: the key goes in the environment (--llm-key-env)."""
    url, sep, model = spec.rpartition("@")
    try:  # a query string (?api_key=...) stays after the path
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 (a port that is no number raises here, not at the request)
    except ValueError:
        parts = None
    if (not sep or not url or not model or parts is None
            or parts.scheme not in ("http", "https") or not parts.hostname):
        raise common.UserError(f"--llm '{redact_spec(spec)}' is not URL@MODEL (e.g. "
                               f"http://localhost:8000/v1@qwen2.5-7b-instruct) nor toy / toy@SEED")
    if "@" in parts.netloc:
        raise common.UserError(f"--llm '{redact_spec(spec)}': a user:password@ in the URL is not "
                               f"sent: put the API key in $OPENAI_API_KEY (or the variable "
                               f"--llm-key-env names), sent as a Bearer token, and drop it "
                               f"from the URL")
    path = parts.path.rstrip("/")
    chat_path = path if path.endswith("/chat/completions") else path + "/chat/completions"
    return (urllib.parse.urlunsplit(parts._replace(path=path)),
            urllib.parse.urlunsplit(parts._replace(path=chat_path)), model)


def redact(url):
    """A URL without user:password@ and without its query string (either may hold a key),
    for what is printed or written."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:  # e.g. an unclosed [ of an IPv6 address: cut what may follow a host
        return re.sub(r"//[^/?#]*@", "//", url).split("?")[0].split("#")[0]
    if "@" not in parts.netloc and not parts.query and not parts.fragment:
        return url
    netloc = parts.netloc.rpartition("@")[2]  # host[:port] as written (never parsed: no error)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc, query="", fragment=""))


def redact_spec(spec):
    """--llm URL@MODEL as it may be printed or written (a user:password@ removed wherever it
    is, even where the spec is malformed, e.g. with no @MODEL)."""
    spec = re.sub(r"//[^/?#]*@", "//", spec.strip())
    url, sep, model = spec.rpartition("@")
    return redact(url) + sep + model if sep else redact(spec)


def secrets(url, key):
    """What never reaches a file or the terminal: the API key, and a URL's password and query
    values (8 characters or more: not every short value is a secret)."""
    parts = urllib.parse.urlsplit(url)
    found = [parts.password] + [v for _, v in urllib.parse.parse_qsl(parts.query)]
    return [key] * bool(key) + [v for v in found if v and len(v) >= 8]


def drop_secret_lines(text, hidden):
    """An answer without the lines that hold a secret (a server may echo the request's headers)."""
    return "\n".join(line for line in text.splitlines() if not any(h in line for h in hidden))


class NoRedirect(urllib.request.HTTPRedirectHandler):
    """Follow no redirect: urllib would resend the request, the key's header included, to
    whatever host a server names. A redirect is an HTTPError, a failure of that model."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        raise urllib.error.HTTPError(req.full_url, code, msg, headers, fp)


OPENER = urllib.request.build_opener(NoRedirect)  # urlopen's handlers, NoRedirect in its place


def retry_after(headers):
    """The seconds a 429 or 503 answer asks the client to wait (Retry-After: seconds or an
    HTTP date), 0 when it names none."""
    value = str(headers.get("Retry-After", "") if headers else "").strip()
    try:
        return max(0.0, float(value))  # (NaN gives 0)
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, IndexError, OverflowError):
        return 0.0


def chat(url, model, prompt, key=None, timeout=60.0, max_tokens=0):
    """One chat-completions request; returns the answer's text or raises LLMError.
    Only model and messages are sent (and max_tokens when given: some servers' default is
    their whole context): the defaults of every server (some reject a temperature) and the
    cache make runs reproducible anyway. At most ANSWER_BYTES are read, within `timeout`; a
    redirect is refused (NoRedirect); a streamed answer (server-sent events) is read too."""
    request = {"model": model, "messages": [{"role": "user", "content": prompt}]}
    body = json.dumps(request | ({"max_tokens": max_tokens} if max_tokens else {})).encode()
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    deadline = time.monotonic() + timeout  # for the whole answer: a server may trickle it
    try:
        with OPENER.open(request, timeout=timeout) as r:
            raw, size = [], 0
            while chunk := r.read1(1 << 16):
                raw.append(chunk)
                size += len(chunk)
                if size > ANSWER_BYTES:  # a server that never stops: a bounded memory and cache
                    raise LLMError(f"the answer is over {ANSWER_BYTES >> 10} KiB: not read "
                                   f"further", retry=True)
                if time.monotonic() > deadline:
                    raise TimeoutError
            raw = b"".join(raw)
    except urllib.error.HTTPError as e:  # 4xx other than 429 will not fix itself: no retry
        e.close()
        if 300 <= e.code < 400:  # (where to is not said: a server may put the key in it)
            raise LLMError(f"HTTP {e.code} redirect not followed (the key goes to no other "
                           f"address): give the URL it names in --llm, if you trust it")
        # the standard reason phrase, not the server's own (which may echo the key)
        phrase = http.HTTPStatus(e.code).phrase if e.code in set(http.HTTPStatus) else "error"
        hint = {401: " (check the key)", 403: " (check the key)",
                400: " (the server refused the request: over its context? a smaller "
                     "--llm-max-tokens may fit)"}.get(e.code, "")
        raise LLMError(f"HTTP {e.code} {phrase}{hint}", retry=e.code >= 500 or e.code == 429,
                       wait=retry_after(e.headers) if e.code in (429, 503) else 0.0)
    except TimeoutError:
        raise LLMError(f"timeout after {timeout:g}s", retry=True)
    except urllib.error.URLError as e:
        if isinstance(e.reason, TimeoutError):
            raise LLMError(f"timeout after {timeout:g}s", retry=True)
        raise LLMError(f"unreachable ({e.reason})", retry=True)
    except (OSError, http.client.HTTPException) as e:
        raise LLMError(f"connection failed ({type(e).__name__})", retry=True)
    try:
        data = from_events(raw) if raw.lstrip().startswith(b"data:") else json.loads(raw)
        choice = data["choices"][0]
        message = choice["message"]
        if not isinstance(message, dict):
            raise TypeError
    except (ValueError, RecursionError):  # RecursionError: JSON nested thousands deep
        raise LLMError("the answer is not JSON", retry=True)
    except (KeyError, IndexError, TypeError):
        raise LLMError("the answer is not a chat completion (no choices[0].message)", retry=True)
    if message.get("refusal") or choice.get("finish_reason") == "content_filter":
        raise LLMError("refused")
    content = message.get("content")
    if isinstance(content, list):  # some servers send a list of content parts (text: a string)
        content = "".join(part["text"] for part in content
                          if isinstance(part, dict) and isinstance(part.get("text"), str))
    if not isinstance(content, str) or not content.strip():
        raise LLMError("empty answer", retry=True)
    content = answer_text(content, choice.get("finish_reason"))
    if not content:  # (a reasoning model's answer is what follows its reasoning)
        raise LLMError("empty answer: only reasoning or special tokens (a reasoning model may "
                       "need a larger --llm-max-tokens)", retry=True)
    return clean_text(content)


def from_events(raw):
    """A streamed answer (server-sent events: 'data: {chunk}' lines, then 'data: [DONE]'),
    some servers send one even unasked, as one chat completion: the chunks' delta texts."""
    parts, finish = [], None
    for line in raw.decode("utf-8", "replace").splitlines():
        if not line.startswith("data:") or line[5:].strip() == "[DONE]":
            continue
        choice = json.loads(line[5:])["choices"][0]
        delta = choice.get("delta") or choice.get("message") or {}
        if isinstance(delta.get("content"), str):
            parts.append(delta["content"])
        finish = choice.get("finish_reason") or finish
    return {"choices": [{"message": {"content": "".join(parts)}, "finish_reason": finish}]}


# what a chat model may write besides its answer: a reasoning block, and the special tokens
# of its chat template where a server does not stop at them (the rest is another turn)
_THINK = re.compile(r"<think>.*?(?:</think>|$)", re.S)
_SPECIAL = re.compile(r"<\|[A-Za-z_]{2,24}\|>|</s>|\[/?INST\]")


def answer_text(content, finish_reason=None):
    """The answer in a model's message: its reasoning (<think>...</think>) dropped, cut at the
    first special token (<|im_end|>, <|eot_id|>, </s>, ...) and, when the answer was cut off
    by the token limit (finish_reason "length"), at the end of its last whole line or
    sentence."""
    text = _SPECIAL.split(_THINK.sub("", content), 1)[0].strip()
    if finish_reason == "length" and text:
        ends = [m.end() for m in re.finditer(r"[.!?](?=\s|$)|\n", text)]
        text = text[:ends[-1]].strip() if ends else ""
    return text


def ask(url, model, prompt, key=None, timeout=60.0, retries=2, backoff=2.0, max_tokens=0):
    """chat() with bounded retries: at most 1 + retries requests, waits doubling, or longer
    where the server asks for it (Retry-After), but never more than `timeout` for that."""
    for attempt in range(retries + 1):
        try:
            return chat(url, model, prompt, key, timeout, max_tokens)
        except LLMError as e:
            if not e.retry or attempt == retries:
                tries = "try" if attempt == 0 else "tries"
                raise LLMError(f"{e} (after {attempt + 1} {tries})") from None
            time.sleep(max(backoff * 2 ** attempt, min(e.wait, timeout)))


_BULLET = re.compile(r"^(?:[-*+\u2022\u00b7\u2013>#]+|\(?\d{1,3}[.):]|\(?[a-zA-Z][.)])\s+")
_REFUSAL = re.compile(r"^(?:i'?m sorry|i am sorry|sorry,|i can(?:no|')t|i am unable|i'm unable"
                      r"|as an ai)", re.I)
_PREAMBLE = re.compile(r"^(?:here (?:are|is)|sure[,!.]|certainly[,!.]|of course[,!.])", re.I)
# what a chat model adds around its descriptions: a closing remark, a note on itself
_REMARK = re.compile(r"^(?:i hope|hope this|let me know|feel free|note:|these (?:descriptions|"
                     r"are)|this (?:list|description)|i (?:have|'ve) (?:tried|included))", re.I)
# a short label before a colon, as models write them: "Colour: bright red", "**Shape:** round"
_LABEL = re.compile(r"^[\w][\w '/&()-]{0,40}:\s+(?=\S)")
# where a long sentence is cut into clauses
_CLAUSE = re.compile(r"\s*[;:\u2014]\s+|,\s+(?:and|but|while|whereas)\s+"
                     r"|,\s+(?=(?:with|which)\s)|\s+\u2013\s+")
WORDS = 25  # a statement of more words is cut into clauses (CLIP reads 77 tokens)


def parse_descriptions(text, max_n=20):
    """The descriptions in a model's answer, taken as it writes them: lines (bullets,
    numbers, quotes and markdown removed; a short 'Label:' before the text dropped), cut into
    sentences, and a sentence of over WORDS words into its clauses. Headers, preambles,
    closing remarks and refusals are dropped, duplicates removed; a piece of over 40 words or
    TEXT_CHARS characters is no description. A JSON list of strings is read too."""
    text = text.strip()
    try:
        items = json.loads(re.sub(r"^```\w*\s*|\s*```$", "", text))
        lines = ([s for s in items if isinstance(s, str)] if isinstance(items, list)
                 else text.splitlines())
    except (ValueError, RecursionError):  # not JSON, or nested thousands deep
        lines = text.splitlines()
    out, seen = [], set()
    for line in lines:
        s = line.strip()
        if s.startswith("```") or s.endswith(":"):  # a code fence, a header
            continue
        s = _BULLET.sub("", s).replace("**", "").replace("__", "").strip("*_ \t")  # (italics)
        s = _LABEL.sub("", s) if len(s.split()) > 3 else s
        for piece in statements(s):
            piece = piece.strip("\"'`\u201c\u201d\u2018\u2019()").strip().rstrip(",;").strip()
            if (not piece or not re.search(r"[A-Za-z]", piece) or piece.endswith(":")
                    or len(piece.split()) > 40 or len(piece) > TEXT_CHARS
                    or _REFUSAL.match(piece) or _PREAMBLE.match(piece) or _REMARK.match(piece)):
                continue
            if piece.lower() not in seen:
                seen.add(piece.lower())
                out.append(piece)
    return out[:max_n]


def statements(line):
    """A line's sentences, a long one (over WORDS words) cut into its clauses."""
    out = []
    for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z\"'(\u201c])", line):
        out += _CLAUSE.split(sentence) if len(sentence.split()) > WORDS else [sentence]
    return out


def unusable(content):
    """Why an answer gave no description: a refusal, or no usable statement in it."""
    first = _BULLET.sub("", content.strip()).strip("\"'*` ")
    return ("the answer is a refusal" if _REFUSAL.match(first)
            else "no usable description in the answer (off-topic?)")


def llm_cache_path(run, url, model, prompt, name, max_tokens=0):
    """One file per (endpoint, model, prompt, class, and --llm-max-tokens when given): a new
    prompt or model asks again."""
    asked = [redact(url), model, prompt, name] + [max_tokens] * bool(max_tokens)
    h = hashlib.sha256(json.dumps(asked).encode()).hexdigest()[:24]
    return os.path.join(run, "cache", "llm", h + ".json")


def ask_llms(llms, names, args, key):
    """Ask every model about every class (cached). Returns {source: {name: [texts]}} and
    {source: {name: reason}} for the classes a model failed on."""
    answers = {src: {} for src, _, _ in llms}
    failures = {src: {} for src, _, _ in llms}
    streak = {src: 0 for src, _, _ in llms}  # consecutive failed classes of a model
    lock = threading.Lock()
    from tqdm import tqdm

    def job(src, url, model, name):
        prompt = args.llm_prompt.format(name=name, n=args.llm_n)
        path = llm_cache_path(args.run, url, model, prompt, name, args.llm_max_tokens)
        if os.path.exists(path):
            try:
                with open(path, encoding="utf-8") as f:
                    content = json.load(f)["content"]
                if isinstance(content, str):
                    texts = parse_descriptions(clean_text(content), 2 * args.llm_n)
                    return src, name, texts, None, True
            except (ValueError, KeyError, TypeError, OSError, RecursionError):
                pass  # a broken cache file is simply asked again
        if args.llm_give_up and streak[src] >= args.llm_give_up:
            why = f"skipped: the model failed {args.llm_give_up} classes in a row"
            return src, name, None, why, False
        t0 = time.monotonic()
        try:
            content = ask(url, model, prompt, key, args.llm_timeout, args.llm_retries,
                          args.llm_backoff, args.llm_max_tokens)
        except LLMError as e:
            with lock:
                streak[src] += 1
            return src, name, None, str(e), False
        # the server answered: an answer with no usable description says nothing about the
        # server, so only a server's failures count towards --llm-give-up
        with lock:
            streak[src] = 0
        content = drop_secret_lines(content, secrets(url, key))
        texts = parse_descriptions(content, 2 * args.llm_n)
        if not texts:
            return src, name, None, unusable(content), False
        # only usable answers are cached: a failed class is asked again by the next run
        # (the seconds it took are for bench/smollm2_stage2.py)
        common.atomic_write_text(json.dumps({"endpoint": redact(url), "model": model,
                                             "prompt": prompt, "class": name, "content": content,
                                             "seconds": round(time.monotonic() - t0, 2)},
                                            ensure_ascii=False, indent=1), path)
        return src, name, texts, None, False

    jobs = [(src, url, model, name) for name in names for src, url, model in llms]
    hits, gave_up = 0, set()
    stop = threading.Event()
    try:
        bar = tqdm(in_threads(job, jobs, args.llm_workers, stop), total=len(jobs),
                   desc="asking language models")
        for src, name, texts, error, cached in bar:
            hits += cached
            if error is None:
                answers[src][name] = texts
            else:
                failures[src][name] = error
                if not error.startswith("skipped"):
                    tqdm.write(f"  {src}: '{name}' failed: {error}")
                elif src not in gave_up:  # one line, not one per skipped class
                    gave_up.add(src)
                    tqdm.write(f"  {src}: failed {args.llm_give_up} classes in a row: its "
                               f"remaining classes are skipped")
    finally:  # on Ctrl-C, ask none of the questions still queued (the answers so far are cached)
        stop.set()
    print(f"language models: {len(jobs)} questions, {hits} answered from the cache in "
          f"{args.run}/cache/llm/")
    return answers, failures


def in_threads(fn, jobs, workers, stop):
    """fn(*job) for every job, `workers` at a time, yielded in the order of `jobs`. The threads
    are daemons and take no new job once `stop` is set: a Ctrl-C exits at once, without
    waiting for the requests in flight (up to minutes with timeouts and retries)."""
    results, done = [None] * len(jobs), [threading.Event() for _ in jobs]
    todo, lock = iter(range(len(jobs))), threading.Lock()

    def worker():
        while not stop.is_set():
            with lock:
                i = next(todo, None)
            if i is None:
                return
            try:
                results[i] = fn(*jobs[i])
            except BaseException as e:  # a bug in fn: raised in the caller's thread
                results[i] = e
            done[i].set()
    for _ in range(max(1, min(workers, len(jobs)))):
        threading.Thread(target=worker, daemon=True).start()
    for i in range(len(jobs)):
        done[i].wait()
        if isinstance(results[i], BaseException):
            raise results[i]
        yield results[i]


if __name__ == "__main__":
    common.run_main(main)
