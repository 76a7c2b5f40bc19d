"""Train the ConceptWorld concept detector (seeded, resumable, CPU-friendly).

Usage::

    python -m concepts.zoo.train_detector --out /tmp/cwdet --seed 0
    cp /tmp/cwdet/{config.json,model.safetensors} concepts/zoo/weights/conceptworld-detector/

Recipe (defaults of :class:`DetectorConfig`):

* data: fresh ConceptWorld renders every step (world seed 0, sample seed ``20_000 + seed``), rendered at 32
  (half of each batch), 64 and 128 pixels and resized to 32 (bilinear, antialiased), so the detector reads
  native low-resolution renders as well as downscaled large ones;
* corruption: 80 % of the images go through :func:`~concepts.zoo.detector.corrupt` (colour drift, blur,
  noise, down-and-up scaling) -- the artefacts of small generators;
* model: :class:`~concepts.zoo.detector.DetectorNet` (width 32, head 256), BCE over all 55 concept columns;
* optimiser: AdamW (lr 2e-3), warm-up then cosine decay, EMA of the weights (shipped).

The shipped ``config.json`` records the command, the wall time and the measured accuracy on clean and
corrupted held-out renders (sample seed 777) at 32 and 64 pixels.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from .checkpoint import save_state_dict, sha256_file, write_json
from .detector import CONFIG_FORMAT, DETECTOR_NAME, ConceptDetector, DetectorNet, corrupt, resize_batch
from .training_loop import ResumableTrainer

logger = logging.getLogger(__name__)

__all__ = ["DetectorConfig", "DetectorTrainer", "evaluate_detector", "main"]

TRAIN_SAMPLE_SEED_OFFSET = 20_000
TEST_SAMPLE_SEED = 777


@dataclass
class DetectorConfig:
    """Everything that determines a detector training run (recorded in ``config.json['training']``)."""

    seed: int = 0
    world_seed: int = 0
    input_size: int = 32
    width: int = 32
    hidden: int = 256
    batch_32: int = 64
    batch_64: int = 48
    batch_128: int = 16
    p_corrupt: float = 0.8
    lr: float = 2e-3
    min_lr_ratio: float = 0.02
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    total_steps: int = 2500
    checkpoint_every: int = 250
    ema: float = 0.995
    monitor_size: int = 500


def _to_float(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)


class DetectorTrainer(ResumableTrainer):
    """Training loop of :mod:`concepts.zoo.train_detector` (usable in tests with a tiny config)."""

    name = "train_detector"

    def __init__(self, config: DetectorConfig) -> None:
        from concepts.world import ConceptWorld

        self.worlds = {s: ConceptWorld(seed=config.world_seed, image_size=s) for s in (32, 64, 128)}
        self.concept_names = self.worlds[32].concept_names
        torch.manual_seed(config.seed)
        net = DetectorNet(len(self.concept_names), width=config.width, hidden=config.hidden,
                          input_size=config.input_size)
        super().__init__(net, config)
        self._monitor_cache: dict | None = None

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Images ``[b, 3, S, S]`` (corrupted) and concept targets ``[b, k]`` of step ``step`` (deterministic)."""
        c = self.config
        xs, ys = [], []
        seed = TRAIN_SAMPLE_SEED_OFFSET + c.seed
        for j, (size, n) in enumerate(((32, c.batch_32), (64, c.batch_64), (128, c.batch_128))):
            if n == 0:
                continue
            b = self.worlds[size].sample(n, seed=seed + 1000 * j, start=step * n)
            xs.append(resize_batch(_to_float(b.images), c.input_size))
            ys.append(torch.tensor(b.concepts.to_numpy(dtype=np.float32)))
        x, y = torch.cat(xs), torch.cat(ys)
        g = torch.Generator().manual_seed(int(c.seed) * 1_000_003 + step)
        keep = torch.rand(len(x), generator=g) >= c.p_corrupt
        xc = corrupt(x, g)
        x = torch.where(keep[:, None, None, None], x, xc)
        return x, y

    def loss(self, step: int) -> dict[str, torch.Tensor]:
        x, y = self.batch(step)
        return {"loss": F.binary_cross_entropy_with_logits(self.model(x), y)}

    def monitor(self) -> dict[str, float]:
        det = ConceptDetector(self.trained, self.concept_names, input_size=self.config.input_size)
        q = evaluate_detector(det, n=self.config.monitor_size, world_seed=self.config.world_seed)
        return {k: v for k, v in q.items() if k != "per_concept"}

    def export(self, out: Path, *, command: str | None = None, threads: int | None = None,
               eval_n: int = 2000) -> dict:
        """Write ``model.safetensors`` and ``config.json`` (with the measured quality) to ``out``."""
        out.mkdir(parents=True, exist_ok=True)
        weights = out / "model.safetensors"
        net = self.trained
        save_state_dict(net.state_dict(), weights, metadata={"format": CONFIG_FORMAT, "name": DETECTOR_NAME})
        det = ConceptDetector(net, self.concept_names, input_size=self.config.input_size)
        quality = evaluate_detector(det, n=eval_n, world_seed=self.config.world_seed)
        per = quality.pop("per_concept")
        c = self.config
        config = {
            "format": CONFIG_FORMAT,
            "version": 1,
            "name": DETECTOR_NAME,
            "architecture": {"class": "DetectorNet", "n_concepts": len(self.concept_names), "width": c.width,
                             "hidden": c.hidden, "input_size": c.input_size},
            "concept_names": list(self.concept_names),
            "thresholds": [0.5] * len(self.concept_names),
            "weights": {"file": "model.safetensors", "dtype": "float32", "sha256": sha256_file(weights),
                        "n_parameters": sum(p.numel() for p in net.parameters())},
            "quality": {**quality, "test_sample_seed": TEST_SAMPLE_SEED, "n_images": eval_n,
                        "per_concept": {k: {kk: round(float(vv), 4) for kk, vv in row.items()}
                                        for k, row in per.to_dict(orient="index").items()}},
            "training": {"command": command, "torch_threads": threads, "wall_time_s": round(self.elapsed_s, 1),
                         "config": dataclasses.asdict(c), "history": self.history,
                         "train_sample_seed": TRAIN_SAMPLE_SEED_OFFSET + c.seed, "torch": torch.__version__},
        }
        write_json(config, out / "config.json")
        return config


def evaluate_detector(det: ConceptDetector, *, n: int = 2000, world_seed: int = 0, seed: int = TEST_SAMPLE_SEED,
                      corruption_seed: int = 0) -> dict:
    """Accuracy of a detector on held-out renders: clean and corrupted, at 32 and 64 pixels.

    Returns a dict with ``accuracy_32``, ``accuracy_64``, ``accuracy_32_corrupted``,
    ``accuracy_64_corrupted`` (mean over concept columns), ``balanced_accuracy_32`` (mean over concept
    columns of the mean of the true-positive and true-negative rates) and ``per_concept`` (DataFrame of
    per-column accuracies).
    """
    from concepts.world import ConceptWorld

    out: dict = {}
    per = {}
    for size in (32, 64):
        b = ConceptWorld(seed=world_seed, image_size=size).sample(n, seed=seed)
        x = _to_float(b.images)
        truth = b.concepts[det.concept_names].to_numpy()
        for tag, imgs in (("", x), ("_corrupted", corrupt(x, torch.Generator().manual_seed(corruption_seed)))):
            found = det.detect(imgs).to_numpy()
            acc = (found == truth).mean(0)
            out[f"accuracy_{size}{tag}"] = round(float(acc.mean()), 4)
            per[f"acc_{size}{tag}"] = acc
            if size == 32 and not tag:
                tpr = ((found & truth).sum(0) / np.maximum(truth.sum(0), 1))
                tnr = ((~found & ~truth).sum(0) / np.maximum((~truth).sum(0), 1))
                out["balanced_accuracy_32"] = round(float(((tpr + tnr) / 2).mean()), 4)
                per["balanced_32"] = (tpr + tnr) / 2
    out["per_concept"] = pd.DataFrame(per, index=det.concept_names)
    return out


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (``python -m concepts.zoo.train_detector --help``)."""
    parser = argparse.ArgumentParser(description="Train the ConceptWorld concept detector.")
    parser.add_argument("--out", required=True, type=Path, help="folder for the shipped files")
    parser.add_argument("--ckpt", type=Path, default=None, help="checkpoint folder (default OUT/checkpoints)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=DetectorConfig.total_steps)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--max-steps", type=int, default=None, help="stop (after checkpointing) at this step")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    torch.set_num_threads(args.threads)
    cfg = DetectorConfig(seed=args.seed, total_steps=args.steps)
    trainer = DetectorTrainer(cfg)
    trainer.fit(args.ckpt or args.out / "checkpoints", progress=not args.no_progress, max_steps=args.max_steps)
    if trainer.step_index < cfg.total_steps:
        logger.info("stopped at step %d of %d; rerun the command to resume", trainer.step_index, cfg.total_steps)
        return 0
    command = "python -m concepts.zoo.train_detector " + " ".join(argv if argv is not None else sys.argv[1:])
    config = trainer.export(args.out, command=command, threads=args.threads)
    logger.info("quality %s", {k: v for k, v in config["quality"].items() if k != "per_concept"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
