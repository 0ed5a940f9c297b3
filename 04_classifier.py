"""
Stage 4 of SynTrans: the visual weight generator, the semantic weight reconstructor, their fusion.

Paper component: "a visual weight generator and a semantic weight reconstructor to adaptively
construct optimal multimodal FSL classifiers" (Tang, He, Qin, IJCAI 2025; docs/DESIGN.md,
stage 4).

What it does (meta-trained on held-out base images; student and bridge frozen), per class c of
an episode with support features S_c (K shots):
    visual weight generator      w_v = a * mean(S_c) + b * attention read-out over the base-class
                                 weights (Gidaris & Komodakis 2018): each shot borrows the
                                 weights of the base classes it looks like.
    semantic weight reconstructor  both directions of the bridge (stage 3): g reads the support
                                 into the semantic space, g(S) = mean g(f(x)), and h maps it
                                 back; a learned per-class mix beta = sigmoid(MLP([cos(g(S),
                                 t_c), log K])) gives w_s = (1 - beta) h(t_c) + beta h(g(S)).
                                 (--reconstructor: the mix made in the semantic space, h(t'_c),
                                 one-way without g, or none.)
    adaptive fusion              alpha = gate([cos(w_v, w_s), log K]) in (0, 1) per class;
                                 w = alpha * w_v + (1 - alpha) * w_s.
  Queries are scored by a cosine classifier with a learned temperature s:
      loss = CE(s * cos(q, w), y) + w_rec * (1 - cos(w_s, mu_c))
  Train as you test: the episodes are held-out base images (their support as unseen as a novel
  class's); an episode's own classes are hidden from the attention memory, so that base classes
  play the part of novel ones; the base classes' h(t_c), g and h are stage 3's cross-fitted
  fold bridges, which never saw the class. Why: docs/DESIGN.md, stage 4.

Inputs   <run>/01_student.pt, <run>/02_semantics.pt, <run>/03_bridge.pt
Outputs  <run>/04_classifier.pt (or --out NAME): the weights, config, upstream identities.

Our choices (docs/DESIGN.md, stage 4): base weights = centres of the student's own base images;
the shot count alternates between --shots values; AdamW; the best step by mean val accuracy
over 1-shot and 5-shot; --reconstructor on val classes (`bash experiments/stage4_val.sh`).
"""
import copy
import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

Bridge = common.stage_module("03_bridge").Bridge  # the bridge's own class: its weights load


# ----------------------------------------------------------------------------------
# The method: the visual weight generator, the semantic weight reconstructor and their gate

READINGS = ("semantic", "visual", "one-way", "none")  # --reconstructor


class FewShotClassifier(nn.Module):
    """reconstructor: how w_s is made (READINGS; the class's own default is the plain
    w_s = h(t_c), which needs no bridge at hand; 04_classifier.py --reconstructor picks the
    method's); semantics False: the visual weight generator alone (w = w_v)."""

    def __init__(self, base_weights, hidden=16, per_class_gate=True, reconstructor="none",
                 semantics=True):
        super().__init__()
        n_base, d = base_weights.shape
        # -- visual weight generator (attention over the base-class weights)
        self.register_buffer("base_w", F.normalize(base_weights, dim=-1))  # values: fixed
        self.base_keys = nn.Parameter(F.normalize(base_weights, dim=-1).clone())  # learned keys
        self.att_query = nn.Linear(d, d)
        nn.init.eye_(self.att_query.weight), nn.init.zeros_(self.att_query.bias)
        self.att_scale = nn.Parameter(torch.tensor(10.0))
        self.phi_avg = nn.Parameter(torch.ones(d))
        self.phi_att = nn.Parameter(torch.full((d,), 0.5))
        # -- semantic weight reconstructor. one-way: a residual refinement of h(t_c) from the
        # episode's w_v (g unused); semantic / visual: both directions of the bridge, a learned
        # per-class mix beta of t_c and g(S) (the support read into the semantic space), from
        # their agreement and the shot count, made in the semantic space and mapped back with
        # h, or made in the visual space between h(t_c) and h(g(S)).
        self.rec = common.mlp(2 * d + 1, hidden, d)  # its last layer zero: starts as w_s = h(t)
        nn.init.zeros_(self.rec[-1].weight), nn.init.zeros_(self.rec[-1].bias)
        self.rec_mix = common.mlp(2, 16, 1)  # its last layer zero: starts at beta = 0.5
        nn.init.zeros_(self.rec_mix[-1].weight), nn.init.zeros_(self.rec_mix[-1].bias)
        self.reconstructor, self.semantics = reconstructor, semantics
        # -- adaptive fusion gate and the classifier's temperature. The gate sees two
        # numbers per class, how well w_v and w_s agree and log K, never the weights
        # themselves: with the weights as input it can learn which *base classes* have
        # good semantics instead of when semantics are good, and it did.
        self.gate = common.mlp(2, 16, 1)
        self.per_class_gate = per_class_gate  # False: agreement zeroed, one mix per shot count
        self.scale = nn.Parameter(torch.tensor(10.0))

    def visual_weight(self, support, hide=None):
        """support [E, N, K, d] -> w_v [E, N, d]; `hide` [E, N]: base classes not to attend to."""
        s = F.normalize(support, dim=-1)
        keys = F.normalize(self.base_keys, dim=-1)
        att = self.att_scale * F.normalize(self.att_query(s), dim=-1) @ keys.t()
        if hide is not None:  # an episode's own (base) classes must not answer for themselves
            mask = torch.zeros(*hide.shape[:1], 1, 1, self.base_w.shape[0], dtype=torch.bool,
                               device=s.device)
            mask.scatter_(-1, hide.view(hide.shape[0], 1, 1, -1), True)
            att = att.masked_fill(mask, float("-inf"))
        read = (att.softmax(-1) @ self.base_w).mean(2)  # [E, N, d]
        return F.normalize(self.phi_avg * s.mean(2) + self.phi_att * read, dim=-1)

    def semantic_weight(self, hs, w_v, k, read):
        """w_s [E, N, d] and beta (the weight on the support's reading; None where unused)
        from hs = h(t_c), w_v, log K and `read` = {"t": t_c, "g": g(S), "h": h} ([E, N, m],
        [E, N, m], a map [E, N, m] -> [E, N, d]: the bridges that never saw the class)."""
        if self.reconstructor == "none":
            return hs, None
        if self.reconstructor == "one-way":
            return F.normalize(hs + self.rec(torch.cat([hs, w_v, k], -1)), dim=-1), None
        if read is None:
            raise ValueError(f"the {self.reconstructor} reconstructor reads the support with "
                             f"the bridge: pass read={{'t', 'g', 'h'}}")
        t, gs = F.normalize(read["t"], dim=-1), F.normalize(read["g"], dim=-1)
        beta = torch.sigmoid(self.rec_mix(torch.cat([(t * gs).sum(-1, keepdim=True), k], -1)))
        if self.reconstructor == "semantic":  # t'_c = a mix of t_c and g(S), then w_s = h(t'_c)
            return read["h"](F.normalize((1 - beta) * t + beta * gs, dim=-1)), beta.squeeze(-1)
        return F.normalize((1 - beta) * hs + beta * read["h"](gs), dim=-1), beta.squeeze(-1)

    def forward(self, support, sem_weight, hide=None, read=None):
        """support [E, N, K, d], sem_weight [E, N, d] = h(t_c), read: see semantic_weight
        -> (w, w_v, w_s, alpha)."""
        k = torch.full((*support.shape[:2], 1), math.log(support.shape[2]), device=support.device)
        w_v = self.visual_weight(support, hide)
        if not self.semantics:  # the visual-generator ablation: no semantic side at all
            return w_v, w_v, w_v, torch.ones(w_v.shape[:2], device=w_v.device)
        w_s, _ = self.semantic_weight(F.normalize(sem_weight, dim=-1), w_v, k, read)
        agree = (w_v * w_s).sum(-1, keepdim=True)
        if not self.per_class_gate:  # the shared gate: one mix per shot count for every class
            agree = torch.zeros_like(agree)
        alpha = torch.sigmoid(self.gate(torch.cat([agree, k], -1)))
        w = F.normalize(alpha * w_v + (1 - alpha) * w_s, dim=-1)
        return w, w_v, w_s, alpha.squeeze(-1)

    def logits(self, query, w):
        """query [E, N, Q, d], w [E, N, d] -> [E, N, Q, N]."""
        return self.scale * torch.einsum("enqd,ecd->enqc", F.normalize(query, dim=-1), w)


def support_reading(g_feats, idx, k):
    """g(S) [E, N, m]: the mean of the support's g(f(x)) (g_feats [n, m], per image), normalised."""
    return F.normalize(common.split_episodes(g_feats, idx, k)[0].mean(2), dim=-1)


def fold_maps(bridge_ck, device):
    """The fold bridges stage 3 cross-fitted (None where it saved none) and each base class's
    fold: a class's g and h are those of the bridge fit without it."""
    folds = bridge_ck.get("folds")
    if not folds:
        return None, None
    bridges = []
    for state in folds["states"]:
        b = Bridge(bridge_ck["dims"]["sem"], bridge_ck["dims"]["vis"],
                   bridge_ck["config"]["hidden"], bridge_ck["config"]["dropout"])
        b.load_state_dict(state)
        bridges.append(b.to(device).eval().requires_grad_(False))
    return bridges, folds["of"].to(device)


def fold_h(bridges, fold_of_cls):
    """h of each episode class's own fold bridge: [E, N, m] -> [E, N, d]."""
    def h(t):
        out = torch.stack([b.to_visual(t) for b in bridges])          # [F, E, N, d]
        return out.gather(0, fold_of_cls[None, ..., None].expand(1, *out.shape[1:]))[0]
    return h


def shuffled_order(n, seed, split):
    """--shuffle-semantics: class i of `split` reads the semantics of class order[i]
    (a fixed random permutation per seed and split; stage 5 scores with the same)."""
    g = torch.Generator().manual_seed(1000 * seed + common.SPLITS.index(split))
    return torch.randperm(n, generator=g)


# ----------------------------------------------------------------------------------
# The run: flags, then main() (upstream, episodic training, checkpoint)

def get_args():
    p = common.parser(__doc__)
    flag = common.flag
    flag(p, "--student", default=common.STUDENT, help="stage-1 checkpoint in the run folder")
    flag(p, "--semantics", default=common.SEMANTICS, help="stage-2 checkpoint in the run folder")
    flag(p, "--bridge", default=common.BRIDGE, help="stage-3 checkpoint in the run folder")
    flag(p, "--out", default=common.CLASSIFIER, help="checkpoint name in the run folder")
    flag(p, "--base-weights", default="centres", choices=["centres", "head"],
         help="attention memory: normalised base feature centres, or the stage-1 CE head")
    flag(p, "--shots", default="1,5", help="shot counts drawn during meta-training")
    flag(p, "--n-way", type=int, default=5, within="[1, inf)",
         help="classes per training episode")
    flag(p, "--n-query", type=int, default=15, within="[1, inf)",
         help="queries per class in training episodes")
    flag(p, "--steps", type=int, default=1500, within="[1, inf)", help="meta-training steps")
    flag(p, "--episodes-per-step", type=int, default=8, within="[1, inf)",
         help="episodes in one step's batch")
    flag(p, "--hidden", type=int, default=16, within="[1, inf)",
         help="hidden width of the reconstructor (small: a wide one memorises the base "
              "classes' centres)")
    flag(p, "--lr", type=float, default=1e-3, within="(0, inf)",
         help="AdamW learning rate (cosine decay)")
    flag(p, "--gate-lr", type=float, default=1e-2, within="(0, inf)",
         help="the gate's own learning rate (its input, an agreement in [-1, 1], moves little); "
              "chosen on val classes against 1e-3 and 1e-1 (see header)")
    flag(p, "--weight-decay", type=float, default=5e-4, within="[0, inf)",
         help="AdamW weight decay")
    flag(p, "--reconstructor", default="visual", choices=list(READINGS),
         help="the semantic weight reconstructor: visual (h(t_c) and h(g(S)) mixed per class), "
              "semantic (t_c and g(S) mixed per class, then h), one-way (h(t_c) refined from "
              "w_v, g unused: the syntrans-one-way row), none (w_s = h(t_c): the "
              "syntrans-no-reconstructor row); visual chosen on val classes (docs/RESULTS.md)")
    flag(p, "--visual-only", action="store_true",
         help="ablation: the visual weight generator alone, trained without semantics (w = w_v: "
              "the visual-generator row)")
    flag(p, "--w-rec", type=float, default=0.0, within="[0, inf)",
         help="weight of the reconstruction term 1 - cos(w_s, mu_c) (above 0 it memorises the "
              "base centres)")
    flag(p, "--finetune-bridge", action="store_true",
         help="let the bridge's h train too (default frozen)")
    flag(p, "--gate", default="per-class", choices=["per-class", "shared"],
         help="per-class: the gate sees each class's agreement cos(w_v, w_s) and log K; "
              "shared: it sees log K only, one learned mix for all classes (the "
              "syntrans-fixed-gate ablation)")
    flag(p, "--shuffle-semantics", action="store_true",
         help="ablation: train (and, in stage 5, score) with semantic vectors shuffled across "
              "classes, so that they carry no information (the syntrans-shuffled row)")
    flag(p, "--val-every", type=int, default=100, within="[1, inf)",
         help="validate every this many steps")
    flag(p, "--val-episodes", type=int, default=300, within="[1, inf)",
         help="fixed val episodes per shot count")
    return p


def main(argv=None):
    args, device = common.start(get_args(), argv, "classifier")
    classes = common.class_names(args.dataset, args.data_root)
    ck, student, bridge = load_upstream(args, classes, device)

    # ---- data: episodes of held-out base images to meta-train on (images the student never
    #      saw, as unseen as a novel class's), the student's own base images for the base-class
    #      weights, fixed val episodes per shot count
    heldout = ck["distill"]["config"].get("heldout", 0.0)
    train = common.base_split(args.dataset, "train", args.data_root, args.image_size, heldout)
    held = common.base_split(args.dataset, "heldout", args.data_root, args.image_size, heldout)
    val = common.load_split(args.dataset, "val", args.data_root, args.image_size)
    shots = common.check_episodes(held, args.n_way, args.shots, args.n_query,
                                  "--n-way, --shots or --n-query")
    val_eps = {k: common.val_episodes(val, k, args.val_episodes, args.seed + k, "--shots")
               for k in shots}
    feats = lambda split: common.student_features(  # noqa: E731
        args.run, student, ck["distill"]["id"], split, device).to(device)
    f_train, f_held, f_val = feats(train), feats(held), feats(val)
    t = {s: ck["mine"]["state"][s].float().to(device) for s in ("train", "val")}
    perm = {}
    if args.shuffle_semantics:  # semantics that carry no information about their class
        perm = {s: shuffled_order(len(v), args.seed, s).to(device) for s, v in t.items()}
        t = {s: v[perm[s]] for s, v in t.items()}
    n_base = len(train.classes)
    centres = common.class_centres(f_train, train.labels, n_base)
    base_w = (centres if args.base_weights == "centres"
              else ck["distill"]["state"]["ce_head"]["weight"].to(device))

    per_class = args.gate == "per-class"  # shared: the syntrans-fixed-gate ablation
    model = FewShotClassifier(base_w, args.hidden, per_class_gate=per_class,
                              reconstructor=args.reconstructor,
                              semantics=not args.visual_only).to(device)
    # The semantic weights of the base classes in meta-training: stage 3's cross-fitted
    # ("out-of-fold") h(t_c), each from a bridge that never saw that class, as imperfect as a
    # novel class's will be (the main bridge, fit on these very classes, would teach the gate
    # to trust semantics blindly). Validation and test use the main bridge. Without them
    # (03_bridge.py --folds 1) or with --finetune-bridge, the main bridge's h is used, with
    # its dropout on.
    oof = ck["bridge"].get("oof")
    live = args.finetune_bridge or oof is None
    if args.shuffle_semantics and not live:
        oof = oof[perm["train"].cpu()]
    base_sem = None if live else oof.float().to(device)
    # The reconstructor reads a base class's support with g and maps back with h of the fold
    # bridge that never saw the class (stage 3's cross-fitting), for the same reason; g(S) of
    # each held-out image is computed once (the bridges are frozen).
    folds, fold_of = (None, None) if live else fold_maps(ck["bridge"], device)
    with torch.no_grad():
        bridge.eval()
        g_val = bridge.to_semantic(f_val)
        if folds is None:
            g_held = bridge.to_semantic(f_held)
        else:
            g_held = torch.stack([b.to_semantic(f_held) for b in folds])  # [F, n, m]
            g_held = g_held[fold_of[held.labels.to(device)], torch.arange(len(f_held))]
            if args.shuffle_semantics:  # class i reads the semantics (and bridge) of perm[i]
                fold_of = fold_of[perm["train"]]
    bridge.train(live).requires_grad_(args.finetune_bridge)
    # the gate and the reconstructor's mix both read an agreement and log K: the gate's lr
    gate = list(model.gate.parameters()) + list(model.rec_mix.parameters())
    rest = [p for n, p in model.named_parameters()
            if p.requires_grad and not n.startswith(("gate.", "rec_mix."))]
    rest += list(bridge.h.parameters()) if args.finetune_bridge else []
    opt = torch.optim.AdamW([{"params": rest}, {"params": gate, "lr": args.gate_lr}],
                            lr=args.lr, weight_decay=args.weight_decay)
    sched = common.cosine_schedule(opt, args.steps)

    def score(feats, sem_weights, cls, idx, k, hide=None, read=None):
        support, query = common.split_episodes(feats, idx, k)
        w, w_v, w_s, alpha = model(support, sem_weights[cls], hide, read)
        return model.logits(query, w), w_s, alpha

    @torch.no_grad()
    def validate():
        model.eval(), bridge.eval()
        out = {}
        for k, (cls, idx) in val_eps.items():
            cls, idx = cls.to(device), idx.to(device)
            read = {"t": t["val"][cls], "g": support_reading(g_val, idx, k), "h": bridge.to_visual}
            logits, _, alpha = score(f_val, bridge.to_visual(t["val"]), cls, idx, k, read=read)
            out[k] = (common.accuracy_from_logits(logits).mean().item() * 100, alpha.mean().item())
        model.train(), bridge.train(live)
        return out

    # ---- meta-training: one batch of episodes per step, the shot count alternating
    from tqdm import tqdm
    t0, best, history, last_finite = time.time(), (-1.0, None), [], None
    log = common.Log(args.run, args.out)
    watch = common.LossWatch(log=log)  # the NaN check, without a host sync per step
    target = torch.arange(args.n_way, device=device).view(1, -1, 1).expand(
        args.episodes_per_step, -1, args.n_query)
    bar = tqdm(range(args.steps), desc="meta-train")
    for step in bar:
        k = shots[step % len(shots)]
        cls, idx = common.sample_episodes(held.labels, args.n_way, k, args.n_query,
                                          args.episodes_per_step, seed=args.seed * 100003 + step)
        cls, idx = cls.to(device), idx.to(device)
        sem = bridge.to_visual(t["train"]) if live else base_sem
        read = {"t": t["train"][cls], "g": support_reading(g_held, idx, k),
                "h": bridge.to_visual if folds is None else fold_h(folds, fold_of[cls])}
        logits, w_s, alpha = score(f_held, sem, cls, idx, k, hide=cls, read=read)
        loss_q = F.cross_entropy(logits.reshape(-1, args.n_way), target.reshape(-1))
        # the reconstruction term: the full-data weight of base classes is known
        loss_rec = (1 - F.cosine_similarity(w_s, centres[cls], dim=-1)).mean()
        loss = loss_q + args.w_rec * loss_rec
        watch.step(loss, f"step {step}", step=step + 1, lr=sched.get_last_lr()[0])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % args.val_every == 0 or step + 1 == args.steps:
            last_finite = watch.flush()
            v = validate()
            mean_acc = sum(a for a, _ in v.values()) / len(v)
            history.append({"step": step + 1, "loss": last_finite,
                            **{f"val_{k}shot": a for k, (a, _) in v.items()},
                            **{f"gate_{k}shot": g for k, (_, g) in v.items()}})
            log.write(**history[-1], lr=sched.get_last_lr()[0])
            if mean_acc > best[0]:
                best = (mean_acc, {"model": copy.deepcopy(model.state_dict()),
                                   "bridge": copy.deepcopy(bridge.state_dict())})
            bar.set_postfix(loss=f"{last_finite:.3f}",
                            **{f"val{k}": f"{a:.1f}" for k, (a, _) in v.items()})

    out = os.path.join(args.run, args.out)
    common.save_checkpoint(out, "classifier", vars(args), args.dataset, classes, state=best[1],
                           upstream={args.student: ck["distill"]["id"],
                                     args.semantics: ck["mine"]["id"],
                                     args.bridge: ck["bridge"]["id"]},
                           n_base=n_base, dim=f_train.shape[1], history=history,
                           best_acc=best[0], seconds=time.time() - t0)
    h = history[-1]
    print(f"wrote {out}: best mean val accuracy {best[0]:.2f}%; last: "
          + ", ".join(f"{k}-shot {h[f'val_{k}shot']:.2f}% (gate {h[f'gate_{k}shot']:.2f})"
                      for k in shots)
          + f"; {time.time() - t0:.0f}s")


# ----------------------------------------------------------------------------------
# Plumbing: the upstream checkpoints, loaded and checked against each other

def load_upstream(args, classes, device):
    """The checkpoints of stages 1-3 (the bridge must be built on exactly these student and
    semantics files), the frozen student and the bridge."""
    ck = common.load_upstream(args, {"distill": ("distill", args.student),
                                     "mine": ("mine", args.semantics),
                                     "bridge": ("bridge", args.bridge)}, classes,
                              built_on={"bridge": ["distill", "mine"]})
    student = common.load_student(ck["distill"], device)  # (student first: the same RNG draws)
    return ck, student, Bridge.from_checkpoint(ck["bridge"], device)


if __name__ == "__main__":
    common.run_main(main)
