"""Token-budget micro-batches packed into one row: the layout changes no number. On a tiny random Llama with
grouped-query attention and tied embeddings (in process, no DeepSpeed), the trainer's loss, its gradient and
the critic's values are the same packed as padded, with transformers' masked kernels and with the per-sequence
``sdpa_varlen``; a model whose attention crosses packed sequences is refused."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

from trainer.attention import ATTENTION, sdpa_varlen
from trainer.batching import collate, token_budget_bins
from trainer.config import AlgorithmConfig, TrainerConfig
from trainer.critic import ValueModel
from trainer.engine import check_packing, forward_packed_or_padded, unpack
from trainer.policies import PolicySpec
from trainer.policy_trainer import PolicyTrainer
from trainer.stats import Stats, reduce_stats
from trainer.setup import TrainerSetup
from trainer.types import TrainBatch


def tiny_llama(attn: str = "sdpa", seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=64)
    cfg._attn_implementation = attn
    return LlamaForCausalLM(cfg).eval()


def ragged_batch(n: int = 7, seed: int = 0) -> TrainBatch:
    """Prompts of 2-6 tokens and responses of 1-9 (lengths vary widely, as sampled ones do), one loss-masked token."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(1, 40) for _ in range(rng.randint(2, 6))] for _ in range(n)]
    responses = [[rng.randrange(1, 40) for _ in range(rng.randint(1, 9))] for _ in range(n)]
    loss_mask = [[1] * len(r) for r in responses]
    loss_mask[2][0] = 0
    return TrainBatch(prompt_token_ids=prompts, response_token_ids=responses, advantages=[rng.uniform(-1, 1) for _ in range(n)],
                      rollout_logprobs=[[-rng.uniform(0.5, 3) for _ in r] for r in responses], loss_mask=loss_mask,
                      num_sequences=n, num_tokens=sum(map(sum, loss_mask)))


def test_packed_index_points_at_each_rows_tokens():
    batch = ragged_batch()
    mb = collate(batch, pad_id=0, device="cpu", packed=True)
    lengths = [len(p) + len(r) for p, r in zip(batch.prompt_token_ids, batch.response_token_ids)]
    assert mb["packed_input_ids"].shape == (1, sum(lengths))
    assert mb["packed_position_ids"][0].tolist() == [t for n in lengths for t in range(n)]
    for i, n in enumerate(lengths):  # position t of row i in the packed row holds the same token as in the padded row
        packed_tokens = mb["packed_input_ids"][0][mb["packed_index"][i, : n - 1]]
        assert packed_tokens.tolist() == mb["input_ids"][i, : n - 1].tolist()


@pytest.mark.parametrize("attn", ["sdpa", "eager", ATTENTION])
def test_decoder_output_is_the_same_packed_or_padded(attn):
    model = tiny_llama(attn)
    batch = ragged_batch()
    padded, packed = (collate(batch, 0, "cpu", packed=p) for p in (False, True))
    mask = padded["response_mask"].bool()
    with torch.no_grad():
        a = unpack(forward_packed_or_padded(model.get_decoder(), padded).last_hidden_state, padded)[mask]
        b = unpack(forward_packed_or_padded(model.get_decoder(), packed).last_hidden_state, packed)[mask]
    assert (a - b).abs().max() < 1e-5
    check_packing(model)  # accepted


def bare_trainer(model, budget: int, micro_batch_size: int = 3) -> PolicyTrainer:
    """A PolicyTrainer around a plain model (no DeepSpeed): enough for its micro-batching and loss."""
    t = PolicyTrainer.__new__(PolicyTrainer)
    t.setup = TrainerSetup(policy=PolicySpec(kind="full", base_model=""), dtype="float32", max_response_len=9,
                           trainer=TrainerConfig(), algorithm=AlgorithmConfig(), temperature=0.7)
    t.cfg = TrainerConfig(micro_batch_size=micro_batch_size, max_tokens_per_micro_batch=budget)
    t.alg, t.engine, t.pad_id, t.device = AlgorithmConfig(loss_aggregation="seq-mean-token-mean"), model, 0, torch.device("cpu")
    return t


@pytest.mark.parametrize("budget,attn", [(16, "sdpa"), (40, "sdpa"), (16, ATTENTION), (40, ATTENTION)])
def test_trainer_loss_and_gradient_are_the_same_packed(budget, attn):
    batch = ragged_batch(n=8)
    counts = dict(num_sequences=batch.num_sequences, num_tokens=batch.num_tokens, max_response_len=9)
    results = []
    for b in (0, budget):
        model = tiny_llama(attn if b else "sdpa")
        trainer = bare_trainer(model, b)
        micro = trainer._micro_batches(batch, num=2)
        stats = Stats()
        for _, mb in micro:
            trainer._micro_batch_loss(mb, counts, stats).backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters()])
        trainer.engine = SimpleNamespace(module=model, eval=model.eval)  # what compute_logprobs reads of an engine
        results.append((reduce_stats([stats]), grads, len(micro), trainer.compute_logprobs(batch)))
    (padded, g0, n0, lp0), (packed, g1, n1, lp1) = results
    assert n0 == 2 and n1 >= 2  # at least the count asked for; as many as the budget needs
    assert packed["loss"] == pytest.approx(padded["loss"], abs=1e-6)
    assert packed["entropy"] == pytest.approx(padded["entropy"], rel=1e-5)
    assert packed["tokens"] == padded["tokens"] == sum(map(len, batch.response_token_ids)) - 1  # one loss-masked token
    assert (g1 - g0).abs().max() <= 1e-5 * g0.abs().max()
    # Scoring returns every row in batch order however it was cut.
    assert [len(r) for r in lp1] == [sum(m) for m in batch.loss_mask]  # the tokens the loss trains
    assert max(abs(x - y) for r0, r1 in zip(lp0, lp1) for x, y in zip(r0, r1)) < 1e-5


@pytest.mark.parametrize("attn", ["sdpa", ATTENTION])
def test_critic_values_are_the_same_packed(attn):
    value_model = ValueModel(tiny_llama(attn)).eval()
    batch = ragged_batch()
    padded, packed = (collate(batch, 0, "cpu", packed=p) for p in (False, True))
    with torch.no_grad():
        a, b = (unpack(forward_packed_or_padded(value_model, mb), mb) for mb in (padded, packed))
    mask = padded["response_mask"].bool()
    assert (a[mask] - b[mask]).abs().max() < 1e-5


def test_every_bin_is_within_the_budget_and_every_row_is_in_one():
    rng = random.Random(3)
    lengths = [rng.randint(1, 30) for _ in range(50)]
    for unit in (1, 2):
        for min_bins in (1, 20, 30):
            bins = token_budget_bins(lengths, 32, unit=unit, min_bins=min_bins)
            assert sorted(r for b in bins for r in b) == list(range(50))
            assert len(bins) >= min_bins
            assert all(sum(lengths[r] for r in b) <= 32 or len(b) == unit for b in bins)
            assert all(len(b) % unit == 0 for b in bins)  # pairs stay together


class CrossingAttention(torch.nn.Module):
    """A model that drops position ids and masks: its attention runs across packed sequences."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None, **attention_kwargs):
        return self.inner(input_ids=input_ids)


def test_a_model_that_mixes_packed_sequences_is_refused():
    with pytest.raises(ValueError, match="max_tokens_per_micro_batch=0"):
        check_packing(CrossingAttention(tiny_llama()))


def test_packing_is_refused_for_offline_dpo():
    from rl.config import RecipeError, load_recipe

    with pytest.raises((RecipeError, ValueError), match="max_tokens_per_micro_batch"):
        load_recipe(None, ["algorithm.name=dpo", "trainer.max_tokens_per_micro_batch=256"], check_paths=False)


@pytest.mark.parametrize("kernel,budget,loaded", [(None, 16, ATTENTION), (None, 0, "sdpa"), ("sdpa", 16, "sdpa"),
                                                   ("eager", 16, "eager"), (ATTENTION, 16, ATTENTION)])
def test_the_trainer_loads_the_attention_kernel_the_recipe_names(tmp_path, kernel, budget, loaded):
    """Unset, packed micro-batches get the per-sequence kernel; a kernel the recipe names is kept."""
    tiny_llama().save_pretrained(tmp_path)
    trainer = bare_trainer(None, budget=budget)
    trainer.cfg = TrainerConfig(max_tokens_per_micro_batch=budget, attn_implementation=kernel)
    model = trainer._load(str(tmp_path))
    assert model.config._attn_implementation == loaded
    check_packing(model)  # packed sequences stay apart with every kernel


def reference_attention(q, k, v, scale):
    """Causal softmax attention written out: q [heads, T, d], k/v [kv_heads, T, d] -> [T, heads, d]."""
    k, v = (x.repeat_interleave(q.shape[0] // x.shape[0], dim=0) for x in (k, v))
    scores = q @ k.transpose(1, 2) * scale
    scores = scores.masked_fill(torch.ones(q.shape[1], q.shape[1], dtype=torch.bool).triu(1), float("-inf"))
    return (scores.softmax(-1) @ v).transpose(0, 1)


def test_sdpa_varlen_attends_within_each_sequence_only():
    torch.manual_seed(0)
    lengths, heads, kv_heads, d = [3, 1, 5], 4, 2, 8
    q, k, v = torch.randn(1, heads, 9, d), torch.randn(1, kv_heads, 9, d), torch.randn(1, kv_heads, 9, d)
    module = SimpleNamespace(is_causal=True)
    out, weights = sdpa_varlen(module, q, k, v, None, scaling=0.3, cu_seq_lens_q=torch.tensor([0, 3, 4, 9], dtype=torch.int32))
    assert out.shape == (1, 9, heads, d) and weights is None
    start = 0
    for n in lengths:  # each sequence's output is its own attention, as if alone in the row
        expected = reference_attention(q[0, :, start:start + n], k[0, :, start:start + n], v[0, :, start:start + n], 0.3)
        assert (out[0, start:start + n] - expected).abs().max() < 1e-5
        start += n


class DeviceBounds(torch.Tensor):
    """Boundaries that may not be read back to the host (as reading them from a GPU costs a sync in every layer)."""

    def tolist(self):
        raise AssertionError("the kernel read the boundaries from the device")


def test_sdpa_varlen_slices_by_the_host_bounds_the_forward_passes():
    from trainer.engine import sequence_bounds

    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 9, 8), torch.randn(1, 2, 9, 8), torch.randn(1, 2, 9, 8)
    cu = torch.tensor([0, 3, 4, 9], dtype=torch.int32)
    bounds = sequence_bounds(cu)
    assert bounds["packed_bounds"] == (0, 3, 4, 9) and bounds["max_length_q"] == 5
    on_device = cu.as_subclass(DeviceBounds)
    out, _ = sdpa_varlen(SimpleNamespace(is_causal=True), q, k, v, None, scaling=0.3,
                         **{**bounds, "cu_seq_lens_q": on_device, "cu_seq_lens_k": on_device})
    expected, _ = sdpa_varlen(SimpleNamespace(is_causal=True), q, k, v, None, scaling=0.3, cu_seq_lens_q=cu)
    assert torch.equal(out, expected)


def test_sdpa_varlen_leaves_sliding_windows_to_the_mask():
    """A kernel argument this one does not implement goes to transformers' sdpa with the mask it was given."""
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)
    keep_first_only = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    keep_first_only[..., 0] = True
    out, _ = sdpa_varlen(SimpleNamespace(is_causal=True, num_key_value_groups=1), q, k, v, keep_first_only, scaling=1.0,
                         cu_seq_lens_q=torch.tensor([0, 4], dtype=torch.int32), sliding_window=2)
    assert (out - v[0, :, :1].transpose(0, 1)).abs().max() < 1e-6  # the mask was applied: every query reads key 0
