"""The Mamba language model: token embedding, a stack of Mamba-1 blocks, final norm, LM head.

Structure, parameter names and initialisation follow mamba-ssm 2.x's `MambaLMHeadModel` and
`MixerModel` (`mamba_ssm/models/mixer_seq_simple.py`) for a Mamba-1 model with rms_norm=True,
residual_in_fp32=True and no MLP, so state dicts load into mamba-ssm (and, with
`backbone.embedding` renamed `backbone.embeddings`, into HF transformers' `MambaForCausalLM`).

Document isolation: packed windows hold several documents; given `position_ids` (each token's
position inside its document), the tokens at position 0 start a document, and every mixer
restarts its conv and SSM state there, so a document never sees its predecessor.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from mamba.model.block import Block
from mamba.model.mamba1 import Mamba
from mamba.model.ops.rms_norm import RMSNorm


@dataclass
class MambaConfig:
    """Architecture and initialisation of a Mamba-1 LM (mamba-ssm's names and defaults)."""

    d_model: int
    """Width of the residual stream."""
    n_layer: int
    """Number of Mamba blocks."""
    vocab_size: int
    """Tokenizer vocabulary size (before padding)."""
    d_state: int = 16
    """SSM state size N per channel."""
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

    @property
    def padded_vocab_size(self) -> int:
        """vocab_size rounded up to a multiple of pad_vocab_size_multiple (mamba-ssm)."""
        return self.vocab_size + (-self.vocab_size % self.pad_vocab_size_multiple)


class MixerModel(nn.Module):
    """mamba-ssm's backbone: embedding -> n_layer Blocks -> norm_f. (batch, L) ids -> (batch, L, d)."""

    def __init__(self, config: MambaConfig):
        super().__init__()
        d = config.d_model
        self.embedding = nn.Embedding(config.padded_vocab_size, d)
        self.layers = nn.ModuleList(
            Block(
                d,
                mixer=Mamba(
                    d, d_state=config.d_state, d_conv=config.d_conv, expand=config.expand,
                    dt_rank=config.dt_rank, dt_min=config.dt_min, dt_max=config.dt_max,
                    dt_init_floor=config.dt_init_floor,
                ),
                norm=RMSNorm(d, eps=config.norm_eps),
                residual_in_fp32=config.residual_in_fp32,
            )
            for _ in range(config.n_layer)
        )
        self.norm_f = RMSNorm(d, eps=config.norm_eps)

    def forward(self, input_ids: torch.Tensor, reset: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (batch, L) int64; reset (batch, L) bool document starts or None."""
        hidden_states, residual = self.embedding(input_ids), None
        for layer in self.layers:
            hidden_states, residual = layer(hidden_states, residual, reset=reset)
        residual = hidden_states if residual is None else hidden_states + residual
        return self.norm_f(residual.to(dtype=self.norm_f.weight.dtype))


class MambaLMHeadModel(nn.Module):
    """Mamba-1 causal LM. forward(input_ids, position_ids=None) -> logits (batch, L, padded_vocab).

    Returns a plain tensor (no output object). `backbone_forward` stops before the head, for a
    loss that applies `lm_head` itself (e.g. chunk by chunk over the sequence).
    """

    def __init__(self, config: MambaConfig):
        super().__init__()
        self.config = config
        self.backbone = MixerModel(config)
        self.lm_head = nn.Linear(config.d_model, config.padded_vocab_size, bias=False)
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
        biases zero (done in the mixer), and with rescale_prenorm_residual out_proj's
        kaiming_uniform(a=sqrt(5)) init divided by sqrt(n_residuals_per_layer * n_layer), with
        n_residuals_per_layer = 1 since Mamba-1 blocks have no MLP (GPT-2's residual scaling).
        """
        self.tie_weights()
        config = self.config
        nn.init.normal_(self.backbone.embedding.weight, std=config.initializer_range)
        for layer in self.backbone.layers:
            layer.norm.reset_parameters()
            layer.mixer.reset_parameters()  # draws out_proj with kaiming_uniform(a=sqrt(5))
            if config.rescale_prenorm_residual:
                layer.mixer.out_proj.weight.div_(math.sqrt(config.n_layer))
        self.backbone.norm_f.reset_parameters()
        if not config.tie_embeddings:
            self.lm_head.reset_parameters()  # nn.Linear's default, untouched by `_init_weights`

    def document_starts(self, position_ids: torch.Tensor | None) -> torch.Tensor | None:
        """(batch, L) bool, True where a document starts (its position is 0); None = no resets."""
        if position_ids is None or not self.config.document_isolation:
            return None
        return position_ids == 0

    def backbone_forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids, position_ids (batch, L) int64 -> final normalised hidden states (batch, L, d)."""
        return self.backbone(input_ids, reset=self.document_starts(position_ids))

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids, position_ids (batch, L) int64 -> logits (batch, L, padded_vocab_size)."""
        return self.lm_head(self.backbone_forward(input_ids, position_ids))

    def num_parameters(self, exclude_embedding: bool = False) -> int:
        """Parameter count, tied weights once; exclude_embedding leaves out the token embedding
        table (as HF's `num_parameters(exclude_embeddings=True)`; an untied head still counts).
        """
        total = sum(p.numel() for p in self.parameters())  # parameters() yields shared ones once
        if exclude_embedding:
            total -= self.backbone.embedding.weight.numel()
        return total
