"""mmr1's autoregressive sampler over input embeddings, for image tokens (with CFG) and for reasoning text.

transformers' `generate(generation_mode="image")` embeds token ids only, so it cannot see reference images; this
loop takes input embeddings instead. One decoding step is the same for both modalities: run the language model
over the new positions, apply the head, guide, temper, truncate, sample, embed the sampled token. How the model
runs (preallocated cache, compiled fixed-shape steps, no cache) is `mmr1.decoding`'s part.

The policy is defined as the distribution actually sampled from (guided, tempered, truncated logits), so the
log-probs returned here and those of `sequence_logprobs` (teacher forcing, what GRPO differentiates) agree.
Row i of a batch draws from its own generator seeded with `seed + i`, so image i of a batch equals a single run
with seed `seed + i`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import torch

from .errors import GenerationCancelled, InputError, MMR1Error
from .decoding import decoding_for
from .prompting import BatchedPrefix
from .ranges import Range

# (tokens done, tokens total, the [B, total] token buffer filled up to done): enough for bars and previews.
ProgressCallback = Callable[[int, int, torch.Tensor], None]
CancelCheck = Callable[[], bool]

# The range of each SamplingSettings field, by its name: the CLI's sampling options and training's config keys of
# the same settings check against these, so every front end accepts the same values.
SAMPLING_RANGES = {
    "cfg_scale": Range(1.0, note="1 disables guidance"),
    "temperature": Range(0.0, note="0 is greedy"),
    "top_k": Range(0, note="0 disables it"),
    "top_p": Range(0.0, 1.0, low_open=True, note="1 disables it"),
}
# Row i of a batch draws from a torch generator seeded seed + i, and those take 64-bit unsigned seeds.
SEEDS = Range(0, 2**64 - 1)


@dataclass(frozen=True)
class SamplingSettings:
    """How logits become tokens. temperature 0 means greedy; top_k 0 and top_p 1 disable truncation."""

    cfg_scale: float = 5.0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        for name, allowed in SAMPLING_RANGES.items():
            allowed.check(name, getattr(self, name))

    @property
    def guided(self) -> bool:
        return self.cfg_scale != 1.0

    @property
    def untruncated(self) -> "SamplingSettings":
        """The same guidance and temperature without top-k/top-p: where GRPO takes its KL (a truncated reference
        gives -inf to tokens the policy kept)."""
        return replace(self, top_k=0, top_p=1.0)

    def to_dict(self) -> dict:
        return asdict(self)


def policy_logprobs(logits: torch.Tensor, settings: SamplingSettings) -> torch.Tensor:
    """Log-probabilities [..., V] (fp32) of the sampled distribution from [2, ..., V] guided or [..., V] logits.

    With guidance the first index of `logits` holds the conditional and the second the unconditional logits.
    Truncated entries are -inf. Greedy (temperature 0) uses the untempered distribution.
    """
    logits = logits.float()
    if settings.guided:
        conditional, unconditional = logits[0], logits[1]
        logits = unconditional + settings.cfg_scale * (conditional - unconditional)
    if settings.temperature > 0:
        logits = logits / settings.temperature
    if settings.top_k and settings.top_k < logits.shape[-1]:
        kth = torch.topk(logits, settings.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if settings.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens before it already hold top_p of the mass; the first always stays.
        drop_sorted = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= settings.top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.log_softmax(dim=-1)


def check_seeds(name: str, seed: int, rows: int = 1) -> None:
    """Refuse a seed whose rows' seeds (seed .. seed + rows - 1) are not all in SEEDS, naming it as `name`:
    wrapped into 64 bits, seed 2**70 would draw the pixels of seed 0 while records say 2**70."""
    SEEDS.check(name, seed)
    if seed + rows - 1 > SEEDS.high:
        raise InputError(f"{name} {seed} with {rows} rows needs seeds up to {seed + rows - 1}, beyond the largest "
                         f"seed {SEEDS.high}; give a smaller seed.")


def sampling_noise(seed: int, rows: int, count: int, device: torch.device) -> torch.Tensor:
    """[rows, count] uniforms in [0, 1), row i from a generator seeded seed + i: batches reproduce single runs
    image by image, and no step needs a per-row generator call."""
    check_seeds("seed", seed, rows)
    noise = torch.empty((rows, count), dtype=torch.float32, device=device)
    for row in range(rows):
        generator = torch.Generator(device=device)
        generator.manual_seed(seed + row)
        noise[row] = torch.rand(count, generator=generator, device=device)
    return noise


def draw(logprobs: torch.Tensor, uniforms: torch.Tensor | None) -> torch.Tensor:
    """One token per row of [B, V] log-probs by inverting the CDF at the row's uniform; greedy without uniforms.

    Searching right of the uniform never lands on a zero-probability (truncated) token.
    """
    if uniforms is None:
        return logprobs.argmax(dim=-1)
    cdf = logprobs.exp().cumsum(dim=-1)
    target = (uniforms * cdf[:, -1]).unsqueeze(-1)
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp(max=logprobs.shape[-1] - 1)


def check_finite_logits(row_max: torch.Tensor, lengths: torch.Tensor) -> None:
    """Refuse a run whose logits turned NaN or inf, from each step's max log-prob per row [B, N]: a NaN or +inf
    logit makes the row's whole log-softmax NaN, as an all -inf row does, while truncated tokens are -inf but never
    the max. The steps only record the max (one reduction, no host sync); this reads them once, after the loop.
    Rows that stopped earlier are left out: they step on pad tokens that nobody samples."""
    live = torch.arange(row_max.shape[1], device=row_max.device) < lengths.unsqueeze(1)
    broken = ~torch.isfinite(row_max) & live
    if not bool(broken.any()):
        return
    rows, steps = broken.nonzero(as_tuple=True)
    first = int(steps.argmin())
    step, row, others = int(steps[first]), int(rows[first]), len(set(rows.tolist())) - 1
    raise MMR1Error(
        f"The model's logits were NaN or infinite at token {step + 1} of {row_max.shape[1]} (row {row}"
        f"{f' and {others} more rows' if others else ''}); the tokens drawn from them would be noise. "
        "Its weights hold non-finite values, or an activation overflowed in fp16 (load it in bf16 or fp32)."
    )


@dataclass
class Modality:
    """What distinguishes image from text decoding: the output head and how a sampled token is embedded."""

    head: Callable[[torch.Tensor], torch.Tensor]
    embed: Callable[[torch.Tensor], torch.Tensor]

    @classmethod
    def image(cls, mm) -> "Modality":
        return cls(mm.image_logits, mm.embed_image_tokens)

    @classmethod
    def text(cls, mm) -> "Modality":
        return cls(mm.text_logits, mm.embed_text)


@dataclass
class SampledTokens:
    tokens: torch.Tensor  # [B, N] long; after a stop token, rows hold the pad id
    logprobs: torch.Tensor | None  # [B, N] fp32 log-probs of the sampled tokens (0 after a stop)
    lengths: torch.Tensor  # [B] long, tokens up to and including the stop token


def guided_rows(prefix: BatchedPrefix, unconditional: BatchedPrefix | None) -> BatchedPrefix:
    """Conditional rows first, then their unconditional twins, as one batch for one forward pass."""
    if unconditional is None:
        return prefix
    return BatchedPrefix(
        torch.cat([prefix.embeds, unconditional.embeds]),
        torch.cat([prefix.attention_mask, unconditional.attention_mask]),
        torch.cat([prefix.position_ids, unconditional.position_ids]),
    )


@torch.no_grad()
def sample_tokens(
    mm,
    prefix: BatchedPrefix,
    modality: Modality,
    num_tokens: int,
    settings: SamplingSettings,
    seed: int,
    unconditional: BatchedPrefix | None = None,
    stop_tokens: tuple[int, ...] = (),
    pad_token: int = 0,
    use_cache: bool = True,
    return_logprobs: bool = False,
    progress: ProgressCallback | None = None,
    cancel: CancelCheck | None = None,
    synced: bool = False,
    repeats: int = 1,
) -> SampledTokens:
    """Sample `num_tokens` tokens after `prefix` (B rows); with guidance `unconditional` gives the twin rows.

    `repeats`: each prefix row stands for that many rows in a row (a prompt's images, a group's rollouts), which
    sample B x repeats rows: the prefix is prefilled once per distinct row and its KV cache broadcast, and row i
    still draws with seed + i, so the tokens are those of the prefix repeated (`decoding.repeat_rows`).

    `synced` (transformers' `synced_gpus`), when torch.distributed is initialised: a process whose rows have all
    stopped keeps stepping on pad tokens until every process's have, since under FSDP and ZeRO-3 each forward is a
    collective. What it returns is what an unsynced run returns, trimmed where its own rows stopped.
    Logits that turn NaN or inf (a broken checkpoint, an fp16 overflow) raise MMR1Error naming the token.
    """
    if settings.guided and unconditional is None:
        raise ValueError("Guided sampling needs the unconditional prefix.")
    distributed = torch.distributed
    synced = synced and bool(stop_tokens) and distributed.is_available() and distributed.is_initialized()
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}.")
    rows = guided_rows(prefix, unconditional if settings.guided else None)
    batch, device = prefix.embeds.shape[0] * repeats, rows.embeds.device
    noise = None if settings.temperature == 0 else sampling_noise(seed, batch, num_tokens, device)
    tokens = torch.full((batch, num_tokens), pad_token, dtype=torch.long, device=device)
    logprobs = torch.zeros((batch, num_tokens), dtype=torch.float32, device=device) if return_logprobs else None
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    lengths = torch.full((batch,), num_tokens, dtype=torch.long, device=device)
    row_max = torch.zeros((batch, num_tokens), dtype=torch.float32, device=device)  # for check_finite_logits
    stop_ids = torch.tensor(stop_tokens, device=device)
    stopped_at: int | None = None  # the columns kept: up to the step where this process's rows had all stopped

    decoding = decoding_for(mm, rows, num_tokens, modality.head, use_cache, repeats)
    logits = decoding.prefill()
    for step in range(num_tokens):
        if cancel is not None and cancel():
            raise GenerationCancelled("Generation was cancelled.")
        step_logprobs = policy_logprobs(logits.view(2, batch, -1) if settings.guided else logits, settings)
        row_max[:, step] = step_logprobs.amax(dim=-1)
        token = draw(step_logprobs, None if noise is None else noise[:, step])
        token = torch.where(finished, torch.full_like(token, pad_token), token)
        tokens[:, step] = token
        if logprobs is not None:
            chosen = step_logprobs.gather(-1, token.unsqueeze(-1)).squeeze(-1)
            logprobs[:, step] = torch.where(finished, torch.zeros_like(chosen), chosen)
        if stop_tokens:
            stopped = torch.isin(token, stop_ids) & ~finished
            lengths = torch.where(stopped, torch.full_like(lengths, step + 1), lengths)
            finished |= stopped
        if progress is not None:
            progress(step + 1, num_tokens, tokens)
        if stop_tokens:  # text only: a host sync per step, to end early
            if stopped_at is None and bool(finished.all()):
                stopped_at = step + 1
            running = stopped_at is None
            if synced:  # other processes may still be running: step on until none is
                flag = torch.tensor(int(running), device=device)
                distributed.all_reduce(flag, op=distributed.ReduceOp.MAX)
                running = bool(flag)
            if not running:
                break
        if step + 1 < num_tokens:
            step_embeds = modality.embed(token.repeat(2 if settings.guided else 1)).unsqueeze(1)
            logits = decoding.step(step_embeds.to(rows.embeds.dtype))
    check_finite_logits(row_max, lengths)
    if stopped_at is not None:
        tokens, logprobs = tokens[:, :stopped_at], None if logprobs is None else logprobs[:, :stopped_at]
    return SampledTokens(tokens, logprobs, lengths)


def sequence_logits(
    mm,
    prefix: BatchedPrefix,
    tokens: torch.Tensor,
    modality: Modality,
    guided: bool,
    unconditional: BatchedPrefix | None = None,
) -> torch.Tensor:
    """The head's logits at every position of `tokens` after `prefix`, teacher-forced in one forward pass:
    [2, B, N, V] with guidance (conditional rows, then their unconditional twins), else [B, N, V].

    Differentiable (no inference mode): GRPO scores the same forward under several settings (`token_logprobs`).
    """
    rows = guided_rows(prefix, unconditional if guided else None)
    batch, count = tokens.shape
    repeat = 2 if guided else 1
    fed = modality.embed(tokens[:, :-1].repeat(repeat, 1)).to(rows.embeds.dtype)
    embeds = torch.cat([rows.embeds, fed], dim=1)
    attention_mask = torch.cat([rows.attention_mask, rows.attention_mask.new_ones(rows.embeds.shape[0], count - 1)], 1)
    steps = torch.arange(1, count, device=rows.position_ids.device)
    position_ids = torch.cat([rows.position_ids, rows.position_ids[:, -1:] + steps], dim=1)
    hidden = mm.language_model(
        inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state[:, -count:]
    logits = modality.head(hidden)
    return logits.view(2, batch, count, -1) if guided else logits


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, settings: SamplingSettings) -> torch.Tensor:
    """[B, N] log-probs of `tokens` under the distribution `settings` makes of `sequence_logits`' output."""
    return policy_logprobs(logits, settings).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def sequence_logprobs(
    mm,
    prefix: BatchedPrefix,
    tokens: torch.Tensor,
    modality: Modality,
    settings: SamplingSettings,
    unconditional: BatchedPrefix | None = None,
) -> torch.Tensor:
    """Teacher-forced log-probs [B, N] of `tokens` after `prefix` under the sampled policy, in one forward pass."""
    logits = sequence_logits(mm, prefix, tokens, modality, settings.guided, unconditional)
    return token_logprobs(logits, tokens, settings)
