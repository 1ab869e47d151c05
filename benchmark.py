"""Cost of one training step of each method, and finite differences against exact influences, per precision.

    python benchmark.py                                   # the paper's size: BERT-base teacher, 6-layer student
    python benchmark.py --size small --device cpu         # a small config that runs on a CPU in a minute
    python benchmark.py --teacher DIR --student DIR --student-layers 3   # real checkpoints (also for agreement)
    python benchmark.py --compile                         # also time kd and lgtm with torch.compile'd models

Every row runs the step function of its method (lgtm.kd_step, online_step, meta_step, lgtm_step) on the same models
(fresh copies per row) and the same batches. Timing needs no pretrained weights, so by default the models are random
BERTs of the paper's size (batch 32, seq 128). One table
per precision: median ms/step over --steps after --warmup, samples/s, peak GPU memory, and the cost as a multiple
of the kd step at the same precision. Then the agreement of FD with exact influences: the correlation of the w_i
and the cosine of the teacher gradients, against the exact path at the same precision and against strict fp32.
"""

import argparse
import contextlib
import copy
import statistics
import time

import torch
import transformers

import lgtm

STEPS = [("kd", "-"), ("online", "-"), ("meta", "fd"), ("lgtm", "fd"), ("lgtm", "exact")]
SIZES = {  # (layers, hidden, heads, intermediate) of teacher and student
    "base": ((12, 768, 12, 3072), (6, 768, 12, 3072)),
    "small": ((4, 256, 4, 1024), (2, 256, 4, 1024)),
}
# fp32: IEEE fp32 matmuls; tf32: fp32 with TF32 matmuls (CUDA; lgtm.py's default there); bf16: bf16 autocast + TF32.
# Influence passes are always strict fp32 (lgtm.full_precision).
PRECISIONS = {"fp32": (False, "highest"), "tf32": (False, "high"), "bf16": (True, "high")}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--size", choices=SIZES, default="base", help="random BERTs of this size (ignored with --teacher)")
    p.add_argument("--teacher", help="a checkpoint (Hub name or directory) instead of random weights")
    p.add_argument("--student", help="a checkpoint for the student (default: --teacher)")
    p.add_argument("--student-layers", type=int, help="keep the first N layers of the student checkpoint")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-length", type=int, default=128, help="every sequence is this long (no padding)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per row; the median is reported")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (allocator, kernels, autotuning)")
    p.add_argument("--precision", nargs="+", choices=PRECISIONS, help="default: fp32 tf32 bf16 on a GPU that "
                   "supports bf16, fp32 on CPU")
    p.add_argument("--agreement-batches", type=int, default=2, help="batches for the FD-vs-exact check; 0: skip")
    p.add_argument("--compile", action="store_true", help="also time kd and lgtm (fd) with both models compiled")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.precision is None:
        cuda = torch.device(args.device).type == "cuda"
        args.precision = ["fp32", "tf32", "bf16"] if cuda and torch.cuda.is_bf16_supported() else ["fp32"]
    return args


def build_models(args):
    """teacher, student (SDPA) and the same student with eager attention (forward-mode AD needs it)."""
    if args.teacher:
        student = args.student or args.teacher
        teacher = lgtm.load_model(args.teacher, "--teacher", 2)
        make_student = lambda attention: lgtm.load_model(student, "--student", 2, args.student_layers, attention)
        return teacher, make_student("sdpa"), make_student("eager")

    def bert(shape, attention):
        layers, hidden, heads, intermediate = shape
        config = transformers.BertConfig(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                                         intermediate_size=intermediate, num_labels=2, attn_implementation=attention)
        return transformers.BertForSequenceClassification(config)

    teacher_shape, student_shape = SIZES[args.size]
    torch.manual_seed(0)
    teacher, student = bert(teacher_shape, "sdpa"), bert(student_shape, "sdpa")
    student_eager = bert(student_shape, "eager")
    student_eager.load_state_dict(student.state_dict())
    return teacher, student, student_eager


def random_batch(args, vocab_size, seed):
    g = torch.Generator().manual_seed(seed)
    shape = (args.batch_size, args.seq_length)
    batch = {"input_ids": torch.randint(1000, vocab_size, shape, generator=g),
             "token_type_ids": torch.zeros(shape, dtype=torch.long), "attention_mask": torch.ones(shape, dtype=torch.long),
             "labels": torch.randint(0, 2, (args.batch_size,), generator=g), "row": torch.arange(args.batch_size)}
    return lgtm.to_device(batch, args.device)


def step_function(method, influence, teacher, student, optimizers, bf16):
    """One step of `method` with the command line's defaults, as f(batch, feedback_batch)."""
    (t_opt, _), (s_opt, _) = optimizers
    if method == "kd":
        return lambda batch, _: lgtm.kd_step(teacher, student, s_opt, batch, bf16=bf16)
    if method == "online":
        return lambda batch, _: lgtm.online_step(teacher, student, t_opt, s_opt, batch, bf16=bf16)
    step = lgtm.meta_step if method == "meta" else lgtm.lgtm_step
    return lambda batch, fb: step(teacher, student, t_opt, s_opt, batch, fb, influence=influence, bf16=bf16)


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_step(args, models, batches, precision, method, influence, compiled=False):
    teacher, student, student_eager = models
    teacher = copy.deepcopy(teacher)
    student = copy.deepcopy(student_eager if influence == "exact" else student)
    if compiled:
        teacher.compile()
        student.compile()
    optimizers = (lgtm.make_optimizer(teacher, 3e-5, 0.0, 10_000, 0.0),
                  lgtm.make_optimizer(student, 5e-5, 0.0, 10_000, 0.0))
    step = step_function(method, influence, teacher, student, optimizers, PRECISIONS[precision][0])
    cuda = torch.device(args.device).type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.warmup + args.steps):
        sync(args.device)
        started = time.perf_counter()
        step(batches[0], batches[1])
        sync(args.device)
        times.append(time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated() / 2 ** 20 if cuda else None
    del teacher, student, optimizers
    return statistics.median(times[args.warmup:]), peak


# ----------------------------------------------------------------------------------------------------------
# FD against exact influences at a given precision
# ----------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def unguarded_influence_passes():
    """What the FD passes would give if they ran at the surrounding precision (to show what the guard buys)."""
    guard = lgtm.full_precision
    lgtm.full_precision = lambda device: contextlib.nullcontext()
    try:
        yield
    finally:
        lgtm.full_precision = guard


def influence_and_gradient(kind, teacher, student, batch, v, bf16):
    """w_i and grad_θt of the influence objective, all under the given precision (as a trainer that wraps its
    whole step in autocast would run it)."""
    influence = lgtm.influence_fd if kind == "fd" else lgtm.influence_exact
    with lgtm.autocast(batch["labels"].device, bf16):
        t_logits = teacher(**lgtm.model_inputs(batch)).logits
        w = influence(student, v, lgtm.model_inputs(batch), t_logits, lgtm.distillation_loss)
    grads = torch.autograd.grad(lgtm.influence_objective(w, 5e-5, 0.0), list(teacher.parameters()))
    return w.detach().double(), torch.cat([g.flatten().double() for g in grads])


def agreement(args, models, precision, batch_pairs):
    """Worst over the batches: corr(w_FD, w_exact) and cos(teacher gradients), FD at `precision` against the
    exact path at the same precision and against strict fp32 (TF32 off, no autocast)."""
    teacher, _, student = models  # eager student: the exact path needs it
    teacher, student = teacher.eval(), student.eval()
    bf16, matmul = PRECISIONS[precision]
    rows = {}
    for batch, feedback in batch_pairs:
        # v after an SGD look-ahead step, as in training; shared by every variant so only the influence differs.
        torch.set_float32_matmul_precision("highest")
        with torch.no_grad():
            t_logits = teacher(**lgtm.model_inputs(batch)).logits
        loss = lgtm.distillation_loss(student(**lgtm.model_inputs(batch)).logits, t_logits).mean()
        grads = torch.autograd.grad(loss, list(student.parameters()))
        theta_next = lgtm.lookahead_params(student, grads, torch.optim.SGD(student.parameters(), lr=5e-5))
        v, _ = lgtm.feedback_gradient(student, theta_next, feedback)
        w_ref, g_ref = influence_and_gradient("exact", teacher, student, batch, v, bf16=False)
        torch.set_float32_matmul_precision(matmul)
        variants = {"fd": lambda: influence_and_gradient("fd", teacher, student, batch, v, bf16),
                    "exact": lambda: influence_and_gradient("exact", teacher, student, batch, v, bf16)}
        results = {k: f() for k, f in variants.items()}
        if precision != "fp32":
            with unguarded_influence_passes():
                results["fd, passes unguarded"] = variants["fd"]()
        for name, (w, g) in results.items():
            corr_same = torch.corrcoef(torch.stack([w, results["exact"][0]]))[0, 1].item()
            corr_ref = torch.corrcoef(torch.stack([w, w_ref]))[0, 1].item()
            cos_same = torch.nn.functional.cosine_similarity(g, results["exact"][1], dim=0).item()
            cos_ref = torch.nn.functional.cosine_similarity(g, g_ref, dim=0).item()
            worst = rows.get(name, (1, 1, 1, 1))
            rows[name] = tuple(min(a, b) for a, b in zip(worst, (corr_same, cos_same, corr_ref, cos_ref)))
    torch.set_float32_matmul_precision("highest")
    return rows


def main(argv=None):
    args = parse_args(argv)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    models = tuple(m.to(args.device) for m in build_models(args))
    vocab = models[0].config.vocab_size
    batches = (random_batch(args, vocab, 0), random_batch(args, vocab, 1))
    device_name = torch.cuda.get_device_name(args.device) if torch.device(args.device).type == "cuda" else \
        f"CPU ({torch.get_num_threads()} threads)"
    count = lambda m: sum(p.numel() for p in m.parameters()) / 1e6
    print(f"device: {device_name}; torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"teacher {models[0].config.num_hidden_layers} layers ({count(models[0]):.0f}M), student "
          f"{models[1].config.num_hidden_layers} layers ({count(models[1]):.0f}M); batch {args.batch_size} x seq "
          f"{args.seq_length}; median of {args.steps} steps after {args.warmup} warm-up")
    for precision in args.precision:
        torch.set_float32_matmul_precision(PRECISIONS[precision][1])
        print(f"\n{precision}:  {'step':24} {'attention':9} {'ms/step':>9} {'samples/s':>10} {'peak MiB':>9} "
              f"{'x kd':>6}")
        kd_seconds = None
        rows = [(m, i, False) for m, i in STEPS] + ([("kd", "-", True), ("lgtm", "fd", True)] if args.compile else [])
        for method, influence, compiled in rows:
            seconds, peak = time_step(args, models, batches, precision, method, influence, compiled)
            kd_seconds = kd_seconds or seconds
            name = (method if influence == "-" else f"{method} ({influence})") + (", compiled" if compiled else "")
            attention = "eager" if influence == "exact" else "sdpa"
            peak_text = f"{peak:9.0f}" if peak is not None else f"{'-':>9}"
            print(f"{'':7}{name:24} {attention:9} {1000 * seconds:9.1f} {args.batch_size / seconds:10.1f} "
                  f"{peak_text} {seconds / kd_seconds:6.2f}", flush=True)
        torch.set_float32_matmul_precision("highest")
    if args.agreement_batches:
        pairs = [(random_batch(args, vocab, 10 + 2 * i), random_batch(args, vocab, 11 + 2 * i))
                 for i in range(args.agreement_batches)]
        print(f"\nFD (r = 0.01) vs exact influences, worst of {len(pairs)} batches. same: against the exact path at "
              f"the same precision; fp32: against the exact path in strict fp32")
        print(f"{'precision':10} {'influence':22} {'corr w (same)':>14} {'cos grad (same)':>16} {'corr w (fp32)':>14} "
              f"{'cos grad (fp32)':>16}")
        for precision in args.precision:
            for name, (corr_same, cos_same, corr_ref, cos_ref) in agreement(args, models, precision, pairs).items():
                print(f"{precision:10} {name:22} {corr_same:14.6f} {cos_same:16.6f} {corr_ref:14.6f} {cos_ref:16.6f}",
                      flush=True)


if __name__ == "__main__":
    main()
