"""The generative model's parameters: the size profiles (:data:`PROFILES`), the shoppers' and the
ad system's choice probabilities (:class:`Behaviour`), the coefficients of the planted click logit
(:class:`ClickModel`) and the hour-of-day profile of sessions and orders."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

# Share of sessions and orders by hour of day (0..23).
HOUR_WEIGHTS = np.array([1, 0.6, 0.4, 0.3, 0.3, 0.5, 1.2, 2.2, 3.2, 3.8, 4.2, 4.8,
                         5.2, 4.8, 4.3, 4.2, 4.6, 5.4, 6.0, 6.2, 5.6, 4.6, 3.2, 2.0])
HOUR_WEIGHTS = HOUR_WEIGHTS / HOUR_WEIGHTS.sum()


@dataclass(frozen=True)
class ProfileConfig:
    """Sizes of one profile (``--scale`` multiplies the product/user/session/query/store counts)."""

    n_products: int
    n_users: int
    n_sessions: int  # search sessions over the whole period (each shows 4-8 ad candidates)
    n_relevance_queries: int  # distinct query texts in the relevance table
    n_stores: int
    n_days: int = 244  # 2024-01-01 .. 2024-08-31; the last EVAL_DAYS (7) are the ranking evaluation split
    start_date: str = "2024-01-01"
    pairs_per_query: int = 20  # relevance pairs per query (on average)
    image_px: int = 96  # packshot side in pixels
    users_without_purchases: float = 0.3
    mean_orders_per_user: float = 10.0  # over the whole period, for users who buy
    min_candidates: int = 4
    max_candidates: int = 8
    variant_hidden_share: float = 0.3  # products whose variant shows only in the image
    organic_image_only_share: float = 0.5  # organic products whose "Organic" shows only in the image
    catalog_rows_per_group: int = 2048  # Parquet row group sizes (fixed: part of the byte-identical output)
    rows_per_group: int = 262_144
    relevance_queries_per_chunk: int = 20_000
    # relevance queries (the first ones drawn) whose complete noise-free MR/HR product list goes to
    # synth_relevance_truth.parquet: retrieval over the whole catalog with complete judgments
    complete_label_queries: int = 2000

    def scaled(self, factor: float) -> "ProfileConfig":
        if factor == 1.0:
            return self
        return dataclasses.replace(
            self,
            n_products=max(100, round(self.n_products * factor)),
            n_users=max(50, round(self.n_users * factor)),
            n_sessions=max(100, round(self.n_sessions * factor)),
            n_relevance_queries=max(50, round(self.n_relevance_queries * factor)),
            n_stores=max(2, round(self.n_stores * factor)),
        )


PROFILES: dict[str, ProfileConfig] = {
    "tiny": ProfileConfig(n_products=400, n_users=150, n_sessions=850, n_relevance_queries=150, n_stores=5,
                          n_days=120, mean_orders_per_user=4.0, catalog_rows_per_group=256, rows_per_group=4096),
    "demo": ProfileConfig(n_products=3500, n_users=5000, n_sessions=72_000, n_relevance_queries=2000, n_stores=40,
                          rows_per_group=65_536),
    "paper": ProfileConfig(n_products=400_000, n_users=500_000, n_sessions=4_000_000,
                           n_relevance_queries=1_600_000, n_stores=2000, rows_per_group=1_048_576,
                           complete_label_queries=0),  # an aisle query alone has tens of thousands of HR products
}


@dataclass(frozen=True)
class Behaviour:
    """Probabilities of the shoppers' and the ad system's choices (see the :mod:`data.synth` docstring)."""

    intent_kind_probs: tuple[float, ...] = (0.16, 0.28, 0.16, 0.14, 0.10, 0.0, 0.16)  # KIND_NAMES order
    organic_query_share: float = 0.4
    query_synonym_share: float = 0.45
    query_modifier_share: float = 0.45
    query_second_modifier_share: float = 0.25
    query_swap_share: float = 0.2
    query_misspell_share: float = 0.12
    query_capital_share: float = 0.15
    fav_aisle_slot_probs: tuple[float, ...] = (0.55, 0.3, 0.15)
    n_fav_brands: int = 5
    n_staples: int = 4
    session_target_probs: tuple[float, ...] = (0.25, 0.55, 0.20)  # favourite brand, favourite aisle, popular
    purchase_item_probs: tuple[float, ...] = (0.35, 0.35, 0.30)  # staple, favourite brand, favourite aisle
    basket_extra_items_mean: float = 1.5
    weekend_session_factor: float = 1.15
    candidate_source_probs: tuple[float, ...] = (0.22, 0.28, 0.25, 0.25)  # exact, near, same aisle, popular
    auction_relevance: float = 0.5
    discount_share: float = 0.2
    discount_levels: tuple[float, ...] = (0.1, 0.15, 0.2, 0.25, 0.3)
    home_store_share: float = 0.8
    main_platform_share: float = 0.85
    platform_probs: tuple[float, ...] = (0.45, 0.35, 0.2)  # ios, android, web
    relevance_source_probs: tuple[float, ...] = (0.15, 0.30, 0.55)  # exact, near, popular
    relevance_oversample: float = 1.6
    relevance_uniform_target_share: float = 0.3
    label_split: tuple[float, ...] = (0.696, 0.205, 0.099)  # IR, MR, HR


@dataclass(frozen=True)
class ClickModel:
    """Coefficients of the planted click logit (see the :mod:`data.synth` docstring)."""

    intercept: float = -5.45
    relevance_mr: float = 1.1
    relevance_hr: float = 2.3
    history_aisle: float = 1.2
    history_brand: float = 1.6
    history_product: float = 2.0
    position_log1p: float = -0.5
    appeal_sd: float = 0.4
    store_sd: float = 0.15
    platform: tuple[float, ...] = (0.0, 0.1, -0.2)
    evening: float = 0.2
    night: float = -0.2
    weekend: float = 0.1
    discount: float = 2.0
    price_sensitivity_mean: float = 0.4
    price_sensitivity_sd: float = 0.25
    ctr_prior: float = 0.04
    ctr_prior_strength: float = 20.0
