"""LGTM: Learning Good Teacher Matters, in one file.

Ren, Zhong, Zhou, Yang, Yu, Shang. "Tailoring Instructions to Student's Learning Levels Boosts Knowledge
Distillation". ACL 2023, arXiv 2305.09651.

The idea. In knowledge distillation a student S imitates a teacher T. LGTM trains the teacher together with
the student, and the teacher asks, for every training sample, whether distilling on it helps the student on
held-out data. After a look-ahead student step θs' it takes v = ∇θs L_val(θs') on a feedback batch; the
*distillation influence* of sample i is w_i = ∇θs D_i · v (eq. 8), positive when a step on D_i lowers the
held-out loss. The teacher descends its own loss L_aux minus ηs·mean(w) (eq. 11, sign corrected), so it
learns to teach what the student can use. w_i and the teacher's gradient of it come from two extra student
forwards by finite differences (eq. 10), or exactly from one forward-mode pass (`--influence exact`).

Reading order, top to bottom:
    1. LGTM: losses, look-ahead, feedback gradient, both influences, lgtm_step. torch alone: copy it out.
    2. The paper's comparison methods: kd_step, online_step, meta_step, and the influence/aux diagnostic.
    3. GLUE data: the Hub, or a local copy in the GLUE TSV or Hub parquet layout.
    4. Models: loading checkpoints, offline checks.
    5. Evaluation and metrics.
    6. The training loop, checkpoints and logs.
    7. The command line.

    python lgtm.py --task rte                                   # Hub models and data
    python lgtm.py --task rte --data-dir DIR --teacher DIR --student DIR --student-layers 3
"""

# ==========================================================================================================
# 1. LGTM (Algorithm 1). This section needs torch alone: copy it into your own trainer.
# ==========================================================================================================
import contextlib
import math

import torch
import torch.nn.functional as F
from torch.func import functional_call, jvp


def ground_truth_loss(logits, labels):
    """L_ce(y, f(x)) per sample: the label term of eq. 1 and 3, and L_val of eq. 5 (squared error if 1 output)."""
    if logits.shape[-1] == 1:
        return (logits.squeeze(-1) - labels.to(logits.dtype)) ** 2
    return F.cross_entropy(logits, labels, reduction="none")


def distillation_loss(pred_logits, target_logits, kind="ce", temperature=1.0):
    """D(target -> pred) per sample: soft cross-entropy of `pred` against softmax(target / T), times T^2 (Hinton
    et al.), or MSE between logits. Gradients flow into both arguments: the student's D(T -> S) of eq. 1 carries
    the teacher's influence through `target`, the teacher's D(S -> T) of eq. 11 through `pred`."""
    if kind == "mse":
        return ((pred_logits - target_logits) ** 2).mean(-1)
    target = F.softmax(target_logits / temperature, dim=-1)
    return -(target * F.log_softmax(pred_logits / temperature, dim=-1)).sum(-1) * temperature ** 2


def student_loss(s_logits, t_logits, labels, student_alpha=0.0, distill_loss="ce", temperature=1.0):
    """L_s (eq. 1): alpha_s * L_ce(y, S) + (1 - alpha_s) * D(T -> S), the teacher's logits as fixed targets."""
    distill = distillation_loss(s_logits, t_logits.detach(), distill_loss, temperature)
    return (student_alpha * ground_truth_loss(s_logits, labels) + (1 - student_alpha) * distill).mean()


def teacher_aux_loss(t_logits, s_logits, labels, alpha=0.6, distill_loss="ce", temperature=1.0):
    """L_aux (eq. 11; the online teacher's whole loss, eq. 3): alpha * L_ce(y, T) + (1 - alpha) * D(S -> T)."""
    distill = distillation_loss(t_logits, s_logits.detach(), distill_loss, temperature)
    return (alpha * ground_truth_loss(t_logits, labels) + (1 - alpha) * distill).mean()


def model_inputs(batch):
    return {k: batch[k] for k in ("input_ids", "token_type_ids", "attention_mask") if k in batch}


def autocast(device, bf16):
    """bf16 compute over fp32 master weights for the ordinary forwards (no loss scaling needed); off: a no-op."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16)


def upcast(x):
    """bf16 / fp16 -> fp32 for the losses; fp32 and fp64 stay as they are."""
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


@contextlib.contextmanager
def full_precision(device):
    """fp32 without autocast and without TF32, for the influence passes. At r = 0.01 the two perturbed losses of
    eq. 10 agree in their first 3-5 digits; bf16 (8-bit mantissa) or TF32 (10-bit) rounding of the two passes
    would be as large as their difference."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        with torch.autocast(torch.device(device).type, enabled=False):
            yield
    finally:
        torch.set_float32_matmul_precision(previous)


@contextlib.contextmanager
def dropout_off(model):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def check_options(alpha=0.6, student_alpha=0.0, distill_loss="ce", temperature=1.0, influence="fd",
                  fd_radius=0.01, lookahead="sgd", influence_weight=1.0):
    """ValueError naming every option outside its range (NaN fails every range)."""
    finite = lambda x: isinstance(x, (int, float)) and math.isfinite(x)
    rules = [("alpha", alpha, finite(alpha) and 0 <= alpha <= 1, "a number in [0, 1]"),
             ("student_alpha", student_alpha, finite(student_alpha) and 0 <= student_alpha <= 1, "a number in [0, 1]"),
             ("distill_loss", distill_loss, distill_loss in ("ce", "mse"), "'ce' or 'mse'"),
             ("temperature", temperature, finite(temperature) and temperature > 0, "a finite number > 0"),
             ("influence", influence, influence in ("fd", "exact"), "'fd' or 'exact'"),
             ("fd_radius", fd_radius, finite(fd_radius) and fd_radius > 0, "a finite number > 0"),
             ("lookahead", lookahead, lookahead in ("sgd", "adamw"), "'sgd' or 'adamw'"),
             ("influence_weight", influence_weight, finite(influence_weight), "a finite number")]
    bad = [f"{name}={value!r} (expected {expected})" for name, value, ok, expected in rules if not ok]
    if bad:
        raise ValueError("invalid option: " + "; ".join(bad))


@torch.no_grad()
def lookahead_params(student, grads, optimizer, form="sgd"):
    """θs' after one student step on z^r (Algorithm 1, lines 3-4), as new tensors: no copy of the model, and its
    parameters, .grad and the optimizer's state stay as they are.
    sgd:   θs' = θs - lr * g                                 (Algorithm 1 as printed; the exact meta-gradient)
    adamw: θs' = what optimizer.step() would give (torch.optim.AdamW: same lr, betas, eps, weight decay, state).
    With adamw only v is taken after the AdamW step; the teacher's term keeps the SGD form, so its gradient is
    then a heuristic (as in the authors' code), not the gradient through an AdamW step."""
    if form not in ("sgd", "adamw"):
        raise ValueError(f"lookahead form {form!r}: expected 'sgd' or 'adamw'")
    group_of = {p: group for group in optimizer.param_groups for p in group["params"]}
    new = {}
    for (name, p), g in zip(student.named_parameters(), grads):
        group = group_of[p]
        lr = group["lr"]
        if form == "sgd":
            new[name] = p - lr * g
            continue
        if group.get("amsgrad") or group.get("maximize") or "betas" not in group:
            raise ValueError("the adamw look-ahead simulates plain torch.optim.AdamW (no amsgrad, no maximize)")
        beta1, beta2 = group["betas"]
        state = optimizer.state.get(p, {})
        step = float(state["step"]) + 1 if "step" in state else 1.0
        exp_avg = state["exp_avg"] * beta1 + g * (1 - beta1) if state else g * (1 - beta1)
        exp_avg_sq = state["exp_avg_sq"] * beta2 + g * g * (1 - beta2) if state else g * g * (1 - beta2)
        denom = exp_avg_sq.sqrt() / math.sqrt(1 - beta2 ** step) + group["eps"]
        new[name] = p * (1 - lr * group["weight_decay"]) - (lr / (1 - beta1 ** step)) * exp_avg / denom
    return new


def feedback_gradient(student, params, feedback_batch, bf16=False):
    """v = ∇θs L_val(θs'; z^e) (Algorithm 1, lines 5-6; eq. 5), and L_val itself."""
    params = {name: p.detach().requires_grad_() for name, p in params.items()}
    with autocast(feedback_batch["labels"].device, bf16):
        logits = functional_call(student, params, args=(), kwargs=model_inputs(feedback_batch)).logits
    loss = ground_truth_loss(upcast(logits), feedback_batch["labels"]).mean()
    return list(torch.autograd.grad(loss, list(params.values()))), loss.detach()


def influence_fd(student, v, inputs, t_logits, sample_loss, radius=0.01):
    """Distillation influence w_i = ∇θs D_i · v by central differences (eq. 10, appendix B):
        w_i ~ [D_i(T, S(θs + eps v)) - D_i(T, S(θs - eps v))] / (2 eps),     eps = radius / ||v||,
    with sample_loss(student_logits, teacher_logits) -> D_i per sample. Two student forwards without grad; w keeps
    its graph to the teacher through t_logits, so backward() gives ∇θt w_i. Dropout is off in both passes
    (with two masks the difference is noise), θs is never written (the perturbed weights are new tensors),
    and the passes run in full fp32 whatever the surrounding precision."""
    if not (math.isfinite(radius) and radius > 0):
        raise ValueError(f"radius {radius!r}: expected a finite number > 0")
    names, params = zip(*student.named_parameters())
    v_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(v)))
    eps = radius / v_norm.clamp_min(1e-30)  # a tensor: no host sync; v = 0 gives w = 0, not NaN
    with full_precision(params[0].device), dropout_off(student):
        with torch.no_grad():
            step = torch._foreach_mul(v, eps)
            plus = functional_call(student, dict(zip(names, torch._foreach_add(params, step))),
                                   args=(), kwargs=inputs).logits
            minus = functional_call(student, dict(zip(names, torch._foreach_sub(params, step))),
                                    args=(), kwargs=inputs).logits
        t_logits = upcast(t_logits)
        return (sample_loss(plus, t_logits) - sample_loss(minus, t_logits)) / (2 * eps)


def influence_exact(student, v, inputs, t_logits, sample_loss):
    """The same w_i exactly (eq. 8): one forward-mode pass gives the student's logits s and their directional
    derivative ds = J v; then w_i = dD_i/ds_i . ds_i. The teacher enters only through t_logits, so ∇θt w_i (the
    exact mixed second derivative) needs no graph through the student. Needs eager attention in the student."""
    names, params = zip(*student.named_parameters())
    with full_precision(params[0].device), dropout_off(student):
        s, ds = jvp(lambda p: functional_call(student, p, args=(), kwargs=inputs).logits,
                    (dict(zip(names, (p.detach() for p in params))),), (dict(zip(names, v)),))
        s = s.detach().requires_grad_()
        (dD_ds,) = torch.autograd.grad(sample_loss(s, upcast(t_logits)).sum(), s, create_graph=True)
        return (dD_ds * ds.detach()).sum(-1)


def influence_objective(w, student_lr, student_alpha=0.0, weight=1.0):
    """The term the teacher adds to its loss for the student's sake (eq. 9-11, with the sign corrected):
        -weight * lr_s * (1 - alpha_s) * mean_i w_i.
    Why this sign and scale (appendix A). The student steps θs' = θs - lr_s ∇θs L_s, and L_s holds
    (1 - alpha_s) mean_i D_i(θt, θs). To first order, L_val(θs') = L_val(θs) - lr_s ∇θs L_s · v, so its
    teacher gradient is ∇θt L_val(θs') = -lr_s (1 - alpha_s) ∇θt mean_i (∇θs D_i · v) = ∇θt [this term]
    (with weight 1). Descending it lowers the student's held-out loss after its step by RAISING the influences.
    The printed eq. 10-11 add +L_influence (= +mean w), which points the other way; the authors' code
    subtracts, as here. weight = 1 is the derivation; other values scale the term for study."""
    return -weight * student_lr * (1 - student_alpha) * w.mean()


def lgtm_step(teacher, student, teacher_optimizer, student_optimizer, batch, feedback_batch, *, alpha=0.6,
              student_alpha=0.0, distill_loss="ce", temperature=1.0, influence="fd", fd_radius=0.01,
              lookahead="sgd", influence_weight=1.0, bf16=False):
    """One iteration of Algorithm 1 on a training batch z^r and a feedback batch z^e (dicts of tensors with
    input_ids, attention_mask, [token_type_ids], labels). Updates teacher, then student; steps no scheduler.
    Returns detached tensors (reading them is the caller's choice: nothing here waits for the GPU).
    Cost with influence="fd": 4 teacher and 10 student forward-equivalents (a backward counts 2)."""
    check_options(alpha, student_alpha, distill_loss, temperature, influence, fd_radius, lookahead, influence_weight)
    inputs, labels, device = model_inputs(batch), batch["labels"], batch["labels"].device
    distill_fn = lambda s_logits, t_logits: distillation_loss(s_logits, t_logits, distill_loss, temperature)  # D_i
    teacher.train()
    student.train()

    # Line 2: the training batch z^r. One teacher forward (with grad) serves L_aux, the look-ahead and line 7;
    # one student forward at θs serves the look-ahead gradient and the real update of line 9.
    with autocast(device, bf16):
        t_logits = upcast(teacher(**inputs).logits)
        s_logits = upcast(student(**inputs).logits)

    # Lines 3-4: the look-ahead student step θs' = θs - ηs ∇θs L_s (eq. 1-2), as new tensors.
    loss_s = student_loss(s_logits, t_logits, labels, student_alpha, distill_loss, temperature)
    grads = torch.autograd.grad(loss_s, list(student.parameters()), retain_graph=True)
    theta_next = lookahead_params(student, grads, student_optimizer, lookahead)

    # Lines 5-6: the feedback batch z^e and v = ∇θs L_val(θs'; z^e) (eq. 5).
    v, feedback_loss = feedback_gradient(student, theta_next, feedback_batch, bf16)

    # Line 7: the distillation influence of each training sample, w_i = ∇θs D_i · v (eq. 8), by eq. 10.
    if influence == "fd":
        w = influence_fd(student, v, inputs, t_logits, distill_fn, fd_radius)
    else:
        w = influence_exact(student, v, inputs, t_logits, distill_fn)

    # Line 8: the teacher descends L_aux plus the influence objective (eq. 11, sign corrected).
    student_lr = student_optimizer.param_groups[0]["lr"]
    teacher_loss = (teacher_aux_loss(t_logits, s_logits, labels, alpha, distill_loss, temperature)
                    + influence_objective(w, student_lr, student_alpha, influence_weight))
    teacher_optimizer.zero_grad(set_to_none=True)
    teacher_loss.backward()
    teacher_optimizer.step()

    # Line 9: the student distils (eq. 1-2) from the teacher just updated (appendix F.2).
    with torch.no_grad(), autocast(device, bf16):
        t_logits = upcast(teacher(**inputs).logits)
    loss_s = student_loss(s_logits, t_logits, labels, student_alpha, distill_loss, temperature)
    student_optimizer.zero_grad(set_to_none=True)
    loss_s.backward()
    student_optimizer.step()
    return {"teacher_loss": teacher_loss.detach(), "student_loss": loss_s.detach(),
            "feedback_loss": feedback_loss, "w": w.detach()}


# ==========================================================================================================
# 2. The paper's comparison methods (figure 1), from the functions of section 1
# ==========================================================================================================

def kd_step(teacher, student, student_optimizer, batch, *, student_alpha=0.0, distill_loss="ce", temperature=1.0,
            bf16=False):
    """Vanilla KD (eq. 1-2): the student distils from a frozen, fine-tuned teacher (run without dropout)."""
    check_options(student_alpha=student_alpha, distill_loss=distill_loss, temperature=temperature)
    inputs, labels, device = model_inputs(batch), batch["labels"], batch["labels"].device
    teacher.eval()
    student.train()
    with autocast(device, bf16):
        with torch.no_grad():
            t_logits = upcast(teacher(**inputs).logits)
        s_logits = upcast(student(**inputs).logits)
    loss_s = student_loss(s_logits, t_logits, labels, student_alpha, distill_loss, temperature)
    student_optimizer.zero_grad(set_to_none=True)
    loss_s.backward()
    student_optimizer.step()
    return {"student_loss": loss_s.detach()}


def online_step(teacher, student, teacher_optimizer, student_optimizer, batch, *, alpha=0.6, student_alpha=0.0,
                distill_loss="ce", temperature=1.0, bf16=False):
    """Online distillation: the teacher learns from the labels and the student (eq. 3), then the student distils
    from the updated teacher (eq. 4). LGTM without the influence term."""
    check_options(alpha, student_alpha, distill_loss, temperature)
    inputs, labels, device = model_inputs(batch), batch["labels"], batch["labels"].device
    teacher.train()
    student.train()
    with autocast(device, bf16):
        t_logits = upcast(teacher(**inputs).logits)
        s_logits = upcast(student(**inputs).logits)
    teacher_loss = teacher_aux_loss(t_logits, s_logits, labels, alpha, distill_loss, temperature)  # eq. 3
    teacher_optimizer.zero_grad(set_to_none=True)
    teacher_loss.backward()
    teacher_optimizer.step()
    with torch.no_grad(), autocast(device, bf16):
        t_logits = upcast(teacher(**inputs).logits)
    loss_s = student_loss(s_logits, t_logits, labels, student_alpha, distill_loss, temperature)     # eq. 4
    student_optimizer.zero_grad(set_to_none=True)
    loss_s.backward()
    student_optimizer.step()
    return {"teacher_loss": teacher_loss.detach(), "student_loss": loss_s.detach()}


def influences_after_lookahead(teacher, student, student_optimizer, batch, feedback_batch, *, student_alpha=0.0,
                               distill_loss="ce", temperature=1.0, influence="fd", fd_radius=0.01, lookahead="sgd",
                               bf16=False):
    """Lines 2-7 of Algorithm 1 without any update, for meta_step and the diagnostic below: the teacher's logits
    on z^r (with grad) and the student's, the student's loss and look-ahead gradient, w_i and L_val(θs')."""
    inputs, labels, device = model_inputs(batch), batch["labels"], batch["labels"].device
    distill_fn = lambda s_logits, t_logits: distillation_loss(s_logits, t_logits, distill_loss, temperature)
    teacher.train()
    student.train()
    with autocast(device, bf16):
        t_logits = upcast(teacher(**inputs).logits)
        s_logits = upcast(student(**inputs).logits)
    loss_s = student_loss(s_logits, t_logits, labels, student_alpha, distill_loss, temperature)
    grads = torch.autograd.grad(loss_s, list(student.parameters()))
    v, feedback_loss = feedback_gradient(student, lookahead_params(student, grads, student_optimizer, lookahead),
                                         feedback_batch, bf16)
    if influence == "fd":
        w = influence_fd(student, v, inputs, t_logits, distill_fn, fd_radius)
    else:
        w = influence_exact(student, v, inputs, t_logits, distill_fn)
    return t_logits, s_logits, loss_s, grads, w, feedback_loss


def meta_step(teacher, student, teacher_optimizer, student_optimizer, batch, feedback_batch, *, student_alpha=0.0,
              distill_loss="ce", temperature=1.0, influence="fd", fd_radius=0.01, lookahead="sgd",
              teacher_max_grad_norm=1.0, bf16=False):
    """Meta distillation (MetaDistil, eq. 6-7): the fine-tuned teacher learns only from the student's held-out
    loss after a look-ahead step, whose gradient is the influence objective; its gradient is clipped to
    teacher_max_grad_norm (MetaDistil's 1.0; 0: no clipping). The student distils from the teacher as it was
    before this step, with the look-ahead's own gradient (eq. 6)."""
    options = dict(student_alpha=student_alpha, distill_loss=distill_loss, temperature=temperature,
                   influence=influence, fd_radius=fd_radius, lookahead=lookahead)
    check_options(**options)
    if not (math.isfinite(teacher_max_grad_norm) and teacher_max_grad_norm >= 0):
        raise ValueError(f"teacher_max_grad_norm {teacher_max_grad_norm!r}: expected a finite number >= 0")
    _, _, loss_s, grads, w, feedback_loss = influences_after_lookahead(
        teacher, student, student_optimizer, batch, feedback_batch, bf16=bf16, **options)
    teacher_loss = influence_objective(w, student_optimizer.param_groups[0]["lr"], student_alpha)   # eq. 7
    teacher_optimizer.zero_grad(set_to_none=True)
    teacher_loss.backward()
    if teacher_max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(teacher.parameters(), teacher_max_grad_norm)
    teacher_optimizer.step()
    student_optimizer.zero_grad(set_to_none=True)
    for p, g in zip(student.parameters(), grads):                                                    # eq. 6
        p.grad = g
    student_optimizer.step()
    return {"teacher_loss": teacher_loss.detach(), "student_loss": loss_s.detach(),
            "feedback_loss": feedback_loss, "w": w.detach()}


def influence_to_aux_grad_ratio(teacher, student, student_optimizer, batch, feedback_batch, *, alpha=0.6,
                                student_alpha=0.0, distill_loss="ce", temperature=1.0, influence_weight=1.0,
                                **options):
    """||∇θt influence term|| / ||∇θt L_aux||: how much the student's feedback weighs in the teacher's update of
    eq. 11, at the current parameters; options (influence, fd_radius, lookahead, bf16) as lgtm_step's. It updates
    nothing and costs about one LGTM step: call it on the steps you log, before lgtm_step on the same batches."""
    losses = dict(distill_loss=distill_loss, temperature=temperature)
    t_logits, s_logits, _, _, w, _ = influences_after_lookahead(
        teacher, student, student_optimizer, batch, feedback_batch, student_alpha=student_alpha, **losses, **options)
    aux = teacher_aux_loss(t_logits, s_logits, batch["labels"], alpha, **losses)
    term = influence_objective(w, student_optimizer.param_groups[0]["lr"], student_alpha, influence_weight)
    params = list(teacher.parameters())
    norm = lambda loss, **kw: torch.linalg.vector_norm(torch.stack(
        [g.norm() for g in torch.autograd.grad(loss, params, allow_unused=True, **kw) if g is not None]))
    return norm(term, retain_graph=True) / norm(aux)


# ==========================================================================================================
# 3. GLUE data: from the Hub, or a local copy in the GLUE TSV or Hub parquet layout
# ==========================================================================================================
import argparse  # noqa: E402  (sections 3-7: the script around the algorithm)
import csv  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

METHODS = ("kd", "online", "meta", "lgtm")


class UserError(Exception):
    """Bad input: main() prints the message (what is wrong and how to fix it) and exits with status 1."""


@dataclass(frozen=True)
class Task:
    name: str
    glue_dir: str            # folder of the GLUE TSV release, also the GLUE-server file name
    hub_columns: tuple       # text columns in nyu-mll/glue
    tsv_columns: tuple       # text columns in the TSV header (CoLA train/dev have none: positions)
    tsv_label: object        # label column in the TSV header (or position)
    labels: tuple            # label names as the TSVs write them, in the Hub's id order; () for regression
    metrics: tuple
    dev_splits: tuple = ("validation",)
    test_splits: tuple = ("test",)
    tsv_id: str = "index"    # id column of test.tsv, echoed in the GLUE-server predictions

    @property
    def is_regression(self):
        return not self.labels


TASKS = {t.name: t for t in [
    Task("rte", "RTE", ("sentence1", "sentence2"), ("sentence1", "sentence2"), "label",
         ("entailment", "not_entailment"), ("accuracy",)),
    Task("mrpc", "MRPC", ("sentence1", "sentence2"), ("#1 String", "#2 String"), "Quality",
         ("0", "1"), ("f1", "accuracy")),
    Task("sst2", "SST-2", ("sentence",), ("sentence",), "label", ("0", "1"), ("accuracy",)),
    Task("qnli", "QNLI", ("question", "sentence"), ("question", "sentence"), "label",
         ("entailment", "not_entailment"), ("accuracy",)),
    Task("qqp", "QQP", ("question1", "question2"), ("question1", "question2"), "is_duplicate",
         ("0", "1"), ("f1", "accuracy"), tsv_id="id"),
    Task("mnli", "MNLI", ("premise", "hypothesis"), ("sentence1", "sentence2"), "gold_label",
         ("entailment", "neutral", "contradiction"), ("accuracy",),
         dev_splits=("validation_matched", "validation_mismatched"), test_splits=("test_matched", "test_mismatched")),
    Task("cola", "CoLA", ("sentence",), (3,), 1, ("0", "1"), ("matthews",)),
    Task("stsb", "STS-B", ("sentence1", "sentence2"), ("sentence1", "sentence2"), "score", (), ("pearson", "spearman")),
]}
TSV_NAMES = {"train": "train", "validation": "dev", "validation_matched": "dev_matched",
             "validation_mismatched": "dev_mismatched", "test": "test", "test_matched": "test_matched",
             "test_mismatched": "test_mismatched"}
SERVER_SUFFIX = {"test_matched": "-m", "test_mismatched": "-mm"}  # GLUE-server file names of MNLI's test sets


@dataclass
class Examples:
    """One split, column-wise. `index` is the row number (train, dev) or the GLUE id (test)."""
    text_a: list
    text_b: list | None
    label: list              # class ids, float scores (stsb), or -1 for an unlabelled test split
    index: list

    def select(self, rows):
        pick = lambda xs: None if xs is None else [xs[i] for i in rows]
        return Examples(pick(self.text_a), pick(self.text_b), pick(self.label), pick(self.index))

    def __len__(self):
        return len(self.label)


def read_glue_tsv(path, task, split):
    """A GLUE TSV file. QUOTE_NONE: fields may start with a quote that is no CSV quoting; MRPC starts with a BOM;
    CoLA's train and dev have no header. Labels are checked against the task's label set."""
    if not path.is_file():
        raise UserError(f"missing file {path} (GLUE TSV layout: {path.parent}/train.tsv, "
                        f"{', '.join(TSV_NAMES[s] + '.tsv' for s in task.dev_splits)}, test.tsv for --predict)")
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    labelled = not split.startswith("test")
    if task.name == "cola" and labelled:
        header, first_line, columns = None, 1, list(task.tsv_columns) + [task.tsv_label]
    else:
        if not rows:
            raise UserError(f"{path} is empty: expected a header line and one example per line")
        header, rows, first_line = rows[0], rows[1:], 2
        wanted = list(("sentence",) if task.name == "cola" else task.tsv_columns)
        wanted += [task.tsv_label] if labelled else [task.tsv_id]
        missing = [c for c in wanted if c not in header]
        if missing:
            raise UserError(f"{path}: missing column(s) {missing}; the header has {header}. "
                            f"Is this the {task.glue_dir} {split} file of the GLUE release?")
        columns = [header.index(c) for c in wanted]
    width = len(header) if header else 4
    text_a, text_b, label, index = [], [], [], []
    for line, row in enumerate(rows, start=first_line):
        if len(row) != width:
            raise UserError(f"{path}, line {line}: malformed row with {len(row)} tab-separated fields, expected "
                            f"{width}. The file must be the GLUE TSV (tab-separated, one example per line).")
        *texts, last = [row[c] for c in columns]
        text_a.append(texts[0])
        text_b.extend(texts[1:])
        if not labelled:
            label.append(-1)
            index.append(int(last) if last.isdigit() else last)
            continue
        if task.is_regression:
            try:
                label.append(float(last))
            except ValueError:
                raise UserError(f"{path}, line {line}: score {last!r} is not a number") from None
        elif last in task.labels:
            label.append(task.labels.index(last))
        else:
            raise UserError(f"{path}, line {line}: label {last!r} is not in the label set of {task.name} "
                            f"{list(task.labels)}")
        index.append(line - first_line)
    return Examples(text_a, text_b or None, label, index)


def examples_from_columns(columns, task, split, source):
    """Hub rows (nyu-mll/glue, or its parquet files) -> Examples; test labels are -1 there."""
    missing = [c for c in task.hub_columns + ("label",) if c not in columns]
    if missing:
        raise UserError(f"{source}: missing column(s) {missing}; found {sorted(columns)}")
    n, labelled = len(columns["label"]), not split.startswith("test")
    for row, y in enumerate(columns["label"] if labelled else []):
        if not (math.isfinite(y) if task.is_regression else y in range(len(task.labels))):
            raise UserError(f"{source}: row {row} has label {y!r}, outside the label set of {task.name}")
    text_b = list(columns[task.hub_columns[1]]) if len(task.hub_columns) == 2 else None
    index = list(columns["idx"]) if "idx" in columns else list(range(n))
    return Examples(list(columns[task.hub_columns[0]]), text_b, list(columns["label"]), index)


def load_glue(task, data_dir, splits):
    """{split: Examples} from data_dir (TSV or parquet layout) or, with data_dir None, from the Hub."""
    if data_dir is None:
        import datasets
        try:
            hub = datasets.load_dataset("nyu-mll/glue", task.name)
        except Exception as e:  # offline, no cache, or the Hub refused: one message, not a traceback
            raise UserError(f"could not load GLUE {task.name} from the Hugging Face Hub ({one_line(e)}). Pass a "
                            f"local copy: --data-dir DIR with DIR/{task.glue_dir}/train.tsv") from None
        out = {s: examples_from_columns(hub[s].to_dict(), task, s, f"nyu-mll/glue {task.name} {s}") for s in splits}
    elif not Path(data_dir).is_dir():
        raise UserError(f"--data-dir {data_dir} does not exist or is not a directory")
    elif (Path(data_dir) / task.glue_dir / "train.tsv").is_file():
        out = {s: read_glue_tsv(Path(data_dir) / task.glue_dir / f"{TSV_NAMES[s]}.tsv", task, s) for s in splits}
    elif list((Path(data_dir) / task.name).glob("train-*.parquet")):
        files = {s: sorted(map(str, (Path(data_dir) / task.name).glob(f"{s}-*.parquet"))) for s in splits}
        missing = [s for s, f in files.items() if not f]
        if missing:
            raise UserError(f"missing file {Path(data_dir) / task.name}/{missing[0]}-*.parquet (Hub parquet layout)")
        import datasets
        parquet = datasets.load_dataset("parquet", data_files=files)
        out = {s: examples_from_columns(parquet[s].to_dict(), task, s, files[s][0]) for s in splits}
    else:
        raise UserError(f"no {task.name} data under {data_dir}: expected {Path(data_dir) / task.glue_dir}/train.tsv "
                        f"(GLUE TSV layout) or {Path(data_dir) / task.name}/train-*.parquet (Hub parquet layout)")
    for split, examples in out.items():
        if len(examples) == 0:
            raise UserError(f"the {split} split of {task.name} (from {data_dir or 'the Hub'}) has no examples: "
                            f"its file holds a header only; restore the complete file")
    return out


def split_feedback(train, fraction, seed):
    """Appendix E.1: hold out a random fraction of train as the feedback set; train on the rest."""
    rows = np.random.default_rng(seed).permutation(len(train))
    n_feedback = max(1, int(round(fraction * len(train))))
    if n_feedback >= len(train):
        raise UserError(f"--feedback-split {fraction} leaves no training examples out of {len(train)}")
    return train.select(sorted(rows[n_feedback:])), train.select(sorted(rows[:n_feedback]))


def tokenize(examples, tokenizer, max_length):
    """Tokenize once; padding happens per batch (collate). `row` names the example in its split."""
    enc = tokenizer(examples.text_a, examples.text_b, truncation=True, max_length=max_length)
    keys = [k for k in ("input_ids", "token_type_ids", "attention_mask") if k in enc]
    return [dict({k: enc[k][i] for k in keys}, label=examples.label[i], row=examples.index[i])
            for i in range(len(examples))]


def collate(features, pad_token_id):
    """Dynamic padding to the longest sequence of the batch."""
    width = max(len(f["input_ids"]) for f in features)
    pad_value = {"input_ids": pad_token_id, "token_type_ids": 0, "attention_mask": 0}
    batch = {k: torch.tensor([f[k] + [v] * (width - len(f[k])) for f in features])
             for k, v in pad_value.items() if k in features[0]}
    batch["labels"] = torch.tensor([f["label"] for f in features])
    batch["row"] = torch.tensor([f["row"] for f in features]) if isinstance(features[0]["row"], int) else None
    return batch


def to_device(batch, device):
    """The model's tensors to the device (non-blocking); `row` stays on the host, for the logs."""
    return {k: t if k == "row" or t is None else t.to(device, non_blocking=True) for k, t in batch.items()}


def make_loader(features, batch_size, pad_token_id, shuffle, seed=0):
    return torch.utils.data.DataLoader(
        features, batch_size=batch_size, shuffle=shuffle, collate_fn=lambda f: collate(f, pad_token_id),
        generator=torch.Generator().manual_seed(seed) if shuffle else None, pin_memory=torch.cuda.is_available())


def forever(loader):
    while True:
        yield from loader


# ==========================================================================================================
# 4. Models: Hub names or local directories, float32 master weights, one line of report each
# ==========================================================================================================

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "sentencepiece.bpe.model", "spiece.model", "vocab.json")


def one_line(error):
    """A library's error message, whole, on one line."""
    return f"{type(error).__name__}: " + " ".join(str(error).split())


def is_local(name):
    return Path(name).exists() or str(name).startswith((".", "/", "~"))


def check_model_dir(name, flag):
    """A local model folder must hold what save_pretrained writes: config.json, weights, tokenizer files."""
    path = Path(name)
    if not path.is_dir():
        raise UserError(f"{flag} {name}: no such directory (a local model is a folder with config.json, weights "
                        f"and tokenizer files, as save_pretrained writes it)")
    missing = [what for what, files in (("config.json", ("config.json",)), ("weights", WEIGHT_FILES),
                                        ("tokenizer files", TOKENIZER_FILES))
               if not any((path / f).is_file() for f in files)]
    if missing:
        raise UserError(f"{flag} {name} has no {' and no '.join(missing)}: point it at a folder written by "
                        f"save_pretrained (model and tokenizer), e.g. a downloaded Hub snapshot")


def check_hub_access(needed):
    """needed: [(flag, name)] of inputs that are not local. Checked before any download, so that without the Hub
    a run ends in seconds with one message (no retry loops). Where the Hub cannot be reached, inputs already in
    the local Hugging Face cache are used offline."""
    if not needed:
        return
    from huggingface_hub import constants, try_to_load_from_cache
    reason = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else None
    if reason is None:
        import urllib.request
        try:
            urllib.request.urlopen(constants.ENDPOINT, timeout=5).close()
            return
        except Exception as e:
            if getattr(e, "code", None) is not None:  # the server answered (HTTP error): the Hub is reachable
                return
            reason = f"{constants.ENDPOINT} did not answer ({one_line(e)})"
        os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
        constants.HF_HUB_OFFLINE = True  # from here on the libraries use their cache only, without retries
    missing = [(flag, name) for flag, name in needed
               if flag == "--data-dir" or not isinstance(try_to_load_from_cache(name, "config.json"), str)]
    if missing:
        fixes = "; ".join(f"{flag} DIR instead of {name!r}" if flag != "--data-dir" else
                          f"--data-dir DIR (a GLUE copy, DIR/{name}/train.tsv)" for flag, name in missing)
        raise UserError(f"the Hugging Face Hub is out of reach ({reason}) and these inputs need it: {fixes}")


def from_pretrained(loader, name, flag, **kwargs):
    try:
        return loader(name, **kwargs)
    except Exception as e:
        raise UserError(f"could not load {flag} {name} ({one_line(e)})") from None


def load_tokenizer(teacher, student):
    from transformers import AutoTokenizer
    teacher_tok = from_pretrained(AutoTokenizer.from_pretrained, teacher, "--teacher")
    student_tok = from_pretrained(AutoTokenizer.from_pretrained, student, "--student")
    probe = "Distillation Influence: Hello WORLD, naïve café 123!"
    if teacher_tok.get_vocab() != student_tok.get_vocab() or teacher_tok(probe) != student_tok(probe):
        raise UserError(f"the tokenizers of --teacher {teacher} and --student {student} differ: distillation needs "
                        f"both models to read the same token ids. Pick a pair that shares one vocabulary")
    return student_tok


def load_model(name, flag, num_labels, layers=None, attention="sdpa"):
    """(model, one line describing it): float32 master weights whatever the checkpoint stores, a head for
    num_labels, optionally only the first `layers` transformer layers."""
    from transformers import AutoConfig, AutoModelForSequenceClassification
    config = from_pretrained(AutoConfig.from_pretrained, name, flag)
    depth = config.num_hidden_layers
    if layers is not None and layers > depth:
        raise UserError(f"--student-layers {layers}: {name} has only {depth} layers")
    model = from_pretrained(AutoModelForSequenceClassification.from_pretrained, name, flag, num_labels=num_labels,
                            dtype=torch.float32, attn_implementation=attention,
                            **({"num_hidden_layers": layers} if layers else {}))
    head = any(a.endswith("ForSequenceClassification") for a in config.architectures or []) and \
        getattr(config, "num_labels", None) == num_labels
    size = sum(p.numel() for p in model.parameters()) / 1e6
    kept = f"first {layers} of {depth} layers" if layers and layers < depth else f"{depth} layers"
    return model, f"{flag[2:]}: {kept} of {name} ({size:.1f}M parameters); " + \
        ("its classifier head" if head else f"new classifier head ({num_labels} outputs)")


@torch.no_grad()
def zero_classifier(model):
    """One-stage methods start both heads at zero, as the authors' code does (appendix F.1)."""
    head = model.classifier
    last = head if isinstance(head, torch.nn.Linear) else [m for m in head.modules()
                                                           if isinstance(m, torch.nn.Linear)][-1]
    last.weight.zero_()
    last.bias.zero_()


def make_optimizer(model, lr, weight_decay, total_steps, warmup_ratio):
    """AdamW (fused on the GPU) with linear warm-up and decay; no weight decay on biases and LayerNorm."""
    from transformers import get_linear_schedule_with_warmup
    no_decay = ("bias", "LayerNorm.weight", "layer_norm.weight")
    groups = [{"params": [p for n, p in model.named_parameters() if not n.endswith(no_decay)],
               "weight_decay": weight_decay},
              {"params": [p for n, p in model.named_parameters() if n.endswith(no_decay)], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=lr, fused=next(model.parameters()).is_cuda)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(warmup_ratio * total_steps), total_steps)
    return optimizer, scheduler


# ==========================================================================================================
# 5. Evaluation and metrics
# ==========================================================================================================

@torch.no_grad()
def predict(model, loader, device, bf16=False):
    with dropout_off(model), autocast(device, bf16):
        logits = [model(**model_inputs(to_device(b, device))).logits.float().cpu() for b in loader]
    return torch.cat(logits).numpy()


def _ranks(x):
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x))
    _, tie, counts = np.unique(x, return_inverse=True, return_counts=True)
    return (np.bincount(tie, weights=ranks) / counts)[tie]  # ties share their mean rank


def compute_metrics(task, logits, labels):
    labels = np.asarray(labels)
    if task.is_regression:
        pred = logits[:, 0]
        pearson = float(np.corrcoef(pred, labels)[0, 1])
        return {"pearson": pearson, "spearman": float(np.corrcoef(_ranks(pred), _ranks(labels))[0, 1])}
    pred = logits.argmax(-1)
    out = {"accuracy": float((pred == labels).mean())}
    if "f1" in task.metrics:
        tp, fp, fn = [int(((pred == a) & (labels == b)).sum()) for a, b in ((1, 1), (1, 0), (0, 1))]
        out["f1"] = 2 * tp / max(2 * tp + fp + fn, 1)
    if "matthews" in task.metrics:
        tp, tn, fp, fn = [float(((pred == a) & (labels == b)).sum()) for a, b in ((1, 1), (0, 0), (1, 0), (0, 1))]
        den = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
        out = {"matthews": (tp * tn - fp * fn) / den if den else 0.0}
    return {m: out[m] for m in task.metrics}


def single_class(task, logits):
    """The label a classifier gives to every example, or None: a model that has collapsed to one class."""
    if task.is_regression or len(logits) < 2:
        return None
    classes = np.unique(logits.argmax(-1))
    return task.labels[classes[0]] if len(classes) == 1 else None


def evaluate(model, dev_loaders, task, device, bf16=False):
    """(metrics, collapsed): metrics on each dev split (mnli: mismatched with an 'mm_' prefix), 'score' the mean of
    the first split's metrics (GLUE averages F1 and accuracy) that picks the best checkpoint; collapsed is the one
    class predicted for the whole first dev split, or None."""
    out, collapsed = {}, None
    for i, (split, (loader, labels)) in enumerate(dev_loaders.items()):
        logits = predict(model, loader, device, bf16)
        metrics = compute_metrics(task, logits, labels)
        if i == 0:
            out["score"] = float(np.mean(list(metrics.values())))
            collapsed = single_class(task, logits)
        out.update({("mm_" if i else "") + k: v for k, v in metrics.items()})
    return out, collapsed


def write_predictions(model, task, test_loaders, device, out_dir):
    """GLUE-server files: <TASK>.tsv with `index<TAB>prediction`, label names as the server expects."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for split, (loader, ids) in test_loaders.items():
        logits = predict(model, loader, device)
        preds = [f"{x:.3f}" for x in np.clip(logits[:, 0], 0.0, 5.0)] if task.is_regression else \
            [task.labels[i] for i in logits.argmax(-1)]
        path = out_dir / f"{task.glue_dir}{SERVER_SUFFIX.get(split, '')}.tsv"
        with open(path, "w") as f:
            f.write("index\tprediction\n")
            f.writelines(f"{i}\t{p}\n" for i, p in zip(ids, preds))
        paths.append(path)
    return paths


# ==========================================================================================================
# 6. The training loop: stage 1 (kd, meta: fine-tune the teacher), stage 2 (distil), checkpoints, logs
# ==========================================================================================================

class NonFiniteLoss(UserError):
    pass


def fmt(metrics):
    return " ".join(f"{k}={v:.4f}" for k, v in metrics.items())


def stage_steps(steps_per_epoch, epochs, max_steps):
    total = max(1, math.ceil(steps_per_epoch * epochs))
    return min(total, max_steps) if max_steps else total


class Run:
    """What a run leaves in --output-dir: metrics.json (rewritten after every evaluation, so an interrupted run
    keeps its history), train_log.jsonl (losses every --logging-steps, and every step's per-sample influences),
    the best student in student/, the final teacher in teacher/."""

    def __init__(self, out_dir, args, tokenizer):
        self.dir, self.tokenizer = out_dir, tokenizer
        self.metrics = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                        "status": "running", "notes": [], "warnings": [], "history": [], "best": None}
        self.log = open(out_dir / "train_log.jsonl", "w")

    def note(self, msg, warning=False):
        tqdm.write(("warning: " if warning else "") + msg)
        self.metrics["warnings" if warning else "notes"].append(msg)

    def write(self, records):
        self.log.writelines(json.dumps(r) + "\n" for r in records)
        self.log.flush()

    def save(self, status=None):
        self.metrics["status"] = status or self.metrics["status"]
        tmp = self.dir / "metrics.json.tmp"
        tmp.write_text(json.dumps(self.metrics, indent=2))
        tmp.replace(self.dir / "metrics.json")


def check_finite(losses, step, causes):
    for name, value in losses.items():
        if not math.isfinite(value):
            raise NonFiniteLoss(f"the {name.replace('_', ' ')} is {value} at step {step}. Common causes: {causes}")


def evaluate_both(step, teacher, student, dev_loaders, task, args, device, run, extra=None):
    """Evaluate student and teacher, warn about a collapsed model, keep the best student."""
    entry = {"step": step, **(extra or {})}
    for name, model in (("student", student), ("teacher", teacher)):
        entry[name], collapsed = evaluate(model, dev_loaders, task, device, args.precision == "bf16")
        if collapsed is not None:
            run.note(f"step {step}: the {name} predicts '{collapsed}' for every dev example (it has collapsed to "
                     f"one class; its score is the constant-class score)", warning=True)
    run.metrics["history"].append(entry)
    best = run.metrics["best"]
    if best is None or entry["student"]["score"] > best["student"]["score"]:
        run.metrics["best"] = entry
        student.save_pretrained(run.dir / "student")
        run.tokenizer.save_pretrained(run.dir / "student")
    run.save()
    tqdm.write(f"step {step}: student {fmt(entry['student'])} | teacher {fmt(entry['teacher'])}")


def finetune_teacher(teacher, train_loader, dev_loaders, task, args, device, run):
    """Stage 1 of the two-stage methods: fine-tune the teacher on the labels alone."""
    total = stage_steps(len(train_loader), args.teacher_epochs, args.max_steps)
    optimizer, scheduler = make_optimizer(teacher, args.finetune_lr, args.weight_decay, total, args.warmup_ratio)
    teacher.train()
    bar = tqdm(total=total, desc="stage 1: fine-tune teacher", dynamic_ncols=True)
    for step, batch in zip(range(1, total + 1), forever(train_loader)):
        batch = to_device(batch, device)
        with autocast(device, args.precision == "bf16"):
            logits = teacher(**model_inputs(batch)).logits
        loss = ground_truth_loss(upcast(logits), batch["labels"]).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        bar.update()
        if step % args.logging_steps == 0 or step == total:
            check_finite({"fine-tuning loss": loss.item()}, step,
                         f"a learning rate too high (--finetune-lr {args.finetune_lr})")
            bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.close()
    metrics, collapsed = evaluate(teacher, dev_loaders, task, device, args.precision == "bf16")
    run.note(f"fine-tuned teacher after {total} steps: {fmt(metrics)}")
    if collapsed is not None:
        run.note(f"the fine-tuned teacher predicts '{collapsed}' for every dev example", warning=True)
    run.metrics["teacher_finetuned"] = metrics
    teacher.save_pretrained(run.dir / "teacher_finetuned")
    run.tokenizer.save_pretrained(run.dir / "teacher_finetuned")


def step_options(args):
    """The command line's options for the steps: those every step takes, and those of the feedback methods."""
    common = dict(student_alpha=args.student_alpha, distill_loss=args.distill_loss, temperature=args.temperature,
                  bf16=args.precision == "bf16")
    return common, dict(influence=args.influence, fd_radius=args.fd_radius, lookahead=args.lookahead)


def step_function(teacher, student, teacher_optimizer, student_optimizer, args):
    """The step of --method with the command line's options: f(batch, feedback_batch) -> dict of tensors."""
    common, feedback = step_options(args)
    if args.method == "kd":
        return lambda batch, _: kd_step(teacher, student, student_optimizer, batch, **common)
    if args.method == "online":
        return lambda batch, _: online_step(teacher, student, teacher_optimizer, student_optimizer, batch,
                                            alpha=args.alpha, **common)
    if args.method == "meta":
        return lambda batch, fb: meta_step(teacher, student, teacher_optimizer, student_optimizer, batch, fb,
                                           teacher_max_grad_norm=args.teacher_max_grad_norm, **common, **feedback)
    return lambda batch, fb: lgtm_step(teacher, student, teacher_optimizer, student_optimizer, batch, fb,
                                       alpha=args.alpha, influence_weight=args.influence_weight, **common, **feedback)


def train_loop(teacher, student, train_loader, feedback_loader, dev_loaders, task, args, device, run):
    """Stage 2 (or the only stage): one step of --method per training batch, evaluating student and teacher every
    --eval-steps and at the end. Scalars are read from the GPU only every --logging-steps and at evaluations."""
    total = stage_steps(len(train_loader), args.epochs, args.max_steps)
    eval_every = args.eval_steps or len(train_loader)
    (opt_t, sched_t), (opt_s, sched_s) = (
        make_optimizer(m, lr, args.weight_decay, total, args.warmup_ratio)
        for m, lr in ((teacher, args.teacher_lr), (student, args.student_lr)))
    step_fn = step_function(teacher, student, opt_t, opt_s, args)
    schedulers = (sched_s,) if args.method == "kd" else (sched_t, sched_s)  # the kd teacher never steps
    feedback = forever(feedback_loader) if feedback_loader is not None else None
    common, feedback_options = step_options(args)
    ratio_options = dict(alpha=args.alpha, influence_weight=args.influence_weight, **common, **feedback_options)
    causes = f"a learning rate too high (--student-lr {args.student_lr:g}, --teacher-lr {args.teacher_lr:g})" + \
        (", or bf16 overflow (--precision bf16)" if args.precision == "bf16" else "")
    bar = tqdm(total=total, desc=args.method, dynamic_ncols=True)
    train_seconds, seen, pending, ratios = 0.0, 0, [], []

    def read(pending):  # one wait for the GPU for all the steps since the last read
        records = []
        for step, lr, rows, out, ratio in pending:
            record = {"step": step, "lr_student": lr, **{k: v.item() for k, v in out.items() if k != "w"}}
            if "w" in out:  # per-sample influences with the rows they belong to (figures 3 and 4)
                record.update(row=rows.tolist(), w=out["w"].tolist())
            if ratio is not None:
                record["influence_to_aux_grad_norm"] = ratio.item()
                ratios.append(record["influence_to_aux_grad_norm"])
            records.append(record)
        return records

    try:
        for step, batch in zip(range(1, total + 1), forever(train_loader)):
            started = time.perf_counter()
            rows, batch = batch["row"], to_device(batch, device)
            feedback_batch = to_device(next(feedback), device) if feedback else None
            ratio = influence_to_aux_grad_ratio(teacher, student, opt_s, batch, feedback_batch, **ratio_options) \
                if args.method == "lgtm" and step % args.logging_steps == 0 else None
            pending.append((step, opt_s.param_groups[0]["lr"], rows, step_fn(batch, feedback_batch), ratio))
            for scheduler in schedulers:
                scheduler.step()
            seen += len(rows)
            evaluating = step % eval_every == 0 or step == total
            if step % args.logging_steps == 0 or evaluating:
                records, pending = read(pending), []
                run.write(records)
                for record in records:
                    check_finite({k: v for k, v in record.items() if k.endswith("_loss")}, record["step"], causes)
            train_seconds += time.perf_counter() - started
            bar.update()
            if not pending:
                bar.set_postfix(loss_s=f"{records[-1]['student_loss']:.4f}", samples_s=f"{seen / train_seconds:.1f}")
            if evaluating:
                evaluate_both(step, teacher, student, dev_loaders, task, args, device, run,
                              {"epoch": round(step / len(train_loader), 3), "train_steps_per_s": step / train_seconds})
    except KeyboardInterrupt:
        run.write(read(pending))  # the steps finished since the last read
        raise
    bar.close()
    teacher.save_pretrained(run.dir / "teacher")  # the final teacher, for inspection (the paper reports it too)
    run.tokenizer.save_pretrained(run.dir / "teacher")
    run.metrics.update(steps=total, train_steps_per_s=total / train_seconds, train_samples_per_s=seen / train_seconds)
    if ratios:
        run.metrics["influence_to_aux_grad_norm"] = {"median": float(np.median(ratios)), "min": min(ratios),
                                                     "max": max(ratios), "n": len(ratios)}


# ==========================================================================================================
# 7. The command line
# ==========================================================================================================

def number(kind, low=None, high=None, low_open=False, high_open=False):
    """An argparse type: a finite int or float in a range, with argparse's one-line error otherwise."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        in_range = math.isfinite(value) and (low is None or (value > low if low_open else value >= low)) and \
            (high is None or (value < high if high_open else value <= high))
        if not in_range:
            lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
            hi = "" if high is None else f"{'<' if high_open else '<='} {high}"
            raise argparse.ArgumentTypeError(f"expected a finite number {' and '.join(x for x in (lo, hi) if x)}, "
                                             f"got {text!r}")
        return value
    parse.__name__ = kind.__name__
    return parse


POSITIVE, POSITIVE_INT = number(float, 0, low_open=True), number(int, 0, low_open=True)
FRACTION, NON_NEGATIVE = number(float, 0, 1), number(float, 0)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Knowledge distillation on GLUE with LGTM (ACL 2023) and the paper's comparison methods. "
        "Defaults follow the paper's appendix D and the authors' code.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--task", required=True, choices=list(TASKS), help="GLUE task")
    g.add_argument("--data-dir", type=Path, help="local GLUE copy instead of the Hub: DIR/RTE/train.tsv "
                   "(GLUE TSV layout) or DIR/rte/train-*.parquet (Hub parquet layout)")
    g.add_argument("--feedback-split", type=number(float, 0, 1, high_open=True), default=0.0,
                   help="hold out this fraction of train for every method (kd and online leave it unused); meta and "
                   "lgtm draw their feedback batches z^e from it (appendix E.1). 0: feedback from dev, as the paper")
    g.add_argument("--max-seq-length", type=POSITIVE_INT, default=128, help="at most the models' position limit")
    g.add_argument("--max-train-samples", type=POSITIVE_INT, help="keep only the first N training examples")
    g = p.add_argument_group("models")
    g.add_argument("--teacher", default="bert-base-uncased", help="Hub name or local directory")
    g.add_argument("--student", default="google/bert_uncased_L-6_H-768_A-12", help="Hub name or local directory")
    g.add_argument("--student-layers", type=POSITIVE_INT, help="keep only the first N transformer layers of the "
                   "student checkpoint (so one checkpoint can serve as teacher and as a smaller student)")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--precision", choices=("fp32", "tf32", "bf16"), help="of the ordinary passes: fp32, TF32 "
                   "matmuls (CUDA), or bf16 autocast over fp32 master weights. The influence passes always run in "
                   "strict fp32. Default: tf32 on CUDA, fp32 on CPU")
    g.add_argument("--compile", action="store_true", help="torch.compile teacher and student")
    g.add_argument("--verbose", action="store_true", help="show the libraries' own load reports and warnings")
    g = p.add_argument_group("method")
    g.add_argument("--method", choices=METHODS, default="lgtm", help="kd: vanilla two-stage distillation; "
                   "online: teacher and student trained together (eq. 3-4); meta: Meta Distill, the fine-tuned "
                   "teacher learns only from the student's held-out loss (eq. 6-7); lgtm: Algorithm 1")
    g.add_argument("--influence", choices=("fd", "exact"), default="fd", help="distillation influence by finite "
                   "differences (eq. 10) or exactly (forward-mode AD; the student then runs eager attention)")
    g.add_argument("--lookahead", choices=("sgd", "adamw"), default="sgd", help="look-ahead student step: sgd as "
                   "in Algorithm 1, whose teacher gradient is the exact meta-gradient; adamw takes v after one step "
                   "of the student's real AdamW (the authors' code) but keeps the SGD-form teacher term, which is "
                   "then a heuristic. Either way v comes from passes with dropout on, w from passes without")
    g.add_argument("--fd-radius", type=POSITIVE, default=0.01, help="finite-difference step eps = r / ||v||")
    g.add_argument("--influence-weight", type=NON_NEGATIVE, default=1.0, help="lgtm: multiply the influence term "
                   "by this. 1 is the derivation (and the paper); other values depart from it, to study the term")
    g.add_argument("--distill-loss", choices=("ce", "mse"), help="distillation loss D: soft cross-entropy "
                   "(default) or MSE between logits (table 2); stsb always uses mse")
    g.add_argument("--temperature", type=POSITIVE, default=1.0)
    g.add_argument("--alpha", type=FRACTION, default=0.6, help="teacher's weight on its ground-truth loss in L_aux "
                   "(eq. 11, table 7); 1 - alpha goes to distilling from the student")
    g.add_argument("--student-alpha", type=FRACTION, default=0.0, help="student's weight on its ground-truth loss "
                   "(eq. 1); the rest is distillation. 0 as in the authors' code (alpha_kd 1.0)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--student-lr", type=POSITIVE, default=5e-5, help="appendix D: one of 1e-4, 5e-5, 3e-5")
    g.add_argument("--teacher-lr", type=POSITIVE, help="teacher during distillation (default: 1e-5 for meta, "
                   "MetaDistil's; 3e-5 otherwise)")
    g.add_argument("--teacher-max-grad-norm", type=NON_NEGATIVE, help="meta: clip the teacher's gradient to this "
                   "norm (default 1.0, MetaDistil's); 0: no clipping")
    g.add_argument("--finetune-lr", type=POSITIVE, default=3e-5, help="kd and meta: stage 1, fine-tuning the teacher")
    g.add_argument("--batch-size", type=POSITIVE_INT, default=32, help="training and feedback batch size")
    g.add_argument("--eval-batch-size", type=POSITIVE_INT, default=128)
    g.add_argument("--epochs", type=POSITIVE, default=6, help="distillation epochs")
    g.add_argument("--teacher-epochs", type=NON_NEGATIVE, default=6, help="kd and meta: epochs of stage 1, "
                   "fine-tuning the teacher; 0 takes --teacher as already fine-tuned and skips that stage")
    g.add_argument("--max-steps", type=POSITIVE_INT, help="stop each training stage after this many steps")
    g.add_argument("--warmup-ratio", type=number(float, 0, 1, high_open=True), default=0.0)
    g.add_argument("--weight-decay", type=NON_NEGATIVE, default=0.0)
    g.add_argument("--seed", type=int, default=42)
    g = p.add_argument_group("run")
    g.add_argument("--output-dir", type=Path, default=Path("runs/lgtm"))
    g.add_argument("--overwrite", action="store_true", help="replace a run already in --output-dir (only once the "
                   "new run has loaded its data and models)")
    g.add_argument("--eval-steps", type=POSITIVE_INT, help="evaluate student and teacher every N steps (default: "
                   "every epoch) and at the end; the best student is saved")
    g.add_argument("--logging-steps", type=POSITIVE_INT, default=20, help="read the losses every N steps; lgtm also "
                   "logs ||influence gradient|| / ||aux gradient|| of the teacher (about one extra LGTM step)")
    g.add_argument("--predict", action="store_true", help="write GLUE-server TSVs for the test split with the "
                   "best student")
    args = p.parse_args(argv)
    if args.influence_weight != 1.0 and args.method != "lgtm":
        p.error("argument --influence-weight: applies to --method lgtm only")
    if args.teacher_max_grad_norm is not None and args.method != "meta":
        p.error("argument --teacher-max-grad-norm: applies to --method meta only")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        p.error(f"argument --device: {args.device!r} is not a torch device (cpu, cuda, cuda:1, ...)")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("argument --device: cuda, but torch sees no CUDA device: pass --device cpu")
    if args.precision is None:
        args.precision = "tf32" if device.type == "cuda" else "fp32"
    if args.precision == "tf32" and device.type != "cuda":
        p.error("argument --precision: tf32 needs a CUDA device; use fp32 or bf16")
    args.defaults = []  # method-aware defaults, printed at the start of the run. Where the LGTM paper is silent,
    if args.teacher_lr is None:  # meta follows MetaDistil's published recipe
        args.teacher_lr = 1e-5 if args.method == "meta" else 3e-5
        args.defaults.append(f"--teacher-lr {args.teacher_lr:g} " +
                             ("(MetaDistil's teacher learning rate)" if args.method == "meta" else "(appendix D)"))
    if args.method == "meta" and args.teacher_max_grad_norm is None:
        args.teacher_max_grad_norm = 1.0
        args.defaults.append("--teacher-max-grad-norm 1 (MetaDistil's clipping of the teacher)")
    return args


RUN_FILES = ("metrics.json", "train_log.jsonl", "student", "teacher", "teacher_finetuned", "predictions")


def check_output_dir(out_dir, overwrite):
    """Before any loading: the output path must be a writable folder (or creatable), without a run unless
    --overwrite. Nothing is removed here."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--output-dir {out_dir} is a file, not a folder: choose another --output-dir")
    existing = [name for name in RUN_FILES if (out_dir / name).exists()]
    if existing and not overwrite:
        raise UserError(f"--output-dir {out_dir} already holds a run ({', '.join(existing)}): pass --overwrite "
                        f"to replace it, or choose another --output-dir")
    parent = next(p for p in [out_dir, *out_dir.absolute().parents] if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"--output-dir {out_dir} cannot be written ({parent} is not a writable folder): choose "
                        f"another --output-dir")


def replace_old_run(out_dir):
    """Called once the new run has loaded its data and models: a failed start leaves the old run as it was."""
    for name in RUN_FILES:
        path = out_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)


def quiet_libraries(verbose):
    """The libraries' load reports (e.g. UNEXPECTED encoder.layer.3 for --student-layers 3) become our one line
    per model; --verbose shows them."""
    import transformers
    if not verbose:
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        with contextlib.suppress(ImportError):  # datasets is needed only for the Hub and the parquet layout
            import datasets
            datasets.logging.set_verbosity_error()
            datasets.disable_progress_bars()


def run_experiment(args):
    from transformers import set_seed
    task = TASKS[args.task]
    if task.is_regression and args.distill_loss == "ce":
        raise UserError("--distill-loss ce needs class probabilities; stsb is a regression task: use mse")
    args.distill_loss = args.distill_loss or ("mse" if task.is_regression else "ce")
    device = torch.device(args.device)
    check_output_dir(args.output_dir, args.overwrite)
    for flag, name in (("--teacher", args.teacher), ("--student", args.student)):
        if is_local(name):
            check_model_dir(name, flag)
    check_hub_access([(flag, name) for flag, name in (("--teacher", args.teacher), ("--student", args.student))
                      if not is_local(name)] + ([("--data-dir", task.glue_dir)] if args.data_dir is None else []))
    quiet_libraries(args.verbose)
    torch.set_float32_matmul_precision("high" if args.precision != "fp32" and device.type == "cuda" else "highest")
    set_seed(args.seed)

    # Data. --feedback-split holds the same examples out of every method's training set.
    splits = ("train",) + task.dev_splits + (task.test_splits if args.predict else ())
    data = load_glue(task, args.data_dir, splits)
    train = data["train"]
    if args.max_train_samples:
        train = train.select(range(min(args.max_train_samples, len(train))))
    uses_feedback = args.method in ("meta", "lgtm")
    if args.feedback_split:
        train, feedback = split_feedback(train, args.feedback_split, args.seed)
        feedback_note = f"{len(feedback)} examples held out of train (--feedback-split {args.feedback_split}) " + \
            ("feed back to the teacher" if uses_feedback else f"are left unused by {args.method}, so that every "
             f"method trains on the same {len(train)} examples")
    else:
        feedback = data[task.dev_splits[0]]
        feedback_note = f"feedback batches z^e come from the dev set ({len(feedback)} examples), as in the paper; " \
                        f"dev scores are then not held out" if uses_feedback else None

    # Models: float32 master weights; forward-mode AD (exact influence) needs eager attention in the student.
    tokenizer = load_tokenizer(args.teacher, args.student)
    num_labels = 1 if task.is_regression else len(task.labels)
    teacher, teacher_line = load_model(args.teacher, "--teacher", num_labels)
    student, student_line = load_model(args.student, "--student", num_labels, args.student_layers,
                                       "eager" if args.influence == "exact" and uses_feedback else "sdpa")
    limit = min(m.config.max_position_embeddings for m in (teacher, student))
    if args.max_seq_length > limit:
        raise UserError(f"--max-seq-length {args.max_seq_length}: the models have {limit} positions; pass "
                        f"--max-seq-length {limit} or less")
    encode = lambda ex: tokenize(ex, tokenizer, args.max_seq_length)
    pad = tokenizer.pad_token_id or 0
    train_loader = make_loader(encode(train), args.batch_size, pad, shuffle=True, seed=args.seed)
    feedback_loader = make_loader(encode(feedback), args.batch_size, pad, True, args.seed + 1) \
        if uses_feedback else None
    dev_loaders = {s: (make_loader(encode(data[s]), args.eval_batch_size, pad, False), data[s].label)
                   for s in task.dev_splits}
    teacher, student = teacher.to(device), student.to(device)
    if args.compile:
        teacher.compile()
        student.compile()

    # Everything has loaded: only now may an old run in --output-dir go.
    replace_old_run(args.output_dir)
    run = Run(args.output_dir, args, tokenizer)
    run.note(f"task {task.name}: {len(train)} training examples, method {args.method}"
             + (f", influence {args.influence}, look-ahead {args.lookahead}" if uses_feedback else "")
             + f", device {device}, precision {args.precision}" + (", compiled" if args.compile else ""))
    for line in (teacher_line, student_line):
        run.note(line)
    if args.defaults:
        run.note(f"defaults for --method {args.method}: " + ", ".join(args.defaults))
    if feedback_note:
        run.note(feedback_note)
    run.save()

    try:
        if args.method in ("kd", "meta") and args.teacher_epochs > 0:
            finetune_teacher(teacher, train_loader, dev_loaders, task, args, device, run)
        elif args.method in ("kd", "meta"):
            run.note(f"--teacher-epochs 0: {args.teacher} is taken as already fine-tuned on {task.name}")
        else:
            zero_classifier(teacher)
            zero_classifier(student)
        train_loop(teacher, student, train_loader, feedback_loader, dev_loaders, task, args, device, run)
    except (NonFiniteLoss, KeyboardInterrupt) as e:
        stopped = "interrupted" if isinstance(e, KeyboardInterrupt) else f"stopped: {e}"
        run.save(status=stopped)
        best = run.metrics["best"]
        kept = f"the best student so far (step {best['step']}) is in {args.output_dir / 'student'}" if best else \
            "no student was saved (no evaluation had finished)"
        raise UserError(f"{stopped}. {args.output_dir}/metrics.json keeps the history; {kept}") from None
    finally:
        run.log.close()
    if args.predict:
        from transformers import AutoModelForSequenceClassification
        best = AutoModelForSequenceClassification.from_pretrained(args.output_dir / "student", dtype=torch.float32)
        test_loaders = {s: (make_loader(encode(data[s]), args.eval_batch_size, pad, False), data[s].index)
                        for s in task.test_splits}
        for path in write_predictions(best.to(device), task, test_loaders, device, args.output_dir / "predictions"):
            run.note(f"wrote {path}")
    run.save(status="finished")
    best = run.metrics["best"]
    tqdm.write(f"best student (step {best['step']}): {fmt(best['student'])}; teacher then: {fmt(best['teacher'])}")
    return run.metrics


def main(argv=None):
    args = parse_args(argv)
    try:
        return run_experiment(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
