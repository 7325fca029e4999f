"""A planted SAE whose features are known exactly, and hand-made concepts for it."""

import torch

from saeuron_core.sae.library import ConceptData, add_concept
from saeuron_core.sae.model import SAEConfig, TopKSAE

D = 16


def planted_sae(k: int = 4, hook_point: str = "up_blocks.1.attentions.1") -> TopKSAE:
    """Features 0..15 read +e_i, features 16..31 read -e_i: sparse inputs are encoded exactly."""
    sae = TopKSAE(SAEConfig(d_in=D, n_latents=2 * D, k=k, hook_point=hook_point))
    eye = torch.eye(D)
    with torch.no_grad():
        sae.encoder.weight.copy_(torch.cat([eye, -eye]))
        sae.encoder.bias.zero_()
        sae.W_dec.copy_(torch.cat([eye, -eye]))
        sae.b_dec.zero_()
    return sae


def concept(name: str, features_by_bucket: dict, *, n_buckets: int = 50, mu: float = 0.5,
            threshold: float = 0.1, bucket_width: float = 20.0) -> ConceptData:
    """``features_by_bucket``: {bucket range: [feature ids]} (ranges cover the buckets to select in)."""
    m = 4
    ids = torch.zeros(n_buckets, m, dtype=torch.long)
    n_sel = torch.zeros(n_buckets, dtype=torch.long)
    for buckets, feats in features_by_bucket.items():
        for b in buckets:
            ids[b, : len(feats)] = torch.tensor(feats)
            n_sel[b] = len(feats)
    return ConceptData(name=name, bucket_width=bucket_width, max_timestep=int(n_buckets * bucket_width),
                       feature_ids=ids, scores=torch.ones(n_buckets, m), mu=torch.full((n_buckets, m), mu),
                       threshold=torch.full((n_buckets, m), threshold), n_selected=n_sel,
                       observed=torch.ones(n_buckets, dtype=torch.bool), info={})


def sae_with_concepts() -> TopKSAE:
    sae = planted_sae()
    add_concept(sae, concept("cat", {range(50): [3]}))
    add_concept(sae, concept("dog", {range(50): [5]}))
    # "early": feature 7 in the noisy half (t >= 500), feature 8 in the clean half.
    add_concept(sae, concept("early", {range(25, 50): [7], range(0, 25): [8]}))
    return sae
