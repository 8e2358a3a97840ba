"""Export a model to formats other tools run: GGUF (llama.cpp) and Hugging Face folders.

    from lmstack.quant.export import export_gguf, export_hf_folder
    export_gguf(model, tokenizer, "model-q4_0.gguf", type="q4_0")       # llama.cpp, ollama, LM Studio
    export_hf_folder(model, "hf_out/", tokenizer=tokenizer)            # transformers (+ bitsandbytes)

  ggml_blocks.py  GGML's F32 / F16 / Q8_0 / Q4_0 encodings, byte-exact with ggml's reference
  gguf_file.py    the GGUF v3 container: typed metadata, tensor infos, aligned streamed data
  gguf_llama.py   model + tokenizer -> the `llama` architecture's tensors and metadata
  hf_bnb.py       Hugging Face folders; NF4 runs in bitsandbytes' serialized layout
  weights.py      the float weights a (quantized) model computes with; transform checks
"""
from lmstack.quant.export.gguf_llama import GGUF_TYPES, GGUFExport, check_gguf_exportable, export_gguf
from lmstack.quant.export.hf_bnb import export_hf_folder

__all__ = ["GGUF_TYPES", "GGUFExport", "check_gguf_exportable", "export_gguf", "export_hf_folder"]
