"""The feature list (search by explanation and by token, orders, paging) and the feature pages."""

from __future__ import annotations

from typing import TYPE_CHECKING

from saeforge.errors import SaeforgeError
from saeforge.features.store import MAX_SEARCH_CHARS, ORDERS
from saeforge.web.errors import WebError, check_text

if TYPE_CHECKING:
    from saeforge.web.data import RunData

ORDER_LABELS = {"relevance": "relevance (token search)", "density": "density, most frequent first",
                "density_asc": "density, rarest first", "index": "index", "score": "score",
                "max_act": "max activation"}
assert set(ORDER_LABELS) == set(ORDERS)
MAX_LIST_LIMIT = 500
MAX_LINKS = 8  # per link kind and direction on a feature page (a feature can be in the top-k of hundreds)
# flow matches first, the main one (top-1) first; any other kind after them, by name
LINK_KIND_ORDER = ("flow:top1", "flow:topk", "flow:permutation", "flow:pearson")
TOP_ACTIVATIONS = 100  # harvest counts a feature's top tokens over its 100 strongest activations


def feature_list(data: "RunData", sae: str, *, q: str = "", token: str = "", order: str = "", offset: int = 0,
                 limit: int = 50, alive: bool = False) -> dict:
    """A page of the features of ``sae``. ``order`` empty: by relevance when searching a token, else by density.
    With a token search each row has ``token_hits`` (how many of the feature's strongest activations are on that
    token), ``token_share`` (hits / min(100, times fired)), ``token_relevance`` (the share shrunk for features that
    fired only a few times: the relevance order) and ``token_rank``; ``total`` counts every match."""
    info = data.sae_info(sae)
    d_sae = int(info["d_sae"])
    check_text("the explanation search", q, MAX_SEARCH_CHARS, status=400)
    check_text("the token search", token, MAX_SEARCH_CHARS, status=400)
    order = order or ("relevance" if token else "density")
    if order not in ORDERS:
        raise WebError(400, f"unknown order {order!r}", f"use one of {', '.join(ORDERS)}")
    if not 1 <= limit <= MAX_LIST_LIMIT:
        raise WebError(400, f"limit {limit} is out of range", f"use 1..{MAX_LIST_LIMIT}")
    if not 0 <= offset <= d_sae:
        raise WebError(400, f"offset {offset} is out of range: SAE {sae!r} has {d_sae:,} features",
                       f"use 0..{d_sae}")
    st = data.store()
    q = q.strip()
    try:
        rows = st.list_features(sae, order=order, offset=offset, limit=limit + 1, query=q, token=token,
                                alive_only=alive)
        total = st.count_features(sae, query=q, token=token, alive_only=alive) if (q or token or alive) else d_sae
    except SaeforgeError as err:
        raise WebError(400, err.problem, err.fix) from err
    for r in rows:
        r["token_share"] = (r["token_hits"] / max(1, min(TOP_ACTIVATIONS, r["fire_count"]))
                            if r.get("token_hits") is not None else None)
    return {"sae": sae, "d_sae": d_sae, "q": q, "token": token, "order": order, "offset": offset, "limit": limit,
            "alive": alive, "features": rows[:limit], "has_more": len(rows) > limit, "total": total,
            "n_dead": st.count_dead(sae)}


def feature(data: "RunData", sae: str, idx: int) -> dict:
    """Everything the feature page shows: the store's record with its examples (and each window's ``peak_offset``),
    the neighbours with their explanations, and the explanation's provenance and chance level."""
    info = data.sae_info(sae)
    st = data.store()
    if not 0 <= idx < info["d_sae"]:
        raise WebError(404, f"feature {idx} is out of range: SAE {sae!r} has features 0..{info['d_sae'] - 1}",
                       f"pick an index below {info['d_sae']}")
    try:
        rec = st.feature(sae, idx)
    except SaeforgeError as err:
        raise WebError(404, err.problem, err.fix) from err
    rec.pop("sae_id", None)
    rec["d_sae"] = info["d_sae"]
    rec["site"] = info["site"]
    neighbors = rec.get("neighbors") or []
    others = st.brief_features(sae, [int(i) for i, _ in neighbors])
    rec["neighbors"] = [{"idx": int(i), "cosine": float(c), **others.get(int(i), {})} for i, c in neighbors]
    detail = rec.get("score_detail") or {}
    rec["chance_sd"] = detail.get("chance_sd")
    det = detail.get("detection") or {}
    rec["scored_on"] = (det.get("n_pos"), det.get("n_neg")) if det else None
    rec["links"] = feature_links(st, sae, idx)
    return rec


def feature_links(st, sae: str, idx: int) -> list[dict]:
    """The store's links of a feature (e.g. its matches across layers written by ``saeforge flow match``), grouped by
    kind and direction: ``[{kind, direction ("in": predecessors, "out": successors), links: [{sae, idx, weight,
    explanation, top_tokens}]}]``, the strongest ``MAX_LINKS`` of each group."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for direction, other in (("in", "src"), ("out", "dst")):
        for link in st.links(sae, idx, direction=direction, limit=50 * MAX_LINKS):
            group = groups.setdefault((link["kind"], direction), [])
            if len(group) < MAX_LINKS:
                group.append({"sae": link[f"{other}_sae"], "idx": link[f"{other}_idx"], "weight": link["weight"]})
    by_sae: dict[str, set[int]] = {}
    for group in groups.values():
        for link in group:
            by_sae.setdefault(link["sae"], set()).add(link["idx"])
    brief = {name: st.brief_features(name, idxs) for name, idxs in by_sae.items()}
    for group in groups.values():
        for link in group:
            info = brief[link["sae"]].get(link["idx"], {})
            link["explanation"], link["top_tokens"] = info.get("explanation"), info.get("top_tokens") or []
    return [{"kind": kind, "direction": direction, "links": links}
            for (kind, direction), links in sorted(groups.items(), key=lambda kv: (
                LINK_KIND_ORDER.index(kv[0][0]) if kv[0][0] in LINK_KIND_ORDER else len(LINK_KIND_ORDER), kv[0]))]
