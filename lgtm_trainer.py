"""LGTM inside Hugging Face's Trainer: the teacher learns with the student that Trainer trains.

    from lgtm_trainer import LGTMTrainer
    trainer = LGTMTrainer(model=student, teacher=teacher, feedback_dataset=held_out,
                          args=TrainingArguments(...), train_dataset=train,
                          data_collator=DataCollatorWithPadding(tokenizer))
    trainer.train()

Classifiers, or causal LMs with a causal-LM collator (DataCollatorForLanguageModeling(tokenizer,
mlm=False), or one that sets the prompt's labels to -100).

Trainer stays in charge of the student: its optimizer and schedule, gradient accumulation,
clipping (max_grad_norm), bf16, logging, evaluation and checkpoints. The teacher gets an AdamW of
its own (teacher_learning_rate) with the student's schedule (lr_scheduler_type, its kwargs and
warm-up), and its gradient is clipped to the same max_grad_norm. In each global step:

1. Trainer takes the step's micro-batches (gradient_accumulation_steps of them) together, and as
   many feedback micro-batches are taken with them;
2. lgtm.teacher_gradient over them (lines 2-8 of Algorithm 1: the look-ahead and v of the whole
   batch, w and the gradient one micro-batch at a time), then the teacher's optimizer steps;
3. each micro-batch's student loss against the updated teacher (line 9), weighted by its share
   of the step's loss terms (rows, or a causal LM's labelled tokens), is what Trainer
   backpropagates and steps with.

So each model is updated once per global step. The influence passes run in strict fp32 under
bf16: accelerate's autocast wrapper is taken off the student, and the step runs inside
accelerator.autocast() instead (Trainer's evaluations of the student then run in fp32). fp16 is
refused before any update, and so are the arguments that would change a student's loss that
LGTM computes itself (label_smoothing_factor, neftune_noise_alpha, compute_loss_func). On
several processes, the teacher starts from rank 0's weights and its gradients are averaged over
the processes by lgtm's own all-reduce. The teacher is saved with the student, in teacher/, and
a checkpoint keeps its trained weights, optimizer and schedule, restored by
train(resume_from_checkpoint=...) (the feedback batches then start again from the first).
The logs gain teacher_loss, feedback_loss, influence_aux_ratio and w_mean, each a mean since the
last log.
"""
import os

import torch
from transformers import Trainer
from transformers.optimization import get_scheduler
from transformers.trainer_utils import get_last_checkpoint

import lgtm

TEACHER_DIR = "teacher"
TEACHER_OPTIMIZER = "teacher_optimizer.pt"


class LGTMTrainer(Trainer):
    def __init__(self, *args, teacher, feedback_dataset, lgtm_options=lgtm.Options(),
                 teacher_learning_rate=3e-5, **kwargs):
        super().__init__(*args, **kwargs)
        refused = {"label_smoothing_factor": self.args.label_smoothing_factor or None,
                   "neftune_noise_alpha": self.args.neftune_noise_alpha,
                   "compute_loss_func": self.compute_loss_func}
        for name, value in refused.items():
            if value is not None:
                raise ValueError(f"LGTMTrainer computes the student's loss itself (lgtm."
                                 f"student_loss, in the look-ahead and in line 9): {name}="
                                 f"{value!r} would change it in part or not at all; leave it "
                                 f"unset")
        if lgtm_options.teacher_max_grad_norm:
            raise ValueError("LGTMTrainer clips the teacher to TrainingArguments.max_grad_norm, "
                             "as Trainer clips the student: leave "
                             "Options.teacher_max_grad_norm at 0 and set max_grad_norm")
        self.teacher = teacher.to(self.args.device)
        self.feedback_dataset = feedback_dataset
        self.lgtm_options = lgtm_options
        self.teacher_optimizer = torch.optim.AdamW(self.teacher.parameters(),
                                                   teacher_learning_rate, weight_decay=0.0)
        self.teacher_scheduler = None
        self.teacher_checkpoint = None  # the teacher_optimizer.pt that train() resumes from
        self.feedback_batches = None
        self.step_share = 1  # each process's share of the global step's loss terms
        self.lgtm_logs = []  # the teacher's logs since the last log, on the device

    def _set_signature_columns_if_needed(self):
        """Keeps the columns that the teacher takes too (a BERT teacher's token_type_ids, say,
        when the student is a DistilBERT), which Trainer would otherwise drop. Private: Trainer
        has no public hook for the columns it keeps."""
        super()._set_signature_columns_if_needed()
        for name in lgtm.MODEL_INPUTS:
            if name not in self._signature_columns:
                self._signature_columns.append(name)

    def train(self, resume_from_checkpoint=None, **kwargs):
        """Trainer's train(), the teacher resumed too: its trained weights now (a LoRA teacher's
        adapters), its optimizer and schedule as Trainer makes the student's. The feedback
        batches start again from the first, so a resumed run is not the run it continues."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
        if resume_from_checkpoint:
            path = os.path.join(resume_from_checkpoint, TEACHER_OPTIMIZER)
            self.teacher_checkpoint = torch.load(path, weights_only=True)
            trained = self.teacher_checkpoint["teacher"]
            self.teacher.load_state_dict({**self.teacher.state_dict(), **trained})
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def create_scheduler(self, num_training_steps, optimizer=None):
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        if self.teacher_scheduler is None:
            warmup = self.args.get_warmup_steps(num_training_steps)
            self.teacher_scheduler = get_scheduler(
                self.args.lr_scheduler_type, self.teacher_optimizer, warmup, num_training_steps,
                scheduler_specific_kwargs=self.args.lr_scheduler_kwargs)
        if self.teacher_checkpoint is not None:
            self.teacher_optimizer.load_state_dict(self.teacher_checkpoint["optimizer"])
            self.teacher_scheduler.load_state_dict(self.teacher_checkpoint["scheduler"])
            self.teacher_checkpoint = None
        return scheduler

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Trainer takes a global step's micro-batches together, which is when the teacher
        learns from all of them (lines 2-8), before the student's first micro-batch."""
        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        if batches:
            self.update_teacher([self._prepare_inputs(batch) for batch in batches])
        return batches, num_items

    def training_step(self, model, inputs, num_items_in_batch=None):
        """Line 9 on one micro-batch: its share of the student's loss against the teacher just
        updated."""
        model.train()
        inputs = self._prepare_inputs(inputs)
        with self.accelerator.autocast():
            loss, _ = lgtm.distillation(self.teacher, model, inputs, self.lgtm_options)
            loss = loss * (len(lgtm.term_labels(inputs)) / self.step_share)
        self.accelerator.backward(loss)  # a micro-batch without a labelled token adds 0
        return torch.nan_to_num(loss.detach())

    def update_teacher(self, batches):
        """Lines 2-8 over the global step's micro-batches, then the teacher's step."""
        terms = sum(len(lgtm.term_labels(batch)) for batch in batches)
        terms = torch.tensor(float(terms), device=self.args.device)
        if lgtm.distributed():  # Trainer averages the processes' losses: weigh by terms
            torch.distributed.all_reduce(terms)
            terms /= torch.distributed.get_world_size()
        self.step_share = float(terms)
        feedback = [next(self.feedback_iterator()) for _ in batches]
        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)  # the torch optimizer
        student = self.accelerator.unwrap_model(self.model_wrapped, keep_fp32_wrapper=False)
        if self.state.global_step == 0:
            lgtm.broadcast_weights(self.teacher)  # its gradients are averaged: equal start
        with self.accelerator.autocast():
            update = lgtm.teacher_gradient(self.teacher, student, optimizer, batches, feedback,
                                           self.lgtm_options)
        if self.args.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.teacher.parameters(), self.args.max_grad_norm)
        self.teacher_optimizer.step()
        self.teacher_scheduler.step()
        self.teacher_optimizer.zero_grad(set_to_none=True)
        self.lgtm_logs.append(update.logs)

    def feedback_iterator(self):
        """The feedback micro-batches z^e, shuffled, epoch after epoch."""
        if self.feedback_batches is None:
            dataset = self._remove_unused_columns(self.feedback_dataset, "feedback")
            generator = torch.Generator().manual_seed(self.args.seed)
            loader = torch.utils.data.DataLoader(dataset, self.args.per_device_train_batch_size,
                                                 shuffle=True, collate_fn=self.data_collator,
                                                 generator=generator)
            self.feedback_batches = lgtm.Batches(self.accelerator.prepare(loader))
        return self.feedback_batches

    def log(self, logs, start_time=None):
        """Trainer's training logs, with the teacher's means since the last log."""
        if "loss" in logs and self.lgtm_logs:
            for name in ("teacher_loss", "feedback_loss", "influence_aux_ratio"):
                values = torch.stack([step[name] for step in self.lgtm_logs])
                logs[name] = values.mean().item()
            logs["w_mean"] = torch.cat([step["w"] for step in self.lgtm_logs]).mean().item()
            self.lgtm_logs = []
        super().log(logs, start_time)

    def save_model(self, output_dir=None, _internal_call=False):
        """The student as Trainer saves it, and the teacher in teacher/; in a checkpoint
        (Trainer's internal call) also the teacher's optimizer and schedule."""
        super().save_model(output_dir, _internal_call)
        if not self.args.should_save:  # on several processes, the main one alone writes
            return
        output_dir = output_dir or self.args.output_dir
        self.teacher.save_pretrained(os.path.join(output_dir, TEACHER_DIR))
        if _internal_call and not self.args.save_only_model:  # what resuming needs, adapters too
            state = {"teacher": lgtm.trainable(self.teacher),
                     "optimizer": self.teacher_optimizer.state_dict(),
                     "scheduler": self.teacher_scheduler.state_dict()}
            torch.save(state, os.path.join(output_dir, TEACHER_OPTIMIZER))
