"""`r1mega-eval`: pass@1, pass@k, cons@k and response length of a checkpoint, per dataset.

    r1mega-eval model_path=runs/pipeline/2_reasoning_rl/model                    # held-out arithmetic
    r1mega-eval model_path=/ckpt datasets=[/data/aime24.jsonl] sampling.n=64 sampling.max_new_tokens=32768

Writes eval.json and eval.md under `out_dir` and prints the markdown table.
"""

from __future__ import annotations

from dataclasses import asdict

import hydra
from omegaconf import OmegaConf

from r1mega.cli.train import CONF_DIR
from r1mega.eval.config import EvalConfig, register_eval_configs

register_eval_configs()


def run(config: EvalConfig) -> dict[str, dict[str, float]]:
    from r1mega.data.tokenizer import Tokenizer, build_default_tokenizer
    from r1mega.eval.report import markdown_table, write_results
    from r1mega.eval.run import evaluate_model, load_eval_sets
    from r1mega.models import load_pretrained
    from r1mega.rewards.sandbox import allow_isolation
    from r1mega.trainers.components import pick_device

    if not config.model_path:
        raise ValueError("model_path is required: a native or Hugging Face checkpoint directory")
    tokenizer_dir = config.tokenizer or config.model_path
    try:
        tokenizer = Tokenizer.from_dir(tokenizer_dir)
    except FileNotFoundError:
        if config.tokenizer:
            raise
        print(f"{tokenizer_dir} holds no tokenizer.json: using the embedded default tokenizer")
        tokenizer = build_default_tokenizer()
    allow_isolation(config.sandbox.allow)  # before the scoring pool starts: its workers inherit it
    device = pick_device(config.device)
    model = load_pretrained(config.model_path, device=device).eval()
    sets = load_eval_sets(config.datasets, template=config.template, size=config.size,
                          difficulty=config.difficulty, seed=config.sampling.seed)
    results = evaluate_model(model, tokenizer, sets, config.sampling, device=device, max_slots=config.max_slots)
    write_results(results, config.out_dir, title=f"Evaluation of {config.model_path}", settings=asdict(config))
    print(markdown_table(results))
    print(f"eval.json and eval.md in {config.out_dir}")
    return results


@hydra.main(config_path=CONF_DIR, config_name="eval", version_base=None)
def main(cfg) -> None:
    run(OmegaConf.to_object(cfg))


if __name__ == "__main__":
    main()
