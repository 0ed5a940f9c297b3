"""
Stage 3 of SynTrans: VSBird, the visual-semantic bridge (both directions).

Paper component: "a visual-semantic bridging module [that] enables bi-directional knowledge
transfer between visual and semantic spaces, transforming explicit visual and implicit semantic
knowledge into category-specific classifier weights" (Tang, He, Qin, IJCAI 2025;
docs/DESIGN.md, stage 3).

What it does
  Two small maps are trained on the base classes, on the frozen student's features (extracted
  once, cached):
    h: semantic -> visual. A class's semantic vector t_c (stage 2) becomes a classifier weight
       h(t_c) in the student's feature space: a novel class recognised from its description.
    g: visual -> semantic. An image feature f(x) lands in the semantic space, next to every t_c.
  Losses, each with its weight flag:
    cls    h(t_c) as cosine-classifier weights classify the base features (CE)
    centre h(t_c) ~ mu_c, the class's feature centre (a prototype target)
    sem    g(f(x)) classified against {t_c} (CE): the visual -> semantic direction
    cyc_s  g(h(t_c)) ~ t_c and  cyc_v  h(g(mu_c)) ~ mu_c: the cycle terms tying both directions
  The best epoch is kept by the 5-way 1-shot accuracy of the fixed mix (prototype + h(t)) on
  fixed val episodes; the zero-shot accuracy of h(t) alone breaks ties.
  Cross-fitting (--folds, for stage 4): each fold of base classes gets h(t_c) from a bridge of
  the same recipe fit on the other folds, weights as imperfect as a novel class's.

Inputs   <run>/01_student.pt, <run>/02_semantics.pt (or --semantics NAME)
Outputs  <run>/03_bridge.pt (or --out NAME): h, g, the out-of-fold base-class weights
         (oof [C_base, d]), the fold bridges (folds: each class's fold, their weights),
         config, history, upstream identities.

Our choices (not from the paper; reasons in docs/DESIGN.md, stage 3): 2-layer MLPs with
dropout, cosine losses on L2-normalised vectors, one learned temperature per cosine
classifier, AdamW, the fixed mix w = normalise(normalise(p) + mix * normalise(h(t))) with
mix = 1 in validation. The cycle terms are kept as the paper's design, not for a gain we have
measured (--w-cyc-s 0 --w-cyc-v 0 switches them off).
"""
import copy
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import common


# ----------------------------------------------------------------------------------
# The method: VSBird's two maps, its losses, the fixed fusion it is scored by, its training

class Bridge(nn.Module):
    """h: semantic (m) -> visual (d) and g: visual (d) -> semantic (m); both directions
    work on L2-normalised vectors and return L2-normalised vectors."""

    def __init__(self, sem_dim, vis_dim, hidden=512, dropout=0.3):
        super().__init__()
        self.h = common.mlp(sem_dim, hidden, vis_dim, dropout)
        self.g = common.mlp(vis_dim, hidden, sem_dim, dropout)
        # temperatures of the two cosine classifiers
        self.scale_v = nn.Parameter(torch.tensor(10.0))
        self.scale_s = nn.Parameter(torch.tensor(10.0))

    @classmethod
    def from_checkpoint(cls, ckpt, device):
        """The bridge saved by this script (03_bridge.py), in eval mode on `device`."""
        config = ckpt["config"]
        bridge = cls(ckpt["dims"]["sem"], ckpt["dims"]["vis"], config["hidden"], config["dropout"])
        common.load_weights(bridge, ckpt)  # one line if the file does not fit
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
    return F.normalize(F.normalize(protos, dim=-1) + mix * F.normalize(sem_weights, dim=-1),
                       dim=-1)


@torch.no_grad()
def evaluate(bridge, feats, t, episodes_cls, episodes_idx, mix):
    """(zero-shot %, 1-shot fixed-mix %) on episodes of one split."""
    bridge.eval()
    w_sem = bridge.to_visual(t)[episodes_cls]                       # [E, N, d]
    support, query = common.split_episodes(feats, episodes_idx, 1)
    q = F.normalize(query, dim=-1)
    w_mix = fixed_mix(support.mean(2), w_sem, mix)
    zero = common.accuracy_from_logits(torch.einsum("enqd,ecd->enqc", q, w_sem))
    mixed = common.accuracy_from_logits(torch.einsum("enqd,ecd->enqc", q, w_mix))
    return zero.mean().item() * 100, mixed.mean().item() * 100


def fit(args, f_train, y_train, t_train, centres, val_eps, device, desc, log=None):
    """Train one bridge on base features f_train (labels y_train index t_train and
    centres); keep the epoch with the best 1-shot fixed mix on val_eps = (features,
    semantics, episode classes, episode indices) of the val split; `log` (a common.Log)
    gets a record per epoch.
    Returns (bridge with the best weights, history, (best mix %, its zero-shot %))."""
    from tqdm import tqdm
    bridge = Bridge(t_train.shape[1], f_train.shape[1], args.hidden, args.dropout).to(device)
    opt = torch.optim.AdamW(bridge.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    weights = {"cls": args.w_cls, "centre": args.w_centre, "sem": args.w_sem,
               "cyc_s": args.w_cyc_s, "cyc_v": args.w_cyc_v}
    best, history, last_finite = ((-1.0, -1.0), None), [], None
    watch = common.LossWatch()  # the NaN check, without a host sync per step
    bar = tqdm(range(args.epochs), desc=desc)
    for epoch in bar:
        bridge.train()
        g = torch.Generator().manual_seed(args.seed * 1000 + epoch)
        for idx in torch.randperm(len(f_train), generator=g).split(args.batch_size):
            x, y = F.normalize(f_train[idx], dim=-1), y_train[idx]
            w = bridge.to_visual(t_train)                      # [C, d]: h(t_c) of every base class
            s = bridge.to_semantic(x)                          # [B, m]: g(f(x))
            terms = {
                "cls": F.cross_entropy(bridge.scale_v * x @ w.t(), y),
                "centre": cos_loss(w, centres),
                "sem": F.cross_entropy(bridge.scale_s * s @ F.normalize(t_train, dim=-1).t(), y),
                "cyc_s": cos_loss(bridge.to_semantic(w), t_train),
                "cyc_v": cos_loss(bridge.to_visual(bridge.to_semantic(centres)), centres),
            }
            loss = sum(weights[k] * v for k, v in terms.items())
            watch.step(loss, f"epoch {epoch + 1} ({desc})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        last_finite = watch.flush()
        zero, mixed = evaluate(bridge, *val_eps, args.mix)
        if log is not None:
            log.write(phase=desc, epoch=epoch + 1, loss=last_finite, val_zero_shot=zero,
                      val_1shot_mix=mixed, lr=args.lr, images=(epoch + 1) * len(f_train))
        history.append({"epoch": epoch + 1, "loss": last_finite, "val_zero_shot": zero,
                        "val_1shot_mix": mixed})
        if (mixed, zero) > best[0]:  # ties on the mix are broken by zero-shot accuracy
            best = ((mixed, zero), copy.deepcopy(bridge.state_dict()))
        bar.set_postfix(loss=f"{last_finite:.3f}", zero=f"{zero:.1f}", mix=f"{mixed:.1f}")
    bridge.load_state_dict(best[1])
    return bridge.eval(), history, best[0]


# ----------------------------------------------------------------------------------
# The run: flags, then main() (features, training, cross-fitting, checkpoint)

def get_args():
    p = common.parser(__doc__)
    flag = common.flag
    flag(p, "--student", default=common.STUDENT, help="stage-1 checkpoint in the run folder")
    flag(p, "--semantics", default=common.SEMANTICS, help="stage-2 checkpoint in the run folder")
    flag(p, "--out", default=common.BRIDGE, help="checkpoint name in the run folder")
    flag(p, "--hidden", type=int, default=512, within="[1, inf)", help="hidden width of h and g")
    flag(p, "--dropout", type=float, default=0.3, within="[0, 1)", help="dropout inside h and g")
    flag(p, "--epochs", type=int, default=60, within="[1, inf)",
         help="passes over the base features")
    flag(p, "--batch-size", type=int, default=256, within="[1, inf)",
         help="base features per step")
    flag(p, "--lr", type=float, default=1e-3, within="(0, inf)", help="AdamW learning rate")
    flag(p, "--weight-decay", type=float, default=5e-4, within="[0, inf)",
         help="AdamW weight decay")
    flag(p, "--w-cls", type=float, default=1.0, within="[0, inf)",
         help="weight of the cls term (h(t) classifies base features)")
    flag(p, "--w-centre", type=float, default=1.0, within="[0, inf)",
         help="weight of the centre term (h(t_c) ~ mu_c)")
    flag(p, "--w-sem", type=float, default=1.0, within="[0, inf)",
         help="weight of the sem term (g(f(x)) classified against t)")
    flag(p, "--w-cyc-s", type=float, default=1.0, within="[0, inf)",
         help="weight of the semantic cycle g(h(t)) ~ t")
    flag(p, "--w-cyc-v", type=float, default=1.0, within="[0, inf)",
         help="weight of the visual cycle h(g(mu)) ~ mu")
    flag(p, "--mix", type=float, default=1.0, within="[0, inf)",
         help="weight of h(t) in the fixed mix used for validation")
    flag(p, "--val-episodes", type=int, default=300, within="[1, inf)",
         help="fixed 5-way val episodes")
    flag(p, "--folds", type=int, default=4, within="[1, inf)",
         help="cross-fitting: base-class weights h(t_c) from bridges fit on the other folds, "
              "for stage 4 (1: none, stage 4 then uses the main bridge's)")
    return p


def main(argv=None):
    args, device = common.start(get_args(), argv, "bridge")
    classes = common.class_names(args.dataset, args.data_root)

    # ---- upstream: the frozen student and the semantic vectors, refusing mismatches
    up = common.load_upstream(args, {"student": ("distill", args.student),
                                     "semantics": ("mine", args.semantics)}, classes)
    st, sem = up["student"], up["semantics"]
    student = common.load_student(st, device)

    # ---- data: base-class features (training), val-class features and fixed episodes
    # the images the student was trained on (not its held-out ones: stage 4 meta-trains on them)
    train = common.base_split(args.dataset, "train", args.data_root, args.image_size,
                              st["config"].get("heldout", 0.0))
    val = common.load_split(args.dataset, "val", args.data_root, args.image_size)
    val_cls, val_idx = common.val_episodes(val, 1, args.val_episodes, args.seed)
    n_base = len(train.classes)
    if args.folds > 1 and n_base < 2 * args.folds:
        raise common.UserError(f"--folds must be 1 or more, with at least 2 base classes per fold "
                               f"({n_base} base classes)")
    f_train = common.student_features(args.run, student, st["id"], train, device)
    f_val = common.student_features(args.run, student, st["id"], val, device)
    y_train = train.labels
    t_train, t_val = sem["state"]["train"].float(), sem["state"]["val"].float()
    # class centres of the normalised base features: the targets of the centre term
    centres = common.class_centres(f_train, y_train, n_base)
    print(f"{args.dataset}: {len(f_train)} base features (d={f_train.shape[1]}), "
          f"semantics m={t_train.shape[1]}")

    f_train, y_train = f_train.to(device), y_train.to(device)
    t_train, centres = t_train.to(device), centres.to(device)
    val_eps = (f_val.to(device), t_val.to(device), val_cls, val_idx)
    t0 = time.time()
    log = common.Log(args.run, args.out)  # <run>/03_bridge_log.jsonl: an epoch a line
    bridge, history, best = fit(args, f_train, y_train, t_train, centres, val_eps, device,
                                "bridge", log)

    # ---- cross-fitting: out-of-fold semantic weights for the base classes (used by stage 4)
    # The main bridge was fit on the base classes, so its h(t_c) there is far better than any
    # novel class's will be. Stage 4 learns how much to trust the semantic weight from
    # base-class episodes, so each fold's classes get h(t_c) from a bridge fit on the others.
    oof, folds = None, None
    if args.folds > 1:
        oof = torch.zeros(n_base, f_train.shape[1], device=device)
        # the fold bridges themselves too: stage 4's reconstructor reads a base class's support
        # with g and maps back with h of the bridge that never saw the class
        folds = {"of": torch.zeros(n_base, dtype=torch.long), "states": []}
        order = torch.randperm(n_base, generator=torch.Generator().manual_seed(args.seed))
        for i, held in enumerate(order.chunk(args.folds)):
            keep = torch.ones(n_base, dtype=torch.bool)
            keep[held] = False
            relabel = torch.full((n_base,), -1, dtype=torch.long)  # base label -> this fold's
            relabel[keep] = torch.arange(int(keep.sum()))
            rows = keep.to(device)[y_train]
            fold_bridge, _, _ = fit(args, f_train[rows], relabel.to(device)[y_train[rows]],
                                    t_train[keep], centres[keep], val_eps, device,
                                    f"fold {i + 1}/{args.folds}", log)
            with torch.no_grad():
                oof[held] = fold_bridge.to_visual(t_train[held.to(device)])
            folds["of"][held] = i
            folds["states"].append({k: v.cpu() for k, v in fold_bridge.state_dict().items()})
        oof = oof.cpu()

    out = os.path.join(args.run, args.out)
    common.save_checkpoint(out, "bridge", vars(args), args.dataset, classes,
                           state=bridge.state_dict(),
                           upstream={args.student: st["id"], args.semantics: sem["id"]},
                           dims={"sem": t_train.shape[1], "vis": f_train.shape[1]},
                           oof=oof, folds=folds, history=history, best_acc=best[0],
                           seconds=time.time() - t0)
    last = history[-1]
    print(f"wrote {out}: best val 1-shot fixed mix {best[0]:.2f}% (last epoch: zero-shot "
          f"{last['val_zero_shot']:.2f}%, mix {last['val_1shot_mix']:.2f}%), "
          f"{time.time() - t0:.0f}s")


if __name__ == "__main__":
    common.run_main(main)
