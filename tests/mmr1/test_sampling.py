"""The sampler: logits processing, the equivalences the trainer relies on, seeds, progress and cancel."""

from __future__ import annotations

import pytest
import torch

from mmr1.errors import GenerationCancelled, InputError, MMR1Error
from mmr1.generation import generation_sequence
from mmr1.model import head_logits
from mmr1.prompting import batch_prefix, embed_sequence
from mmr1.sampling import (
    SEEDS,
    Modality,
    SamplingSettings,
    draw,
    policy_logprobs,
    sample_tokens,
    sampling_noise,
    sequence_logprobs,
)

SETTINGS = [
    SamplingSettings(),
    SamplingSettings(cfg_scale=1.0, temperature=0.7),
    SamplingSettings(cfg_scale=3.0, temperature=0.8, top_k=40, top_p=0.9),
]


def prefixes(mm, prompt="a red square on the beach", rows=1, reasoning=None):
    sequence = generation_sequence(mm, prompt, reasoning=reasoning)
    conditional = batch_prefix(mm, [embed_sequence(mm, sequence)] * rows)
    unconditional = batch_prefix(mm, [embed_sequence(mm, sequence, unconditional=True)] * rows)
    return conditional, unconditional


def sample(mm, settings, seed=0, rows=1, **kwargs):
    conditional, unconditional = prefixes(mm, rows=rows)
    return sample_tokens(
        mm, conditional, Modality.image(mm), mm.num_image_tokens, settings, seed, unconditional=unconditional, **kwargs
    )


@pytest.mark.parametrize(
    "kwargs",
    [{"cfg_scale": 0.5}, {"temperature": -1.0}, {"top_k": -1}, {"top_p": 0.0}, {"top_p": 1.5},
     {"cfg_scale": float("inf")}, {"temperature": float("inf")}, {"temperature": float("nan")},
     {"top_p": float("nan")}, {"cfg_scale": float("nan")}],
)
def test_settings_reject_out_of_range(kwargs):
    """Infinite guidance or temperature drew flat images; each setting is named by its field."""
    (name,) = kwargs
    with pytest.raises(InputError, match=f"^{name} must be a finite number"):
        SamplingSettings(**kwargs)


def test_seeds_outside_the_generators_64_bits_are_refused_not_wrapped():
    """Seeds were taken modulo 2**64: 2**70 drew the noise of seed 0 while records said 2**70."""
    largest = sampling_noise(SEEDS.high, rows=1, count=4, device=torch.device("cpu"))
    assert not torch.equal(largest, sampling_noise(0, rows=1, count=4, device=torch.device("cpu")))
    for seed, rows in ((2**70, 1), (2**64, 1), (-1, 1), (SEEDS.high, 2)):
        with pytest.raises(InputError, match="seed"):
            sampling_noise(seed, rows=rows, count=4, device=torch.device("cpu"))


def test_guidance_formula():
    conditional, unconditional = torch.randn(2, 3, 10).unbind(0)
    settings = SamplingSettings(cfg_scale=4.0, temperature=0.5)
    expected = ((unconditional + 4.0 * (conditional - unconditional)) / 0.5).log_softmax(-1)
    torch.testing.assert_close(policy_logprobs(torch.stack([conditional, unconditional]), settings), expected)


def test_top_k_and_top_p_truncate():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda settings: policy_logprobs(logits, settings).isfinite()[0].tolist()  # noqa: E731
    assert kept(SamplingSettings(cfg_scale=1.0, top_k=2)) == [True, True, False, False]
    assert kept(SamplingSettings(cfg_scale=1.0, top_p=0.5)) == [True, False, False, False]
    assert kept(SamplingSettings(cfg_scale=1.0, top_p=0.7)) == [True, True, False, False]
    assert kept(SamplingSettings(cfg_scale=1.0, top_p=0.96)) == [True, True, True, True]
    truncated = policy_logprobs(logits, SamplingSettings(cfg_scale=1.0, top_k=2)).exp()
    torch.testing.assert_close(truncated.sum(), torch.tensor(1.0))


def test_draw_follows_the_distribution_and_skips_truncated_tokens():
    logprobs = torch.tensor([0.5, 0.0, 0.3, 0.2, 0.0]).log().expand(20_000, -1)
    tokens = draw(logprobs, sampling_noise(seed=0, rows=1, count=20_000, device=torch.device("cpu"))[0])
    frequencies = torch.bincount(tokens, minlength=5).float() / tokens.numel()
    assert frequencies[1] == 0 and frequencies[4] == 0
    assert torch.allclose(frequencies, logprobs[0].exp(), atol=0.015)
    assert torch.equal(draw(logprobs[:2], None), torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize("settings", SETTINGS, ids=["default", "no-cfg", "truncated"])
def test_logprobs_equal_teacher_forcing(tiny_model, settings):
    mm = tiny_model
    conditional, unconditional = prefixes(mm, rows=2)
    sampled = sample_tokens(
        mm, conditional, Modality.image(mm), mm.num_image_tokens, settings, 5, unconditional=unconditional,
        return_logprobs=True,
    )
    with torch.no_grad():
        forced = sequence_logprobs(mm, conditional, sampled.tokens, Modality.image(mm), settings, unconditional)
    assert sampled.logprobs.dtype == torch.float32
    assert torch.isfinite(sampled.logprobs).all()
    torch.testing.assert_close(forced, sampled.logprobs, atol=1e-4, rtol=0)


@pytest.mark.parametrize("settings", SETTINGS[::2], ids=["default", "truncated"])
def test_cache_and_no_cache_give_identical_tokens(tiny_model, settings):
    cached = sample(tiny_model, settings, seed=3, rows=2)
    uncached = sample(tiny_model, settings, seed=3, rows=2, use_cache=False)
    assert torch.equal(cached.tokens, uncached.tokens)


def test_image_i_of_a_batch_equals_a_single_run_with_seed_plus_i(tiny_model):
    batch = sample(tiny_model, SamplingSettings(), seed=11, rows=3).tokens
    for index in range(3):
        single = sample(tiny_model, SamplingSettings(), seed=11 + index, rows=1).tokens
        assert torch.equal(batch[index], single[0])
    assert not torch.equal(batch[0], batch[1])


def test_greedy_guided_image_tokens_equal_transformers_generate(tiny_model):
    """The reference implementation: transformers' own image loop (static cache, CFG logits processor)."""
    from benchmarks.sampler import transformers_generate

    mm, count = tiny_model, 12
    conditional, unconditional = prefixes(mm)
    ours = sample_tokens(mm, conditional, Modality.image(mm), count, SamplingSettings(cfg_scale=3.0, temperature=0),
                         seed=0, unconditional=unconditional).tokens
    input_ids = generation_sequence(mm, "a red square on the beach").input_ids.unsqueeze(0)
    theirs = transformers_generate(mm, input_ids, images=1, tokens=count, cfg=3.0, temperature=0.0)
    assert torch.equal(ours, theirs)


def test_seed_reproducibility(tiny_model):
    first = sample(tiny_model, SamplingSettings(), seed=7).tokens
    assert torch.equal(first, sample(tiny_model, SamplingSettings(), seed=7).tokens)
    assert not torch.equal(first, sample(tiny_model, SamplingSettings(), seed=8).tokens)


def test_greedy_ignores_the_seed(tiny_model):
    greedy = SamplingSettings(temperature=0.0)
    assert torch.equal(sample(tiny_model, greedy, seed=1).tokens, sample(tiny_model, greedy, seed=2).tokens)


def test_progress_is_reported_per_token_with_the_tokens_so_far(tiny_model):
    calls = []
    result = sample(
        tiny_model,
        SamplingSettings(),
        progress=lambda done, total, tokens: calls.append((done, total, tokens[:, :done].clone())),
    )
    total = tiny_model.num_image_tokens
    assert [(done, count) for done, count, _ in calls] == [(step, total) for step in range(1, total + 1)]
    for done, _, so_far in calls:
        assert torch.equal(so_far, result.tokens[:, :done])


def test_cancel_stops_between_tokens(tiny_model):
    done = []
    with pytest.raises(GenerationCancelled):
        sample(
            tiny_model,
            SamplingSettings(),
            progress=lambda step, total, tokens: done.append(step),
            cancel=lambda: len(done) >= 5,
        )
    assert len(done) == 5


def test_text_sampling_stops_at_any_stop_token(tiny_model):
    """Rows finish independently at a stop token; later positions hold pad with log-prob 0."""
    mm = tiny_model
    stop, image_start, pad = mm.tokens.eos, mm.tokens.begin_of_image, mm.tokens.pad
    steps = {"count": 0}

    def head(hidden):
        steps["count"] += 1
        logits = torch.full((hidden.shape[0], mm.model.config.text_config.vocab_size), -30.0)
        logits[:, 100] = 0.0
        if steps["count"] >= 3:
            logits[0, stop] = 30.0  # row 0 stops at step 3
        if steps["count"] >= 6:
            logits[1, image_start] = 30.0  # row 1 at step 6, on the other stop token
        return logits

    conditional, _ = prefixes(mm, rows=2)
    sampled = sample_tokens(
        mm, conditional, Modality(head, mm.embed_text), 20, SamplingSettings(cfg_scale=1.0), 0,
        stop_tokens=(stop, image_start), pad_token=pad, return_logprobs=True,
    )
    assert sampled.tokens.shape == (2, 6)
    assert sampled.lengths.tolist() == [3, 6]
    assert sampled.tokens[0].tolist() == [100, 100, stop, pad, pad, pad]
    assert sampled.tokens[1, 5].item() == image_start
    assert sampled.logprobs[0, 3:].abs().sum().item() == 0.0


def test_guided_sampling_needs_the_unconditional_prefix(tiny_model):
    conditional, _ = prefixes(tiny_model)
    with pytest.raises(ValueError):
        sample_tokens(tiny_model, conditional, Modality.image(tiny_model), 4, SamplingSettings(), 0)


@pytest.mark.parametrize("other_stops_after, forwards", [(8, 8), (None, 12)], ids=["other-stops", "other-runs-on"])
def test_synced_sampling_steps_on_while_another_process_runs(tiny_model, monkeypatch, other_stops_after, forwards):
    """This process's rows stop after 3 tokens; the other process (an all_reduce stand-in) still runs: synced,
    this one keeps stepping until the other stops, never past num_tokens, and returns its unsynced result."""
    mm = tiny_model
    calls = {"head": 0, "all_reduce": 0}

    def head(hidden):
        calls["head"] += 1
        logits = torch.full((hidden.shape[0], mm.model.config.text_config.vocab_size), -30.0)
        logits[:, 100 + calls["head"]] = 0.0
        if calls["head"] >= 3:
            logits[:, mm.tokens.eos] = 30.0
        return logits

    def all_reduce(flag, op):
        calls["all_reduce"] += 1
        other_running = other_stops_after is None or calls["all_reduce"] < other_stops_after
        flag.fill_(max(int(flag), int(other_running)))

    def sample(synced):
        calls.update(head=0, all_reduce=0)
        sampled = sample_tokens(
            mm, prefixes(mm, rows=2)[0], Modality(head, mm.embed_text), 12, SamplingSettings(cfg_scale=1.0), 0,
            stop_tokens=(mm.tokens.eos,), pad_token=mm.tokens.pad, return_logprobs=True, synced=synced,
        )
        return sampled, calls["head"]

    unsynced, unsynced_forwards = sample(synced=False)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    synced, synced_forwards = sample(synced=True)
    assert (unsynced_forwards, synced_forwards) == (3, forwards)
    assert unsynced.tokens.shape == (2, 3) and unsynced.lengths.tolist() == [3, 3]
    assert torch.equal(synced.tokens, unsynced.tokens) and torch.equal(synced.lengths, unsynced.lengths)
    assert torch.equal(synced.logprobs, unsynced.logprobs)


def test_heads_give_fp32_logits_under_bf16_autocast_over_fp32_weights(tiny_model):
    """GRPO trains fp32 weights under bf16 autocast; its log-probs (and the sampler's) need fp32 logits, which
    autocast would round to bf16. A model loaded in bf16 keeps its bf16 heads."""
    hidden = torch.randn(3, tiny_model.model.config.text_config.hidden_size)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.nn.functional.linear(hidden, tiny_model.model.lm_head.weight).dtype == torch.bfloat16
        image, text = tiny_model.image_logits(hidden), tiny_model.text_logits(hidden)
    assert image.dtype == text.dtype == torch.float32
    torch.testing.assert_close(text, tiny_model.text_logits(hidden))
    bf16_head = torch.nn.Linear(hidden.shape[1], 5).to(torch.bfloat16)
    assert head_logits(bf16_head, hidden).dtype == torch.bfloat16


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("settings", SETTINGS, ids=["default", "no-cfg", "truncated"])
def test_non_finite_logits_are_refused_naming_the_token(tiny_model, settings, bad):
    """A NaN or inf logit (a broken checkpoint, an fp16 overflow) drew tokens from a NaN distribution without a
    word; now the run fails naming the first token and row, whichever half of the guided batch broke."""
    mm = tiny_model
    calls = {"head": 0}

    def head(hidden):
        calls["head"] += 1
        logits = mm.image_logits(hidden)
        if calls["head"] == 4:  # the prefill, then steps: the 4th token's logits
            logits[-1, 7] = bad  # the last row: row 1's unconditional twin when guided
        return logits

    conditional, unconditional = prefixes(mm, rows=2)
    with pytest.raises(MMR1Error, match=r"^The model's logits were NaN or infinite at token 4 of 10 \(row 1\)"):
        sample_tokens(mm, conditional, Modality(head, mm.embed_image_tokens), 10, settings, 0,
                      unconditional=unconditional)


def test_non_finite_logits_after_a_row_stopped_are_ignored(tiny_model):
    """A finished row only steps on pad tokens: its logits are never sampled, so they may be anything."""
    mm = tiny_model
    calls = {"head": 0}

    def head(hidden):
        calls["head"] += 1
        logits = torch.full((hidden.shape[0], mm.model.config.text_config.vocab_size), -30.0)
        logits[:, 100] = 0.0
        logits[0, mm.tokens.eos] = 30.0  # row 0 stops at once
        if calls["head"] >= 2:
            logits[0] = float("nan")
        logits[1, mm.tokens.eos] = 30.0 if calls["head"] >= 4 else -30.0
        return logits

    sampled = sample_tokens(mm, prefixes(mm, rows=2)[0], Modality(head, mm.embed_text), 8,
                            SamplingSettings(cfg_scale=1.0), 0, stop_tokens=(mm.tokens.eos,), pad_token=mm.tokens.pad)
    assert sampled.lengths.tolist() == [1, 4]
