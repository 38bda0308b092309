"""The metadata says each LoRA type as kohya sd-scripts and LyCORIS write it, so A1111 and civitai show the right type.

kohya: `ss_network_module` is the module `create_network` came from (networks/lora.py, networks/dylora.py) and
`ss_network_args` its `--network_args` as strings; LyCORIS (lycoris/kohya.py) is `lycoris.kohya` with `algo`.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest
from conftest import small_raw_config

from lora_trainer.config.load import parse_config
from lora_trainer.config.network import NetworkConfig
from lora_trainer.export.metadata import BaseModel, Progress, kohya_network_args, lora_metadata, network_module_metadata

BLOCK_DIMS = [0, 0, 4, 4, 0, 8, 8, 0, 8, 8, 8, 8, 8, 8, 8, 8, 4, 4, 4, 2, 2, 2, 0]
CONV_BLOCK_DIMS = [0, 0, 2, 2, 0, 2, 2, 0, 2, 2, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2, 2, 0]

# (network settings, ss_network_module, ss_network_args)
TYPES = [
    ({"type": "lora"}, "networks.lora", {}),
    ({"type": "lora", "rank_dropout": 0.1, "module_dropout": 0.25}, "networks.lora", {"rank_dropout": "0.1", "module_dropout": "0.25"}),
    ({"type": "locon"}, "networks.lora", {"conv_dim": "8", "conv_alpha": "4.0"}),
    ({"type": "locon", "conv_rank": 4, "conv_alpha": 1}, "networks.lora", {"conv_dim": "4", "conv_alpha": "1.0"}),
    (
        {"type": "locon", "conv_rank": 2, "block_dims": BLOCK_DIMS, "block_alphas": [2.0] * 23, "conv_block_dims": CONV_BLOCK_DIMS,
         "conv_block_alphas": [1.5] * 23},
        "networks.lora",
        {"conv_dim": "2", "conv_alpha": "4.0", "block_dims": "0,0,4,4,0,8,8,0,8,8,8,8,8,8,8,8,4,4,4,2,2,2,0",
         "block_alphas": ",".join(["2.0"] * 23), "conv_block_dims": "0,0,2,2,0,2,2,0,2,2,0,0,0,2,2,2,2,2,2,2,2,2,0",
         "conv_block_alphas": ",".join(["1.5"] * 23)},
    ),
    ({"type": "dylora", "dylora_unit": 2}, "networks.dylora", {"unit": "2"}),
    ({"type": "dylora", "conv_rank": 4}, "networks.dylora", {"unit": "1", "conv_dim": "4", "conv_alpha": "4.0"}),
    ({"type": "dora"}, "lycoris.kohya", {"algo": "lora", "preset": "attn-mlp", "dora_wd": "True", "wd_on_output": "True"}),
    (
        {"type": "dora", "conv_rank": 4, "conv_alpha": 2, "dropout": 0.1},
        "lycoris.kohya",
        {"algo": "locon", "dora_wd": "True", "wd_on_output": "True", "dropout": "0.1", "conv_dim": "4", "conv_alpha": "2.0"},
    ),
    ({"type": "loha"}, "lycoris.kohya", {"algo": "loha", "preset": "attn-mlp"}),
    (
        {"type": "loha", "conv_rank": 4, "rank_dropout": 0.1, "module_dropout": 0.2},
        "lycoris.kohya",
        {"algo": "loha", "conv_dim": "4", "conv_alpha": "4.0", "rank_dropout": "0.1", "module_dropout": "0.2"},
    ),
    ({"type": "lokr"}, "lycoris.kohya", {"algo": "lokr", "preset": "attn-mlp", "factor": "-1"}),
    (
        {"type": "lokr", "lokr_factor": 8, "lokr_decompose_both": True, "lokr_full_matrix": True, "conv_rank": 4},
        "lycoris.kohya",
        {"algo": "lokr", "factor": "8", "decompose_both": "True", "full_matrix": "True", "conv_dim": "4", "conv_alpha": "4.0"},
    ),
]


@pytest.mark.parametrize("settings, module, args", TYPES, ids=[json.dumps(settings) for settings, _, _ in TYPES])
def test_each_type_is_written_as_kohya_or_lycoris_writes_it(settings, module, args):
    network = NetworkConfig(rank=8, alpha=4, **settings)
    metadata = network_module_metadata(network)
    assert set(metadata) == {"ss_network_module", "ss_network_args", "lora_train_network_type"}
    assert (metadata["ss_network_module"], metadata["lora_train_network_type"]) == (module, settings["type"])
    assert json.loads(metadata["ss_network_args"]) == args


def test_type_arguments_join_the_block_weights_and_loraplus():
    network = NetworkConfig(type="dora", conv_rank=4, up_lr_weight="linear", loraplus_lr_ratio=16)
    assert kohya_network_args(network) == {
        "algo": "locon", "dora_wd": "True", "wd_on_output": "True", "conv_dim": "4", "conv_alpha": "16.0",
        "up_lr_weight": "linear", "loraplus_lr_ratio": "16.0",
    }


def test_a_saved_files_metadata_names_the_type_and_keeps_rank_and_alpha(tmp_path):
    raw = small_raw_config(tmp_path)
    raw["network"].update(type="lokr", rank=8, alpha=3, lokr_factor=4)
    config = parse_config(raw)
    metadata = lora_metadata(config, [], [], Progress(0, 0, datetime.now(timezone.utc)), BaseModel("base", "epsilon"))
    assert metadata["ss_network_module"] == "lycoris.kohya"
    assert json.loads(metadata["ss_network_args"]) == {"algo": "lokr", "preset": "attn-mlp", "factor": "4"}
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"]) == ("8", "3.0")
    assert metadata["lora_train_network_type"] == "lokr"
    assert all(isinstance(value, str) for value in metadata.values())
