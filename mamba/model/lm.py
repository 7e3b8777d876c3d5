"""The Mamba language model: token embedding, a stack of Mamba-1 or Mamba-2 blocks (or, in a
hybrid, attention blocks at attn_layer_idx, and a gated MLP after every mixer with d_intermediate),
final norm, LM head.

Structure, parameter names and initialisation follow mamba-ssm 2.x's `MambaLMHeadModel` and
`MixerModel` (`mamba_ssm/models/mixer_seq_simple.py`) with rms_norm=True, residual_in_fp32=True,
ssm_cfg {"layer": "Mamba1" | "Mamba2"}, attn_layer_idx, attn_cfg and d_intermediate, so state dicts
load into mamba-ssm (and, pure Mamba with `backbone.embedding` renamed `backbone.embeddings`, into
HF transformers' `MambaForCausalLM` / `Mamba2ForCausalLM`).

Document isolation: packed windows hold several documents; given `position_ids` (each token's
position inside its document), the tokens at position 0 start a document, and every mixer
restarts its conv and SSM state there (an attention mixer attends within the document only, its
rotary positions restarting), so a document never sees its predecessor.

Recurrent inference: `allocate_inference_cache(batch)` gives every layer's empty state ((conv_state,
ssm_state), or an attention layer's KV cache) and `step(tokens, cache)` feeds one token per sequence through the same modules
(each mixer's own `step`, `Block.step`), as mamba-ssm; model/generation.py loops and samples.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import get_args

import torch
from torch import nn

from mamba.config.schema import KernelMode, SsmLayer
from mamba.model.attention import MHA
from mamba.model.block import Block
from mamba.model.loss import DEFAULT_CHUNK_SIZE, chunked_cross_entropy
from mamba.model.mamba1 import Mamba
from mamba.model.mamba2 import Mamba2
from mamba.model.mamba3 import Mamba3
from mamba.model.mlp import GatedMLP
from mamba.model.ops import kernels
from mamba.model.ops.rms_norm import RMSNorm


@dataclass
class MambaConfig:
    """Architecture and initialisation of a Mamba LM (mamba-ssm's names and defaults)."""

    d_model: int
    """Width of the residual stream."""
    n_layer: int
    """Number of Mamba blocks."""
    vocab_size: int
    """Tokenizer vocabulary size (before padding)."""
    ssm_layer: SsmLayer = "mamba1"
    """Mixer: "mamba1" (selective scan), "mamba2" (SSD, multi-head) or "mamba3" (SISO, mamba3.py)."""
    d_state: int = 16
    """SSM state size N per channel (mamba-ssm's Mamba-2 default is 128)."""
    d_conv: int = 4
    """Taps of the causal depthwise convolution."""
    expand: int = 2
    """d_inner = expand * d_model."""
    dt_rank: int | str = "auto"
    """Rank of the dt projection; "auto" = ceil(d_model / 16)."""
    dt_min: float = 0.001
    """Smallest initial step size dt (log-uniform between dt_min and dt_max)."""
    dt_max: float = 0.1
    """Largest initial step size dt."""
    dt_init_floor: float = 1e-4
    """Initial dt values are clamped below at this."""
    headdim: int = 64
    """Mamba-2: channels per head P; nheads = expand * d_model / headdim."""
    ngroups: int = 1
    """Mamba-2: groups of heads sharing B and C (and one gated-norm group each)."""
    chunk_size: int = 256
    """Mamba-2: chunk length Q of the SSD scan (changes rounding only, not the result)."""
    A_init_range: tuple = (1.0, 16.0)
    """Mamba-2: A ~ U(A_init_range) per head at init (A_log = log A)."""
    rope_fraction: float = 0.5
    """Mamba-3: fraction of B's and C's d_state channels rotated by the data-dependent angles (0.5 or 1.0)."""
    A_floor: float = 1e-4
    """Mamba-3: the data-dependent decay rate is clamped to A <= -A_floor."""
    is_outproj_norm: bool = False
    """Mamba-3: per-head RMSNorm of the scan output before the silu(z) gate (adds norm.weight)."""
    is_mimo: bool = False
    """Mamba-3: multi-input, multi-output form of rank mimo_rank (adds mimo_x, mimo_z, mimo_o)."""
    mimo_rank: int = 4
    """Mamba-3 with is_mimo: R inputs and outputs per token through one state."""
    kernels: KernelMode = "auto"
    """"auto" | "torch" | "cuda": mamba-ssm's CUDA kernels or the torch ops (ops/kernels.py)."""
    norm_eps: float = 1e-5
    """Epsilon of every RMSNorm."""
    pad_vocab_size_multiple: int = 8
    """Embedding and head rows are padded up to a multiple of this."""
    tie_embeddings: bool = True
    """Share the input embedding matrix with the LM head."""
    residual_in_fp32: bool = True
    """Keep the residual stream in float32 when the blocks compute in lower precision."""
    initializer_range: float = 0.02
    """Standard deviation of the embedding init."""
    rescale_prenorm_residual: bool = True
    """Divide each out_proj init by sqrt(n_layer) (GPT-2 style depth scaling)."""
    document_isolation: bool = True
    """Reset conv and SSM state where position_ids == 0 (a document start)."""
    loss_chunk_size: int = DEFAULT_CHUNK_SIZE
    """Tokens per chunk of the training loss (mamba/model/loss.py): memory only, same result."""
    attn_layer_idx: tuple = ()
    """Layers that are attention (MHA) instead of ssm_layer: a hybrid model."""
    attn_cfg: dict = field(default_factory=dict)
    """MHA's keyword arguments (num_heads, num_heads_kv, head_dim, rotary_emb_dim, ...)."""
    d_intermediate: int = 0
    """Hidden width of the gated MLP after every mixer; 0: none."""

    @property
    def n_residuals_per_layer(self) -> int:
        """Residual branches per layer: the mixer, and the MLP if any (mamba-ssm's init scaling)."""
        return 2 if self.d_intermediate > 0 else 1

    @property
    def padded_vocab_size(self) -> int:
        """vocab_size rounded up to a multiple of pad_vocab_size_multiple (mamba-ssm)."""
        return self.vocab_size + (-self.vocab_size % self.pad_vocab_size_multiple)


# Recurrent state of the whole model: per layer, its mixer's state tuple (Mamba: (conv_state,
# ssm_state); attention: its KV cache, and conv state with attn_cfg.d_conv).
InferenceCache = list[tuple]


def make_mixer(config: MambaConfig, layer_idx: int) -> nn.Module:
    """Layer `layer_idx`'s mixer: attention if config.attn_layer_idx lists it, else the kind
    config.ssm_layer names, with the config's hyper-parameters."""
    c = config
    if layer_idx in c.attn_layer_idx:
        return MHA(c.d_model, **c.attn_cfg, kernels_mode=c.kernels)
    common = dict(d_state=c.d_state, d_conv=c.d_conv, expand=c.expand, dt_min=c.dt_min,
                  dt_max=c.dt_max, dt_init_floor=c.dt_init_floor, kernels_mode=c.kernels)
    if c.ssm_layer == "mamba1":
        return Mamba(c.d_model, dt_rank=c.dt_rank, **common)
    if c.ssm_layer == "mamba2":
        return Mamba2(c.d_model, headdim=c.headdim, ngroups=c.ngroups, chunk_size=c.chunk_size,
                      A_init_range=c.A_init_range, norm_eps=c.norm_eps, **common)
    if c.ssm_layer == "mamba3":  # no conv: d_conv does not apply
        return Mamba3(c.d_model, d_state=c.d_state, expand=c.expand, headdim=c.headdim, ngroups=c.ngroups,
                      rope_fraction=c.rope_fraction, dt_min=c.dt_min, dt_max=c.dt_max,
                      dt_init_floor=c.dt_init_floor, A_floor=c.A_floor, is_outproj_norm=c.is_outproj_norm,
                      is_mimo=c.is_mimo, mimo_rank=c.mimo_rank,
                      chunk_size=c.chunk_size, kernels_mode=c.kernels)
    raise ValueError(f"ssm_layer={c.ssm_layer!r}: choose one of {get_args(SsmLayer)}")


class MixerModel(nn.Module):
    """mamba-ssm's backbone: embedding -> n_layer Blocks -> norm_f. (batch, L) ids -> (batch, L, d)."""

    def __init__(self, config: MambaConfig):
        super().__init__()
        d = config.d_model
        self.embedding = nn.Embedding(config.padded_vocab_size, d)
        self.layers = nn.ModuleList(
            Block(
                d,
                mixer=make_mixer(config, i),
                norm=RMSNorm(d, eps=config.norm_eps),
                residual_in_fp32=config.residual_in_fp32,
                kernels_mode=config.kernels,
                mlp=GatedMLP(d, config.d_intermediate) if config.d_intermediate > 0 else None,
                norm2=RMSNorm(d, eps=config.norm_eps) if config.d_intermediate > 0 else None,
            )
            for i in range(config.n_layer)
        )
        self.norm_f = RMSNorm(d, eps=config.norm_eps)
        self.residual_in_fp32, self.kernels_mode = config.residual_in_fp32, config.kernels

    def forward(self, input_ids: torch.Tensor, reset: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (batch, L) int64; reset (batch, L) bool document starts or None."""
        hidden_states, residual = self.embedding(input_ids), None
        for layer in self.layers:
            hidden_states, residual = layer(hidden_states, residual, reset=reset)
        if kernels.use_cuda(self.kernels_mode, hidden_states, "add+norm"):
            return kernels.add_rms_norm(hidden_states, residual, self.norm_f.weight, self.norm_f.eps,
                                        self.residual_in_fp32, prenorm=False)
        return self.close_residual(hidden_states, residual)

    def close_residual(self, hidden_states: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        """The torch final norm_f(hidden + residual) that ends the prenorm stream (block.py)."""
        residual = hidden_states if residual is None else hidden_states + residual
        return self.norm_f(residual.to(dtype=self.norm_f.weight.dtype))

    def allocate_inference_cache(self, batch: int) -> InferenceCache:
        """Every layer's empty state (mixer.allocate_inference_cache), on the embedding's device, in at least float32."""
        weight = self.embedding.weight
        return [layer.mixer.allocate_inference_cache(batch, weight.device, weight.dtype) for layer in self.layers]

    def step(self, tokens: torch.Tensor, cache: InferenceCache) -> torch.Tensor:
        """One token per sequence: tokens (batch,) int64 -> final hidden (batch, d); updates cache in place."""
        hidden_states, residual = self.embedding(tokens), None
        for layer, layer_cache in zip(self.layers, cache):
            hidden_states, residual = layer.step(hidden_states, residual, layer_cache)
        return self.close_residual(hidden_states, residual)


class LMHead(nn.Linear):
    """The bias-free output projection d_model -> padded_vocab_size (parameter `lm_head.weight`).

    forward(hidden) gives logits; forward(hidden, labels) gives the mean cross-entropy over the
    real vocabulary (the first `vocab_size` rows) without materialising the logits
    (mamba/model/loss.py). The loss must run inside this module's forward, not read `.weight`
    from outside: FSDP2 gathers a unit's sharded parameters in its forward hook, so a weight
    touched outside a forward call would still be a shard.
    """

    def __init__(self, d_model: int, padded_vocab_size: int, vocab_size: int,
                 loss_chunk_size: int = DEFAULT_CHUNK_SIZE):
        super().__init__(d_model, padded_vocab_size, bias=False)
        self.vocab_size = vocab_size
        self.loss_chunk_size = loss_chunk_size

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if labels is None:
            return super().forward(hidden)  # (..., padded_vocab_size)
        return chunked_cross_entropy(hidden, self.weight, labels, vocab_size=self.vocab_size,
                                     chunk_size=self.loss_chunk_size)


class MambaLMHeadModel(nn.Module):
    """Mamba causal LM: forward(input_ids, position_ids=None, labels=None).

    Without labels it returns logits (batch, L, padded_vocab_size), a plain tensor (no output
    object); with labels (batch, L; -100 = no loss) it returns the scalar mean next-token loss,
    computed chunk by chunk so training never holds the full logits.
    """

    def __init__(self, config: MambaConfig):
        super().__init__()
        kernels.check_mode(config.kernels)
        if config.kernels == "cuda":
            kernels.require_cuda_kernels()  # fail at build time, not at the first batch
        self.config = config
        self.backbone = MixerModel(config)
        self.lm_head = LMHead(config.d_model, config.padded_vocab_size, config.vocab_size, config.loss_chunk_size)
        self.init_weights()

    def tie_weights(self) -> None:
        """Make lm_head.weight the embedding's Parameter object (when tie_embeddings)."""
        if self.config.tie_embeddings:
            self.lm_head.weight = self.backbone.embedding.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialise every parameter as mamba-ssm does; also re-ties the head.

        Works on a model materialised from the meta device (`to_empty`), where it is the only
        initialisation: `to_empty` creates new Parameter objects, which breaks the tie and drops
        the `_no_weight_decay` flags, so both are restored here. The result has mamba-ssm's
        distribution: each module's own init (`Mamba.reset_parameters`, RMSNorm weight = 1), then
        `_init_weights` (mixer_seq_simple.py): embedding ~ N(0, initializer_range^2), Linear
        biases zero (done in the mixers), and with rescale_prenorm_residual the kaiming_uniform(a=
        sqrt(5)) init of every residual branch's last matrix (mixer out_proj, MLP fc2) divided by
        sqrt(n_residuals_per_layer * n_layer), n_residuals_per_layer = 2 with MLPs, else 1
        (GPT-2's residual scaling); the same for Mamba-1, Mamba-2 and attention mixers.
        """
        self.tie_weights()
        config = self.config
        nn.init.normal_(self.backbone.embedding.weight, std=config.initializer_range)
        scale = math.sqrt(config.n_residuals_per_layer * config.n_layer)
        for layer in self.backbone.layers:
            layer.norm.reset_parameters()
            layer.mixer.reset_parameters()  # draws out_proj with kaiming_uniform(a=sqrt(5))
            last = [layer.mixer.out_proj.weight]
            if layer.mlp is not None:
                layer.norm2.reset_parameters()
                layer.mlp.reset_parameters()
                last.append(layer.mlp.fc2.weight)
            if config.rescale_prenorm_residual:
                for weight in last:
                    weight.div_(scale)
        self.backbone.norm_f.reset_parameters()
        if not config.tie_embeddings:
            self.lm_head.reset_parameters()  # nn.Linear's default, untouched by `_init_weights`

    def document_starts(self, position_ids: torch.Tensor | None) -> torch.Tensor | None:
        """(batch, L) bool, True where a document starts (its position is 0); None = no resets."""
        if position_ids is None or not self.config.document_isolation:
            return None
        return position_ids == 0

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids, position_ids, labels (batch, L) int64 -> logits or the loss (class doc)."""
        hidden = self.backbone(input_ids, reset=self.document_starts(position_ids))  # (batch, L, d)
        return self.lm_head(hidden, labels)

    def allocate_inference_cache(self, batch: int) -> InferenceCache:
        """Zero recurrent state for `batch` sequences (an empty context), one (conv_state,
        ssm_state) per layer; `step` updates it in place."""
        return self.backbone.allocate_inference_cache(batch)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, cache: InferenceCache) -> torch.Tensor:
        """Feed one token per sequence: tokens (batch,) int64 -> logits (batch, padded_vocab_size).

        The prompt goes through the same step (prefill costs one step per token); in float64 the
        logits equal `forward`'s to rounding (tests/model/test_generation.py).
        """
        return self.lm_head(self.backbone.step(tokens, cache))

    def num_parameters(self, exclude_embedding: bool = False) -> int:
        """Parameter count, tied weights once; exclude_embedding leaves out the token embedding
        table (as HF's `num_parameters(exclude_embeddings=True)`; an untied head still counts).
        """
        total = sum(p.numel() for p in self.parameters())  # parameters() yields shared ones once
        if exclude_embedding:
            total -= self.backbone.embedding.weight.numel()
        return total
