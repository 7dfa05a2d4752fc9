"""r1mega's GRPO against TRL's `GRPOTrainer`, side by side on the same tiny Qwen2 model.

    python benchmarks/grpo_vs_trl.py                    # Q=4 x G=8, 48 new tokens, hidden 256, 4 layers
    python benchmarks/grpo_vs_trl.py --questions 8 --group 16 --new-tokens 128 --hidden 512 --layers 8
    python benchmarks/grpo_vs_trl.py --skip-loss --steps 3 --json /tmp/grpo_vs_trl.json

Both sides get one model directory: a random `transformers.Qwen2ForCausalLM` built from a `Qwen2Config`
in code, saved with r1mega's default tokenizer (`build_default_tokenizer().save`). TRL loads the
policy, the reference and the tokenizer from that path; r1mega loads it through `model.path`
(`r1mega.models.hf.load` and `Tokenizer.from_dir`). Everything is fp32 on CPU.

1. Loss equality. TRL builds one batch with its own `_generate_and_score_completions` (left-padded
   prompts, right-padded completions, masks, ...). Its advantages, old and reference logprobs are then
   replaced by seeded synthetic ones (a random model scores 0 everywhere, so its advantages are all 0,
   and on-policy ratios are all 1: neither would exercise the clipped surrogate). For each TRL
   loss_type and its r1mega aggregation
       grpo -> seq-mean-token-mean, bnpo and dapo -> token-mean (one micro-batch, one process),
       dr_grpo -> seq-mean-token-sum-norm with max_len = max_completion_length,
   it compares (a) TRL's `compute_loss` fed one shared logprob tensor against r1mega's `grpo_loss` on
   it (the formulas alone, gradient w.r.t. the logprobs), and (b) TRL's whole loss path (padded HF
   forward, fused LM head) against r1mega's packed forward + `linear_grpo_loss` on the same directory,
   with the gradient of every parameter (r1mega's mapped to HF names). TRL runs with
   use_bias_correction_kl=False: its default multiplies the KL by the ratio (DeepSeek-V3.2), which is
   not R1's k3 term and not what r1mega computes.
2. Throughput of whole GRPO steps: r1mega's `GRPOTrainer.train_step` (native engine) and TRL's
   `trainer.train()` (transformers `generate`, no vLLM), with the same Q prompts per step in the same
   order, G, max new tokens, temperature 1, top-p 1, no top-k, AdamW (betas 0.9/0.999, no weight decay,
   constant lr), grad clip 1, beta, clip epsilon, aggregation, group std scaling (eps 1e-4, as TRL), one
   mini-batch per step (on-policy), and the rule reward math_accuracy + format_r1_zero (TRL calls
   r1mega's reward functions through thin wrappers). tokens/s = (prompt + completion tokens) / step
   wall time, over `--steps` steps after `--warmup` untimed ones; the two sides' steps alternate in
   this process (TRL's step, then r1mega's, from a TRL callback), with the same torch thread count, so
   that a change in the machine's load during the run reaches both alike. Tokens per CPU-second
   (process time) are printed too: on a shared machine they move less with other people's load than
   wall time does (use --threads 1 there: oversubscribed OpenMP threads make both sides several times
   slower).

What a step does differs where the implementations do: both take the old logprobs from the loss
forward (on-policy); r1mega packs sequences without padding, runs each prompt through the model once
for its G samples (prefill in the engine, the reference and the policy forwards in the trainer: a
GRPO group shares its prompt), and copies its weights into the engine after the step; TRL pads, runs
every sample's prompt, computes the entropy in its loss forward and generates with transformers'
`generate`.

Deliberately left out: vLLM or SGLang, several processes, several mini-batches per step, GPUs (the
loss check runs on CPU; --device only moves the throughput run, untested off CPU), and any assertion
on timings.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from r1mega.data.tokenizer import build_default_tokenizer  # noqa: E402
from r1mega.rewards import get_reward  # noqa: E402

REWARDS = ("math_accuracy", "format_r1_zero")
# TRL loss_type -> r1mega `agg` (see the module docstring for when each pair is exactly equal).
AGG = {"grpo": "seq-mean-token-mean", "bnpo": "token-mean", "dapo": "token-mean", "dr_grpo": "seq-mean-token-sum-norm"}
RESULTS = Path(__file__).resolve().parent / "results" / "grpo_vs_trl.json"


# ---------------------------------------------------------------------------------------------- setup
def make_model_dir(root: Path, args) -> Path:
    """A random Qwen2 causal LM with r1mega's default tokenizer, saved where both trainers load it."""
    import transformers

    tokenizer = build_default_tokenizer()
    config = transformers.Qwen2Config(
        vocab_size=tokenizer.vocab_size, hidden_size=args.hidden,
        intermediate_size=args.intermediate or 3 * args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=4096, tie_word_embeddings=True, bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(args.seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    path = root / "model"
    model.save_pretrained(path)
    tokenizer.save(path)
    return path


def r1mega_config(model_dir: Path, out_dir: Path, args, steps: int):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from r1mega.cli.train import CONF_DIR
    from r1mega.config import register_configs

    overrides = [
        f"model.path={model_dir}", "data.task=arithmetic", "data.template=r1_zero", "data.train_size=512",
        "data.test_size=4", f"algo.train_batch_size={args.questions}", f"algo.group_size={args.group}",
        f"algo.ppo_mini_batch_size={args.questions}", "algo.inner_epochs=1", f"algo.lr={args.lr}",
        "algo.betas=[0.9,0.999]",
        "algo.weight_decay=0.0", "algo.schedule=constant", "algo.warmup_steps=0", "algo.grad_clip=1.0",
        f"algo.beta={args.beta}", f"algo.clip_low={args.epsilon}", f"algo.clip_high={args.epsilon}",
        f"algo.agg={AGG[args.loss_type]}", "algo.adv_eps=1e-4", "algo.scale_by_std=true", "algo.kl_in_reward=false",
        f"algo.token_budget={args.token_budget}", "rollout.engine=native", "rollout.temperature=1.0",
        "rollout.top_p=1.0", "rollout.top_k=0", f"rollout.max_new_tokens=[[0,{args.new_tokens}]]",
        f"rollout.max_slots={max(args.questions * args.group, 1)}", "reward.num_workers=0",
        f"train.steps={steps}", f"train.seed={args.seed}", f"train.out_dir={out_dir}", f"train.device={args.device}",
        "train.tensorboard=false", "train.progress=false",
    ]
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = OmegaConf.to_object(compose("config", overrides=overrides))
    cfg.reward.components = {name: 1.0 for name in REWARDS}
    return cfg


def trl_reward(name: str, columns: list[str]):
    """r1mega's registered reward `name` as a TRL reward function (one float per completion); a reward
    that raises scores 0, as in r1mega's scoring pool."""
    fn = get_reward(name)

    def score(completion: str, sample: dict) -> float:
        try:
            return float(fn(completion, sample).score)
        except Exception:  # noqa: BLE001  (the pool's behaviour: a crashing reward scores 0)
            return 0.0

    def reward(prompts, completions, **kwargs):
        return [score(completion, {"prompt": prompt, **{k: kwargs[k][i] for k in columns}})
                for i, (prompt, completion) in enumerate(zip(prompts, completions))]

    reward.__name__ = name
    return reward


def trl_trainer(model_dir: Path, rows: list[dict], out_dir: Path, args, steps: int, callbacks=()):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    config = GRPOConfig(
        output_dir=str(out_dir), use_cpu=args.device == "cpu", bf16=False, fp16=False, activation_checkpointing=False,
        per_device_train_batch_size=args.questions * args.group, gradient_accumulation_steps=1,
        num_generations=args.group, max_completion_length=args.new_tokens, num_iterations=1,
        learning_rate=args.lr, optim="adamw_torch", adam_beta1=0.9, adam_beta2=0.999, weight_decay=0.0,
        lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0, beta=args.beta, epsilon=args.epsilon,
        epsilon_high=args.epsilon, loss_type=args.loss_type, scale_rewards="group", temperature=1.0, top_p=1.0,
        # TRL 1.16 multiplies the KL by the ratio by default (DeepSeek-V3.2); R1 and r1mega use plain k3.
        use_bias_correction_kl=False,
        top_k=0, max_steps=steps, shuffle_dataset=False, seed=args.seed, disable_dropout=True, logging_steps=1,
        report_to="none", save_strategy="no", log_completions=False, disable_tqdm=True, dataloader_num_workers=0)
    columns = [k for k in rows[0] if k != "prompt"]
    rewards = [trl_reward(name, columns) for name in REWARDS]
    return GRPOTrainer(model=str(model_dir), reward_funcs=rewards, args=config, train_dataset=Dataset.from_list(rows),
                       callbacks=list(callbacks))


# ------------------------------------------------------------------------------------ 1. loss equality
def trl_batch(trainer, rows: list[dict], args) -> tuple[dict, torch.Tensor]:
    """TRL's inputs dict for `rows` x G, with synthetic advantages and old/reference logprobs, and the
    policy's logprobs [S, R] from TRL's own forward."""
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop; compute_loss divides by it
    inputs = trainer._generate_and_score_completions([row for row in rows for _ in range(args.group)])
    mask = inputs["completion_mask"]  # [S, R] int, right-padded
    with torch.no_grad():
        logp, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
            torch.cat([inputs["prompt_mask"], mask], 1), mask.shape[1])  # [S, R]
    g = torch.Generator().manual_seed(args.seed)
    # Off-policy old logprobs (ratios around 1 +- 0.3, so some tokens clip), a drifted reference, and
    # advantages of both signs: every branch of the surrogate and the KL gets exercised.
    inputs["old_per_token_logps"] = logp + 0.3 * torch.randn(logp.shape, generator=g)
    inputs["ref_per_token_logps"] = logp + 0.3 * torch.randn(logp.shape, generator=g)
    inputs["advantages"] = torch.randn(mask.shape[0], generator=g)
    return inputs, logp


def on_shared_logprobs(trainer, inputs: dict, logp: torch.Tensor, agg: str, args) -> dict:
    """TRL's `compute_loss` and r1mega's `grpo_loss` on one logprob tensor: the loss formulas alone."""
    from r1mega.ops.grpo_loss import grpo_loss

    theirs, ours = logp.clone().requires_grad_(), logp.clone().requires_grad_()
    # TRL's forward is replaced by the shared tensor (entropies only feed its metrics).
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: (theirs, torch.zeros_like(theirs), None)
    try:
        trl_loss = trainer.compute_loss(trainer.model, inputs)
    finally:
        del trainer._get_per_token_logps_and_entropies
    loss, _ = grpo_loss(ours, inputs["old_per_token_logps"], inputs["ref_per_token_logps"], inputs["advantages"],
                        inputs["completion_mask"].float(), clip_low=args.epsilon, clip_high=args.epsilon,
                        beta=args.beta, agg=agg, max_len=args.new_tokens)
    (trl_grad,), (our_grad,) = torch.autograd.grad(trl_loss, theirs), torch.autograd.grad(loss, ours)
    return {"shared_logp_abs_diff": abs(trl_loss.item() - loss.item()),
            "shared_logp_grad_max_abs_diff": (trl_grad - our_grad).abs().max().item()}


def on_same_model(trainer, policy, config, batch, inputs: dict, agg: str, args) -> dict:
    """TRL's whole loss path (padded HF forward, fused LM head) against r1mega's (packed forward,
    `linear_grpo_loss`), with the gradient of every parameter."""
    from r1mega.models import hf
    from r1mega.ops.linear_grpo_loss import linear_grpo_loss
    from r1mega.trainers.token_batch import response_hidden

    trainer.model.zero_grad(set_to_none=True)
    trl_loss = trainer.compute_loss(trainer.model, inputs)
    trl_loss.backward()
    theirs = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters()}

    width = batch.mask.shape[1]  # == TRL's completion width: both are the longest completion
    policy.zero_grad(set_to_none=True)
    hidden = response_hidden(policy, batch, "cpu")  # [S, R, H]
    loss, stats = linear_grpo_loss(
        hidden, policy.output_weight, batch.response_ids, inputs["old_per_token_logps"][:, :width],
        inputs["ref_per_token_logps"][:, :width], inputs["advantages"], batch.mask, temperature=1.0,
        clip_low=args.epsilon, clip_high=args.epsilon, beta=args.beta, agg=agg, max_len=args.new_tokens)
    loss.backward()
    ours = dict(hf.native_to_hf(config, ((n, p.grad) for n, p in policy.named_parameters())))

    def norm(grads):
        return torch.linalg.vector_norm(torch.stack([t.norm() for t in grads.values()])).item()

    return {"trl_loss": trl_loss.item(), "r1mega_loss": loss.item(), "abs_diff": abs(trl_loss.item() - loss.item()),
            "trl_grad_norm": norm(theirs), "r1mega_grad_norm": norm(ours),
            "grad_max_abs_diff": max((ours[n] - t).abs().max().item() for n, t in theirs.items()),
            "clip_fraction": stats["clip_fraction"].item()}


def loss_equality(model_dir: Path, rows: list[dict], work: Path, args) -> dict:
    from r1mega.models import hf
    from r1mega.trainers.token_batch import TokenBatch, response_logprobs

    trainer = trl_trainer(model_dir, rows, work / "trl-loss", args, steps=1)
    inputs, logp = trl_batch(trainer, rows, args)
    policy, config = hf.load(model_dir)
    mask = inputs["completion_mask"]
    prompts = [ids[m.bool()].tolist() for ids, m in zip(inputs["prompt_ids"], inputs["prompt_mask"])]
    responses = [ids[m.bool()].tolist() for ids, m in zip(inputs["completion_ids"], mask)]
    batch = TokenBatch(prompts, *TokenBatch.pad(responses))
    with torch.no_grad():  # the two forwards: left-padded (RoPE positions shifted) vs packed
        ours = response_logprobs(policy, batch, temperature=1.0, device="cpu")
        logp_diff = ((ours - logp[:, :ours.shape[1]]) * batch.mask).abs().max().item()
    rows_out = []
    for loss_type, agg in AGG.items():
        trainer.loss_type = loss_type  # only _compute_loss reads it
        rows_out.append({"loss_type": loss_type, "agg": agg, **on_shared_logprobs(trainer, inputs, logp, agg, args),
                         **on_same_model(trainer, policy, config, batch, inputs, agg, args)})
    print(f"\n1. loss on one TRL batch ({mask.shape[0]} completions, {int(mask.sum())} completion tokens, "
          f"{sum(map(len, prompts))} prompt tokens), fp32, beta={args.beta}, epsilon={args.epsilon}, "
          f"max_completion_length={args.new_tokens}")
    print(f"max |logprob difference| of the two forwards: {logp_diff:.2e}")
    print(f"{'':34} {'same logprobs':^20} | {'same model, each side its own forward':^66}")
    print(f"{'loss_type':<9} {'r1mega agg':<24} {'|dloss|':>9} {'max|dgrad|':>10} | {'TRL loss':>11} "
          f"{'r1mega loss':>11} {'|dloss|':>9} {'TRL |grad|':>10} {'r1mega|grad|':>12} {'max|dgrad|':>10} {'clip':>5}")
    for r in rows_out:
        print(f"{r['loss_type']:<9} {r['agg']:<24} {r['shared_logp_abs_diff']:9.2e} "
              f"{r['shared_logp_grad_max_abs_diff']:10.2e} | {r['trl_loss']:11.7f} {r['r1mega_loss']:11.7f} "
              f"{r['abs_diff']:9.2e} {r['trl_grad_norm']:10.6f} {r['r1mega_grad_norm']:12.6f} "
              f"{r['grad_max_abs_diff']:10.2e} {r['clip_fraction']:5.3f}")
    worst = max(max(r["abs_diff"], r["shared_logp_abs_diff"]) for r in rows_out)
    print(f"largest |loss difference|: {worst:.2e} (target <= 1e-5)")
    return {"logprob_max_abs_diff": logp_diff, "rows": rows_out, "max_abs_diff": worst}


# -------------------------------------------------------------------------------------- 2. throughput
class R1megaSteps:
    """r1mega's `GRPOTrainer`, one timed `train_step` per `step()` call. `prompt_rows`: the prompt rows of
    every step, in order, known before the first step (TRL is given the same)."""

    def __init__(self, cfg, args):
        from r1mega.trainers.grpo import GRPOTrainer

        self.trainer, self.warmup = GRPOTrainer(cfg), args.warmup
        upcoming = copy.deepcopy(self.trainer.prompts)
        self.prompt_rows = [[dict(r) for r in upcoming.take(args.questions)] for _ in range(args.warmup + args.steps)]
        self.rows, self.tokens = [], []
        generate = self.trainer.engine.generate

        def counting_generate(prompts, sampling):  # counts the tokens the step processes
            groups = generate(prompts, sampling)
            self.tokens.append(sum(len(s.prompt_ids) + len(s.token_ids) for group in groups for s in group))
            return groups

        self.trainer.engine.generate = counting_generate

    def step(self) -> None:
        started, cpu = time.perf_counter(), time.process_time()
        metrics = self.trainer.train_step()
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu
        if self.trainer.step > self.warmup:  # one optimizer step a rollout: steps done, this one included
            self.rows.append({"wall_s": wall, "cpu_s": cpu, "tokens": self.tokens[-1], "rollout_s": metrics["time/rollout"],
                              "reward_mean": metrics["reward/mean"], "loss": metrics["train/loss"]})

    def close(self) -> None:
        self.trainer.scorer.close()


def trl_steps(model_dir: Path, prompt_rows: list[list[dict]], work: Path, args, after_step) -> list[dict]:
    """Runs TRL's `train()` over `prompt_rows`, calling `after_step()` after each of its steps (outside
    its timing); one row per timed step."""
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback

    class StepTimer(TrainerCallback):
        """Wall time and tokens (TRL's own prompt + completion count) of each optimizer step."""

        def __init__(self):
            self.rows, self.logs = [], []

        def on_step_begin(self, _args, state, control, **kwargs):
            self.started, self.cpu, self.seen = time.perf_counter(), time.process_time(), state.num_input_tokens_seen

        def on_step_end(self, _args, state, control, **kwargs):
            self.rows.append({"wall_s": time.perf_counter() - self.started, "cpu_s": time.process_time() - self.cpu,
                              "tokens": int(state.num_input_tokens_seen - self.seen)})

        def on_log(self, _args, state, control, logs=None, **kwargs):
            self.logs.append(dict(logs or {}))

    class AfterStep(TrainerCallback):
        def on_step_end(self, _args, state, control, **kwargs):
            after_step()

    timer = StepTimer()
    rows = [r for step in prompt_rows for r in step]  # shuffle_dataset=False: read in this order
    trainer = trl_trainer(model_dir, rows, work / "trl-e2e", args, steps=len(prompt_rows), callbacks=[timer, AfterStep()])
    rollout_s = []
    generate = trainer._generate

    def timed_generate(prompts):
        started = time.perf_counter()
        out = generate(prompts)
        rollout_s.append(time.perf_counter() - started)
        return out

    trainer._generate = timed_generate
    trainer.remove_callback(PrinterCallback)  # disable_tqdm=True would print every step's logs
    trainer.train()
    out = []
    for i, row in enumerate(timer.rows[args.warmup:], start=args.warmup):
        log = timer.logs[i] if i < len(timer.logs) else {}
        out.append({**row, "rollout_s": rollout_s[i], "reward_mean": log.get("reward"), "loss": log.get("loss")})
    return out


def summarise(name: str, steps: list[dict]) -> dict:
    tokens = sum(s["tokens"] for s in steps)
    return {"name": name, "steps": steps, "step_s_median": statistics.median(s["wall_s"] for s in steps),
            "rollout_s_median": statistics.median(s["rollout_s"] for s in steps),
            "tokens_per_step": tokens / len(steps), "tokens_per_s": tokens / sum(s["wall_s"] for s in steps),
            "tokens_per_cpu_s": tokens / sum(s["cpu_s"] for s in steps)}


def throughput(model_dir: Path, work: Path, args) -> dict:
    cfg = r1mega_config(model_dir, work / "r1mega-run", args, args.warmup + args.steps)
    ours_run = R1megaSteps(cfg, args)
    try:  # the steps alternate, TRL's then r1mega's: a change in the machine's load hits both sides alike
        theirs_steps = trl_steps(model_dir, ours_run.prompt_rows, work, args, after_step=ours_run.step)
    finally:
        ours_run.close()
    ours, theirs = summarise("r1mega", ours_run.rows), summarise("trl", theirs_steps)
    ratio = ours["tokens_per_s"] / theirs["tokens_per_s"]
    pairs = sorted((o["tokens"] / o["wall_s"]) / (t["tokens"] / t["wall_s"]) for o, t in zip(ours_run.rows, theirs_steps))
    print(f"\n2. GRPO step throughput: Q={args.questions} x G={args.group}, {args.new_tokens} new tokens, "
          f"{args.steps} timed step(s) after {args.warmup} warm-up, steps alternating, {torch.get_num_threads()} torch threads")
    print(f"{'trainer':<8} {'step s':>8} {'rollout s':>10} {'tokens/step':>12} {'tokens/s':>10} {'tokens/cpu-s':>13}")
    for side in (ours, theirs):
        print(f"{side['name']:<8} {side['step_s_median']:8.2f} {side['rollout_s_median']:10.2f} "
              f"{side['tokens_per_step']:12.0f} {side['tokens_per_s']:10.1f} {side['tokens_per_cpu_s']:13.1f}")
    cpu_ratio = ours["tokens_per_cpu_s"] / theirs["tokens_per_cpu_s"]
    print(f"r1mega / TRL: {ratio:.2f}x tokens/s (target >= 2x), {cpu_ratio:.2f}x tokens per CPU-second; "
          f"step pairs from {pairs[0]:.2f}x to {pairs[-1]:.2f}x")
    return {"r1mega": ours, "trl": theirs, "ratio": ratio, "cpu_ratio": cpu_ratio, "pair_ratios": pairs}


# -------------------------------------------------------------------------------------------- driver
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--questions", type=int, default=4, help="prompts per step (Q)")
    p.add_argument("--group", type=int, default=8, help="samples per prompt (G)")
    p.add_argument("--new-tokens", type=int, default=48, help="max completion length")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=0, help="MLP width (0: 3 x hidden)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-6)
    p.add_argument("--beta", type=float, default=0.001, help="KL coefficient (the paper's 0.001)")
    p.add_argument("--epsilon", type=float, default=0.2, help="clip epsilon, low = high")
    p.add_argument("--loss-type", choices=["grpo", "bnpo", "dapo"], default="grpo",
                   help="TRL loss_type of the throughput run (r1mega: its aggregation; dr_grpo is in the loss check)")
    p.add_argument("--token-budget", type=int, default=65536, help="r1mega tokens per micro-batch")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    p.add_argument("--skip-loss", action="store_true")
    p.add_argument("--skip-e2e", action="store_true")
    p.add_argument("--json", default=str(RESULTS))
    return p.parse_args(argv)


def main(argv=None) -> dict:
    import transformers
    import trl

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    result = {"args": vars(args), "torch": torch.__version__, "transformers": transformers.__version__,
              "trl": trl.__version__, "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory(prefix="grpo_vs_trl-") as tmp:
        work = Path(tmp)
        model_dir = make_model_dir(work, args)
        print(f"model: Qwen2 hidden={args.hidden} layers={args.layers} heads={args.heads}/{args.kv_heads} "
              f"vocab={build_default_tokenizer().vocab_size}, saved with its tokenizer to {model_dir}")
        if not args.skip_loss:
            cfg = r1mega_config(model_dir, work / "r1mega-rows", args, 1)
            from r1mega.trainers.components import build_prompt_sets

            rows = [dict(r) for r in build_prompt_sets(cfg.data, args.seed)[0][:args.questions]]
            result["loss"] = loss_equality(model_dir, rows, work, args)
        if not args.skip_e2e:
            result["throughput"] = throughput(model_dir, work, args)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"saved {args.json}")
    return result


if __name__ == "__main__":
    main()
