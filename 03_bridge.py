"""
Stage 3 of SynTrans: VSBird, the visual-semantic bridge (both directions).

Paper component: "a visual-semantic bridging module [that] enables bi-directional
knowledge transfer between visual and semantic spaces, transforming explicit
visual and implicit semantic knowledge into category-specific classifier weights"
(Tang, He, Qin, IJCAI 2025; ../shared/DESIGN.md, stage 3).

What it does
  Two small maps are trained on the base classes, with the student frozen (its
  features of the base images are extracted once and cached):
    h: semantic -> visual.  A class's semantic vector t_c (stage 2) becomes a visual
       classifier weight h(t_c) in the student's feature space. This is what lets a
       novel class be recognised from its description alone, and what stage 4 fuses
       with the few support images.
    g: visual -> semantic.  An image feature f(x) lands in the semantic space, where
       it can be compared with every t_c.
  Losses (each with its own weight flag):
    cls    h(t_c) as cosine-classifier weights classify the base features (CE): makes
           h produce *discriminative* weights, not just average-looking ones.
    centre h(t_c) stays near the class feature centre mu_c: anchors the weights to
           where the class's images really are (a prototype target).
    sem    g(f(x)) classified against {t_c} (CE): the visual -> semantic direction.
    cyc_s  g(h(t_c)) ~ t_c and
    cyc_v  h(g(mu_c)) ~ mu_c: cycle terms that tie the two directions together, so
           that neither map can drift into a space only it understands; this is the
           bi-directional transfer, and a regulariser for h on unseen classes.
  Validation on the val classes: 5-way zero-shot accuracy of h(t) as weights on
  student features, and 5-way 1-shot accuracy of a fixed mix of the support
  prototype and h(t) (the SemFew-style fusion); the best epoch (by the mix) is kept.

Inputs   <run>/01_student.pt, <run>/02_semantics.pt (or --semantics NAME)
  Cross-fitting (--folds, for stage 4): the base classes are split into folds, and a
  bridge of the same recipe is fit on all folds but one to give the held-out classes'
  h(t_c). These "out-of-fold" weights are as imperfect as a novel class's, which is
  what stage 4 must learn to weigh (the main bridge's own h(t_c) on base classes is
  nearly perfect: it was fit on them).

Outputs  <run>/03_bridge.pt (or --out NAME): h, g, the out-of-fold base-class weights
         (oof [C_base, d]), config, upstream identities.

The cycle terms are kept as the paper's bi-directional design, not for a gain we
have measured: no shipped command compares them (--w-cyc-s 0 --w-cyc-v 0 switches
them off, for a comparison of your own on --split val).

Our choices: 2-layer MLPs with dropout, cosine losses on L2-normalised vectors,
one learned temperature per cosine classifier, AdamW, the fixed mix
w = normalise(normalise(p) + mix * normalise(h(t))) with mix = 1 in validation.
"""
import argparse
import copy
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import common


# ----------------------------------------------------------------------------------
# The method: VSBird's two maps, its losses, the fixed fusion it is scored by, its training

def mlp(d_in, d_hidden, d_out, dropout):
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.LeakyReLU(0.1), nn.Dropout(dropout), nn.Linear(d_hidden, d_out))


class Bridge(nn.Module):
    """h: semantic (m) -> visual (d) and g: visual (d) -> semantic (m); both directions
    work on L2-normalised vectors and return L2-normalised vectors."""

    def __init__(self, sem_dim, vis_dim, hidden=512, dropout=0.3):
        super().__init__()
        self.h = mlp(sem_dim, hidden, vis_dim, dropout)
        self.g = mlp(vis_dim, hidden, sem_dim, dropout)
        self.scale_v = nn.Parameter(torch.tensor(10.0))  # temperatures of the two cosine classifiers
        self.scale_s = nn.Parameter(torch.tensor(10.0))

    @classmethod
    def from_checkpoint(cls, ckpt, device):
        """The bridge saved by this script (03_bridge.py), in eval mode on `device`."""
        bridge = cls(ckpt["dims"]["sem"], ckpt["dims"]["vis"], ckpt["config"]["hidden"], ckpt["config"]["dropout"])
        bridge.load_state_dict(ckpt["state"])
        return bridge.to(device).eval()

    def to_visual(self, t):
        return F.normalize(self.h(F.normalize(t, dim=-1)), dim=-1)

    def to_semantic(self, v):
        return F.normalize(self.g(F.normalize(v, dim=-1)), dim=-1)


def cos_loss(a, b):
    return (1 - F.cosine_similarity(a, b, dim=-1)).mean()


def fixed_mix(protos, sem_weights, mix):
    """The SemFew-style fusion: normalised prototype plus `mix` times the normalised
    semantic weight (no learning; stage 4 learns this adaptively)."""
    return F.normalize(F.normalize(protos, dim=-1) + mix * F.normalize(sem_weights, dim=-1), dim=-1)


@torch.no_grad()
def evaluate(bridge, feats, t, episodes_cls, episodes_idx, mix):
    """(zero-shot %, 1-shot fixed-mix %) on episodes of one split."""
    bridge.eval()
    w_sem = bridge.to_visual(t)[episodes_cls]                       # [E, N, d]
    support, query = common.split_episodes(feats, episodes_idx, 1)
    q = F.normalize(query, dim=-1)
    zero = common.accuracy_from_logits(torch.einsum("enqd,ecd->enqc", q, w_sem))
    mixed = common.accuracy_from_logits(torch.einsum("enqd,ecd->enqc", q, fixed_mix(support.mean(2), w_sem, mix)))
    return zero.mean().item() * 100, mixed.mean().item() * 100


def fit(args, f_train, y_train, t_train, centres, val_eps, device, desc):
    """Train one bridge on base features f_train (labels y_train index t_train and
    centres); keep the epoch with the best 1-shot fixed mix on val_eps = (features,
    semantics, episode classes, episode indices) of the val split.
    Returns (bridge with the best weights, history, (best mix %, its zero-shot %))."""
    from tqdm import tqdm
    bridge = Bridge(t_train.shape[1], f_train.shape[1], args.hidden, args.dropout).to(device)
    opt = torch.optim.AdamW(bridge.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    weights = {"cls": args.w_cls, "centre": args.w_centre, "sem": args.w_sem, "cyc_s": args.w_cyc_s, "cyc_v": args.w_cyc_v}
    best, history = ((-1.0, -1.0), None), []
    bar = tqdm(range(args.epochs), desc=desc)
    for epoch in bar:
        bridge.train()
        g = torch.Generator().manual_seed(args.seed * 1000 + epoch)
        for idx in torch.randperm(len(f_train), generator=g).split(args.batch_size):
            x, y = F.normalize(f_train[idx], dim=-1), y_train[idx]
            w = bridge.to_visual(t_train)                          # [C, d]: h(t_c) for every base class
            s = bridge.to_semantic(x)                              # [B, m]: g(f(x))
            terms = {
                "cls": F.cross_entropy(bridge.scale_v * x @ w.t(), y),
                "centre": cos_loss(w, centres),
                "sem": F.cross_entropy(bridge.scale_s * s @ F.normalize(t_train, dim=-1).t(), y),
                "cyc_s": cos_loss(bridge.to_semantic(w), t_train),
                "cyc_v": cos_loss(bridge.to_visual(bridge.to_semantic(centres)), centres),
            }
            loss = sum(weights[k] * v for k, v in terms.items())
            if not torch.isfinite(loss):
                raise common.UserError(f"bridge loss became {loss.item()} at epoch {epoch + 1} ({desc}); lower --lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        zero, mixed = evaluate(bridge, *val_eps, args.mix)
        history.append({"epoch": epoch + 1, "loss": loss.item(), "val_zero_shot": zero, "val_1shot_mix": mixed})
        if (mixed, zero) > best[0]:  # ties on the mix are broken by zero-shot accuracy
            best = ((mixed, zero), copy.deepcopy(bridge.state_dict()))
        bar.set_postfix(loss=f"{loss.item():.3f}", zero=f"{zero:.1f}", mix=f"{mixed:.1f}")
    bridge.load_state_dict(best[1])
    return bridge.eval(), history, best[0]


# ----------------------------------------------------------------------------------
# The run: flags, then main() (features, training, checkpoint)

def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common.add_common_args(p)
    p.add_argument("--student", default=common.STUDENT, help="stage-1 checkpoint in the run folder")
    p.add_argument("--semantics", default=common.SEMANTICS, help="stage-2 checkpoint in the run folder")
    p.add_argument("--out", default=common.BRIDGE, help="checkpoint name in the run folder")
    p.add_argument("--hidden", type=int, default=512, help="hidden width of h and g")
    p.add_argument("--dropout", type=float, default=0.3, help="dropout inside h and g")
    p.add_argument("--epochs", type=int, default=60, help="passes over the base features")
    p.add_argument("--batch-size", type=int, default=256, help="base features per step")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="AdamW weight decay")
    p.add_argument("--w-cls", type=float, default=1.0, help="weight of the cls term (h(t) classifies base features)")
    p.add_argument("--w-centre", type=float, default=1.0, help="weight of the centre term (h(t_c) ~ mu_c)")
    p.add_argument("--w-sem", type=float, default=1.0, help="weight of the sem term (g(f(x)) classified against t)")
    p.add_argument("--w-cyc-s", type=float, default=1.0, help="weight of the semantic cycle g(h(t)) ~ t")
    p.add_argument("--w-cyc-v", type=float, default=1.0, help="weight of the visual cycle h(g(mu)) ~ mu")
    p.add_argument("--mix", type=float, default=1.0, help="weight of h(t) in the fixed mix used for validation")
    p.add_argument("--val-episodes", type=int, default=300, help="fixed 5-way val episodes")
    p.add_argument("--folds", type=int, default=4,
                   help="cross-fitting: base-class weights h(t_c) from bridges fit on the other folds, for stage 4 "
                        "(1: none, stage 4 then uses the main bridge's)")
    return p.parse_args(argv)


# the valid values of the numeric flags, checked before any work (common.check_flags)
RANGES = {"hidden": "[1, inf)", "dropout": "[0, 1)", "batch_size": "[1, inf)", "lr": "(0, inf)",
          "weight_decay": "[0, inf)", "w_cls": "[0, inf)", "w_centre": "[0, inf)", "w_sem": "[0, inf)",
          "w_cyc_s": "[0, inf)", "w_cyc_v": "[0, inf)", "mix": "[0, inf)", "val_episodes": "[1, inf)"}


def main(argv=None):
    args = get_args(argv)
    common.check_flags(args, RANGES, os.path.join(args.run, args.out), "bridge")
    device = common.get_device(args.device)
    common.set_seed(args.seed)
    classes = common.class_names(args.dataset, args.data_root)

    # ---- upstream: the frozen student and the semantic vectors, refusing mismatches
    student_path = os.path.join(args.run, args.student)
    sem_path = os.path.join(args.run, args.semantics)
    st = common.load_checkpoint(student_path, "distill", f"run 01_distill.py --run {args.run} first")
    common.check_same_world(st, student_path, args.dataset, classes)
    sem = common.load_checkpoint(sem_path, "mine", f"run 02_mine.py --run {args.run} first")
    common.check_same_world(sem, sem_path, args.dataset, classes)
    common.check_same_teacher({student_path: st, sem_path: sem})
    student = common.load_student(st, device)

    train = common.load_split(args.dataset, "train", args.data_root, args.image_size)
    val = common.load_split(args.dataset, "val", args.data_root, args.image_size)
    common.check_episodes(val, 5, 1, 15)  # the fixed validation episodes; and a run that writes something:
    if args.epochs < 1:
        raise common.UserError("--epochs must be at least 1")
    if args.folds < 1 or (args.folds > 1 and len(train.classes) < 2 * args.folds):
        raise common.UserError(f"--folds must be 1 or more, with at least 2 base classes per fold "
                               f"({len(train.classes)} base classes)")
    f_train = common.student_features(args.run, student, st["id"], train, device)
    f_val = common.student_features(args.run, student, st["id"], val, device)
    y_train = train.labels
    t_train, t_val = sem["state"]["train"].float(), sem["state"]["val"].float()
    n_base = len(train.classes)
    # class centres of the normalised base features: the targets of the centre term
    centres = common.class_centres(f_train, y_train, n_base)
    val_cls, val_idx = common.sample_episodes(val.labels, 5, 1, 15, args.val_episodes, seed=args.seed)
    print(f"{args.dataset}: {len(f_train)} base features (d={f_train.shape[1]}), semantics m={t_train.shape[1]}")

    f_train, y_train, t_train, centres = f_train.to(device), y_train.to(device), t_train.to(device), centres.to(device)
    f_val, t_val = f_val.to(device), t_val.to(device)
    val_eps = (f_val, t_val, val_cls, val_idx)
    t0 = time.time()
    bridge, history, best = fit(args, f_train, y_train, t_train, centres, val_eps, device, "bridge")

    # ---- cross-fitting: out-of-fold semantic weights for the base classes (used by stage 4)
    # h(t_c) of a base class comes from a bridge that was fit on that very class, so it
    # is far better than h(t_c) of any novel class will be. Stage 4 learns *how much to
    # trust* the semantic weight from base-class episodes, so it needs base weights as
    # imperfect as novel ones: each fold's classes get h(t_c) from a bridge fit on the
    # other folds only (same recipe).
    oof = None
    if args.folds > 1:
        oof = torch.zeros(n_base, f_train.shape[1], device=device)
        folds = torch.randperm(n_base, generator=torch.Generator().manual_seed(args.seed)).chunk(args.folds)
        for i, held in enumerate(folds):
            keep = torch.ones(n_base, dtype=torch.bool)
            keep[held] = False
            relabel = torch.full((n_base,), -1, dtype=torch.long)  # base labels -> this fold's class indices
            relabel[keep] = torch.arange(int(keep.sum()))
            rows = keep.to(device)[y_train]
            fold_bridge, _, _ = fit(args, f_train[rows], relabel.to(device)[y_train[rows]], t_train[keep],
                                    centres[keep], val_eps, device, f"fold {i + 1}/{args.folds}")
            with torch.no_grad():
                oof[held] = fold_bridge.to_visual(t_train[held.to(device)])
        oof = oof.cpu()

    out = os.path.join(args.run, args.out)
    config = vars(args)
    common.save_checkpoint(out, "bridge", config, args.dataset, classes, state=bridge.state_dict(),
                           upstream={args.student: st["id"], args.semantics: sem["id"]},
                           dims={"sem": t_train.shape[1], "vis": f_train.shape[1]},
                           oof=oof, history=history, best_acc=best[0],
                           seconds=time.time() - t0)
    last = history[-1]
    print(f"wrote {out}: best val 1-shot fixed mix {best[0]:.2f}% (last epoch: zero-shot {last['val_zero_shot']:.2f}%, "
          f"mix {last['val_1shot_mix']:.2f}%), {time.time() - t0:.0f}s")


if __name__ == "__main__":
    common.run_main(main)
