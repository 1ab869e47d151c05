"""Cost of one training step of each method, and finite differences against exact influences.

    python benchmark.py                                # the paper's size: BERT-base and 6 layers
    python benchmark.py --size small --device cpu      # a small config a CPU runs in a minute
    python benchmark.py --teacher DIR --student-layers 3   # real checkpoints
    python benchmark.py --compile                      # kd and lgtm also with compiled models
    python benchmark.py --causal-lm --size small --device cpu   # random Llamas on sequences

Every row runs lgtm.STEPS[method] on fresh copies of the same models and the same two batches
(full-length sequences): the median ms per step over --steps after --warmup, samples/s, peak GPU
memory, and the cost as a multiple of the kd step at the same precision. fp32: IEEE fp32; tf32:
TF32 matmuls (CUDA; lgtm.py's default there); bf16: bf16 autocast with TF32, as lgtm.py runs it.
The influence passes run in strict fp32 whatever the precision. Then the agreement of FD with the
exact influences: the correlation of the w_i and the cosine of the teacher gradients, against the
exact path at the same precision and against the exact path in strict fp32. With --causal-lm the
models are random Llamas (vocabulary 32,000) and each sequence's first half is its prompt,
labelled -100: the loss terms are the second half's tokens.
"""

import argparse
import copy
import statistics
import time

import torch
import transformers

import lgtm

ROWS = [("kd", "fd"), ("online", "fd"), ("meta", "fd"), ("lgtm", "fd"), ("lgtm", "exact")]
SIZES = {"base": ((12, 768, 12, 3072), (6, 768, 12, 3072)),  # layers, hidden, heads, intermediate
         "small": ((4, 256, 4, 1024), (2, 256, 4, 1024))}
LLAMA_VOCABULARY = 32_000
MATMUL = {"fp32": "highest", "tf32": "high", "bf16": "high"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=lgtm.HelpFormatter)
    p.add_argument("--size", choices=SIZES, default="base", help="random BERTs of this size")
    p.add_argument("--teacher", help="a checkpoint (Hub name or folder) instead of random BERTs")
    p.add_argument("--student", help="the student's checkpoint (default: --teacher)")
    p.add_argument("--student-layers", type=lgtm.COUNT, help="keep the student's first N layers")
    p.add_argument("--batch-size", type=lgtm.COUNT, default=32, help="sequences per batch")
    p.add_argument("--seq-length", type=lgtm.COUNT, default=128, help="tokens per sequence")
    p.add_argument("--steps", type=lgtm.COUNT, default=20, help="timed steps per row")
    p.add_argument("--warmup", type=lgtm.number(int, lambda x: x >= 0, ">= 0"), default=3,
                   help="untimed steps first (allocator, kernels, autotuning)")
    p.add_argument("--precision", nargs="+", choices=MATMUL, help="default: fp32 tf32 bf16 on "
                   "a GPU, fp32 on a CPU")
    p.add_argument("--agreement-batches", type=lgtm.number(int, lambda x: x >= 0, ">= 0"),
                   default=2, help="batches of the FD-against-exact check; 0: skip it")
    p.add_argument("--compile", action="store_true", help="also kd and lgtm, compiled")
    p.add_argument("--causal-lm", action="store_true", help="random Llamas of --size on "
                   "sequences, the second half of each labelled, instead of BERT classifiers")
    p.add_argument("--device", help="cpu or cuda (default: cuda where there is one)")
    args = p.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.precision is None:
        args.precision = ["fp32"]
        if args.device != "cpu":
            args.precision = ["fp32", "tf32", "bf16"]
    return args


def build_models(args):
    """Teacher, student, and the same student with eager attention (the exact path needs it)."""
    if args.teacher:
        student_name = args.student or args.teacher
        teacher, _ = lgtm.load_model(args.teacher, "--teacher", 2)
        student, _ = lgtm.load_model(student_name, "--student", 2, args.student_layers, "sdpa")
        student_eager, _ = lgtm.load_model(student_name, "--student", 2, args.student_layers,
                                           "eager")
        return teacher, student, student_eager
    teacher_shape, student_shape = SIZES[args.size]
    torch.manual_seed(0)
    teacher = random_model(args, teacher_shape, "sdpa")
    student = random_model(args, student_shape, "sdpa")
    student_eager = random_model(args, student_shape, "eager")
    student_eager.load_state_dict(student.state_dict())
    return teacher, student, student_eager


def random_model(args, shape, attention):
    """A random BERT classifier, or with --causal-lm a random Llama."""
    layers, hidden, heads, intermediate = shape
    if args.causal_lm:
        config = transformers.LlamaConfig(vocab_size=LLAMA_VOCABULARY, num_hidden_layers=layers,
                                          hidden_size=hidden, num_attention_heads=heads,
                                          intermediate_size=intermediate,
                                          max_position_embeddings=args.seq_length,
                                          attn_implementation=attention)
        return transformers.LlamaForCausalLM(config)
    config = transformers.BertConfig(num_hidden_layers=layers, hidden_size=hidden,
                                     num_attention_heads=heads, intermediate_size=intermediate,
                                     num_labels=2, attn_implementation=attention)
    return transformers.BertForSequenceClassification(config)


def random_batch(args, vocab_size, seed):
    """Full-length random sequences: with two labels, or with --causal-lm labelled as a causal-LM
    collator labels them, the first half (the prompt) -100."""
    g = torch.Generator().manual_seed(seed)
    shape = (args.batch_size, args.seq_length)
    ids = torch.randint(1000, vocab_size, shape, generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones(shape, dtype=torch.long)}
    if args.causal_lm:
        batch["labels"] = ids.clone()
        batch["labels"][:, :args.seq_length // 2] = -100
    else:
        batch["token_type_ids"] = torch.zeros(shape, dtype=torch.long)
        batch["labels"] = torch.randint(0, 2, (args.batch_size,), generator=g)
    return lgtm.to_device(batch, args.device)


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_step(args, models, batches, precision, method, influence, compiled=False):
    """The median seconds of a step of the method on fresh copies of the models, and the peak
    GPU memory in MiB (None on a CPU)."""
    teacher, student, student_eager = models
    teacher = copy.deepcopy(teacher)
    if influence == "exact":
        student = copy.deepcopy(student_eager)
    else:
        student = copy.deepcopy(student)
    if compiled:
        torch._dynamo.reset()  # graphs compiled for the models of other rows stay out
        lgtm.compile_models(teacher, student)
    teacher_optimizer, _ = lgtm.make_optimizer(teacher, 3e-5, 10_000)
    student_optimizer, _ = lgtm.make_optimizer(student, 5e-5, 10_000)
    opts = lgtm.Options(influence=influence)
    device_type = torch.device(args.device).type
    if device_type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.warmup + args.steps):
        sync(args.device)
        started = time.perf_counter()
        with torch.autocast(device_type, torch.bfloat16, enabled=precision == "bf16"):
            lgtm.STEPS[method](teacher, student, teacher_optimizer, student_optimizer, *batches,
                               opts)
        sync(args.device)
        times.append(time.perf_counter() - started)
    peak = None
    if device_type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2 ** 20
    return statistics.median(times[args.warmup:]), peak


def influence_and_gradient(influence, teacher, student, batch, v, precision):
    """w_i and the teacher gradient of the influence objective, the teacher's logits taken at
    the given precision (the influence passes themselves always run in strict fp32)."""
    torch.set_float32_matmul_precision(MATMUL[precision])
    with torch.autocast(batch["labels"].device.type, torch.bfloat16, enabled=precision == "bf16"):
        t_logits = lgtm.forward(teacher, batch, dropout=False)
    fn = lgtm.influence_fd if influence == "fd" else lgtm.influence_exact
    w = fn(student, v, batch, t_logits, lgtm.Options())
    grads = torch.autograd.grad(lgtm.influence_objective(w, 5e-5), list(teacher.parameters()))
    torch.set_float32_matmul_precision("highest")
    return w.detach().double(), torch.cat([g.flatten().double() for g in grads])


def agreement(args, models, precision, batch_pairs):
    """Worst over the batches: corr(w FD, w exact) and cos(teacher gradients) of FD at the
    precision against exact at the same precision, and against exact in strict fp32."""
    teacher, _, student = (m.eval() for m in models)  # eager student: the exact path needs it
    worst = [1.0] * 4
    for batch, feedback in batch_pairs:
        params = lgtm.trainable(student)  # v after an SGD look-ahead step, as in training
        teacher_logits = lgtm.forward(teacher, batch, dropout=False).detach()
        student_logits = lgtm.forward(student, batch, dropout=False)
        loss = lgtm.distillation_loss(student_logits, teacher_logits).mean()
        grads = torch.autograd.grad(loss, list(params.values()))
        theta_next = lgtm.look_ahead(params, grads, None, 5e-5, "sgd")
        v, _ = lgtm.feedback_gradient(student, theta_next, [feedback])
        w_fd, g_fd = influence_and_gradient("fd", teacher, student, batch, v, precision)
        w_exact, g_exact = influence_and_gradient("exact", teacher, student, batch, v, precision)
        w_ref, g_ref = influence_and_gradient("exact", teacher, student, batch, v, "fp32")
        figures = (correlation(w_fd, w_exact), cosine(g_fd, g_exact), correlation(w_fd, w_ref),
                   cosine(g_fd, g_ref))
        worst = [min(x, y) for x, y in zip(worst, figures)]
    return worst


def correlation(a, b):
    return torch.corrcoef(torch.stack([a, b]))[0, 1].item()


def cosine(a, b):
    return torch.nn.functional.cosine_similarity(a, b, dim=0).item()


def parameters_in_millions(model):
    return sum(p.numel() for p in model.parameters()) / 1e6


def device_name(args):
    if torch.device(args.device).type == "cuda":
        return torch.cuda.get_device_name(args.device)
    return f"CPU ({torch.get_num_threads()} threads)"


def row_name(method, influence, compiled):
    name = method
    if method in ("meta", "lgtm"):
        name += f" ({influence})"
    if compiled:
        name += ", compiled"
    return name


def main(argv=None):
    args = parse_args(argv)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    models = tuple(m.to(args.device) for m in build_models(args))
    teacher, student, _ = models
    vocab = teacher.config.vocab_size
    batches = (random_batch(args, vocab, 0), random_batch(args, vocab, 1))
    print(f"device: {device_name(args)}; torch {torch.__version__}, transformers "
          f"{transformers.__version__}")
    print(f"{type(teacher).__name__}: teacher {teacher.config.num_hidden_layers} layers "
          f"({parameters_in_millions(teacher):.0f}M), student {student.config.num_hidden_layers} "
          f"layers ({parameters_in_millions(student):.0f}M); batch {args.batch_size} x seq "
          f"{args.seq_length}; median of {args.steps} steps after {args.warmup} warm-up")
    rows = [(method, influence, False) for method, influence in ROWS]
    if args.compile:
        rows += [("kd", "fd", True), ("lgtm", "fd", True)]
    for precision in args.precision:
        torch.set_float32_matmul_precision(MATMUL[precision])
        print(f"\n{precision}:  {'step':24} {'attention':9} {'ms/step':>9} {'samples/s':>10} "
              f"{'peak MiB':>9} {'x kd':>6}")
        kd_seconds = None
        for method, influence, compiled in rows:
            seconds, peak = time_step(args, models, batches, precision, method, influence,
                                      compiled)
            if kd_seconds is None:
                kd_seconds = seconds
            attention = "sdpa"
            if influence == "exact":
                attention = "eager"
            peak_text = f"{'-':>9}"
            if peak is not None:
                peak_text = f"{peak:9.0f}"
            print(f"{'':7}{row_name(method, influence, compiled):24} {attention:9} "
                  f"{1000 * seconds:9.1f} {args.batch_size / seconds:10.1f} {peak_text} "
                  f"{seconds / kd_seconds:6.2f}", flush=True)
        torch.set_float32_matmul_precision("highest")
    if args.agreement_batches:
        print_agreement(args, models, vocab)


def print_agreement(args, models, vocab):
    pairs = [(random_batch(args, vocab, 10 + 2 * i), random_batch(args, vocab, 11 + 2 * i))
             for i in range(args.agreement_batches)]
    print(f"\nFD (r = 0.01) against exact influences, worst of {len(pairs)} batches; same: "
          f"exact at the same precision, fp32: exact in strict fp32")
    print(f"{'precision':10} {'corr w (same)':>14} {'cos grad (same)':>16} "
          f"{'corr w (fp32)':>14} {'cos grad (fp32)':>16}")
    for precision in args.precision:
        worst = agreement(args, models, precision, pairs)
        figures = " ".join(f"{x:{n}.6f}" for x, n in zip(worst, (14, 16, 14, 16)))
        print(f"{precision:10} {figures}", flush=True)


if __name__ == "__main__":
    main()
