"""The training loop: SGD with momentum, learning-rate warmup then poly / step decay, optional bf16 /
fp16 autocast, ``torchrun`` data parallelism (InPlaceABNSync + DistributedDataParallel), ``--init-from``
a checkpoint's matching weights, validation every N steps keeping the best checkpoint, atomic
checkpoints and a resume that repeats the uninterrupted run."""

from __future__ import annotations

import math
import os
import statistics
import sys
import time
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .checkpoint import load_checkpoint, rng_states, save_checkpoint, set_rng_states
from .config import TrainConfig
from .data import ResumableSampler, SeededSamples, build_dataset, num_classes_of, splits
from .logs import VAL_COLUMNS, CsvLog, TensorBoardLog, plot_curves
from .memory import SavedTensorMeter, peak_cuda_bytes, resident_bytes
from .schedule import lr_factor_function

MIB = 1024**2
CHECKPOINT_NAME = "checkpoint.pt"
BEST_NAME = "best.pt"
INIT_REPORT_NAME = "init_report.json"


def make_norm_act(config: TrainConfig):
    from ..models import norm_act

    makers = {"inplace_abn": norm_act.inplace_abn, "abn": norm_act.abn, "batchnorm": norm_act.batchnorm_act}
    return makers[config.norm](config.activation, config.activation_param)


def build_model(config: TrainConfig, num_classes: int) -> torch.nn.Module:
    from ..models import build

    try:
        return build(config.network, norm_act=make_norm_act(config), num_classes=num_classes,
                     output_stride=config.stride, width_multiplier=config.width_multiplier,
                     **config.network_options)  # fmt: skip
    except TypeError as error:
        if not config.network_options:
            raise
        raise ValueError(f"network {config.network!r} does not take network_options "
                         f"{sorted(config.network_options)}: {error}") from error  # fmt: skip


def pick_device(choice: str, local_rank: int = 0) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' asked for, but CUDA is not available")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


class _Distributed:
    """This process's place in a ``torchrun`` job (world of one without it)."""

    def __init__(self, device_choice: str):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = pick_device(device_choice, self.local_rank)
        self.enabled = self.world_size > 1
        self.owns_group = False
        if self.enabled and not dist.is_initialized():
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            self.owns_group = True

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def average(self, value: float) -> float:
        if not self.enabled:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return float(tensor) / self.world_size

    def sum_array(self, array):
        """``array`` summed over the processes (integer counts stay exact in int64)."""
        import numpy as np

        tensor = torch.as_tensor(np.ascontiguousarray(array), dtype=torch.int64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.cpu().numpy()

    def close(self) -> None:
        if self.owns_group:
            dist.destroy_process_group()


class _Shard(torch.utils.data.Dataset):
    """The samples of ``dataset`` at ``indices``, keeping the dataset's class attributes."""

    def __init__(self, dataset, indices):
        self.dataset, self.indices = dataset, indices

    def __getattr__(self, name):
        if name in ("dataset", "indices"):
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        return self.dataset[self.indices[index]]


class Trainer:
    """One training run of :class:`TrainConfig`. ``resume`` is a checkpoint path to continue from, or
    ``True`` for the run's own ``<out_dir>/checkpoint.pt``, which starts from scratch (and says so)
    while that file does not exist yet, as a job on a preemptible cluster restarted with the same
    command needs. ``dataset`` replaces the configured training set (e.g. one already rendered).

        trainer = Trainer(config)
        summary = trainer.run()          # trains to the config's length, writes checkpoint, CSV, plot
        trainer.model                    # the trained network (unwrapped)
    """

    def __init__(self, config: TrainConfig, resume=None, quiet: bool = False, dataset=None):
        self.config = config.validate()
        self.quiet = quiet
        self.world = _Distributed(config.device)
        self.device = self.world.device
        torch.manual_seed(config.seed)

        train_split, _ = splits(config)
        self.dataset = build_dataset(config, train_split, train=True) if dataset is None else dataset
        self.num_classes = num_classes_of(self.dataset)
        self.batch_size = self._batch_size_per_process()
        per_step = self.batch_size * self.world.world_size
        if len(self.dataset) < per_step:
            raise ValueError(f"{len(self.dataset)} training samples are fewer than one step's batch ({per_step})")
        self.steps_per_epoch = len(self.dataset) // self.world.world_size // self.batch_size
        self.total_steps = config.steps
        if config.epochs is not None:
            self.total_steps = max(1, math.ceil(config.epochs * self.steps_per_epoch))

        self.checkpoint_path = os.path.join(config.out_dir, CHECKPOINT_NAME)
        self.best_path = os.path.join(config.out_dir, BEST_NAME)
        if resume is True and not os.path.isfile(self.checkpoint_path):
            self._say(f"--resume: no checkpoint in {config.out_dir} yet ({CHECKPOINT_NAME}): starting from scratch")
            resume = None

        self.model = build_model(config, self.num_classes)
        self.init_report = None
        if config.init_from and not resume:
            from .weights import init_from_checkpoint

            self.init_report = init_from_checkpoint(self.model, config.init_from, config.norm)
            self._say(self.init_report.summary())
            if self.world.main:
                self.init_report.write(os.path.join(config.out_dir, INIT_REPORT_NAME))
        self.model.to(self.device)
        if self.world.enabled:
            from .. import convert_sync_abn

            if config.norm == "batchnorm":
                self._say("warning: norm 'batchnorm' is not synchronized across processes (use inplace_abn)")
            elif config.sync_norm:
                self.model = convert_sync_abn(self.model)
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.network = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        else:
            self.network = self.model

        decay, no_decay = [], []
        for name, parameter in self.model.named_parameters():
            excluded = parameter.ndim <= 1 and not config.decay_norm_and_bias  # norm weights and biases
            (no_decay if excluded else decay).append(parameter)
        self.optimizer = torch.optim.SGD(
            [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=config.lr, momentum=config.momentum, nesterov=config.nesterov,
        )  # fmt: skip
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_factor_function(config, self.total_steps, self.steps_per_epoch)
        )
        self.autocast_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[config.amp]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.amp == "fp16")

        self.step, self.epoch, self.position = 0, 0, 0
        self.elapsed = 0.0
        self.step_times: list = []
        self.saved_bytes = 0
        self.best: Optional[Dict[str, Any]] = None  # {"metric", "value", "step"} of best.pt
        self._val_dataset = None
        if resume:
            self.load(self.checkpoint_path if resume is True else resume)

    def _batch_size_per_process(self) -> int:
        config, world = self.config, self.world.world_size
        if config.global_batch_size is None:
            return config.batch_size
        if config.global_batch_size % world:
            raise ValueError(f"global_batch_size {config.global_batch_size} does not split evenly over {world} "
                             f"processes: use a multiple of {world}, or batch_size (per process)")  # fmt: skip
        return config.global_batch_size // world

    # -- checkpoints ------------------------------------------------------------------------------

    def state(self) -> Dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "num_classes": self.num_classes,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "position": self.position,
            "elapsed": self.elapsed,
            "best": self.best,
            "rng": rng_states(),
        }

    def save(self, path: Optional[str] = None) -> None:
        if self.world.main:
            save_checkpoint(self.state(), path or self.checkpoint_path)
        self.world.barrier()

    def load(self, path: str) -> None:
        state = load_checkpoint(path, map_location=self.device)
        if state["num_classes"] != self.num_classes:
            raise ValueError(f"{path} has {state['num_classes']} classes, the dataset {self.num_classes}")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch, self.position = state["step"], state["epoch"], state["position"]
        self.elapsed = state.get("elapsed", 0.0)
        self.best = state.get("best")
        rng = state["rng"]
        rng["torch"] = rng["torch"].cpu()
        if "cuda" in rng:
            rng["cuda"] = [s.cpu() for s in rng["cuda"]]
        set_rng_states(rng)
        self._say(f"resumed from {path} at step {self.step}")

    # -- one step ---------------------------------------------------------------------------------

    def _batch(self, batch):
        if isinstance(batch, dict):
            return batch["image"], batch["label"]
        return batch[0], batch[1]

    def train_step(self, images: torch.Tensor, targets: torch.Tensor) -> float:
        images = images.to(self.device, non_blocking=True)
        targets = targets.to(self.device, non_blocking=True)
        meter = SavedTensorMeter(self.model.parameters())
        with meter, torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                                   enabled=self.autocast_dtype is not None):  # fmt: skip
            logits = self.network(images)
            loss = F.cross_entropy(logits.float(), targets, ignore_index=255)
        self.saved_bytes = max(self.saved_bytes, meter.bytes)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return float(loss.detach())

    # -- the loop ---------------------------------------------------------------------------------

    def _say(self, message: str) -> None:
        if self.world.main and not self.quiet:
            print(message, file=sys.stderr)

    def _memory_mib(self) -> Optional[float]:
        if self.device.type == "cuda":
            return peak_cuda_bytes(self.device) / MIB
        rss = resident_bytes()
        return None if rss is None else rss / MIB

    def run(self, stop_at: Optional[int] = None) -> Dict[str, Any]:
        """Train up to :attr:`total_steps` (or ``stop_at``, to simulate an interruption); validate every
        ``val_every`` steps (keeping the best as ``best.pt``), checkpoint every ``checkpoint_every``
        steps and at the end. Returns a summary of the run."""
        config = self.config
        last = self.total_steps if stop_at is None else min(stop_at, self.total_steps)
        main = self.world.main
        csv_log = CsvLog(os.path.join(config.out_dir, "log.csv"), self.step) if main else None
        val_log = None
        if main and config.val_every:
            val_log = CsvLog(os.path.join(config.out_dir, "val.csv"), self.step, VAL_COLUMNS)
        board = TensorBoardLog(os.path.join(config.out_dir, "tensorboard")) if main and config.tensorboard else None
        samples = SeededSamples(self.dataset, config.seed)
        sampler = ResumableSampler(samples, self.world.world_size, self.world.rank, config.seed)
        bar = None
        if main and config.progress and not self.quiet:
            from tqdm import tqdm

            bar = tqdm(total=self.total_steps, initial=self.step, desc=f"train {config.network} [{config.norm}]",
                       unit="step", dynamic_ncols=True)  # fmt: skip
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.network.train()
        losses = []
        try:
            while self.step < last:
                sampler.set_position(self.epoch, self.position)
                loader = torch.utils.data.DataLoader(
                    samples, batch_size=self.batch_size, sampler=sampler, num_workers=config.workers,
                    drop_last=True, pin_memory=self.device.type == "cuda",
                    persistent_workers=False,
                )  # fmt: skip
                exhausted = True
                for batch in loader:
                    start = time.perf_counter()
                    loss = self.train_step(*self._batch(batch))
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)
                    seconds = time.perf_counter() - start
                    self.step_times.append(seconds)
                    self.elapsed += seconds
                    self.step += 1
                    self.position += self.batch_size
                    if not math.isfinite(loss):
                        raise FloatingPointError(f"loss is {loss} at step {self.step}")
                    losses.append(loss)
                    if self.step % config.log_every == 0 or self.step == last:
                        row = {
                            "step": self.step, "epoch": self.epoch, "loss": self.world.average(loss),
                            "lr": self.optimizer.param_groups[0]["lr"],
                            "images_per_s": self.batch_size * self.world.world_size / max(seconds, 1e-9),
                            "memory_mib": self._memory_mib(), "elapsed_s": self.elapsed,
                        }  # fmt: skip
                        if csv_log:
                            csv_log.write(row)
                        if board:
                            board.write(row)
                    if bar is not None:
                        memory = self._memory_mib()
                        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{self.optimizer.param_groups[0]['lr']:.2e}",
                                        img_s=f"{self.batch_size * self.world.world_size / seconds:.1f}",
                                        mem=f"{memory:.0f}MiB" if memory is not None else "?",
                                        refresh=False)  # fmt: skip
                        bar.update()
                    if config.val_every and (self.step % config.val_every == 0 or self.step == self.total_steps):
                        self._validate_and_keep_best(val_log, board)
                        self.network.train()
                    if self.step % config.checkpoint_every == 0 and self.step < last:
                        self.save()
                    if self.step >= last:
                        exhausted = False
                        break
                if exhausted:
                    self.epoch += 1
                    self.position = 0
        finally:
            if bar is not None:
                bar.close()
            if board:
                board.close()
        self.save()
        summary = self.summary(losses)
        if main and stop_at is None:
            plot = plot_curves(os.path.join(config.out_dir, "log.csv"), os.path.join(config.out_dir, "curves.png"),
                               f"{config.network} [{config.norm}]")  # fmt: skip
            summary["curves"] = plot
        return summary

    # -- validation -------------------------------------------------------------------------------

    def validation_dataset(self):
        """This process's share of the validation split (every world_size-th image)."""
        if self._val_dataset is None:
            _, val_split = splits(self.config)
            dataset = build_dataset(self.config, val_split, train=False)
            if self.world.enabled:
                shard = list(range(self.world.rank, len(dataset), self.world.world_size))
                dataset = _Shard(dataset, shard)
            self._val_dataset = dataset
        return self._val_dataset

    def validate(self) -> Dict[str, Any]:
        """The validation scores of the current weights (single scale, all processes together)."""
        from .evaluation import evaluate_classification, evaluate_segmentation

        dataset = self.validation_dataset()
        reduce = self.world.sum_array if self.world.enabled else None
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):  # fmt: skip
            if self.config.task == "classification":
                return evaluate_classification(self.model, dataset, self.device, batch_size=self.batch_size,
                                               workers=self.config.workers, reduce=reduce)  # fmt: skip
            return evaluate_segmentation(self.model, dataset, self.device, workers=self.config.workers, reduce=reduce)

    def _validate_and_keep_best(self, val_log: Optional[CsvLog], board: Optional[TensorBoardLog]) -> None:
        metric = self.config.val_metric
        scores = self.validate()
        value = float(scores[metric])
        improved = math.isfinite(value) and (self.best is None or value > self.best["value"])
        if improved:
            self.best = {"metric": metric, "value": value, "step": self.step}
        if val_log is not None:
            val_log.write({"step": self.step, "metric": metric, "value": value,
                           "best_value": self.best["value"] if self.best else None})  # fmt: skip
        if board is not None:
            board.write_scalar(f"val/{metric}", value, self.step)
        if improved:
            verdict = f"the best so far: saved as {BEST_NAME}"
        elif self.best:
            verdict = f"best {self.best['value']:.4f} at step {self.best['step']}"
        else:
            verdict = "not a number: nothing kept"
        self._say(f"step {self.step}: validation {metric} {value:.4f} ({verdict})")
        if improved:
            self.save(self.best_path)

    def summary(self, losses) -> Dict[str, Any]:
        times = self.step_times[min(3, len(self.step_times) - 1):] if self.step_times else []
        return {
            "steps": self.step,
            "final_loss": losses[-1] if losses else None,
            "first_loss": losses[0] if losses else None,
            "seconds_per_step": statistics.median(times) if times else None,
            "mean_seconds_per_step": statistics.fmean(self.step_times) if self.step_times else None,
            "saved_for_backward_bytes": self.saved_bytes,
            "peak_cuda_bytes": peak_cuda_bytes(self.device),
            "peak_rss_bytes": resident_bytes("VmHWM") if self.device.type == "cpu" else None,
            "checkpoint": self.checkpoint_path,
            "best": dict(self.best, checkpoint=self.best_path) if self.best else None,
        }

    def close(self) -> None:
        self.world.close()


def train(config: TrainConfig, resume=None, quiet: bool = False) -> Dict[str, Any]:
    trainer = Trainer(config, resume, quiet)
    try:
        return trainer.run()
    finally:
        trainer.close()
