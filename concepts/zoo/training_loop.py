"""A small resumable training loop shared by the zoo's generator and detector training scripts.

:class:`ResumableTrainer` owns what :mod:`concepts.zoo.train_detector`, :mod:`concepts.zoo.train_diffusion`
and :mod:`concepts.zoo.train_ar` have in common: AdamW with linear warm-up and cosine decay, gradient
clipping, an optional exponential moving average (EMA) of the weights, periodic monitoring, and checkpoints
(``<ckpt>/last.safetensors`` with the weights, EMA and optimiser state + ``<ckpt>/last.json`` with the step,
config and history) so that rerunning the same command resumes where a killed run stopped. Data are drawn
deterministically from the step index, so a resumed run sees the same batches as an uninterrupted one.

Subclasses implement :meth:`ResumableTrainer.loss` (the loss terms of one step) and optionally
:meth:`ResumableTrainer.monitor`.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import read_json, save_state_dict, sha256_file, write_json

logger = logging.getLogger(__name__)

__all__ = ["ResumableTrainer", "cosine_lr", "transfer_matching"]


def transfer_matching(module: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Copy the tensors of ``state`` whose name and shape match ``module``'s; return the names left as they were.

    Used to start a text-conditioned stage from an unconditional prior whose text-input layers had another width.

    Examples
    --------
    >>> a, b = nn.Linear(2, 3), nn.Linear(4, 3)
    >>> transfer_matching(b, a.state_dict())
    ['weight']
    >>> torch.equal(a.bias, b.bias)
    True
    """
    own = module.state_dict()
    matched = {k: v for k, v in state.items() if k in own and tuple(own[k].shape) == tuple(v.shape)}
    module.load_state_dict(matched, strict=False)
    return [k for k in own if k not in matched]


def cosine_lr(step: int, *, lr: float, total: int, warmup: int, min_ratio: float = 0.05) -> float:
    """Learning rate at ``step``: linear warm-up to ``lr`` over ``warmup`` steps, then cosine decay to ``min_ratio * lr``.

    Examples
    --------
    >>> cosine_lr(0, lr=1.0, total=100, warmup=10)
    0.1
    >>> round(cosine_lr(100, lr=1.0, total=100, warmup=10), 3)
    0.05
    """
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return lr * (min_ratio + (1 - min_ratio) * cosine)


class ResumableTrainer:
    """Resumable optimisation of ``model`` (subclass and implement :meth:`loss`).

    Parameters
    ----------
    model
        The trained module (its ``state_dict`` is checkpointed; frozen parameters are skipped by the optimiser).
    config
        A dataclass with at least ``lr``, ``total_steps``, ``warmup_steps``, ``weight_decay``,
        ``checkpoint_every`` and ``ema`` (0 disables the EMA) fields; recorded in checkpoints, and a
        checkpoint written with another config is refused.
    init_state
        Weights of a previous stage copied into ``model`` where names and shapes match (:func:`transfer_matching`).
    """

    name: str = "train"

    def __init__(self, model: nn.Module, config: Any, *, init_state: dict[str, torch.Tensor] | None = None) -> None:
        if init_state is not None:
            fresh = transfer_matching(model, init_state)
            logger.info("initialised from a previous stage; %d tensors kept their fresh init: %s", len(fresh), fresh)
        self.model = model
        self.config = config
        decay, no_decay = [], []
        for pname, p in model.named_parameters():
            if not p.requires_grad:
                continue
            skip = p.ndim < 2 or "norm" in pname or "bias" in pname or "embedding" in pname.lower()
            (no_decay if skip else decay).append(p)
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=config.lr, betas=(0.9, 0.99),
        )
        self.ema: nn.Module | None = None
        if getattr(config, "ema", 0):
            self.ema = copy.deepcopy(model).eval()
            for p in self.ema.parameters():
                p.requires_grad_(False)
        self.step_index = 0
        self.history: list[dict] = []
        self.elapsed_s = 0.0

    # ------------------------------------------------------------------ to implement
    def loss(self, step: int) -> dict[str, torch.Tensor]:
        """Loss terms of step ``step`` (key ``"loss"`` is minimised)."""
        raise NotImplementedError

    def monitor(self) -> dict[str, float]:
        """Held-out metrics logged at every checkpoint (default: none)."""
        return {}

    # ------------------------------------------------------------------ optimisation
    @property
    def trained(self) -> nn.Module:
        """The weights to ship: the EMA when enabled, else the model."""
        return self.ema if self.ema is not None else self.model

    def lr_at(self, step: int) -> float:
        c = self.config
        return cosine_lr(step, lr=c.lr, total=c.total_steps, warmup=c.warmup_steps,
                         min_ratio=getattr(c, "min_lr_ratio", 0.05))

    def step(self, step: int) -> dict[str, float]:
        """One optimisation step; returns the loss terms as floats."""
        self.model.train()
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(step)
        out = self.loss(step)
        self.optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(params, getattr(self.config, "clip_grad", 1.0))
        self.optimizer.step()
        if self.ema is not None:
            decay = min(float(self.config.ema), (1 + step) / (10 + step))
            with torch.no_grad():
                for pe, pm in zip(self.ema.parameters(), self.model.parameters()):
                    pe.lerp_(pm.detach(), 1 - decay)
                for be, bm in zip(self.ema.buffers(), self.model.buffers()):
                    be.copy_(bm)
        return {k: float(v.detach()) for k, v in out.items()}

    # ------------------------------------------------------------------ checkpoints
    def _config_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self.config)))

    def save_checkpoint(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        if self.ema is not None:
            tensors.update({f"ema.{k}": v for k, v in self.ema.state_dict().items()})
        for idx, state in self.optimizer.state_dict()["state"].items():
            for key, value in state.items():
                tensors[f"optim.{idx}.{key}"] = torch.as_tensor(value)
        save_state_dict(tensors, folder / "last.safetensors")
        groups = [{k: v for k, v in g.items()} for g in self.optimizer.state_dict()["param_groups"]]
        write_json({"step": self.step_index, "elapsed_s": round(self.elapsed_s, 1), "history": self.history,
                    "config": self._config_dict(), "param_groups": groups}, folder / "last.json")

    def load_checkpoint(self, folder: Path) -> bool:
        """Resume from ``folder/last.*`` if present; returns whether it did."""
        from safetensors.torch import load_file

        meta_path, weights_path = folder / "last.json", folder / "last.safetensors"
        if not meta_path.exists():
            return False
        meta = read_json(meta_path)
        saved, current = meta.get("config", {}), self._config_dict()
        defaults = {f.name: f.default for f in dataclasses.fields(self.config) if f.default is not dataclasses.MISSING}
        for key in set(current) - set(saved):  # fields added since the checkpoint, left at their default
            if json.loads(json.dumps(defaults.get(key, object()), default=str)) == current[key]:
                saved[key] = current[key]
        if saved != current:
            diff = sorted(k for k in set(current) | set(saved) if saved.get(k) != current.get(k))
            raise ValueError(
                f"{meta_path}: the checkpoint was written with a different config (keys {diff}); use another "
                "checkpoint folder or delete it to start over."
            )
        tensors = load_file(str(weights_path))
        self.model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        if self.ema is not None:
            self.ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
        state: dict[int, dict] = {}
        for k, v in tensors.items():
            if k.startswith("optim."):
                _, idx, key = k.split(".", 2)
                state.setdefault(int(idx), {})[key] = v
        self.optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        self.step_index = int(meta["step"])
        self.history = list(meta["history"])
        self.elapsed_s = float(meta["elapsed_s"])
        logger.info("resumed from %s at step %d", folder, self.step_index)
        return True

    # ------------------------------------------------------------------ loop
    def fit(self, ckpt: Path | None = None, *, progress: bool = True, max_steps: int | None = None) -> ResumableTrainer:
        """Train to ``config.total_steps`` (or stop at ``max_steps``), checkpointing every ``checkpoint_every`` steps."""
        from tqdm.auto import tqdm

        cfg = self.config
        if ckpt is not None:
            self.load_checkpoint(ckpt)
        stop = cfg.total_steps if max_steps is None else min(cfg.total_steps, max_steps)
        bar = tqdm(total=cfg.total_steps, initial=self.step_index, disable=not progress, desc=self.name)
        running: dict[str, float] = {}
        n = 0
        t0 = time.perf_counter()
        while self.step_index < stop:
            for k, v in self.step(self.step_index).items():
                running[k] = running.get(k, 0.0) + v
            n += 1
            self.step_index += 1
            bar.update(1)
            if self.step_index % cfg.checkpoint_every == 0 or self.step_index == stop:
                self.elapsed_s += time.perf_counter() - t0
                record = {"step": self.step_index, **{k: round(v / n, 5) for k, v in running.items()},
                          "lr": round(self.lr_at(self.step_index - 1), 6), "elapsed_s": round(self.elapsed_s, 1)}
                record.update(self.monitor())
                self.history.append(record)
                logger.info("%s %s", self.name, json.dumps(record))
                running, n = {}, 0
                if ckpt is not None:
                    self.save_checkpoint(ckpt)
                t0 = time.perf_counter()
        bar.close()
        return self


# ------------------------------------------------------------------------------------------------
# command-line stages shared by the generator training scripts (train_diffusion, train_ar)
# ------------------------------------------------------------------------------------------------
def stage_parser(description: str, stages: tuple[str, ...]) -> Any:
    """``argparse`` parser with the options every staged training script takes (``--stage --work --out --seed
    --steps --threads --max-steps --no-progress``); scripts add their own options to it."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--stage", choices=stages, required=True)
    parser.add_argument("--work", required=True, type=Path, help="working folder (checkpoints, stage outputs)")
    parser.add_argument("--out", type=Path, default=None, help="folder for the shipped files (default WORK/export)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="total steps of the stage")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--max-steps", type=int, default=None, help="stop (after checkpointing) at this step")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def start_stage(args: Any, module: str, argv: list[str] | None) -> str:
    """Logging and torch threads for a stage run; returns the command line recorded in the shipped config."""
    import sys

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    torch.set_num_threads(args.threads)
    return f"python -m {module} " + " ".join(argv if argv is not None else sys.argv[1:])


def run_stage(trainer: ResumableTrainer, ckpt: Path, args: Any) -> bool:
    """Fit (resuming from ``ckpt``) up to ``--max-steps``; True when the stage has reached its total steps."""
    trainer.fit(ckpt, progress=not args.no_progress, max_steps=args.max_steps)
    total = trainer.config.total_steps
    if trainer.step_index < total:
        logger.info("stopped at step %d of %d; rerun the command to resume", trainer.step_index, total)
        return False
    return True


def stage_record(trainer: ResumableTrainer, weights: Path, *, command: str, threads: int, sample_seed: int,
                 **extra: Any) -> dict[str, Any]:
    """What a finished stage records next to its weights (checksum, command, time, config, history, data seed)."""
    return {**extra, "sha256": sha256_file(weights), "command": command, "torch_threads": threads,
            "wall_time_s": round(trainer.elapsed_s, 1), "config": dataclasses.asdict(trainer.config),
            "history": trainer.history, "train_sample_seed": sample_seed}


def save_prior_stage(trainer: ResumableTrainer, work: Path, weights_name: str, *, command: str, threads: int,
                     sample_seed: int) -> None:
    """Write the unconditional prior's weights and record to ``WORK/prior``."""
    (work / "prior").mkdir(parents=True, exist_ok=True)
    path = work / "prior" / weights_name
    save_state_dict(trainer.trained.state_dict(), path)
    write_json(stage_record(trainer, path, command=command, threads=threads, sample_seed=sample_seed),
               work / "prior" / "prior_record.json")
    logger.info("prior done: %s", trainer.history[-1] if trainer.history else {})


def load_prior_stage(work: Path, weights_name: str) -> tuple[dict | None, dict | None]:
    """(record, state dict) of ``WORK/prior`` when that optional stage was run, else (None, None)."""
    from safetensors.torch import load_file

    if not (work / "prior" / "prior_record.json").exists():
        return None, None
    return read_json(work / "prior" / "prior_record.json"), load_file(str(work / "prior" / weights_name))


def load_focus_base(ckpt: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """EMA weights and the record of the (possibly stopped) conditional stage that a ``focus`` stage continues."""
    from safetensors.torch import load_file

    meta = read_json(ckpt / "last.json")
    state = load_file(str(ckpt / "last.safetensors"))
    record = {"command": meta.get("command"), "steps": meta["step"], "wall_time_s": meta["elapsed_s"],
              "config": meta["config"], "history": meta["history"]}
    return {k[4:]: v for k, v in state.items() if k.startswith("ema.")}, record


def earlier_records(first: tuple[str, dict], prior_record: dict | None, base: tuple[str, dict | None],
                    drop: tuple[str, ...] = ("sha256",)) -> dict[str, dict]:
    """The ``training`` records of the stages before the exported one: stage 1, the optional prior, the base stage
    a ``focus`` stage continued (checksums and other keys in ``drop`` left out)."""
    name, record = first
    records = {name: {k: v for k, v in record.items() if k not in drop}}
    if prior_record is not None:
        records["prior"] = {k: v for k, v in prior_record.items() if k != "sha256"}
    if base[1] is not None:
        records[base[0]] = base[1]
    return records
