"""Tests for lgtm.py: every approximation is checked against an independent exact computation (autograd
through the unrolled step, double backward, per-sample gradient loops) on tiny random BERTs in float64.

    python -m pytest -q test_lgtm.py
"""

import copy
import csv
import json
import math
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call
from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

import lgtm

GLUE = Path(os.environ.get("GLUE_DIR", Path(__file__).resolve().parent.parent / "shared" / "glue"))
NUM_LABELS = 3


# ----------------------------------------------------------------------------------------------------------
# Fixtures: tiny BERTs with realistically sized logits, and batches with padding
# ----------------------------------------------------------------------------------------------------------

def tiny_bert(seed, layers=2, dropout=0.0, dtype=torch.float64, num_labels=NUM_LABELS, attention="eager"):
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32, num_labels=num_labels,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
                        attn_implementation=attention)
    model = BertForSequenceClassification(config).to(dtype)
    with torch.no_grad():  # logits of a few units, as in a trained model (|logits| >> 1 stresses the FD)
        model.classifier.weight.normal_(0, 2.0)
    return model


def random_batch(seed, size=6, length=10, num_labels=NUM_LABELS):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 60, (size, length), generator=g)
    mask = torch.ones(size, length, dtype=torch.long)
    for i in range(size):  # ragged lengths: padding must not leak into the math
        mask[i, length - i // 2:] = 0
    ids = ids * mask
    return {"input_ids": ids, "token_type_ids": torch.zeros_like(ids), "attention_mask": mask,
            "labels": torch.randint(0, num_labels, (size,), generator=g), "row": torch.arange(size)}


def make_args(**overrides):
    args = dict(distill_loss="ce", temperature=2.0, alpha=0.6, student_alpha=0.3, lookahead="sgd",
                influence="exact", fd_radius=0.01, bf16=False)
    args.update(overrides)
    return SimpleNamespace(**args)


def soft_ce(pred, target, temperature):
    """Independent of lgtm.distillation_loss: the KL form, which differs from soft CE by -H(target), a term
    with no gradient in `pred`; used only where that term cannot matter (student-side gradients)."""
    p = F.softmax(target / temperature, -1)
    return (p * (torch.log(p) - F.log_softmax(pred / temperature, -1))).sum(-1) * temperature ** 2


def inputs_of(batch):
    return {k: batch[k] for k in ("input_ids", "token_type_ids", "attention_mask")}


def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def cosine(a, b):
    return float(F.cosine_similarity(flat(a), flat(b), dim=0))


@pytest.fixture
def setup():
    teacher, student = tiny_bert(0, layers=3), tiny_bert(1, layers=2)
    batch, feedback = random_batch(10), random_batch(11, size=5)
    v = [torch.randn_like(p) for p in student.parameters()]
    return teacher, student, batch, feedback, v


def exact_reference(teacher, student, batch, v, temperature=2.0):
    """w_i by a loop of per-sample gradients, and grad_θt mean_i w_i by double backward through the student."""
    t_logits = teacher(**inputs_of(batch)).logits
    params = list(student.parameters())
    s_logits = student(**inputs_of(batch)).logits
    losses = soft_ce(s_logits, t_logits, temperature)
    w = torch.stack([flat(torch.autograd.grad(losses[i], params, retain_graph=True)) @ flat(v)
                     for i in range(len(losses))])
    g = torch.autograd.grad(losses.mean(), params, create_graph=True)
    teacher_grad = torch.autograd.grad(sum((gi * vi).sum() for gi, vi in zip(g, v)), list(teacher.parameters()))
    return w.detach(), teacher_grad


def influence_and_teacher_grad(fn, teacher, student, batch, v, **kw):
    distill = lambda pred, target: lgtm.distillation_loss(pred, target, "ce", 2.0)
    t_logits = teacher(**inputs_of(batch)).logits
    w = fn(student, v, inputs_of(batch), t_logits, distill, **kw)
    return w.detach(), torch.autograd.grad(w.mean(), list(teacher.parameters()))


# ----------------------------------------------------------------------------------------------------------
# Distillation influence: finite differences (eq. 10) and the exact path against autograd
# ----------------------------------------------------------------------------------------------------------

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
    assert float(F.cosine_similarity(w, w_ref, dim=0)) > 0.9999
    assert (w - w_ref).norm() / w_ref.norm() < 1e-4
    assert (w.sign() == w_ref.sign()).all()
    assert cosine(g, g_ref) > 0.9999
    assert (flat(g) - flat(g_ref)).norm() / flat(g_ref).norm() < 1e-4


def test_fd_error_shrinks_like_eps_squared(setup):
    teacher, student, batch, _, v = setup
    _, g_ref = exact_reference(teacher, student, batch, v)
    radii = [0.4, 0.2, 0.1, 0.05, 0.025]
    errors = []
    for r in radii:
        _, g = influence_and_teacher_grad(lgtm.influence_fd, teacher, student, batch, v, radius=r)
        errors.append(float((flat(g) - flat(g_ref)).norm() / flat(g_ref).norm()))
    slopes = [math.log(errors[i] / errors[i + 1]) / math.log(radii[i] / radii[i + 1]) for i in range(len(radii) - 1)]
    assert all(1.8 < s < 2.2 for s in slopes), (errors, slopes)
    # ... until round-off: in float64 a tiny step is still accurate; in float32 it is worse than a moderate one.
    _, g_tiny = influence_and_teacher_grad(lgtm.influence_fd, teacher, student, batch, v, radius=1e-5)
    assert (flat(g_tiny) - flat(g_ref)).norm() / flat(g_ref).norm() < 1e-7
    teacher32, student32, v32 = teacher.float(), student.float(), [t.float() for t in v]
    err32 = {}
    for r in (1e-2, 1e-6):
        _, g = influence_and_teacher_grad(lgtm.influence_fd, teacher32, student32, batch, v32, radius=r)
        err32[r] = float((flat(g).double() - flat(g_ref)).norm() / flat(g_ref).norm())
    assert err32[1e-6] > 10 * err32[1e-2], err32


def test_influence_passes_keep_full_precision_under_bf16_autocast(setup):
    """Under bf16 autocast the teacher runs in bf16, but the influence passes stay in fp32: FD still matches the
    exact influences for the same teacher logits. The same two passes left to autocast lose the difference."""
    teacher, student, batch, _, v = setup
    teacher, student, v = teacher.float(), student.float(), [t.float() for t in v]
    distill = lambda pred, target: lgtm.distillation_loss(pred, target, "ce", 2.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        t_logits = teacher(**inputs_of(batch)).logits
        w_fd = lgtm.influence_fd(student, v, inputs_of(batch), t_logits, distill, radius=1e-2)
        w_exact = lgtm.influence_exact(student, v, inputs_of(batch), t_logits, distill)
        assert t_logits.dtype == torch.bfloat16 and w_fd.dtype == w_exact.dtype == torch.float32
        eps = 1e-2 / flat(v).norm()
        names, params = zip(*student.named_parameters())
        with torch.no_grad():  # the unguarded passes, for contrast
            plus, minus = (functional_call(student, {n: p + sign * eps * d for n, p, d in zip(names, params, v)},
                                           args=(), kwargs=inputs_of(batch)).logits.float() for sign in (1, -1))
        w_bf16 = (distill(plus, t_logits.float()) - distill(minus, t_logits.float())) / (2 * eps)
    relative_error = lambda w: float((w - w_exact).norm() / w_exact.norm())
    assert relative_error(w_fd) < 1e-3
    assert relative_error(w_bf16) > 30 * relative_error(w_fd), (relative_error(w_bf16), relative_error(w_fd))


def test_fd_leaves_student_untouched_and_runs_without_dropout():
    teacher, student = tiny_bert(0), tiny_bert(1, dropout=0.3)
    batch = random_batch(3)
    student.train()
    before = [p.detach().clone() for p in student.parameters()]
    for p in student.parameters():
        p.grad = torch.full_like(p, 7.0)
    modes = []
    hook = student.register_forward_pre_hook(lambda m, a, k: modes.append(m.training), with_kwargs=True)
    v = [torch.randn_like(p) for p in student.parameters()]
    distill = lambda pred, target: lgtm.distillation_loss(pred, target)
    t_logits = teacher(**inputs_of(batch)).logits
    w1 = lgtm.influence_fd(student, v, inputs_of(batch), t_logits, distill)
    w2 = lgtm.influence_fd(student, v, inputs_of(batch), t_logits, distill)
    hook.remove()
    assert modes == [False] * 4, "the perturbed passes must run with dropout off"
    assert student.training, "the student's mode must be restored"
    torch.testing.assert_close(w1, w2, rtol=0, atol=0)  # no dropout noise in the difference
    for p, b in zip(student.parameters(), before):
        assert torch.equal(p, b), "θs must come back bit for bit"
        assert torch.equal(p.grad, torch.full_like(p, 7.0))


# ----------------------------------------------------------------------------------------------------------
# The sign: the teacher's influence term must lower the student's look-ahead held-out loss
# ----------------------------------------------------------------------------------------------------------

def unrolled_validation_loss(teacher, student, batch, feedback, lr, student_alpha, temperature=2.0):
    """L_val(θs'(θt)) with θs' = θs - lr grad_θs L_s(θs, θt), differentiable in θt (autograd through the step)."""
    names, params = zip(*student.named_parameters())
    t_logits = teacher(**inputs_of(batch)).logits
    s_logits = student(**inputs_of(batch)).logits
    loss_s = (student_alpha * F.cross_entropy(s_logits, batch["labels"], reduction="none")
              + (1 - student_alpha) * soft_ce(s_logits, t_logits, temperature)).mean()
    grads = torch.autograd.grad(loss_s, params, create_graph=True)
    theta_next = {n: p - lr * g for n, p, g in zip(names, params, grads)}
    logits = functional_call(student, theta_next, args=(), kwargs=inputs_of(feedback)).logits
    return F.cross_entropy(logits, feedback["labels"])


@pytest.mark.parametrize("influence", ["fd", "exact"])
def test_influence_term_descends_the_unrolled_validation_loss(setup, influence):
    teacher, student, batch, feedback, _ = setup
    lr, student_alpha = 0.5, 0.3
    args = make_args(student_alpha=student_alpha)
    # The code under test: look-ahead, feedback gradient v, influence, the teacher's influence objective.
    params = list(student.parameters())
    t_logits = teacher(**inputs_of(batch)).logits
    loss_s = lgtm.student_loss(student(**inputs_of(batch)).logits, t_logits, batch["labels"], args)
    grads = torch.autograd.grad(loss_s, params)
    optimizer = torch.optim.SGD(params, lr=lr)
    theta_next = lgtm.lookahead_params(student, grads, optimizer, "sgd")
    v, _ = lgtm.feedback_gradient(student, theta_next, feedback)
    distill = lambda pred, target: lgtm.distillation_loss(pred, target, "ce", 2.0)
    fn = lgtm.influence_fd if influence == "fd" else lgtm.influence_exact
    w = fn(student, v, inputs_of(batch), t_logits, distill)
    objective = lgtm.influence_objective(w, lr, student_alpha)
    g_influence = torch.autograd.grad(objective, list(teacher.parameters()))

    # Independent: the meta-gradient by autograd through the unrolled step. Equal up to the FD error.
    meta = torch.autograd.grad(unrolled_validation_loss(teacher, student, batch, feedback, lr, student_alpha),
                               list(teacher.parameters()))
    assert cosine(g_influence, meta) > 0.9999
    assert abs(flat(g_influence).norm() / flat(meta).norm() - 1) < 1e-3

    base = unrolled_validation_loss(teacher, student, batch, feedback, lr, student_alpha).item()
    for direction, expect_lower in ((-1.0, True), (+1.0, False)):
        moved = copy.deepcopy(teacher)
        step = 1e-2 / flat(g_influence).norm()
        with torch.no_grad():
            for p, g in zip(moved.parameters(), g_influence):
                p.add_(g, alpha=direction * step)
        loss = unrolled_validation_loss(moved, student, batch, feedback, lr, student_alpha).item()
        assert (loss < base) == expect_lower, (direction, base, loss)


# ----------------------------------------------------------------------------------------------------------
# The look-ahead step
# ----------------------------------------------------------------------------------------------------------

def test_lookahead_equals_the_real_optimizer_step_and_leaves_it_untouched():
    student = tiny_bert(2)
    batch = random_batch(4)
    optimizer, scheduler = lgtm.make_optimizer(student, 1e-2, 0.01, 10, 0.0)
    for _ in range(2):  # give AdamW a state to continue from
        optimizer.zero_grad()
        F.cross_entropy(student(**inputs_of(batch)).logits, batch["labels"]).backward()
        optimizer.step()
        scheduler.step()
    for p in student.parameters():
        p.grad = torch.full_like(p, 3.0)
    grads = torch.autograd.grad(F.cross_entropy(student(**inputs_of(batch)).logits, batch["labels"]),
                                list(student.parameters()))
    params_before = [p.detach().clone() for p in student.parameters()]
    state_before = copy.deepcopy(optimizer.state_dict())

    adamw = lgtm.lookahead_params(student, grads, optimizer, "adamw")
    sgd = lgtm.lookahead_params(student, grads, optimizer, "sgd")

    lr = optimizer.param_groups[0]["lr"]
    for (name, p), g in zip(student.named_parameters(), grads):
        torch.testing.assert_close(sgd[name], p.detach() - lr * g, rtol=0, atol=0)
    # Untouched: parameters, their .grad, the optimizer's state and step counts.
    for p, b in zip(student.parameters(), params_before):
        assert torch.equal(p, b) and torch.equal(p.grad, torch.full_like(p, 3.0))
    state_after = optimizer.state_dict()
    for key, st in state_before["state"].items():
        for k, t in st.items():
            assert torch.equal(torch.as_tensor(state_after["state"][key][k]), torch.as_tensor(t))
    # The real step, on a copy: the look-ahead must land exactly there.
    real_student = copy.deepcopy(student)
    real_opt, _ = lgtm.make_optimizer(real_student, 1e-2, 0.01, 10, 0.0)
    real_opt.load_state_dict(optimizer.state_dict())
    for p, g in zip(real_student.parameters(), grads):
        p.grad = g.clone()
    real_opt.step()
    for name, p in real_student.named_parameters():
        torch.testing.assert_close(adamw[name], p.detach(), rtol=1e-12, atol=1e-15)
    assert not torch.equal(adamw["classifier.weight"], sgd["classifier.weight"])


# ----------------------------------------------------------------------------------------------------------
# One step of each method
# ----------------------------------------------------------------------------------------------------------

def make_pair(dropout=0.0):
    teacher, student = tiny_bert(5, layers=3, dropout=dropout), tiny_bert(6, layers=2, dropout=dropout)
    optimizers = (lgtm.make_optimizer(teacher, 1e-3, 0.0, 10, 0.0), lgtm.make_optimizer(student, 1e-2, 0.0, 10, 0.0))
    return teacher, student, optimizers


def snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


def test_kd_never_changes_or_trains_the_teacher():
    teacher, student, optimizers = make_pair(dropout=0.1)
    t0, s0 = snapshot(teacher), snapshot(student)
    modes = []
    teacher.register_forward_pre_hook(lambda m, a, k: modes.append(m.training), with_kwargs=True)
    out = lgtm.train_step("kd", teacher, student, optimizers, random_batch(1), None, make_args())
    assert all(torch.equal(a, b) for a, b in zip(snapshot(teacher), t0))
    assert all(p.grad is None for p in teacher.parameters())
    assert not any(torch.equal(a, b) for a, b in list(zip(snapshot(student), s0))[-2:])
    assert modes == [False], "a frozen teacher runs once, without dropout"
    assert "w" not in out and "teacher_loss" not in out


def adamw_update(model, grads, lr):
    """Expected parameters after one fresh AdamW step (independent of torch's implementation)."""
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    return [p.detach() - lr * ((1 - beta1) * g / (1 - beta1)) / (((1 - beta2) * g * g / (1 - beta2)).sqrt() + eps)
            for p, g in zip(model.parameters(), grads)]


def test_online_updates_the_teacher_first_then_distils_from_it():
    teacher, student, optimizers = make_pair()
    batch, args = random_batch(2), make_args()
    ref_teacher, ref_student = copy.deepcopy(teacher), copy.deepcopy(student)
    lgtm.train_step("online", teacher, student, optimizers, batch, None, args)

    # Reference, by hand: eq. 3 for the teacher, then eq. 1 for the student against the UPDATED teacher.
    x, y = inputs_of(batch), batch["labels"]
    s_logits = ref_student(**x).logits
    t_logits = ref_teacher(**x).logits
    aux = (args.alpha * F.cross_entropy(t_logits, y, reduction="none")
           + (1 - args.alpha) * soft_ce(t_logits, s_logits.detach(), args.temperature)).mean()
    new_teacher = adamw_update(ref_teacher, torch.autograd.grad(aux, list(ref_teacher.parameters())), 1e-3)
    for a, b in zip(teacher.parameters(), new_teacher):
        torch.testing.assert_close(a.detach(), b, rtol=1e-9, atol=1e-12)
    with torch.no_grad():
        t_new = functional_call(ref_teacher, dict(zip([n for n, _ in ref_teacher.named_parameters()], new_teacher)),
                                args=(), kwargs=x).logits
    loss_s = (args.student_alpha * F.cross_entropy(s_logits, y, reduction="none")
              + (1 - args.student_alpha) * soft_ce(s_logits, t_new, args.temperature)).mean()
    new_student = adamw_update(ref_student, torch.autograd.grad(loss_s, list(ref_student.parameters())), 1e-2)
    for a, b in zip(student.parameters(), new_student):
        torch.testing.assert_close(a.detach(), b, rtol=1e-9, atol=1e-12)


def test_meta_teacher_learns_only_from_the_student_and_student_uses_the_old_teacher():
    args = make_args(student_alpha=0.0)
    batch, feedback = random_batch(3), random_batch(4, size=5)
    relabelled = dict(batch, labels=(batch["labels"] + 1) % NUM_LABELS)
    results = []
    for b in (batch, relabelled):
        teacher, student, optimizers = make_pair()
        ref_teacher, ref_student = copy.deepcopy(teacher), copy.deepcopy(student)
        lgtm.train_step("meta", teacher, student, optimizers, b, feedback, args)
        results.append(([p.grad.clone() for p in teacher.parameters()], snapshot(student)))
    # The teacher's gradient ignores the training labels: no ground-truth loss in eq. 7 ...
    for a, b in zip(results[0][0], results[1][0]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # ... and it is the exact meta-gradient of eq. 7 (autograd through the unrolled SGD step).
    lr = 1e-2
    meta = torch.autograd.grad(unrolled_validation_loss(ref_teacher, ref_student, batch, feedback, lr, 0.0),
                               list(ref_teacher.parameters()))
    assert cosine(results[0][0], meta) > 1 - 1e-9
    torch.testing.assert_close(flat(results[0][0]), flat(meta), rtol=1e-7, atol=1e-12)
    # The student distils from the teacher as it was before this step (eq. 6).
    x = inputs_of(batch)
    with torch.no_grad():
        t_old = ref_teacher(**x).logits
    loss_s = soft_ce(ref_student(**x).logits, t_old, args.temperature).mean()
    expected = adamw_update(ref_student, torch.autograd.grad(loss_s, list(ref_student.parameters())), lr)
    for a, b in zip(results[0][1], expected):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("influence", ["fd", "exact"])
def test_lgtm_teacher_gradient_is_aux_plus_influence_and_student_uses_new_teacher(influence):
    teacher, student, optimizers = make_pair()
    args = make_args(influence=influence, fd_radius=1e-4)  # float64: a small step keeps the FD error ~1e-8
    batch, feedback = random_batch(5), random_batch(6, size=5)
    ref_teacher, ref_student = copy.deepcopy(teacher), copy.deepcopy(student)
    out = lgtm.train_step("lgtm", teacher, student, optimizers, batch, feedback, args, log_ratio=True)

    x, y, lr_s = inputs_of(batch), batch["labels"], 1e-2
    t_logits, s_logits = ref_teacher(**x).logits, ref_student(**x).logits
    aux = (args.alpha * F.cross_entropy(t_logits, y, reduction="none")
           + (1 - args.alpha) * soft_ce(t_logits, s_logits.detach(), args.temperature)).mean()
    g_aux = torch.autograd.grad(aux, list(ref_teacher.parameters()))
    g_meta = torch.autograd.grad(
        unrolled_validation_loss(ref_teacher, ref_student, batch, feedback, lr_s, args.student_alpha),
        list(ref_teacher.parameters()))
    expected = [a + m for a, m in zip(g_aux, g_meta)]
    got = [p.grad for p in teacher.parameters()]
    tol = 1e-9 if influence == "exact" else 1e-6
    assert (flat(got) - flat(expected)).norm() / flat(expected).norm() < tol
    ratio = flat(g_meta).norm() / flat(g_aux).norm()
    assert abs(out["influence_to_aux_grad_norm"] / ratio - 1) < 1e-3
    assert out["w"].shape == (len(y),)
    # The student distils from the updated teacher (teacher first, appendix F.2).
    with torch.no_grad():
        t_new = teacher(**x).logits
    loss_s = (args.student_alpha * F.cross_entropy(s_logits, y, reduction="none")
              + (1 - args.student_alpha) * soft_ce(s_logits, t_new, args.temperature)).mean()
    g_s = torch.autograd.grad(loss_s, list(ref_student.parameters()))
    for a, b in zip(student.parameters(), g_s):
        torch.testing.assert_close(a.grad, b, rtol=1e-9, atol=1e-12)


def test_lgtm_step_makes_the_minimal_passes():
    teacher, student, optimizers = make_pair(dropout=0.1)
    calls = {"teacher": [], "student": []}
    teacher.register_forward_pre_hook(lambda m, a, k: calls["teacher"].append(m.training), with_kwargs=True)
    student.register_forward_pre_hook(lambda m, a, k: calls["student"].append(m.training), with_kwargs=True)
    backward = {"teacher": 0, "student": 0}
    teacher.classifier.weight.register_hook(lambda g: backward.__setitem__("teacher", backward["teacher"] + 1))
    student.classifier.weight.register_hook(lambda g: backward.__setitem__("student", backward["student"] + 1))
    lgtm.train_step("lgtm", teacher, student, optimizers, random_batch(7), random_batch(8), make_args(influence="fd"))
    # Teacher: one forward with grad (aux + influence), one without (targets for the student), one backward.
    assert calls["teacher"] == [True, True] and backward["teacher"] == 1
    # Student: z^r at θs (train), z^e at θs' (train), θs+ and θs- (dropout off); two backwards through θs.
    assert calls["student"] == [True, True, False, False] and backward["student"] == 2


# ----------------------------------------------------------------------------------------------------------
# Data and metrics
# ----------------------------------------------------------------------------------------------------------

def test_reads_every_shared_glue_task_with_its_counts():
    counts = {"rte": (2490, 277, "entailment"), "mrpc": (3668, 408, "1"), "sst2": (67349, 872, "1"),
              "cola": (8551, 1043, "1"), "stsb": (5749, 1500, None)}
    assert GLUE.is_dir(), f"GLUE data not found at {GLUE}: set GLUE_DIR"
    for name, (n_train, n_dev, first_label) in counts.items():
        task = lgtm.TASKS[name]
        data = lgtm.load_glue(task, GLUE, ("train", "validation", "test"))
        assert (len(data["train"]), len(data["validation"])) == (n_train, n_dev)
        assert all(y == -1 for y in data["test"].label)
        if first_label is not None:
            assert set(data["train"].label) == set(range(len(task.labels)))
    mrpc = lgtm.load_glue(lgtm.TASKS["mrpc"], GLUE, ("train",))["train"]
    assert mrpc.text_b is not None and sum(mrpc.label) == 2474  # BOM handled, label column found
    stsb = lgtm.load_glue(lgtm.TASKS["stsb"], GLUE, ("validation",))["validation"]
    assert abs(sum(stsb.label) / len(stsb) - 2.364) < 1e-3


def test_metrics_against_hand_computed_values():
    mrpc = lgtm.TASKS["mrpc"]
    logits = torch.tensor([[0, 1], [0, 1], [1, 0], [1, 0], [0, 1]], dtype=torch.float).numpy()
    labels = [1, 0, 0, 1, 1]  # tp 2, fp 1, fn 1, tn 1
    m = lgtm.compute_metrics(mrpc, logits, labels)
    assert m == {"f1": pytest.approx(2 * 2 / (2 * 2 + 1 + 1)), "accuracy": pytest.approx(3 / 5)}
    cola = lgtm.compute_metrics(lgtm.TASKS["cola"], logits, labels)
    assert cola["matthews"] == pytest.approx((2 * 1 - 1 * 1) / math.sqrt(3 * 3 * 2 * 2))
    pred = torch.tensor([[1.0], [2.0], [2.0], [4.0]]).numpy()
    stsb = lgtm.compute_metrics(lgtm.TASKS["stsb"], pred, [1.0, 3.0, 2.0, 5.0])
    # Spearman with ties: ranks (0, 1.5, 1.5, 3) vs (0, 2, 1, 3), by hand.
    a, b = torch.tensor([0, 1.5, 1.5, 3]), torch.tensor([0.0, 2, 1, 3])
    expected = float(((a - a.mean()) @ (b - b.mean())) / ((a - a.mean()).norm() * (b - b.mean()).norm()))
    assert stsb["spearman"] == pytest.approx(expected)


# ----------------------------------------------------------------------------------------------------------
# The command line, end to end on a tiny local model and a slice of real RTE
# ----------------------------------------------------------------------------------------------------------

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list("abcdefghijklmnopqrstuvwxyz0123456789.,'\"-()%$")
VOCAB += ["##" + c for c in "abcdefghijklmnopqrstuvwxyz0123456789"]


def save_tiny_model(path, vocab=VOCAB, layers=2):
    path.mkdir(parents=True)
    tokenizer = BertTokenizer(vocab={token: i for i, token in enumerate(vocab)}, do_lower_case=True)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64, num_labels=2)
    BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_tsv(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        csv.writer(f, delimiter="\t", quoting=csv.QUOTE_NONE, quotechar=None, lineterminator="\n").writerows(rows)


def rte_slice(root, n_train=48, n_dev=24, n_test=12):
    assert (GLUE / "RTE").is_dir(), f"RTE not found under {GLUE}: set GLUE_DIR"
    for name, n in (("train", n_train), ("dev", n_dev), ("test", n_test)):
        with open(GLUE / "RTE" / f"{name}.tsv", encoding="utf-8") as f:
            rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[: n + 1]
        write_tsv(root / "RTE" / f"{name}.tsv", rows)
    return root


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return SimpleNamespace(root=root, model=save_tiny_model(root / "model", layers=3), data=rte_slice(root / "glue"))


def cli(env, out, *extra, method="lgtm"):
    return ["--task", "rte", "--data-dir", str(env.data), "--teacher", str(env.model), "--student", str(env.model),
            "--student-layers", "2", "--method", method, "--output-dir", str(out), "--batch-size", "8",
            "--max-seq-length", "48", "--max-steps", "4", "--eval-steps", "2", "--logging-steps", "2",
            "--teacher-epochs", "1", "--device", "cpu", *extra]


def run_main_error(argv):
    with pytest.raises(SystemExit) as e:
        lgtm.main(argv)
    return str(e.value.code)


@pytest.mark.parametrize("method,extra", [("lgtm", ["--predict"]), ("lgtm", ["--influence", "exact",
                         "--lookahead", "adamw", "--feedback-split", "0.25"]), ("kd", []), ("online", []),
                         ("meta", ["--distill-loss", "mse"]), ("lgtm", ["--bf16"])])
def test_cli_end_to_end(cli_env, tmp_path, method, extra):
    out = tmp_path / "run"
    metrics = lgtm.main(cli(cli_env, out, *extra, method=method))
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["status"] == "finished" and saved == json.loads(json.dumps(metrics, default=str))
    assert [h["step"] for h in saved["history"]] == [2, 4]
    assert {"score", "accuracy"} <= set(saved["best"]["student"]) and "accuracy" in saved["best"]["teacher"]
    assert (out / "student" / "config.json").is_file() and (out / "student" / "tokenizer.json").is_file()
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    if method in ("meta", "lgtm"):
        assert all(len(r["w"]) == len(r["row"]) == 8 for r in log)
        assert any("feedback set z^e" in n for n in saved["notes"])
    if method == "lgtm":
        assert "influence_to_aux_grad_norm" in log[1]
    if method in ("kd", "meta"):
        assert (out / "teacher_finetuned" / "config.json").is_file() and "teacher_finetuned" in saved
    if "--feedback-split" in extra:
        assert any("held out of train" in n for n in saved["notes"])
    if "--predict" in extra:
        lines = (out / "predictions" / "RTE.tsv").read_text().splitlines()
        assert lines[0] == "index\tprediction" and len(lines) == 13
        assert {line.split("\t")[1] for line in lines[1:]} <= {"entailment", "not_entailment"}


def test_cli_reads_the_hub_parquet_layout(cli_env, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    for split, src in (("train", "train"), ("validation", "dev")):
        ex = lgtm.read_glue_tsv(cli_env.data / "RTE" / f"{src}.tsv", lgtm.TASKS["rte"], split)
        (tmp_path / "hub" / "rte").mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"sentence1": ex.text_a, "sentence2": ex.text_b, "label": ex.label,
                                 "idx": ex.index}), tmp_path / "hub" / "rte" / f"{split}-00000-of-00001.parquet")
    argv = cli(cli_env, tmp_path / "run", "--max-steps", "1")
    argv[argv.index("--data-dir") + 1] = str(tmp_path / "hub")
    assert lgtm.main(argv)["status"] == "finished"


def test_cli_refuses_an_existing_run_unless_overwrite(cli_env, tmp_path):
    out = tmp_path / "run"
    lgtm.main(cli(cli_env, out, "--max-steps", "1", method="online"))
    assert "already holds a run" in run_main_error(cli(cli_env, out, "--max-steps", "1", method="online"))
    assert lgtm.main(cli(cli_env, out, "--max-steps", "1", "--overwrite", method="online"))["status"] == "finished"


def test_cli_stops_on_a_non_finite_loss_and_keeps_the_last_checkpoint(cli_env, tmp_path):
    out = tmp_path / "run"
    msg = run_main_error(cli(cli_env, out, "--student-lr", "1e35", "--eval-steps", "1", "--max-steps", "6",
                             method="online"))
    assert "loss is nan" in msg or "loss is inf" in msg
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["status"].startswith("stopped") and saved["history"]
    assert (out / "student" / "config.json").is_file()


def test_cli_bad_inputs_fail_with_one_clear_message(cli_env, tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit) as e:
        lgtm.main(cli(cli_env, tmp_path / "a")[:0] + ["--task", "rtee"])
    assert e.value.code == 2 and "invalid choice: 'rtee'" in capsys.readouterr().err

    argv = cli(cli_env, tmp_path / "b")
    argv[argv.index("--data-dir") + 1] = str(tmp_path / "nowhere")
    assert "does not exist" in run_main_error(argv)

    broken = tmp_path / "broken"
    for fix, expected in [
        (lambda rows: rows[:1] + [rows[1][:2]] + rows[2:], "line 2: malformed row"),
        (lambda rows: rows[:3] + [rows[3][:3] + ["maybe"]] + rows[4:], "label 'maybe' is not in the label set"),
        (lambda rows: [["index", "premise", "hypothesis", "label"]] + rows[1:], "missing column(s) ['sentence1', 'sentence2']"),
    ]:
        with open(cli_env.data / "RTE" / "train.tsv") as f:
            rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
        write_tsv(broken / "RTE" / "train.tsv", fix(rows))
        write_tsv(broken / "RTE" / "dev.tsv", rows[:5])
        argv = cli(cli_env, tmp_path / "c")
        argv[argv.index("--data-dir") + 1] = str(broken)
        msg = run_main_error(argv)
        assert expected in msg and "train.tsv" in msg, msg
    write_tsv(broken / "RTE" / "train.tsv", rows)
    (broken / "RTE" / "dev.tsv").unlink()
    argv[argv.index("--data-dir") + 1] = str(broken)
    assert "missing file" in run_main_error(argv) and "dev.tsv" in run_main_error(argv)

    argv = cli(cli_env, tmp_path / "d")
    argv[argv.index("--teacher") + 1] = str(tmp_path / "no-such-model")
    assert "no such directory" in run_main_error(argv)

    other = save_tiny_model(tmp_path / "other-vocab", vocab=VOCAB[:5] + sorted(VOCAB[5:], reverse=True))
    argv = cli(cli_env, tmp_path / "e")
    argv[argv.index("--teacher") + 1] = str(other)
    assert "tokenizers" in run_main_error(argv)

    argv = cli(cli_env, tmp_path / "f")
    argv[argv.index("--student-layers") + 1] = "9"
    assert "has only 3 layers" in run_main_error(argv)

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv = cli(cli_env, tmp_path / "g")
    del argv[argv.index("--data-dir"): argv.index("--data-dir") + 2]
    msg = run_main_error(argv)
    assert "Hugging Face Hub" in msg and "--data-dir" in msg
    argv = cli(cli_env, tmp_path / "h")
    argv[argv.index("--teacher") + 1] = "bert-base-uncased"
    msg = run_main_error(argv)
    assert "Hugging Face Hub" in msg and "--teacher /path/to/model" in msg


def test_cli_interrupted_run_keeps_what_it_wrote(cli_env, tmp_path, monkeypatch):
    real_step = lgtm.train_step

    def interrupt_at_step_3(*args, **kwargs):
        if args[7] == 3:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(lgtm, "train_step", interrupt_at_step_3)
    out = tmp_path / "run"
    assert "interrupted" in run_main_error(cli(cli_env, out))
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["status"] == "interrupted" and [h["step"] for h in saved["history"]] == [2]
    assert (out / "student" / "config.json").is_file()
    assert len((out / "train_log.jsonl").read_text().splitlines()) == 2


def test_benchmark_times_every_step_and_checks_fd_under_each_precision(capsys):
    import benchmark
    benchmark.main(["--size", "small", "--device", "cpu", "--batch-size", "4", "--seq-length", "16", "--steps", "1",
                    "--warmup", "0", "--precision", "fp32", "bf16"])
    printed = capsys.readouterr().out
    for step in ("kd", "online", "meta (fd)", "lgtm (fd)", "lgtm (exact)"):
        assert printed.count(f" {step} ") == 2, step  # one row per precision
    agreement = {tuple(line.split()[:-4]): [float(x) for x in line.split()[-4:]]
                 for line in printed.splitlines() if line.startswith(("fp32 ", "bf16 "))}
    assert min(agreement[("fp32", "fd")] + agreement[("bf16", "fd")]) > 0.999
    assert ("bf16", "fd,", "passes", "unguarded") in agreement


# ----------------------------------------------------------------------------------------------------------
# The tutorial: it must run top to bottom, and the committed copy must carry the outputs of such a run
# ----------------------------------------------------------------------------------------------------------

TUTORIAL = Path(__file__).resolve().parent / "tutorial.ipynb"


def test_committed_tutorial_has_the_outputs_of_a_full_run():
    import nbformat
    nb = nbformat.read(TUTORIAL, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), "run it top to bottom, then commit"
    outputs = [o for c in code for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 6  # every plot of the story


@pytest.mark.parametrize("model", ["tiny", "auto"])  # auto: the offline MiniLM where it is installed
def test_tutorial_runs_top_to_bottom(model, monkeypatch):
    import nbformat
    from nbclient import NotebookClient
    monkeypatch.setenv("LGTM_TUTORIAL_MODEL", model)
    nb = nbformat.read(TUTORIAL, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(TUTORIAL.parent)}}).execute()  # raises on a failing cell
    printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "cosine(autograd meta-gradient, gradient of -ηs·mean w)  = +1.0000" in printed
