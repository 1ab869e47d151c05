"""LGTM: Learning Good Teacher Matters, in one file.

Ren, Zhong, Zhou, Yang, Yu, Shang. "Tailoring Instructions to Student's Learning Levels Boosts Knowledge
Distillation". ACL 2023, arXiv 2305.09651.

The teacher is trained together with the student. Besides its own loss on the labels (L_aux, eq. 11) it
descends the student's held-out loss after one look-ahead student step, which works out to raising the
*distillation influence* w_i = grad_θs D_i . v of each training sample (eq. 8), with
v = grad_θs L_val(θs'). w_i and its teacher gradient come from two extra student forwards by finite
differences (eq. 10), or exactly from one forward-mode pass (`--influence exact`).

Reading order: arguments -> data -> models -> losses -> the LGTM step -> baselines -> loop -> main.

    python lgtm.py --task rte                                   # Hub models and data
    python lgtm.py --task rte --data-dir glue --teacher DIR --student DIR --student-layers 3
"""

import argparse
import contextlib
import csv
import glob
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, jvp
from tqdm import tqdm

METHODS = ("kd", "online", "meta", "lgtm")


class UserError(Exception):
    """Bad input: main() prints the message (what is wrong and how to fix it) and exits with status 1."""


# ----------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Knowledge distillation on GLUE with LGTM (ACL 2023) and the paper's comparison methods. "
        "Defaults follow the paper's appendix D and the authors' code.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--task", required=True, choices=list(TASKS), help="GLUE task")
    g.add_argument("--data-dir", type=Path, help="local GLUE copy instead of the Hub: DIR/RTE/train.tsv "
                   "(GLUE TSV layout) or DIR/rte/train-*.parquet (Hub parquet layout)")
    g.add_argument("--feedback-split", type=float, default=0.0, help="hold out this fraction of train as "
                   "the feedback set z^e (appendix E.1), so dev stays unseen; 0: feed back from dev, as the paper")
    g.add_argument("--max-seq-length", type=int, default=128)
    g.add_argument("--max-train-samples", type=int, help="keep only the first N training examples")
    g = p.add_argument_group("models")
    g.add_argument("--teacher", default="bert-base-uncased", help="Hub name or local directory")
    g.add_argument("--student", default="google/bert_uncased_L-6_H-768_A-12", help="Hub name or local directory")
    g.add_argument("--student-layers", type=int, help="keep only the first N transformer layers of the student "
                   "checkpoint (so one checkpoint can serve as teacher and as a smaller student)")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--bf16", action=argparse.BooleanOptionalAction, help="bf16 autocast over fp32 master weights "
                   "(default: on where the GPU supports bf16, off on CPU). The influence passes always run in fp32")
    g.add_argument("--tf32", action=argparse.BooleanOptionalAction, help="TF32 matmuls for fp32 work on CUDA "
                   "(default: on with CUDA). The influence passes always run in full fp32")
    g = p.add_argument_group("method")
    g.add_argument("--method", choices=METHODS, default="lgtm", help="kd: vanilla two-stage distillation; "
                   "online: teacher and student trained together (eq. 3-4); meta: Meta Distill, the fine-tuned "
                   "teacher learns only from the student's held-out loss (eq. 6-7); lgtm: Algorithm 1")
    g.add_argument("--influence", choices=("fd", "exact"), default="fd", help="distillation influence by "
                   "finite differences (eq. 10) or exactly (forward-mode AD; the student then runs eager attention)")
    g.add_argument("--lookahead", choices=("sgd", "adamw"), default="sgd", help="look-ahead student step: "
                   "plain SGD as in Algorithm 1, or one step of the student's real AdamW (the authors' code)")
    g.add_argument("--fd-radius", type=float, default=0.01, help="finite-difference step eps = r / ||v||")
    g.add_argument("--distill-loss", choices=("ce", "mse"), help="distillation loss D: soft cross-entropy "
                   "(default) or MSE between logits (table 2); stsb always uses mse")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--alpha", type=float, default=0.6, help="teacher's weight on its ground-truth loss in "
                   "L_aux (eq. 11, table 7); 1 - alpha goes to distilling from the student")
    g.add_argument("--student-alpha", type=float, default=0.0, help="student's weight on its ground-truth loss "
                   "(eq. 1); the rest is distillation. 0 as in the authors' code (alpha_kd 1.0)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--student-lr", type=float, default=5e-5, help="appendix D: one of 1e-4, 5e-5, 3e-5")
    g.add_argument("--teacher-lr", type=float, default=3e-5)
    g.add_argument("--batch-size", type=int, default=32, help="training and feedback batch size")
    g.add_argument("--eval-batch-size", type=int, default=128)
    g.add_argument("--epochs", type=float, default=6, help="distillation epochs")
    g.add_argument("--teacher-epochs", type=float, default=6, help="kd and meta: epochs of the first stage, "
                   "fine-tuning the teacher; 0 takes --teacher as already fine-tuned and skips that stage")
    g.add_argument("--max-steps", type=int, help="stop each training stage after this many steps")
    g.add_argument("--warmup-ratio", type=float, default=0.0)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=42)
    g = p.add_argument_group("run")
    g.add_argument("--output-dir", type=Path, default=Path("runs/lgtm"))
    g.add_argument("--overwrite", action="store_true", help="replace a run already in --output-dir")
    g.add_argument("--eval-steps", type=int, help="evaluate student and teacher every N steps (default: "
                   "every epoch) and at the end; the best student is saved")
    g.add_argument("--logging-steps", type=int, default=20, help="every N steps log the ratio "
                   "||influence gradient|| / ||aux gradient|| of the teacher (costs one extra teacher backward)")
    g.add_argument("--predict", action="store_true", help="write GLUE-server TSVs for the test split with the "
                   "best student")
    args = p.parse_args(argv)
    for name in ("batch_size", "eval_batch_size", "max_seq_length", "logging_steps", "eval_steps",
                 "max_steps", "max_train_samples", "student_layers"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be a positive integer")
    if not 0 <= args.feedback_split < 1:
        p.error("--feedback-split must be in [0, 1): a fraction of train, or 0 for the dev set")
    for name in ("alpha", "student_alpha"):
        if not 0 <= getattr(args, name) <= 1:
            p.error(f"--{name.replace('_', '-')} must be in [0, 1]")
    on_cuda = torch.device(args.device).type == "cuda" and torch.cuda.is_available()
    if args.bf16 is None:
        args.bf16 = on_cuda and torch.cuda.is_bf16_supported()
    if args.tf32 is None:
        args.tf32 = on_cuda
    return args


# ----------------------------------------------------------------------------------------------------------
# Data: GLUE from the Hub, or a local copy in the GLUE TSV or Hub parquet layout
# ----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Task:
    name: str
    glue_dir: str            # folder of the GLUE TSV release, also the GLUE-server file name
    hub_columns: tuple       # text columns in nyu-mll/glue
    tsv_columns: tuple       # text columns in the TSV header (CoLA train/dev: positions, there is no header)
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
SERVER_NAMES = {"test_matched": "-m", "test_mismatched": "-mm"}


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


def check_labels(examples, task, source, labelled):
    """Labels outside the task's label set end the run here, not as a CUDA assert or a wrong metric."""
    if not labelled:
        return
    for row, y in enumerate(examples.label):
        ok = math.isfinite(y) if task.is_regression else y in range(len(task.labels))
        if not ok:
            expected = "a finite score" if task.is_regression else f"a label id in 0..{len(task.labels) - 1}"
            raise UserError(f"{source}: row {row} has label {y!r}, expected {expected} for {task.name}")


def read_glue_tsv(path, task, split):
    if not path.is_file():
        raise UserError(f"missing file {path} (GLUE TSV layout: {path.parent}/train.tsv, "
                        f"{', '.join(TSV_NAMES[s] + '.tsv' for s in task.dev_splits)}, test.tsv for --predict)")
    # QUOTE_NONE: GLUE fields may start with a quote that is not CSV quoting (see shared/glue/README.md).
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    headerless = task.name == "cola" and not split.startswith("test")
    labelled = not split.startswith("test")
    if headerless:
        header, first_line = None, 1
        width, columns = 4, list(task.tsv_columns) + [task.tsv_label]
    else:
        if not rows:
            raise UserError(f"{path} is empty")
        header, rows, first_line = rows[0], rows[1:], 2
        width = len(header)
        text_cols = ("sentence",) if task.name == "cola" else task.tsv_columns  # CoLA's test.tsv has a header
        wanted = list(text_cols) + ([task.tsv_label] if labelled else [task.tsv_id])
        missing = [c for c in wanted if c not in header]
        if missing:
            raise UserError(f"{path}: missing column(s) {missing}; the header has {header}. "
                            f"Is this the {task.glue_dir} {split} file of the GLUE release?")
        columns = [header.index(c) for c in wanted]
    text_a, text_b, label, index = [], [], [], []
    for line, row in enumerate(rows, start=first_line):
        if len(row) != width:
            raise UserError(f"{path}, line {line}: malformed row with {len(row)} tab-separated fields, expected "
                            f"{width}. The file must be the GLUE TSV (tab-separated, one example per line).")
        fields = [row[c] for c in columns]
        text_a.append(fields[0])
        if len(fields) == 3:
            text_b.append(fields[1])
        last = fields[-1]
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
    """Hub rows (datasets or parquet) -> Examples; test labels are -1 there."""
    missing = [c for c in task.hub_columns + ("label",) if c not in columns]
    if missing:
        raise UserError(f"{source}: missing column(s) {missing}; found {sorted(columns)}")
    n = len(columns["label"])
    text_b = list(columns[task.hub_columns[1]]) if len(task.hub_columns) == 2 else None
    index = list(columns["idx"]) if "idx" in columns else list(range(n))
    ex = Examples(list(columns[task.hub_columns[0]]), text_b, list(columns["label"]), index)
    check_labels(ex, task, source, labelled=not split.startswith("test"))
    return ex


def load_glue(task, data_dir, splits):
    """{split: Examples} from --data-dir (TSV or parquet layout) or from the Hub."""
    if data_dir is not None:
        if not data_dir.is_dir():
            raise UserError(f"--data-dir {data_dir} does not exist or is not a directory")
        tsv_dir, parquet_dir = data_dir / task.glue_dir, data_dir / task.name
        if (tsv_dir / "train.tsv").is_file():
            return {s: read_glue_tsv(tsv_dir / f"{TSV_NAMES[s]}.tsv", task, s) for s in splits}
        if glob.glob(str(parquet_dir / "train-*.parquet")):
            import pyarrow as pa
            import pyarrow.parquet as pq
            out = {}
            for s in splits:
                files = sorted(glob.glob(str(parquet_dir / f"{s}-*.parquet")))
                if not files:
                    raise UserError(f"missing file {parquet_dir}/{s}-*.parquet (Hub parquet layout)")
                table = pa.concat_tables([pq.read_table(f) for f in files])
                out[s] = examples_from_columns(table.to_pydict(), task, s, f"{parquet_dir}/{s}-*.parquet")
            return out
        raise UserError(f"no {task.name} data under {data_dir}: expected {tsv_dir}/train.tsv (GLUE TSV layout) "
                        f"or {parquet_dir}/train-*.parquet (Hub parquet layout)")
    import datasets
    try:
        hub = datasets.load_dataset("nyu-mll/glue", task.name)
    except (OSError, ConnectionError) as e:
        raise UserError(f"could not load GLUE {task.name} from the Hugging Face Hub ({type(e).__name__}: "
                        f"{str(e)[:200]}). Without Hub access pass a local copy: --data-dir DIR with "
                        f"DIR/{task.glue_dir}/train.tsv (GLUE TSV) or DIR/{task.name}/train-*.parquet") from e
    return {s: examples_from_columns(hub[s].to_dict(), task, s, f"nyu-mll/glue {task.name} {s}") for s in splits}


def split_feedback(train, fraction, seed):
    """Appendix E.1: hold out a random fraction of train as the feedback set, train on the rest."""
    rows = np.random.default_rng(seed).permutation(len(train))
    n_feedback = max(1, int(round(fraction * len(train))))
    if n_feedback >= len(train):
        raise UserError(f"--feedback-split {fraction} leaves no training examples out of {len(train)}")
    return train.select(sorted(rows[n_feedback:])), train.select(sorted(rows[:n_feedback]))


def tokenize(examples, tokenizer, max_length):
    """Tokenize once; padding happens per batch (collate)."""
    enc = tokenizer(examples.text_a, examples.text_b, truncation=True, max_length=max_length)
    keys = [k for k in ("input_ids", "token_type_ids", "attention_mask") if k in enc]
    return [dict({k: enc[k][i] for k in keys}, label=examples.label[i], row=i) for i in range(len(examples))]


def collate(features, pad_token_id):
    """Dynamic padding to the longest sequence of the batch."""
    width = max(len(f["input_ids"]) for f in features)
    pad_value = {"input_ids": pad_token_id, "token_type_ids": 0, "attention_mask": 0}
    batch = {k: torch.tensor([f[k] + [v] * (width - len(f[k])) for f in features])
             for k, v in pad_value.items() if k in features[0]}
    batch["labels"] = torch.tensor([f["label"] for f in features])
    batch["row"] = torch.tensor([f["row"] for f in features])
    return batch


def model_inputs(batch):
    return {k: batch[k] for k in ("input_ids", "token_type_ids", "attention_mask") if k in batch}


def to_device(batch, device):
    return {k: t.to(device, non_blocking=True) for k, t in batch.items()}


def make_loader(features, batch_size, pad_token_id, shuffle, seed=0):
    return torch.utils.data.DataLoader(
        features, batch_size=batch_size, shuffle=shuffle, collate_fn=lambda f: collate(f, pad_token_id),
        generator=torch.Generator().manual_seed(seed) if shuffle else None)


def forever(loader):
    while True:
        yield from loader


# ----------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------

def from_pretrained(loader, name, flag, **kwargs):
    """Hub name or local directory; a missing directory or an unreachable Hub ends in one clear message."""
    is_local = Path(name).exists() or name.startswith((".", "/", "~"))
    if is_local and not Path(name).is_dir():
        raise UserError(f"{flag} {name}: no such directory (a local model is a folder with config.json, "
                        f"weights and tokenizer files, as save_pretrained writes it)")
    try:
        return loader(name, **kwargs)
    except OSError as e:
        raise UserError(f"could not load {flag} {name!r} ({type(e).__name__}: {str(e)[:200]}). If the "
                        f"Hugging Face Hub is out of reach, pass a local directory: {flag} /path/to/model") from e


def load_tokenizer(args):
    from transformers import AutoTokenizer
    teacher_tok = from_pretrained(AutoTokenizer.from_pretrained, args.teacher, "--teacher")
    student_tok = from_pretrained(AutoTokenizer.from_pretrained, args.student, "--student")
    probe = "Distillation Influence: Hello WORLD, naïve café 123!"
    if teacher_tok.get_vocab() != student_tok.get_vocab() or teacher_tok(probe) != student_tok(probe):
        raise UserError(f"the tokenizers of --teacher {args.teacher} and --student {args.student} differ: "
                        f"distillation needs both models to read the same token ids. Pick a pair that shares "
                        f"one vocabulary (e.g. two uncased BERTs)")
    return student_tok


def load_model(name, flag, num_labels, layers=None, attention="sdpa"):
    """float32 master weights whatever the checkpoint stores; optionally only the first `layers` layers."""
    from transformers import AutoConfig, AutoModelForSequenceClassification
    config = from_pretrained(AutoConfig.from_pretrained, name, flag)
    overrides = {}
    if layers is not None:
        if layers > config.num_hidden_layers:
            raise UserError(f"--student-layers {layers}: {name} has only {config.num_hidden_layers} layers")
        overrides["num_hidden_layers"] = layers
    return from_pretrained(AutoModelForSequenceClassification.from_pretrained, name, flag, num_labels=num_labels,
                           dtype=torch.float32, attn_implementation=attention, **overrides)


@torch.no_grad()
def zero_classifier(model):
    """One-stage methods start both heads at zero, as the authors' code does (appendix F.1)."""
    head = model.classifier
    last = head if isinstance(head, torch.nn.Linear) else [m for m in head.modules()
                                                           if isinstance(m, torch.nn.Linear)][-1]
    last.weight.zero_()
    last.bias.zero_()


def autocast(device, bf16):
    """Mixed precision for the ordinary passes: bf16 compute, fp32 master weights, no loss scaling needed."""
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


def make_optimizer(model, lr, weight_decay, total_steps, warmup_ratio):
    from transformers import get_linear_schedule_with_warmup
    no_decay = ("bias", "LayerNorm.weight", "layer_norm.weight")
    groups = [{"params": [p for n, p in model.named_parameters() if not n.endswith(no_decay)],
               "weight_decay": weight_decay},
              {"params": [p for n, p in model.named_parameters() if n.endswith(no_decay)], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=lr, fused=next(model.parameters()).is_cuda)  # one kernel on GPU
    scheduler = get_linear_schedule_with_warmup(optimizer, int(warmup_ratio * total_steps), total_steps)
    return optimizer, scheduler


# ----------------------------------------------------------------------------------------------------------
# Losses. Every function returns one value per sample; callers take the mean.
# ----------------------------------------------------------------------------------------------------------

def ground_truth_loss(logits, labels):
    """L_ce(y, f(x)): the label term of eq. 1 and 3, and the held-out loss L_val of eq. 5 (MSE for stsb)."""
    if logits.shape[-1] == 1:
        return (logits.squeeze(-1) - labels.to(logits.dtype)) ** 2
    return F.cross_entropy(logits, labels, reduction="none")


def distillation_loss(pred_logits, target_logits, kind="ce", temperature=1.0):
    """D(target -> pred), per sample: soft cross-entropy of `pred` against softmax(target / T), scaled by T^2
    (Hinton et al.), or MSE between logits. Gradients flow into both arguments: the student's D(T -> S) of
    eq. 1 carries the teacher's influence through `target`, the teacher's D(S -> T) of eq. 11 through `pred`."""
    if kind == "mse":
        return ((pred_logits - target_logits) ** 2).mean(-1)
    target = F.softmax(target_logits / temperature, dim=-1)
    return -(target * F.log_softmax(pred_logits / temperature, dim=-1)).sum(-1) * temperature ** 2


def student_loss(s_logits, t_logits, labels, args):
    """L_s (eq. 1): alpha_s * L_ce(y, S) + (1 - alpha_s) * D(T -> S). The teacher's logits are targets."""
    distill = distillation_loss(s_logits, t_logits.detach(), args.distill_loss, args.temperature)
    return (args.student_alpha * ground_truth_loss(s_logits, labels) + (1 - args.student_alpha) * distill).mean()


def teacher_aux_loss(t_logits, s_logits, labels, args):
    """L_aux (eq. 11; the online teacher's whole loss, eq. 3): alpha * L_ce(y, T) + (1 - alpha) * D(S -> T)."""
    distill = distillation_loss(t_logits, s_logits.detach(), args.distill_loss, args.temperature)
    return (args.alpha * ground_truth_loss(t_logits, labels) + (1 - args.alpha) * distill).mean()


# ----------------------------------------------------------------------------------------------------------
# The LGTM step (Algorithm 1). Each function can be lifted into another trainer as it is.
# ----------------------------------------------------------------------------------------------------------

@torch.no_grad()
def lookahead_params(student, grads, optimizer, form="sgd"):
    """θs' = θs after one student step on z^r (Algorithm 1, lines 3-4), as new tensors: no copy of the model,
    and its parameters, .grad and the optimizer's state are left as they are.
    sgd:   θs' = θs - lr * g                                 (Algorithm 1 as printed)
    adamw: θs' = what optimizer.step() would give (torch.optim.AdamW, same lr, betas, eps, weight decay, state)."""
    group_of = {p: group for group in optimizer.param_groups for p in group["params"]}
    new = {}
    for (name, p), g in zip(student.named_parameters(), grads):
        group = group_of[p]
        lr = group["lr"]
        if form == "sgd":
            new[name] = p - lr * g
            continue
        if group.get("amsgrad") or group.get("maximize"):
            raise UserError("--lookahead adamw simulates plain AdamW (no amsgrad, no maximize)")
        beta1, beta2 = group["betas"]
        state = optimizer.state.get(p, {})
        step = float(state["step"]) + 1 if "step" in state else 1.0
        exp_avg = state["exp_avg"] * beta1 + g * (1 - beta1) if state else g * (1 - beta1)
        exp_avg_sq = state["exp_avg_sq"] * beta2 + g * g * (1 - beta2) if state else g * g * (1 - beta2)
        denom = exp_avg_sq.sqrt() / math.sqrt(1 - beta2 ** step) + group["eps"]
        new[name] = p * (1 - lr * group["weight_decay"]) - (lr / (1 - beta1 ** step)) * exp_avg / denom
    return new


def feedback_gradient(student, params, feedback_batch, bf16=False):
    """v = grad_θs L_val(θs'; z^e) (Algorithm 1, lines 5-6; eq. 5), and L_val itself."""
    params = {name: p.detach().requires_grad_() for name, p in params.items()}
    with autocast(feedback_batch["labels"].device, bf16):
        logits = functional_call(student, params, args=(), kwargs=model_inputs(feedback_batch)).logits
    loss = ground_truth_loss(upcast(logits), feedback_batch["labels"]).mean()
    return list(torch.autograd.grad(loss, list(params.values()))), loss.detach()


def influence_fd(student, v, inputs, t_logits, distill, radius=0.01):
    """Distillation influence w_i = grad_θs D_i . v by central differences (eq. 10, appendix B):
        w_i ~ [D_i(T, S(θs + eps v)) - D_i(T, S(θs - eps v))] / (2 eps),     eps = radius / ||v||.
    Two student forwards without grad; w keeps its graph to the teacher through t_logits, so backward()
    gives grad_θt w_i. Dropout is off in both passes (with two masks the difference is noise), θs is never
    written (the perturbed weights are new tensors), and the passes and the difference run in full fp32
    whatever the surrounding precision."""
    names, params = zip(*student.named_parameters())
    v_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(v))).item()
    eps = radius / max(v_norm, 1e-30)  # v = 0 gives w = 0, not NaN
    with full_precision(params[0].device), dropout_off(student):
        with torch.no_grad():
            plus = functional_call(student, dict(zip(names, torch._foreach_add(params, v, alpha=eps))),
                                   args=(), kwargs=inputs).logits
            minus = functional_call(student, dict(zip(names, torch._foreach_add(params, v, alpha=-eps))),
                                    args=(), kwargs=inputs).logits
        t_logits = upcast(t_logits)
        return (distill(plus, t_logits) - distill(minus, t_logits)) / (2 * eps)


def influence_exact(student, v, inputs, t_logits, distill):
    """The same w_i exactly (eq. 8): one forward-mode pass gives the student's logits s and their directional
    derivative ds = J v; then w_i = dD_i/ds_i . ds_i. The teacher enters only through t_logits, so
    grad_θt w_i (the exact mixed second derivative) needs no graph through the student."""
    names, params = zip(*student.named_parameters())
    with full_precision(params[0].device), dropout_off(student):
        s, ds = jvp(lambda p: functional_call(student, p, args=(), kwargs=inputs).logits,
                    (dict(zip(names, (p.detach() for p in params))),), (dict(zip(names, v)),))
        s = s.detach().requires_grad_()
        (dD_ds,) = torch.autograd.grad(distill(s, upcast(t_logits)).sum(), s, create_graph=True)
        return (dD_ds * ds.detach()).sum(-1)


def influence_objective(w, student_lr, student_alpha):
    """What the teacher adds to its loss for the student's sake (eq. 9-11, sign corrected).
    One student step gives L_val(θs') ~ L_val(θs) - lr_s (1 - alpha_s) mean_i w_i (appendix A, notes §1), so the
    teacher lowers the student's look-ahead held-out loss by DESCENDING -lr_s (1 - alpha_s) mean_i w_i. The
    printed eq. 10-11 add +L_influence, which would raise it; the authors' code subtracts, as here."""
    return -student_lr * (1 - student_alpha) * w.mean()


def check_finite(loss, what, step):
    if not torch.isfinite(loss):
        raise NonFiniteLoss(f"{what} loss is {loss.item()} at step {step}")


class NonFiniteLoss(UserError):
    pass


def train_step(method, teacher, student, optimizers, batch, feedback_batch, args, step=0, log_ratio=False):
    """One step of `method` on the training batch z^r. The methods share this code and differ only where the
    paper says (figure 1): who updates the teacher, from what, and in which order. Returns scalars and, for
    meta and lgtm, the per-sample influences w_i."""
    (opt_t, sched_t), (opt_s, sched_s) = optimizers
    inputs, labels = model_inputs(batch), batch["labels"]
    amp = lambda: autocast(labels.device, args.bf16)  # forwards only; losses and backward see fp32 logits
    teacher_learns = method != "kd"
    distill = lambda pred, target: distillation_loss(pred, target, args.distill_loss, args.temperature)
    out = {}

    # One teacher forward on z^r serves L_aux, the look-ahead and the influence term. A teacher in training
    # runs with dropout; the frozen kd teacher does not.
    teacher.train(teacher_learns)
    with torch.set_grad_enabled(teacher_learns), amp():
        t_logits = upcast(teacher(**inputs).logits)
    # One student forward on z^r at θs: its graph serves the look-ahead gradient and the real update (line 9).
    student.train()
    with amp():
        s_logits = upcast(student(**inputs).logits)

    teacher_loss = 0.0
    if method in ("online", "lgtm"):
        teacher_loss = teacher_aux_loss(t_logits, s_logits, labels, args)          # eq. 3 / L_aux of eq. 11
        out["aux_loss"] = teacher_loss.detach()
    if method in ("meta", "lgtm"):
        loss_s = student_loss(s_logits, t_logits, labels, args)
        grads = torch.autograd.grad(loss_s, list(student.parameters()), retain_graph=True)
        theta_next = lookahead_params(student, grads, opt_s, args.lookahead)       # lines 3-4
        v, out["feedback_loss"] = feedback_gradient(student, theta_next, feedback_batch, args.bf16)  # lines 5-6
        if args.influence == "fd":                                                 # line 7, eq. 10
            w = influence_fd(student, v, inputs, t_logits, distill, args.fd_radius)
        else:
            w = influence_exact(student, v, inputs, t_logits, distill)
        influence = influence_objective(w, opt_s.param_groups[0]["lr"], args.student_alpha)
        out["w"] = w.detach()
        if method == "lgtm" and log_ratio:
            # One extra teacher backward, on logging steps only, to separate the two terms of eq. 11.
            g_influence = torch.autograd.grad(influence, list(teacher.parameters()), retain_graph=True)
        teacher_loss = teacher_loss + influence                                    # eq. 11 (meta: eq. 7)

    if teacher_learns:                                                             # line 8
        check_finite(teacher_loss, "teacher", step)
        opt_t.zero_grad(set_to_none=True)
        teacher_loss.backward()
        if method == "lgtm" and log_ratio:
            norm = lambda ts: torch.linalg.vector_norm(torch.stack(torch._foreach_norm(ts)))
            g_aux = torch._foreach_sub([p.grad for p in teacher.parameters()], g_influence)
            out["influence_to_aux_grad_norm"] = norm(g_influence) / norm(g_aux)
        opt_t.step()
        sched_t.step()
        out["teacher_loss"] = teacher_loss.detach()

    # Line 9: the student distils. online and lgtm update the teacher first, so the student learns from the
    # updated teacher (appendix F.2); kd and meta use the teacher of this step (eq. 1, eq. 6), whose gradient
    # the look-ahead has already computed.
    opt_s.zero_grad(set_to_none=True)
    if method == "meta":
        check_finite(loss_s, "student", step)
        for p, g in zip(student.parameters(), grads):
            p.grad = g
    else:
        if method in ("online", "lgtm"):
            with torch.no_grad(), amp():
                t_logits = upcast(teacher(**inputs).logits)
        loss_s = student_loss(s_logits, t_logits, labels, args)
        check_finite(loss_s, "student", step)
        loss_s.backward()
    opt_s.step()
    sched_s.step()
    out["student_loss"] = loss_s.detach()
    return out


# ----------------------------------------------------------------------------------------------------------
# Evaluation and metrics
# ----------------------------------------------------------------------------------------------------------

@torch.no_grad()
def predict(model, loader, device, bf16=False):
    with dropout_off(model), autocast(device, bf16):
        logits = [model(**model_inputs(to_device(b, device))).logits.float().cpu()
                  for b in loader]
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


def evaluate(model, dev_loaders, task, device, bf16=False):
    """Metrics on each dev split (mnli: matched, then mismatched with an 'mm_' prefix); 'score' is the mean
    of the first split's metrics, as GLUE averages F1 and accuracy, and picks the best checkpoint."""
    out = {}
    for i, (split, (loader, labels)) in enumerate(dev_loaders.items()):
        metrics = compute_metrics(task, predict(model, loader, device, bf16), labels)
        if i == 0:
            out["score"] = float(np.mean(list(metrics.values())))
        out.update({("mm_" if i else "") + k: v for k, v in metrics.items()})
    return out


def write_predictions(model, task, test_loaders, device, out_dir):
    """GLUE-server files: <TASK>.tsv with `index<TAB>prediction`, label names as the server expects."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for split, (loader, ids) in test_loaders.items():
        logits = predict(model, loader, device)
        if task.is_regression:
            preds = [f"{x:.3f}" for x in np.clip(logits[:, 0], 0.0, 5.0)]
        else:
            preds = [task.labels[i] for i in logits.argmax(-1)]
        path = out_dir / f"{task.glue_dir}{SERVER_NAMES.get(split, '')}.tsv"
        with open(path, "w") as f:
            f.write("index\tprediction\n")
            f.writelines(f"{i}\t{p}\n" for i, p in zip(ids, preds))
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------------------------------------
# The loop: stage 1 (kd, meta: fine-tune the teacher), stage 2 (distil), evaluation, checkpoints, logs
# ----------------------------------------------------------------------------------------------------------

def finetune_teacher(teacher, train_loader, dev_loaders, task, args, device, run):
    """Stage 1 of the two-stage methods: fine-tune the teacher on the labels alone."""
    total = stage_steps(len(train_loader), args.teacher_epochs, args.max_steps)
    opt, sched = make_optimizer(teacher, args.teacher_lr, args.weight_decay, total, args.warmup_ratio)
    teacher.train()
    bar = tqdm(total=total, desc="stage 1: fine-tune teacher", dynamic_ncols=True)
    for step, batch in zip(range(1, total + 1), forever(train_loader)):
        batch = to_device(batch, device)
        with autocast(device, args.bf16):
            logits = teacher(**model_inputs(batch)).logits
        loss = ground_truth_loss(upcast(logits), batch["labels"]).mean()
        check_finite(loss, "teacher fine-tuning", step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.update()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.close()
    metrics = evaluate(teacher, dev_loaders, task, device, args.bf16)
    run.note(f"fine-tuned teacher after {total} steps: {fmt(metrics)}")
    run.metrics["teacher_finetuned"] = metrics
    return teacher


def stage_steps(steps_per_epoch, epochs, max_steps):
    total = max(1, math.ceil(steps_per_epoch * epochs))
    return min(total, max_steps) if max_steps else total


def fmt(metrics):
    return " ".join(f"{k}={v:.4f}" for k, v in metrics.items())


class Run:
    """What a run leaves in --output-dir: metrics.json (rewritten after every evaluation, so an interrupted
    run keeps its history), train_log.jsonl (one line per step, with the per-sample influences), the best
    student in student/."""

    def __init__(self, out_dir, args):
        self.dir = out_dir
        self.metrics = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                        "status": "running", "history": [], "best": None}
        self.log = open(out_dir / "train_log.jsonl", "w")

    def note(self, msg):
        tqdm.write(msg)
        self.metrics.setdefault("notes", []).append(msg)

    def write_step(self, record):
        self.log.write(json.dumps(record) + "\n")
        self.log.flush()

    def save(self, status=None):
        if status:
            self.metrics["status"] = status
        tmp = self.dir / "metrics.json.tmp"
        tmp.write_text(json.dumps(self.metrics, indent=2))
        tmp.replace(self.dir / "metrics.json")


def distill(method, teacher, student, tokenizer, train_loader, feedback_loader, dev_loaders, task, args, device,
            run):
    """Stage 2 (or the only stage): train_step over the training set, evaluating student and teacher every
    --eval-steps and at the end, keeping the best student."""
    total = stage_steps(len(train_loader), args.epochs, args.max_steps)
    eval_every = args.eval_steps or len(train_loader)
    optimizers = (make_optimizer(teacher, args.teacher_lr, args.weight_decay, total, args.warmup_ratio),
                  make_optimizer(student, args.student_lr, args.weight_decay, total, args.warmup_ratio))
    feedback = forever(feedback_loader) if feedback_loader is not None else None
    bar = tqdm(total=total, desc=method, dynamic_ncols=True)
    train_seconds, seen = 0.0, 0  # training time alone: evaluation and checkpoints excluded
    for step, batch in zip(range(1, total + 1), forever(train_loader)):
        started = time.perf_counter()
        batch = to_device(batch, device)
        feedback_batch = to_device(next(feedback), device) if feedback else None
        record = {"step": step, "lr_student": optimizers[1][0].param_groups[0]["lr"]}
        out = train_step(method, teacher, student, optimizers, batch, feedback_batch, args, step,
                         log_ratio=step % args.logging_steps == 0)
        record.update({k: v.item() for k, v in out.items() if k != "w"})  # .item() waits for the GPU
        train_seconds += time.perf_counter() - started
        seen += len(batch["labels"])
        if "w" in out:  # per-sample influences, with the train rows they belong to (figures 3 and 4)
            record["row"] = batch["row"].tolist()
            record["w"] = out["w"].tolist()
        run.write_step(record)
        bar.update()
        bar.set_postfix(loss_s=f"{record['student_loss']:.4f}", samples_s=f"{seen / train_seconds:.1f}",
                        **({"loss_t": f"{record['teacher_loss']:.4f}"} if "teacher_loss" in record else {}))
        if step % eval_every == 0 or step == total:
            entry = {"step": step, "epoch": round(step / len(train_loader), 3),
                     "student": evaluate(student, dev_loaders, task, device, args.bf16),
                     "teacher": evaluate(teacher, dev_loaders, task, device, args.bf16),
                     "train_steps_per_s": step / train_seconds}
            run.metrics["history"].append(entry)
            best = run.metrics["best"]
            if best is None or entry["student"]["score"] > best["student"]["score"]:
                run.metrics["best"] = entry
                student.save_pretrained(run.dir / "student")
                tokenizer.save_pretrained(run.dir / "student")
            run.save()
            tqdm.write(f"step {step}: student {fmt(entry['student'])} | teacher {fmt(entry['teacher'])}")
    bar.close()
    teacher.save_pretrained(run.dir / "teacher")  # the final teacher, for inspection (the paper reports it too)
    tokenizer.save_pretrained(run.dir / "teacher")
    run.metrics["steps"] = total
    run.metrics["train_steps_per_s"] = total / train_seconds


# ----------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------

RUN_FILES = ("metrics.json", "train_log.jsonl", "student", "teacher", "teacher_finetuned", "predictions")


def prepare_output_dir(out_dir, overwrite):
    existing = [name for name in RUN_FILES if (out_dir / name).exists()]
    if existing and not overwrite:
        raise UserError(f"--output-dir {out_dir} already holds a run ({', '.join(existing)}): pass --overwrite "
                        f"to replace it, or choose another --output-dir")
    for name in existing:
        path = out_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)


def run_experiment(args):
    from transformers import set_seed
    task = TASKS[args.task]
    if task.is_regression and args.distill_loss == "ce":
        raise UserError("--distill-loss ce needs class probabilities; stsb is a regression task: use mse")
    args.distill_loss = args.distill_loss or ("mse" if task.is_regression else "ce")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda, but torch sees no CUDA device: pass --device cpu")
    torch.set_float32_matmul_precision("high" if args.tf32 else "highest")
    set_seed(args.seed)

    # Data, tokenized once with the (shared) tokenizer.
    splits = ("train",) + task.dev_splits + (task.test_splits if args.predict else ())
    data = load_glue(task, args.data_dir, splits)
    train = data["train"]
    if args.max_train_samples:
        train = train.select(range(min(args.max_train_samples, len(train))))
    uses_feedback = args.method in ("meta", "lgtm")
    if uses_feedback and args.feedback_split:
        train, feedback = split_feedback(train, args.feedback_split, args.seed)
        feedback_source = f"{len(feedback)} examples held out of train (--feedback-split {args.feedback_split})"
    elif uses_feedback:
        feedback = data[task.dev_splits[0]]
        feedback_source = f"the dev set {task.dev_splits[0]} ({len(feedback)} examples), as in the paper: " \
                          f"dev numbers are then not held out"
    prepare_output_dir(args.output_dir, args.overwrite)
    tokenizer = load_tokenizer(args)
    encode = lambda ex: tokenize(ex, tokenizer, args.max_seq_length)
    pad = tokenizer.pad_token_id or 0
    train_features = encode(train)
    for f, row in zip(train_features, train.index):
        f["row"] = row  # its line in the train file, so that logged influences name their sample
    train_loader = make_loader(train_features, args.batch_size, pad, shuffle=True, seed=args.seed)
    feedback_loader = make_loader(encode(feedback), args.batch_size, pad, True, args.seed + 1) if uses_feedback \
        else None
    dev_loaders = {s: (make_loader(encode(data[s]), args.eval_batch_size, pad, False), data[s].label)
                   for s in task.dev_splits}

    # Models: float32 master weights. forward-mode AD (exact influence) needs eager attention in the student.
    num_labels = 1 if task.is_regression else len(task.labels)
    teacher = load_model(args.teacher, "--teacher", num_labels).to(device)
    student = load_model(args.student, "--student", num_labels, args.student_layers,
                         "eager" if args.influence == "exact" else "sdpa").to(device)
    run = Run(args.output_dir, args)
    run.note(f"task {task.name}: {len(train)} training examples, method {args.method}"
             + (f", influence {args.influence}, look-ahead {args.lookahead}" if uses_feedback else "")
             + f", device {device}, " + ("bf16 autocast" if args.bf16 else "fp32")
             + (" with TF32 matmuls" if args.tf32 else ""))
    if uses_feedback:
        run.note(f"feedback set z^e: {feedback_source}")
    run.save()

    try:
        if args.method in ("kd", "meta"):
            if args.teacher_epochs > 0:
                finetune_teacher(teacher, train_loader, dev_loaders, task, args, device, run)
                teacher.save_pretrained(args.output_dir / "teacher_finetuned")
                tokenizer.save_pretrained(args.output_dir / "teacher_finetuned")
            else:
                run.note(f"--teacher-epochs 0: {args.teacher} is taken as already fine-tuned on {task.name}")
        else:
            zero_classifier(teacher)
            zero_classifier(student)
        distill(args.method, teacher, student, tokenizer, train_loader, feedback_loader, dev_loaders, task, args,
                device, run)
    except NonFiniteLoss as e:
        run.save(status=f"stopped: {e}")
        raise UserError(f"{e}: training stopped. The best student so far is in {args.output_dir / 'student'}. "
                        f"Try a lower learning rate.") from None
    except KeyboardInterrupt:
        run.save(status="interrupted")
        raise UserError(f"interrupted: {args.output_dir} keeps metrics.json and the best student so far") from None
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
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
