"""Aggregation, clipped policy loss (token and sequence level), KL estimators and the KL reward-to-go,
IS weights and logit helpers vs hand values."""

import math

import pytest
import torch

from trainer.algorithms import (
    aggregate_loss,
    clipped_policy_loss,
    entropy_from_logits,
    get,
    kl_estimate,
    kl_reward_to_go,
    logprobs_from_logits,
    masked_mean,
    truncated_is_weights,
)

MODES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


def close(actual, expected, atol=1e-6):
    expected = torch.tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


# ----------------------------------------------------------------------------- aggregation

VALUES = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
MASK = torch.tensor([[1, 1, 0], [1, 0, 0]])


def test_aggregation_hand_values():
    close(aggregate_loss(VALUES, MASK, "token-mean"), 2.333333)  # (1+2+4)/3
    close(aggregate_loss(VALUES, MASK, "seq-mean-token-mean"), 2.75)  # ((1+2)/2 + 4/1)/2
    close(aggregate_loss(VALUES, MASK, "seq-mean-token-sum-norm"), 1.166667)  # 7/(2*3)
    close(aggregate_loss(VALUES, MASK, "seq-mean-token-sum-norm", max_response_len=7), 0.5)  # 7/14
    close(aggregate_loss(VALUES, MASK, "token-mean", num_tokens=14), 0.5)  # 7/14
    close(aggregate_loss(VALUES, MASK, "seq-mean-token-mean", num_sequences=5), 1.1)  # 5.5/5


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("junk", [1e9, float("nan"), float("inf")])
def test_aggregation_ignores_padding(mode, junk):
    dirty = torch.where(MASK.bool(), VALUES, torch.tensor(junk))
    clean = aggregate_loss(VALUES, MASK, mode)
    torch.testing.assert_close(aggregate_loss(dirty, MASK, mode), clean)


def test_aggregation_empty_rows_and_empty_mask():
    values = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    mask = torch.tensor([[True, True], [False, False]])
    close(aggregate_loss(values, mask, "seq-mean-token-mean"), 0.75)  # (1.5 + 0)/2
    close(aggregate_loss(values, mask, "token-mean"), 1.5)  # 3/2
    for mode in MODES:
        close(aggregate_loss(values, torch.zeros(2, 2), mode), 0.0)


def test_aggregation_unknown_mode():
    with pytest.raises(KeyError, match="did you mean 'seq-mean-token-mean'"):
        aggregate_loss(VALUES, MASK, "seq_mean_token_mean")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("sizes", [(3, 3), (2, 2, 2), (1, 5)])
def test_aggregation_split_equals_full(mode, sizes):
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    lengths = torch.tensor([5, 1, 3, 0, 2, 4])  # includes an empty response
    mask = torch.arange(5)[None, :] < lengths[:, None]  # [6, 5]
    counts = dict(num_sequences=6, num_tokens=int(mask.sum()), max_response_len=5)
    full = aggregate_loss(values, mask, mode, **counts)
    total = torch.zeros((), dtype=torch.float64)
    for v, m in zip(values.split(list(sizes)), mask.split(list(sizes))):
        width = max(int(m.sum(-1).max()), 1)  # each micro-batch padded only to its own longest
        total = total + aggregate_loss(v[:, :width], m[:, :width], mode, **counts)
    torch.testing.assert_close(total, full)
    # with local counts the chunks do not add up (shows the counts matter)
    chunks = zip(values.split(list(sizes)), mask.split(list(sizes)))
    local = sum(aggregate_loss(v, m, mode) for v, m in chunks)
    assert not torch.allclose(local, full)


def test_masked_mean():
    values = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    close(masked_mean(values, torch.tensor([[1, 0], [1, 1]])), 2.666667)  # (1+3+4)/3
    close(masked_mean(values, torch.zeros(2, 2, dtype=torch.bool)), 0.0)


# ----------------------------------------------------------------------------- KL

LP = torch.tensor([[-1.0, -2.0, -0.5]])
REF = torch.tensor([[-2.0, -1.0, -0.5]])  # log_ratio = [1, -1, 0]


def test_kl_estimators_hand_values():
    close(kl_estimate(LP, REF, "k1"), [[1.0, -1.0, 0.0]])
    close(kl_estimate(LP, REF, "k2"), [[0.5, 0.5, 0.0]])  # 0.5 * lr**2
    # k3 = exp(-lr) - 1 + lr: e^-1 - 1 + 1 = 0.367879; e^1 - 1 - 1 = 0.718282; 0
    close(kl_estimate(LP, REF, "k3"), [[0.367879, 0.718282, 0.0]])
    close(kl_estimate(LP, REF), [[0.367879, 0.718282, 0.0]])  # k3 is the default


def test_kl_zero_when_equal_and_k3_nonnegative():
    x = torch.linspace(-5.0, 0.0, 12).reshape(2, 6)
    for name in ("k1", "k2", "k3"):
        assert torch.equal(kl_estimate(x, x, name), torch.zeros(2, 6))
    y = torch.linspace(-6.0, 1.0, 12).reshape(2, 6).flip(-1)
    assert (kl_estimate(x, y, "k3") >= 0).all()
    assert (kl_estimate(x, y, "k2") >= 0).all()


def test_k3_clamp_keeps_it_finite():
    # log_ratio clamped to +-20: expm1(-20) + 20 = 19.0; expm1(20) - 20 = 4.851652e8
    out = kl_estimate(torch.tensor([[100.0, -100.0]]), torch.zeros(1, 2), "k3")
    assert torch.isfinite(out).all()
    close(out, [[19.0, 4.851652e8]], atol=100.0)


def test_kl_unknown_estimator():
    with pytest.raises(KeyError, match="k1"):
        kl_estimate(LP, REF, "k4")


def test_kl_reward_to_go_hand_values():
    kl = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.5, -1.0, 2.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 0]])  # row 1: a prompt position before the response
    # row 0: 1+2+3 = 6, 2+3 = 5, 3, (pad) 0; row 1: (prompt) 0, -1+2 = 1, 2, (pad) 0
    out = kl_reward_to_go(kl, mask)
    close(out, [[6.0, 5.0, 3.0, 0.0], [0.0, 1.0, 2.0, 0.0]])
    # junk off the mask never reaches a real token
    dirty = torch.where(mask.bool(), kl, torch.tensor(float("nan")))
    assert torch.equal(kl_reward_to_go(dirty, mask), out)
    # REINFORCE++'s per-token advantage, beta = 0.1, A = [1, -1]: A - beta * to-go on real tokens
    adv = torch.tensor([1.0, -1.0])[:, None] - 0.1 * out
    close(torch.where(mask.bool(), adv, 0.0), [[0.4, 0.5, 0.7, 0.0], [0.0, -1.1, -1.2, 0.0]])
    with pytest.raises(ValueError):
        kl_reward_to_go(kl, mask[:, :3])


def test_kl_reward_to_go_keeps_grad_and_float32():
    kl = torch.tensor([[0.5, 0.25]], dtype=torch.bfloat16, requires_grad=True)
    out = kl_reward_to_go(kl, torch.ones(1, 2))
    assert out.dtype == torch.float32
    out.sum().backward()  # d/dkl_s of sum_t sum_{s>=t} kl_s = number of t <= s: [1, 2]
    close(kl.grad.float(), [[1.0, 2.0]])


# ----------------------------------------------------------------------------- truncated IS


def test_truncated_is_weights():
    old = torch.tensor([[-1.0, -1.0, -3.0]], requires_grad=True)
    rollout = torch.tensor([[-1.0, -2.0, -1.0]])
    # exp(old - rollout) = [e^0, e^1, e^-2] = [1, 2.718282, 0.135335]; cap 2 truncates the middle
    w = truncated_is_weights(old, rollout)
    close(w, [[1.0, 2.0, 0.135335]])
    assert not w.requires_grad
    close(truncated_is_weights(old, rollout, cap=3.0), [[1.0, 2.718282, 0.135335]])
    with pytest.raises(ValueError):
        truncated_is_weights(old, rollout, cap=0.0)


# ----------------------------------------------------------------------------- clipped loss

OLD = torch.full((2, 3), -1.0)
RATIOS = torch.tensor([[1.0, 1.5, 0.5], [1.0, 1.5, 0.5]])
ADV = torch.tensor([1.0, -1.0])


def logprobs_for(ratios, old=OLD):
    return (old + ratios.log()).requires_grad_(True)


def test_clipped_loss_hand_values_and_metrics():
    lp = logprobs_for(RATIOS)
    loss, m = clipped_policy_loss(lp, OLD, ADV, torch.ones(2, 3))
    # clip range [0.8, 1.2]
    # A=+1: -min(r, clip r): r=1 -> -1; r=1.5 -> -1.2 (clipped); r=0.5 -> -min(0.5, 0.8) = -0.5
    # A=-1: max(r, clip r):  r=1 -> 1;  r=1.5 -> 1.5;             r=0.5 -> 0.8 (clipped)
    # token-mean: (-1 - 1.2 - 0.5 + 1 + 1.5 + 0.8)/6 = 0.6/6
    close(loss, 0.1)
    close(m["clip_frac"], 0.333333)  # 2 of 6
    close(m["ratio_mean"], 1.0)  # (1 + 1.5 + 0.5)*2/6
    close(m["ratio_max"], 1.5)
    # k3 with samples from old: r - 1 - ln r: 0; 0.5 - ln 1.5 = 0.094535; -0.5 + ln 2 = 0.193147
    # mean = 2*(0.094535 + 0.193147)/6 = 0.095894
    close(m["approx_kl_old"], 0.095894)
    assert all(not v.requires_grad and v.dim() == 0 for v in m.values())


def test_clipped_loss_gradients():
    lp = logprobs_for(RATIOS)
    loss, _ = clipped_policy_loss(lp, OLD, ADV, torch.ones(2, 3))
    loss.backward()
    # d/dlogp of -A*r is -A*r, divided by 6 tokens; clipped tokens on the binding side get 0:
    # A>0 with r=1.5 > 1.2 and A<0 with r=0.5 < 0.8. A>0 with r=0.5 is unclipped: -0.5/6.
    close(lp.grad, [[-1 / 6, 0.0, -0.5 / 6], [1 / 6, 0.25, 0.0]])


def test_per_token_advantages_match_per_sequence():
    lp = logprobs_for(RATIOS)
    per_seq, _ = clipped_policy_loss(lp, OLD, ADV, torch.ones(2, 3))
    per_tok, _ = clipped_policy_loss(lp, OLD, ADV[:, None].expand(2, 3), torch.ones(2, 3))
    torch.testing.assert_close(per_seq, per_tok)
    with pytest.raises(ValueError):
        clipped_policy_loss(lp, OLD, torch.ones(3), torch.ones(2, 3))


def test_clipped_loss_aggregation_setting_reaches_the_math():
    lp = logprobs_for(RATIOS)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    # per-token [-1, -1.2, -0.5] and [1]
    loss = {mode: clipped_policy_loss(lp, OLD, ADV, mask, aggregation=mode)[0] for mode in MODES}
    close(loss["token-mean"], -0.425)  # (-2.7 + 1)/4
    close(loss["seq-mean-token-mean"], 0.05)  # (-0.9 + 1)/2
    close(loss["seq-mean-token-sum-norm"], -0.283333)  # -1.7/(2*3)


def test_clipped_loss_ignores_padding():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    adv = torch.tensor([[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]])
    clean_lp = logprobs_for(RATIOS)
    clean, clean_m = clipped_policy_loss(clean_lp, OLD, adv, mask, is_weights=torch.ones(2, 3))
    junk = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]]).bool()
    dirty_lp = torch.where(junk, torch.tensor(50.0), RATIOS.log() + OLD).requires_grad_(True)
    dirty_old = torch.where(junk, torch.tensor(float("-inf")), OLD)
    dirty_adv = torch.where(junk, torch.tensor(float("nan")), adv)
    dirty_w = torch.where(junk, torch.tensor(float("inf")), torch.ones(2, 3))
    dirty, dirty_m = clipped_policy_loss(dirty_lp, dirty_old, dirty_adv, mask, is_weights=dirty_w)
    torch.testing.assert_close(dirty, clean)
    for name in clean_m:
        torch.testing.assert_close(dirty_m[name], clean_m[name])
    dirty.backward()
    assert torch.isfinite(dirty_lp.grad).all() and dirty_lp.grad[0, 2] == 0


def test_single_token_response():
    # r = 1.5, A = 2: -min(3.0, 1.2*2) = -2.4, clipped
    lp = logprobs_for(torch.tensor([[1.5]]), old=torch.tensor([[-0.3]]))
    for mode in MODES:
        loss, m = clipped_policy_loss(
            lp, torch.tensor([[-0.3]]), torch.tensor([2.0]), torch.ones(1, 1), aggregation=mode
        )
        close(loss, -2.4)
        close(m["clip_frac"], 1.0)
    # the same token inside a padded row: token-mean and seq-mean-token-mean unchanged
    lp4 = torch.tensor([[-0.3 + math.log(1.5), 0.0, 0.0, 0.0]])
    old4 = torch.full((1, 4), -0.3)
    loss, _ = clipped_policy_loss(lp4, old4, torch.tensor([2.0]), torch.tensor([[1, 0, 0, 0]]))
    close(loss, -2.4)


def test_clip_higher_asymmetric():
    ratios = torch.tensor([[1.25, 1.3, 0.75], [0.75, 0.85, 1.3]])
    lp = logprobs_for(ratios)
    loss, m = clipped_policy_loss(lp, OLD, ADV, torch.ones(2, 3), clip_low=0.2, clip_high=0.28)
    # range [0.8, 1.28]. A=+1: -1.25 (inside), -1.28 (clipped), -min(0.75, 0.8) = -0.75 -> -3.28
    # A=-1: max(0.75, 0.8) = 0.8 (clipped), 0.85, 1.3 -> 2.95; (-3.28 + 2.95)/6 = -0.055
    close(loss, -0.055)
    close(m["clip_frac"], 0.333333)  # 2 of 6
    # symmetric 0.2 for contrast: row 0 -> -1.2 (clipped), -1.2 (clipped), -0.75 = -3.15
    # (-3.15 + 2.95)/6 = -0.033333
    loss_sym, m_sym = clipped_policy_loss(lp, OLD, ADV, torch.ones(2, 3))
    close(loss_sym, -0.033333)
    close(m_sym["clip_frac"], 0.5)  # 3 of 6


def test_dual_clip():
    ratios = torch.tensor([[5.0, 2.0, 0.5], [5.0, 1.0, 0.5]])
    adv = torch.tensor([-1.0, 1.0])
    lp = logprobs_for(ratios)
    # A=-1: max(r, clip r) = 5, 2, 0.8 (clipped); A=+1: -1.2 (clipped), -1, -0.5
    loss, m = clipped_policy_loss(lp, OLD, adv, torch.ones(2, 3))
    close(loss, 0.85)  # (7.8 - 2.7)/6
    close(m["clip_frac"], 0.333333)
    # dual clip c=3 caps A<0 tokens at -c*A = 3: 5 -> 3 (held); 2, 0.8 unchanged; A>0 row untouched
    loss, m = clipped_policy_loss(lp, OLD, adv, torch.ones(2, 3), dual_clip=3.0)
    close(loss, 0.516667)  # (5.8 - 2.7)/6
    close(m["clip_frac"], 0.5)
    loss.backward()
    # A=-1: d(r)/dlogp = r: r=5 held -> 0, r=2 -> 2/6, r=0.5 clipped -> 0
    # A=+1: r=5 clipped -> 0, r=1 -> -1/6, r=0.5 -> -0.5/6
    close(lp.grad, [[0.0, 0.333333, 0.0], [0.0, -1 / 6, -0.5 / 6]])
    with pytest.raises(ValueError):
        clipped_policy_loss(lp, OLD, adv, torch.ones(2, 3), dual_clip=1.0)


def test_is_weights_multiply_and_stay_detached():
    lp = logprobs_for(RATIOS)
    w = torch.tensor([[1.0, 2.0, 0.5], [0.5, 1.0, 2.0]], requires_grad=True)
    loss, _ = get("policy_loss", "clipped")(lp, OLD, ADV, torch.ones(2, 3), is_weights=w)
    # [-1, -1.2, -0.5]*[1, 2, 0.5] = [-1, -2.4, -0.25]; [1, 1.5, 0.8]*[0.5, 1, 2] = [0.5, 1.5, 1.6]
    close(loss, -0.008333)  # (-3.65 + 3.6)/6
    loss.backward()
    assert w.grad is None and lp.grad is not None


# ----------------------------------------------------------------------------- logits


def test_logprobs_from_logits():
    base = torch.tensor([math.log(0.5), math.log(0.25), math.log(0.25)])
    logits = torch.stack([base + 3.0, base + 1000.0]).reshape(1, 2, 3)  # softmax is shift-invariant
    labels = torch.tensor([[0, 2]])
    # ln 0.5, ln 0.25; atol covers float32 rounding of the logits near 1000 (spacing 6e-5 there: each
    # stored logit is off by up to 3e-5, so their difference, the logprob, by up to 6e-5)
    close(logprobs_from_logits(logits, labels), [[-0.693147, -1.386294]], atol=6e-5)
    out = logprobs_from_logits(logits.bfloat16(), labels)
    assert out.dtype == torch.float32


def test_entropy_from_logits():
    logits = torch.tensor(
        [
            [[0.0, 0.0, 0.0, 0.0], [1000.0, 1000.0, -math.inf, -math.inf]],
            [
                [0.0, -math.inf, -math.inf, -math.inf],
                [math.log(0.5), math.log(0.25), math.log(0.25), -math.inf],
            ],
        ],
        requires_grad=True,
    )
    # ln 4 = 1.386294; ln 2 = 0.693147 (huge logits, -inf ignored); one-hot 0;
    # 0.5 ln 2 + 2 * 0.25 ln 4 = 1.039721
    out = entropy_from_logits(logits)
    close(out, [[1.386294, 0.693147], [0.0, 1.039721]])
    out.sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_logprobs_and_entropy_match_the_reference_functions():
    from trainer.algorithms import logprobs_and_entropy

    torch.manual_seed(0)
    logits = torch.randn(7, 11, requires_grad=True)
    labels = torch.randint(0, 11, (7,))
    lp, ent = logprobs_and_entropy(logits, labels, chunk_rows=3)  # chunks of 3, 3, 1 rows
    close(lp, logprobs_from_logits(logits[None], labels[None])[0], atol=1e-6)
    close(ent, entropy_from_logits(logits.detach()), atol=1e-5)
    assert lp.requires_grad and not ent.requires_grad
    lp.sum().backward()  # d/dlogits of sum_r (logit[label_r] - lse_r) = onehot - softmax
    close(logits.grad, torch.nn.functional.one_hot(labels, 11).float() - torch.softmax(logits.detach(), -1), atol=1e-6)
    # A row with a -inf logit (a masked-out token) takes the exact formula: no NaN.
    masked = torch.tensor([[0.0, float("-inf"), 0.0]])
    _, e = logprobs_and_entropy(masked, torch.tensor([0]))
    close(e, [0.693147], atol=1e-5)
    assert logprobs_and_entropy(logits, labels, with_entropy=False)[1] is None


# ----------------------------------------------------------------------------- GSPO (sequence level)

GSPO_MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])  # sequence 1 has 2 tokens and one padding
GSPO_LOG_RATIO = torch.tensor([[0.1, -0.2, 0.4], [0.3, -0.5, 0.0]])  # means 0.1 and -0.1


def gspo_logprobs(junk=0.0):
    lp = OLD + GSPO_LOG_RATIO
    return torch.where(GSPO_MASK.bool(), lp, torch.tensor(junk)).requires_grad_(True)


def test_gspo_sequence_ratio_hand_values_and_gradient():
    lp = gspo_logprobs()
    loss, m = clipped_policy_loss(lp, OLD, ADV, GSPO_MASK, aggregation="seq-mean-token-mean",
                                  importance_sampling_level="sequence")
    # s_0 = exp(mean(0.1, -0.2, 0.4)) = e^0.1 = 1.105171; s_1 = exp(mean(0.3, -0.5)) = e^-0.1 = 0.904837
    # both inside [0.8, 1.2]: per sequence -s_0 * 1 = -1.105171 and -s_1 * -1 = 0.904837
    # seq-mean-token-mean = mean over sequences: (-1.105171 + 0.904837)/2 = -0.100167
    close(loss, -0.100167)
    close(m["clip_frac"], 0.0)
    close(m["ratio_mean"], 1.025037)  # token-weighted: (3 * 1.105171 + 2 * 0.904837)/5
    close(m["ratio_max"], 1.105171)
    loss.backward()
    # loss = (-s_0 + s_1)/2; ds_i/dlogp_t = s_i / |y_i| on each real token:
    # row 0: -1.105171/(2*3) = -0.184195 on all three; row 1: 0.904837/(2*2) = 0.226209, padding 0
    close(lp.grad, [[-0.184195, -0.184195, -0.184195], [0.226209, 0.226209, 0.0]])


def test_gspo_clips_whole_sequences():
    lp = gspo_logprobs()
    loss, m = clipped_policy_loss(lp, OLD, ADV, GSPO_MASK, clip_low=0.2, clip_high=0.05,
                                  aggregation="seq-mean-token-mean", importance_sampling_level="sequence")
    # range [0.8, 1.05]: s_0 = 1.105171 > 1.05 with A > 0 -> -1.05, held (no gradient); s_1 unclipped
    # (-1.05 + 0.904837)/2 = -0.072582; clip_frac = 3 held tokens of 5
    close(loss, -0.072582)
    close(m["clip_frac"], 0.6)
    loss.backward()
    close(lp.grad, [[0.0, 0.0, 0.0], [0.226209, 0.226209, 0.0]])


def test_gspo_aggregation_and_per_token_advantages():
    # token-mean weighs each sequence by its length: (3 * -1.105171 + 2 * 0.904837)/5 = -0.301168
    loss, _ = clipped_policy_loss(gspo_logprobs(), OLD, ADV, GSPO_MASK, importance_sampling_level="sequence")
    close(loss, -0.301168)
    # per-token advantages take s_i * A_t: row 0 A = [1, 2, 3] -> -1.105171 * mean(1, 2, 3) = -2.210342;
    # row 1 A = [-1, -1] -> 0.904837; seq-mean-token-mean (-2.210342 + 0.904837)/2 = -0.652753
    adv = torch.tensor([[1.0, 2.0, 3.0], [-1.0, -1.0, 0.0]])
    loss, _ = clipped_policy_loss(gspo_logprobs(), OLD, adv, GSPO_MASK, aggregation="seq-mean-token-mean",
                                  importance_sampling_level="sequence")
    close(loss, -0.652753)


def test_gspo_ignores_padding():
    clean, clean_m = clipped_policy_loss(gspo_logprobs(), OLD, ADV, GSPO_MASK, importance_sampling_level="sequence")
    dirty_lp = gspo_logprobs(junk=50.0)
    dirty_old = torch.where(GSPO_MASK.bool(), OLD, torch.tensor(float("-inf")))
    dirty, dirty_m = clipped_policy_loss(dirty_lp, dirty_old, ADV, GSPO_MASK, importance_sampling_level="sequence")
    torch.testing.assert_close(dirty, clean)
    for name in clean_m:
        torch.testing.assert_close(dirty_m[name], clean_m[name])
    dirty.backward()
    assert torch.isfinite(dirty_lp.grad).all() and dirty_lp.grad[1, 2] == 0


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("options", [{}, {"clip_high": 0.28}, {"dual_clip": 3.0}])
def test_gspo_with_one_token_per_sequence_is_the_token_loss(mode, options):
    gen = torch.Generator().manual_seed(0)
    old = torch.randn(6, 3, generator=gen, dtype=torch.float64) - 2.0
    delta = 0.5 * torch.randn(6, 3, generator=gen, dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0, 0.5, -2.0, 0.0, 1.5], dtype=torch.float64)
    for mask in (torch.ones(6, 1), torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1]] * 2)):  # L = 1, or padded
        width = mask.shape[1]
        out = {}
        for level in ("token", "sequence"):
            lp = (old[:, :width] + delta[:, :width]).requires_grad_(True)
            loss, m = clipped_policy_loss(lp, old[:, :width], adv, mask, aggregation=mode,
                                          importance_sampling_level=level, **options)
            loss.backward()
            out[level] = (loss, m, lp.grad)
        (tl, tm, tg), (sl, sm, sg) = out["token"], out["sequence"]
        torch.testing.assert_close(sl, tl)
        torch.testing.assert_close(sg, tg)
        for name in tm:
            torch.testing.assert_close(sm[name], tm[name])


def test_sequence_level_differs_from_token_level_and_bad_level_raises():
    token, _ = clipped_policy_loss(gspo_logprobs(), OLD, ADV, GSPO_MASK, aggregation="seq-mean-token-mean")
    sequence, _ = clipped_policy_loss(gspo_logprobs(), OLD, ADV, GSPO_MASK, aggregation="seq-mean-token-mean",
                                      importance_sampling_level="sequence")
    assert not torch.allclose(token, sequence)  # the setting reaches the math
    with pytest.raises(ValueError, match="importance_sampling_level"):
        clipped_policy_loss(gspo_logprobs(), OLD, ADV, GSPO_MASK, importance_sampling_level="seq")


@pytest.mark.parametrize("chunk_rows", [8, 36, 37])
def test_lm_head_in_chunks_gives_the_same_logprobs_entropy_and_gradients(chunk_rows):
    """Chunked under activation checkpointing or in one block: same values, same gradients (head and hidden)."""
    from trainer.algorithms import head_logprobs_and_entropy

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(37, 16, requires_grad=True)  # R = 37 rows: the last chunk is a partial one
    labels = torch.randint(0, 50, (37,))
    weights = torch.randn(37)
    out = {}
    for k in (0, chunk_rows):
        head.zero_grad()
        hidden.grad = None
        lp, ent = head_logprobs_and_entropy(hidden, head, labels, temperature=0.7, chunk_rows=k)
        (lp * weights).sum().backward()
        out[k] = (lp.detach(), ent, hidden.grad.clone(), head.weight.grad.clone())
        assert not ent.requires_grad and lp.shape == ent.shape == (37,)
    for a, b in zip(out[0], out[chunk_rows]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # The values are the plain formula's: log_softmax(head(h) / T)[label], and its entropy.
    logits = head(hidden.detach()) / 0.7
    torch.testing.assert_close(out[chunk_rows][0], torch.log_softmax(logits, -1).gather(-1, labels[:, None]).squeeze(-1))
    assert head_logprobs_and_entropy(hidden, head, labels, with_entropy=False, chunk_rows=8)[1] is None
