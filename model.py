"""
Course part 2: the model. Two decoders in one file, written to be read top to bottom.

The GPT (GPT-2's design, the course's model):

    tokens (B, T) -> token + position embeddings -> n_layer blocks -> LayerNorm -> logits (B, T, V)

    each block, pre-norm with residual connections:
        x = x + attn(ln_1(x))     # tokens exchange information (causal self-attention)
        x = x + mlp(ln_2(x))      # each token thinks on its own (a small 2-layer network)

Without the residual "x +", every layer must pass the whole signal through its own weights, and
the gradient reaching the first layers is the product of every layer's Jacobian: it vanishes or
explodes as depth grows. With it, each block only adds a correction to a stream that flows
straight from the embeddings to the output, and gradients flow straight back. Pre-norm: each block
normalises its own input (ln_1, ln_2), never the stream itself, which is normalised once, by ln_f,
before the output layer.

The Llama (Llama 4's design, checked against Hugging Face's Llama4ForCausalLM by export.py): the
same skeleton with RMSNorm instead of LayerNorm, no position embedding but rotary embeddings
(RoPE) applied to queries and keys, grouped-query attention (GQA: fewer key/value heads than
query heads), SwiGLU feed-forward layers and, every moe_every-th layer, a Mixture of Experts (MoE).
Its output layer may be untied from the token table (tie_embeddings=False: the default run's).

The file, in reading order:
    1. the GPT: GPTConfig, attention, CausalSelfAttention, MLP, Block, GPT (the course's model:
       config/gpt.py, config/tp_seed.py)
    2. the Llama: LlamaConfig, RMSNorm, RoPE (rope_tables, apply_rotary_emb), LlamaAttention
       (GQA), SwiGLU, MoE, LlamaBlock, Llama (the default run, config/gutenberg.py, trains this one,
       dense: no MoE layers; config/llama_moe.py has them)
    3. settings to checkpoints and back: model_args_from, model_settings, other_arch_keys, make_model
    4. generation, shared by both: KVCache, generate (prefill, then one token at a time),
       SamplingConfig and sample_next (temperature, top-k, top-p)
    5. scoring a completion given its prompt: fit_prompt, pack, completion_logps (DPO, chat.py, eval.py)

The loss is not in forward: forward returns logits, and each caller scores them its own way,
train.py with next_token_loss (section 1), DPO with completion_logps (section 5).

Under bf16 autocast (--dtype=bfloat16, the default on GPUs that have it) the matmuls run in bf16
on bf16 copies of the weights. The weights themselves stay float32 (the optimizer's small updates
would round away in bf16), and so do the residual stream, the norms, the MoE router's scores and
losses (its Linear runs in bf16, and its top-k picks on those bf16 logits), the loss and sampling:
each of these places says why.
"""

from __future__ import annotations  # annotations may name classes defined further down (KVCache)

import functools
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
from torch.nn import functional as F

# ==================================================================================================
# 1. The GPT: learned position embeddings, LayerNorm, multi-head attention, a GELU MLP.
# ==================================================================================================


@dataclass
class GPTConfig:
    vocab_size: int = 8192
    block_size: int = 256  # the longest context the model sees, in tokens
    n_layer: int = 6  # blocks
    n_head: int = 6  # attention heads, of n_embd / n_head dimensions each
    n_embd: int = 384  # width of the residual stream (the embeddings)
    d_ff: int = 0  # hidden width of the MLP; 0 means the usual 4 * n_embd
    dropout: float = 0.0  # probability of zeroing an activation in training (attention, residual branches)
    bias: bool = False  # GPT only: biases in Linear and LayerNorm layers (GPT-2 had them; they help little)

    def __post_init__(self):
        check_ranges(self, non_negative=("d_ff",))
        self.d_ff = self.d_ff or 4 * self.n_embd


def check_ranges(config, positive: tuple[str, ...] = (), non_negative: tuple[str, ...] = ()) -> None:
    """What both configs require: finite, positive sizes (and the fields named), every head a whole
    number of dimensions, dropout a probability below 1. ValueError, worded to be printed as one
    line ("error: ...")."""
    for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", *positive):
        if not 0 < getattr(config, name) < math.inf:  # nan fails every comparison
            raise ValueError(f"{name} must be positive, got {getattr(config, name)}")
    for name in non_negative:
        if not 0 <= getattr(config, name) < math.inf:
            raise ValueError(f"{name} must be zero or positive, got {getattr(config, name)}")
    if config.n_embd % config.n_head != 0:
        raise ValueError(f"n_embd={config.n_embd} must be divisible by n_head={config.n_head}: each "
                         "head gets n_embd/n_head dimensions; change n_embd or n_head")
    if not 0 <= config.dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {config.dropout}")


def causal_mask(T: int, S: int, device) -> torch.Tensor:
    """(T, S) boolean mask, True where attention is allowed, for T queries that are the last T of
    S positions: query i sees keys 0 .. S-T+i, never the future. Positions compared as int32: compiled
    on a CPU, the mask is computed inside attention's softmax kernel, where tril's int64 indices took
    longer than the softmax itself (the default's step is 1.04x faster so, docs/experiments.md)."""
    query = torch.arange(T, dtype=torch.int32, device=device)[:, None] + (S - T)  # (T, 1)
    return torch.arange(S, dtype=torch.int32, device=device) <= query  # (T, S)


def attention(q, k, v, dropout_p: float = 0.0, attn_maps: list | None = None, mask=None):
    """softmax(q k^T / sqrt(head_dim)) v. q: (B, nh, T, hd); k, v: (B, n_kv, S, hd). Causal (S = T)
    without a mask; with a KV cache, S = block_size and mask (T, S) is True where attention is
    allowed (see generation). n_kv = nh for the GPT; the Llama's grouped-query attention has fewer
    key/value heads, each serving nh / n_kv consecutive query heads. By default
    F.scaled_dot_product_attention picks a fused kernel (flash attention, on CPUs too) that never
    materialises the T x S matrix, nor copies of the shared key/value heads (enable_gqa). With
    attn_maps, the same is computed step by step and the probabilities (B, nh, T, S) are appended
    to it (for plots)."""
    T, S = q.size(2), k.size(2)
    # compiled on a CPU, the explicit product below runs faster: Inductor fuses its mask, scale and
    # softmax, and its backward beats flash attention's CPU kernel at these lengths (docs/experiments.md)
    if attn_maps is None and not (q.device.type == "cpu" and torch.compiler.is_compiling()):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                              is_causal=mask is None, enable_gqa=k.size(1) != q.size(1))
    B, nh, _, hd = q.shape
    rep = nh // k.size(1)  # query heads per key/value head
    if T == 1:  # decoding: a product per head, which compiled_decode_step writes as a multiply-and-sum
        k, v, rep = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1), 1
    # grouped-query attention: the rep query heads that share a key/value head are stacked into one
    # taller matrix, so that each key/value head meets all of its queries in one product
    q = q.reshape(B, nh // rep, rep * T, hd)  # (B, n_kv, rep*T, hd)
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hd))  # (B, n_kv, rep*T, S)
    allowed = causal_mask(T, S, q.device) if mask is None else mask  # (T, S)
    att = att.masked_fill(~allowed.repeat(rep, 1), float("-inf"))
    # in the input's dtype (bf16 under autocast): softmax kernels sum in float32 whatever their
    # input, and the probabilities, rounded once to bf16, are what att @ v and the backward read
    att = F.softmax(att, dim=-1)
    if attn_maps is not None:
        attn_maps.append(att.detach().view(B, nh, T, S))
    att = F.dropout(att, p=dropout_p)
    return (att @ v).view(B, nh, T, hd)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.layer, self.n_head, self.dropout = layer, config.n_head, config.dropout
        # q, k and v in one matmul
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, cache: KVCache | None = None, attn_maps: list | None = None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, n_head, T, head_dim): each head attends in its own subspace
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        mask = None
        if cache is not None:  # generation: the keys and values of the earlier positions too
            k, v, mask = cache.update(self.layer, k, v)  # (B, nh, block_size, hd), (T, block_size)
        y = attention(q, k, v, self.dropout if self.training else 0.0, attn_maps, mask)
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
        # residual: the block adds to x, never replaces it. Under bf16 autocast x stays float32
        # (embeddings are not autocast; bf16 + float32 is float32): the layers' small corrections
        # are not rounded away, and ln_1, ln_2 take their mean and variance in float32
        x = x + self.attn(self.ln_1(x), cache, attn_maps)
        x = x + self.mlp(self.ln_2(x))
        return x


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The objective of both models: the mean cross-entropy of logits (B, T, V) against targets
    (B, T), -1 ignored. Computed by the caller, outside forward (train.py's step and evaluation):
    a training-only change, such as label smoothing, goes there. In float32 whatever dtype the
    model ran in: in bf16 (8 significant bits) a loss near 3 would move in steps of 1/64, coarser
    than the differences between runs that the logs compare."""
    logits, targets = logits.view(-1, logits.size(-1)), targets.reshape(-1)  # (B*T, V), (B*T,)
    if torch.compiler.is_compiling() and torch.is_grad_enabled() and logits.requires_grad:
        return CrossEntropy.apply(logits, targets)  # the same loss, a cheaper backward once compiled
    return F.cross_entropy(logits.float(), targets, ignore_index=-1)


class CrossEntropy(torch.autograd.Function):
    """F.cross_entropy(logits.float(), targets, ignore_index=-1), with its gradient computed in the
    forward pass. The gradient of -log softmax(z)[t] with respect to the logits z is softmax(z) -
    one_hot(t): the forward computes the softmax's exponentials anyway, so it keeps the softmax
    (in the logits' dtype, as autograd would keep the logits), and the backward only subtracts 1
    at each row's target, N entries. Autograd's own backward computes the N x V exponentials a
    second time and compares every column with the target. With 8,192 classes the loss was 17 %
    of the default's compiled step; this makes the step 5 % faster (Inductor, free to trade memory
    for work, keeps the logits and recomputes the softmax in the backward's one pass). Only under
    torch.compile: eager, PyTorch's own kernels are faster (docs/experiments.md). Where every row
    is ignored the loss is 0 (F.cross_entropy's is nan)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:  # (N, V), (N,)
        kept = targets != -1
        weight = kept / kept.sum().clamp(min=1)  # (N,) each row's share of the mean; 0 where ignored
        targets = targets.clamp(min=0)  # any class for the ignored rows: their weight is 0
        z = logits.float()
        lse = torch.logsumexp(z, dim=1)  # (N,) log of the softmax's denominator
        loss = ((lse - z.gather(1, targets[:, None]).squeeze(1)) * weight).sum()
        probs = (torch.exp(z - lse[:, None]) * weight[:, None]).to(logits.dtype)  # (N, V) softmax
        ctx.save_for_backward(probs, targets, weight)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        probs, targets, weight = ctx.saved_tensors
        grad = probs * grad_loss.to(probs.dtype)  # (N, V) softmax(z) ...
        rows = torch.arange(len(targets), device=targets.device)
        minus_one_hot = (-weight * grad_loss).to(grad.dtype)  # ... - one_hot(t), one entry per row
        return grad.index_put((rows, targets), minus_one_hot, accumulate=True), None


class LanguageModel(nn.Module):
    """What the GPT and the Llama share: counting parameters and FLOPs, and model.generate (the
    last section of this file). A subclass has .config, .transformer.wte, .lm_head (tied to wte,
    or not: Llama's tie_embeddings), and forward(idx, *, cache=None, attn_maps=None, input_pos=None) ->
    logits (B, T, V), the last position's only (B, 1, V) with a cache."""

    def num_params(self, embedding: bool = True) -> int:
        """All parameters (the tied wte/lm_head once), or without the embedding tables."""
        n = sum(p.numel() for p in self.parameters())
        if not embedding:
            n -= sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Embedding))
        return n

    def flops_per_token(self, T: int | None = None) -> float:
        """Training FLOPs per token (forward + backward = 3 x forward) for a context of T tokens:
        2 x 3 per weight of every matmul, plus the attention scores and their use, 2 x 2 x 3 x
        n_layer x n_embd x T (counting the causal mask's zeros, as PaLM's appendix B does). An
        embedding lookup costs nothing, so wte and wpe are left out, but lm_head, the (n_embd ->
        vocab_size) output matmul, counts (tied, it is wte's matrix). Of a mixture of experts, only
        the n_expert_per_token experts a token goes to count."""
        cfg, T = self.config, T or self.config.block_size
        matmul = float(self.lm_head.weight.numel())  # the output layer (the tied wte is that same matrix)
        for p in self.transformer.h.parameters():
            if p.dim() == 2:
                matmul += p.numel()
            elif p.dim() == 3:  # the experts' (n_expert, in, out) weights (the Llama's MoE)
                matmul += p.numel() * cfg.n_expert_per_token / cfg.n_expert
        return 6 * matmul + 12 * cfg.n_layer * cfg.n_embd * T

    def generate(self, idx: torch.Tensor, max_new_tokens: int, **kwargs) -> Iterator[torch.Tensor]:
        """model.generate(...) is generate(model, ...): see the generation section."""
        return generate(self, idx, max_new_tokens, **kwargs)


class GPT(LanguageModel):
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

    def forward(self, idx, *, cache: KVCache | None = None, attn_maps: list | None = None,
                input_pos: torch.Tensor | None = None) -> torch.Tensor:
        """idx: (B, T) token ids -> logits (B, T, V): at each position, the scores of the token that
        follows. The loss is the caller's (next_token_loss): training, evaluation and DPO each score
        the logits their own way. With a cache (generation), idx holds the positions after the
        cached ones, or those input_pos (T,) names (see positions()), and only the last position's
        logits (B, 1, V) are computed, all that sampling needs. With attn_maps=[], each layer
        appends its attention probabilities (B, n_head, T, S)."""
        pos = positions(idx, self.config.block_size, cache, input_pos)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for block in self.transformer.h:
            x = block(x, cache, attn_maps)
        x = self.transformer.ln_f(x)
        return self.lm_head(x if cache is None else x[:, [-1], :])


# ==================================================================================================
# 2. The Llama: a Llama-4-style decoder. RMSNorm, rotary position embedding, grouped-query
# attention, and a Mixture of Experts (a router sends each token to its top n_expert_per_token of
# n_expert SwiGLU networks, beside a shared one). The semantics follow Llama 4's (and Hugging
# Face's Llama4ForCausalLM), so export.py can check this implementation against that one.
# ==================================================================================================


@dataclass
class LlamaConfig:
    vocab_size: int = 8192
    block_size: int = 256
    # the fields GPTConfig has too take its defaults: train.py takes one default per setting, either arch
    n_layer: int = 6
    n_head: int = 6
    n_kv_head: int = 2  # Llama only: key/value heads, n_head // n_kv_head query heads share each; 0 = n_head
    n_embd: int = 384
    d_ff: int = 0  # hidden width of the dense SwiGLU layers; 0 = 4 * n_embd
    d_expert: int = 0  # hidden width of each expert and of the shared expert; 0 = 2 * n_embd
    n_expert: int = 4
    n_expert_per_token: int = 1
    moe_every: int = 1  # every moe_every-th layer is MoE, the others dense; 0 = no MoE
    rope_theta: float = 10000.0
    no_rope_interval: int = 4  # every no_rope_interval-th layer has no RoPE (Llama 4's iRoPE); 0 = none
    qk_norm: bool = True  # RMS-normalise queries and keys (no weight) after RoPE, on RoPE layers
    norm_eps: float = 1e-5
    dropout: float = 0.0
    aux_loss_coef: float = 0.01  # Switch Transformer load-balancing loss, added to the training loss
    z_loss_coef: float = 0.001  # router z-loss: keeps the router's logits small
    tie_embeddings: bool = True  # Llama only (the GPT always ties): the output layer reuses wte; False = its own

    def __post_init__(self):
        check_ranges(self, positive=("rope_theta", "norm_eps"),
                     non_negative=("d_ff", "n_kv_head", "d_expert", "n_expert", "moe_every",
                                   "no_rope_interval", "aux_loss_coef", "z_loss_coef"))
        self.n_kv_head = self.n_kv_head or self.n_head
        self.d_ff = self.d_ff or 4 * self.n_embd
        self.d_expert = self.d_expert or 2 * self.n_embd
        if self.n_head % self.n_kv_head != 0:
            raise ValueError(f"n_head={self.n_head} must be divisible by n_kv_head={self.n_kv_head}: "
                             "each key/value head serves the same number of query heads")
        if (self.n_embd // self.n_head) % 2 != 0:
            raise ValueError(f"the Llama's head dimension n_embd/n_head = {self.n_embd // self.n_head} "
                             "must be even (RoPE rotates pairs of dimensions): change n_embd or n_head")
        if self.moe_every and not 1 <= self.n_expert_per_token <= self.n_expert:
            raise ValueError(f"n_expert_per_token={self.n_expert_per_token} must be between 1 and "
                             f"n_expert={self.n_expert}")

    def is_moe(self, layer: int) -> bool:
        return self.moe_every > 0 and (layer + 1) % self.moe_every == 0

    def uses_rope(self, layer: int) -> bool:
        return self.no_rope_interval == 0 or (layer + 1) % self.no_rope_interval != 0


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight: LayerNorm without centring and bias. F.rms_norm computes
    it in one fused kernel, in float32 inside even for bf16 inputs."""

    def __init__(self, dim: int, eps: float = 1e-5, weight: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if weight else None

    def forward(self, x):
        return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE's tables for every position < max_len, (max_len, head_dim) each: the cos of each pair's
    angle, position * theta^(-2j/head_dim), twice (for x[2j] and x[2j+1]), and its sin signed as
    (-sin, sin). The angles depend on nothing else: computed once, in float32, not in every forward."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2).float() / head_dim))
    angles = torch.arange(max_len).float()[:, None] * inv_freq[None, :]  # (max_len, head_dim/2)
    sin = torch.stack((-angles.sin(), angles.sin()), dim=-1).flatten(1)  # (-sin a, sin a) for each pair
    return angles.cos().repeat_interleave(2, dim=-1), sin


def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates each pair (x[2j], x[2j+1]) of x (B, T, nh, hd) by its position's angle a (Meta's
    interleaved convention), in x's dtype; cos, sin: (T, hd) from rope_tables. Then q . k depends
    on the positions only through their distance. The rotation, (x0 + i x1) e^(ia) in complex numbers:
        (x0, x1) -> (x0 cos a - x1 sin a, x1 cos a + x0 sin a)
                  = (x0, x1) * cos a + (x1, x0) * (-sin a, sin a)
    four elementwise operations, which torch.compile fuses into one kernel (complex ones it cannot)."""
    swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (x1, x0) for every pair
    cos, sin = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)  # (T, 1, hd): for all heads
    return x * cos + swapped * sin


class LlamaAttention(nn.Module):
    """Grouped-query attention: n_kv_head key/value heads, each shared by g = n_head // n_kv_head
    consecutive query heads (query head h reads key/value head h // g, the pairing of
    repeat_interleave, of F.scaled_dot_product_attention's enable_gqa and of Hugging Face's
    repeat_kv). Fewer key/value heads: a KV cache g times smaller, for little loss."""

    def __init__(self, config: LlamaConfig, layer: int):
        super().__init__()
        self.layer, self.n_head, self.n_kv_head = layer, config.n_head, config.n_kv_head
        self.head_dim, self.dropout = config.n_embd // config.n_head, config.dropout
        self.use_rope = config.uses_rope(layer)
        self.q_proj = nn.Linear(config.n_embd, config.n_head * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.n_embd, config.n_kv_head * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.n_embd, config.n_kv_head * self.head_dim, bias=False)
        self.o_proj = nn.Linear(config.n_head * self.head_dim, config.n_embd, bias=False)
        qk_norm = config.qk_norm and self.use_rope
        self.qk_norm = RMSNorm(self.head_dim, config.norm_eps, weight=False) if qk_norm else None

    def forward(self, x, rope: tuple, cache: KVCache | None = None, attn_maps: list | None = None):
        """rope: the (cos, sin) tables of x's T positions, (T, head_dim) each."""
        B, T, C = x.size()
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim)
        if self.use_rope:
            q, k = apply_rotary_emb(q, *rope), apply_rotary_emb(k, *rope)
            if self.qk_norm is not None:
                q, k = self.qk_norm(q), self.qk_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, hd)
        mask = None
        if cache is not None:
            k, v, mask = cache.update(self.layer, k, v)  # the cache holds the n_kv_head heads only
        y = attention(q, k, v, self.dropout if self.training else 0.0, attn_maps, mask)
        return self.o_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)): a gated MLP, Llama's feed-forward."""

    def __init__(self, n_embd: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(n_embd, hidden, bias=False)
        self.up_proj = nn.Linear(n_embd, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, n_embd, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoE(nn.Module):
    """Mixture of Experts, Llama 4 style: a router scores each token for every expert, keeps the
    top n_expert_per_token scores, and the sigmoid of each kept score multiplies the token on its
    way INTO that expert (Mixtral instead weighs the expert's output). For SwiGLU this is not the
    same thing: silu(g * s) * (u * s) is not s * silu(g) * u, so the router learns to scale the
    expert's input, and an expert sees inputs of varying size. Every token also goes through one
    shared expert."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        E, D, H = config.n_expert, config.n_embd, config.d_expert
        self.n_expert, self.top_k = E, config.n_expert_per_token
        self.router = nn.Linear(D, E, bias=False)
        self.gate_up_proj = nn.Parameter(torch.empty(E, D, 2 * H))  # each expert's gate and up
        self.down_proj = nn.Parameter(torch.empty(E, H, D))
        self.shared_expert = SwiGLU(D, H)
        self.aux_loss = self.z_loss = torch.zeros(())
        self.tokens_per_expert = torch.zeros(E)  # of the last forward pass, for the logs

    def expert(self, e: int, x):
        gate, up = (x @ self.gate_up_proj[e]).chunk(2, dim=-1)
        return (F.silu(gate) * up) @ self.down_proj[e]

    def forward(self, x):
        B, T, D = x.size()
        x = x.view(-1, D)  # (N, D): tokens are routed one by one
        logits = self.router(x)  # (N, E), in bf16 under autocast, like every Linear
        top_logits, top_experts = logits.topk(self.top_k, dim=-1)  # (N, k): on the raw scores
        # the router's sigmoid, softmax and logsumexp in float32: the losses below average them
        # over all N tokens, where bf16's 3 significant digits would swamp small differences
        scores = torch.sigmoid(top_logits.float()).type_as(x)
        # dispatch without a loop over tokens: sort the N*k (token, expert) assignments by expert,
        # so that each expert's tokens are one contiguous slice, run each expert once on its slice
        flat_experts = top_experts.view(-1)
        order = flat_experts.argsort(stable=True)
        tokens = order // self.top_k  # the token of each sorted assignment
        counts = torch.bincount(flat_experts, minlength=self.n_expert)
        routed_in = x[tokens] * scores.view(-1)[order, None]  # (N*k, D), weighted on the way in
        slices = routed_in.split(counts.tolist())  # expert e's tokens are the e-th slice
        routed_out = torch.cat([self.expert(e, xs) for e, xs in enumerate(slices) if len(xs)])
        # scatter back, summing a token's k experts onto the shared expert's output
        y = self.shared_expert(x).index_add(0, tokens, routed_out)
        # load balance (Switch Transformer, eq. 4): n_expert * sum_i f_i * P_i, with f_i the share of
        # assignments expert i got and P_i its mean router probability; 1 when routing is uniform.
        # P is a softmax over the experts, not the routing sigmoid: the sigmoid scores each expert on
        # its own, while P must share one unit among them, so that raising one expert's logit lowers
        # the others' (f, a count, has no gradient: P carries it). Both read the same logits, whose
        # top-k picks the experts, so spreading P spreads the picks.
        probs = F.softmax(logits.float(), dim=-1)
        share = counts.float() / flat_experts.numel()
        self.aux_loss = self.n_expert * (share * probs.mean(0)).sum()
        self.z_loss = torch.logsumexp(logits.float(), dim=-1).pow(2).mean()  # ST-MoE's router z-loss
        self.tokens_per_expert = counts.detach()
        return y.view(B, T, D)


class LlamaBlock(nn.Module):
    def __init__(self, config: LlamaConfig, layer: int):
        super().__init__()
        self.attn_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.attn = LlamaAttention(config, layer)
        self.mlp_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = MoE(config) if config.is_moe(layer) else SwiGLU(config.n_embd, config.d_ff)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x, rope, cache=None, attn_maps=None):
        x = x + self.drop(self.attn(self.attn_norm(x), rope, cache, attn_maps))  # as in the GPT's Block
        return x + self.drop(self.mlp(self.mlp_norm(x)))


class Llama(LanguageModel):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(config.vocab_size, config.n_embd),
            "h": nn.ModuleList([LlamaBlock(config, i) for i in range(config.n_layer)]),
            "ln_f": RMSNorm(config.n_embd, config.norm_eps),
        })
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:  # as in the GPT; untied, the input and output tables learn apart
            self.transformer.wte.weight = self.lm_head.weight
        for name, p in self.named_parameters():
            if p.dim() >= 2:  # residual branches' last projections start smaller, as in GPT-2
                last = name.endswith(("o_proj.weight", "down_proj.weight", "down_proj"))
                std = 0.02 / math.sqrt(2 * config.n_layer) if last else 0.02
                torch.nn.init.normal_(p, mean=0.0, std=std)
        self.moe_layers = [b.mlp for b in self.transformer.h if isinstance(b.mlp, MoE)]
        # RoPE's cos and sin for every position, shared by all layers; buffers follow .to(device)
        # but are not saved (persistent=False): checkpoints hold weights only
        cos, sin = rope_tables(config.n_embd // config.n_head, config.block_size, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, idx, *, cache: KVCache | None = None, attn_maps: list | None = None,
                input_pos: torch.Tensor | None = None) -> torch.Tensor:
        """As GPT.forward. Training adds the MoE layers' load-balancing and z-losses of this forward
        pass to its loss: router_loss() is their weighted sum."""
        pos = positions(idx, self.config.block_size, cache, input_pos)
        rope = self.rope_cos[pos], self.rope_sin[pos]  # (T, head_dim) each
        x = self.transformer.wte(idx)  # no position embedding: RoPE puts positions into q and k
        for block in self.transformer.h:
            x = block(x, rope, cache, attn_maps)
        x = self.transformer.ln_f(x)
        return self.lm_head(x if cache is None else x[:, [-1], :])

    def router_loss(self) -> torch.Tensor | int:
        """The router loss: each MoE layer's balancing loss (MoE.aux_loss) and z-loss, weighted by
        aux_loss_coef and z_loss_coef, from the last forward pass (0 for a dense Llama)."""
        c = self.config
        return sum(c.aux_loss_coef * m.aux_loss + c.z_loss_coef * m.z_loss for m in self.moe_layers)

    def expert_shares(self) -> list[list[float]]:
        """For each MoE layer, the share of the last batch's tokens each expert received."""
        return [(m.tokens_per_expert.float() / m.tokens_per_expert.sum()).tolist()
                for m in self.moe_layers]


# ==================================================================================================
# 3. Settings to checkpoints and back: a checkpoint's model_args are {"arch", config fields...}.
# ==================================================================================================


def model_args_from(settings: dict) -> dict:
    """The model_args a checkpoint stores, from a script's settings (train.py's keys): "arch" and
    the fields of that architecture's config dataclass, 0-defaults resolved (n_kv_head, d_ff,
    d_expert), ranges checked (ValueError). Only those fields reach a checkpoint: a setting that is
    no field of the dataclass is left out (bias, a GPTConfig field, for the Llama; n_kv_head or
    n_expert for the GPT; check_config refuses them given). A new model setting is a new field
    there, nothing more: train.py takes it as a setting (model_settings). vocab_size, the
    tokenizer's, comes with the settings or after.
    Given a checkpoint's model_args, it completes them: a field added since takes its default."""
    arch = settings.get("arch", "gpt")
    if arch not in ("gpt", "llama"):
        raise ValueError(f"arch must be gpt or llama, got {arch!r}")
    cls = GPTConfig if arch == "gpt" else LlamaConfig
    names = {f.name for f in fields(cls)}
    return {"arch": arch, **asdict(cls(**{k: v for k, v in settings.items() if k in names}))}


def model_settings() -> dict:
    """Every model setting train.py takes, with its default: the fields of GPTConfig and LlamaConfig,
    declared there once (the fields both have take the same default), vocab_size aside: it is the
    tokenizer's. arch picks which of them a run uses (a setting of the other one is an error)."""
    return {f.name: f.default for cls in (GPTConfig, LlamaConfig) for f in fields(cls) if f.name != "vocab_size"}


def other_arch_keys(arch: str, keys) -> list[str]:
    """The keys that set a field of the other architecture's config and none of arch's: given for
    arch, they would be dropped without a word (n_kv_head for the GPT, bias for the Llama)."""
    own, other = (GPTConfig, LlamaConfig) if arch == "gpt" else (LlamaConfig, GPTConfig)
    names = {f.name for f in fields(own)}
    return [f.name for f in fields(other) if f.name in keys and f.name not in names]


def make_model(model_args: dict) -> LanguageModel:
    """The model a checkpoint's model_args describe: {"arch": "gpt" or "llama", config fields...}."""
    args = dict(model_args)
    arch = args.pop("arch", "gpt")
    if arch == "gpt":
        return GPT(GPTConfig(**args))
    if arch == "llama":
        return Llama(LlamaConfig(**args))
    raise ValueError(f"unknown architecture {arch!r}: gpt or llama")


# ==================================================================================================
# 4. Generation, for both models: a KV cache, prefill then one token at a time, and sampling.
# ==================================================================================================


class KVCache:
    """Keys and values of the positions already processed, so that generating one more token
    costs one position of compute instead of the whole sequence.
    k[layer], v[layer]: (B, n_kv_head, block_size, head_dim), n_kv_head = n_head for the GPT: one
    fixed shape. A forward writes its T new keys and values at the positions input_pos (a (T,)
    tensor) and attends over the whole cache, masked to the positions up to its own: one token's
    decode step has one shape and the same code at every position, so torch.compile compiles it
    once. One tensor per layer, not views of one: a compiled step writes into a whole input in
    place, where it would copy the whole of a base tensor to update a view of it."""

    def __init__(self, model: LanguageModel, batch_size: int):
        cfg, w = model.config, model.lm_head.weight
        n_kv_head = getattr(cfg, "n_kv_head", cfg.n_head)  # grouped-query attention caches fewer heads
        shape = (batch_size, n_kv_head, cfg.block_size, cfg.n_embd // cfg.n_head)
        self.k = [torch.zeros(shape, device=w.device, dtype=w.dtype) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, device=w.device, dtype=w.dtype) for _ in range(cfg.n_layer)]
        self.pos = 0  # positions filled, for calls that give no input_pos (the compiled step reads none)
        self.input_pos = None  # (T,): the positions of the tokens going through the model now

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Stores k, v (B, n_kv, T, hd) at input_pos; returns the whole cache of this layer, and the
        (T, block_size) mask of what each query may see: itself and the positions before it."""
        k_cache, v_cache = self.k[layer], self.v[layer]
        k_cache.index_copy_(2, self.input_pos, k.to(k_cache.dtype))  # under autocast k is bf16
        v_cache.index_copy_(2, self.input_pos, v.to(v_cache.dtype))
        mask = torch.arange(k_cache.size(2), device=k.device) <= self.input_pos[:, None]
        return k_cache, v_cache, mask


def positions(idx: torch.Tensor, block_size: int, cache: KVCache | None,
              input_pos: torch.Tensor | None) -> torch.Tensor:
    """The positions (T,) of idx's T tokens: input_pos if given, else those after the cache's
    cache.pos filled ones (counted as filled from now on), else 0..T-1. The compiled decode step
    gives input_pos: a position read from a Python int would compile the step once per value."""
    if input_pos is None:
        T, start = idx.size(1), cache.pos if cache is not None else 0
        if start + T > block_size:
            raise ValueError(f"sequence of {start + T} tokens is longer than block_size={block_size}")
        input_pos = torch.arange(start, start + T, device=idx.device)
        if cache is not None:
            cache.pos += T
    if cache is not None:
        cache.input_pos = input_pos  # where each layer's cache.update writes
    return input_pos


def decode_step(model: LanguageModel, idx: torch.Tensor, cache: KVCache, input_pos: torch.Tensor,
                u: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """One token per row, idx (B, 1), at position input_pos (1,) -> the next token (B, 1), drawn
    with the uniform numbers u (B, 1) (sample_next). The draw is part of the step: compiled, the
    filters and the draw fuse with the output layer, instead of a dozen small operations a token."""
    logits = model(idx, cache=cache, input_pos=input_pos)  # (B, 1, V)
    return sample_next(logits[:, -1, :], temperature, top_k, top_p, u=u)


@functools.cache
def compiled_decode_step(device_type: str):
    """decode_step compiled (once per process and device type; each model shape then compiles once
    on its first call). fullgraph: a graph break would put Python back into every step. On CUDA,
    "reduce-overhead" replays the whole step as one CUDA graph (gpt-fast's way); on CPU, Inductor's
    C++ wrapper calls the kernels without a Python line per kernel."""
    if device_type == "cuda":
        return torch.compile(decode_step, fullgraph=True, mode="reduce-overhead")
    # one token per row: each matrix product is a matrix-vector product, bound by reading the weights.
    # Inductor's decompose_mm_pass writes it as a fused multiply-and-sum that reads them at memory speed,
    # bf16 ones too (oneDNN reads one row's bf16 weights no faster than float32 ones). Its limit on the
    # matrix's size is raised past any vocabulary, for the output layer; the pass reads the limit once,
    # when first imported, and a cached graph is keyed on the options: so it is set in both places.
    largest = 1 << 17
    options = {"cpp_wrapper": True}
    try:
        from torch._inductor.fx_passes import decompose_mem_bound_mm as mm_pass
    except ImportError:
        mm_pass = None
    if hasattr(mm_pass, "cpu_max_other_dimension_decomposition"):  # else an older torch: oneDNN's products
        mm_pass.cpu_max_other_dimension_decomposition = largest
        options["post_grad_fusion_options"] = {"decompose_mm_pass": {"cpu_max_other_dimension_decomposition": largest}}
    return torch.compile(decode_step, fullgraph=True, options=options)


@torch.no_grad()
def generate(model: LanguageModel, idx: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, generator: torch.Generator | None = None,
             eot_id: int | None = None, compile: bool = False) -> Iterator[torch.Tensor]:
    """Yields the next token of each row of idx (B, T), as (B, 1), max_new_tokens times or until
    every row has produced eot_id (a finished row then repeats eot_id). temperature, top_k, top_p:
    sample_next's filters (temperature 0 is greedy); generator: the random draws' source (seeded,
    the same tokens every time, compiled or not).

    Prefill: the prompt goes through the model once and fills the KV cache. Decode: each next
    token then goes through alone, one position of compute, and is drawn in the same step
    (decode_step); compile=True runs that step compiled (compiled_decode_step: the first call
    compiles it, seconds to a minute). Once the window is full (block_size tokens), the context
    slides: every token then changes position (and with it every later layer's keys), so each step
    prefills the last block_size tokens again, which gives exactly what full recomputation gives,
    at its cost."""
    bs, B = model.config.block_size, idx.size(0)
    filters = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
    seq = idx[:, -bs:]
    cache = KVCache(model, B)
    # a Mixture of Experts decodes eagerly: its routing splits the tokens by counts read back from the
    # device (MoE.forward's counts.tolist()), which one graph cannot hold
    compile = compile and not getattr(model, "moe_layers", None)
    step = compiled_decode_step(idx.device.type) if compile else decode_step
    if compile and idx.device.type == "cuda":
        # a CUDA graph replays fixed addresses, and writes only into inputs marked static: the cache's
        # (the graph is recorded again once per call, for its new cache)
        for t in cache.k + cache.v:
            torch._dynamo.mark_static_address(t)
    logits = model(seq, cache=cache)  # prefill: (B, 1, V), the last position's logits
    nxt = sample_next(logits[:, -1, :], **filters, generator=generator)  # (B, 1)
    done = torch.zeros(B, 1, dtype=torch.bool, device=idx.device)
    for i in range(max_new_tokens):
        if eot_id is not None:
            nxt = nxt.masked_fill(done, eot_id)
            done |= nxt == eot_id
        yield nxt
        if i == max_new_tokens - 1 or done.all():
            return
        seq = torch.cat((seq, nxt), dim=1)[:, -bs:]
        # one uniform number per row, drawn here from the generator (the compiled step takes no generator)
        u = torch.rand(B, 1, generator=generator, device=idx.device)
        if cache.pos < bs:  # decode one token: (B, 1) in, attending to every cached position
            input_pos = torch.full((1,), cache.pos, device=idx.device)  # a fill, no copy from the host
            cache.pos += 1
            nxt = step(model, nxt, cache, input_pos, u, **filters)
        else:  # the window is full: slide it by one and prefill it again
            cache.pos = 0
            nxt = sample_next(model(seq, cache=cache)[:, -1, :], **filters, u=u)


@dataclass
class SamplingConfig:
    """The sampling settings, declared once: sample.py, chat.py, eval.py and export.py take them as
    --flags with these defaults, check_config checks them through this class, and export.py writes
    them to generation_config.json under the same names, which are transformers' (GenerationConfig).
    A new filter (min_p, ...) is a field here, its range in __post_init__, and one `if` in sample_next."""
    temperature: float = 0.8  # 0: greedy (the argmax); below 1 sharpens the distribution, above flattens it
    top_k: int = 40  # keep the k likeliest tokens; 0: off
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches top_p; 1: off

    def __post_init__(self):
        for name in ("temperature", "top_k"):
            if not 0 <= getattr(self, name) < math.inf:  # nan fails every comparison
                raise ValueError(f"{name} must be zero or positive, got {getattr(self, name)}")
        if 0 < self.temperature < 1e-3:  # logits / temperature would overflow
            raise ValueError(f"temperature must be 0 (greedy) or at least 0.001, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


# SamplingConfig's settings and defaults: sample.py, chat.py, eval.py and export.py take them as settings
SAMPLING = asdict(SamplingConfig())


def sampling(config: dict) -> dict:
    """The sampling settings of a script's config, checked (ValueError), as generate's keyword arguments."""
    return asdict(SamplingConfig(**{k: config[k] for k in SAMPLING}))


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None,
                u: torch.Tensor | None = None) -> torch.Tensor:
    """(B, V) logits -> (B, 1) token ids, drawn from softmax(logits / temperature) once the
    filters have removed tokens; temperature 0 is greedy decoding (the argmax). The draw uses one
    uniform number per row, u (B, 1) if given, else drawn from generator. Every filter lives here,
    its setting in SamplingConfig above."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    # in float32, even from bf16 logits: the filters and the draw compare small probabilities.
    # temperature < 1 sharpens the distribution, > 1 flattens it
    logits = logits.float() / temperature
    if top_k is not None and top_k > 0:  # keep the k likeliest tokens
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits = logits.masked_fill(logits < v[:, [-1]], float("-inf"))
    if top_p is not None and top_p < 1.0:  # keep the smallest set whose probability reaches top_p
        sorted_logits, order = torch.sort(logits, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        # drop the tokens after the mass reached top_p (the likeliest always stays)
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    probs = F.softmax(logits, dim=-1)  # (B, V), 0 for the filtered tokens
    # the inverse of the cumulative distribution: the first id whose cdf exceeds u, a token drawn
    # with its probability from one uniform number (torch.multinomial would draw one per entry)
    cdf = probs.cumsum(dim=-1)  # (B, V)
    if u is None:
        u = torch.rand(cdf.size(0), 1, generator=generator, device=cdf.device)
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=cdf.size(-1) - 1)


# ==================================================================================================
# 5. Scoring a completion: log p(completion | prompt), what DPO, chat.py and eval.py's minimal pairs
# compare. The prompt is context, never scored: its targets are -1.
# ==================================================================================================


def fit_prompt(prompt: list[int], completion_len: int, block_size: int) -> list[int]:
    """The part of a prompt that fits before a completion in block_size + 1 tokens: the oldest
    tokens go first, one always stays (it predicts the completion's first token)."""
    return prompt[-max(1, block_size + 1 - completion_len) :]


def pack(prompts: list[list[int]], completions: list[list[int]], block_size: int, device,
         multiple: int = 1) -> tuple:
    """A right-padded batch that scores each completion given its prompt in one forward pass.
    Returns x (B, T) inputs and y (B, T) targets, -1 where nothing is scored (the prompt's own
    tokens, padding). Rows longer than block_size + 1 lose prompt tokens first, then the
    completion's last ones. T: the longest row's, rounded up to a multiple of multiple (at most
    block_size): batches of a few shapes, whose memory a process that keeps freed memory reuses."""
    rows = []
    for p, c in zip(prompts, completions, strict=True):
        c = c[:block_size]
        rows.append((fit_prompt(p, len(c), block_size), c))
    T = max(len(p) + len(c) for p, c in rows) - 1
    T = min(block_size, -(-T // multiple) * multiple)
    x = torch.zeros(len(rows), T, dtype=torch.long)
    y = torch.full((len(rows), T), -1, dtype=torch.long)
    for i, (p, c) in enumerate(rows):
        ids = torch.tensor(p + c)
        x[i, : len(ids) - 1] = ids[:-1]
        y[i, len(p) - 1 : len(ids) - 1] = ids[len(p) :]
    return x.to(device), y.to(device)


def completion_logps(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """log p(completion | prompt) per row: the sum of the scored targets' log-probabilities, (B,)."""
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, y.clamp(min=0)[..., None]).squeeze(-1)
    return (logp * (y != -1)).sum(-1)
