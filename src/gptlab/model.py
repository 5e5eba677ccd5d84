"""The GPT network: GPT-2 exactly by default, with switchable modern pieces.

Parameter names are Hugging Face GPT-2's (``transformer.h.0.attn.c_attn.weight`` ...), stored as
``nn.Linear`` (out, in); the Conv1D transposes needed for HF checkpoints live in ``hf.py`` only.
No I/O, no printing, no distributed code, no custom kernels here: speed-ups are applied from
outside by swapping modules (``gptlab.kernels.apply_cpu_kernels``).

References: OpenAI GPT-2 (https://github.com/openai/gpt-2/blob/master/src/model.py),
nanoGPT's model.py, and for the modern switches Llama/Qwen3 in transformers and modded-nanogpt.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptlab.config import ModelConfig

IGNORE_INDEX = -1  # targets equal to this contribute nothing to the loss


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned scale (no bias, no mean subtraction)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 like Llama's reference, then cast back: bf16 mean-of-squares loses digits.
        return F.rms_norm(x.float(), (x.size(-1),), self.weight.float(), self.eps).type_as(x)


def make_norm(config: ModelConfig, dim: int | None = None) -> nn.Module:
    dim = dim or config.n_embd
    if config.norm == "rmsnorm":
        return RMSNorm(dim, config.norm_eps)
    return nn.LayerNorm(dim, eps=config.norm_eps, bias=config.bias)


def make_dropout(p: float) -> nn.Module:
    # p=0 (every recipe but fine-tuning ones) gets Identity: same output, no per-call cost in decoding.
    return nn.Dropout(p) if p > 0 else nn.Identity()


def rope_cos_sin(seq_len: int, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (seq_len, head_dim) in Llama's "rotate half" layout, computed in fp32."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    t = torch.arange(seq_len, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)  # (T, hs/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, hs)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, nh, T, hs) by position; same convention as transformers' Llama, so weights export as-is."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x * cos + rotated * sin).type_as(x)


class KVCache:
    """Preallocated keys/values for every layer, written at per-row positions.

    One path for every caller: ``input_pos`` (B, T) holds each row's absolute positions, keys/values go
    to those slots (a scatter), and attention sees the first ``kv_len`` slots under a mask that lets the
    query at position p see slots 0..p of its own row. Rows of different lengths and progress therefore
    decode in one forward, and a slot's stale contents past p (a longer earlier request) never show.
    Eager callers pass ``kv_len`` = highest written position + 1 (less work); ``kv_len=None`` attends over
    the whole buffer, so every decode step has the same shapes and no Python-int state: what
    ``torch.compile`` (CUDA graphs included) needs to capture one step and replay it.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_seq_len: int | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> None:
        self.max_seq_len = max_seq_len or config.block_size
        shape = (config.n_layer, batch_size, config.kv_heads, self.max_seq_len, config.head_dim)
        # Zeros, not empty: a masked slot still enters attention's product with weight 0, and 0 * NaN is NaN.
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    @property
    def batch_size(self) -> int:
        return self.k.size(1)

    def rows(self, start: int, stop: int) -> "KVCache":
        """A cache over rows ``start:stop`` sharing this one's storage (e.g. to prefill one row)."""
        view = object.__new__(KVCache)
        view.max_seq_len = self.max_seq_len
        view.k, view.v = self.k[:, start:stop], self.v[:, start:stop]
        return view

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, input_pos: torch.Tensor,
               kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Store (B, nkv, T, hs) at ``input_pos`` (B, T); return the first ``kv_len`` slots (B, nkv, kv_len, hs)."""
        index = input_pos[:, None, :, None].expand_as(k)  # (B, nkv, T, hs)
        self.k[layer].scatter_(2, index, k)
        self.v[layer].scatter_(2, index, v)
        if kv_len == self.max_seq_len:
            return self.k[layer], self.v[layer]
        return self.k[layer, :, :, :kv_len], self.v[layer, :, :, :kv_len]

    def mask(self, input_pos: torch.Tensor, kv_len: int | None = None) -> torch.Tensor:
        """(B, 1, T, kv_len) bool: the query at position p sees slots 0..p of its own row."""
        slots = torch.arange(kv_len or self.max_seq_len, device=input_pos.device)
        return (slots <= input_pos[:, :, None])[:, None]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_heads, config.head_dim
        # q, k, v projections in one matmul; k/v are narrower under grouped-query attention.
        self.c_attn = nn.Linear(config.n_embd, (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.residual_proj = True  # marks the 1/sqrt(2 * n_layer) init
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.norm_eps)
        self.qk_norm = config.qk_norm
        self.dropout = config.dropout
        self.resid_dropout = make_dropout(config.dropout)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                kv_cache: KVCache | None = None, input_pos: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(
            [self.n_head * self.head_dim, self.n_kv_head * self.head_dim, self.n_kv_head * self.head_dim], dim=2)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if kv_cache is not None:  # mask (B, 1, T, kv_len) from KVCache.mask: per-row positions
            k, v = kv_cache.update(self.layer_idx, k, v, input_pos, mask.size(-1))  # (B, nkv, kv_len, hs)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=kv_cache is None,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv_head != self.n_head,
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """GPT-2's MLP: c_fc, GELU (``config.gelu``: tanh as GPT-2, or erf), c_proj. The variants below change
    only the activation (and c_fc's width); :data:`MLPS` maps ``config.mlp`` to the class."""

    fc_mult = 1  # c_fc outputs fc_mult * hidden features

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        # GPT-2's GELU is the tanh approximation; nanoGPT-style checkpoints use the exact (erf) form.
        self.gelu_approximate = "tanh" if config.gelu == "tanh" else "none"
        hidden = config.hidden_dim
        self.c_fc = nn.Linear(config.n_embd, self.fc_mult * hidden, bias=config.bias)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.c_proj.residual_proj = True
        self.dropout = make_dropout(config.dropout)

    def act(self, h: torch.Tensor) -> torch.Tensor:
        return F.gelu(h, approximate=self.gelu_approximate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class ReLU2MLP(MLP):
    """Squared ReLU (Primer; modded-nanogpt)."""

    def act(self, h: torch.Tensor) -> torch.Tensor:
        return F.relu(h).square()


class SwiGLUMLP(MLP):
    """SwiGLU (Llama): gate and up projections in one matmul, c_fc outputs [gate; up]."""

    fc_mult = 2

    def act(self, h: torch.Tensor) -> torch.Tensor:
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up


MLPS: dict[str, type[MLP]] = {"gelu": MLP, "relu2": ReLU2MLP, "swiglu": SwiGLUMLP}


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = make_norm(config)
        self.mlp = MLPS[config.mlp](config)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                kv_cache: KVCache | None = None, input_pos: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), rope, kv_cache, input_pos, mask)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        V = config.padded_vocab_size
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(V, config.n_embd),
            drop=make_dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=make_norm(config),
        ))
        if config.pos_emb == "learned":
            self.transformer["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        else:
            cos, sin = rope_cos_sin(config.block_size, config.head_dim, config.rope_base)
            # Not persistent: derived from the config, rebuilt by init_weights() after meta-device init.
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.lm_head = nn.Linear(config.n_embd, V, bias=False)
        if config.tie_embeddings:
            # Weight tying (Press & Wolf 2016), as GPT-2: one matrix embeds and un-embeds.
            self.lm_head.weight = self.transformer.wte.weight
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """GPT-2 init: N(0, 0.02) weights, N(0, 0.01) positions, zero biases, residual projections
        scaled by 1/sqrt(2 * n_layer) (GPT-2 paper, section 2.3), norms at one."""
        cfg = self.config
        std = cfg.init_std
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                if getattr(module, "residual_proj", False):
                    if cfg.zero_init_proj:
                        module.weight.zero_()
                    else:
                        module.weight.normal_(0.0, std / math.sqrt(2 * cfg.n_layer), generator=generator)
                elif not (module is self.lm_head and cfg.tie_embeddings):
                    module.weight.normal_(0.0, std, generator=generator)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Embedding):
                # OpenAI's model.py: wte stddev 0.02, wpe stddev 0.01.
                module.weight.normal_(0.0, std / 2 if name.endswith("wpe") else std, generator=generator)
            elif isinstance(module, (nn.LayerNorm, RMSNorm)):
                if module.weight is not None:
                    module.weight.fill_(1.0)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
        if cfg.pos_emb == "rope":
            cos, sin = rope_cos_sin(cfg.block_size, cfg.head_dim, cfg.rope_base)
            self.rope_cos = cos.to(self.rope_cos.device)
            self.rope_sin = sin.to(self.rope_sin.device)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count (tied weights once); ``non_embedding`` drops position embeddings like nanoGPT."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and "wpe" in self.transformer:
            n -= self.transformer.wpe.weight.numel()
        return n

    def new_kv_cache(self, batch_size: int, max_seq_len: int | None = None,
                     dtype: torch.dtype | None = None) -> KVCache:
        p = self.transformer.wte.weight
        return KVCache(self.config, batch_size, max_seq_len, device=p.device, dtype=dtype or p.dtype)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *,
                kv_cache: KVCache | None = None, input_pos: torch.Tensor | None = None,
                kv_len: int | None = None, last_only: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, vocab_size) and, with ``targets`` (B, T), the mean cross-entropy.

        Without ``kv_cache`` the tokens sit at positions 0..T-1 (training, scoring). With it, ``input_pos``
        (B, T) gives every row's absolute positions, keys/values are written there, and attention runs
        over the first ``kv_len`` cache slots (None: all of them, fixed shapes); see :class:`KVCache`.
        ``last_only``: logits of the last position only (B, 1, vocab_size), for sampling.
        """
        B, T = idx.size()
        if (kv_cache is None) != (input_pos is None):
            raise ValueError("kv_cache and input_pos go together: pass both (cached decoding) or neither")
        if kv_cache is None and T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens exceeds the context window "
                             f"(block_size={self.config.block_size})")
        x = self.transformer.wte(idx)  # (B, T, C)
        rope = mask = None
        if self.config.pos_emb == "learned":
            # Without a cache positions are 0..T-1, so a slice of the table is the lookup: no index tensor,
            # and its backward is a strided add instead of an index scatter (same values, fewer kernels).
            x = x + (self.transformer.wpe.weight[:T] if kv_cache is None else self.transformer.wpe(input_pos))
        elif kv_cache is None:
            rope = (self.rope_cos[:T], self.rope_sin[:T])  # (T, hs) each
        else:
            rope = (self.rope_cos[input_pos][:, None], self.rope_sin[input_pos][:, None])  # (B, 1, T, hs) each
        x = self.transformer.drop(x)
        if kv_cache is not None:
            mask = kv_cache.mask(input_pos, kv_len)  # (B, 1, T, kv_len)
        for block in self.transformer.h:
            x = block(x, rope, kv_cache, input_pos, mask)
        x = self.transformer.ln_f(x)
        if targets is None and last_only:
            x = x[:, -1:, :]  # (B, 1, C): sampling needs one position
        logits = self.lm_head(x)  # (B, T, V_padded)
        V = self.config.vocab_size
        loss = None
        if targets is not None:
            if logits.size(-1) != V:
                # Padded rows are not tokens: give them no probability mass so the loss is
                # exactly the unpadded model's. In place is safe: the matmul's backward needs no output.
                logits[..., V:] = float("-inf")
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                                   ignore_index=IGNORE_INDEX)
        # Slice only when padded: a view as the module's output makes FSDP2 warn about in-place use.
        return (logits[..., :V] if logits.size(-1) != V else logits), loss
