"""The one training loop every method uses, on accelerate.

`Trainer(run, method).train()`:

1. creates the `Accelerator` (mixed precision, gradient accumulation) and the run directory
   (`config.yaml`, `logs/` for TensorBoard, `checkpoints/`, `samples/`);
2. lets the method load its model and data, prepares the trainable module, the optimizer
   (`train.optimizer`: AdamW or 8-bit AdamW, `mmalign.train.optim`) and the LR
   schedule with accelerate;
3. resumes from the newest complete checkpoint when there is one (weights, optimizer,
   scheduler, RNG states, data epoch and position), otherwise evaluates the starting model;
4. runs `max_steps` optimizer steps: each step is `gradient_accumulation_steps` micro-batches
   through `method.compute_loss`, clipped and stepped; logs every `log_every`, evaluates every
   `eval.every`, checkpoints every `checkpoint_every` (and at the last step);
5. evaluates the final model, saves it, and writes `report.md` / `report.json`.

The reward-hacking monitor (`eval.monitor`, `mmalign.train.monitor`) judges every evaluation when
its action is not `off`: the best weights by its metric go to `best/`; on `warn` a firing is printed,
logged and recorded; on `stop` the first firing ends training (a checkpoint is written there), the
best weights are loaded back, evaluated and saved as `final/`.

Data order: one seeded permutation per epoch; the global micro-batch is split over processes
by accelerate (`split_batches=True`), so N processes see exactly the samples one process would.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.data_loader import prepare_data_loader
from accelerate.utils import DataLoaderConfiguration, DistributedType, GradientAccumulationPlugin, broadcast, set_seed
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from mmalign.config import ConfigError, RunConfig, dump_config
from mmalign.data.video import write_video
from mmalign.io import atomic_directory, atomic_write_json, atomic_write_text
from mmalign.train import checkpoint as ckpt
from mmalign.train import monitor, sharding
from mmalign.train.method import Evaluation, Method
from mmalign.train.optim import build_optimizer
from mmalign.train.report import sample_stem, write_report
from mmalign.train.rundir import check_config

#: the monitor's verdict on an evaluation, as broadcast from the main process
_GO, _STOP, _FAILED = 0, 1, 2


def _has_accelerator() -> bool:
    xpu = getattr(torch, "xpu", None)
    return torch.cuda.is_available() or torch.backends.mps.is_available() or bool(xpu and xpu.is_available())


@contextlib.contextmanager
def _scratch_directory() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as scratch:
        yield Path(scratch)


class EpochSampler(torch.utils.data.Sampler[int]):
    """A seeded permutation of `range(n)` for one epoch, starting at `start` (for resume)."""

    def __init__(self, n: int, seed: int, epoch: int, start: int = 0):
        self.n, self.seed, self.epoch, self.start = n, seed, epoch, start

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        yield from torch.randperm(self.n, generator=generator)[self.start :].tolist()

    def __len__(self) -> int:
        return self.n - self.start


@dataclass
class TrainerState:
    """Where the run is; saved in every checkpoint."""

    step: int = 0
    epoch: int = 0
    position: int = 0  # samples of the current epoch already consumed (global)
    # {"step", "train_seconds", "metrics"}; "restored_from": step, for the evaluation of weights restored after a stop
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    train_log: list[dict[str, float]] = field(default_factory=list)  # logged training metrics
    seconds: float = 0.0  # time in training steps (not evaluation), over (possibly interrupted) sessions
    monitor: list[dict[str, Any]] = field(default_factory=list)  # the monitor's firings (`monitor.event`)

    @property
    def stopped(self) -> dict[str, Any] | None:
        """The monitor's stop event, if it stopped the run."""
        return next((e for e in self.monitor if e["action"] == "stop"), None)


class Trainer:
    def __init__(self, run: RunConfig, method: Method):
        self.run, self.method = run, method
        self.out = Path(run.output_dir)
        t = run.train
        # The loop fixes the step structure (accumulation micro-steps per optimizer step), so an
        # epoch boundary must not force an early synchronisation.
        self.accelerator = Accelerator(
            **sharding.accelerator_options(_has_accelerator()),
            mixed_precision=t.mixed_precision,
            gradient_accumulation_plugin=GradientAccumulationPlugin(
                num_steps=t.gradient_accumulation_steps, sync_with_dataloader=False
            ),
            dataloader_config=DataLoaderConfiguration(split_batches=True),
        )
        sharding.use_fsdp_on_cpu(self.accelerator)
        sharding.check_supported(self.accelerator, t)
        sharding.configure_deepspeed(self.accelerator, t)
        if t.batch_size % self.accelerator.num_processes:
            raise ConfigError(
                f"train.batch_size={t.batch_size} must be divisible by the {self.accelerator.num_processes} processes"
            )
        if t.threads:
            torch.set_num_threads(t.threads)
        self.state = TrainerState()
        self.writer = None
        self.monitor = getattr(run.eval, "monitor", None)
        self.stopping = False  # the monitor stopped the run (known to every process)

    # ------------------------------------------------------------------ run directory
    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def sharded(self) -> bool:
        """FSDP: the trainable module is sharded, so its forwards and the reads of its state are collectives
        every process joins (evaluation, checkpoints, the final save)."""
        return self.accelerator.is_fsdp2

    @property
    def gathered(self) -> bool:
        """The reads of the trained state are collectives every process joins (checkpoints, the monitor's
        best weights, the final save): FSDP, or DeepSpeed ZeRO, whose optimizer partitions the float32
        masters and the optimizer state."""
        return self.sharded or self.accelerator.distributed_type == DistributedType.DEEPSPEED

    def _prepare_run_dir(self) -> tuple[Path, dict[str, Any]] | None:
        """Create or check the run directory; return the checkpoint to resume from and its contents, if any."""
        config_text = dump_config(self.run)
        config_file = self.out / "config.yaml"
        root = self.out / "checkpoints"
        resume_from = None
        if check_config(self.out, self.run):
            resume_from = ckpt.read_newest_intact(root, self.accelerator.process_index, self.accelerator.print)
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            ckpt.remove_partial(root)
            ckpt.remove_partial(self.out)
            if resume_from is None:
                for stale in ckpt.checkpoint_dirs(root):
                    shutil.rmtree(stale)
                for name in ("report.md", "report.json"):
                    (self.out / name).unlink(missing_ok=True)
                shutil.rmtree(self.out / monitor.BEST_DIR, ignore_errors=True)
            atomic_write_text(config_file, config_text)
        self.accelerator.wait_for_everyone()
        return resume_from

    # ------------------------------------------------------------------ data
    def _micro_batches(self):
        """Yield micro-batches forever, advancing `state.epoch` / `state.position` as it goes."""
        dataset = self.method.train_dataset()
        if dataset is None:  # online method: batches come from the current policy
            while True:
                yield None
        batch_size = self.run.train.batch_size
        if len(dataset) < batch_size:
            raise ConfigError(f"the training set has {len(dataset)} items, fewer than train.batch_size={batch_size}")
        while True:
            if self.state.position + batch_size > len(dataset):
                self.state.epoch, self.state.position = self.state.epoch + 1, 0
            if hasattr(dataset, "set_epoch"):
                dataset.set_epoch(self.state.epoch)
            loader = torch.utils.data.DataLoader(
                dataset,
                batch_size=batch_size,
                sampler=EpochSampler(len(dataset), self.run.seed, self.state.epoch, self.state.position),
                drop_last=True,
                collate_fn=self.method.collate,
            )
            loader = prepare_data_loader(
                loader,
                device=self.accelerator.device,
                num_processes=self.accelerator.num_processes,
                process_index=self.accelerator.process_index,
                split_batches=True,
                put_on_device=True,
            )
            for batch in loader:
                self.state.position += batch_size
                yield batch
            self.state.epoch, self.state.position = self.state.epoch + 1, 0

    # ------------------------------------------------------------------ logging
    def _log(self, scalars: dict[str, float], step: int, prefix: str) -> None:
        if self.writer is not None:
            for key, value in scalars.items():
                self.writer.add_scalar(f"{prefix}/{key}", value, step)
            self.writer.flush()

    def _evaluate(self, step: int, restored_from: int | None = None) -> Evaluation | None:
        """Evaluate on the main process (sampling needs no collective ops); the others wait. The monitor
        judges the evaluation and every process learns whether it stops the run. `restored_from`: the
        step whose best weights were restored after a stop (an evaluation the monitor passes over)."""
        result = self.method.evaluate(step) if self.is_main or self.sharded else None
        weights = self.method.trainable_state_dict() if self.gathered and monitor.is_on(self.monitor) else None
        verdict: int | BaseException = _GO
        if result is not None and self.is_main:
            entry = {"step": step, "train_seconds": round(self.state.seconds, 2), "metrics": result.metrics}
            if restored_from is not None:
                entry["restored_from"] = restored_from
            self.state.evaluations.append(entry)
            self._log(result.metrics, step, "eval" if restored_from is None else "final")
            if result.grid is not None:
                samples = self.out / "samples"
                samples.mkdir(exist_ok=True)
                stem = sample_stem(entry)
                result.grid.save(samples / f"{stem}.png")
                if result.animation:
                    frames = np.stack([np.asarray(frame.convert("RGB")) for frame in result.animation])
                    write_video(samples / f"{stem}.gif", frames, result.fps)
                if self.writer is not None:
                    tag = "samples" if restored_from is None else "final/samples"
                    self.writer.add_image(tag, np.asarray(result.grid), step, dataformats="HWC")
            atomic_write_json(self.out / "evaluations.json", self.state.evaluations)
            if monitor.is_on(self.monitor) and restored_from is None:
                try:
                    verdict = self._watch(step, weights)
                except Exception as exc:  # raised below, once every process knows
                    verdict = exc
        if monitor.is_on(self.monitor) and self._agree(verdict) == _STOP:
            self.stopping = True
        self.accelerator.wait_for_everyone()
        return result

    def _agree(self, verdict: int | BaseException) -> int:
        """The main process's verdict, on every process (`_GO`, `_STOP`); `_FAILED` or an exception raises
        on every process (the exception itself on the process that has it)."""
        if isinstance(verdict, BaseException):
            error, verdict = verdict, _FAILED
        else:
            error = None
        if self.accelerator.num_processes > 1:
            flag = torch.tensor([verdict], dtype=torch.int64, device=self.accelerator.device)
            verdict = int(broadcast(flag, from_process=0).item())
        if verdict == _FAILED:
            if error is not None:
                raise error
            raise RuntimeError("the reward-hacking monitor failed on the main process (its error is above)")
        return verdict

    def _watch(self, step: int, weights: dict[str, torch.Tensor] | None) -> int:
        """The monitor's verdict on the evaluation just appended (main process): keep the best weights
        (`weights`, when already gathered), report a firing; `_STOP` when it ends the run."""
        config = self.monitor
        metric = monitor.metric_name(config, self.method.gold_metric())
        verdict = monitor.assess(self.state.evaluations, config, metric)
        if verdict.new_best:
            best = self.method.trainable_state_dict() if weights is None else weights
            monitor.write_best(self.out, best, verdict.best)
        if self.writer is not None:
            self.writer.add_scalar(monitor.HACKING_TAG, float(verdict.firing is not None), step)
            self.writer.flush()
        if verdict.firing is None:
            return _GO
        record = monitor.event(verdict.firing, config, metric, verdict.best)
        self.state.monitor.append(record)
        if config.action == "stop":
            self.accelerator.print(f"reward hacking at step {step}: {record['message']}; stopping training")
            return _STOP
        self.accelerator.print(f"warning: reward hacking? at step {step}, {record['message']}")
        return _GO

    def _restore_best(self) -> None:
        """Load the best-by-monitor weights of `best/` into the method on every process (after a stop)."""
        self.accelerator.wait_for_everyone()
        verdict: int | BaseException = _GO
        if self.is_main:
            try:
                expected = self.state.stopped["best"]
                folder = self.out / monitor.BEST_DIR
                if not (folder / monitor.BEST_JSON).is_file():
                    raise ckpt.CheckpointError(f"{folder} is missing; the run cannot restore its best weights")
                recorded = json.loads((folder / monitor.BEST_JSON).read_text())
                if recorded != expected:
                    raise ckpt.CheckpointError(
                        f"{folder / monitor.BEST_JSON} records {recorded}, but the run's evaluations make "
                        f"{expected} the best; set train.resume=false to start the run over"
                    )
            except Exception as exc:  # raised below, once every process knows
                verdict = exc
        self._agree(verdict)
        _, weights = monitor.read_best(self.out)
        self.method.load_trainable_state_dict(weights)

    # ------------------------------------------------------------------ main loop
    def train(self) -> dict[str, Any]:
        acc, t = self.accelerator, self.run.train
        resume_from = self._prepare_run_dir()
        set_seed(self.run.seed)  # model initialisation (e.g. LoRA matrices) is part of the run's seed
        self.method.setup(acc)
        module = self.method.trainable_module()
        params = [p for p in module.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the method exposes no trainable parameters")
        optimizer = build_optimizer(params, t)
        scheduler = get_scheduler(
            t.lr_scheduler, optimizer, num_warmup_steps=t.warmup_steps, num_training_steps=t.max_steps
        )
        module, optimizer, scheduler = acc.prepare(module, optimizer, scheduler)
        params = [p for group in optimizer.param_groups for p in group["params"]]  # FSDP2's shards are new objects
        self.method.set_trainable_module(module)

        if resume_from is not None:
            resume_from, saved = resume_from
            try:
                self.method.load_trainable_state_dict(saved["trainable"])
            except (KeyError, ValueError, RuntimeError) as exc:  # names or shapes this model does not have
                message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
                raise ckpt.CheckpointError(
                    f"{resume_from / 'trainable.safetensors'} does not fit this run's model ({message}); remove "
                    "the checkpoint to resume from an earlier one"
                ) from None
            ckpt.restore_optimizer(optimizer.optimizer, saved["optimizer"], module)
            scheduler.scheduler.load_state_dict(saved["scheduler"])
            ckpt.restore_rng(saved["rng"])
            self.state = TrainerState(**saved["trainer_state"])
            self.stopping = self.state.stopped is not None
            acc.print(f"resumed from {resume_from} at step {self.state.step}")
        if self.is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.out / "logs"), purge_step=self.state.step + 1)
        if resume_from is None:
            self._evaluate(0)

        batches = self._micro_batches()
        progress = tqdm(
            total=t.max_steps,
            initial=self.state.step,
            desc=self.run.recipe or self.run.method,
            disable=not self.is_main,
            unit="step",
        )
        totals: dict[str, float] = {}
        count = 0
        while self.state.step < t.max_steps and not self.stopping:
            step = self.state.step
            step_start = time.perf_counter()
            for micro in range(t.gradient_accumulation_steps):
                batch = next(batches)
                if batch is None:
                    batch = self.method.next_batch(step, micro)
                with acc.accumulate(module):
                    with acc.autocast():
                        loss, metrics = self.method.compute_loss(batch, step, micro)
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"non-finite loss {loss.item()} at step {step}, micro-batch {micro}")
                    acc.backward(loss)
                    if acc.sync_gradients:
                        metrics = {**metrics, "grad_norm": self._clip(params)}
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                for key, value in {"loss": loss.detach(), **metrics}.items():
                    totals[key] = totals.get(key, 0.0) + float(
                        acc.reduce(torch.as_tensor(value, device=acc.device, dtype=torch.float32), "mean")
                    )
                count += 1
            self.state.step += 1
            self.method.after_optimizer_step(self.state.step)
            self.state.seconds += time.perf_counter() - step_start
            progress.update(1)
            if self.state.step % t.log_every == 0 or self.state.step == t.max_steps:
                means = {k: v / count for k, v in totals.items()}
                means["lr"] = scheduler.get_last_lr()[0]
                self.state.train_log.append({"step": self.state.step, **means})
                self._log(means, self.state.step, "train")
                progress.set_postfix(loss=f"{means['loss']:.4f}")
                totals, count = {}, 0
            if self.run.eval.every and self.state.step % self.run.eval.every == 0 and self.state.step < t.max_steps:
                self._evaluate(self.state.step)
            if (
                (t.checkpoint_every and self.state.step % t.checkpoint_every == 0)
                or self.state.step == t.max_steps
                or self.stopping  # a rerun of a stopped run resumes at the stop
            ):
                self._checkpoint(module, optimizer, scheduler)
        progress.close()
        return self._finish()

    def _clip(self, params: list[torch.nn.Parameter]) -> float:
        max_norm = self.run.train.max_grad_norm
        norm = self.accelerator.clip_grad_norm_(params, max_norm if max_norm is not None else math.inf)
        return float(norm) if norm is not None else math.nan  # DeepSpeed: the norm of its last step

    def _checkpoint(self, module, optimizer, scheduler) -> None:
        acc = self.accelerator
        root = self.out / "checkpoints"
        state = self.state.__dict__.copy()
        gather = self.is_main or self.gathered  # a partitioned state is gathered by every process
        ckpt.write_checkpoint(
            root,
            self.state.step,
            trainable=self.method.trainable_state_dict() if gather else {},
            optimizer=ckpt.optimizer_state(optimizer.optimizer, module) if gather else {},
            scheduler=scheduler.scheduler,
            trainer_state=state,
            process_index=acc.process_index,
            is_main=self.is_main,
            barrier=acc.wait_for_everyone,
        )
        if self.is_main:
            ckpt.prune(root, self.run.train.keep_checkpoints)

    def _final_directory(self) -> contextlib.AbstractContextManager[Path]:
        """Where `save_final` writes: `final/` (atomically) on the main process; a scratch folder, removed
        afterwards, on the others (which save only to join the gathers of a sharded model)."""
        if self.is_main:
            return atomic_directory(self.out / "final")
        return _scratch_directory()

    def _finish(self) -> dict[str, Any]:
        acc = self.accelerator
        acc.wait_for_everyone()
        if not self.stopping:
            self._evaluate(self.state.step)  # the monitor may stop the run here too
        if self.stopping:
            self._restore_best()
            stopped = self.state.stopped  # None on the other processes, which keep no evaluations
            self._evaluate(self.state.step, restored_from=stopped["best"]["step"] if stopped else None)
            if stopped is not None:
                acc.print(f"{monitor.stop_line(stopped)}; saving them as final/")
        report: dict[str, Any] = {}
        if self.is_main or self.gathered:  # a partitioned state is gathered by every process
            with self._final_directory() as directory, sharding.whole_state_dicts(self.method.trainable_module()):
                saved = self.method.save_final(directory)
        if self.is_main:
            report = write_report(
                self.out,
                self.run,
                self.method.gold_metric(),
                self.state,
                saved=[f"final/{p}" for p in saved],
                num_processes=acc.num_processes,
                description=self.method.report_description(),
                data=self.method.data_used(),
            )
            if self.writer is not None:
                self.writer.close()
        acc.wait_for_everyone()
        return report
