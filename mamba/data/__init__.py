"""Data: tokenizers, the packing engine and the packed-shard dataset.

    readers.py    inputs -> documents: files, directories, JSONL (text or chat), Parquet, HF
                  datasets, .gz/.zst; the bad-input policy (fail or skip with a report)
    tokenizer.py  load_tokenizer("byte" | "bpe:N" | path to tokenizer.json), special token ids;
                  the tokenizer files shipped beside a HF export
    pack.py       documents -> shard_00000.npy ... + index.json, parallel and resumable
                  (tools/pack.py is its CLI): plan, tokenizer, tokenize, write, finish
    shards.py     pack's output directory: ShardWriter, the resume journal, leftovers of a run
    progress.py   what pack shows while it works: a line in place on a terminal, else periodic lines
    manifest.py   index.json (the one reader, with the layout version check) and the shard
                  checks (header, size, sha256) that the loader and inspect --verify share
    inspect.py    totals, token histogram, a window decoded back to text (tools/pack.py inspect)
    dataset.py    PackedSource(data_dir, seq_len): one packed directory, checked, cut into windows
    mixture.py    index arithmetic: global sample -> (source, window); exact weights, seeded shuffles
    fim.py        fill-in-the-middle of the documents in a window (Bavarian et al. 2022)
    errors.py     DataError: what the training data's checks raise (mamba/train.py: one line, no traceback)
    loader.py     build_train_dataloader / build_eval_dataloader: the resumable, elastic stream
                  Composer trains on (imports composer, so import it explicitly)

Nothing is re-exported here so that `import mamba.data.pack` does not pull in torch.
"""
