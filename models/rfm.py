"""RFM scores (1-5) against the current population, the RFM cell and its named segment.

**Scores.** Each score is the customer's quintile in the population, read from the four
quintile boundaries of :class:`models.quantiles.Boundaries`:

- ``f_score = 1 + #{boundaries b : frequency > b}``, the same for ``m_score``;
- ``r_score = 1 + #{boundaries b : recency_days < b}`` (more recent is better).

Equivalently ``score = min(5, 1 + floor(5 * s))`` with ``s`` the share of the population
that is *strictly worse* (fewer purchases, less spend, an older last purchase). So
customers with equal values always get equal scores, and a tie group gets the quintile of
its lowest rank: if 60 % of buyers bought once, all of them get ``f_score = 1`` and a
customer with two purchases, better than 60 % of buyers, gets 4. In the degenerate case
where every buyer has the same value (everyone bought once), every buyer scores 1 on that
measure: it tells nobody apart, and 1 keeps one-time buyers in the "new"/"promising"
column of the map below instead of promoting them. Without boundaries (no buyer yet) the
score is 1 too. A customer without a purchase has no RFM (``recency_days is None``).

**Segment.** From ``r_score`` and ``fm = floor((f_score + m_score) / 2)`` (frequency and
spend weigh alike, so a one-time big spender is not "new" but a potential loyalist),
with the classic R x F segment map and "lost" split from "hibernating":

====  ==============  ==================  ==================  ==============  ==============
R     FM = 1          FM = 2              FM = 3              FM = 4          FM = 5
====  ==============  ==================  ==================  ==============  ==============
5     new             potential_loyalist  potential_loyalist  champions       champions
4     promising       potential_loyalist  potential_loyalist  loyal           loyal
3     about_to_sleep  about_to_sleep      need_attention      loyal           loyal
2     hibernating     hibernating         at_risk             at_risk         cant_lose_them
1     lost            lost                at_risk             at_risk         cant_lose_them
====  ==============  ==================  ==================  ==============  ==============

>>> from models.quantiles import QUINTILES, Boundaries
>>> b = Boundaries(as_of_us=0, quantiles=(0.2, 0.4, 0.6, 0.8), last_purchase_us=(),
...                recency_days=(10.0, 30.0, 60.0, 120.0), frequency=(1, 1, 1, 3),
...                monetary=(20.0, 50.0, 100.0, 250.0), value=(), n=1000, exact=True,
...                rank_error=0.0)
>>> rfm_scores(5.0, 6, 400.0, b)
RfmScore(r_score=5, f_score=5, m_score=5, cell='555', segment='champions')
>>> rfm_scores(5.0, 1, 30.0, b)  # a recent one-time buyer
RfmScore(r_score=5, f_score=1, m_score=2, cell='512', segment='new')
>>> rfm_scores(200.0, 4, 300.0, b).segment  # bought often and much, long ago
'cant_lose_them'
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from typing import NamedTuple

from models.quantiles import QUINTILES, Boundaries

SEGMENTS = (
    "champions", "loyal", "potential_loyalist", "new", "promising", "need_attention",
    "about_to_sleep", "at_risk", "cant_lose_them", "hibernating", "lost",
)

#: Words an agent can read aloud.
SEGMENT_LABELS = {
    "champions": "champion", "loyal": "loyal customer",
    "potential_loyalist": "potential loyalist", "new": "new customer",
    "promising": "promising customer", "need_attention": "customer needing attention",
    "about_to_sleep": "customer about to sleep", "at_risk": "customer at risk",
    "cant_lose_them": "customer we can't lose", "hibernating": "hibernating customer",
    "lost": "lost customer",
}

# SEGMENT_MAP[r - 1][fm - 1], the table in the module docstring.
_P = "potential_loyalist"
SEGMENT_MAP: tuple[tuple[str, ...], ...] = (
    ("lost", "lost", "at_risk", "at_risk", "cant_lose_them"),  # R = 1
    ("hibernating", "hibernating", "at_risk", "at_risk", "cant_lose_them"),  # R = 2
    ("about_to_sleep", "about_to_sleep", "need_attention", "loyal", "loyal"),  # R = 3
    ("promising", _P, _P, "loyal", "loyal"),  # R = 4
    ("new", _P, _P, "champions", "champions"),  # R = 5
)


class RfmScore(NamedTuple):
    r_score: int
    f_score: int
    m_score: int
    cell: str
    segment: str


def segment_of(r_score: int, f_score: int, m_score: int) -> str:
    """The named segment of an RFM cell.

    >>> segment_of(1, 5, 5), segment_of(3, 3, 3), segment_of(1, 1, 2)
    ('cant_lose_them', 'need_attention', 'lost')
    """
    return SEGMENT_MAP[r_score - 1][(f_score + m_score) // 2 - 1]


# Every possible result, built once: scoring a customer is three bisections and a lookup.
_SCORES = tuple(RfmScore(r, f, m, f"{r}{f}{m}", SEGMENT_MAP[r - 1][(f + m) // 2 - 1])
                for r in range(1, 6) for f in range(1, 6) for m in range(1, 6))
_NONE = _SCORES[0]


def rfm_scores(recency_days: float, frequency: int, monetary: float,
               boundaries: Boundaries | None) -> RfmScore:
    """Scores, cell and segment of one customer; ``boundaries`` at the same clock."""
    if boundaries is None:
        return _NONE
    if boundaries.quantiles != QUINTILES:
        raise ValueError(f"RFM scores need quintile boundaries, got quantiles "
                         f"{boundaries.quantiles}")
    rec = boundaries.recency_days  # ascending: count the boundaries above recency_days
    r = len(rec) - bisect_right(rec, recency_days)
    f = bisect_left(boundaries.frequency, frequency)  # boundaries below frequency
    m = bisect_left(boundaries.monetary, monetary)
    return _SCORES[r * 25 + f * 5 + m]
