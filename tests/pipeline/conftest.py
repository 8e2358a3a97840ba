"""One micro `lmstack run` of every default stage (pretrain to the measure and rag stages), shared by
test_pipeline_e2e.py and test_chat_pipeline.py: the whole main job once, in seconds."""
import pytest
import yaml

from lmstack.cli.main import main

MICRO = {
    "size_mb": 0.1, "vocab_size": 300, "max_steps": 20, "batch_size": 4, "seq_len": 32, "lr": 0.01,
    "model_config": {"n_layer": 1, "n_embd": 32, "n_head": 2, "n_kv_head": 2, "context_length": 512},
    "train_config": {"eval_every": 10, "ckpt_every": 0, "tensorboard": False, "eval_batches": 1,
                     "warmup_steps": 2},
    "eval_max_tokens": 2000, "probe_limit": 2, "sample_max_tokens": 8,
    # the chat stages: a few steps each (their effects at real sizes are the README's measured run)
    "sft_config": {"max_steps": 3, "batch_size": 4, "seq_len": 500, "truncate": True, "per_task": 4,
                   "tinyworld_mb": 0.1, "warmup_steps": 1, "ckpt_every": 0},
    "dpo_config": {"n_train": 16, "n_eval": 8, "max_steps": 2, "batch_size": 4},
    "grpo_config": {"n_train": 8, "n_eval": 4, "max_steps": 2, "batch_size": 8, "grad_accum": 1,
                    "prompts_per_rollout": 2, "group_size": 4},
    "quant_config": {"group_size": 32, "calib_samples": 2, "calib_seq_len": 32},
    "measure_probes": 1, "measure_pairs": 8, "measure_arith": 4, "rag_questions": 4,
}


@pytest.fixture(scope="session")
def micro_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    recipe = root / "micro.yaml"
    recipe.write_text(yaml.safe_dump(MICRO))
    argv = ["run", "--recipe", str(recipe), "--out-dir", str(root), "--name", "micro"]
    assert main(argv) == 0
    return root / "micro", argv
