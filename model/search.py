"""How each crop of a batch is decoded: greedy, beam search for the k most probable
readings, or constrained to a lexicon; crops of every kind share one encoder pass.

Beam search keeps the ``width`` most probable prefixes per crop and stops once its k
best finished readings are at least as probable as every live prefix (log-probabilities
only fall as a prefix grows, so none could overtake them). With a lexicon the prefixes
are restricted to the trie's paths (``model.lexicon``); a beam at least as wide as the
lexicon is exhaustive, so the answer is then exactly the lexicon's most probable word.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from . import greedy as greedy_rule
from .charset import BOS_ID, EOS_ID, NUM_SPECIAL, Charset, trim_spaces
from .decode import TransformerDecoder
from .lexicon import Lexicon
from .reading import MAX_TOP_K, Alternative, Recognition

#: Beam width for ``top_k`` without a lexicon: at least this, and at least k.
BEAM_WIDTH = 5
#: Beam width with a lexicon: exhaustive up to this many words (IIIT5K's small lexicon has 50).
LEXICON_BEAM_WIDTH = 50


@dataclass(frozen=True, eq=False)
class DecodeOptions:
    """How one crop is read.

    ``allowed``: bool ``[vocab_size]`` (``Charset.token_mask``), the tokens a reading may
    use; their probabilities are renormalised over them. ``lexicon``: the reading is one of
    its words, scored by the model's own probability of the word (not renormalised).
    ``top_k``: 0 reads greedily; k ≥ 1 runs beam search and returns the k most probable
    readings as ``Recognition.alternatives``.

    Raises ``ValueError`` for ``top_k`` outside 0..``MAX_TOP_K``, or a lexicon together
    with ``allowed`` (the lexicon already fixes the characters).
    """

    allowed: torch.Tensor | None = None
    lexicon: Lexicon | None = None
    top_k: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.top_k <= MAX_TOP_K:
            raise ValueError(f"top_k must be 0 (off) to {MAX_TOP_K}, got {self.top_k}")
        if self.lexicon is not None and self.allowed is not None:
            raise ValueError("a lexicon cannot be combined with an allowlist or blocklist: its words already fix the characters")

    @property
    def greedy(self) -> bool:
        """Read by greedy decoding (no lexicon, no ``top_k``)."""
        return self.lexicon is None and self.top_k == 0

    @property
    def beam_width(self) -> int:
        """The beam search's width for this crop."""
        if self.lexicon is not None:
            return max(self.top_k, min(len(self.lexicon), LEXICON_BEAM_WIDTH))
        return max(self.top_k, BEAM_WIDTH)


PLAIN = DecodeOptions()


def per_crop(options: DecodeOptions | Sequence[DecodeOptions] | None, crops: int) -> list[DecodeOptions]:
    """``options`` as one per crop: ``None`` is ``PLAIN`` for all, one ``DecodeOptions`` is
    shared. Raises ``ValueError`` if a sequence is not one per crop."""
    if options is None or isinstance(options, DecodeOptions):
        return [options or PLAIN] * crops
    if len(options) != crops:
        raise ValueError(f"{len(options)} decode options for {crops} images")
    return list(options)


def token_masks(options: Sequence[DecodeOptions], vocab_size: int) -> torch.Tensor | None:
    """The ``allowed`` masks of ``options`` stacked, bool ``[B, vocab_size]`` (all True for a
    crop without one); ``None`` when no crop has one."""
    if all(o.allowed is None for o in options):
        return None
    everything = torch.ones(vocab_size, dtype=torch.bool)
    return torch.stack([everything if o.allowed is None else o.allowed for o in options])


def read_by_kind(
    options: Sequence[DecodeOptions], greedy: Callable[[list[int]], Sequence[Recognition]], searched: Callable[[list[int]], Sequence[Recognition]]
) -> list[Recognition]:
    """One ``Recognition`` per crop of a batch read as its ``options`` say: the greedy
    crops (``DecodeOptions.greedy``) together by ``greedy``, the others (beam search,
    lexicons) by ``searched``, each given the crops' indices in the batch and called only
    when it has some. The one place the two kinds part: ``read`` (PyTorch) and the ONNX
    engine (``model.onnx_engine``, whose greedy crops go to ONNX Runtime) both use it.
    Raises ``ValueError`` when a reader returns another number of readings than crops."""
    out: list[Recognition | None] = [None] * len(options)
    greedy_crops = [i for i, o in enumerate(options) if o.greedy]
    other_crops = [i for i, o in enumerate(options) if not o.greedy]
    for crops, reader in ((greedy_crops, greedy), (other_crops, searched)):
        if crops:
            for i, r in zip(crops, reader(crops), strict=True):
                out[i] = r
    return [r for r in out if r is not None]


def read(decoder: TransformerDecoder, charset: Charset, memory: torch.Tensor, options: Sequence[DecodeOptions]) -> list[Recognition]:
    """One ``Recognition`` per row of the encoder ``memory`` ``[B, N, D]``, each read as its
    ``options`` say (``read_by_kind``): greedy crops decoded together, the others in one beam
    search per beam width. Raises ``ValueError`` if ``options`` is not one per row."""
    if len(options) != memory.shape[0]:
        raise ValueError(f"{len(options)} decode options for {memory.shape[0]} crops")

    def greedy(crops: list[int]) -> list[Recognition]:
        allowed = token_masks([options[i] for i in crops], charset.vocab_size)
        rows = memory if len(crops) == len(options) else memory[crops]
        return charset.decode_batch(*decoder.greedy(rows, allowed=None if allowed is None else allowed.to(memory.device)))

    def searched(crops: list[int]) -> list[Recognition]:
        out: dict[int, Recognition] = {}
        by_width: dict[int, list[int]] = {}
        for i in crops:
            by_width.setdefault(options[i].beam_width, []).append(i)
        for width, same in by_width.items():
            found = beam_search(decoder, memory[same], width, [options[i] for i in same], space_id=charset.space_id)
            out |= {i: _recognition(charset, hyps, options[i].top_k) for i, hyps in zip(same, found, strict=True)}
        return [out[i] for i in crops]

    return read_by_kind(options, greedy, searched)


@dataclass(frozen=True)
class Hypothesis:
    """A finished reading: token ids (without EOS), the probability of each token and of
    the end token after them, and the sum of their logs."""

    ids: list[int]
    probs: list[float]
    log_prob: float


def _recognition(charset: Charset, hyps: list[Hypothesis], top_k: int) -> Recognition:
    if not hyps:  # only when every path was impossible (probability 0)
        return Recognition("", 0.0, [])
    best = hyps[0]
    alternatives = tuple(Alternative(charset.decode(h.ids), math.exp(h.log_prob)) for h in hyps[:top_k])
    text, confs = trim_spaces([charset.chars[i - NUM_SPECIAL] for i in best.ids], best.probs[:-1])
    return Recognition(text, math.exp(best.log_prob), confs, alternatives)


@torch.no_grad()
def beam_search(
    decoder: TransformerDecoder, memory: torch.Tensor, width: int, options: Sequence[DecodeOptions], space_id: int | None = None
) -> list[list[Hypothesis]]:
    """Beam search over a batch: per crop, its finished readings, most probable first
    (at least ``max(top_k, 1)`` where that many exist).

    ``memory``: encoder output ``[B, N, D]``; ``width``: prefixes kept per crop; ``options``:
    one per crop (``allowed`` masks, ``lexicon`` tries). A reading still running after
    ``decoder.max_len`` characters ends there with the model's end-token probability, as in
    ``TransformerDecoder.greedy``. ``space_id``: the space's token id, for a model that reads
    it: no reading starts with it or ends after it, so readings are distinct texts (``Hello``
    and ``Hello `` would both be answered as ``Hello``) with their strings' true probabilities.
    Greedy decoding (``model.greedy``, both engines) trims such a space afterwards instead, its
    probability left in the confidence: one path, so nothing to tell apart (and rare: none on
    600 real crops with the shipped model).
    """
    b, dev = memory.shape[0], memory.device
    v = decoder.head.out_features
    mem_kv = [(k.repeat_interleave(width, 0), val.repeat_interleave(width, 0)) for k, val in decoder.memory_kv(memory)]
    caches: list[list[torch.Tensor]] = [[] for _ in decoder.layers]
    masks = token_masks(options, v)
    allowed = (torch.ones(b, v, dtype=torch.bool) if masks is None else masks).to(dev)
    allowed[:, greedy_rule.NEVER_EMITTED] = False
    lexicons = [(i, o.lexicon) for i, o in enumerate(options) if o.lexicon is not None]
    nodes = torch.zeros(b, width, dtype=torch.long)  # each beam's trie node (lexicon crops)
    scores = torch.full((b, width), -math.inf, device=dev)
    scores[:, 0] = 0.0  # one live prefix (BOS) per crop to start with
    hist_ids = torch.zeros(b, width, 0, dtype=torch.long, device=dev)
    hist_p = torch.zeros(b, width, 0, device=dev)
    tokens = torch.full((b * width, 1), BOS_ID, dtype=torch.long, device=dev)
    finished: list[list[Hypothesis]] = [[] for _ in range(b)]
    wanted = [max(o.top_k, 1) for o in options]
    active = [True] * b
    rows = torch.arange(b, device=dev)[:, None]
    for t in greedy_rule.positions(decoder.max_len):
        logits = decoder.run(tokens, mem_kv, start=t, caches=caches)[:, -1].float().view(b, width, v)
        logp = logits.masked_fill(~allowed[:, None, :], -math.inf).log_softmax(-1)
        for i, lex in lexicons:  # masked after normalising: a word scores the model's probability of it
            logp[i] = logp[i].masked_fill(~lex.allowed(nodes[i]).to(dev), -math.inf)
        if space_id is not None:  # also after normalising, as a lexicon: the strings keep their probabilities
            if t == 0:
                logp[..., space_id] = -math.inf
            else:
                logp[..., EOS_ID] = logp[..., EOS_ID].masked_fill(hist_ids[..., -1] == space_id, -math.inf)
        if t == decoder.max_len:  # out of room: only the end token may follow
            eos = logp[..., EOS_ID].clone()
            logp.fill_(-math.inf)
            logp[..., EOS_ID] = eos
        for i in range(b):
            if not active[i]:
                scores[i] = -math.inf
        cand = (scores[..., None] + logp).view(b, width * v)
        top_s, top_i = cand.topk(min(2 * width, width * v), dim=-1)
        beam, tok = top_i // v, top_i % v
        is_eos = tok == EOS_ID
        for i, j in (is_eos & torch.isfinite(top_s)).nonzero().tolist():
            k = int(beam[i, j])
            probs = hist_p[i, k].tolist() + [math.exp(float(logp[i, k, EOS_ID]))]
            finished[i].append(Hypothesis(hist_ids[i, k].tolist(), probs, float(top_s[i, j])))
        # Live prefixes: the best `width` candidates that did not end (at most `width` of the
        # 2 x width ended, one per beam, so `width` remain).
        new_scores, pick = top_s.masked_fill(is_eos, -math.inf).topk(width, dim=-1)
        parent, nxt = beam.gather(1, pick), tok.gather(1, pick)
        step_p = logp[rows, parent, nxt].exp()
        gather = parent[..., None].expand(-1, -1, t)
        hist_ids = torch.cat([hist_ids.gather(1, gather), nxt[..., None]], -1)
        hist_p = torch.cat([hist_p.gather(1, gather), step_p[..., None]], -1)
        flat = (rows * width + parent).view(-1)
        for cache in caches:
            cache[:] = [cache[0].index_select(0, flat), cache[1].index_select(0, flat)]
        for i, lex in lexicons:
            here = nodes[i].gather(0, parent[i].cpu())
            nodes[i] = lex.children[here, nxt[i].cpu()].long().clamp(min=0)  # −1 only on dead (−inf) beams
        scores, tokens = new_scores, nxt.reshape(-1, 1)
        for i in range(b):
            if active[i]:
                finished[i].sort(key=lambda h: -h.log_prob)
                best_live = float(scores[i, 0])
                enough = len(finished[i]) >= wanted[i] and finished[i][wanted[i] - 1].log_prob >= best_live
                active[i] = not (enough or best_live == -math.inf)
        if not any(active):
            break
    for hyps in finished:
        hyps.sort(key=lambda h: -h.log_prob)
    return finished
