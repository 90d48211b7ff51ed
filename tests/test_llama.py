import pathlib
import signal

import pytest
import torch
from test_model import full_recompute_greedy
from test_model import tiny as gpt_tiny
from torch._dynamo.utils import counters

import plumbing
from model import (
    KVCache,
    Llama,
    LlamaConfig,
    MoE,
    RMSNorm,
    apply_rotary_emb,
    make_model,
    model_args_from,
    next_token_loss,
    rope_tables,
)
from plumbing import DECODE_COMPILE_STEPS, configure_optimizer, decode_compile, resolve_compile

README = (pathlib.Path(__file__).parent.parent / "README.md").read_text()


def tiny(**kw) -> Llama:
    torch.manual_seed(0)
    args = {"vocab_size": 50, "block_size": 16, "n_layer": 4, "n_head": 4, "n_kv_head": 2, "n_embd": 32,
            "n_expert": 4, "n_expert_per_token": 1, "moe_every": 2, "no_rope_interval": 4, **kw}
    return Llama(LlamaConfig(**args)).eval()


def test_rope_scores_depend_only_on_distance():
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    cos, sin = rope_tables(16, 64, 10000.0)

    def score(m: int, n: int) -> float:
        qm = apply_rotary_emb(q, cos[m : m + 1], sin[m : m + 1])
        kn = apply_rotary_emb(k, cos[n : n + 1], sin[n : n + 1])
        return (qm * kn).sum().item()

    assert score(5, 2) == pytest.approx(score(45, 42), abs=1e-5)
    assert score(7, 7) == pytest.approx((q * k).sum().item(), abs=1e-5)  # distance 0: no rotation at all
    assert score(5, 2) != pytest.approx(score(5, 3), abs=1e-3)


def test_rope_is_metas_complex_rotation():
    """Meta's reference rotates each pair (x[2j], x[2j+1]) as the complex number x[2j] + i x[2j+1],
    multiplied by e^(i * position * theta^(-2j/head_dim)): the real tables must give the same."""
    torch.manual_seed(0)
    x = torch.randn(2, 10, 3, 16)
    angles = torch.arange(10).float()[:, None] / 500.0 ** (torch.arange(0, 16, 2).float() / 16)
    rotations = torch.polar(torch.ones_like(angles), angles)[:, None]  # e^(ia), (T, 1, hd/2)
    xc = torch.view_as_complex(x.reshape(2, 10, 3, 8, 2)) * rotations
    cos, sin = rope_tables(16, 10, 500.0)
    assert torch.allclose(apply_rotary_emb(x, cos, sin), torch.view_as_real(xc).flatten(3), atol=1e-6)


def test_rmsnorm_matches_its_formula():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 8)
    n = RMSNorm(8, eps=1e-5)
    with torch.no_grad():
        n.weight.copy_(torch.randn(8))
    expected = x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-5) * n.weight
    assert torch.allclose(n(x), expected, atol=1e-6)


def naive_moe(m: MoE, x: torch.Tensor) -> torch.Tensor:
    """Token by token, expert by expert: what the sorted dispatch must equal."""
    out = []
    for t in x.view(-1, x.size(-1)):
        logits = m.router(t)
        top, experts = logits.topk(m.top_k)
        y = m.shared_expert(t)
        for s, e in zip(torch.sigmoid(top), experts.tolist(), strict=True):
            y = y + m.expert(e, (t * s)[None])[0]
        out.append(y)
    return torch.stack(out).view_as(x)


@pytest.mark.parametrize("top_k", [1, 2])
def test_sorted_dispatch_equals_a_naive_loop_forward_and_backward(top_k):
    torch.manual_seed(0)
    m = tiny(n_expert_per_token=top_k).transformer.h[1].mlp
    assert isinstance(m, MoE)
    x = torch.randn(3, 7, 32, requires_grad=True)
    fast = m(x)
    g_fast = torch.autograd.grad(fast.square().sum(), [x, m.gate_up_proj, m.router.weight])
    slow = naive_moe(m, x)
    g_slow = torch.autograd.grad(slow.square().sum(), [x, m.gate_up_proj, m.router.weight])
    assert torch.allclose(fast, slow, atol=1e-5)
    for a, b in zip(g_fast, g_slow, strict=True):
        assert torch.allclose(a, b, atol=1e-4)


def test_aux_loss_is_one_for_uniform_routing():
    m = tiny(n_embd=32, n_expert=4).transformer.h[1].mlp
    with torch.no_grad():
        m.router.weight.copy_(torch.eye(4, 32) * 3.0)  # token i prefers expert i % 4, always as much
    x = torch.eye(32)[torch.arange(64) % 4].view(4, 16, 32)
    m(x)
    assert m.tokens_per_expert.tolist() == [16, 16, 16, 16]
    assert m.aux_loss.item() == pytest.approx(1.0, abs=1e-6)


def test_router_loss_is_the_weighted_sum_of_the_moe_layers_losses():
    m = tiny()
    x = torch.randint(0, 50, (2, 16))
    m.train()
    logits = m(x)  # the router losses of this forward pass: what train.py adds to the cross-entropy
    assert m.router_loss().item() > 0
    c = m.config
    assert m.router_loss().item() == pytest.approx(sum(c.aux_loss_coef * layer.aux_loss.item() + c.z_loss_coef
                                                        * layer.z_loss.item() for layer in m.moe_layers))
    m.eval()
    assert torch.equal(m(x), logits)  # the forward pass itself is the same in both modes (no dropout here)


def test_causal_and_attention_maps():
    m = tiny()
    x = torch.randint(0, 50, (1, 12))
    y = x.clone()
    y[0, 8] = (x[0, 8] + 1) % 50
    a = m(x)
    b = m(y)
    assert torch.allclose(a[0, :8], b[0, :8], atol=1e-5) and not torch.allclose(a[0, 8:], b[0, 8:], atol=1e-3)
    maps = []
    c = m(x, attn_maps=maps)
    assert torch.allclose(a, c, atol=1e-5) and len(maps) == 4 and maps[0].shape == (1, 4, 12, 12)


@pytest.mark.parametrize("prompt_len,new", [(3, 10), (5, 30)])
def test_kv_cache_with_gqa_equals_full_recompute(prompt_len, new):
    m = tiny()
    idx = torch.randint(0, 50, (2, prompt_len))
    cached = torch.cat([idx, *m.generate(idx, new, temperature=0.0)], dim=1)
    assert torch.equal(cached, full_recompute_greedy(m, idx, new))
    assert KVCache(m, 2).k[0].shape == (2, 2, 16, 8)  # n_kv_head = 2 heads cached, not 4


def test_active_flops_count_one_expert_of_four():
    dense, moe = tiny(moe_every=0, d_ff=128), tiny(moe_every=1, d_expert=64)
    # each MoE layer: the shared expert + 1 of 4 experts of width 64 = a dense SwiGLU of width 128
    # (plus the router's 32 x 4 weights)
    assert moe.flops_per_token() - dense.flops_per_token() == 6 * 4 * 32 * 4


@pytest.mark.parametrize("kw, message", [
    ({"n_head": 4, "n_kv_head": 3}, "n_head=4 must be divisible by n_kv_head=3"),
    ({"n_embd": 30, "n_head": 2}, "head dimension n_embd/n_head = 15 must be even"),
    ({"n_expert": 2, "n_expert_per_token": 3}, "n_expert_per_token=3 must be between 1 and n_expert=2"),
    ({"rope_theta": 0.0}, "rope_theta must be positive, got 0.0"),
    ({"moe_every": -1}, "moe_every must be zero or positive, got -1"),
])
def test_config_rejects_an_impossible_value_in_one_line(kw, message):
    with pytest.raises(ValueError) as e:
        LlamaConfig(**kw)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_config_resolves_its_zero_defaults_and_model_args_keep_its_fields_only():
    c = LlamaConfig(n_head=4, n_kv_head=0, n_embd=32, d_ff=0, d_expert=0)
    assert (c.n_kv_head, c.d_ff, c.d_expert) == (4, 128, 64)
    settings = {"arch": "llama", "n_layer": 2, "n_head": 4, "n_kv_head": 0, "n_embd": 32, "bias": True,
                "batch_size": 8, "learning_rate": 1e-3}
    args = model_args_from(settings)
    assert args["n_kv_head"] == 4 and "bias" not in args and "batch_size" not in args  # bias: GPT only
    assert make_model(args).config == LlamaConfig(**{k: v for k, v in args.items() if k != "arch"})
    gpt = model_args_from({**settings, "arch": "gpt"})
    assert gpt["bias"] is True and gpt["d_ff"] == 128 and "n_kv_head" not in gpt
    with pytest.raises(ValueError, match="arch must be gpt or llama"):
        model_args_from({"arch": "mamba"})


@pytest.mark.slow  # compiling takes tens of seconds
def test_compiled_model_trains_like_the_eager_one():
    """torch.compile (Inductor's C++ kernels on a CPU) gives the eager losses within bf16 noise, over
    three steps of training in bf16 autocast."""
    if not resolve_compile(None, "cpu", log=lambda line: None):
        pytest.skip("Inductor cannot build C++ kernels on this machine")
    x = torch.randint(0, 50, (4, 16))
    losses = []
    for compiled in (False, True):
        m = tiny(n_layer=2, moe_every=0).train()
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2, fused=True)
        step = torch.compile(m) if compiled else m
        losses.append([])
        for _ in range(3):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = next_token_loss(step(x[:, :-1]), x[:, 1:]) + m.router_loss()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses[-1].append(loss.item())
    assert losses[0][-1] < losses[0][0] - 0.05  # it trains
    assert losses[1] == pytest.approx(losses[0], abs=2e-2)


@pytest.mark.slow  # compiles the decode step of two tiny models: 10-20 s
@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_compiled_decode_step_gives_the_eager_tokens_and_compiles_once(arch):
    """generate(compile=True) compiles the one-token decode step once, whatever its position and the
    prompt's length (the KV cache has one shape, positions are tensors), and gives the eager greedy
    tokens, in the window and past it (where the window slides, eagerly), and the eager samples."""
    if not resolve_compile(None, "cpu", log=lambda line: None):
        pytest.skip("Inductor cannot build C++ kernels on this machine")
    m = gpt_tiny(block_size=16) if arch == "gpt" else tiny(n_layer=2, moe_every=0)
    torch._dynamo.reset()  # a fresh count of compilations for this model
    for prompt_len in (5, 3):
        idx = torch.randint(0, 50, (2, prompt_len))
        eager = torch.cat(list(m.generate(idx, 30, temperature=0.0)), dim=1)
        with torch._dynamo.config.patch(error_on_recompile=prompt_len == 3):  # compiled by the first
            compiled = torch.cat(list(m.generate(idx, 30, temperature=0.0, compile=True)), dim=1)
        assert torch.equal(compiled, eager)
    # sampling is part of the compiled step: the same seed draws the same tokens as eager decoding
    idx = torch.randint(0, 50, (2, 4))
    drawn = [torch.cat(list(m.generate(idx, 30, temperature=1.0, top_k=20, compile=c,
                                       generator=torch.Generator().manual_seed(7))), dim=1) for c in (False, True)]
    assert torch.equal(drawn[0], drawn[1])


@pytest.mark.slow  # compiles the batch-1 decode step twice (float32, bf16): 10-20 s
def test_a_compiled_step_at_batch_1_decodes_the_weights_read_as_one_product_or_in_bf16():
    """At batch 1 the compiled step's matrix products are Inductor's fused reductions: the eager greedy
    tokens in float32. Runtime.decoder gives a compiled step on a bf16 CPU a bf16 copy of the weights
    (the model itself untouched): each token it picks is, by the float32 model's own scores, within
    bf16's rounding of the likeliest, not one a broken kernel would pick."""
    if not resolve_compile(None, "cpu", log=lambda line: None):
        pytest.skip("Inductor cannot build C++ kernels on this machine")
    m = tiny(n_layer=2, moe_every=0, vocab_size=3000)  # an output layer past the pass's own limit (2,048)
    idx = torch.randint(0, 3000, (1, 5))
    torch._dynamo.reset()
    counters["inductor"].clear()
    eager = torch.cat(list(m.generate(idx, 10, temperature=0.0)), dim=1)
    assert torch.equal(torch.cat(list(m.generate(idx, 10, temperature=0.0, compile=True)), dim=1), eager)
    assert counters["inductor"]["decompose_mm"] == 2 * 7 + 1  # q, k, v, o, gate, up, down a layer; the output

    bf16 = plumbing.Runtime("cpu", "cpu", torch.bfloat16, False, 0, 0, 1)
    fp32 = plumbing.Runtime("cpu", "cpu", torch.float32, False, 0, 0, 1)
    assert bf16.decoder(m, False) is m and fp32.decoder(m, True) is m  # eager, or float32: the model itself
    before = {k: v.clone() for k, v in m.state_dict().items()}
    d = bf16.decoder(m, True)
    assert all(p.dtype == torch.bfloat16 for p in d.parameters())
    assert all(torch.equal(v, m.state_dict()[k]) and v.dtype == torch.float32 for k, v in before.items())
    tokens = torch.cat(list(d.generate(idx, 10, temperature=0.0, compile=True)), dim=1)  # (1, 10)
    with torch.no_grad():
        logp = torch.log_softmax(m(torch.cat((idx, tokens[:, :-1]), dim=1))[0, -10:], dim=-1)
    gap = logp.max(dim=-1).values - logp.gather(-1, tokens[0][:, None]).squeeze(-1)
    assert gap.max() < 0.05, gap


def test_resolve_compile_says_in_one_line_why_it_stays_eager(monkeypatch):
    def no_compiler(*args, **kwargs):
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nthe rest of a long message")

    lines = []
    monkeypatch.setattr(torch, "compile", no_compiler)
    assert resolve_compile(None, "cpu", lines.append) is False
    assert len(lines) == 1 and "No working C++ compiler found" in lines[0] and "--compile=False" in lines[0]
    assert resolve_compile(True, "cpu", lines.append) is True and len(lines) == 1  # asked for: no check
    assert resolve_compile(None, "cuda", lines.append) is True
    assert resolve_compile(None, "mps", lines.append) is False


def test_a_ctrl_c_during_the_compile_check_reaches_the_scripts_handler(monkeypatch):
    """Inductor may turn a Ctrl-C during resolve_compile's check into an error of its own: the script's
    handler (dpo.py's line, or Python's KeyboardInterrupt) still stops the script, and the check does
    not report that Inductor cannot build (eval.py once decoded on eagerly after such a Ctrl-C)."""
    def interrupted_compile(*args, **kwargs):
        try:
            signal.raise_signal(signal.SIGINT)  # the handler runs here and raises
        except BaseException as e:
            raise RuntimeError("C++ compile failed") from e

    def scripts_handler(signum, frame):
        raise SystemExit("interrupted: the script's line")

    monkeypatch.setattr(torch, "compile", interrupted_compile)
    lines = []
    previous = signal.signal(signal.SIGINT, scripts_handler)
    try:
        with pytest.raises(SystemExit, match="the script's line"):
            resolve_compile(None, "cpu", lines.append)
        assert signal.getsignal(signal.SIGINT) is scripts_handler  # put back
        signal.signal(signal.SIGINT, signal.default_int_handler)
        with pytest.raises(KeyboardInterrupt):
            resolve_compile(None, "cpu", lines.append)
        assert not lines  # no "compile: off" line
    finally:
        signal.signal(signal.SIGINT, previous)


def test_the_decode_step_compiles_by_a_rule_the_readme_states(monkeypatch):
    """decode_compile: as asked; else compiled from DECODE_COMPILE_STEPS decode steps on, where Inductor works."""
    lines = []
    assert decode_compile(True, "cpu", 1, lines.append) and not decode_compile(False, "cpu", 10**6, lines.append)
    assert not decode_compile(None, "cpu", DECODE_COMPILE_STEPS - 1, lines.append) and not lines  # no check run
    monkeypatch.setattr(plumbing, "resolve_compile", lambda compile, device_type, log: True)
    assert decode_compile(None, "cpu", DECODE_COMPILE_STEPS, lines.append)
    monkeypatch.setattr(plumbing, "resolve_compile", lambda compile, device_type, log: False)
    assert not decode_compile(None, "cpu", DECODE_COMPILE_STEPS, lines.append)
    assert len(lines) == 2 and "compiles first" in lines[0] and "eager" in lines[1]
    assert f"{DECODE_COMPILE_STEPS:,} steps" in README  # the rule, as the README states it


def test_muon_takes_the_blocks_matrices_adamw_the_rest_and_both_train():
    m = tiny(n_layer=2, moe_every=0).train()
    opt = configure_optimizer(m, 0.1, 1e-2, (0.9, 0.95), "cpu", optimizer="muon")
    muon, adamw = opt.optimizers
    matrices = {id(p) for n, p in m.named_parameters() if p.dim() == 2 and n.startswith("transformer.h.")}
    assert {id(p) for g in muon.param_groups for p in g["params"]} == matrices and len(matrices) == 2 * 7
    assert any(p is m.lm_head.weight for g in adamw.param_groups for p in g["params"])  # tied embedding
    x = torch.randint(0, 50, (4, 16))
    losses = []
    for _ in range(6):
        loss = next_token_loss(m(x[:, :-1]), x[:, 1:])
        loss.backward()
        for g in opt.param_groups:  # as train.py sets its schedule's learning rate
            g["lr"] = 1e-2
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5
    again = configure_optimizer(m, 0.1, 1e-2, (0.9, 0.95), "cpu", optimizer="muon")
    again.load_state_dict(opt.state_dict())  # a checkpoint's round trip
    assert torch.equal(again.optimizers[0].state[m.transformer.h[0].attn.q_proj.weight]["momentum_buffer"],
                       muon.state[m.transformer.h[0].attn.q_proj.weight]["momentum_buffer"])


@pytest.mark.parametrize("ns_dtype, atol", [(torch.bfloat16, 1e-3), (torch.float32, 5e-3)])
def test_batched_muon_steps_as_torchs_muon(ns_dtype, atol):
    """BatchedMuon orthogonalises same-shape matrices together: the weights after 3 steps are
    torch.optim.Muon's, momentum and decay included: up to bf16 rounding in the batched products, and
    within a tenth of a step in float32 (the path of CPUs without bf16 units; torch's runs in bf16)."""
    torch.manual_seed(0)
    shapes = [(64, 32), (64, 32), (32, 64), (16, 32), (32, 32)]  # tall ones join the wide of their shape
    start = [torch.randn(s) for s in shapes]
    ours, theirs = ([torch.nn.Parameter(w.clone()) for w in start] for _ in range(2))
    opts = [plumbing.BatchedMuon(ours, lr=0.1, weight_decay=0.1, adjust_lr_fn="match_rms_adamw", ns_dtype=ns_dtype),
            torch.optim.Muon(theirs, lr=0.1, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")]
    for _ in range(3):
        grads = [torch.randn(s) for s in shapes]
        for params, opt in zip((ours, theirs), opts, strict=True):
            for p, g in zip(params, grads, strict=True):
                p.grad = g.clone()
            opt.step()
    for a, b, w in zip(ours, theirs, start, strict=True):
        assert (b - w).abs().mean() > 0.02  # the 3 steps moved the weights (by about 0.04)
        assert torch.allclose(a, b, atol=atol, rtol=0), (a.shape, (a - b).abs().max())


def test_muon_orthogonalises_in_float32_where_bf16_is_emulated(monkeypatch):
    """On a CPU without bf16 units bf16 products run 100x slower than float32: Newton-Schulz takes float32."""
    m = tiny(n_layer=1, moe_every=0)
    for fast, ns_dtype in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(plumbing, "fast_bf16", lambda device, fast=fast: fast)
        opt = configure_optimizer(m, 0.1, 1e-2, (0.9, 0.95), "cpu", optimizer="muon")
        assert opt.optimizers[0].ns_dtype == ns_dtype
    X = plumbing.newton_schulz(torch.randn(3, 8, 16), (3.4445, -4.7750, 2.0315), 5, 1e-7, torch.float32)
    s = torch.linalg.svdvals(X)  # (3, 8): the quintic pushes every singular value near 1, not exactly
    assert X.dtype == torch.float32 and s.min() > 0.5 and s.max() < 1.3, s
