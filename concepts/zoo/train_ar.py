"""Train the built-in ConceptWorld autoregressive model (seeded, resumable, CPU-friendly), in two stages.

Usage::

    # stage 1: the Janus VQ tokenizer (images only; no CLIP needed)
    python -m concepts.zoo.train_ar --stage vq --work /tmp/cwar --seed 0
    # stage 2: the language model as an unconditional prior (all-zero text states; no CLIP needed)
    python -m concepts.zoo.train_ar --stage prior --work /tmp/cwar --seed 0
    # stage 3: the Janus language model (from the prior) prompted by the frozen CLIP text tower
    python -m concepts.zoo.train_ar --stage lm --work /tmp/cwar --seed 0
    cp /tmp/cwar/export/{config.json,model.safetensors} concepts/zoo/weights/conceptworld-ar/

Rerunning a command resumes from its checkpoint (``<work>/vq_ckpt``, ``<work>/prior_ckpt``, ``<work>/lm_ckpt``).

Recipe (defaults of :class:`VQConfig` and :class:`LMConfig`):

* data: fresh ConceptWorld 32x32 renders (world seed 0) every step -- sample seed ``40_000 + seed`` for the VQ,
  ``41_000 + seed`` for the language model (the quality benchmark uses held-out seed 777);
* VQ (``JanusVQVAE``, 32/32/64 channels, 8x8 tokens, 512 codes of dimension 8): cosine quantisation
  (:func:`~concepts.zoo.autoregressive.quantize`), commitment weight 0.25, L1 + L2 reconstruction with object
  pixels weighted 5x and small-object pixels 13x, unused codes restarted from encoder outputs every 125 steps;
* language model (LLaMA 4 x 128, ``JanusForConditionalGeneration``): next-token cross-entropy over the 64 image
  tokens after the prefix of :func:`~concepts.zoo.autoregressive.prompt_embeddings`; captions as for the
  diffusion model (:data:`~concepts.zoo.train_diffusion.CAPTION_MIX`, 10 % empty); AdamW lr 1e-3, EMA 0.998
  (shipped); the VQ and the unused SigLIP tower are frozen;
* the text-conditioned stage starts from the EMA weights of the prior stage (1,200 steps, same recipe with
  all-zero text states), except the aligner's input layer, whose width differs;
* monitor: every checkpoint, 64 held-out captions are generated with the EMA weights and the shipped sampling
  settings (``concepts.zoo.autoregressive.DEFAULT_SETTINGS``; guidance 3 when the shipped model was trained,
  20 now) and read by the ``conceptworld-detector``.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .autoregressive import (
    AR_NAME, CONFIG_FORMAT, DEFAULT_SETTINGS, ConceptWorldJanusGenerator, build_janus, janus_config, prompt_embeddings,
    quantize,
)
from .checkpoint import load_state_dict_checked, read_json, save_state_dict, sha256_file, write_json
from .train_diffusion import CAPTION_MIX, ConditionalTrainer, _try_detector, pixel_weights
from .training_loop import (
    ResumableTrainer,
    earlier_records,
    load_focus_base,
    load_prior_stage,
    run_stage,
    save_prior_stage,
    stage_parser,
    stage_record,
    start_stage,
)

logger = logging.getLogger(__name__)

__all__ = ["VQConfig", "LMConfig", "VQTrainer", "LMTrainer", "main"]

VQ_SAMPLE_SEED_OFFSET = 40_000
LM_SAMPLE_SEED_OFFSET = 41_000
MONITOR_SAMPLE_SEED = 777
PRIOR_WIDTH = 64
PRIOR_CONTEXT = 32
PRIOR_DEFAULTS: dict = {"total_steps": 1200, "ema": 0.995, "p_uncond": 0.0, "warmup_steps": 100}
"""Stage ``prior``: the language model trained unconditionally (all-zero text states, no CLIP needed)."""
FOCUS_DEFAULTS: dict = {"total_steps": 8000, "lr": 6e-4, "warmup_steps": 100, "object_weight": 4.0,
                        "small_object_weight": 8.0}
"""Stage ``focus``: continues the ``lm`` stage with the loss weighted towards the tokens of patches covering objects."""


@dataclass
class VQConfig:
    """Stage 1: the VQ tokenizer."""

    seed: int = 0
    world_seed: int = 0
    image_size: int = 32
    tokens_per_side: int = 8
    codebook_size: int = 512
    code_dim: int = 8
    base_channels: int = 32
    channel_multiplier: tuple = (1, 1, 2)
    latent_channels: int = 64
    batch_size: int = 32
    lr: float = 1e-3
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.0
    warmup_steps: int = 100
    total_steps: int = 2500
    checkpoint_every: int = 250
    ema: float = 0.0
    beta: float = 0.25
    object_weight: float = 4.0
    small_object_weight: float = 8.0
    restart_every: int = 125

    def arch(self) -> dict:
        """Architecture arguments of :func:`~concepts.zoo.autoregressive.janus_config` fixed by the VQ stage."""
        return {"image_size": self.image_size, "tokens_per_side": self.tokens_per_side,
                "codebook_size": self.codebook_size, "code_dim": self.code_dim,
                "vq_base_channels": self.base_channels, "vq_channel_multiplier": tuple(self.channel_multiplier),
                "vq_latent_channels": self.latent_channels}


@dataclass
class LMConfig:
    """Stages 2 and 3: the language model, as an unconditional prior (``stage="prior"``) then text-conditioned."""

    stage: str = "lm"
    seed: int = 0
    world_seed: int = 0
    hidden_size: int = 128
    layers: int = 4
    heads: int = 4
    intermediate_size: int = 384
    batch_size: int = 32
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.05
    warmup_steps: int = 200
    total_steps: int = 3000
    checkpoint_every: int = 250
    ema: float = 0.998
    p_uncond: float = 0.1
    p_template: float = 0.1
    mix: dict = field(default_factory=lambda: dict(CAPTION_MIX))
    monitor_size: int = 64
    object_weight: float = 0.0
    small_object_weight: float = 0.0


def _images(batch) -> torch.Tensor:
    return torch.from_numpy(batch.images).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def _build_vq(cfg: VQConfig) -> torch.nn.Module:
    from transformers import JanusVQVAE, JanusVQVAEConfig

    vq_cfg = janus_config(text_width=1, **cfg.arch())["vq_config"]
    return JanusVQVAE(JanusVQVAEConfig(**vq_cfg))


class VQTrainer(ResumableTrainer):
    """Stage 1 of :mod:`concepts.zoo.train_ar`."""

    name = "train_ar.vq"

    def __init__(self, config: VQConfig) -> None:
        from concepts.world import ConceptWorld

        self.world = ConceptWorld(seed=config.world_seed, image_size=config.image_size)
        torch.manual_seed(config.seed)
        super().__init__(_build_vq(config), config)
        self.usage = torch.zeros(config.codebook_size)

    def loss(self, step: int) -> dict[str, torch.Tensor]:
        c = self.config
        b = self.world.sample(c.batch_size, seed=VQ_SAMPLE_SEED_OFFSET + c.seed, start=step * c.batch_size)
        x = _images(b)
        w = pixel_weights(b, c.object_weight, c.small_object_weight)
        vq = self.model
        z, zq, idx = quantize(vq, x)
        self.usage += torch.bincount(idx.flatten(), minlength=c.codebook_size).float()
        commit = ((zq.detach() - z) ** 2).mean()
        codebook = ((zq - z.detach()) ** 2).mean()
        zst = z + (zq - z).detach()
        y = vq.decoder(vq.post_quant_conv(zst))
        rec = ((y - x).abs() * w).mean() + ((y - x) ** 2 * w).mean()
        self._last_z = z.detach()
        return {"loss": rec + codebook + c.beta * commit, "rec": rec, "commit": commit}

    def step(self, step: int) -> dict[str, float]:
        out = super().step(step)
        if (step + 1) % self.config.restart_every == 0:  # after the update: the codebook is not in the graph
            self._restart_dead_codes(self._last_z, step)
        return out

    def shipped_state(self) -> dict[str, torch.Tensor]:
        """The VQ weights with unit-norm codes (``vqmodel.encode`` then agrees with :func:`quantize`)."""
        state = {k: v.clone() for k, v in self.model.state_dict().items()}
        key = "quantize.embedding.weight"
        state[key] = F.normalize(state[key], dim=1)
        return state

    @torch.no_grad()
    def _restart_dead_codes(self, z: torch.Tensor, step: int) -> None:
        dead = (self.usage == 0).nonzero().flatten()
        if len(dead):
            flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
            g = torch.Generator().manual_seed(self.config.seed * 31 + step)
            pick = torch.randint(0, len(flat), (len(dead),), generator=g)
            noise = 0.01 * torch.randn(len(dead), flat.shape[1], generator=g)
            self.model.quantize.embedding.weight[dead] = flat[pick] + noise
            logger.info("restarted %d dead codes", len(dead))
        self.usage.zero_()

    @torch.no_grad()
    def monitor(self) -> dict[str, float]:
        self.model.eval()
        b = self.world.sample(256, seed=MONITOR_SAMPLE_SEED)
        x = _images(b)
        _, zq, idx = quantize(self.model, x)
        y = self.model.decoder(self.model.post_quant_conv(zq)).clamp(-1, 1)
        err = (y - x).abs().mean(1)
        obj = torch.from_numpy(b.masks.any(1))
        out = {"mae": round(float(err.mean()), 4), "mae_objects": round(float(err[obj].mean()), 4),
               "codes_used": int(idx.unique().numel())}
        det = _try_detector()
        if det is not None:
            real, rec = det.detect((x + 1) / 2), det.detect((y + 1) / 2)
            cols = det.concept_names[:11]  # colours and shapes
            out["detector_agreement"] = round(float((real[cols] == rec[cols]).to_numpy().mean()), 4)
        return out


class LMTrainer(ConditionalTrainer):
    """Stage 2 of :mod:`concepts.zoo.train_ar`: the Janus language model on frozen VQ tokens and CLIP states."""

    name = "train_ar.lm"
    caption_stream = 2

    def __init__(self, config: LMConfig, vq_state: dict, vq_cfg: VQConfig, conditioner: torch.nn.Module,
                 init_state: dict | None = None) -> None:
        from concepts.world import ConceptWorld

        self.conditioner = conditioner
        self.vq_cfg = vq_cfg
        self.world = ConceptWorld(seed=config.world_seed, image_size=vq_cfg.image_size)
        self.janus_cfg = janus_config(
            text_width=conditioner.width, hidden_size=config.hidden_size, layers=config.layers, heads=config.heads,
            intermediate_size=config.intermediate_size, context_length=conditioner.context_length, **vq_cfg.arch(),
        )
        torch.manual_seed(config.seed)
        model = build_janus(self.janus_cfg)
        if init_state is not None:
            from .training_loop import transfer_matching

            fresh = transfer_matching(model, init_state)
            logger.info("initialised from the prior; fresh: %s", fresh)
        model.model.vqmodel.load_state_dict(vq_state)
        for name in ("vqmodel", "vision_model"):
            for p in getattr(model.model, name).parameters():
                p.requires_grad_(False)
        for p in model.lm_head.parameters():
            p.requires_grad_(False)
        super().__init__(model, config)
        self._detector = None

    def loss(self, step: int) -> dict[str, torch.Tensor]:
        c = self.config
        b = self.world.sample(c.batch_size, seed=LM_SAMPLE_SEED_OFFSET + c.seed, start=step * c.batch_size)
        model = self.model
        model.model.vqmodel.eval()
        with torch.no_grad():
            tokens = quantize(model.model.vqmodel, _images(b))[2]  # [B, 64]
            states, _ = self.conditioner.encode(self.captions(b, step))
        prefix = prompt_embeddings(model, states)  # [B, L + 1, d]
        fed = model.prepare_embeddings_for_image_generation(tokens[:, :-1])
        embeds = torch.cat([prefix, fed], dim=1)
        out = model.model.language_model(inputs_embeds=embeds, use_cache=False)
        h = out.last_hidden_state[:, prefix.shape[1] - 1:]  # positions predicting image tokens 0..63
        logits = model.model.generation_head(h)
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1), reduction="none")
        ce = ce.view(tokens.shape)
        if c.object_weight or c.small_object_weight:  # weight the tokens of patches covering objects
            side = self.vq_cfg.image_size // self.vq_cfg.tokens_per_side
            w = F.avg_pool2d(pixel_weights(b, c.object_weight, c.small_object_weight), side).flatten(1)  # raster
            return {"loss": ((ce * w).sum(1) / w.sum(1)).mean(), "ce": ce.mean()}
        return {"loss": ce.mean(), "ce": ce.mean()}

    def generator(self, model: torch.nn.Module | None = None) -> ConceptWorldJanusGenerator:
        return ConceptWorldJanusGenerator((model or self.trained).eval(), self.conditioner, model_id=AR_NAME,
                                          settings=dict(DEFAULT_SETTINGS))

    def export(self, out: Path, *, records: dict, command: str | None = None, threads: int | None = None) -> dict:
        """Write ``config.json`` and ``model.safetensors`` to ``out``."""
        out.mkdir(parents=True, exist_ok=True)
        model = self.trained
        weights = out / "model.safetensors"
        state = {k: v for k, v in model.state_dict().items()}
        save_state_dict(state, weights, metadata={"format": CONFIG_FORMAT})
        config = {
            "format": CONFIG_FORMAT,
            "version": 1,
            "name": AR_NAME,
            "janus": self.janus_cfg,
            "settings": dict(DEFAULT_SETTINGS),
            "conditioning": {"clip": "conceptworld-clip", "clip_sha256": getattr(self.conditioner, "sha256", None),
                             "features": "per-token text hidden states after ln_final [N, 32, width] -> model.aligner",
                             "uncond_prompt": ""},
            "weights": {"file": "model.safetensors", "sha256": sha256_file(weights),
                        "n_parameters": sum(p.numel() for p in model.parameters())},
            "training": {
                **records,
                self.config.stage: {
                    "command": command, "torch_threads": threads, "wall_time_s": round(self.elapsed_s, 1),
                    "config": dataclasses.asdict(self.config), "history": self.history,
                    "train_sample_seed": LM_SAMPLE_SEED_OFFSET + self.config.seed,
                },
                "torch": torch.__version__,
            },
        }
        write_json(config, out / "config.json")
        return config


def _load_vq_stage(work: Path) -> tuple[dict, VQConfig, dict]:
    rec_path = work / "vq" / "vq_record.json"
    rec = read_json(rec_path)
    cfg = VQConfig(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in rec["config"].items()})
    vq = _build_vq(cfg)
    load_state_dict_checked(vq, work / "vq" / "vq.safetensors", sha256=rec["sha256"])
    return vq.state_dict(), cfg, rec


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (``python -m concepts.zoo.train_ar --help``)."""
    parser = stage_parser("Train the built-in ConceptWorld autoregressive (Janus) model.", ("vq", "prior", "lm", "focus"))
    parser.add_argument("--codebook-size", type=int, default=VQConfig.codebook_size, help="VQ stage: number of codes")
    args = parser.parse_args(argv)
    command = start_stage(args, "concepts.zoo.train_ar", argv)
    work: Path = args.work
    steps = {"total_steps": args.steps} if args.steps else {}
    if args.stage == "vq":
        trainer = VQTrainer(VQConfig(seed=args.seed, codebook_size=args.codebook_size, **steps))
        if not run_stage(trainer, work / "vq_ckpt", args):
            return 0
        (work / "vq").mkdir(parents=True, exist_ok=True)
        save_state_dict(trainer.shipped_state(), work / "vq" / "vq.safetensors")
        write_json(stage_record(trainer, work / "vq" / "vq.safetensors", command=command, threads=args.threads,
                                sample_seed=VQ_SAMPLE_SEED_OFFSET + args.seed), work / "vq" / "vq_record.json")
        logger.info("VQ done: %s", trainer.history[-1] if trainer.history else {})
        return 0

    from .conditioning import CLIPTextConditioner, NullConditioner

    vq_state, vq_cfg, vq_record = _load_vq_stage(work)
    if args.stage == "prior":
        cfg = LMConfig(stage="prior", seed=args.seed, **{**PRIOR_DEFAULTS, **steps})
        trainer = LMTrainer(cfg, vq_state, vq_cfg, NullConditioner(PRIOR_WIDTH, PRIOR_CONTEXT))
        if run_stage(trainer, work / "prior_ckpt", args):
            save_prior_stage(trainer, work, "model.safetensors", command=command, threads=args.threads,
                             sample_seed=LM_SAMPLE_SEED_OFFSET + cfg.seed)
        return 0

    prior_record, prior_state = load_prior_stage(work, "model.safetensors")  # optional unconditional prior
    base_record = None
    if args.stage == "focus":  # continue from the EMA weights of the (stopped) lm stage, object-weighted loss
        init_state, base_record = load_focus_base(work / "lm_ckpt")
        cfg, ckpt = LMConfig(stage="focus", seed=args.seed, **{**FOCUS_DEFAULTS, **steps}), work / "focus_ckpt"
    else:
        init_state, cfg, ckpt = prior_state, LMConfig(seed=args.seed, **steps), work / "lm_ckpt"
    trainer = LMTrainer(cfg, vq_state, vq_cfg, CLIPTextConditioner.from_zoo(), init_state=init_state)
    if not run_stage(trainer, ckpt, args):
        return 0
    records = earlier_records(("vq", vq_record), prior_record, ("lm", base_record))
    config = trainer.export(args.out or work / "export", records=records, command=command, threads=args.threads)
    logger.info("exported %s", config["weights"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
