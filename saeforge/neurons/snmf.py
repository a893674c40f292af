"""Semi-nonnegative matrix factorisation (SNMF) of MLP neuron activations into compositional neuron groups.

Shafran, Geiger and Geva, "Constructing Interpretable Features from Compositional Neuron Groups" (arXiv 2506.10920;
v1 "Decomposing MLP Activations into Interpretable Features via Semi-Nonnegative Matrix Factorization"). The paper
writes the activations of ``n`` tokens at an MLP's hidden layer (the input of its down projection, ``d`` neurons) as
A ≈ Z Y, A ∈ R^{d×n}, with Z ∈ R^{d×k} unconstrained (a feature is a signed pattern over neurons; gated MLPs have
signed activations) and Y ∈ R^{k×n} nonnegative (how much of each feature a token holds). saeforge keeps the
row-major form the rest of the code uses: X = Aᵀ ``[n, d]`` ≈ G Z with G = Yᵀ ``[n, k]`` ≥ 0 the coefficients and Z
``[k, d]`` the features (one row per feature, like an SAE decoder).

One iteration (Ding, Li and Jordan's semi-NMF updates with the paper's sparsity):

1. Z ← (GᵀG + εI)⁻¹ GᵀX, the least-squares features for the current coefficients;
2. winner-take-all: each feature keeps its ⌈s·d⌉ largest neurons by |value| and the rest become exactly 0
   (s = ``sparsity``, 1 % by default), so every feature is a small group of neurons;
3. each column of G is scaled to unit length and the matching row of Z by the inverse (the product is unchanged);
4. G ← G ⊙ sqrt(([XZᵀ]⁺ + G[ZZᵀ]⁻) / ([XZᵀ]⁻ + G[ZZᵀ]⁺ + ε)), with M⁺ = (|M| + M)/2 and M⁻ = (|M| − M)/2, which
   keeps G nonnegative and, for fixed Z, never increases ‖X − GZ‖².

The winner-take-all projection can raise the loss, so the best factors seen are kept and the fit stops after
``patience`` iterations without a relative improvement above ``tol`` (or at ``max_iter``).

The data are read in chunks: one pass per iteration updates each chunk's coefficients and accumulates GᵀX and GᵀG
for the next feature update, so only G (``n × k``) stays in memory and an activation cache is streamed shard by
shard. A long fit writes a checkpoint every ``checkpoint_every`` iterations and resumes from it.

The hierarchical variant (the paper's code, ``hierchichal_snmf.py``) factorises the learnt features once more,
Z ≈ Y₂ Z₂ with Y₂ ``[k, k₂]`` ≥ 0 and Z₂ ``[k₂, d]`` (coarse, also winner-take-all sparse): every fine feature is a
nonnegative mix of coarse ones, and features that share a parent share its neurons.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import torch

from saeforge.errors import SaeforgeError

COLLAPSED = 0.999  # |cosine| above which two features are one neuron group twice
EPS = 1e-6  # the paper's ridge on GᵀG and its guard in the multiplicative update
FIT_FILE = "snmf.safetensors"
META_FILE = "snmf.json"
CHECKPOINT_FILE = "checkpoint.safetensors"
CHECKPOINT_META = "checkpoint.json"
FORMAT = "saeforge-snmf"
FORMAT_VERSION = 1


# ----------------------------------------------------------------------------------------------------- data
class Chunks(Protocol):
    """Activations as a sequence of ``[n_i, d]`` float32 chunks, read the same way on every pass."""

    n: int
    d: int

    def __len__(self) -> int: ...

    def chunk(self, i: int) -> torch.Tensor: ...


@dataclass
class TensorChunks:
    """A tensor ``[n, d]`` in slices of ``chunk_size`` rows."""

    x: torch.Tensor
    chunk_size: int = 8192

    def __post_init__(self):
        if self.x.dim() != 2:
            raise SaeforgeError(f"activations have shape {tuple(self.x.shape)}; SNMF needs [tokens, neurons]",
                                "pass a 2-D tensor (reshape [batch, seq, d] to [-1, d])")
        self.n, self.d = int(self.x.shape[0]), int(self.x.shape[1])

    def __len__(self) -> int:
        return -(-self.n // self.chunk_size)

    def chunk(self, i: int) -> torch.Tensor:
        return self.x[i * self.chunk_size:(i + 1) * self.chunk_size].float()


class CacheChunks:
    """The shards of one site of a saeforge activation cache (memory-mapped, one shard per chunk), at most
    ``max_tokens`` rows (0: all)."""

    def __init__(self, cache, site: str, max_tokens: int = 0):
        from saeforge.data.activation_cache import ActivationCache

        self.cache = cache if isinstance(cache, ActivationCache) else ActivationCache(cache)
        self.site = site
        self.cache._check_site(site)
        self.d = self.cache.d(site)
        sizes, total = [], 0
        for shard in self.cache.shards:
            take = shard["tokens"] if not max_tokens else min(shard["tokens"], max_tokens - total)
            if take <= 0:
                break
            sizes.append(int(take))
            total += take
        self.sizes, self.n = sizes, total

    def __len__(self) -> int:
        return len(self.sizes)

    def chunk(self, i: int) -> torch.Tensor:
        import numpy as np

        arr = self.cache.shard_array(i, self.site)[: self.sizes[i]]
        t = torch.from_numpy(np.array(arr))
        if self.cache.manifest["dtype"] == "bfloat16":
            t = t.view(torch.bfloat16)
        return t.float()


def as_chunks(data, chunk_size: int = 8192) -> Chunks:
    return TensorChunks(data, chunk_size) if isinstance(data, torch.Tensor) else data


# ----------------------------------------------------------------------------------------------------- maths
def winner_take_all(z: torch.Tensor, keep: int) -> torch.Tensor:
    """Each row of ``z`` with all but its ``keep`` largest entries by |value| set to exactly 0 (ties broken by
    index, so exactly ``keep`` entries survive)."""
    if keep >= z.shape[1]:
        return z
    idx = z.abs().topk(keep, dim=1).indices
    return torch.zeros_like(z).scatter_(1, idx, z.gather(1, idx))


def neurons_kept(sparsity: float, d: int) -> int:
    """⌈s·d⌉ neurons per feature, at least one."""
    return max(1, math.ceil(sparsity * d - 1e-9))


def _pos(m: torch.Tensor) -> torch.Tensor:
    return (m.abs() + m) * 0.5


def _neg(m: torch.Tensor) -> torch.Tensor:
    return (m.abs() - m) * 0.5


def update_coefficients(x: torch.Tensor, g: torch.Tensor, z: torch.Tensor, zzt: torch.Tensor | None = None
                        ) -> torch.Tensor:
    """One multiplicative update of the coefficients ``g`` ``[n, k]`` ≥ 0 for fixed features ``z`` ``[k, d]``."""
    p = x @ z.T
    q = z @ z.T if zzt is None else zzt
    numer = _pos(p) + g @ _neg(q)
    denom = _neg(p) + g @ _pos(q) + EPS
    return g * torch.sqrt(numer / denom)


def encode(x: torch.Tensor, z: torch.Tensor, iters: int = 100) -> torch.Tensor:
    """Nonnegative coefficients ``[n, k]`` of new activations ``x`` ``[n, d]`` on fixed features ``z``: the
    least-squares solution clipped at a small positive floor (per token, so each token's coefficients depend on
    it alone), then ``iters`` multiplicative updates (the fit's own
    coefficient step), which never raise ‖x − G z‖²."""
    x, z = x.float(), z.float()
    zzt = z @ z.T
    ridge = EPS * zzt.diagonal().mean().clamp_min(EPS) * torch.eye(z.shape[0], dtype=z.dtype, device=z.device)
    g = torch.linalg.solve(zzt + ridge, z @ x.T).T
    g = torch.maximum(g, 1e-3 * g.abs().amax(1, keepdim=True).clamp_min(1e-12))  # per token: rows independent
    for _ in range(iters):
        g = update_coefficients(x, g, z, zzt)
    return g


# ----------------------------------------------------------------------------------------------------- fitting
@dataclass(frozen=True)
class SNMFSettings:
    """The factorisation's own settings (saved with the fit; a resume must use the same)."""

    rank: int = 100
    """Number of features k (the paper: 100 per layer for Llama-3.1-8B, 50 in its GPT-2 demos)."""
    sparsity: float = 0.01
    """Winner-take-all keep-fraction: each feature keeps its ⌈s·d⌉ largest neurons (the paper's 1 %)."""
    max_iter: int = 2000
    """Iteration limit (the paper's training script allows 200,000 with patience 1,500; small fits converge in
    hundreds)."""
    patience: int = 100
    """Stop after this many iterations without a relative improvement above tol of the best loss."""
    tol: float = 1e-4
    """Relative improvement of ‖X − GZ‖² (as a fraction of ‖X‖²) that counts as progress."""
    seed: int = 0
    """Seed of the random initial coefficients G ~ U(0, 1) (the paper's init)."""


@dataclass
class SNMF:
    """A fitted factorisation: ``features`` Z ``[k, d]`` (rows; zero outside each feature's neuron group) and, for a
    hierarchical fit, ``coarse`` Z₂ ``[k₂, d]`` with ``mixing`` Y₂ ``[k, k₂]`` ≥ 0 (fine ≈ mixing @ coarse)."""

    features: torch.Tensor
    settings: SNMFSettings = field(default_factory=SNMFSettings)
    history: list[float] = field(default_factory=list)
    """Relative loss ‖X − GZ‖² / ‖X‖² after every iteration."""
    info: dict = field(default_factory=dict)
    """Where the fit comes from (model, fingerprint, site, tokens) and how it ended (iterations, converged)."""
    coarse: torch.Tensor | None = None
    mixing: torch.Tensor | None = None
    coefficients: torch.Tensor | None = field(default=None, repr=False)
    """G ``[n, k]`` of the tokens the fit saw (kept in memory after a fit, not saved)."""

    @property
    def rank(self) -> int:
        return int(self.features.shape[0])

    @property
    def d(self) -> int:
        return int(self.features.shape[1])

    @property
    def best_loss(self) -> float:
        return min(self.history) if self.history else float("nan")

    def neurons(self, i: int) -> torch.Tensor:
        """Indices of feature ``i``'s neuron group, strongest first."""
        row = self.features[i]
        nz = row.nonzero().squeeze(1)
        return nz[row[nz].abs().argsort(descending=True)]

    def encode(self, x: torch.Tensor, iters: int = 100) -> torch.Tensor:
        """Nonnegative coefficients ``[n, k]`` of activations ``x`` ``[n, d]`` (see :func:`encode`)."""
        if x.shape[-1] != self.d:
            raise SaeforgeError(f"activations of width {x.shape[-1]} for an SNMF of {self.d} neurons",
                                "encode activations of the site the SNMF was fitted on")
        return encode(x.reshape(-1, self.d), self.features.to(x.device), iters).reshape(*x.shape[:-1], self.rank)

    def activations(self, x: torch.Tensor, iters: int = 100) -> torch.Tensor:
        """Each feature's contribution to ``x`` in neuron space, coefficient × ‖z_i‖ (the size of the part of the
        hidden vector the feature accounts for; what the feature store and concept detection read)."""
        return self.encode(x, iters) * self.features.norm(dim=1).to(x.device)

    # ------------------------------------------------------------------------------------------------- files
    def save(self, folder: str | Path) -> Path:
        """``snmf.safetensors`` (features; coarse features and mixing when hierarchical) and ``snmf.json``, each
        written atomically."""
        from saeforge.utils.atomic import atomic_save_safetensors, atomic_write_json

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {"features": self.features.float().contiguous()}
        if self.coarse is not None:
            tensors["coarse"] = self.coarse.float().contiguous()
            tensors["mixing"] = self.mixing.float().contiguous()
        atomic_save_safetensors(folder / FIT_FILE, tensors)
        atomic_write_json(folder / META_FILE, {"format": FORMAT, "version": FORMAT_VERSION,
                                               "settings": asdict(self.settings), "rank": self.rank, "d": self.d,
                                               "coarse_rank": None if self.coarse is None else int(self.coarse.shape[0]),
                                               "best_loss": self.best_loss, "history": self.history,
                                               "info": self.info})
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "SNMF":
        import json

        from safetensors.torch import load_file

        folder = Path(folder)
        meta_path, path = folder / META_FILE, folder / FIT_FILE
        if not (meta_path.is_file() and path.is_file()):
            raise SaeforgeError(f"{folder} holds no SNMF fit ({META_FILE} and {FIT_FILE})",
                                f"fit one: saeforge snmf fit --out {folder} --site layers.N.mlp_hidden")
        try:
            meta = json.loads(meta_path.read_text())
        except ValueError as err:
            raise SaeforgeError(f"{meta_path} is corrupt: {err}", "fit again") from err
        if meta.get("format") != FORMAT:
            raise SaeforgeError(f"{meta_path} is not an SNMF fit", "pass a folder written by saeforge snmf fit")
        if meta.get("version", 0) > FORMAT_VERSION:
            raise SaeforgeError(f"{meta_path} has version {meta['version']}, newer than this saeforge reads",
                                "upgrade saeforge")
        t = load_file(str(path))
        return cls(t["features"], SNMFSettings(**meta["settings"]), list(meta.get("history", [])),
                   dict(meta.get("info", {})), t.get("coarse"), t.get("mixing"))


def check_rank(rank: int, d: int, n: int | None = None) -> None:
    """A rank the data can carry: at least 1, at most the number of neurons (and of tokens)."""
    if rank < 1:
        raise SaeforgeError(f"rank {rank} asks for no features", "pass --rank 1 or more, e.g. --rank 50")
    if rank > d:
        raise SaeforgeError(f"rank {rank} is above the number of neurons ({d}): an SNMF of {d} neurons has at most "
                            f"{d} independent features", f"pass --rank {d} or less (the paper uses 50-100)")
    if n is not None and rank > n:
        raise SaeforgeError(f"rank {rank} is above the number of tokens ({n})",
                            f"pass --rank {n} or less, or fit on more tokens")


def check_settings(s: SNMFSettings) -> None:
    if not 0 < s.sparsity <= 1:
        raise SaeforgeError(f"sparsity {s.sparsity} is not a fraction in (0, 1]",
                            "pass --sparsity 0.01 (1 % of the neurons per feature; 1 turns winner-take-all off)")
    for name in ("max_iter", "patience"):
        if getattr(s, name) < 1:
            raise SaeforgeError(f"--{name.replace('_', '-')} {getattr(s, name)} must be at least 1",
                                f"pass --{name.replace('_', '-')} {getattr(SNMFSettings(), name)}")
    if not (s.tol >= 0 and math.isfinite(s.tol)):
        raise SaeforgeError(f"tol {s.tol} is not a nonnegative number", "pass --tol 1e-4")


@dataclass
class _State:
    g: torch.Tensor  # [n, k] coefficients
    gtx: torch.Tensor  # [k, d] float64, GᵀX of the current g
    gtg: torch.Tensor  # [k, k] float64
    iteration: int = 0
    best_rel: float = float("inf")
    best_z: torch.Tensor | None = None
    best_g: torch.Tensor | None = None
    stall: int = 0
    history: list[float] = field(default_factory=list)
    reseeded: int = 0


def _pass(chunks: Chunks, g: torch.Tensor, step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass over the data: each chunk's coefficients (updated by ``step`` when given, in place), and the sums
    GᵀX, GᵀG of the result in float64."""
    k, d = g.shape[1], chunks.d
    gtx = torch.zeros(k, d, dtype=torch.float64)
    gtg = torch.zeros(k, k, dtype=torch.float64)
    start = 0
    for i in range(len(chunks)):
        x = chunks.chunk(i)
        rows = slice(start, start + x.shape[0])
        if step is not None:
            g[rows] = step(x, g[rows])
        gc = g[rows]
        gtx += (gc.T @ x).double()
        gtg += (gc.T @ gc).double()
        start += x.shape[0]
    return gtx, gtg


def _square_norm(chunks: Chunks) -> float:
    return float(sum(chunks.chunk(i).double().pow(2).sum() for i in range(len(chunks))))


def _feature_step(st: _State, keep: int, chunks: Chunks) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Steps 1-3: least-squares features, winner-take-all, unit coefficient columns. Returns (z, column scale c,
    number of collapsed features re-seeded)."""
    k = st.gtg.shape[0]
    z = torch.linalg.solve(st.gtg + EPS * torch.eye(k, dtype=torch.float64), st.gtx)
    z = winner_take_all(z, keep)
    c = st.gtg.diagonal().clamp_min(1e-24).sqrt()  # ‖G[:, j]‖
    z = (z * c[:, None]).float()
    return z, c.float(), _reseed_collapsed(z, st, keep, chunks)


def _reseed_collapsed(z: torch.Tensor, st: _State, keep: int, chunks: Chunks) -> int:
    """Two features on the same neurons (|cosine| > COLLAPSED) describe one group twice, and the multiplicative
    updates cannot pull them apart: winner-take-all makes this a stable local minimum in which another group is
    never found (about one fit in six on planted data). The later feature of such a pair restarts from the
    worst-explained token of a data chunk (its residual, winner-take-all sparse), as k-means restarts an empty
    cluster. Not in the paper's code; its fits simply keep the duplicate."""
    unit = torch.nn.functional.normalize(z, dim=1)
    cos = (unit @ unit.T).abs().triu(1)
    dup = sorted({int(j) for j in (cos > COLLAPSED).nonzero()[:, 1].tolist()})
    if not dup:
        return 0
    start = sum(chunks.chunk(i).shape[0] for i in range(st.iteration % len(chunks))) if len(chunks) > 1 else 0
    x = chunks.chunk(st.iteration % len(chunks))
    resid = x - (st.g[start:start + x.shape[0]] / st.gtg.diagonal().clamp_min(1e-24).sqrt().float()) @ z
    worst = resid.norm(dim=1).argsort(descending=True)
    gen = torch.Generator().manual_seed(st.iteration)
    c = st.gtg.diagonal().clamp_min(1e-24).sqrt().float()
    for rank, j in enumerate(dup):
        r = winner_take_all(resid[worst[rank % len(worst)]][None], keep)[0]
        z[j] = r / r.norm().clamp_min(1e-12) * z[j].norm()
        # fresh positive coefficients (unit column after the step's scaling): multiplicative updates cannot
        # raise the zeros the duplicate left on the tokens of the group it will now learn
        u = torch.rand(st.g.shape[0], generator=gen).clamp_min(EPS)
        st.g[:, j] = u / u.norm() * c[j]
    return len(dup)


def fit_snmf(data, settings: SNMFSettings = SNMFSettings(), *, checkpoint: str | Path | None = None,
             checkpoint_every: int = 50, progress: bool = False, info: dict | None = None,
             on_iteration: Callable[[int, float], None] | None = None) -> SNMF:
    """Fit X ≈ G Z to ``data`` (a ``[n, d]`` tensor or :class:`Chunks`, e.g. :class:`CacheChunks`). With
    ``checkpoint`` (a folder), the state is saved there every ``checkpoint_every`` iterations and a fit with the
    same settings and data size resumes from it."""
    chunks = as_chunks(data)
    check_settings(settings)
    check_rank(settings.rank, chunks.d, chunks.n)
    k, d, n = settings.rank, chunks.d, chunks.n
    keep = neurons_kept(settings.sparsity, d)
    sq = _square_norm(chunks)
    if not math.isfinite(sq):
        raise SaeforgeError("the activations contain NaN or Inf", "check the cache or tensor they come from")
    if sq == 0:
        raise SaeforgeError("the activations are all zero", "fit on activations of a model over text")
    st = _resume(checkpoint, settings, n, d) if checkpoint else None
    if st is None:
        gen = torch.Generator().manual_seed(settings.seed)
        g = torch.rand(n, k, generator=gen).clamp_min(EPS)
        gtx, gtg = _pass(chunks, g, None)
        st = _State(g, gtx, gtg)
    from tqdm.auto import tqdm

    bar = tqdm(total=settings.max_iter, initial=st.iteration, desc="snmf", unit="it", disable=not progress,
               dynamic_ncols=True)
    t0 = time.time()
    try:
        while st.iteration < settings.max_iter and st.stall < settings.patience:
            z, c, reseeded = _feature_step(st, keep, chunks)
            st.reseeded += reseeded
            zzt = z @ z.T

            def step(x, gc, z=z, c=c, zzt=zzt):
                return update_coefficients(x, gc / c, z, zzt)

            st.gtx, st.gtg = _pass(chunks, st.g, step)
            # ‖X − GZ‖² = ‖X‖² − 2⟨GᵀX, Z⟩ + ⟨GᵀG, ZZᵀ⟩ from the sums of the pass, in float64
            loss = sq - 2 * float((st.gtx * z.double()).sum()) + float((st.gtg * zzt.double()).sum())
            rel = max(loss, 0.0) / sq
            st.history.append(rel)
            st.iteration += 1
            if rel < st.best_rel - settings.tol:
                st.stall = 0
            else:
                st.stall += 1
            if rel < st.best_rel:
                st.best_rel, st.best_z, st.best_g = rel, z.clone(), st.g.clone()
            bar.update(1)
            bar.set_postfix_str(f"rel. loss {rel:.4f} (best {st.best_rel:.4f})")
            if on_iteration is not None:
                on_iteration(st.iteration, rel)
            if checkpoint and st.iteration % checkpoint_every == 0:
                _save_checkpoint(checkpoint, st, settings, n, d)
    finally:
        bar.close()
    converged = st.stall >= settings.patience
    out_info = dict(info or {}, tokens=n, neurons=d, neurons_per_feature=keep, iterations=st.iteration,
                    converged=bool(converged), reseeded=st.reseeded, seconds=round(time.time() - t0, 3))
    return SNMF(st.best_z, settings, st.history, out_info, coefficients=st.best_g)


def _save_checkpoint(folder: str | Path, st: _State, settings: SNMFSettings, n: int, d: int) -> None:
    from saeforge.utils.atomic import atomic_save_safetensors, atomic_write_json

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(folder / CHECKPOINT_FILE, {"g": st.g, "gtx": st.gtx, "gtg": st.gtg,
                                                       "best_z": st.best_z, "best_g": st.best_g})
    # the json names the tensors' iteration, so a kill between the two writes is caught on resume
    atomic_write_json(folder / CHECKPOINT_META, {"settings": asdict(settings), "n": n, "d": d,
                                                 "iteration": st.iteration, "best_rel": st.best_rel,
                                                 "stall": st.stall, "history": st.history})


def _resume(folder: str | Path, settings: SNMFSettings, n: int, d: int) -> _State | None:
    import json

    from safetensors.torch import load_file

    folder = Path(folder)
    meta_path = folder / CHECKPOINT_META
    if not meta_path.is_file() or not (folder / CHECKPOINT_FILE).is_file():
        return None
    meta = json.loads(meta_path.read_text())
    if meta["settings"] != asdict(settings) or meta["n"] != n or meta["d"] != d:
        changed = [k for k, v in asdict(settings).items() if meta["settings"].get(k) != v]
        raise SaeforgeError(f"{folder} holds a checkpoint of another fit (differs in: "
                            f"{', '.join(changed) or 'the data size'})",
                            f"resume with the same settings, or delete {folder / CHECKPOINT_FILE} to start over")
    t = load_file(str(folder / CHECKPOINT_FILE))
    if len(meta["history"]) != meta["iteration"]:
        raise SaeforgeError(f"{meta_path} is inconsistent", f"delete {folder / CHECKPOINT_FILE} to start over")
    return _State(t["g"], t["gtx"], t["gtg"], meta["iteration"], meta["best_rel"], t["best_z"], t["best_g"],
                  meta["stall"], list(meta["history"]))


def remove_checkpoint(folder: str | Path) -> None:
    for name in (CHECKPOINT_FILE, CHECKPOINT_META):
        (Path(folder) / name).unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------------- hierarchy
def fit_hierarchy(fine: SNMF, coarse_rank: int, data=None, *, settings: SNMFSettings | None = None,
                  finetune_steps: int = 500, lr: float = 1e-3, progress: bool = False) -> SNMF:
    """The hierarchical variant: an SNMF of the fine features themselves (their k rows are the data), Z ≈ Y₂ Z₂
    with Z₂ ``[coarse_rank, d]`` winner-take-all sparse and Y₂ ≥ 0; then, given ``data`` (the activations the fine
    fit saw, which must have its coefficients), Z₂, Y₂ and the fine coefficients are tuned jointly by Adam on
    ‖X − G Y₂ Z₂‖² for ``finetune_steps`` (the paper: 500 steps at lr 1e-3). Unlike the paper's code the tuning
    keeps Y₂ and G nonnegative (projected after each step) and the coarse neuron groups fixed, so the result is
    still a sparse semi-NMF. Returns a copy of ``fine`` with ``coarse`` and ``mixing``; its features are Y₂ Z₂ after
    joint tuning (then they span only ``coarse_rank`` dimensions and a token's fine coefficients are not unique),
    else the fine features as fitted."""
    check_rank(coarse_rank, fine.d, fine.rank)
    if coarse_rank >= fine.rank:
        raise SaeforgeError(f"coarse rank {coarse_rank} is not below the fine rank {fine.rank}",
                            f"pass a coarse rank below {fine.rank}, e.g. {max(1, fine.rank // 4)}")
    s = settings or fine.settings
    s2 = SNMFSettings(coarse_rank, s.sparsity, s.max_iter, s.patience, s.tol, s.seed)
    top = fit_snmf(fine.features, s2, progress=progress)
    coarse, mixing = top.features.clone(), top.coefficients.clone()  # fine ≈ mixing @ coarse
    info = dict(fine.info, coarse_rank=coarse_rank, coarse_history_last=top.history[-1],
                coarse_fit_rel_loss=top.best_loss)
    g = fine.coefficients
    if data is not None and finetune_steps > 0:
        if g is None:
            raise SaeforgeError("joint tuning needs the coefficients of the fine fit on the same data",
                                "fit the fine SNMF and the hierarchy in one call (saeforge snmf fit --coarse-rank N)")
        coarse, mixing, g, losses = _finetune(as_chunks(data), g.clone(), mixing, coarse, finetune_steps, lr,
                                              progress)
        info["finetune_rel_loss"] = losses
    # without joint tuning the fine features stay as fitted (full rank: a token's fine coefficients are unique);
    # tuned, they are the product, as in the paper's joint model, and span only coarse_rank dimensions
    features = (mixing @ coarse).contiguous() if "finetune_rel_loss" in info else fine.features
    return SNMF(features, fine.settings, list(fine.history), info, coarse, mixing, g)


def _finetune(chunks: Chunks, g, mixing, coarse, steps: int, lr: float, progress: bool):
    from tqdm.auto import tqdm

    mask = coarse != 0  # the coarse neuron groups stay as winner-take-all chose them
    params = [torch.nn.Parameter(t.clone()) for t in (g, mixing, coarse)]
    opt = torch.optim.Adam(params, lr=lr)
    sq = _square_norm(chunks)
    first = last = float("nan")
    for step in tqdm(range(steps), desc="hierarchy tuning", disable=not progress, leave=False):
        opt.zero_grad()
        total, start = 0.0, 0
        w = params[1] @ params[2]
        for i in range(len(chunks)):
            x = chunks.chunk(i)
            rows = slice(start, start + x.shape[0])
            loss = (x - params[0][rows] @ w).pow(2).sum()
            loss.backward(retain_graph=True)
            total += float(loss.detach())
            start += x.shape[0]
        opt.step()
        with torch.no_grad():
            params[0].clamp_(min=0)
            params[1].clamp_(min=0)
            params[2].mul_(mask)
        if step == 0:
            first = total / sq
        last = total / sq
    return (params[2].detach(), params[1].detach(), params[0].detach(), {"first": first, "last": last})


__all__ = ["CacheChunks", "Chunks", "SNMF", "SNMFSettings", "TensorChunks", "check_rank", "encode", "fit_hierarchy",
           "fit_snmf", "neurons_kept", "update_coefficients", "winner_take_all"]
