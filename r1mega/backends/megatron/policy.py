"""`MegatronPolicy`: a megatron-core GPTModel behind the interface the trainers use of a `Transformer`.

What the GRPO trainer asks of its policy, and how each is answered here:
- `forward(input_ids, layout=..., return_hidden=True)` on packed micro-batches whose sequences
  share prompts (token_batch.response_hidden, models/shared_prefix.py): megatron's attention here has
  no packed-sequence path, so each sequence becomes a row of a right-padded batch (attention is
  causal, so padding after a sequence never reaches it), shared prompts copied into every row that
  reads them (its routers then count them once per sequence, as the native model's `repeats` do), and
  each stored token takes the hidden state of the first row that reads it;
- `routing` (models/routing.py) with a replay: megatron-core's own router replay (`RouterReplay`, each
  router's top-k replaced by the record, its own scores at those experts as the weights: R3), the
  record laid out as the rows are; a token the record does not cover (a response's last, never fed to
  the engine, whose output no logprob reads) routes to experts 0..k-1 and is left out of the load
  counts, as padding is. It replays only: `chosen` stays empty;
- `output_weight`: this rank's vocabulary shard of the output matrix, for the fused loss ops, and
  `vocab_group`, the tensor-parallel group the vocabulary is split over (None at tp = 1);
- `clip_grad_norm`: the global gradient norm under tensor parallelism: a sharded parameter's squares
  summed over the group, a replicated one's (norms, routers) counted once;
- `config` (the r1mega ModelConfig), `parameters()`, `state_dict()` (megatron names) for the
  optimizer and checkpoints;
- `engine_weights()`: native (name, tensor) pairs for the rollout engine's `update_weights`, the
  tensor-parallel shards gathered (model.native_weights);
- `expert_load_stats()` and `update_expert_bias(rate)`: the load metrics and the aux-loss-free
  balancing step of r1mega.models.balance, on the token counts megatron's routers keep
  (`local_tokens_per_expert`, padding taken back out); `sum_expert_load(group)` adds those counts
  over data-parallel ranks first;
- `checkpoint_name(fqn)`: tensor-parallel shards are checkpointed under per-rank names;
- `load_into_reference(reference)`: the native reference takes `engine_weights()`, each rank cutting
  its own shards of them.

Deliberately left out: sequence parallelism (it needs Transformer Engine's norms) and the KV-cache
path (rollouts run in the engine, never through this model).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from r1mega.backends.megatron.loss import hidden_states, output_weight, tensor_parallel_group
from r1mega.backends.megatron.mapping import is_tp_sharded
from r1mega.backends.megatron.model import layout_of, native_weights
from r1mega.models.balance import bias_step, load_stats
from r1mega.models.config import ModelConfig
from r1mega.models.routing import NO_RECORD, Routing
from r1mega.models.shared_prefix import SharedPrefixRow
from r1mega.parallel.grad_clip import clip_grad_norm
from r1mega.parallel.weight_gather import load_full_state_dict


class MegatronPolicy(nn.Module):
    def __init__(self, config: ModelConfig, model: nn.Module):
        super().__init__()
        self.config, self.model = config, model

    @classmethod
    def from_native(cls, native: nn.Module, parallel=None, dtype: torch.dtype = torch.float32) -> "MegatronPolicy":
        """Builds the GPTModel for `native.config` (GPU) and loads `native`'s weights into it."""
        from r1mega.backends.megatron.config import ParallelConfig
        from r1mega.backends.megatron.model import build_model, load_native_weights

        model = build_model(native.config, parallel or ParallelConfig(), dtype=dtype)
        load_native_weights(model, native.config, native.state_dict().items())
        return cls(native.config, model)

    @property
    def output_weight(self) -> torch.Tensor:
        return output_weight(self.model)

    @property
    def vocab_group(self):
        return tensor_parallel_group()

    def checkpoint_name(self, fqn: str) -> str:
        """The name a distributed checkpoint stores `fqn` under: a tensor-parallel shard's names its rank
        (parallel/dist_checkpoint.py), so it resumes at the same tensor-parallel size only."""
        group = tensor_parallel_group()
        if group is None or not is_tp_sharded(fqn.removeprefix("model."), layout_of(self.model)):
            return fqn
        return f"{fqn}@tp{torch.distributed.get_rank(group)}of{torch.distributed.get_world_size(group)}"

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Clips to the global gradient norm, which it returns: every rank of the tensor-parallel group
        adds its shards' squares, and only the group's first rank the replicated gradients' (the same
        on every rank: their inputs and output gradients are)."""
        group = tensor_parallel_group()
        if group is None:
            return clip_grad_norm(self.parameters(), max_norm)
        layout = layout_of(self.model)
        replicated = [] if torch.distributed.get_rank(group) == 0 else [
            p for name, p in self.model.named_parameters() if not is_tp_sharded(name, layout)]
        return clip_grad_norm(self.parameters(), max_norm, uncounted=replicated, group=group)

    def forward(self, input_ids: torch.Tensor, *, position_ids: torch.Tensor | None = None,
                layout: SharedPrefixRow | None = None, routing: Routing | None = None,
                return_hidden: bool = False) -> torch.Tensor:
        """input_ids [B, T] -> final-normed hidden states [B, T, H]; `layout` as Transformer's (its
        sequences start at position 0, so position_ids add nothing here); `routing`: a record to replay."""
        if not return_hidden:
            raise ValueError("MegatronPolicy returns hidden states only (return_hidden=True): the loss ops "
                             "apply the vocabulary-parallel output layer themselves")
        if routing is not None and routing.replay is None:
            raise ValueError("MegatronPolicy replays a routing record but does not record its own routing")
        if layout is None and routing is None:
            return hidden_states(self.model, input_ids)
        if layout is None:
            b, t = input_ids.shape
            uncounted = torch.zeros(b, t, dtype=torch.bool, device=input_ids.device)
            with self._replaying(routing.replay.view(b, t, *routing.replay.shape[1:]), uncounted), \
                    self._padding_not_counted(uncounted):
                return hidden_states(self.model, input_ids)
        width = max(e - s for s, e in layout.spans)
        padded = input_ids.new_zeros(len(layout.spans), width)
        padding = torch.ones(len(layout.spans), width, dtype=torch.bool, device=input_ids.device)
        laid = None if routing is None else routing.replay[layout.expand]  # [N, L, k], sequences end to end
        record = None if laid is None else laid.new_full((len(layout.spans), width, *laid.shape[1:]), NO_RECORD)
        for i, (s, e) in enumerate(layout.spans):
            padded[i, :e - s] = input_ids[0, layout.expand[s:e]]
            padding[i, :e - s] = False
            if record is not None:
                record[i, :e - s] = laid[s:e]
        uncounted = padding.clone()  # and, when replaying, the tokens without a record
        with self._replaying(record, uncounted), self._padding_not_counted(uncounted):
            hidden = hidden_states(self.model, padded)  # [sequences, width, H]
        laid_out = hidden[~padding]  # [sum of sequence lengths, H], the sequences end to end
        return laid_out[layout.first_read][None]

    @contextlib.contextmanager
    def _replaying(self, record: torch.Tensor | None, uncounted: torch.Tensor):
        """Within the block every MoE router routes token (b, t) to record [B, T, L, k][b, t, l]; tokens
        without a record are marked in `uncounted` [B, T] (in place) and sent to experts 0..k-1."""
        if record is None:
            yield
            return
        from megatron.core.transformer.moe.router_replay import RouterReplayAction

        missing = (record == NO_RECORD).flatten(2).any(-1)  # [B, T]
        uncounted |= missing
        record = torch.where(missing[..., None, None], torch.arange(record.shape[-1], device=record.device), record)
        replays = [m.router_replay for m in self.model.modules() if getattr(m, "router_replay", None) is not None]
        if len(replays) != record.shape[2]:
            raise ValueError(f"a routing record of {record.shape[2]} MoE layers for a model of {len(replays)}")
        for layer, replay in enumerate(replays):
            replay.set_target_indices(record[:, :, layer].transpose(0, 1).reshape(-1, record.shape[-1]).long())
            replay.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)  # megatron's token order: [T, B]
        try:
            yield
        finally:
            for replay in replays:
                replay.clear_indices()
                replay.clear_router_replay_action()

    @contextlib.contextmanager
    def _padding_not_counted(self, padding: torch.Tensor):
        """Takes padded tokens [B, T] back out of the routers' expert-load counts. (megatron-core
        0.16's own `padding_mask` fails to broadcast in its expert-bias count, so a hook on each
        router subtracts what the padding added; routers count only when grad is enabled.)"""
        flat = padding.transpose(0, 1).reshape(-1)  # megatron's token order: [T, B] flattened

        def subtract(router, _inputs, outputs):
            if torch.is_grad_enabled():
                with torch.no_grad():
                    router.local_tokens_per_expert -= outputs[1][flat].sum(dim=0)

        hooks = [router.register_forward_hook(subtract) for _, router in self.routers()]
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()

    def engine_weights(self):
        return native_weights(self.model, self.config)

    def expert_load_stats(self) -> dict[str, float]:
        return load_stats((name, router.local_tokens_per_expert) for name, router in self.routers())

    @torch.no_grad()
    def update_expert_bias(self, rate: float) -> None:
        for _, router in self.routers():
            if router.local_tokens_per_expert.sum() > 0:
                bias_step(router.expert_bias, router.local_tokens_per_expert, rate)
            router.local_tokens_per_expert.zero_()

    @torch.no_grad()
    def sum_expert_load(self, group) -> None:
        """Sums the routers' token counts over the data-parallel `group` (None: one rank, nothing to add),
        before `update_expert_bias`, so that every rank takes the same bias step, from the global batch's
        load."""
        if group is None:
            return
        for _, router in self.routers():
            torch.distributed.all_reduce(router.local_tokens_per_expert, group=group)

    def load_into_reference(self, reference: nn.Module) -> None:
        load_full_state_dict(reference, self.engine_weights())

    def routers(self) -> list[tuple[str, nn.Module]]:
        """(name, router) of the MoE routers that keep an expert bias."""
        return [(name, m) for name, m in self.model.named_modules()
                if getattr(m, "expert_bias", None) is not None and hasattr(m, "local_tokens_per_expert")]
