"""Starting and stopping a run's workers: one ``setup()`` / ``cleanup()`` for every entry point.

    workers = Workers(recipe, policy=..., engine=..., scorer=...)
    workers.setup()      Ray, placement, watchdog, trainer ranks, rollout engines, reward models, weight group
    ...                  workers.trainer / .rollout / .transport while the run trains or evaluates
    workers.publish()    the trainer's policy to every engine, in place (a new policy version)
    workers.cleanup()    everything stopped in reverse; returns what the run's summary records

What starts is what the run needs: a ``policy`` gives trainer ranks (``trainer_group``: the policy-gradient
``PolicyTrainer``'s by default, offline DPO's ``PreferenceTrainer``'s) and reserves the recipe's placement; an
``engine`` gives rollout actors; a ``scorer`` with reward models gives their actors. GRPO and online DPO start all
three (``rl.online``), offline DPO trainer ranks only (``rl.dpo``), ``rl eval`` engines and reward models
(``rl.evaluate``). ``cleanup()`` is safe after a ``setup()`` that failed half way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from rl.config import Recipe


@dataclass
class Workers:
    recipe: Recipe
    policy: Any = None                   # trainer.policies.PolicySpec: trainer ranks train it; None: no ranks
    trainer_group: Any = None            # the rl.workers group class of the ranks; None: rl.workers.TrainerGroup
    engine: Any = None                   # rollout.vllm_worker.EngineSpec: rollout actors serve it; None: no engines
    teacher_engine: Any = None           # EngineSpec of a distillation teacher: its own actors score the samples
    critic_model: Optional[str] = None   # PPO: where the critic's decoder starts (None: the policy's base model)
    scorer: Any = None                   # rewards.RewardScorer: its reward models get actors
    max_response_len: int = 0            # tokens the trainer sees per response (all turns of an episode)
    log_dir: Optional[str] = None        # each actor's log file goes here (None: the terminal)
    say: Callable[[str], None] = print

    trainer: Any = field(default=None, init=False)       # rl.workers.TrainerGroup / PreferenceTrainerGroup
    rollout: Any = field(default=None, init=False)       # rl.workers.RolloutGroup
    teacher: Any = field(default=None, init=False)       # rl.workers.RolloutGroup serving the teacher (scores only)
    placement: Any = field(default=None, init=False)     # rl.placement.Placement (None without Ray or ranks)
    transport: str = field(default="shared_file", init=False)  # how weights reach the engines
    reward_models: list = field(default_factory=list, init=False)

    def cpus_needed(self) -> float:
        t, ro = self.recipe.trainer, self.recipe.rollout
        from rl.prepare import reward_model_cpus

        return ((t.num_ranks * t.num_cpus_per_rank if self.policy is not None else 0)
                + (ro.num_actors * ro.num_cpus_per_actor if self.engine is not None else 0)
                + (reward_model_cpus(self.scorer) if self.scorer is not None else 0)
                + (self.recipe.teacher.num_actors * self.recipe.teacher.num_cpus_per_actor if self.teacher_engine is not None else 0))

    def setup(self) -> None:
        from rl.placement import choose_transport, collective_backend, place_recipe
        from rl.watchdog import Watchdog
        from rl.workers import init_ray, join_weight_group, start_reward_models
        from rollout.weight_sync import transport_class

        r = self.recipe
        if r.use_ray:
            init_ray(self.cpus_needed(), verbose=r.logging.verbose)
        dog = Watchdog(**r.watchdog.model_dump())
        if self.policy is not None:
            # Fails here, naming what is missing, if the cluster cannot hold the run.
            self.placement = place_recipe(r, r.rollout.num_actors if self.engine is not None else 0)
            if self.engine is not None:
                self.transport = choose_transport(r.cluster.weight_transport, self.placement)
            if r.rollout.colocate and self.engine is not None:
                # vLLM sizes its KV cache from the GPU memory free when it starts: it starts before the trainer ranks
                # that share its GPUs.
                self.rollout = self._start_rollout(dog)
                self.rollout.wait_ready()
            self.trainer = self._start_trainer(dog)
        # Trainer ranks, engines and a teacher's engines start side by side; then each group is waited for.
        if self.engine is not None and self.rollout is None:
            self.rollout = self._start_rollout(dog)
        if self.teacher_engine is not None:
            self.teacher = self._start_teacher(dog)
        for group in (self.rollout, self.teacher, self.trainer):
            if group is not None:
                group.wait_ready()
        if self.scorer is not None:
            self.reward_models = start_reward_models(self.scorer.fns.values(), r.use_ray, dog)  # none without a reward model
        p = self.placement
        if self.engine is not None and self.trainer is not None:
            if transport_class(self.transport).joins_a_group:
                join_weight_group(self.trainer, self.rollout, p.master_addr,
                                  collective_backend(r.trainer.num_gpus_per_rank, r.rollout.num_gpus_per_actor))
            if p is not None and p.nodes > 1:
                where = ", ".join(sorted({p.bundle_node_ips[b] for b in p.rollout_bundles}))
                self.say(f"placed on {p.nodes} nodes: trainer rank 0 on {p.master_addr}, rollout on {where}; "
                         f"weights travel by {self.transport}")

    def _start_trainer(self, dog):
        from rl.resources import thread_counts, weight_transport
        from rl.workers import TrainerGroup
        from trainer.setup import TrainerSetup

        r, p = self.recipe, self.placement
        # With engines, the trainer's logprobs are those of the sampling distribution and weights travel to them.
        sampled = {} if self.engine is None else dict(
            temperature=r.rollout.temperature, max_staleness=r.rollout.max_staleness,
            transport=weight_transport(r, self.policy, self.transport, self.say))
        setup = TrainerSetup(
            policy=self.policy, dtype=r.model.dtype, algorithm=r.algorithm, max_response_len=self.max_response_len,
            trainer=r.trainer.model_copy(update={"torch_threads": thread_counts(r)[0]}) if r.use_ray else r.trainer,
            seed=r.seed, master_port=0, master_addr=p.master_addr if p else "127.0.0.1",
            trust_remote_code=r.model.trust_remote_code, log_dir=self.log_dir, critic=r.critic, critic_model_path=self.critic_model,
            **sampled,
        )
        group = self.trainer_group or TrainerGroup
        return group.create(setup, r.trainer.num_ranks, r.use_ray, r.trainer.num_cpus_per_rank, r.trainer.num_gpus_per_rank,
                            watchdog=dog, resources=r.trainer.resources, placement=p and p.trainer_options(),
                            group_nodes=p and p.group_nodes("trainer", r.cluster.node_loss_wait_s))

    def _start_rollout(self, dog):
        from rl.workers import RolloutGroup

        r, ro, p = self.recipe, self.recipe.rollout, self.placement
        return RolloutGroup.create(self.engine, ro.num_actors, r.use_ray, ro.num_cpus_per_actor, ro.num_gpus_per_actor,
                                   max_restarts=ro.max_restarts, watchdog=dog, resources=ro.resources,
                                   placement=p and p.rollout_options(),
                                   group_nodes=p and p.group_nodes("rollout", r.cluster.node_loss_wait_s), log_dir=self.log_dir,
                                   wait=False)

    def _start_teacher(self, dog):
        """The teacher's engines, outside the run's placement group (like reward models): they only score."""
        from rl.workers import RolloutGroup
        from rl.workers.base import require_free

        t = self.recipe.teacher
        if self.recipe.use_ray:
            require_free(f"teacher ({t.num_actors} actor(s))", {
                "CPU": (t.num_cpus_per_actor * t.num_actors, "teacher.num_cpus_per_actor"),
                "GPU": (t.num_gpus_per_actor * t.num_actors, "teacher.num_gpus_per_actor")})
        log_dir = os.path.join(self.log_dir, "teacher") if self.log_dir else None
        if log_dir:
            os.makedirs(log_dir, exist_ok=True)
        return RolloutGroup.create(self.teacher_engine, t.num_actors, self.recipe.use_ray, t.num_cpus_per_actor,
                                   t.num_gpus_per_actor, max_restarts=self.recipe.rollout.max_restarts, watchdog=dog,
                                   log_dir=log_dir, wait=False)

    def publish(self, prompts: Optional[list[list[int]]] = None):
        """Trainer rank 0 publishes the policy through the run's transport and every engine loads it in place; returns
        the version's ``WeightHandle``. ``prompts``: an Arrow policy routed per prompt publishes one LoRA per prompt."""
        handle = self.trainer.publish_weights(prompts)
        self.rollout.load_weights(handle)
        return handle

    def cleanup(self) -> dict:
        """Stop everything that started; returns the summary's record of where the run ran."""
        final = {"rollout_peak_rss_gib": self.rollout.peak_rss_gib()} if self.rollout is not None and self.rollout.remote else {}
        if self.placement is not None:
            final["nodes"] = self.placement.nodes
            if self.engine is not None:
                final["weight_transport"] = self.transport
        if self.trainer is not None:
            self.trainer.close()
            self.trainer.shutdown()
        if self.rollout is not None:
            self.rollout.call_all_bounded("close", timeout_s=10.0)  # node-local copies of published versions
            self.rollout.shutdown()
        if self.teacher is not None:
            self.teacher.shutdown()
        if self.reward_models:
            from rl.workers import stop_reward_models

            stop_reward_models(self.scorer.fns.values(), self.reward_models)
        if self.placement is not None:
            self.placement.remove()
        self.trainer = self.rollout = self.teacher = self.placement = None
        self.reward_models = []
        return final
