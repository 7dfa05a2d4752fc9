"""The DeepSeek-R1 pipeline, stage after stage (R1_SPEC.md, The pipeline), behind `r1mega-pipeline`.

    config.py     the schema: the GRPO `Config` plus a `pipeline` section with one entry per stage
    general.py    synthetic non-reasoning rows and preference pairs for the embedded default
    rejection.py  rejection sampling with the paper's filters, written as SFT jsonl with provenance
    stages.py     one function per stage: GRPO, SFT, rejection sampling + SFT, reward model, distillation
    runner.py     the order, skipping finished stages, evaluation after each, the report
    report.py     report.md and its PNG plots
"""
