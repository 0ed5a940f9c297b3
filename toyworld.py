"""
The offline toy world: a stand-in for the real benchmarks and for real CLIP.

None of the real ingredients of SynTrans (miniImageNet, CIFAR-100, OpenAI's CLIP
weights, a language model) can be reached from an offline laptop or CI box. This
module builds a small world in which all five stages still have something to do
and a measurable effect, on a 2-core CPU in minutes:

* Images are rendered procedurally (pillow + numpy) from (class, index, seed), so
  nothing is downloaded or shipped. A class is a combination of three attributes
  (colour x pattern x shape, e.g. "red striped triangle"); placement, scale,
  rotation, background clutter, a distractor object, colour jitter and pixel noise
  keep one image from pinning its class down.
* Few-shot splits: 64 base / 16 val / 20 novel classes, like miniImageNet. Every
  val / novel class is an unseen combination of attribute values that each appear
  in base classes. The student is data-starved: few images per base class.
* A "web" set: many more images of *all* attribute combinations, with alt-text
  style captions, rendered from seeds disjoint from the few-shot images. A small
  open_clip model trained contrastively on it is our stand-in CLIP. It is saved as
  an ordinary checkpoint file and loaded through open_clip's local-file path, the
  same code that loads real CLIP weights.
* Class names use each attribute's *label word* ("red", "striped", "triangle"),
  which web captions never use: captions say "crimson", "with stripes",
  "three-sided shape" and vague words shared by similar values ("rosy",
  "textured", "pointy shape"). So the teacher has never read a class name, like a
  benchmark whose labels are jargon or codes the web does not use, and prompt
  templates of the bare name tell it almost nothing; descriptions in the words it
  knows are what carry a class into the semantic space (stage 2). (An earlier world
  used the label words in 0.5% of captions; the teacher learned them well enough
  that templates came within a point of mined descriptions and left SynMine
  nothing measurable to do.)
* A describer stands in for a language model: it writes short descriptions from a
  class's true attributes, in paraphrase, with a set fraction of wrong statements
  (hallucinations) for SynMine to remove. It also misreads some class names (a fifth
  by default, 02_mine.py --toy-misread-rate): it believes one attribute is another
  value and says so in every statement that names it, as a language model does with
  a rare name it mixes up. Agreement between statements cannot expose that; the
  support images can, which is the job of stage 4's per-class gate. The rate is a
  property of the simulated language model, a modelling choice that no accuracy
  picked; what stage 4 adds depends on it, so `bash experiments/misread_sweep.sh`
  reports it for rates 0, 0.1, 0.2 and 0.3 (docs/RESULTS.md: without misreading, stage 4 is
  level with a fixed mix of prototype and semantics).

Most of the pipeline sees this world through common.py only (the dataset name "toy",
the teacher name "toy-clip"). Two stages import it: 02_mine.py asks the describer
(--llm toy) and declares its --toy-* flags (DESCRIBER_FLAGS, describer_source), and
05_eval.py asks misread() which classes the describer got wrong. This module imports
neither a stage nor common.py.
"""
import colorsys
import logging
import math
import os

import numpy as np
import torch
from PIL import Image, ImageDraw

# ----------------------------------------------------------------------------------
# Attributes. The first word of each list is the label word used in class names; the
# next two are precise synonyms; the last is a vague word shared by a group of similar
# values ("rosy" is red or pink, "pointy shape" a star, triangle, arrow or diamond).
# Web captions and the describer use all of them, so language is coarser than vision
# here, as in the real world: a description rarely pins a class down as well as a few
# photos do, which is what leaves the few-shot support images something to add.

COLOURS = {  # name -> (hue in [0,1), words)
    "red": (0.00, ["red", "crimson", "scarlet", "rosy"]),
    "orange": (0.08, ["orange", "tangerine", "amber", "sunny-coloured"]),
    "yellow": (0.16, ["yellow", "golden", "lemon-coloured", "sunny-coloured"]),
    "green": (0.33, ["green", "emerald", "grass-coloured", "sea-green"]),
    "cyan": (0.50, ["cyan", "turquoise", "aqua", "sea-green"]),
    "blue": (0.62, ["blue", "navy", "cobalt", "bluish"]),
    "purple": (0.76, ["purple", "violet", "lilac", "bluish"]),
    "pink": (0.90, ["pink", "fuchsia", "magenta", "rosy"]),
}
PATTERNS = {
    "solid": ["solid", "plain", "uniformly filled", "plain-looking"],
    "striped": ["striped", "with stripes", "banded", "textured"],
    "dotted": ["dotted", "polka-dot", "spotted", "textured"],
    "checkered": ["checkered", "chequered", "like a chessboard", "textured"],
    "hollow": ["hollow", "outlined", "empty inside", "plain-looking"],
}
SHAPES = {
    "circle": ["circle", "round disc", "disk", "roundish shape"],
    "square": ["square", "four-sided box", "box shape", "boxy shape"],
    "triangle": ["triangle", "three-sided shape", "wedge", "pointy shape"],
    "star": ["star", "five-pointed star", "starburst", "pointy shape"],
    "cross": ["cross", "plus sign", "plus shape", "boxy shape"],
    "hexagon": ["hexagon", "six-sided shape", "honeycomb cell", "roundish shape"],
    "diamond": ["diamond", "rhombus", "lozenge", "pointy shape"],
    "arrow": ["arrow", "pointer", "arrowhead shape", "pointy shape"],
}
COLOUR_NAMES, PATTERN_NAMES, SHAPE_NAMES = list(COLOURS), list(PATTERNS), list(SHAPES)

RENDER = 64  # pixels; drawn at this size, then downsampled (anti-aliased) to SIZE
SIZE = 32    # the stored image size, like CIFAR


def class_name(attrs):
    c, p, s = attrs
    return f"{c} {p} {s}"


def make_classes(seed=0, n_base=64, n_val=16, n_novel=20):
    """Pick disjoint attribute combinations for base / val / novel classes.

    Every attribute value of a val or novel class also occurs in some base class,
    so the novel classes are unseen *combinations* of seen attributes."""
    combos = [(c, p, s) for c in COLOUR_NAMES for p in PATTERN_NAMES for s in SHAPE_NAMES]
    rng = np.random.default_rng(seed)
    for _ in range(1000):
        order = rng.permutation(len(combos))
        picked = [combos[i] for i in order[: n_base + n_val + n_novel]]
        base = picked[:n_base]
        seen = [set(a[k] for a in base) for k in range(3)]
        if all(len(seen[k]) == len((COLOUR_NAMES, PATTERN_NAMES, SHAPE_NAMES)[k]) for k in range(3)):
            return {"train": base, "val": picked[n_base:n_base + n_val], "test": picked[n_base + n_val:]}
    raise RuntimeError("could not split the toy classes so that base covers every attribute")


# ----------------------------------------------------------------------------------
# Rendering

def _polygon(shape):
    """Unit-radius outline of a shape as (k, 2) vertices."""
    def ring(k, r=1.0, phase=0.0):
        t = phase + 2 * np.pi * np.arange(k) / k
        return np.stack([r * np.cos(t), r * np.sin(t)], 1)
    if shape == "circle":
        return ring(28)
    if shape == "square":
        return ring(4, 1.0, np.pi / 4)
    if shape == "triangle":
        return ring(3, 1.0, -np.pi / 2)
    if shape == "hexagon":
        return ring(6)
    if shape == "diamond":
        return ring(4) * np.array([0.6, 1.0])
    if shape == "star":
        t = -np.pi / 2 + np.pi * np.arange(10) / 5
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
        return np.stack([r * np.cos(t), r * np.sin(t)], 1)
    if shape == "cross":
        a = 0.33
        return np.array([[-a, -1], [a, -1], [a, -a], [1, -a], [1, a], [a, a], [a, 1], [-a, 1],
                         [-a, a], [-1, a], [-1, -a], [-a, -a]], dtype=float)
    if shape == "arrow":
        return np.array([[-1, -0.3], [0.15, -0.3], [0.15, -0.8], [1, 0], [0.15, 0.8],
                         [0.15, 0.3], [-1, 0.3]], dtype=float)
    raise KeyError(shape)


_POLYS = {s: _polygon(s) for s in SHAPE_NAMES}
_YY, _XX = np.mgrid[0:RENDER, 0:RENDER].astype(np.float32)


def _hsv(h, s, v):
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32) * 255


def _mask(shape, cx, cy, radius, angle):
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    pts = _POLYS[shape] @ rot.T * radius + np.array([cx, cy])
    img = Image.new("L", (RENDER, RENDER), 0)
    ImageDraw.Draw(img).polygon([tuple(p) for p in pts], fill=255)
    return np.asarray(img, dtype=np.float32) / 255.0


def _texture(pattern, rng, mask):
    """1 where the object shows its colour, 0 where it shows the second colour."""
    if pattern == "solid":
        return np.ones_like(mask)
    th = rng.uniform(0, np.pi)
    u = _XX * math.cos(th) + _YY * math.sin(th)
    v = -_XX * math.sin(th) + _YY * math.cos(th)
    period = rng.uniform(7.0, 12.0)
    if pattern == "striped":
        return (np.sin(2 * np.pi * u / period + rng.uniform(0, 6.3)) > 0).astype(np.float32)
    if pattern == "checkered":
        a = np.floor(u / period + rng.uniform(0, 1)) + np.floor(v / period + rng.uniform(0, 1))
        return (a % 2).astype(np.float32)
    if pattern == "dotted":
        du = (u / period + rng.uniform(0, 1)) % 1.0 - 0.5
        dv = (v / period + rng.uniform(0, 1)) % 1.0 - 0.5
        return 1.0 - ((du ** 2 + dv ** 2) < 0.09).astype(np.float32)
    if pattern == "hollow":
        return np.ones_like(mask)  # handled in render(): the inside shows the background
    raise KeyError(pattern)


def render(attrs, rng):
    """One RENDER x RENDER x 3 uint8 image of the object `attrs` = (colour, pattern, shape)."""
    colour, pattern, shape = attrs
    # background: a random dull colour with a gradient, plus clutter strokes
    bg0 = _hsv(rng.uniform(), rng.uniform(0.0, 0.5), rng.uniform(0.25, 0.85))
    bg1 = _hsv(rng.uniform(), rng.uniform(0.0, 0.5), rng.uniform(0.25, 0.85))
    g = rng.uniform(-1, 1) * _XX / RENDER + rng.uniform(-1, 1) * _YY / RENDER
    g = (g - g.min()) / (np.ptp(g) + 1e-6)
    img = bg0 * (1 - g[..., None]) + bg1 * g[..., None]
    canvas = Image.fromarray(img.astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(rng.integers(2, 7)):
        xy = rng.uniform(0, RENDER, 4)
        col = tuple(int(c) for c in _hsv(rng.uniform(), rng.uniform(0.2, 1), rng.uniform(0.3, 1)))
        draw.line(list(xy), fill=col, width=int(rng.integers(1, 4)))
    img = np.asarray(canvas, dtype=np.float32)

    # one or two distractor objects (random shape, colour and pattern), smaller than the object
    for _ in range(rng.integers(1, 3)):
        m = _mask(SHAPE_NAMES[rng.integers(len(SHAPE_NAMES))], rng.uniform(8, RENDER - 8),
                  rng.uniform(8, RENDER - 8), rng.uniform(6, 11), rng.uniform(0, 2 * np.pi))
        t = _texture(PATTERN_NAMES[rng.integers(4)], rng, m)[..., None]
        col = _hsv(rng.uniform(), rng.uniform(0.4, 1), rng.uniform(0.4, 1))
        img = img * (1 - m[..., None]) + (col * t + (255 - col) * 0.3 * (1 - t)) * m[..., None]

    # the object: position, size and rotation vary; colour is jittered in hue, saturation and value
    radius = rng.uniform(12, 21)
    cx, cy = rng.uniform(radius * 0.7, RENDER - radius * 0.7, 2)
    angle = rng.uniform(0, 2 * np.pi)
    m = _mask(shape, cx, cy, radius, angle)
    hue = COLOURS[colour][0] + rng.normal(0, 0.05)
    main = _hsv(hue, rng.uniform(0.45, 1.0), rng.uniform(0.5, 1.0))
    second = main * rng.uniform(0.25, 0.6) + rng.uniform(0, 255 * 0.4, 3)  # a darker, greyer tone of it
    if pattern == "hollow":
        inner = _mask(shape, cx, cy, radius * rng.uniform(0.5, 0.65), angle)
        m = np.clip(m - inner, 0, 1)  # an outline: the inside shows the background
        fg = main[None, None, :] * np.ones_like(img)
    else:
        t = _texture(pattern, rng, m)[..., None]
        fg = main * t + second * (1 - t)
    img = img * (1 - m[..., None]) + fg * m[..., None]

    # a few clutter strokes in front of the object (partial occlusion)
    canvas = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(rng.integers(0, 3)):
        col = tuple(int(c) for c in _hsv(rng.uniform(), rng.uniform(0.2, 1), rng.uniform(0.3, 1)))
        draw.line(list(rng.uniform(0, RENDER, 4)), fill=col, width=int(rng.integers(1, 3)))
    img = np.asarray(canvas, dtype=np.float32)

    # global brightness jitter and pixel noise
    img = img * rng.uniform(0.7, 1.2) + rng.normal(0, 14, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------
# Few-shot splits and the web set

# Sizes of the two toy configurations. "toy" is the default world of the README's
# pipeline; "toy-tiny" is for tests (same classes, far fewer images).
SCALES = {
    "toy": dict(n_train=30, n_eval=60, n_web=40000, teacher_epochs=6),
    "toy-tiny": dict(n_train=20, n_eval=24, n_web=4000, teacher_epochs=8),
}
_STREAMS = {"train": 1, "val": 2, "test": 3, "web": 4}  # disjoint seed streams


def _render_chunk(args):
    attr_list, stream, seed = args
    out = np.empty((len(attr_list), SIZE, SIZE, 3), dtype=np.uint8)
    for i, (key, attrs) in enumerate(attr_list):
        img = render(attrs, np.random.default_rng([seed, _STREAMS[stream], *key]))
        out[i] = np.asarray(Image.fromarray(img).resize((SIZE, SIZE), Image.BOX))
    return out


def _render_many(attr_list, stream, seed):
    """Render a list of ((seed key), attrs); large sets use every core. Each image has
    its own seed, so the pixels do not depend on how the work is split."""
    n_proc = min(os.cpu_count() or 1, len(attr_list) // 2000)
    if n_proc < 2:
        return _render_chunk((attr_list, stream, seed))
    import multiprocessing
    chunks = [attr_list[i::n_proc] for i in range(n_proc)]
    with multiprocessing.get_context("fork").Pool(n_proc) as pool:
        parts = pool.map(_render_chunk, [(c, stream, seed) for c in chunks])
    out = np.empty((len(attr_list), SIZE, SIZE, 3), dtype=np.uint8)
    for i, part in enumerate(parts):
        out[i::n_proc] = part
    return out


def build_split(name, split, seed=0):
    """Render one few-shot split of the toy world `name` ("toy" or "toy-tiny").

    Returns (images uint8 [N, 3, 32, 32], labels [N], class names). Deterministic:
    the same (name, split, seed) gives the same pixels."""
    classes = make_classes(seed)[split]
    n = SCALES[name]["n_train" if split == "train" else "n_eval"]
    items = [((ci, i), attrs) for ci, attrs in enumerate(classes) for i in range(n)]
    # the class's global id (not its index in the split) keys its seeds
    all_ids = {a: k for k, a in enumerate(sum(make_classes(seed).values(), []))}
    items = [((all_ids[a], i), a) for (_, i), a in items]
    images = torch.from_numpy(_render_many(items, split, seed)).permute(0, 3, 1, 2).contiguous()
    labels = torch.arange(len(classes)).repeat_interleave(n)
    return images, labels, [class_name(a) for a in classes]


def split_recipe(name, split, seed=0):
    """A short hash of everything build_split(name, split, seed) depends on (the renderer,
    the classes, the sizes): the identity of a toy split's pixels without rendering them.
    It hashes the code's source and also what the split holds: its classes, each with the
    global id that seeds its images, and its images per class (SCALES). So a partition
    changed without a change of that source (a constant defined elsewhere, a wrapped or
    patched make_classes) is a new image store and new feature caches, never a stale one."""
    import hashlib
    import inspect
    parts = [inspect.getsource(f) for f in (_polygon, _mask, _texture, render, _render_chunk, _render_many,
                                             build_split, make_classes)]
    parts += [repr((COLOURS, PATTERNS, SHAPES, RENDER, SIZE, SCALES[name], _STREAMS, name, split, seed))]
    classes = make_classes(seed)
    ids = {a: k for k, a in enumerate(sum(classes.values(), []))}  # as build_split numbers them
    parts += [repr([(ids[a], a) for a in classes[split]])]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


# Held-out base images: more images of each base class, indices n_train ... of the same seed
# stream, so none is one of the student's images. Stage 4 meta-trains on them (episodes as
# hard as a novel class's); the student stays data-starved at n_train per class.
N_HELDOUT = {"toy": 60, "toy-tiny": 24}  # as many as a val or novel class has (n_eval)


def build_heldout(name, seed=0):
    """The held-out images of the base classes: (images uint8 [N, 3, 32, 32], labels [N],
    class names), image i of a class being its index n_train + i (build_split's are 0 ...)."""
    classes = make_classes(seed)["train"]
    n0, n = SCALES[name]["n_train"], N_HELDOUT[name]
    all_ids = {a: k for k, a in enumerate(sum(make_classes(seed).values(), []))}
    items = [((all_ids[a], n0 + i), a) for a in classes for i in range(n)]
    images = torch.from_numpy(_render_many(items, "train", seed)).permute(0, 3, 1, 2).contiguous()
    return images, torch.arange(len(classes)).repeat_interleave(n), [class_name(a) for a in classes]


def heldout_recipe(name, seed=0):
    """The identity of build_heldout(name, seed)'s pixels (as split_recipe is a split's)."""
    import hashlib
    import inspect
    parts = [split_recipe(name, "train", seed), inspect.getsource(build_heldout),
             repr(N_HELDOUT[name])]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def caption(attrs, rng):
    """Alt-text style caption: mentions a random subset of the attributes in synonyms
    and vague words, never in the label words that class names are made of."""
    c, p, s = attrs
    say = rng.uniform(size=3) < 0.75
    if not say.any():
        say[rng.integers(3)] = True

    def word(table, key):
        words = table[key] if table is not COLOURS else COLOURS[key][1]
        return words[rng.integers(1, len(words))]  # words[0] is the label word
    prefix = ["a photo of a", "a picture of a", "an image of a", "a", "there is a", "look at this"][rng.integers(6)]
    text = prefix
    if say[0]:
        text += " " + word(COLOURS, c)
    text += " " + (word(SHAPES, s) if say[2] else ["object", "thing", "shape"][rng.integers(3)])
    if say[1]:
        text += ", " + word(PATTERNS, p)
    return text


def build_web(name, seed=0):
    """The stand-in teacher's pretraining set: images of all attribute combinations
    (including the novel classes' combinations: real CLIP has seen house finches
    too) with captions, from a seed stream the few-shot splits never use."""
    n = SCALES[name]["n_web"]
    rng = np.random.default_rng([seed, _STREAMS["web"]])
    attrs = [(COLOUR_NAMES[rng.integers(8)], PATTERN_NAMES[rng.integers(5)], SHAPE_NAMES[rng.integers(8)])
             for _ in range(n)]
    images = _render_many([((i,), a) for i, a in enumerate(attrs)], "web", seed)
    caps = [caption(a, rng) for a in attrs]
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), caps


# ----------------------------------------------------------------------------------
# The describer: a stand-in for a language model (used by 02_mine.py --llm toy)
#
# A real LLM asked "what does a house finch look like?" answers in its own words,
# mostly right, sometimes wrong (a red belly it does not have), sometimes vague.
# The describer does the same for a toy class: each statement names one, two or
# all three of the class's attributes, mostly in the synonyms the web captions use
# (so the teacher understands them), and in a set fraction `wrong_rate` of them one
# named attribute is swapped for a wrong value (a hallucination). A few generic
# statements say nothing about the class at all. Unlike a real LLM it knows which
# of its statements are wrong; 02_mine.py records that, for measurement only.

# Sentence forms: the attributes a statement names (c colour, p pattern, s shape).
# Pattern synonyms read best after a comma ("a wedge, with stripes"), as in captions.
DESCRIBE_FORMS = [
    "it is {c}", "shaped like a {s}", "its surface is {p}",
    "a {c} {s}", "a {c} thing, {p}", "a {s}, {p}", "a {c} object shaped like a {s}",
    "a {c} {s}, {p}", "a photo of a {c} {s}, {p}", "it is a {s}, {c} and {p}",
    "a {p} {s} that is {c}",
]
DESCRIBE_GENERIC = [
    "a simple object in a picture", "an object on a cluttered background", "a small figure",
    "a common geometric thing", "you can see it in the image", "something drawn on a background",
]


def misread(name, seed=0, misread_rate=0.0):
    """Does the describer (seed) misread the toy class `name`? None, or (slot, value):
    it believes attribute `slot` ("c", "p" or "s") has this other value. Drawn from a
    stream of its own, so that describe() draws its statements as without it."""
    truth = dict(zip("cps", name.split()))
    tables = {"c": COLOURS, "p": PATTERNS, "s": SHAPES}
    rng = np.random.default_rng([seed, 1, *name.encode()])
    if rng.uniform() >= misread_rate:
        return None
    slot = "cps"[rng.integers(3)]
    others = [v for v in tables[slot] if v != truth[slot]]
    return slot, others[rng.integers(len(others))]


def describe(name, seed=0, n=12, wrong_rate=0.3, n_generic=2, label_rate=0.15, misread_rate=0.0):
    """About `n` short descriptions of the toy class `name` ("red striped triangle").

    Returns a list of (text, is_correct): is_correct is False for a statement that
    names a wrong attribute value; round(wrong_rate * (n - n_generic)) of the specific
    statements are. `n_generic` of the n say nothing specific (they are not wrong).
    With probability `misread_rate` the class is one the describer misreads: it
    believes one attribute has another value, and every statement that names that
    attribute says so (a consistent error, which agreement between statements cannot
    expose, as when an LLM mixes up a rare class name with a similar one).
    Deterministic given (name, seed): the same class and seed always get the same
    answer, like a cached LLM reply."""
    words = name.split()
    if (len(words) != 3 or words[0] not in COLOURS or words[1] not in PATTERNS
            or words[2] not in SHAPES):
        raise ValueError(f"'{name}' is not a toy-world class (colour pattern shape, "
                         f"e.g. 'red striped triangle')")
    truth = dict(zip("cps", words))
    tables = {"c": {k: v[1] for k, v in COLOURS.items()}, "p": PATTERNS, "s": SHAPES}
    rng = np.random.default_rng([seed, *name.encode()])

    def say(slot, value):  # mostly a synonym; the label word with probability label_rate
        syn = tables[slot][value]
        return syn[0] if rng.uniform() < label_rate else syn[rng.integers(1, len(syn))]

    # A set fraction of the specific statements is wrong (round(wrong_rate * k) of k),
    # so that every class gets its share of noise rather than some classes none.
    k = n - n_generic
    wrong = rng.permutation(k) < round(wrong_rate * k)
    belief = dict(truth)  # what the describer thinks the class looks like
    wrong_belief = misread(name, seed, misread_rate)
    if wrong_belief is not None:
        belief[wrong_belief[0]] = wrong_belief[1]
    out, seen = [], set()
    for _ in range(20 * n):  # bounded: a few duplicates are redrawn
        if len(out) >= k:
            break
        form = DESCRIBE_FORMS[rng.integers(len(DESCRIBE_FORMS))]
        slots = [s for s in "cps" if "{" + s + "}" in form]
        values = dict(belief)
        if wrong[len(out)]:  # a hallucination: one named attribute gets a wrong value
            slot = slots[rng.integers(len(slots))]
            others = [v for v in tables[slot] if v != belief[slot]]
            values[slot] = others[rng.integers(len(others))]
        correct = all(values[s] == truth[s] for s in slots)
        text = form.format(**{s: say(s, values[s]) for s in slots})
        if text not in seen:
            seen.add(text)
            out.append((text, correct))
    generic = rng.permutation(len(DESCRIBE_GENERIC))[:n_generic]
    out += [(DESCRIBE_GENERIC[i], True) for i in generic]
    return [out[i] for i in rng.permutation(len(out))]


# The describer's flags: 02_mine.py declares them with its own (common.flag; `within` is
# the valid interval, checked before any work), and describer_source() reads them.
DESCRIBER_FLAGS = {
    "--toy-wrong-rate": dict(type=float, default=0.3, within="[0, 1]",
                             help="toy describer: fraction of wrong statements"),
    "--toy-misread-rate": dict(type=float, default=0.2, within="[0, 1]",
                               help="toy describer: fraction of classes whose name it misreads "
                                    "(one attribute consistently wrong)"),
    "--toy-n": dict(type=int, default=12, within="[1, inf)",
                    help="toy describer: statements per class"),
}


def describer_source(spec, names, args):
    """The describer as a knowledge source of 02_mine.py: --llm `spec` ("toy", or "toy@SEED";
    without a seed, --seed's) asked about every class name with the flags above (args.toy_n,
    args.toy_wrong_rate, args.toy_misread_rate). Returns ({name: [(text, is_correct)]}, the
    source's record for the checkpoint and 02_descriptions.json). A malformed spec or a name
    that is no toy class is a ValueError whose message names the flag."""
    if spec != "toy" and not spec[4:].isdigit():
        raise ValueError(f"--llm {spec}: the toy describer takes a seed, e.g. toy@1")
    seed = int(spec[4:]) if spec != "toy" else args.seed
    try:
        table = {n: describe(n, seed, n=args.toy_n, wrong_rate=args.toy_wrong_rate,
                             misread_rate=args.toy_misread_rate) for n in names}
    except ValueError as e:
        raise ValueError(f"--llm {spec}: the toy describer only knows toy-world classes "
                         f"({e})") from None
    return table, {"name": f"toy@{seed}", "kind": "toy-describer", "seed": seed,
                   "wrong_rate": args.toy_wrong_rate, "misread_rate": args.toy_misread_rate,
                   "n": args.toy_n}


# ----------------------------------------------------------------------------------
# The stand-in CLIP: a small open_clip model trained contrastively on the web set

TEACHER_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "toy-clip.json")


def teacher_recipe(name):
    """A short hash of everything the stand-in teacher of world `name` depends on: the
    renderer, the attributes and captions, the web set, the training code, its sizes and
    the architecture config. The cached teacher file is named by it, so a changed recipe
    is never served a teacher trained on the old one (edits elsewhere keep the cache)."""
    import hashlib
    import inspect
    parts = [inspect.getsource(f) for f in (_polygon, _mask, _texture, render, _render_chunk, caption,
                                             build_web, train_teacher, _fit_teacher)]
    parts += [repr((COLOURS, PATTERNS, SHAPES, RENDER, SIZE, SCALES[name], _STREAMS))]
    with open(TEACHER_CONFIG, "rb") as f:
        parts.append(f.read().decode())
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:10]


def train_teacher(name, seed=0, batch_size=256, lr=3e-3, log=print):
    """Train the stand-in CLIP for the toy world `name` and return it (the caller saves its
    state dict: an ordinary open_clip checkpoint file). Architecture: data/toy-clip.json,
    built by open_clip's own classes (ModifiedResNet image tower, transformer text
    tower). Loss: the symmetric InfoNCE of CLIP.

    The caller's torch RNG is left as it was: a stage seeds it, then loads the teacher, then
    draws its student's weights and augmentations from it. Were training to move it, a
    user's first run (which trains the teacher) would give other figures than every later
    run (which finds it cached). (numpy's and Python's global RNGs are not used here.)"""
    with torch.random.fork_rng(devices=[]):  # on the CPU: no CUDA RNG to save
        return _fit_teacher(name, seed, batch_size, lr, log)


def _fit_teacher(name, seed, batch_size, lr, log):
    """train_teacher's training, seeded by `seed` alone."""
    import open_clip
    import torch.nn.functional as F
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    open_clip.add_model_config(TEACHER_CONFIG)
    torch.manual_seed(seed)
    logging.disable(logging.WARNING)  # open_clip's "No pretrained weights loaded": expected, we train it now
    try:
        model = open_clip.create_model("toy-clip")
    finally:
        logging.disable(logging.NOTSET)
    tokenizer = open_clip.get_tokenizer("toy-clip")
    images, caps = build_web(name, seed)
    tokens = tokenizer(caps)
    mean = torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1)
    epochs = SCALES[name]["teacher_epochs"]
    steps = epochs * (len(images) // batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    g = torch.Generator().manual_seed(seed)
    step = 0
    for epoch in range(epochs):
        order = torch.randperm(len(images), generator=g)
        for b in range(len(images) // batch_size):
            idx = order[b * batch_size:(b + 1) * batch_size]
            x = (images[idx].float() / 255 - mean) / std
            img_f, txt_f, scale = model(x, tokens[idx])
            logits = scale * img_f @ txt_f.t()
            target = torch.arange(len(idx))
            loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
        log(f"toy-clip epoch {epoch + 1}/{epochs}: loss {loss.item():.3f}")
    return model


# ----------------------------------------------------------------------------------
# python toyworld.py: render one toy episode to a PNG and measure the renderer's speed

if __name__ == "__main__":
    import argparse
    import time
    p = argparse.ArgumentParser(
        description="Render a 5-way 1-shot toy episode (support row + queries) to a PNG.")
    p.add_argument("--out", default="toy_episode.png", help="where to write the picture")
    p.add_argument("--seed", type=int, default=0, help="episode seed")
    p.add_argument("--benchmark", type=int, default=2000,
                   help="images to render for the speed figure (0: skip)")
    args = p.parse_args()
    images, labels, names = build_split("toy", "test", 0)
    rng = np.random.default_rng(args.seed)
    classes = rng.permutation(len(names))[:5]
    rows = [images[rng.permutation(torch.nonzero(labels == c).flatten().numpy())[:6]]
            for c in classes]
    grid = torch.cat([torch.cat(list(r), dim=2) for r in rows], dim=1)  # 5 rows of 6 images
    picture = Image.fromarray(grid.permute(1, 2, 0).numpy())
    picture.resize((grid.shape[2] * 3, grid.shape[1] * 3), Image.NEAREST).save(args.out)
    print(f"wrote {args.out}: one row per class (first image = the support shot, "
          f"the rest = queries):")
    for c in classes:
        print(f"  {names[c]}")
    if args.benchmark:
        items = [((i,), (COLOUR_NAMES[i % 8], PATTERN_NAMES[i % 5], SHAPE_NAMES[i % 7]))
                 for i in range(args.benchmark)]
        t = time.time()
        _render_chunk((items, "web", 1))
        one = args.benchmark / (time.time() - t)
        t = time.time()
        _render_many(items * 4, "web", 1)
        many = 4 * args.benchmark / (time.time() - t)
        print(f"renderer: {one:.0f} images/s on one core, "
              f"{many:.0f} images/s on {os.cpu_count()} cores")
