"""Data: tokenizers, the packing engine and the packed-shard dataset.

    readers.py    inputs -> documents: files, directories, JSONL (text or chat), Parquet, HF
                  datasets, .gz/.zst; the bad-input policy (fail or skip with a report)
    tokenizer.py  load_tokenizer("byte" | "bpe:N" | path to tokenizer.json), special token ids
    pack.py       documents -> shard_00000.npy ... + index.json, parallel and resumable
                  (tools/pack.py is its CLI)
    manifest.py   index.json: writing it atomically, reading and checking it against the shards
    inspect.py    totals, token histogram, a window decoded back to text (tools/pack.py inspect)
    dataset.py    PackedSource(data_dir, seq_len): one packed directory, checked, cut into windows
    mixture.py    index arithmetic: global sample -> (source, window); exact weights, seeded shuffles
    fim.py        fill-in-the-middle of the documents in a window (Bavarian et al. 2022)
    loader.py     build_train_dataloader / build_eval_dataloader: the resumable, elastic stream
                  Composer trains on (imports composer, so import it explicitly)

Nothing is re-exported here so that `import mamba.data.pack` does not pull in torch.
"""
