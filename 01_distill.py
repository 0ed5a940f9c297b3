"""
Stage 1 of SynTrans: distil a CLIP teacher into a ResNet-12 student.

Paper component: "CLIP as a robust teacher, a few-shot vision encoder as a weak
student, distilling semantic-aligned visual knowledge via an unsupervised proxy
task" (Tang, He, Qin, IJCAI 2025; see ../shared/DESIGN.md, stage 1).

What it does
  The student is pretrained on the base classes as every off-the-shelf few-shot
  learner is: cross-entropy over the base classes (a linear head). On top, the
  unsupervised proxy task: a projection head p maps the student's feature of an
  augmented view of image x into the teacher's embedding space, and an InfoNCE loss
  over the batch asks p(f(x)) to pick out the teacher's embedding E_I(x) of the same
  image among the other images of the batch. That term uses no label; it makes the
  student's features carry what CLIP sees in an image (its attributes, its
  semantics), which generalises to unseen classes better than 64 base labels do.

      loss = CE(W f(x~), y) + lambda * InfoNCE(p(f(x~)), E_I(x); tau)

  --distill-weight 0 trains the CE-only student, the ablation baseline, into
  01_student_ce.pt of the same run folder.

Inputs   base-class training images (--dataset, --data-root), the teacher (--clip,
         --clip-pretrained); its embeddings of the training images are computed once
         and cached in <run>/cache/.
Outputs  <run>/01_student.pt (or 01_student_ce.pt): the best-on-validation student,
         its heads, config, class names, teacher identity and validation history;
         <run>/01_student.last.pt after every epoch, for --resume.

Our choices (not from the paper): a linear CE head; InfoNCE against the teacher's
embeddings of the *unaugmented* images (the teacher is the anchor, the student sees
augmented views); an MLP projection head; validation by 5-way 1-shot cosine nearest-centroid on a
fixed list of val episodes, best epoch kept.

Defaults run the toy world on a CPU in a couple of minutes. For the real
benchmarks on one GPU we recommend (see README):
  CIFAR-FS / FC100:  --widths 64,160,320,640 --epochs 90 --batch-size 128 --lr 0.05 --drop-rate 0.1
  mini / tiered:     the same at 84 px (the dataset sets the size), --epochs 90 (tiered: 60)
with --clip ViT-B-32 --clip-pretrained openai (or a local file).
"""
import argparse
import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import common


# ----------------------------------------------------------------------------------
# The method: the proxy task (InfoNCE against the teacher), the augmentation, validation

def augment(x):
    """Random crop after 1/8-size padding (4 px at 32 px), and horizontal flip, each drawn per
    image, on a uint8 batch [B, 3, H, W]; the output keeps the input's size."""
    b, c, h, w = x.shape
    pad = max(h // 8, 1)
    xp = F.pad(x, (pad, pad, pad, pad), mode="reflect" if x.is_floating_point() else "constant")
    # each image its own crop offset (i, j): gather rows i..i+h and columns j..j+w
    i, j = torch.randint(0, 2 * pad + 1, (2, b, 1), device=x.device)
    ar = lambda n: torch.arange(n, device=x.device)
    rows = (i + ar(h))[:, None, :, None]                              # [b, 1, h, 1]
    cols = (j + ar(w))[:, None, None, :]                              # [b, 1, 1, w]
    x = xp[ar(b)[:, None, None, None], ar(c)[None, :, None, None], rows, cols]
    flip = torch.rand(b, device=x.device) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)


def info_nce(student_emb, teacher_emb, tau):
    """The proxy task: each student view must find its own image's teacher embedding
    among the batch (one direction: the teacher is a fixed anchor)."""
    logits = F.normalize(student_emb, dim=-1) @ teacher_emb.t() / tau
    return F.cross_entropy(logits, torch.arange(len(logits), device=logits.device))


def validate(student, val, episodes, device):
    """5-way 1-shot cosine nearest-centroid accuracy (%) of the student's features on the
    fixed val episodes (index [E, 5, 16]): the model selection of this stage."""
    student.eval()
    feats = common.extract(student, val, lambda idx: common.to_student_input(val.student_batch(list(idx)), device), device)
    return common.protonet_accuracy(feats, episodes, k_shot=1).mean().item() * 100


# ----------------------------------------------------------------------------------
# The run: flags, then main() (data, teacher embeddings, training loop, checkpoints)

def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common.add_common_args(p)
    p.add_argument("--widths", default="16,32,64,128", help="ResNet-12 widths (standard: 64,160,320,640)")
    p.add_argument("--drop-rate", type=float, default=0.0, help="DropBlock rate of the last two blocks")
    p.add_argument("--epochs", type=int, default=30, help="training epochs")
    p.add_argument("--batch-size", type=int, default=128, help="images per step")
    p.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (cosine decay)")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="SGD weight decay")
    p.add_argument("--distill-weight", type=float, default=1.0, help="lambda of the proxy task; 0 = CE-only student")
    p.add_argument("--temperature", type=float, default=0.1, help="InfoNCE temperature tau of the proxy task")
    p.add_argument("--val-episodes", type=int, default=300, help="fixed 5-way 1-shot val episodes")
    p.add_argument("--val-every", type=int, default=2, help="validate every this many epochs (and at the end)")
    p.add_argument("--out", default=None, help=f"checkpoint name in the run folder "
                   f"(default {common.STUDENT}, or {common.STUDENT_CE} when --distill-weight is 0)")
    p.add_argument("--resume", action="store_true", help="continue from <out>.last.pt in the run folder")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers (file-based datasets)")
    return p.parse_args(argv)


# the valid values of the numeric flags, checked before any work (common.check_flags)
RANGES = {"drop_rate": "[0, 1)", "lr": "(0, inf)", "weight_decay": "[0, inf)", "distill_weight": "[0, inf)",
          "temperature": "(0, inf)", "val_episodes": "[1, inf)", "val_every": "[1, inf)", "workers": "[0, inf)"}


def main(argv=None):
    args = get_args(argv)
    out_name = args.out or (common.STUDENT_CE if args.distill_weight == 0 else common.STUDENT)
    out = os.path.join(args.run, out_name)
    common.check_flags(args, RANGES, out, "distill")
    last = out[:-len(".pt")] + ".last.pt"
    resumable = args.resume and os.path.exists(last)  # `last` holds an epoch of this run, not an older run's
    common.on_interrupt(lambda: f"the last completed epoch is kept in {last}: rerun the same command with --resume "
                        f"to continue" if resumable else "no epoch had finished, nothing to resume: rerun")
    device = common.get_device(args.device)
    common.set_seed(args.seed)
    widths = tuple(common.parse_list(args.widths, "--widths", int, "four channel counts", "16,32,64,128", n=4, low=1))
    if args.distill_weight > 0:  # a wrong or forgotten teacher is refused before any work
        common.check_teacher(args)

    # ---- data: base classes for training, val classes for model selection
    train = common.load_split(args.dataset, "train", args.data_root, args.image_size)
    val = common.load_split(args.dataset, "val", args.data_root, args.image_size)
    classes = common.class_names(args.dataset, args.data_root)
    common.check_episodes(val, 5, 1, 15)  # the fixed validation episodes, refused here rather than mid-run
    if args.epochs < 1 or not 0 < args.batch_size <= len(train):
        raise common.UserError(f"--epochs must be at least 1 and --batch-size 1 to {len(train)} (the training images)")
    _, val_episodes = common.sample_episodes(val.labels, 5, 1, 15, args.val_episodes, seed=args.seed)
    print(f"{args.dataset}: {len(train)} base images of {len(train.classes)} classes at {train.size}px; "
          f"{len(val.classes)} val classes; device {device}")

    # ---- teacher embeddings of the (unaugmented) training images, once, cached
    #      (the CE-only baseline needs no teacher at all)
    t_emb, teacher_id = None, None
    if args.distill_weight > 0:
        teacher, preprocess, _, teacher_id = common.load_teacher(args.clip, args.clip_pretrained, device)
        t_emb = common.teacher_image_features(args.run, teacher, preprocess, teacher_id, train, device)
        del teacher  # frozen and no longer needed: the proxy task only reads its embeddings

    # ---- the student f, the CE head W and the projection head p
    student = common.ResNet12(widths, drop_rate=args.drop_rate).to(device)
    ce_head = nn.Linear(student.out_dim, len(train.classes)).to(device)
    emb_dim = t_emb.shape[1] if t_emb is not None else student.out_dim
    proj = nn.Sequential(nn.Linear(student.out_dim, student.out_dim), nn.ReLU(),
                         nn.Linear(student.out_dim, emb_dim)).to(device)
    params = [*student.parameters(), *ce_head.parameters(), *proj.parameters()]
    opt = torch.optim.SGD(params, lr=args.lr, momentum=0.9, nesterov=True, weight_decay=args.weight_decay)
    steps_per_epoch = len(train) // args.batch_size
    steps = args.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0))))
    config = vars(args) | {"out": out_name, "widths": list(widths)}
    start_epoch, history, best = 0, [], (-1.0, None)

    if args.resume and os.path.exists(last):
        ck = common.load_checkpoint(last, "distill-last", "rerun without --resume")
        common.check_same_world(ck, last, args.dataset, classes, teacher_id)
        check_same_config(ck, last, config, ignore=("resume", "workers", "device", "run", "data_root"))
        student.load_state_dict(ck["state"]["student"])
        ce_head.load_state_dict(ck["state"]["ce_head"])
        proj.load_state_dict(ck["state"]["proj"])
        opt.load_state_dict(ck["state"]["opt"])
        sched.load_state_dict(ck["state"]["sched"])
        torch.set_rng_state(ck["state"]["rng"])
        if device.type == "cuda" and "cuda_rng" in ck["state"]:  # DropBlock draws on the GPU
            torch.cuda.set_rng_state(ck["state"]["cuda_rng"], device)
        start_epoch, history = ck["epoch"], ck["history"]
        best = (ck["best_acc"], ck["state"]["best"])
        print(f"resumed from {last} at epoch {start_epoch}")
    elif args.resume:
        print(f"no {last} to resume from: starting at epoch 1")

    from tqdm import tqdm
    t0, last_finite, seen = time.time(), None, 0
    for epoch in range(start_epoch, args.epochs):
        student.train(), ce_head.train(), proj.train()
        # Each epoch shuffles with a seed of its own, so a resumed run sees the same batches.
        loader = torch.utils.data.DataLoader(common.StudentImages(train), batch_size=args.batch_size, shuffle=True,
                                             drop_last=True, num_workers=args.workers,
                                             generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", leave=False)
        for b, (images, y, idx) in enumerate(bar):
            x = common.to_student_input(augment(images), device)
            y = y.to(device)
            feat = student(x)
            loss_ce = F.cross_entropy(ce_head(feat), y)
            loss = loss_ce
            if args.distill_weight > 0:
                loss_kd = info_nce(proj(feat), t_emb[idx].to(device), args.temperature)
                loss = loss + args.distill_weight * loss_kd
            last_finite = check_finite(loss, f"epoch {epoch + 1} step {b + 1}", last_finite,
                                              kept=last if epoch > 0 else None)  # epoch > 0: this run's file
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            seen += len(idx)
            bar.set_postfix(loss=f"{last_finite:.3f}")

        # ---- validation (5-way 1-shot cosine nearest-centroid on fixed val episodes); keep the best epoch
        if (epoch + 1) % args.val_every == 0 or epoch + 1 == args.epochs:
            acc = validate(student, val, val_episodes, device)
            history.append({"epoch": epoch + 1, "loss": last_finite, "val_1shot": acc})
            if acc > best[0]:  # the student and its heads, all from the best epoch
                best = (acc, {name: {k: v.detach().cpu().clone() for k, v in m.state_dict().items()}
                              for name, m in (("student", student), ("ce_head", ce_head), ("proj", proj))})
            print(f"epoch {epoch + 1}: loss {last_finite:.3f}  val 5-way 1-shot {acc:.2f}%  "
                  f"({seen / (time.time() - t0):.0f} img/s)")
        # the epoch checkpoint for --resume (atomic: a kill never leaves half a file)
        common.save_checkpoint(last, "distill-last", config, args.dataset, classes, teacher=teacher_id,
                               epoch=epoch + 1, history=history, best_acc=best[0],
                               state={"student": student.state_dict(), "ce_head": ce_head.state_dict(),
                                      "proj": proj.state_dict(), "opt": opt.state_dict(),
                                      "sched": sched.state_dict(), "rng": torch.get_rng_state(),
                                      **({"cuda_rng": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {}),
                                      "best": best[1]})
        resumable = True

    common.save_checkpoint(out, "distill", config, args.dataset, classes, teacher=teacher_id,
                           history=history, best_acc=best[0], seconds=time.time() - t0,
                           state=best[1])
    print(f"wrote {out} (best val 5-way 1-shot {best[0]:.2f}%, {time.time() - t0:.0f}s)")


# ----------------------------------------------------------------------------------
# Plumbing: checks of the training loop and of --resume

def check_finite(loss, where, last_finite, kept=None, fix="lower --lr"):
    """Returns loss.item(); a NaN or infinite loss stops the stage with one line saying where,
    the last finite loss and what is kept (`kept`: the last good checkpoint, if it exists)."""
    value = loss.item()
    if math.isfinite(value):
        return value
    before = "none yet" if last_finite is None else f"{last_finite:.6g}"
    kept = f"the last good epoch is kept in {kept}" if kept and os.path.exists(kept) else "no checkpoint was written"
    raise common.UserError(f"loss became {value} at {where} (last finite loss {before}): {fix}; {kept}")


def check_same_config(ckpt, path, config, ignore=()):
    """Refuse to resume from a checkpoint made with other flags (the result would be neither run)."""
    diff = [k for k in sorted(set(config) | set(ckpt["config"])) if k not in ignore
            and ckpt["config"].get(k) != config.get(k)]
    if diff:
        k = diff[0]
        more = f" (and {len(diff) - 1} more)" if len(diff) > 1 else ""
        raise common.UserError(f"{path} was made with --{k.replace('_', '-')} {ckpt['config'].get(k)}, "
                               f"not {config.get(k)}{more}: resume with the same flags, or start over without --resume")


if __name__ == "__main__":
    common.run_main(main)
