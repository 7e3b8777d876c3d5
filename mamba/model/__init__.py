"""The Mamba-1 / Mamba-2 language model (mamba-ssm's parameter names); no Composer here.

    ops/             selective scan, SSD, causal conv1d, RMSNorm: torch references and the
                     mamba-ssm / causal-conv1d CUDA kernels behind one dispatch (ops/kernels.py)
    mamba1.py        Mamba-1 mixer            mamba2.py    Mamba-2 mixer
                     (each owns forward, step and allocate_inference_cache, as mamba-ssm)
    mixer_init.py    initialisation both mixers share (the dt bias, the inference state dtype)
    block.py         norm -> mixer, residual in fp32; forward and one-token step
    lm.py            MambaConfig, MambaLMHeadModel (embedding, blocks, final norm, head + chunked
                     loss; allocate_inference_cache and step over the layers)
    loss.py          cross-entropy over the vocabulary in chunks
    factory.py       build_model(ModelConfig): the model a training config describes
    hf.py            the mapping to and from mamba-ssm / HF transformers (configs, state dicts);
                     mamba.runs.export writes the HF directory
    generation.py    generate: the decoding loop over the model's step, and sampling
    flops.py         training FLOPs per token (MFU)
    composer_model.py  the Composer adapter (imports composer: import it explicitly)
"""
from mamba.model.lm import MambaConfig, MambaLMHeadModel

__all__ = ["MambaConfig", "MambaLMHeadModel"]
