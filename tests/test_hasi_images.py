"""HASI on a LLaVA whose previews all start with an image: every image position reaches the statistics (METHOD.md
2.2: the common prefix is a text rule and ends at the first image token)."""
import json

import yaml

from run_fixtures import launch, make_run


def test_image_first_previews_count_every_image_position(tmp_path):
    config = make_run(tmp_path, llava=True, train__max_steps=1)
    cfg = yaml.safe_load(config.read_text())
    cfg["data"]["sources"] = [s for s in cfg["data"]["sources"] if s["path"].endswith("look.json")]
    config.write_text(yaml.safe_dump(cfg))
    proc = launch(config, 0)
    allocation = json.loads((tmp_path / "out" / "allocation.json").read_text())

    from thanora_ds.data import DataConfig, build_multitask_data
    from thanora_ds.hasi import common_prefix_length
    from transformers import AutoProcessor
    processor = AutoProcessor.from_pretrained(cfg["model"]["path"])
    data = build_multitask_data(DataConfig.from_dict(cfg["data"], tmp_path), processor=processor)
    previews = [ex["input_ids"] for ex in data.preview["look"]]
    image = processor.image_token_id
    first_image = previews[0].index(image)
    assert all(ids.index(image) == first_image for ids in previews)          # every preview starts with its image
    assert common_prefix_length(previews) > first_image                       # the old rule swallowed the image
    assert f"HASI: prefix {first_image} tokens" in proc.stderr
    # the content tokens of every preview, image positions included, reached the statistics
    assert allocation["token_counts"] == [sum(len(ids) - first_image for ids in previews)]
