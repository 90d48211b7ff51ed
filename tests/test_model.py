import math

import pytest
import torch

from model import GPT, CrossEntropy, GPTConfig, KVCache, causal_mask, next_token_loss, sample_next


def tiny(block_size=16, vocab_size=50, **kw) -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=2, n_head=2, n_embd=32, **kw)
    return GPT(cfg).eval()


def test_shapes_and_last_position_logits():
    m = tiny()
    x = torch.randint(0, 50, (3, 10))
    logits = m(x)
    loss = next_token_loss(logits, x)
    assert logits.shape == (3, 10, 50) and loss.ndim == 0
    assert math.isclose(loss.item(), math.log(50), rel_tol=0.1)  # an untrained model is near uniform
    last = m(x, cache=KVCache(m, 3))  # generation: the last position's logits only
    assert last.shape == (3, 1, 50)
    assert torch.allclose(last[:, 0], logits[:, -1], atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_cross_entropy_with_its_gradient_from_the_forward_matches_pytorchs(dtype, monkeypatch):
    torch.manual_seed(0)
    logits = (3 * torch.randn(40, 64)).to(dtype)
    targets = torch.randint(0, 64, (40,))
    targets[[3, 17, 18]] = -1  # ignored: no loss, no gradient

    def loss_and_grad(fn):
        z = logits.clone().requires_grad_()
        loss = fn(z, targets)
        (0.5 * loss).backward()  # a scaled loss, as gradient accumulation divides it
        return loss, z.grad

    want, want_grad = loss_and_grad(lambda z, t: torch.nn.functional.cross_entropy(z.float(), t, ignore_index=-1))
    got, got_grad = loss_and_grad(CrossEntropy.apply)
    assert got.dtype == torch.float32 and torch.allclose(got, want, atol=1e-5)
    assert got_grad.dtype == dtype and got_grad[[3, 17, 18]].abs().max() == 0
    tol = 1e-6 if dtype == torch.float32 else 2e-3  # bf16: each gradient rounded to 8 bits, either way
    assert torch.allclose(got_grad.float(), want_grad.float(), atol=tol)
    # next_token_loss takes this path when compiled (eager, PyTorch's kernels are faster), and agrees
    assert type(loss_and_grad(next_token_loss)[0].grad_fn).__name__ == "NllLossBackward0"
    with monkeypatch.context() as m:
        m.setattr(torch.compiler, "is_compiling", lambda: True)
        assert type(loss_and_grad(next_token_loss)[0].grad_fn).__name__ == "CrossEntropyBackward"
    compiled, compiled_grad = loss_and_grad(torch.compile(next_token_loss))
    assert torch.allclose(compiled, want, atol=1e-5) and torch.allclose(compiled_grad.float(), want_grad.float(), atol=tol)


def test_causality_future_tokens_do_not_change_the_past():
    m = tiny()
    x = torch.randint(0, 50, (1, 12))
    y = x.clone()
    y[0, 7] = (x[0, 7] + 1) % 50
    a = m(x)
    b = m(y)
    assert torch.allclose(a[0, :7], b[0, :7], atol=1e-6)
    assert not torch.allclose(a[0, 7:], b[0, 7:], atol=1e-3)


def test_sdpa_equals_explicit_attention_and_maps_are_causal_distributions():
    m = tiny()
    x = torch.randint(0, 50, (2, 12))
    fast = m(x)
    maps = []
    slow = m(x, attn_maps=maps)
    assert torch.allclose(fast, slow, atol=1e-5)
    assert len(maps) == 2 and maps[0].shape == (2, 2, 12, 12)
    assert torch.allclose(maps[1].sum(-1), torch.ones(2, 2, 12), atol=1e-5)
    assert maps[0].triu(diagonal=1).abs().max() == 0  # nothing attends to the future
    # the last 5 of 9 positions (a cache's shape): query i sees keys 0 .. 4 + i
    assert torch.equal(causal_mask(5, 9, "cpu"), torch.ones(5, 9, dtype=torch.bool).tril(diagonal=4))


def full_recompute_greedy(m: GPT, idx, n):
    for _ in range(n):
        logits = m(idx[:, -m.config.block_size :])
        idx = torch.cat((idx, logits[:, -1].argmax(-1, keepdim=True)), dim=1)
    return idx


@pytest.mark.parametrize("prompt_len,new", [(3, 10), (5, 30), (20, 8)])  # within, past, and beyond block_size
def test_kv_cache_greedy_equals_full_recompute(prompt_len, new):
    m = tiny(block_size=16)
    idx = torch.randint(0, 50, (2, prompt_len))
    cached = torch.cat([idx, *m.generate(idx, new, temperature=0.0)], dim=1)
    assert torch.equal(cached, full_recompute_greedy(m, idx, new))


def test_kv_cache_logits_match_full_forward():
    m = tiny(block_size=16)
    x = torch.randint(0, 50, (2, 12))
    full = m(x)
    cache = KVCache(m, 2)
    m(x[:, :5], cache=cache)
    for t in range(5, 12):
        step = m(x[:, t : t + 1], cache=cache)
        assert torch.allclose(step[:, 0], full[:, t], atol=1e-5)


def test_generation_stops_at_eot_and_pads_finished_rows():
    m = tiny()
    idx = torch.randint(0, 50, (2, 4))
    free = torch.cat(list(m.generate(idx, 10, temperature=0.0)), dim=1)
    eot = free[0, 0].item()  # call row 0's first token the end of text: row 0 is done at once
    steps = torch.cat(list(m.generate(idx, 10, temperature=0.0, eot_id=eot)), dim=1)
    row1 = free[1].tolist()
    stop = row1.index(eot) + 1 if eot in row1 else 10  # generation ends when every row is done
    assert steps.size(1) == stop
    assert (steps[0] == eot).all() and steps[1].tolist() == row1[:stop]


def test_top_k_one_is_greedy_and_top_p_keeps_the_nucleus():
    torch.manual_seed(0)
    logits = torch.randn(4, 30)
    assert torch.equal(sample_next(logits, 1.0, top_k=1), logits.argmax(-1, keepdim=True))
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    picks = {sample_next(probs.log(), 1.0, top_p=0.7).item() for _ in range(200)}
    assert picks == {0, 1}  # 0.5 < 0.7, 0.5 + 0.3 >= 0.7: the nucleus is the first two


def test_sampling_draws_from_the_softmax_and_respects_top_k():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -3.0], [0.0, 0.0, 3.0, 0.0, 0.0]])
    g = torch.Generator().manual_seed(0)
    picks = sample_next(logits.repeat(20_000, 1), 0.8, generator=g).view(20_000, 2)
    freq = torch.stack([torch.bincount(picks[:, r], minlength=5) for r in range(2)]).float() / 20_000
    assert (freq - torch.softmax(logits / 0.8, -1)).abs().max() < 0.015  # about 4 standard errors
    top2 = sample_next(logits[:1].repeat(1000, 1), 1.0, top_k=2, generator=g)
    assert set(top2.view(-1).tolist()) == {0, 1}  # both of the two likeliest, never another


def test_the_draw_is_the_first_token_whose_cumulative_probability_exceeds_u():
    logits = torch.tensor([0.5, 0.3, 0.2, 1e-9]).log()[None].repeat(6, 1)
    u = torch.tensor([[0.0], [0.49], [0.51], [0.79], [0.81], [0.9999]])
    assert sample_next(logits, 1.0, u=u).view(-1).tolist() == [0, 0, 1, 1, 2, 2]
    # a filtered token has probability 0: never drawn, not even at u = 0 where its cdf is 0 too (the
    # first kept token is), and u = 1 draws the last kept token
    first_out = torch.tensor([[-9.0, 1.0, 0.0, 0.5]]).repeat(2, 1)
    assert sample_next(first_out, 1.0, top_k=3, u=torch.tensor([[0.0], [1.0]])).view(-1).tolist() == [1, 3]


def test_weight_tying_counting_and_init():
    m = tiny(vocab_size=64)
    assert m.lm_head.weight is m.transformer.wte.weight
    n_emb = 64 * 32 + 16 * 32
    assert m.num_params() - m.num_params(embedding=False) == n_emb
    assert m.flops_per_token(16) == 6 * (m.num_params() - 16 * 32 - 2 * 2 * 32 - 32) + 12 * 2 * 32 * 16
    std = m.transformer.h[0].attn.c_proj.weight.std().item()
    assert 0.005 < std < 0.012  # 0.02 / sqrt(2 * n_layer) = 0.01


def test_tiny_model_overfits_a_tiny_batch():
    m = tiny(block_size=16).train()
    x = torch.randint(0, 50, (4, 17))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    for _ in range(150):
        loss = next_token_loss(m(x[:, :-1]), x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05


def test_config_rejects_heads_that_do_not_divide_width():
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(n_embd=30, n_head=4)


@pytest.mark.parametrize("kw, message", [
    ({"n_head": 0}, "n_head must be positive, got 0"),
    ({"d_ff": -1}, "d_ff must be zero or positive, got -1"),
    ({"dropout": 1.0}, "dropout must be in [0, 1), got 1.0"),
])
def test_config_rejects_an_impossible_value_in_one_line(kw, message):
    with pytest.raises(ValueError) as e:
        GPTConfig(**kw)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert GPTConfig(n_embd=32, n_head=2).d_ff == 128  # 0 = 4 * n_embd, resolved by the config itself
