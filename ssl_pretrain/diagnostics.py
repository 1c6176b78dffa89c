"""What the training loop checks and warns about: a loss or state that stopped being finite
(``DivergenceError``), a known collapse of the method, a time budget too short to learn much,
and a GPU-sized network on a CPU.

``cfg`` here is the run's ``ssl_pretrain.config.Config``; ``step`` the loop's
``ssl_pretrain.train.Step`` (its model, device, clock and warned-once flag).
"""

from __future__ import annotations

import logging

import torch

from ssl_pretrain.engine.devices import usable_cores
from ssl_pretrain.engine.distributed import unwrap
from ssl_pretrain.engine.hardware import bf16_native
from ssl_pretrain.engine.run_folder import RunFolder
from ssl_pretrain.errors import SSLError
from ssl_pretrain.models.backbones import BACKBONES
from ssl_pretrain.resume import RunState

log = logging.getLogger("ssl_pretrain")

FORECAST_AFTER_STEPS = 20
"""Steps timed before a time-budgeted run forecasts its epochs (the first ones include warm-up:
allocator, oneDNN kernel selection, loader start)."""
FEW_EPOCHS = 2.0
"""A budget that gives fewer epochs than this trains a network that has hardly seen its data."""


class DivergenceError(SSLError, RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def diverged(loss: float, state: RunState, run: RunFolder, lr: float) -> DivergenceError:
    """The error for a non-finite loss at the step ``state`` stands at, with the usual fixes."""
    return DivergenceError(
        f"loss became {loss} at epoch {state.epoch + 1}, step {state.step_in_epoch} (lr {lr:.3g}): "
        f"training stopped, the last good checkpoint is kept in {run.last_checkpoint.parent}; "
        "lower optim.lr, raise optim.warmup_epochs or set optim.grad_clip"
    )


def check_finite_state(model: torch.nn.Module, state: RunState, run: RunFolder) -> None:
    """A finite loss can hide a blown-up model (e.g. BatchNorm running variance at inf under
    gradient clipping); never checkpoint or export one.

    Raises:
        DivergenceError: a floating-point parameter or buffer is NaN or infinite.
    """
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise DivergenceError(
                f"'{name}' became non-finite in epoch {state.epoch + 1} although the loss stayed finite: "
                f"training stopped, the last good checkpoint is kept in {run.last_checkpoint.parent}; "
                "lower optim.lr or raise optim.warmup_epochs"
            )


def warn_if_collapsed(cfg, step, record: dict) -> None:
    """After an epoch, ask the method whether its loss shows the known collapse (all images mapped
    alike: DINO's uniform output, BYOL's and SimSiam's constant prediction); mark every such epoch
    ``collapsed`` in the metrics and warn once, naming the likely fix. The run goes on: a collapse
    can be left again, and the user decides."""
    if record["loss_mean"] is None or record["epoch"] < 2:  # the first epoch starts near there
        return
    message = unwrap(step.model).collapse_message(record["loss_mean"])
    if message:
        record["collapsed"] = True
    if message and not step.collapse_warned:
        step.collapse_warned = True
        log.warning("epoch %d: %s. The features stop learning while this lasts; the recipes: section of "
                    "configs/cifar10_cpu.yaml holds measured settings per method", record["epoch"], message)


def forecast_budget(cfg, step, state: RunState, rate: float, steps_per_epoch: int) -> float:
    """Log the measured images/s and the epochs the time budget will give; warn when few.

    Returns:
        The forecast number of epochs in the whole budget.
    """
    remaining = max(step.clock.budget - step.clock.now, 0.0)
    epoch_images = max(steps_per_epoch, 1) * cfg.train.batch_size
    done = state.epoch + state.step_in_epoch / max(steps_per_epoch, 1)
    epochs = min(done + rate * remaining / epoch_images, float(cfg.train.epochs))
    log.info("measured %.0f images/s: the %g-minute budget gives about %.1f epochs", rate,
             cfg.train.time_budget_minutes, epochs)
    if epochs < FEW_EPOCHS:
        causes = [f"{torch.get_num_threads()} compute threads on {usable_cores()} usable cores"]
        if step.device.type == "cpu" and cfg.train.precision == "bf16" and not bf16_native(step.device):
            causes.insert(0, "bf16 forced on a CPU that emulates it (set train.precision=auto)")
        log.warning("only about %.1f epochs fit in the time budget at %.0f images/s: likely causes: %s; a slow "
                    "disk or decoding (data.pipeline=tensor decodes once into memory); a backbone too large for "
                    "this device (configs/cifar10_cpu.yaml is the CPU preset). Raise the budget or fix the cause.",
                    epochs, rate, "; ".join(causes))
    return epochs


def warn_large_backbone_on_cpu(cfg, device: torch.device) -> bool:
    """Without ``--config`` the defaults are the ResNet-18 GPU recipe (lightly's CIFAR-10
    benchmark), slow on a CPU; there the log says so and names the CPU preset, whose network trains
    many times faster (BENCHMARKS.md, "Pretraining throughput"). The default stays the same on
    every device, so that one command means one recipe everywhere. Returns whether it warned."""
    if device.type != "cpu" or BACKBONES[cfg.model.backbone].cpu_sized:
        return False
    if BACKBONES[cfg.model.backbone].patched:
        log.warning("training %s on a CPU: the ViTs run several times slower than smallconv there; "
                    "--config configs/cifar10_cpu.yaml trains a CPU-sized CNN", cfg.model.backbone)
        return True
    log.warning("training %s on a CPU: a GPU-sized network (the default recipe is a GPU one), slow here; "
                "--config configs/cifar10_cpu.yaml trains a CPU-sized network many times faster", cfg.model.backbone)
    return True
