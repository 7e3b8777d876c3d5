"""The Mamba-1 / Mamba-2 language model (mamba-ssm's parameter names); no Composer here.

    ops/             selective scan, SSD, causal conv1d, RMSNorm: torch references and the
                     mamba-ssm / causal-conv1d CUDA kernels behind one dispatch (ops/kernels.py)
    mamba1.py        Mamba-1 mixer            mamba2.py    Mamba-2 mixer
    block.py         norm -> mixer, residual in fp32
    lm.py            MambaConfig, MambaLMHeadModel (embedding, blocks, final norm, head + chunked loss)
    loss.py          cross-entropy over the vocabulary in chunks
    factory.py       build_model(ModelConfig): the model a training config describes
    hf.py            import from mamba-ssm / HF directories, export to HF transformers
    generation.py    recurrent decoding with conv and SSM state caches
    flops.py         training FLOPs per token (MFU)
    composer_model.py  the Composer adapter (imports composer: import it explicitly)
"""
from mamba.model.lm import MambaConfig, MambaLMHeadModel

__all__ = ["MambaConfig", "MambaLMHeadModel"]
