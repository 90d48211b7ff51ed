"""
Course part 2: the model. A GPT decoder, written to be read top to bottom.

    tokens (B, T) -> token embedding + position embedding -> n_layer blocks -> LayerNorm -> logits (B, T, V)

Each block is pre-norm with residual connections:
    x = x + attn(ln_1(x))     # tokens exchange information (causal self-attention)
    x = x + mlp(ln_2(x))      # each token thinks on its own (a small 2-layer network)

The course's version chains attention and feed-forward without residual connections and without
normalisation. Without the residual "x +", every layer must pass the whole signal through its own
weights, and the gradient reaching the first layers is the product of every layer's Jacobian: it
vanishes or explodes as depth grows. With it, each block only adds a correction to a stream that
flows straight from the embeddings to the output, and gradients flow straight back. LayerNorm
keeps the scale of that stream in check.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F


@dataclass
class GPTConfig:
    vocab_size: int = 8192
    block_size: int = 256  # the longest context the model sees (learned positions 0..block_size-1)
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    d_ff: int = 0  # hidden width of the MLP; 0 means the usual 4 * n_embd
    dropout: float = 0.0
    bias: bool = False  # biases in Linear and LayerNorm layers: GPT-2 had them, they help little

    def __post_init__(self):
        if self.d_ff == 0:
            self.d_ff = 4 * self.n_embd
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")


class KVCache:
    """Keys and values of the positions already processed, so that generating one more token
    costs one position of compute instead of the whole sequence.
    k, v: (n_layer, B, n_head, max_len, head_dim); the first `pos` positions are filled."""

    def __init__(self, n_layer, batch_size, n_head, max_len, head_dim, device, dtype):
        shape = (n_layer, batch_size, n_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0  # advanced by the model once all layers have stored the new positions

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Stores k, v (B, nh, T, hd) after the cached positions; returns all keys and values so far."""
        end = self.pos + k.size(2)
        self.k[layer, :, :, self.pos : end] = k
        self.v[layer, :, :, self.pos : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


def causal_mask(T: int, S: int, device) -> torch.Tensor:
    """(T, S) boolean mask, True where attention is allowed, for T queries that are the last T of
    S positions: query i sees keys 0 .. S-T+i, never the future."""
    return torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=S - T)


def attention(q, k, v, dropout_p: float = 0.0, attn_maps: list | None = None):
    """softmax(q k^T / sqrt(head_dim)) v, causal. q: (B, nh, T, hd); k, v: (B, nh, S, hd), S >= T.
    With attn_maps, the probabilities (B, nh, T, S) are computed explicitly and appended to it
    (for plots); otherwise F.scaled_dot_product_attention picks a fused kernel (flash attention on
    GPU) that never materialises the T x S matrix."""
    T, S = q.size(2), k.size(2)
    if attn_maps is None:
        if T == 1:  # one new token: it may see every cached position
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        if T == S:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(T, S, q.device), dropout_p=dropout_p)
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))  # (B, nh, T, S)
    att = att.masked_fill(~causal_mask(T, S, q.device), float("-inf"))
    att = F.softmax(att.float(), dim=-1).type_as(q)
    attn_maps.append(att.detach())
    att = F.dropout(att, p=dropout_p)
    return att @ v  # (B, nh, T, hd)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.layer, self.n_head, self.dropout = layer, config.n_head, config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, cache: KVCache | None = None, attn_maps: list | None = None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, n_head, T, head_dim): each head attends in its own subspace
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, nh, S, hd), S = cached + T
        y = attention(q, k, v, self.dropout if self.training else 0.0, attn_maps)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # heads side by side again
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.d_ff, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(config.d_ff, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, cache=None, attn_maps=None):
        x = x + self.attn(self.ln_1(x), cache, attn_maps)  # residual: the block adds to x, never replaces it
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),  # token embedding
            wpe=nn.Embedding(config.block_size, config.n_embd),  # learned position embedding
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # weight tying: the output layer reuses the token embedding, (V, C) either way. Fewer
        # parameters, and a token's input and output representations learn from each other.
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        # GPT-2: each residual branch's last projection starts smaller, 1/sqrt(2 * n_layer), so the
        # sum of 2 * n_layer branches on the residual stream keeps unit scale at initialisation
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None, cache: KVCache | None = None, attn_maps: list | None = None):
        """idx: (B, T) token ids. With targets (B, T): logits for every position and the mean
        cross-entropy (targets of -1 are ignored). Without: logits of the last position only
        (B, 1, V), all that generation needs, and loss None. With a cache, idx holds the
        positions after the cached ones. With attn_maps=[], each layer appends its attention
        probabilities (B, n_head, T, S)."""
        T = idx.size(1)
        pos0 = cache.pos if cache is not None else 0
        if pos0 + T > self.config.block_size:
            raise ValueError(f"sequence of {pos0 + T} tokens is longer than block_size={self.config.block_size}")
        pos = torch.arange(pos0, pos0 + T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for block in self.transformer.h:
            x = block(x, cache, attn_maps)
        x = self.transformer.ln_f(x)
        if cache is not None:
            cache.pos += T
        if targets is None:
            return self.lm_head(x[:, [-1], :]), None
        logits = self.lm_head(x)  # (B, T, V)
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    # --- counting ----------------------------------------------------------------------------------
    def num_params(self, embedding: bool = True) -> int:
        """All parameters (the tied wte/lm_head once), or without the two embedding tables."""
        n = sum(p.numel() for p in self.parameters())
        if not embedding:
            n -= self.transformer.wte.weight.numel() + self.transformer.wpe.weight.numel()
        return n

    def flops_per_token(self, T: int | None = None) -> float:
        """Training FLOPs per token (forward + backward = 3 x forward) for a context of T tokens:
        2 x 3 per weight of every matmul, the output layer included (an embedding lookup costs
        nothing), plus the attention scores and their use, 2 x 2 x 3 x n_layer x n_embd x T
        (counting the causal mask's zeros, as PaLM's appendix B does)."""
        cfg, T = self.config, T or self.config.block_size
        matmul = sum(p.numel() for n, p in self.named_parameters() if p.dim() == 2 and n != "transformer.wpe.weight")
        return 6 * matmul + 12 * cfg.n_layer * cfg.n_embd * T

    # --- generation --------------------------------------------------------------------------------
    def new_cache(self, batch_size: int) -> KVCache:
        cfg, p = self.config, self.lm_head.weight
        return KVCache(cfg.n_layer, batch_size, cfg.n_head, cfg.block_size, cfg.n_embd // cfg.n_head, p.device, p.dtype)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, eot_id: int | None = None, generator: torch.Generator | None = None):
        """Yields the next token of each row, (B, 1), max_new_tokens times or until every row has
        produced eot_id (a finished row then repeats eot_id). temperature 0 is greedy decoding.

        The prompt goes through the model once (prefill) and fills the KV cache; each next token
        then costs one position. Past block_size the context slides: with learned absolute
        positions every token then changes position, so the cache is rebuilt from the last
        block_size tokens at each step, which gives exactly what full recomputation gives."""
        bs = self.config.block_size
        seq = idx[:, -bs:]
        cache = self.new_cache(idx.size(0))
        logits, _ = self(seq, cache=cache)
        done = torch.zeros(idx.size(0), 1, dtype=torch.bool, device=idx.device)
        for _ in range(max_new_tokens):
            nxt = sample_next(logits[:, -1, :], temperature, top_k, top_p, generator)
            if eot_id is not None:
                nxt = nxt.masked_fill(done, eot_id)
                done |= nxt == eot_id
            yield nxt
            if done.all():
                return
            seq = torch.cat((seq, nxt), dim=1)[:, -bs:]
            if cache.pos < bs:
                logits, _ = self(nxt, cache=cache)
            else:  # the window is full: slide it by one and recompute it
                cache.pos = 0
                logits, _ = self(seq, cache=cache)


def sample_next(logits, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, V) logits -> (B, 1) token ids. temperature < 1 sharpens the distribution, > 1 flattens
    it; top_k keeps the k likeliest tokens; top_p keeps the smallest set whose probability reaches p."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k > 0:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits = logits.masked_fill(logits < v[:, [-1]], float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum - sorted_logits.softmax(dim=-1) >= top_p  # tokens after the mass reached p (the first always stays)
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)
