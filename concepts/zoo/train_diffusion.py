"""Train the built-in ConceptWorld diffusion model (seeded, resumable, CPU-friendly), in two stages.

Usage::

    # stage 1: the autoencoder (images only; no CLIP needed)
    python -m concepts.zoo.train_diffusion --stage vae --work /tmp/cwdiff --seed 0
    # stage 2: the UNet as an unconditional prior (all-zero text states; no CLIP needed)
    python -m concepts.zoo.train_diffusion --stage prior --work /tmp/cwdiff --seed 0
    # stage 3: the text-conditioned UNet (from the prior) on the frozen CLIP text tower
    python -m concepts.zoo.train_diffusion --stage unet --work /tmp/cwdiff --seed 0
    cp /tmp/cwdiff/export/{config.json,vae.safetensors,unet.safetensors} concepts/zoo/weights/conceptworld-diffusion/

Rerunning a command resumes from its checkpoint (``<work>/vae_ckpt``, ``<work>/prior_ckpt``, ``<work>/unet_ckpt``).

Recipe (defaults of :class:`VAEConfig` and :class:`UNetConfig`):

* data: fresh ConceptWorld images (world seed 0, 32x32 renders) every step -- sample seed ``30_000 + seed``
  for the VAE and ``31_000 + seed`` for the UNet (the quality benchmark uses held-out seed 777);
* VAE (``AutoencoderKL``, 32/48/64 channels, 8x8x8 latents): L1 + L2 reconstruction with object pixels
  weighted 5x and small-object pixels 13x (they are few but they carry the concepts; a 5-pixel star or cross is
  the finest detail), KL weight 1e-6 (on the summed KL); latents are scaled by
  ``1 / std`` (``scaling_factor``) measured after training;
* UNet (``UNet2DConditionModel``, 32/64 channels, cross-attention at 8x8 and 4x4): epsilon prediction on the
  1000-step ``scaled_linear`` DDPM schedule, min-SNR-5 loss weighting, captions drawn by
  :func:`~concepts.zoo.prompts.sample_spec` (full captions 50 %, partial and single-concept captions) with
  10 % replaced by ``""`` (classifier-free guidance), AdamW lr 6e-4, EMA 0.998 (shipped);
* the text-conditioned stage starts from the EMA weights of the prior stage (1,200 steps, same recipe with
  all-zero text states), except the layers reading the text, whose width differs;
* monitor: every checkpoint, 64 held-out captions are generated with the EMA weights (20 DDIM steps,
  guidance 3) and read by the ``conceptworld-detector`` (prompted colour / shape present).
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import read_json, save_state_dict, sha256_file, write_json
from .diffusion import CONFIG_FORMAT, DEFAULT_SETTINGS, DIFFUSION_NAME, build_pipeline, build_scheduler, build_unet, build_vae
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

__all__ = ["VAEConfig", "UNetConfig", "VAETrainer", "UNetTrainer", "main", "CAPTION_MIX"]

VAE_SAMPLE_SEED_OFFSET = 30_000
UNET_SAMPLE_SEED_OFFSET = 31_000
MONITOR_SAMPLE_SEED = 777
PRIOR_CONTEXT = 32
PRIOR_DEFAULTS: dict = {"total_steps": 1200, "ema": 0.995, "p_uncond": 0.0, "warmup_steps": 100}
"""Stage ``prior``: the UNet trained unconditionally (all-zero text states, no CLIP needed)."""
FOCUS_DEFAULTS: dict = {"total_steps": 8000, "lr": 4e-4, "warmup_steps": 100, "object_weight": 4.0,
                        "small_object_weight": 8.0, "prediction_type": "v_prediction", "zero_terminal_snr": True}
"""Stage ``focus``: continues the ``unet`` stage with the loss weighted towards the latent pixels covering objects."""

CAPTION_MIX: dict[str, float] = {
    "full": 0.5, "partial": 0.2, "colour": 0.05, "shape": 0.05, "colour_shape": 0.1, "size": 0.02,
    "count": 0.04, "background": 0.04,
}
"""Caption kinds the generators are trained on (:func:`~concepts.zoo.prompts.sample_spec` mix)."""


@dataclass
class VAEConfig:
    """Stage 1: the autoencoder."""

    seed: int = 0
    world_seed: int = 0
    image_size: int = 32
    block_out_channels: tuple = (32, 48, 64)
    latent_channels: int = 8
    norm_num_groups: int = 8
    batch_size: int = 32
    lr: float = 1e-3
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.0
    warmup_steps: int = 100
    total_steps: int = 2500
    checkpoint_every: int = 250
    ema: float = 0.0
    kl_weight: float = 1e-6
    object_weight: float = 4.0
    small_object_weight: float = 8.0

    def vae_config(self) -> dict:
        n = len(self.block_out_channels)
        return {
            "in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * n,
            "up_block_types": ["UpDecoderBlock2D"] * n, "block_out_channels": list(self.block_out_channels),
            "layers_per_block": 1, "latent_channels": self.latent_channels, "norm_num_groups": self.norm_num_groups,
            "sample_size": self.image_size, "scaling_factor": 1.0,
        }


@dataclass
class UNetConfig:
    """Stages 2 and 3: the UNet, as an unconditional prior (``stage="prior"``) then text-conditioned."""

    stage: str = "unet"
    seed: int = 0
    world_seed: int = 0
    block_out_channels: tuple = (32, 64)
    attention_head_dim: int = 8
    cross_attention_dim: int = 64
    norm_num_groups: int = 16
    batch_size: int = 64
    lr: float = 6e-4
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    warmup_steps: int = 200
    total_steps: int = 3000
    checkpoint_every: int = 250
    ema: float = 0.998
    p_uncond: float = 0.1
    p_template: float = 0.1
    min_snr_gamma: float = 5.0
    mix: dict = field(default_factory=lambda: dict(CAPTION_MIX))
    num_train_timesteps: int = 1000
    monitor_size: int = 64
    object_weight: float = 0.0
    small_object_weight: float = 0.0
    prediction_type: str = "epsilon"
    zero_terminal_snr: bool = False

    def unet_config(self, latent_size: int, latent_channels: int, text_width: int) -> dict:
        n = len(self.block_out_channels)
        return {
            "sample_size": latent_size, "in_channels": latent_channels, "out_channels": latent_channels,
            "block_out_channels": list(self.block_out_channels),
            "down_block_types": ["CrossAttnDownBlock2D"] * n, "up_block_types": ["CrossAttnUpBlock2D"] * n,
            "layers_per_block": 1, "cross_attention_dim": self.cross_attention_dim,
            "attention_head_dim": self.attention_head_dim, "norm_num_groups": self.norm_num_groups,
            "encoder_hid_dim": text_width, "encoder_hid_dim_type": "text_proj", "addition_embed_type": "text",
            "addition_embed_type_num_heads": 4,
        }

    def scheduler_config(self) -> dict:
        cfg = {
            "num_train_timesteps": self.num_train_timesteps, "beta_start": 0.00085, "beta_end": 0.012,
            "beta_schedule": "scaled_linear", "prediction_type": self.prediction_type, "clip_sample": False,
            "set_alpha_to_one": False, "steps_offset": 1, "timestep_spacing": "leading",
        }
        if self.zero_terminal_snr:  # Lin et al. 2024: the last step is pure noise; needs v-prediction
            cfg.update({"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"})  # (ignores steps_offset)
        return cfg


def _images(batch) -> torch.Tensor:
    return torch.from_numpy(batch.images).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def pixel_weights(batch, object_weight: float, small_object_weight: float) -> torch.Tensor:
    """Reconstruction weight per pixel ``[n, 1, H, W]``: 1, plus ``object_weight`` on object pixels, plus
    ``small_object_weight`` on the pixels of small objects (5 px wide at 32 px: their shape is the hardest detail).
    """
    masks = torch.tensor(batch.masks)  # [n, 4, H, W]
    small = torch.zeros(masks.shape[:2], dtype=torch.bool)
    obj = batch.objects
    small[torch.tensor(obj["image"].to_numpy()), torch.tensor(obj["slot"].to_numpy())] = torch.tensor(
        (obj["size"] == "small").to_numpy()
    )
    small_px = (masks & small[:, :, None, None]).any(1)
    w = 1.0 + object_weight * masks.any(1).float() + small_object_weight * small_px.float()
    return w[:, None]


class VAETrainer(ResumableTrainer):
    """Stage 1 of :mod:`concepts.zoo.train_diffusion`."""

    name = "train_diffusion.vae"

    def __init__(self, config: VAEConfig) -> None:
        from concepts.world import ConceptWorld

        self.world = ConceptWorld(seed=config.world_seed, image_size=config.image_size)
        torch.manual_seed(config.seed)
        super().__init__(build_vae(config.vae_config()), config)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        b = self.world.sample(c.batch_size, seed=VAE_SAMPLE_SEED_OFFSET + c.seed, start=step * c.batch_size)
        return _images(b), pixel_weights(b, c.object_weight, c.small_object_weight)

    def loss(self, step: int) -> dict[str, torch.Tensor]:
        x, w = self.batch(step)
        g = torch.Generator().manual_seed(self.config.seed * 7919 + step)
        post = self.model.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        y = self.model.decode(z).sample
        rec = ((y - x).abs() * w).mean() + ((y - x) ** 2 * w).mean()
        kl = post.kl().mean()  # summed over the latent values, averaged over the batch
        return {"loss": rec + self.config.kl_weight * kl, "rec": rec, "kl": kl}

    @torch.no_grad()
    def monitor(self) -> dict[str, float]:
        self.model.eval()
        b = self.world.sample(256, seed=MONITOR_SAMPLE_SEED)
        x = _images(b)
        y = self.model.decode(self.model.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        err = (y - x).abs().mean(1)
        obj = torch.from_numpy(b.masks.any(1))
        out = {"mae": round(float(err.mean()), 4), "mae_objects": round(float(err[obj].mean()), 4)}
        det = _try_detector()
        if det is not None:
            real = det.detect((x + 1) / 2)
            rec = det.detect((y + 1) / 2)
            cols = [c for c in det.concept_names if det.concept_names.index(c) < 11]  # colours and shapes
            out["detector_agreement"] = round(float((real[cols] == rec[cols]).to_numpy().mean()), 4)
        return out

    @torch.no_grad()
    def latent_std(self, n: int = 1024) -> float:
        b = self.world.sample(n, seed=VAE_SAMPLE_SEED_OFFSET + self.config.seed + 500)
        self.model.eval()
        return float(self.model.encode(_images(b)).latent_dist.mean.std())


def _try_detector():
    """The shipped detector, or None when its weights are not there yet (monitoring only)."""
    try:
        from .detector import load_conceptworld_detector

        return load_conceptworld_detector()
    except (FileNotFoundError, ValueError) as err:
        logger.info("no detector for monitoring (%s)", err)
        return None


class ConditionalTrainer(ResumableTrainer):
    """A text-conditioned generator stage (UNet or LM): training captions and the detector-read prompt monitor.

    Subclasses set ``caption_stream`` (a random stream of their own) and ``_detector = None`` and provide
    ``generator()``; their config has ``seed``, ``mix``, ``p_template``, ``p_uncond``, ``monitor_size``, ``stage``.
    """

    caption_stream: int = 1

    def captions(self, batch, step: int) -> list[str]:
        """Training captions of a batch (deterministic in the step): sample_spec mix, ``""`` with p_uncond."""
        from .prompts import sample_spec

        c = self.config
        rng = np.random.default_rng([c.seed, step, self.caption_stream])
        objs = [[] for _ in range(len(batch))]
        for i, size, colour, shape in batch.objects[["image", "size", "colour", "shape"]].itertuples(index=False):
            objs[i].append((size, colour, shape))
        caps = [sample_spec(objs[i], batch.backgrounds[i], rng, mix=c.mix, p_template=c.p_template).text()
                for i in range(len(batch))]
        drop = rng.random(len(caps)) < c.p_uncond
        return ["" if d else cap for cap, d in zip(caps, drop)]

    def monitor(self) -> dict[str, float]:
        from .detector import heldout_prompts, prompt_fidelity

        if self.config.monitor_size <= 0:
            return {}
        if self._detector is None:
            self._detector = _try_detector()
        if self._detector is None:
            return {}
        caps, wanted = heldout_prompts(self.config.monitor_size, seed=MONITOR_SAMPLE_SEED)
        if self.config.stage == "prior":  # unconditional samples: how often each family is plausible at all
            wanted = wanted[len(wanted) // 2:] + wanted[:len(wanted) // 2]
        out = self.generator().generate(caps, seeds=0)
        q = prompt_fidelity(self._detector.detect(out.images), wanted)
        return {k: q[k] for k in ("colour", "shape", "colour_shape", "count", "background", "colour_extra", "shape_extra")
                if k in q}


class UNetTrainer(ConditionalTrainer):
    """Stage 2 of :mod:`concepts.zoo.train_diffusion`: the UNet on frozen VAE latents and CLIP text states."""

    name = "train_diffusion.unet"

    def __init__(self, config: UNetConfig, vae: torch.nn.Module, conditioner: torch.nn.Module,
                 init_state: dict | None = None) -> None:
        from diffusers import DDPMScheduler

        from concepts.world import ConceptWorld

        if config.zero_terminal_snr and config.prediction_type != "v_prediction":
            raise ValueError(
                "zero_terminal_snr=True needs prediction_type='v_prediction' (with zero SNR the last step is pure "
                f"noise and epsilon-prediction carries no signal), got prediction_type={config.prediction_type!r}."
            )
        self.vae = vae.eval()
        for p in self.vae.parameters():
            p.requires_grad_(False)
        self.conditioner = conditioner
        size = int(vae.config.sample_size)
        self.world = ConceptWorld(seed=config.world_seed, image_size=size)
        down = 2 ** (len(vae.config.block_out_channels) - 1)
        torch.manual_seed(config.seed)
        self.unet_cfg = config.unet_config(size // down, int(vae.config.latent_channels), conditioner.width)
        self.scheduler_cfg = config.scheduler_config()
        self.noise = DDPMScheduler(**{k: v for k, v in self.scheduler_cfg.items()
                                      if k not in ("set_alpha_to_one",)})
        super().__init__(build_unet(self.unet_cfg), config, init_state=init_state)
        acp = self.noise.alphas_cumprod
        self.snr = acp / (1 - acp)
        self._detector = None

    def loss(self, step: int) -> dict[str, torch.Tensor]:
        c = self.config
        b = self.world.sample(c.batch_size, seed=UNET_SAMPLE_SEED_OFFSET + c.seed, start=step * c.batch_size)
        g = torch.Generator().manual_seed(c.seed * 104729 + step)
        with torch.no_grad():
            post = self.vae.encode(_images(b)).latent_dist
            z = (post.mean + post.std * torch.randn(post.mean.shape, generator=g)) * self.vae.config.scaling_factor
            text, _ = self.conditioner.encode(self.captions(b, step))
        t = torch.randint(0, c.num_train_timesteps, (len(z),), generator=g)
        eps = torch.randn(z.shape, generator=g)
        zt = self.noise.add_noise(z, eps, t)
        pred = self.model(zt, t, encoder_hidden_states=text).sample
        snr = self.snr[t]
        if c.prediction_type == "v_prediction":
            target = self.noise.get_velocity(z, eps, t)
            w = (torch.clamp(snr, max=c.min_snr_gamma) + 1) / (snr + 1)  # min-SNR-gamma for v (x0-MSE weight)
        else:
            target = eps
            w = torch.clamp(snr, max=c.min_snr_gamma) / snr
        err = (pred - target) ** 2
        mse = err.mean(dim=(1, 2, 3))
        if c.object_weight or c.small_object_weight:  # weight latent pixels by the objects they cover
            pw = F.avg_pool2d(pixel_weights(b, c.object_weight, c.small_object_weight), b.images.shape[1] // err.shape[-1])
            weighted = (err * pw).sum(dim=(1, 2, 3)) / (pw.sum(dim=(1, 2, 3)) * err.shape[1])
        else:
            weighted = mse
        return {"loss": (w * weighted).mean(), "mse": mse.mean()}

    def pipeline(self, unet: torch.nn.Module | None = None):
        return build_pipeline(self.vae, (unet or self.trained).eval(), build_scheduler(self.scheduler_cfg))

    def generator(self, unet: torch.nn.Module | None = None):
        from concepts.generators import StableDiffusionGenerator

        return StableDiffusionGenerator(
            self.pipeline(unet), text_encoder_fn=self.conditioner.encode, extra_modules={"text_encoder": self.conditioner},
            model_id=DIFFUSION_NAME, settings=dict(DEFAULT_SETTINGS),
        )

    def export(self, out: Path, *, records: dict, command: str | None = None, threads: int | None = None) -> dict:
        """Write ``config.json``, ``vae.safetensors`` and ``unet.safetensors`` to ``out``."""
        out.mkdir(parents=True, exist_ok=True)
        unet = self.trained
        save_state_dict(self.vae.state_dict(), out / "vae.safetensors", metadata={"format": CONFIG_FORMAT})
        save_state_dict(unet.state_dict(), out / "unet.safetensors", metadata={"format": CONFIG_FORMAT})
        config = {
            "format": CONFIG_FORMAT,
            "version": 1,
            "name": DIFFUSION_NAME,
            "vae": json_ready(dict(self.vae.config)),
            "unet": self.unet_cfg,
            "scheduler": self.scheduler_cfg,
            "settings": dict(DEFAULT_SETTINGS),
            "conditioning": {"clip": "conceptworld-clip", "clip_sha256": getattr(self.conditioner, "sha256", None),
                             "features": "per-token text hidden states after ln_final [N, 32, width]",
                             "uncond_prompt": ""},
            "weights": {
                "vae": {"file": "vae.safetensors", "sha256": sha256_file(out / "vae.safetensors"),
                        "n_parameters": sum(p.numel() for p in self.vae.parameters())},
                "unet": {"file": "unet.safetensors", "sha256": sha256_file(out / "unet.safetensors"),
                         "n_parameters": sum(p.numel() for p in unet.parameters())},
            },
            "training": {
                **records,
                self.config.stage: {
                    "command": command, "torch_threads": threads, "wall_time_s": round(self.elapsed_s, 1),
                    "config": dataclasses.asdict(self.config), "history": self.history,
                    "train_sample_seed": UNET_SAMPLE_SEED_OFFSET + self.config.seed,
                },
                "torch": torch.__version__,
            },
        }
        write_json(config, out / "config.json")
        return config


def json_ready(d: dict) -> dict:
    """A diffusers config dict without private keys, with tuples as lists (JSON round-trip safe)."""
    import json

    return json.loads(json.dumps({k: v for k, v in d.items() if not k.startswith("_")}, default=list))


def _load_vae_stage(work: Path):
    from .checkpoint import load_state_dict_checked

    rec = read_json(work / "vae" / "vae_record.json")
    vae = build_vae(rec["vae"], source=str(work / "vae" / "vae_record.json"))
    load_state_dict_checked(vae, work / "vae" / "vae.safetensors", sha256=rec["sha256"])
    return vae.eval(), rec


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (``python -m concepts.zoo.train_diffusion --help``)."""
    parser = stage_parser("Train the built-in ConceptWorld diffusion model.", ("vae", "prior", "unet", "focus"))
    args = parser.parse_args(argv)
    command = start_stage(args, "concepts.zoo.train_diffusion", argv)
    work: Path = args.work
    steps = {"total_steps": args.steps} if args.steps else {}
    if args.stage == "vae":
        trainer = VAETrainer(VAEConfig(seed=args.seed, **steps))
        if not run_stage(trainer, work / "vae_ckpt", args):
            return 0
        vae = trainer.model.eval()
        vae.register_to_config(scaling_factor=round(1.0 / trainer.latent_std(), 5))
        (work / "vae").mkdir(parents=True, exist_ok=True)
        save_state_dict(vae.state_dict(), work / "vae" / "vae.safetensors")
        write_json(stage_record(trainer, work / "vae" / "vae.safetensors", command=command, threads=args.threads,
                                sample_seed=VAE_SAMPLE_SEED_OFFSET + args.seed, vae=json_ready(dict(vae.config))),
                   work / "vae" / "vae_record.json")
        logger.info("VAE done: %s", trainer.history[-1] if trainer.history else {})
        return 0

    from .conditioning import CLIPTextConditioner, NullConditioner

    vae, vae_record = _load_vae_stage(work)
    if args.stage == "prior":
        cfg = UNetConfig(stage="prior", seed=args.seed, **{**PRIOR_DEFAULTS, **steps})
        trainer = UNetTrainer(cfg, vae, NullConditioner(cfg.cross_attention_dim, PRIOR_CONTEXT))
        if run_stage(trainer, work / "prior_ckpt", args):
            save_prior_stage(trainer, work, "unet.safetensors", command=command, threads=args.threads,
                             sample_seed=UNET_SAMPLE_SEED_OFFSET + cfg.seed)
        return 0

    prior_record, prior_state = load_prior_stage(work, "unet.safetensors")  # optional unconditional prior
    base_record = None
    if args.stage == "focus":  # continue from the EMA weights of the (stopped) unet stage, object-weighted loss
        init_state, base_record = load_focus_base(work / "unet_ckpt")
        cfg, ckpt = UNetConfig(stage="focus", seed=args.seed, **{**FOCUS_DEFAULTS, **steps}), work / "focus_ckpt"
    else:
        init_state, cfg, ckpt = prior_state, UNetConfig(seed=args.seed, **steps), work / "unet_ckpt"
    trainer = UNetTrainer(cfg, vae, CLIPTextConditioner.from_zoo(), init_state=init_state)
    if not run_stage(trainer, ckpt, args):
        return 0
    records = earlier_records(("vae", vae_record), prior_record, ("unet", base_record), drop=("vae", "sha256"))
    config = trainer.export(args.out or work / "export", records=records, command=command, threads=args.threads)
    logger.info("exported %s", config["weights"])
    return 0

if __name__ == "__main__":
    raise SystemExit(main())
