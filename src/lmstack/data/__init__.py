"""Floor 2: text corpora -> cleaned, deduplicated, split documents -> token shards -> batches.

    from lmstack.data import CorpusOptions, build_corpus, iter_texts, write_shards, ShardSet, PackedSampler
    build_corpus(CorpusOptions(corpus="tinyworld", out="data/tw", size_mb=2.0))
    write_shards("data/tw", tokenizer)
    x, y = PackedSampler(ShardSet("data/tw/shards", "train"), batch_size=8, seq_len=256).next_batch()

Modules: corpora (Shakespeare, files, JSONL, HF datasets), tinyworld (+ _world, _tasks: the
synthetic corpus), clean (normalize, noise), dedupe (MinHash/LSH), build (the DIR layout),
shards (token memmaps), packing (PackedSampler: packed, resumable batches), chat_examples
(SFT and preference examples with assistant-only loss masks, from chats or JSONL).
"""
from lmstack.data.build import CorpusOptions, build_corpus, iter_texts, read_jsonl
from lmstack.data.chat_examples import (IGNORE_INDEX, ChatExampleError, ChatExampleOptions, PreferenceExample,
                                        SFTExample, load_preference_jsonl, load_sft_jsonl, preference_example,
                                        preference_examples, prompt_response_example, read_chat_jsonl,
                                        sft_example, sft_examples)
from lmstack.data.corpora import shakespeare_texts
from lmstack.data.packing import PackedSampler
from lmstack.data.shards import ShardSet, tokenize_corpus, write_shards

__all__ = ["CorpusOptions", "build_corpus", "iter_texts", "read_jsonl", "write_shards", "ShardSet",
           "PackedSampler", "shakespeare_texts", "tokenize_corpus",
           "IGNORE_INDEX", "ChatExampleError", "ChatExampleOptions", "SFTExample", "PreferenceExample",
           "sft_example", "prompt_response_example", "preference_example", "sft_examples",
           "preference_examples", "read_chat_jsonl", "load_sft_jsonl", "load_preference_jsonl"]
