"""What the DashCLIP paper (Gurjar et al., arXiv 2504.07110) reports, for the report's side-by-side.

Only claims we could verify from reachable copies of the paper and the DoorDash engineering blog
are stated; the exact table values were not in any copy available offline (the blog renders its
tables as images), so the report states the paper's *direction* of each result, never invented
numbers. Fill in values here if you have the PDF at hand.
"""
from __future__ import annotations

NOT_AVAILABLE = "value not in our offline copy"

# Table 1: retrieval of products for held-out queries. Baselines in the paper: CLIP, BLIP, FLAVA
# (off-the-shelf), versus DashCLIP; DashCLIP is best on every metric.
TABLE1: dict[str, tuple[str, str, str]] = {
    "CLIP / BLIP / FLAVA (off-the-shelf)": (NOT_AVAILABLE,) * 3,
    "DashCLIP": ("best of all models",) * 3,
}

# Section 5: probes on frozen embeddings.
SECTION5 = {
    "aisle_f1": "DashCLIP significantly above BLIP-14M embeddings",
    "relevance_f1": "DashCLIP significantly above BLIP-14M embeddings",
}

# Table 2: pCTR on the week after training (NW), AUC and normalized logloss.
TABLE2_COLUMNS = ("NW", "NW, users with purchase history")
TABLE2: dict[str, tuple[str, str]] = {
    "dcn (baseline)": ("reference", "reference"),
    "dcn_pq (+ product, query, cosine)": ("gain over baseline", "gain over baseline"),
    "dcn_pq_hist (+ 84-day purchase history)": ("best, significant (p < 0.05)", "best, larger gain than all users"),
}

IMPORTANCE = ("feature permutation ranks the DashCLIP query embedding, product embedding and the "
              "purchase-history embedding near the top of all features")
SERVING = ("fusing the frozen tables into the served model adds under 4 ms at p99; fetching the "
           "embeddings from a feature store instead costs about 5x the model's own latency")
