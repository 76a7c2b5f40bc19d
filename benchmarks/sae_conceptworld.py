"""SAE units vs ground-truth concepts on built-in CLIP features of ConceptWorld.

Fits a TopK SAE on the built-in CLIP's image embeddings of 4,000 ConceptWorld images and reports, per concept,
the held-out AUROC of the best single SAE unit against a supervised linear probe (the upper bound), with
``sae.evaluation.probe_upper_bound``.

Run: ``.venv/bin/python benchmarks/sae_conceptworld.py``
"""
from __future__ import annotations

import json

import torch

from concepts.encoders import OpenCLIPEncoder
from concepts.world import ConceptWorld
from concepts.world.vocabulary import Vocabulary
from concepts.zoo import load
from sae import TopKSAE
from sae.evaluation import probe_upper_bound


def main() -> None:
    torch.set_num_threads(1)
    enc = OpenCLIPEncoder(*load("conceptworld-clip"))
    batch = ConceptWorld(seed=0).sample(4000, seed=5)
    X = enc.encode_images(batch.images, normalize=True)
    sae = TopKSAE(n_concepts=128, top_k=16, n_epochs=30, batch_size=256, lr=5e-3, random_state=0).fit(X)
    df = probe_upper_bound(sae, X, batch.concepts, random_state=0)
    vocab = Vocabulary()
    df["family"] = [vocab.family(c) for c in df.index]
    by_family = df.groupby("family")[["latent_auroc", "probe_auroc"]].mean()
    print(by_family.round(3).to_string())
    print()
    print(df[["family", "best_latent", "latent_auroc", "probe_auroc"]].round(3).to_string())
    result = {
        "mean_unit_auroc": round(float(df["latent_auroc"].mean()), 4),
        "mean_probe_auroc": round(float(df["probe_auroc"].mean()), 4),
        "concepts_with_unit_auroc_0.9": int((df["latent_auroc"] >= 0.9).sum()),
        "n_concepts": int(len(df)),
        **{f"unit_auroc_{fam}": round(float(v), 4) for fam, v in by_family["latent_auroc"].items()},
    }
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
