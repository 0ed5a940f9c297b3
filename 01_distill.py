"""
Stage 1 of SynTrans: distil a CLIP teacher into a ResNet-12 student.

Paper component: "CLIP as a robust teacher, a few-shot vision encoder as a weak student,
distilling semantic-aligned visual knowledge via an unsupervised proxy task" (Tang, He, Qin,
IJCAI 2025; docs/DESIGN.md, stage 1).

What it does
  The student f is pretrained on the base classes as every few-shot learner is (cross-entropy,
  a linear head W). On top, the unsupervised proxy task: a projection head p maps f of an
  augmented view of image x into the teacher's embedding space, and InfoNCE over the batch asks
  p(f(x~)) to find the teacher's embedding E_I(x) of the same image. That term uses no label: it
  makes the student's features carry what CLIP sees in an image, which generalises to unseen
  classes better than the base labels do.

      loss = CE(W f(x~), y) + lambda * InfoNCE(p(f(x~)), E_I(x); tau)

  --distill-weight 0 trains the CE-only student, the ablation baseline (01_student_ce.pt).

Inputs   base-class training images (--dataset, --data-root), the teacher (--clip,
         --clip-pretrained); its embeddings of the training images are cached in <run>/cache/.
Outputs  <run>/01_student.pt (or 01_student_ce.pt): the best-on-validation student, its heads,
         config, class names, teacher identity and history; <run>/01_student.last.pt after
         every epoch, for --resume.

Our choices (not from the paper; reasons in docs/DESIGN.md): a linear CE head; InfoNCE against
the teacher's embeddings of the unaugmented images; an MLP projection head; the best epoch by
5-way 1-shot cosine nearest-centroid accuracy on fixed val episodes. Defaults run the toy world
on a CPU; real-benchmark settings for one GPU: run.sh's presets and docs/REAL_DATA.md.
"""
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
    batch = lambda idx: common.to_student_input(val.student_batch(list(idx)), device)  # noqa: E731
    feats = common.extract(student, val, batch, device)
    return common.protonet_accuracy(feats, episodes, k_shot=1).mean().item() * 100


# ----------------------------------------------------------------------------------
# The run: flags, then main() (data, teacher embeddings, training loop, checkpoints)

def get_args():
    p = common.parser(__doc__)
    flag = common.flag
    flag(p, "--widths", default="16,32,64,128", help="ResNet-12 widths (standard: 64,160,320,640)")
    flag(p, "--drop-rate", type=float, default=0.0, within="[0, 1)",
         help="DropBlock rate of the last two blocks (dropout of the first two)")
    flag(p, "--block-size", type=int, default=None, within="[1, inf)",
         help="DropBlock block size (default MetaOptNet's: 5 at 84 px, 2 at 32 px)")
    flag(p, "--drop-warmup", type=float, default=2 / 3, within="[0, 1]",
         help="the DropBlock rate grows linearly from 0 over this fraction of the steps")
    flag(p, "--epochs", type=int, default=30, within="[1, inf)", help="training epochs")
    flag(p, "--batch-size", type=int, default=128, within="[1, inf)", help="images per step")
    flag(p, "--lr", type=float, default=0.05, within="(0, inf)",
         help="SGD learning rate (cosine decay)")
    flag(p, "--weight-decay", type=float, default=5e-4, within="[0, inf)", help="SGD weight decay")
    flag(p, "--distill-weight", type=float, default=1.0, within="[0, inf)",
         help="lambda of the proxy task; 0 = CE-only student")
    flag(p, "--temperature", type=float, default=0.1, within="(0, inf)",
         help="InfoNCE temperature tau of the proxy task")
    flag(p, "--val-episodes", type=int, default=300, within="[1, inf)",
         help="fixed 5-way 1-shot val episodes")
    flag(p, "--val-every", type=int, default=2, within="[1, inf)",
         help="validate every this many epochs (and at the end)")
    flag(p, "--out", default=None, help=f"checkpoint name in the run folder (default "
         f"{common.STUDENT}, or {common.STUDENT_CE} when --distill-weight is 0)")
    flag(p, "--heldout", type=float, default=0.2, within="[0, 1)",
         help="real data: the fraction of each base class's images held out from training "
              "(the last ones, by index), for stage 4's episodes; the toy world renders its "
              "held-out images instead. 0.2 is a start, not chosen on val")
    flag(p, "--resume", action="store_true", help="continue from <out>.last.pt in the run folder")
    flag(p, "--workers", type=int, default=0, within="[0, inf)",
         help="DataLoader workers (file-based datasets)")
    common.amp_flag(p)
    return p


def main(argv=None):
    args, device = common.start(get_args(), argv, "distill", out=default_out)
    out = os.path.join(args.run, args.out)
    resume = common.Resume(out, args.resume, "distill-last", device)
    widths = common.parse_list(args.widths, "--widths", int, "four channel counts", "16,32,64,128",
                               n=4, low=1)
    if args.distill_weight > 0:  # a wrong or forgotten teacher is refused before any work
        common.check_teacher(args)

    # ---- data: base classes for training, val classes for model selection
    # (the held-out base images are never seen here: stage 4 meta-trains on them)
    train = common.base_split(args.dataset, "train", args.data_root, args.image_size,
                              args.heldout)
    val = common.load_split(args.dataset, "val", args.data_root, args.image_size)
    classes = common.class_names(args.dataset, args.data_root)
    args.block_size = args.block_size or common.dropblock_size(train.size)
    _, val_episodes = common.val_episodes(val, 1, args.val_episodes, args.seed)
    if args.batch_size > len(train):
        raise common.UserError(f"--batch-size {args.batch_size} is more than the {len(train)} "
                               f"training images: use --batch-size 1 to {len(train)}")
    print(f"{args.dataset}: {len(train)} base images of {len(train.classes)} classes at "
          f"{train.size}px; {len(val.classes)} val classes; device {device}")

    # ---- teacher embeddings of the (unaugmented) training images, once, cached
    #      (the CE-only baseline needs no teacher at all)
    t_emb, teacher_id = None, None
    if args.distill_weight > 0:
        teacher, preprocess, _, teacher_id = common.load_teacher(args.clip, args.clip_pretrained,
                                                                 device)
        t_emb = common.teacher_image_features(args.run, teacher, preprocess, teacher_id, train,
                                              device)
        del teacher  # frozen and no longer needed: the proxy task only reads its embeddings
        t_emb = t_emb.to(device)  # once: a copy per step would wait for the GPU

    # ---- the student f, the CE head W and the projection head p
    student = common.ResNet12(tuple(widths), args.drop_rate, args.block_size).to(device)
    ce_head = nn.Linear(student.out_dim, len(train.classes)).to(device)
    emb_dim = t_emb.shape[1] if t_emb is not None else student.out_dim
    proj = nn.Sequential(nn.Linear(student.out_dim, student.out_dim), nn.ReLU(),
                         nn.Linear(student.out_dim, emb_dim)).to(device)
    params = [*student.parameters(), *ce_head.parameters(), *proj.parameters()]
    opt = torch.optim.SGD(params, lr=args.lr, momentum=0.9, nesterov=True,
                          weight_decay=args.weight_decay)
    sched = common.cosine_schedule(opt, args.epochs * (len(train) // args.batch_size))
    parts = {"student": student, "ce_head": ce_head, "proj": proj, "opt": opt, "sched": sched}
    config = vars(args) | {"widths": widths, "data_id": {s.split: s.data_id for s in (train, val)}}
    start_epoch, history, best = resume.load(
        parts, config, args.dataset, classes, teacher_id,
        ignore=("resume", "workers", "device", "run", "data_root"))  # may differ when resuming

    from tqdm import tqdm
    t0, last_finite, seen = time.time(), None, 0
    log = common.Log(args.run, args.out, append=start_epoch > 0)
    watch = common.LossWatch(kept=resume.kept, log=log)  # the NaN check, every 50 steps
    steps = len(train) // args.batch_size
    # Each epoch shuffles with a seed of its own, so a resumed run sees the same batches.
    data = common.EpochLoader(common.StudentImages(train), args.batch_size, args.workers, device,
                              lambda epoch: args.seed * 1000 + epoch)
    for epoch in range(start_epoch, args.epochs):
        student.train(), ce_head.train(), proj.train()
        bar = tqdm(data.epoch(epoch), desc=f"epoch {epoch + 1}/{args.epochs}", leave=False)
        for b, (images, y, idx) in enumerate(bar):
            common.warm_up_dropblock(student, args.drop_rate, epoch * steps + b,
                                     args.drop_warmup * args.epochs * steps)
            # augmentation on the device, after the copy (uint8: a quarter of float's bytes)
            x = common.to_student_input(augment(images.to(device, non_blocking=True)), device)
            y = y.to(device, non_blocking=True)
            with common.autocast(device, args.amp):  # bf16 on a GPU (--amp); off on a CPU
                feat = student(x)
                loss = F.cross_entropy(ce_head(feat), y)
                if args.distill_weight > 0:
                    loss_kd = info_nce(proj(feat), t_emb[idx.to(device, non_blocking=True)],
                                       args.temperature)
                    loss = loss + args.distill_weight * loss_kd
            watch.step(loss, f"epoch {epoch + 1} step {b + 1}", bar, epoch=epoch + 1,
                       step=epoch * steps + b + 1, lr=sched.get_last_lr()[0],
                       images=seen + len(idx))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            seen += len(idx)
        last_finite = watch.flush(bar)  # the epoch's last losses, checked

        # ---- validation on the fixed val episodes; keep the best epoch
        if (epoch + 1) % args.val_every == 0 or epoch + 1 == args.epochs:
            with common.autocast(device, args.amp):
                acc = validate(student, val, val_episodes, device)
            log.write(epoch=epoch + 1, step=(epoch + 1) * steps, loss=last_finite, val_1shot=acc,
                      images=seen)
            history.append({"epoch": epoch + 1, "loss": last_finite, "val_1shot": acc})
            if acc > best[0]:  # the student and its heads, all from the best epoch
                best = (acc, {name: {k: v.detach().cpu().clone() for k, v in m.state_dict().items()}
                              for name, m in (("student", student), ("ce_head", ce_head),
                                              ("proj", proj))})
            print(f"epoch {epoch + 1}: loss {last_finite:.3f}  val 5-way 1-shot {acc:.2f}%  "
                  f"({seen / (time.time() - t0):.0f} img/s)")
        resume.save(parts, config, args.dataset, classes, teacher_id, epoch + 1, history, best)

    common.save_checkpoint(out, "distill", config, args.dataset, classes, teacher=teacher_id,
                           history=history, best_acc=best[0], seconds=time.time() - t0,
                           state=best[1])
    print(f"wrote {out} (best val 5-way 1-shot {best[0]:.2f}%, {time.time() - t0:.0f}s)")


def default_out(args):
    """--out's default: the CE-only baseline has a file of its own."""
    return args.out or (common.STUDENT_CE if args.distill_weight == 0 else common.STUDENT)


if __name__ == "__main__":
    common.run_main(main)
