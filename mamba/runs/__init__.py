"""What a run leaves on disk, read without the trainer (no Composer, nothing from mamba.training):
the tools (export_hf, generate, plot_metrics) and the trainer's end-of-run export use it.

    run_config.py    CONFIG_NAME: the resolved config.yaml the trainer writes into its save_folder;
                     run_tokenizer: the tokenizer.json the run's training data was packed with
    checkpoints.py   Composer checkpoints (full .pt files, FSDP2 sharded DCP directories): find
                     them, check each is intact (manifest, or what torch's readers need), read the
                     model's tensors in one process, rebuild the trained model from its config.yaml
    metrics.py       read the JSON-lines metrics file (mamba.training.metrics_file writes it)
    export.py        the HF transformers directory, written whole or not at all; the trainer's
                     end-of-run export (rank 0's part)
"""
