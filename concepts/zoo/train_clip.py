"""Train the built-in ConceptWorld CLIP (seeded, resumable, CPU-friendly).

Usage (``--threads`` defaults to 2; resumes when rerun)::

    python -m concepts.zoo.train_clip --out /tmp/cwclip --seed 0
    cp /tmp/cwclip/{config.json,model.safetensors,tokenizer.json,preprocess.json} \\
       concepts/zoo/weights/conceptworld-clip/

Recipe (defaults of :class:`TrainConfig`):

* model: ``open_clip.CLIP`` with open_clip's ``ModifiedResNet`` image tower (64x64 input, width 16, one
  bottleneck block per stage, attention pooling; built by ``CLIPVisionCfg(layers=[1, 1, 1, 1])``) and a
  causal text transformer (context 32, width 64, 4 heads, 2 layers, ``argmax``/``<eot>`` pooling) over a
  word-level vocabulary (:func:`~concepts.zoo.prompts.caption_words`), joint embedding 64, 1.44 M
  parameters, shipped as float16 (2.9 MB). Why not a ViT: with the same budget a ViT (patch 8, width 96,
  4 layers) learned colours, counts and backgrounds but not shapes -- objects are 10-19 px and straddle
  patches at random offsets; trained on the concept loss alone, its concept head reached a mean shape
  AUROC of 0.66 after 100 steps (0.65-0.66 with patch 4, average pooling, lr 4e-3 or a PCA patch
  initialisation; 0.68 after 320 steps of the joint recipe), while the ResNet tower reached 0.76 after
  100 steps and 0.93 after 200.
  ``TrainConfig(vision_layers=4, vision_width=96)`` still builds the ViT variant;
* data: fresh ConceptWorld images every step (world seed 0, sample seed ``10_000 + seed``, images
  ``step * batch .. step * batch + batch - 1``), so there is no epoch-level overfitting; an "epoch" is
  ``steps_per_epoch`` steps and is the checkpoint and monitoring unit;
* captions: each image gets one random caption that is true of it (:func:`~concepts.zoo.prompts.sample_spec`):
  its full caption (20 %), a partial caption (a subset of its objects with dropped attributes, optional
  background; 25 %), or a single-concept caption (``"a red shape"``, ``"a star"``, ``"a red star"``,
  ``"three shapes"``, ``"shapes on stripes"``, ``"a small shape"``; 55 %), 30 % of all wrapped in a template
  (``"a photo of {}"``, ...);
* curriculum: for the first 200 steps only the auxiliary concept loss (below) trains, so the image tower
  learns shapes before the contrastive loss starts. Without it the text tower maps ``"a circle"``,
  ``"a square"`` and ``"a cross"`` to the same point (cosine 1.00) while the image tower cannot yet tell
  shapes apart, and the pair settles there: zero-shot shape AUROC stayed at 0.64-0.69 for 700 steps; with
  it, 0.97 at step 300 and 0.99 at step 400;
* loss: a multi-positive contrastive loss. The exact image x caption truth matrix of the batch
  (:func:`~concepts.zoo.prompts.truth_matrix`) gives soft targets (uniform over the true pairs) for the
  softmax cross-entropy in both directions, plus a pairwise sigmoid (SigLIP-style, learnable bias) BCE on
  the same targets; and an auxiliary BCE loss of a linear concept head on the image embedding over all 55
  ConceptWorld concept columns (weight 2; the head is not shipped);
* optimiser: AdamW (lr 2e-3, weight decay 0.05 on matrices only), 100 warm-up steps then cosine decay,
  batch 128, 12 epochs of 100 steps (153,600 images).

Each epoch writes ``<ckpt>/last.safetensors`` (model, head and optimiser state) and ``<ckpt>/last.json``
(step, config, history, elapsed time); rerunning the same command resumes from there. The shipped files are
written to ``--out`` at the end.

Measured for the shipped weights (``config.json['training']`` records the command, the config and the
monitor metrics per epoch): ``python -m concepts.zoo.train_clip --out DIR --seed 0 --threads 1`` ran the
1,200 steps in 535 s of training time (9.5 min wall clock including the per-epoch monitor) on one thread
of a 2-core machine shared with other jobs (load average 6-7). On 500 held-out monitor images the zero-shot
AUROC was 0.54 after the 200 concept-only steps, 0.986 at step 300 and 1.000 from step 900; caption -> image
recall@5 (batches of 100) was 1.0 from step 300. ``benchmarks/zoo_quality.py`` measures the shipped
(float16) weights on 2,000 other images.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import save_state_dict, sha256_file, write_json
from .clip import CLIP_NAME, CONFIG_FORMAT, build_clip, build_preprocess, fast_normalize
from .prompts import DEFAULT_MIX, SceneTable, caption_words, sample_spec, truth_matrix
from .tokenizer import WordTokenizer
from .training_loop import ResumableTrainer

logger = logging.getLogger(__name__)

__all__ = ["TrainConfig", "ClipTrainer", "main"]

TRAIN_SAMPLE_SEED_OFFSET = 10_000
MONITOR_SAMPLE_SEED = 5_000


@dataclass
class TrainConfig:
    """Everything that determines a training run (recorded in ``config.json['training']``)."""

    seed: int = 0
    world_seed: int = 0
    image_size: int = 64
    vision_layers: int | tuple = (1, 1, 1, 1)
    vision_width: int = 16
    vision_head_width: int = 32
    patch_size: int = 8
    text_width: int = 64
    text_layers: int = 2
    text_heads: int = 4
    context_length: int = 32
    embed_dim: int = 64
    batch_size: int = 128
    epochs: int = 12
    steps_per_epoch: int = 100
    lr: float = 2e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 100
    weight_decay: float = 0.05
    softmax_weight: float = 1.0
    sigmoid_weight: float = 1.0
    aux_weight: float = 2.0
    aux_only_steps: int = 200
    p_template: float = 0.3
    mix: dict = field(default_factory=lambda: dict(DEFAULT_MIX))
    mean: tuple = (0.186, 0.1749, 0.1692)
    std: tuple = (0.1744, 0.1351, 0.1411)
    monitor_size: int = 500

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    @property
    def checkpoint_every(self) -> int:
        """Checkpoint (and monitor) once per epoch."""
        return self.steps_per_epoch

    def model_config(self, vocab_size: int) -> dict:
        """The ``"model"`` block of ``config.json`` (open_clip ``CLIP`` arguments).

        ``vision_layers`` as a tuple builds open_clip's ``ModifiedResNet`` image tower (stages of that many
        bottleneck blocks, attention pooling); as an int, open_clip's ``VisionTransformer`` with that many
        blocks and ``patch_size``.
        """
        if isinstance(self.vision_layers, int):
            vision = {"image_size": self.image_size, "patch_size": self.patch_size, "width": self.vision_width,
                      "layers": self.vision_layers, "head_width": self.vision_head_width, "mlp_ratio": 4.0}
        else:
            vision = {"image_size": self.image_size, "width": self.vision_width, "layers": list(self.vision_layers),
                      "head_width": self.vision_head_width}
        return {
            "embed_dim": self.embed_dim,
            "vision_cfg": vision,
            "text_cfg": {
                "context_length": self.context_length, "vocab_size": vocab_size, "width": self.text_width,
                "heads": self.text_heads, "layers": self.text_layers, "mlp_ratio": 4.0,
            },
            "init_logit_bias": -2.0,
        }

    def preprocess_spec(self) -> dict:
        """``preprocess.json``: open_clip ``PreprocessCfg`` fields."""
        return {
            "size": self.image_size, "mode": "RGB", "mean": list(self.mean), "std": list(self.std),
            "interpolation": "bicubic", "resize_mode": "shortest", "fill_color": 0,
        }


def multi_positive_losses(
    image_emb: torch.Tensor, text_emb: torch.Tensor, truth: torch.Tensor, logit_scale: torch.Tensor,
    logit_bias: torch.Tensor | None,
) -> dict[str, torch.Tensor]:
    """Contrastive losses with many positives per row/column.

    Parameters
    ----------
    image_emb, text_emb
        Unnormalised embeddings ``[b, d]``.
    truth
        bool ``[b, b]``: caption j is true of image i (the diagonal must be true).
    logit_scale
        Log of the temperature scale (open_clip's ``model.logit_scale``).
    logit_bias
        Bias of the sigmoid term (``model.logit_bias``), or ``None`` to skip it.

    Returns
    -------
    dict
        ``softmax`` (mean of the image->text and text->image soft-target cross-entropies) and ``sigmoid``
        (pairwise BCE averaged over all pairs; 0 without a bias).
    """
    img = F.normalize(image_emb, dim=-1)
    txt = F.normalize(text_emb, dim=-1)
    scale = logit_scale.exp().clamp(max=100.0)
    logits = scale * img @ txt.T
    t = truth.float()
    i2t = -(t / t.sum(1, keepdim=True) * F.log_softmax(logits, dim=1)).sum(1).mean()
    t2i = -(t / t.sum(0, keepdim=True) * F.log_softmax(logits, dim=0)).sum(0).mean()
    out = {"softmax": (i2t + t2i) / 2}
    if logit_bias is not None:
        out["sigmoid"] = F.binary_cross_entropy_with_logits(logits + logit_bias, t)
    else:
        out["sigmoid"] = logits.new_zeros(())
    return out


class _ClipWithHead(nn.Module):
    """The trained modules: the open_clip CLIP (shipped) and the auxiliary concept head (not shipped)."""

    def __init__(self, clip: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.clip = clip
        self.head = head


class ClipTrainer(ResumableTrainer):
    """The training loop of :mod:`concepts.zoo.train_clip` (usable in tests with a tiny config).

    Optimisation, checkpoints and resuming come from :class:`~concepts.zoo.training_loop.ResumableTrainer`;
    this class adds the data (:meth:`batch`), the losses (:meth:`loss`), the monitor and :meth:`export`.

    Parameters
    ----------
    config
        The run configuration.
    device
        Training device.

    Examples
    --------
    >>> cfg = TrainConfig(vision_width=32, vision_layers=1, text_width=32, text_layers=1, text_heads=2,
    ...                   embed_dim=16, batch_size=16, image_size=32, patch_size=8, vision_head_width=16)
    >>> trainer = ClipTrainer(cfg)
    >>> sorted(trainer.step(0))
    ['aux', 'loss', 'sigmoid', 'softmax']
    """

    name = "train_clip"

    def __init__(self, config: TrainConfig, device: str | torch.device = "cpu") -> None:
        from concepts.world import ConceptWorld

        self.device = torch.device(device)
        self.world = ConceptWorld(seed=config.world_seed, image_size=config.image_size)
        self.tokenizer = WordTokenizer(caption_words(self.world.vocabulary), context_length=config.context_length)
        self.model_cfg = config.model_config(self.tokenizer.vocab_size)
        self.pre_spec = config.preprocess_spec()
        torch.manual_seed(config.seed)
        clip = build_clip(self.model_cfg)
        head = nn.Linear(config.embed_dim, len(self.world.concept_names))
        super().__init__(_ClipWithHead(clip, head).to(self.device), config)

    @property
    def clip(self) -> nn.Module:
        """The open_clip ``CLIP`` being trained."""
        return self.model.clip

    # ------------------------------------------------------------------ data
    def batch(self, step: int):
        """Images, tokens, truth matrix and concept targets of training step ``step`` (deterministic)."""
        cfg = self.config
        data = self.world.sample(cfg.batch_size, seed=TRAIN_SAMPLE_SEED_OFFSET + cfg.seed, start=step * cfg.batch_size)
        rng = np.random.default_rng([cfg.seed, step])
        objs = [[] for _ in range(len(data))]
        for i, size, colour, shape in data.objects[["image", "size", "colour", "shape"]].itertuples(index=False):
            objs[i].append((size, colour, shape))
        specs = [
            sample_spec(objs[i], data.backgrounds[i], rng, mix=cfg.mix, p_template=cfg.p_template)
            for i in range(len(data))
        ]
        truth = truth_matrix(specs, SceneTable.from_batch(data, self.world.vocabulary))
        if not truth.diagonal().all():  # a caption must be true of its own image
            raise RuntimeError("internal error: a sampled caption is false for its own image.")
        x = fast_normalize(data.images, self.pre_spec, self.device)
        tokens = self.tokenizer([s.text() for s in specs]).to(self.device)
        concepts = torch.tensor(data.concepts.to_numpy(dtype=np.float32), device=self.device)
        return x, tokens, torch.as_tensor(truth, device=self.device), concepts

    # ------------------------------------------------------------------ optimisation
    def loss(self, step: int) -> dict[str, torch.Tensor]:
        """Loss terms of step ``step``: ``softmax``, ``sigmoid``, ``aux`` and their weighted sum ``loss``."""
        cfg = self.config
        x, tokens, truth, concepts = self.batch(step)
        img = self.clip.encode_image(x)
        txt = self.clip.encode_text(tokens)
        out = multi_positive_losses(img, txt, truth, self.clip.logit_scale, getattr(self.clip, "logit_bias", None))
        out["aux"] = F.binary_cross_entropy_with_logits(self.model.head(img), concepts)
        contrastive = cfg.softmax_weight * out["softmax"] + cfg.sigmoid_weight * out["sigmoid"]
        if step < cfg.aux_only_steps:  # stage 1: the image tower learns the concepts (shapes) first
            contrastive = 0.0 * contrastive
        out["loss"] = contrastive + cfg.aux_weight * out["aux"]
        return out

    @torch.no_grad()
    def monitor(self) -> dict[str, float]:
        """Zero-shot AUROC (mean and per family) and retrieval R@5 on ``monitor_size`` held-out images."""
        from concepts.world.vocabulary import Vocabulary

        from .prompts import ZERO_SHOT_FAMILIES
        from .quality import encode_images, encode_texts, retrieval_recall, zero_shot_auroc

        self.model.eval()
        n = self.config.monitor_size
        data = self.world.sample(n, seed=MONITOR_SAMPLE_SEED)
        pre = build_preprocess(self.pre_spec)
        feats = encode_images(self.clip, pre, data.images)
        auroc = zero_shot_auroc(self.clip, self.tokenizer, feats, data.concepts)
        caps = encode_texts(self.clip, self.tokenizer, data.captions)
        v = Vocabulary()
        out = {"logit_scale": round(float(self.clip.logit_scale.exp()), 2),
               "zero_shot_auroc": round(float(auroc.mean()), 4),
               "retrieval_r5": round(retrieval_recall(feats, caps, k=5, group_size=min(100, n)), 4)}
        for fam in ZERO_SHOT_FAMILIES:
            out[f"auroc_{fam}"] = round(float(auroc[[c for c in auroc.index if v.family(c) == fam]].mean()), 4)
        return out

    # ------------------------------------------------------------------ export
    def export(
        self, out: Path, *, command: str | None = None, threads: int | None = None, dtype: torch.dtype = torch.float16,
    ) -> dict:
        """Write the shipped files (``model.safetensors``, ``config.json``, ``tokenizer.json``, ``preprocess.json``).

        Floating-point weights are stored as ``dtype`` (default float16, half the size; the loader casts them
        back to the model's float32).
        """
        out.mkdir(parents=True, exist_ok=True)
        weights = out / "model.safetensors"
        save_state_dict(self.clip.state_dict(), weights, metadata={"format": CONFIG_FORMAT, "name": CLIP_NAME},
                        dtype=dtype)
        self.tokenizer.save(out / "tokenizer.json")
        write_json(self.pre_spec, out / "preprocess.json")
        config = {
            "format": CONFIG_FORMAT,
            "version": 1,
            "name": CLIP_NAME,
            "model": self.model_cfg,
            "weights": {"file": "model.safetensors", "dtype": str(dtype).replace("torch.", ""),
                        "sha256": sha256_file(weights),
                        "n_parameters": sum(p.numel() for p in self.clip.parameters())},
            "tokenizer": "tokenizer.json",
            "preprocess": "preprocess.json",
            "training": {
                "command": command, "torch_threads": threads, "wall_time_s": round(self.elapsed_s, 1),
                "config": dataclasses.asdict(self.config), "history": self.history,
                "train_sample_seed": TRAIN_SAMPLE_SEED_OFFSET + self.config.seed,
                "monitor_sample_seed": MONITOR_SAMPLE_SEED,
                "torch": torch.__version__,
            },
        }
        write_json(config, out / "config.json")
        return config


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (``python -m concepts.zoo.train_clip --help``)."""
    parser = argparse.ArgumentParser(description="Train the built-in ConceptWorld CLIP.")
    parser.add_argument("--out", required=True, type=Path, help="folder for the shipped files")
    parser.add_argument("--ckpt", type=Path, default=None, help="checkpoint folder (default OUT/checkpoints)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    parser.add_argument("--steps-per-epoch", type=int, default=TrainConfig.steps_per_epoch)
    parser.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    parser.add_argument("--lr", type=float, default=TrainConfig.lr)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--max-steps", type=int, default=None, help="stop (after checkpointing) at this step")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    torch.set_num_threads(args.threads)
    cfg = TrainConfig(seed=args.seed, epochs=args.epochs, steps_per_epoch=args.steps_per_epoch,
                      batch_size=args.batch_size, lr=args.lr)
    trainer = ClipTrainer(cfg, device=args.device)
    trainer.fit(args.ckpt or args.out / "checkpoints", progress=not args.no_progress, max_steps=args.max_steps)
    if trainer.step_index < cfg.total_steps:
        logger.info("stopped at step %d of %d; rerun the command to resume", trainer.step_index, cfg.total_steps)
        return 0
    command = "python -m concepts.zoo.train_clip " + " ".join(argv if argv is not None else sys.argv[1:])
    trainer.export(args.out, command=command, threads=args.threads)
    logger.info("wrote %s (training wall time %.0f s)", args.out, trainer.elapsed_s)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
