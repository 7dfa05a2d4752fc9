"""Data for r1mega: tokenizers, prompt templates, synthetic verifiable tasks, dataset files, packing.

    tokenizer.py  `Tokenizer` (tokenizer.json directories) and the embedded default BPE
    templates.py  the R1-Zero template (verbatim), plain and ChatML, by name
    tasks/        `arithmetic` and `countdown`, train/test splits, demonstrations for a base model
    datasets.py   prompt and SFT rows from local jsonl / json / parquet / `datasets` directories
    packing.py    whole sequences packed into micro-batches by token budget, and back

Nothing is imported here, so `import r1mega.data.templates` stays cheap.
"""
