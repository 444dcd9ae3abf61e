"""Pivotal tuning (`--pivotal N`): the trigger becomes N new tokens in every CLIP text encoder, learnt together with
the LoRA (diffusers' advanced DreamBooth script, cog-sdxl, OneTrainer), so that the subject lives in a word of its
own instead of in every prompt's text-encoder weights.

- Which encoders: the CLIP ones (SD 1.x/2.x: its one encoder; SDXL and SD 3.x: CLIP-L and bigG; FLUX.1: CLIP-L).
  T5-XXL (SD 3.x, FLUX.1) keeps reading the plain trigger word: it stays frozen with its outputs cached (training
  through it would need its 4.7 B weights in the backward), A1111 does not run those families, and no embedding
  file layout ComfyUI or diffusers read carries a T5 vector for it.
- How: `sdlora.lora.tokens` (a separate parameter in front of the untouched embedding table: the rest of the
  vocabulary cannot move; the tokenizer gets the new tokens on a copy).
- Start: the embeddings of `--pivotal-init` (default: the class prompt); the last N of its tokens, repeated when it
  has fewer.
- Schedule: their own learning rate (`--pivotal-lr`, no weight decay: decay would shrink a word's vector towards
  zero, which no other token of the vocabulary is); `--pivotal-steps S` trains only them for S steps, then only the
  LoRA, by gating each parameter group's learning rate in the run's schedule.
"""

from __future__ import annotations

import torch

from sdlora.config import TrainConfig
from sdlora.errors import SdloraError
from sdlora.lora import tokens as T

TOKENS_GROUP = "sdlora_tokens"  # marks the optimizer's parameter group of the new tokens


def encoders(cfg: TrainConfig, model) -> dict:
    """{component: text encoder} of the encoders that learn new tokens (none without --pivotal)."""
    if not cfg.pivotal:
        return {}
    return {c: model.tes[c] for c in model.base.spec.trainable_te_components}


def check_trigger(trigger: str, tokenizers: dict) -> None:
    """Refuse a trigger the tokenizer already reads as one token: its new tokens would replace that word of the
    vocabulary in every prompt (and diffusers' loader refuses a name in the vocabulary)."""
    for c, tok in tokenizers.items():
        ids = tok(trigger, add_special_tokens=False).input_ids
        if len(ids) == 1 or trigger in tok.get_vocab():
            raise SdloraError(f"--pivotal: the trigger {trigger!r} is already one token of the vocabulary "
                              f"({tok.convert_ids_to_tokens(ids[0])!r} of {c}); pivotal tuning learns a new word: pick "
                              "one the tokenizer splits into pieces, e.g. 'ohwx'")


def init_vectors(text: str, tokenizer, te, n: int) -> torch.Tensor:
    """[n, width]: the input embeddings of `text`'s last n tokens (repeated in order when it has fewer)."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if not ids:
        raise SdloraError(f"--pivotal-init {text!r} has no tokens; give a word, e.g. 'dog'")
    ids = ids[-n:] if len(ids) >= n else [ids[i % len(ids)] for i in range(n)]
    weight = te.get_input_embeddings().weight
    return weight[torch.tensor(ids, device=weight.device)].detach().float().cpu()


def attach(cfg: TrainConfig, model, say) -> T.Attached | None:
    """The new tokens of the run, attached to the base model's CLIP encoders (None without --pivotal)."""
    if not cfg.pivotal:
        return None
    base = model.base
    encs = encoders(cfg, model)
    clips = [t for t in base.spec.text_encoders if t.component in encs]
    check_trigger(cfg.trigger, {t.component: base.tokenizers[t.tokenizer_attr] for t in clips})
    init = cfg.pivotal_init or cfg.class_prompt
    vecs = {t.component: init_vectors(init, base.tokenizers[t.tokenizer_attr], encs[t.component], cfg.pivotal)
            for t in clips}
    attached = T.Attached(base, clips, {cfg.trigger: vecs})
    frozen = [t.component for t in base.spec.text_encoders if t.component not in encs]
    say(f"pivotal: '{cfg.trigger}' is {cfg.pivotal} new token(s) ({', '.join(T.token_names(cfg.trigger, cfg.pivotal))}"
        f") in {', '.join(encs)}, starting from '{init}'; lr {cfg.pivotal_lr:g}"
        + (f", alone for the first {cfg.pivotal_steps} steps, then frozen while the LoRA trains"
           if cfg.pivotal_steps else ", with the LoRA")
        + (f"; {', '.join(frozen)} (T5-XXL) reads the plain word" if frozen else ""))
    return attached


def param_groups(cfg: TrainConfig, attached: T.Attached | None) -> list[dict]:
    if attached is None:
        return []
    return [{"params": list(attached.params.values()), "lr": cfg.pivotal_lr, "weight_decay": 0.0,
             TOKENS_GROUP: True}]


def split_phases(cfg: TrainConfig, lr_scheduler, processes: int) -> None:
    """--pivotal-steps S: the new tokens train alone for S steps, then the LoRA alone. The schedule's own factor
    (warmup, decay) is kept and multiplied by 0 or 1 per group. `processes`: the schedule steps once per process
    and optimizer step (as `trainable.prepare_optimizer` builds it)."""
    if not cfg.pivotal or not cfg.pivotal_steps:
        return
    if not isinstance(lr_scheduler, torch.optim.lr_scheduler.LambdaLR):
        raise SdloraError(f"--pivotal-steps needs a step-wise learning-rate schedule; --lr-scheduler "
                          f"{cfg.lr_scheduler} gives none")
    switch = cfg.pivotal_steps * processes
    opt = lr_scheduler.optimizer
    gated = []
    for g, f in zip(opt.param_groups, lr_scheduler.lr_lambdas):
        if g.get(TOKENS_GROUP):
            gated.append(lambda s, f=f: f(s) * (s < switch))
        else:
            gated.append(lambda s, f=f: f(s) * (s >= switch))
    lr_scheduler.lr_lambdas = gated
    # the schedule set the first step's rates when it was built: set them again with the gates
    for g, base_lr, f in zip(opt.param_groups, lr_scheduler.base_lrs, gated):
        g["lr"] = base_lr * f(lr_scheduler.last_epoch)
    lr_scheduler._last_lr = [g["lr"] for g in opt.param_groups]

