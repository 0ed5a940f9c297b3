"""
Stage 4 of SynTrans: the visual weight generator, the semantic weight
reconstructor and their adaptive fusion into one few-shot classifier.

Paper component: "a visual weight generator and a semantic weight reconstructor
to adaptively construct optimal multimodal FSL classifiers" (Tang, He, Qin,
IJCAI 2025; ../shared/DESIGN.md, stage 4).

What it does (meta-trained on base-class episodes; student and bridge frozen)
  For each class c of an episode, with support features S_c (K shots):
    visual weight generator     w_v = a * mean(S_c) + b * attention read-out over the
                                base-class weights (Gidaris & Komodakis 2018): each shot
                                asks "which base classes do I look like?" and borrows
                                their weights. With one noisy shot this borrowed
                                knowledge is what helps most.
    semantic weight reconstructor  w_s = h(t_c) + R([h(t_c), w_v, K]): starts from the
                                bridge's semantic weight (stage 3) and refines it in the
                                visual space with the episode's support evidence; it can
                                also be trained to reconstruct the class's full-data
                                weight (--w-rec; for base classes the true centre is known).
                                R starts as the identity and, by default, stays so: it
                                trains only with --train-rec (chosen on val classes, below).
    adaptive fusion             alpha = gate([cos(w_v, w_s), log K]) in (0, 1) per class;
                                w = alpha * w_v + (1 - alpha) * w_s. With one shot the
                                gate should lean on semantics, with five more on vision.
  Queries are scored by a cosine classifier with a learned temperature:
      loss = CE(s * cos(q, w), y) + w_rec * (1 - cos(w_s, mu_c))
  What the per-class gate buys over a fixed mix is the classes whose semantics are
  wrong: a description can be consistently wrong (a language model that mixes up a
  rare class name with another thing), and then the support images disagree with
  h(t_c) and the gate moves that class's weight to the visual side.
  During meta-training the episode's own classes are hidden from the attention
  memory, so that base classes play the part of novel ones (as in Gidaris & Komodakis),
  and the base classes' h(t_c) are stage 3's cross-fitted ones (from bridges that
  never saw the class), so that semantics are as imperfect as a novel class's.

Inputs   <run>/01_student.pt, <run>/02_semantics.pt, <run>/03_bridge.pt
Outputs  <run>/04_classifier.pt (or --out NAME): generator, reconstructor, gate,
         temperature, config, upstream identities.

Why it is built this way (what we saw while developing it; no shipped command
measures these): meta-training on base classes teaches the gate whatever is true *of
the base classes*, and three things made it learn the wrong lesson or none:
  - h(t_c) from the bridge fit on those same classes is nearly perfect, so the gate
    put all weight on semantics; stage 3's cross-fitted h(t_c) fixed that.
  - a gate that sees the weights themselves can learn which base classes have good
    semantics; ours sees only their agreement and the shot count.
  - the reconstruction term (--w-rec) lets R memorise the 64 base centres from
    h(t_c), after which w_s beats any support mean on base classes and the gate
    collapses again.
  The defaults --gate-lr 1e-2, --train-rec off and --w-rec 0 were chosen on the val
  classes: `bash experiments/defaults.sh stage4` scores each alternative by the mean of
  1-shot and 5-shot val accuracy over training seeds 0-2, and none beats them (the
  figures: README, "Choices made on val classes").

Our choices: base-class weights = normalised base feature centres (or the stage-1
CE head with --base-weights head); the shot count alternates between the --shots
values from step to step, so one model serves 1-shot and 5-shot; AdamW; best
checkpoint by mean val accuracy over 1-shot and 5-shot episodes.
"""
import argparse
import copy
import importlib
import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

Bridge = importlib.import_module("03_bridge").Bridge  # the bridge's own class, so its weights load as trained


# ----------------------------------------------------------------------------------
# The method: the visual weight generator, the semantic weight reconstructor and their gate

def mlp(d_in, d_hidden, d_out):
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.LeakyReLU(0.1), nn.Linear(d_hidden, d_out))


class FewShotClassifier(nn.Module):
    def __init__(self, base_weights, hidden=16, per_class_gate=True):
        super().__init__()
        n_base, d = base_weights.shape
        # -- visual weight generator (attention over the base-class weights)
        self.register_buffer("base_w", F.normalize(base_weights, dim=-1))  # values: fixed base weights
        self.base_keys = nn.Parameter(F.normalize(base_weights, dim=-1).clone())  # learned keys
        self.att_query = nn.Linear(d, d)
        nn.init.eye_(self.att_query.weight), nn.init.zeros_(self.att_query.bias)
        self.att_scale = nn.Parameter(torch.tensor(10.0))
        self.phi_avg = nn.Parameter(torch.ones(d))
        self.phi_att = nn.Parameter(torch.full((d,), 0.5))
        # -- semantic weight reconstructor: a residual refinement of h(t_c)
        self.rec = mlp(2 * d + 1, hidden, d)
        nn.init.zeros_(self.rec[-1].weight), nn.init.zeros_(self.rec[-1].bias)  # starts as the identity: w_s = h(t)
        # -- adaptive fusion gate and the classifier's temperature. The gate sees two
        # numbers per class, how well w_v and w_s agree and log K, never the weights
        # themselves: with the weights as input it can learn which *base classes* have
        # good semantics instead of when semantics are good, and it did.
        self.gate = mlp(2, 16, 1)
        self.per_class_gate = per_class_gate  # False: the agreement input is zeroed (one mix per shot count)
        self.scale = nn.Parameter(torch.tensor(10.0))

    def visual_weight(self, support, hide=None):
        """support [E, N, K, d] -> w_v [E, N, d]; `hide` [E, N] base classes to hide from attention."""
        s = F.normalize(support, dim=-1)
        att = self.att_scale * F.normalize(self.att_query(s), dim=-1) @ F.normalize(self.base_keys, dim=-1).t()
        if hide is not None:  # an episode's own (base) classes must not answer for themselves
            mask = torch.zeros(*hide.shape[:1], 1, 1, self.base_w.shape[0], dtype=torch.bool, device=s.device)
            mask.scatter_(-1, hide.view(hide.shape[0], 1, 1, -1), True)
            att = att.masked_fill(mask, float("-inf"))
        read = (att.softmax(-1) @ self.base_w).mean(2)  # [E, N, d]
        return F.normalize(self.phi_avg * s.mean(2) + self.phi_att * read, dim=-1)

    def forward(self, support, sem_weight, hide=None):
        """support [E, N, K, d], sem_weight [E, N, d] = h(t_c) -> (w, w_v, w_s, alpha)."""
        k = torch.full((*support.shape[:2], 1), math.log(support.shape[2]), device=support.device)
        w_v = self.visual_weight(support, hide)
        hs = F.normalize(sem_weight, dim=-1)
        w_s = F.normalize(hs + self.rec(torch.cat([hs, w_v, k], -1)), dim=-1)
        agree = (w_v * w_s).sum(-1, keepdim=True)
        if not self.per_class_gate:  # the shared gate: one mix per shot count, the same for every class
            agree = torch.zeros_like(agree)
        alpha = torch.sigmoid(self.gate(torch.cat([agree, k], -1)))
        w = F.normalize(alpha * w_v + (1 - alpha) * w_s, dim=-1)
        return w, w_v, w_s, alpha.squeeze(-1)

    def logits(self, query, w):
        """query [E, N, Q, d], w [E, N, d] -> [E, N, Q, N]."""
        return self.scale * torch.einsum("enqd,ecd->enqc", F.normalize(query, dim=-1), w)


def shuffled_order(n, seed, split):
    """--shuffle-semantics: class i of `split` reads the semantics of class order[i]
    (a fixed random permutation per seed and split; stage 5 scores with the same)."""
    g = torch.Generator().manual_seed(1000 * seed + common.SPLITS.index(split))
    return torch.randperm(n, generator=g)


# ----------------------------------------------------------------------------------
# The run: flags, then main() (upstream, episodic training, checkpoint)

def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common.add_common_args(p)
    p.add_argument("--student", default=common.STUDENT, help="stage-1 checkpoint in the run folder")
    p.add_argument("--semantics", default=common.SEMANTICS, help="stage-2 checkpoint in the run folder")
    p.add_argument("--bridge", default=common.BRIDGE, help="stage-3 checkpoint in the run folder")
    p.add_argument("--out", default=common.CLASSIFIER, help="checkpoint name in the run folder")
    p.add_argument("--base-weights", default="centres", choices=["centres", "head"],
                   help="attention memory: normalised base feature centres, or the stage-1 CE head")
    p.add_argument("--shots", default="1,5", help="shot counts drawn during meta-training")
    p.add_argument("--n-way", type=int, default=5, help="classes per training episode")
    p.add_argument("--n-query", type=int, default=15, help="queries per class in training episodes")
    p.add_argument("--steps", type=int, default=1500, help="meta-training steps")
    p.add_argument("--episodes-per-step", type=int, default=8, help="episodes in one step's batch")
    p.add_argument("--hidden", type=int, default=16,
                   help="hidden width of the reconstructor (small: a wide one memorises the base classes' centres)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (cosine decay)")
    p.add_argument("--gate-lr", type=float, default=1e-2,
                   help="the gate's own learning rate (its input, an agreement in [-1, 1], moves little); chosen on "
                        "val classes against 1e-3 and 1e-1 (see header)")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="AdamW weight decay")
    p.add_argument("--train-rec", action="store_true",
                   help="train the reconstructor R too (default: R stays the identity, w_s = h(t_c); trained, it "
                        "lowered val accuracy, see header)")
    p.add_argument("--w-rec", type=float, default=0.0,
                   help="with --train-rec: weight of the reconstruction term (above 0 R memorises the base centres)")
    p.add_argument("--finetune-bridge", action="store_true", help="let the bridge's h train too (default frozen)")
    p.add_argument("--gate", default="per-class", choices=["per-class", "shared"],
                   help="per-class: the gate sees each class's agreement cos(w_v, w_s) and log K; shared: it sees "
                        "log K only, one learned mix for all classes (the syntrans-fixed-gate ablation)")
    p.add_argument("--shuffle-semantics", action="store_true",
                   help="ablation: train (and, in stage 5, score) with semantic vectors shuffled across classes, "
                        "so that they carry no information (the syntrans-shuffled row)")
    p.add_argument("--val-every", type=int, default=100, help="validate every this many steps")
    p.add_argument("--val-episodes", type=int, default=300, help="fixed val episodes per shot count")
    return p.parse_args(argv)


# the valid values of the numeric flags, checked before any work (common.check_flags)
RANGES = {"episodes_per_step": "[1, inf)", "hidden": "[1, inf)", "lr": "(0, inf)", "gate_lr": "(0, inf)",
          "weight_decay": "[0, inf)", "w_rec": "[0, inf)", "val_episodes": "[1, inf)"}


def main(argv=None):
    args = get_args(argv)
    common.check_flags(args, RANGES, os.path.join(args.run, args.out), "classifier")
    device = common.get_device(args.device)
    common.set_seed(args.seed)
    classes = common.class_names(args.dataset, args.data_root)
    ck, student, bridge = load_upstream(args, classes, device)

    train = common.load_split(args.dataset, "train", args.data_root, args.image_size)
    val = common.load_split(args.dataset, "val", args.data_root, args.image_size)
    common.check_episodes(train, args.n_way, args.shots, args.n_query, "--n-way, --shots or --n-query")
    common.check_episodes(val, 5, args.shots, 15, "--shots")  # the fixed validation episodes
    if args.steps < 1 or args.val_every < 1:
        raise common.UserError("--steps and --val-every must be at least 1")
    if args.w_rec and not args.train_rec:
        raise common.UserError("--w-rec trains the reconstructor: add --train-rec (or leave --w-rec at 0)")
    f_train = common.student_features(args.run, student, ck["distill"]["id"], train, device).to(device)
    f_val = common.student_features(args.run, student, ck["distill"]["id"], val, device).to(device)
    t = {s: ck["mine"]["state"][s].float().to(device) for s in ("train", "val")}
    perm = {}
    if args.shuffle_semantics:  # semantics that carry no information about their class
        perm = {s: shuffled_order(len(v), args.seed, s).to(device) for s, v in t.items()}
        t = {s: v[perm[s]] for s, v in t.items()}
    n_base = len(train.classes)
    centres = common.class_centres(f_train, train.labels, n_base)
    base_w = centres if args.base_weights == "centres" else ck["distill"]["state"]["ce_head"]["weight"].to(device)

    model = FewShotClassifier(base_w, args.hidden, per_class_gate=args.gate == "per-class").to(device)
    # The semantic weights of the base classes in meta-training. The main bridge was fit
    # on these very classes, so its h(t_c) is nearly perfect for them, and a gate trained
    # on that would trust semantics blindly (it did: README). Stage 3 therefore also
    # writes cross-fitted ("out-of-fold") weights: each base class's h(t_c) from a bridge
    # that never saw that class, as imperfect as a novel class's will be. Validation and
    # test use the main bridge, as they should. Without them (03_bridge.py --folds 1) or
    # with --finetune-bridge, the main bridge's h is used, with its dropout on.
    oof = ck["bridge"].get("oof")
    live = args.finetune_bridge or oof is None
    if args.shuffle_semantics and not live:
        oof = oof[perm["train"].cpu()]
    base_sem = None if live else oof.float().to(device)
    bridge.train(live).requires_grad_(args.finetune_bridge)
    model.rec.requires_grad_(args.train_rec)  # by default R stays the identity (header: chosen on val)
    gate = list(model.gate.parameters())
    rest = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("gate.")]
    rest += list(bridge.h.parameters()) if args.finetune_bridge else []
    opt = torch.optim.AdamW([{"params": rest}, {"params": gate, "lr": args.gate_lr}],
                            lr=args.lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s / args.steps, 1.0))))
    shots = [int(k) for k in args.shots.split(",")]
    val_eps = {k: common.sample_episodes(val.labels, 5, k, 15, args.val_episodes, seed=args.seed + k) for k in shots}

    def score(feats, sem_weights, cls, idx, k, hide=None):
        support, query = common.split_episodes(feats, idx, k)
        w, w_v, w_s, alpha = model(support, sem_weights[cls], hide)
        return model.logits(query, w), w_s, alpha

    @torch.no_grad()
    def validate():
        model.eval(), bridge.eval()
        out = {}
        for k, (cls, idx) in val_eps.items():
            logits, _, alpha = score(f_val, bridge.to_visual(t["val"]), cls.to(device), idx.to(device), k)
            out[k] = (common.accuracy_from_logits(logits).mean().item() * 100, alpha.mean().item())
        model.train(), bridge.train(live)
        return out

    from tqdm import tqdm
    t0, best, history = time.time(), (-1.0, None), []
    target = torch.arange(args.n_way, device=device).view(1, -1, 1).expand(args.episodes_per_step, -1, args.n_query)
    bar = tqdm(range(args.steps), desc="meta-train")
    for step in bar:
        k = shots[step % len(shots)]
        cls, idx = common.sample_episodes(train.labels, args.n_way, k, args.n_query, args.episodes_per_step,
                                          seed=args.seed * 100003 + step)
        cls, idx = cls.to(device), idx.to(device)
        logits, w_s, alpha = score(f_train, bridge.to_visual(t["train"]) if live else base_sem, cls, idx, k, hide=cls)
        loss_q = F.cross_entropy(logits.reshape(-1, args.n_way), target.reshape(-1))
        loss_rec = (1 - F.cosine_similarity(w_s, centres[cls], dim=-1)).mean()  # full-data weight of base classes
        loss = loss_q + args.w_rec * loss_rec
        if not torch.isfinite(loss):
            raise common.UserError(f"classifier loss became {loss.item()} at step {step}; lower --lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % args.val_every == 0 or step + 1 == args.steps:
            v = validate()
            mean_acc = sum(a for a, _ in v.values()) / len(v)
            history.append({"step": step + 1, "loss": loss.item(),
                            **{f"val_{k}shot": a for k, (a, _) in v.items()},
                            **{f"gate_{k}shot": g for k, (_, g) in v.items()}})
            if mean_acc > best[0]:
                best = (mean_acc, {"model": copy.deepcopy(model.state_dict()),
                                   "bridge": copy.deepcopy(bridge.state_dict())})
            bar.set_postfix(loss=f"{loss.item():.3f}", **{f"val{k}": f"{a:.1f}" for k, (a, _) in v.items()})

    out = os.path.join(args.run, args.out)
    config = vars(args)
    common.save_checkpoint(out, "classifier", config, args.dataset, classes, state=best[1],
                           upstream={args.student: ck["distill"]["id"], args.semantics: ck["mine"]["id"],
                                     args.bridge: ck["bridge"]["id"]},
                           n_base=n_base, dim=f_train.shape[1], history=history, best_acc=best[0],
                           seconds=time.time() - t0)
    h = history[-1]
    print(f"wrote {out}: best mean val accuracy {best[0]:.2f}%; last: " +
          ", ".join(f"{k}-shot {h[f'val_{k}shot']:.2f}% (gate {h[f'gate_{k}shot']:.2f})" for k in shots) +
          f"; {time.time() - t0:.0f}s")


# ----------------------------------------------------------------------------------
# Plumbing: the upstream checkpoints, loaded and checked against each other

def load_upstream(args, classes, device):
    """The frozen student, the semantic vectors and the bridge, checked against each other."""
    hint = {"distill": "run 01_distill.py", "mine": "run 02_mine.py", "bridge": "run 03_bridge.py"}
    paths = {"distill": args.student, "mine": args.semantics, "bridge": args.bridge}
    ck = {}
    for stage, name in paths.items():
        path = os.path.join(args.run, name)
        ck[stage] = common.load_checkpoint(path, stage, f"{hint[stage]} --run {args.run} first")
        common.check_same_world(ck[stage], path, args.dataset, classes)
    up = ck["bridge"]["upstream"]
    for stage in ("distill", "mine"):
        if up.get(paths[stage]) != ck[stage]["id"]:
            raise common.UserError(f"{args.bridge} was built on another {paths[stage]} than the one in {args.run}: "
                                   f"rerun 03_bridge.py --run {args.run}")
    return ck, common.load_student(ck["distill"], device), Bridge.from_checkpoint(ck["bridge"], device)


if __name__ == "__main__":
    common.run_main(main)
