"""LoRA baselines with HF peft: one task LoRA on all other users (`task_lora`), and OPPU, One PEFT Per User:
the task LoRA merged into the base, then one fresh LoRA per user trained on that user's history alone.

OPPU's own code never resets its per-user training list (user i trains on users 0..i); here every user starts
from the same initial adapter with a fresh optimizer and sees only its own items."""
from __future__ import annotations

import time

import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

from ..progress import progress
from ..batching import TokenizedExample, make_batch
from ..train.forward import target_loss
from ..train.optim import user_batches


def lora_config(rank: int, alpha: int, targets: str) -> LoraConfig:
    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, bias="none",
                      target_modules=[t.strip() for t in targets.split(",") if t.strip()])


def add_lora(model, rank: int, alpha: int, targets: str, seed: int):
    """Inject a LoRA adapter into `model` in place (base weights frozen); returns the peft wrapper."""
    torch.manual_seed(seed)  # peft draws lora_A from the global generator
    pm = get_peft_model(model, lora_config(rank, alpha, targets))
    return pm


def lora_parameters(pm) -> int:
    return sum(p.numel() for n, p in pm.named_parameters() if "lora_" in n)


def adapter_state(pm) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(pm).items()}


def load_adapter(pm, state: dict[str, torch.Tensor]) -> None:
    res = set_peft_model_state_dict(pm, state)
    bad = getattr(res, "unexpected_keys", [])
    if bad:
        raise ValueError(f"adapter does not fit the model: unexpected keys {bad[:3]}")


def train_lm(model, examples: list[TokenizedExample], *, epochs: int, batch_size: int, lr: float, pad_id: int,
             seed: int, key: str = "", desc: str = "lora") -> dict:
    """Plain fine-tuning of whatever in `model` requires grad: AdamW (no weight decay), seeded shuffles, the loss on
    target tokens only, averaged over the batch's target tokens. The whole model runs every step (what LoRA costs)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    device = params[0].device
    steps = [b for _, b in user_batches(range(len(examples)), epochs, batch_size, seed, key)]
    losses = []
    t0 = time.perf_counter()
    model.train(False)  # no dropout; LoRA dropout is 0 anyway
    bar = progress(steps, desc=desc, leave=False)
    for step in bar:
        rows = [examples[i] for i in step]
        b = make_batch([r.ids for r in rows], [r.prompt_len for r in rows], [0] * len(rows), pad_id, 0, 0).to(device)
        hidden = model.get_decoder()(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids,
                                     use_cache=False).last_hidden_state
        ntok = sum(len(r.ids) - r.prompt_len for r in rows)
        loss, row_sums, _ = target_loss(model, hidden, rows, [off + r.prompt_len - 1 for r, off in zip(rows, b.offsets)],
                                        [1.0 / ntok] * len(rows))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(row_sums.sum()) / max(ntok, 1))
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    return {"steps": len(steps), "first_loss": losses[0] if losses else float("nan"),
            "last_loss": losses[-1] if losses else float("nan"), "seconds": time.perf_counter() - t0}
