"""AlignConfig: every knob of `lmstack align rm|dpo|ppo|grpo`. Each field is a recipe key and a
`--flag`; the trainer's knobs are here too and become the run's TrainConfig.

Defaults follow TRL where it has the same knob: DPO beta 0.1; GRPO epsilon 0.2, beta 0 (no KL
term), num_iterations 1, group-scaled rewards; PPO kl_coef 0.05, gamma 1, lam 0.95, clip 0.2,
value clip 0.2, vf_coef 0.1, 4 epochs.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from lmstack.align.data import FORMATS
from lmstack.align.losses import DPO_LOSS_TYPES, GRPO_LOSS_TYPES

METHODS = ("rm", "dpo", "ppo", "grpo")


def _h(text: str, cli: bool = True, **kw):
    return field(metadata={"help": text, "cli": cli}, **kw)


@dataclass
class AlignConfig:
    method: str = _h("rm | dpo | ppo | grpo (the subcommand)", cli=False, default="dpo")
    model: str = _h("the starting model: a run dir (an SFT run, usually) or a HF folder", cli=False, default="")
    out: str = _h("run directory to write", default="runs/align")
    # ---- data
    format: str = _h("chat (the tokenizer's chat template; SFT models) | plain (raw text; base models)",
                     default="chat")
    data: str | None = _h("JSONL: {prompt, chosen, rejected} pairs (rm, dpo) or {prompt, ...fields} prompts "
                          "(grpo, ppo); default: tinyworld", default=None)
    eval_data: str | None = _h("held-out JSONL in the same layout; default: tinyworld's held-out set", default=None)
    tinyworld_seed: int = _h("seed of the tinyworld world (must be the pretraining corpus's)", default=0)
    tasks: list[str] = _h("tinyworld tasks: arithmetic, arithmetic_steps (worked steps), instruction",
                          default_factory=lambda: ["arithmetic"])
    n_train: int = _h("tinyworld training pairs / prompts", default=2000)
    n_eval: int = _h("held-out pairs / prompts", default=200)
    # ---- DPO / reward model
    beta: float | None = _h("dpo: the KL strength beta; grpo: the k3 KL coefficient (0 = no reference)", default=None)
    rpo_alpha: float = _h("dpo: weight of the chosen responses' NLL added to the loss (RPO; 0 = plain DPO)",
                          default=0.0)
    loss_type: str | None = _h(f"dpo: {' | '.join(DPO_LOSS_TYPES)}; grpo: {' | '.join(GRPO_LOSS_TYPES)}",
                               default=None)
    # ---- rollouts (grpo, ppo)
    group_size: int = _h("grpo: samples per prompt (G)", default=8)
    prompts_per_rollout: int = _h("prompts sampled per rollout batch, per rank", default=4)
    num_iterations: int = _h("grpo: passes over each rollout batch (TRL's mu)", default=1)
    max_completion_len: int = _h("tokens per completion at most", default=16)
    temperature: float = _h("sampling temperature of the rollouts", default=1.0)
    epsilon: float = _h("clip range of the policy ratio", default=0.2)
    rewards: list[str] = _h("grpo reward functions: exact_answer, final_answer, integer_format or module:function",
                            default_factory=lambda: ["exact_answer"])
    reward_weights: list[float] | None = _h("one weight per reward function (default 1 each)", default=None)
    eval_reward: str | None = _h("grpo: the rule of held-out exact match, a reward function that gives 1.0 to a "
                                 "right answer (exact_answer; final_answer for arithmetic_steps); default: "
                                 "final_answer when it is among --rewards, else exact_answer", default=None)
    eval_samples: int = _h("grpo: samples per held-out prompt for the sampled exact match (0 = greedy only)",
                           default=4)
    scale_rewards: bool = _h("grpo: divide advantages by the group std (False = Dr. GRPO)", default=True)
    # ---- PPO
    reward_model: str | None = _h("ppo: the reward model run dir (from `lmstack align rm`)", default=None)
    kl_coef: float = _h("ppo: per-token KL penalty to the reference (the start, with kl_target)", default=0.05)
    kl_target: float | None = _h("ppo: adapt kl_coef toward this KL per response, nats (None = fixed)", default=None)
    kl_horizon: int = _h("ppo: the adaptive KL controller's horizon, in responses", default=10000)
    gamma: float = _h("ppo: discount", default=1.0)
    lam: float = _h("ppo: GAE lambda", default=0.95)
    ppo_epochs: int = _h("ppo: epochs over each rollout batch", default=4)
    vf_coef: float = _h("ppo: value loss weight", default=0.1)
    cliprange_value: float = _h("ppo: value clip range", default=0.2)
    # ---- LoRA
    lora_r: int = _h("train LoRA adapters of this rank instead of every weight (0 = full)", default=0)
    lora_alpha: float = _h("LoRA alpha", default=16.0)
    lora_targets: list[str] = _h("LoRA target roles", default_factory=lambda: ["q", "v"])
    # ---- trainer
    max_steps: int = _h("optimizer steps", default=100)
    batch_size: int = _h("pairs (rm, dpo) or sequences (grpo, ppo) per micro-batch per rank", default=8)
    grad_accum: int = _h("micro-batches per optimizer step", default=1)
    lr: float = _h("peak learning rate", default=1e-5)
    warmup_steps: int = _h("linear warmup steps", default=0)
    schedule: str = _h("lr schedule (see lmstack train)", default="cosine")
    min_lr_ratio: float = _h("final lr as a fraction of the peak", default=1.0)
    weight_decay: float = _h("AdamW weight decay", default=0.0)
    grad_clip: float = _h("clip the global grad norm (0 = off)", default=1.0)
    eval_every: int = _h("held-out evaluation every N steps (0 = only at the end)", default=25)
    ckpt_every: int = _h("checkpoint every N steps (0 = only at the end)", default=0)
    seed: int = _h("random seed", default=0)
    device: str = _h("auto | cpu | cuda | cuda:N", default="auto")
    dtype: str = _h("auto | float32 | bfloat16", default="auto")
    resume: bool = _h("continue from the latest checkpoint in out/checkpoints", default=False)
    n_samples: int = _h("held-out prompts shown before/after in samples.md", default=4)
    train_overrides: dict = _h("more TrainConfig fields", default_factory=dict)

    def __post_init__(self) -> None:
        def bad(name: str, why: str):
            raise ValueError(f"{name}={getattr(self, name)!r}: {why}")
        if self.method not in METHODS:
            bad("method", f"valid: {', '.join(METHODS)}")
        if self.format not in FORMATS:
            bad("format", f"valid: {', '.join(FORMATS)}")
        if self.beta is None:
            self.beta = 0.1 if self.method == "dpo" else 0.0
        if self.loss_type is None:
            self.loss_type = {"dpo": "sigmoid", "grpo": "grpo"}.get(self.method)
        valid = {"dpo": DPO_LOSS_TYPES, "grpo": GRPO_LOSS_TYPES}.get(self.method)
        if valid and self.loss_type not in valid:
            bad("loss_type", f"valid for {self.method}: {', '.join(valid)}")
        if self.method == "dpo" and not self.beta > 0:
            bad("beta", "DPO needs beta > 0")
        if self.beta < 0:
            bad("beta", "must be >= 0")
        for name in ("group_size", "prompts_per_rollout", "num_iterations", "max_completion_len", "ppo_epochs",
                     "max_steps", "batch_size", "grad_accum", "n_train", "n_eval"):
            if getattr(self, name) < 1:
                bad(name, "must be >= 1")
        if self.eval_reward is None:
            self.eval_reward = "final_answer" if "final_answer" in self.rewards else "exact_answer"
        if self.eval_samples < 0:
            bad("eval_samples", "must be >= 0")
        if self.method == "grpo" and self.group_size < 2:
            bad("group_size", "GRPO needs >= 2 samples per prompt")
        if not self.temperature > 0:
            bad("temperature", "must be > 0")
        if not 0 < self.epsilon < 1:
            bad("epsilon", "must be in (0, 1)")
        if self.kl_target is not None and not self.kl_target > 0:
            bad("kl_target", "must be > 0 nats (or unset for a fixed kl_coef)")
        if self.kl_horizon < 1:
            bad("kl_horizon", "must be >= 1")
        if not self.kl_coef >= 0:
            bad("kl_coef", "must be >= 0")
        if self.method == "ppo" and not self.reward_model:
            bad("reward_model", "PPO needs --reward-model RUN (train one with `lmstack align rm`)")
        if self.lora_r < 0:
            bad("lora_r", "must be >= 0 (0 = full finetuning)")
        if not self.model:
            bad("model", "give the starting model (a run dir or a HF folder)")
