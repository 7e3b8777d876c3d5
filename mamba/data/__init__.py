"""Data: tokenizers, the packing engine and the packed-shard dataset.

    tokenizer.py  load_tokenizer("byte" | "bpe:N" | path to tokenizer.json)
    pack.py       text files -> shard_00000.npy ... + index.json (tools/pack.py is its CLI)
    dataset.py    PackedDataset(data_dir, seq_len): training windows over the shards
    loader.py     the training DataLoader (imports composer, so import it explicitly)

Nothing is re-exported here so that `import mamba.data.pack` does not pull in torch.
"""
