"""Floor 3: weight-only quantization. Algorithms here, the modules a quantized model computes
with at floor 1 (lmstack.model.quantized), so the engine loads quantized runs.

    from lmstack.quant import QuantConfig, quantize_model
    quantize_model(model, QuantConfig(method="rtn", bits=4, group_size=64))
    quantize_model(model, QuantConfig(method="nf4"))                      # QLoRA's NF4
    quantize_model(model, QuantConfig(method="gptq", bits=4), calib=text, tokenizer=tok)
    quantize_model(model, QuantConfig(method="awq", bits=4, group_size=64), calib=ids)

  config.py    QuantConfig (validated settings)
  rtn.py       uniform INT grids: scales, zero points, round-to-nearest
  nf4.py       NF4 + double quantization, byte-compatible with bitsandbytes
  gptq.py      GPTQ's error-compensating column loop
  awq.py       AWQ's activation-aware per-channel scale search
  calib.py     calibration windows and the block-by-block runner
  quantize.py  quantize_model: the "quant" transform
  qat.py       quantization-aware training: FakeQuantLinear (STE), prepare_qat, QAT (the
               trainer's model transform), convert_qat
  prune.py     magnitude and 2:4 pruning (the "prune" transform), masks held in recovery finetunes
  (distillation, a teacher's logits as the Trainer's target: lmstack.train.distill)
"""
from lmstack.model.quantized import IntLinear, NF4Linear, QuantError, QuantLinear
from lmstack.quant.awq import awq_search
from lmstack.quant.config import QuantConfig
from lmstack.quant.gptq import gptq_quantize
from lmstack.quant.nf4 import quantize_nf4
from lmstack.quant.quantize import quantize_model
from lmstack.quant.prune import PruneConfig, hold_masks, prune_model
from lmstack.quant.qat import QAT, FakeQuantLinear, convert_qat, prepare_qat
from lmstack.quant.rtn import fake_quantize, rtn_quantize

__all__ = ["QuantConfig", "quantize_model", "QuantError", "QuantLinear", "IntLinear", "NF4Linear",
           "rtn_quantize", "fake_quantize", "quantize_nf4", "gptq_quantize", "awq_search",
           "FakeQuantLinear", "QAT", "prepare_qat", "convert_qat", "PruneConfig", "prune_model", "hold_masks"]
