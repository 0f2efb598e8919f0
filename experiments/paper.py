"""The DashCLIP paper's own figures, as data for the report's side-by-side.

Gurjar, Liu, Kolli, Kumar, Rahurkar, "DashCLIP: Leveraging multimodal models for generating
semantic embeddings for DoorDash" (arXiv 2504.07110, 2025). Every table of the report shows these
beside ours under :data:`LABEL`: they come from DoorDash's private data, so the report compares
directions and relative gains, never absolute values.
"""
from __future__ import annotations

LABEL = "paper (DoorDash, private data)"

# Table 1: top-10 kNN retrieval for held-out queries over the products of the held-out relevance
# pairs: graded relevance (IR/MR/HR), Recall@10, Precision@10 (MR and HR relevant).
TABLE1_METRICS = ("graded_relevance", "recall_at_10", "precision_at_10")
TABLE1: dict[str, tuple[float, float, float]] = {
    "Random": (0.102, 0.194, 0.027),
    "CLIP ViT-B/32 (text)": (0.346, 0.530, 0.164),
    "CLIP ViT-B/32 (image)": (0.529, 0.666, 0.325),
    "BLIP-14M (text)": (0.328, 0.457, 0.190),
    "BLIP-14M (image)": (0.316, 0.468, 0.178),
    "FLAVA (text)": (0.276, 0.446, 0.137),
    "FLAVA (image)": (0.393, 0.562, 0.230),
    "DashCLIP (image-text)": (0.667, 0.743, 0.515),
}
TABLE1_DASHCLIP = "DashCLIP (image-text)"


def table1_relative_gains() -> dict[str, float]:
    """DashCLIP over the paper's best baseline per Table 1 metric, relative (0.12 = +12%)."""
    ours = TABLE1[TABLE1_DASHCLIP]
    return {metric: ours[i] / max(v[i] for name, v in TABLE1.items() if name != TABLE1_DASHCLIP) - 1.0
            for i, metric in enumerate(TABLE1_METRICS)}


# Section 5: MLP probes on frozen embeddings, macro F1 (DashCLIP, BLIP-14M).
SECTION5: dict[str, tuple[float, float]] = {
    "aisle_f1": (0.750, 0.707),
    "relevance_f1": (0.671, 0.476),
}
SECTION5_NOTES = {
    "aisle_f1": "13,500 / 3,375 products; the baseline is weakest on low-support aisles",
    "relevance_f1": "32,577 / 8,175 pairs, half of IR dropped; the baseline's HR recall is 0.059",
}

# Table 2: pCTR on the week after training (NW), ROC-AUC over 5 runs, by variant and slice
# (the slices of ranking.metrics.SLICES).
TABLE2_AUC: dict[str, dict[str, float]] = {
    "dcn": {"nw": 0.7731, "nw_hist": 0.7807, "nw_nohist": 0.7456},
    "dcn_pq": {"nw": 0.7741},
    "dcn_pq_hist": {"nw": 0.7787, "nw_hist": 0.7876, "nw_nohist": 0.7475},
    "dcn_pq_hist_random": {"nw": 0.7731},
}
TABLE2_NOTE = ("gains in AUC points: +pq +0.10, +pq+hist +0.56 (p < 0.05), randomly initialised tables +0.00; "
               "users with purchase history +0.69 against +0.19 without")

IMPORTANCE = ("Captum feature permutation (integrated gradients and ablation agree): the query embedding, the "
              "product embedding and the 84-day purchase history are the top 3 of all features, far above every "
              "existing dense and sparse feature")
SERVING = ("fusing the frozen tables into the served model adds under 4 ms at p99; fetching the vectors from a "
           "feature store instead costs about 5x the model's own latency")
