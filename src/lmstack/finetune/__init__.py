"""Floor 3: finetuning. LoRA / QLoRA adapters (add, train, merge) and PEFT-format adapter files.

    from lmstack.finetune import LoraConfig, add_lora, load_adapter, save_adapter, merge_lora
    model = Transformer.from_pretrained(run_or_hf_dir)
    add_lora(model, LoraConfig(r=8, alpha=16, dropout=0.0, targets=["q", "v"]))   # or "all-linear"
    load_adapter(model, peft_dir)      # made by us or by PEFT
    save_adapter(model, out_dir)       # PEFT format
    merge_lora(model)                  # folds B @ A * scale into the base weights
"""
from lmstack.finetune.lora import LoraConfig, LoraError, add_lora, lora_modules, merge_lora
from lmstack.finetune.adapters import base_fingerprint, load_adapter, save_adapter

__all__ = ["LoraConfig", "LoraError", "add_lora", "merge_lora", "lora_modules", "load_adapter", "save_adapter",
           "base_fingerprint"]
