import pytest
from transformers import AutoConfig, CLIPConfig

from modeling_mrovseg import CLIP_PRESETS, VILD_TEMPLATES, MROVSegConfig
from tests.helpers import tiny_config


def test_defaults_follow_the_design():
    config = MROVSegConfig.from_preset("vit-b-16")
    assert config.model_type == "mrovseg"
    assert config.feature_layers == [3, 6, 9] and config.query_layer == 9
    assert config.slice_size == 224 and config.slice_overlap == 0 and config.patch_size == 16
    assert config.hidden_dim == 256 and config.num_queries == 100 and config.num_decoder_layers == 3
    assert config.prompt_templates == list(VILD_TEMPLATES) and len(VILD_TEMPLATES) == 14
    assert (config.class_weight, config.mask_weight, config.dice_weight, config.no_object_weight) == (2.0, 5.0, 5.0, 0.1)
    assert (config.train_num_points, config.oversample_ratio, config.importance_sample_ratio,
            config.balanced_sample_ratio) == (12544, 3.0, 0.75, 0.1)
    assert config.use_high_res and config.use_scale_attention and config.use_local_mask


@pytest.mark.parametrize("name,layers,slice_size,patch", [
    ("vit-b-16", [3, 6, 9], 224, 16), ("vit-l-14", [6, 12, 18], 224, 14), ("vit-l-14-336", [6, 12, 18], 336, 14),
])
def test_presets_without_download(name, layers, slice_size, patch):
    config = MROVSegConfig.from_preset(name)
    assert config.feature_layers == layers and config.query_layer == layers[-1]
    assert config.slice_size == slice_size and config.vision_config.patch_size == patch
    assert config.projection_dim == CLIP_PRESETS[name]["projection_dim"]


def test_from_clip_config():
    clip = CLIPConfig(vision_config=dict(num_hidden_layers=24, patch_size=14, hidden_size=64, num_attention_heads=4,
                                         intermediate_size=128), projection_dim=48)
    config = MROVSegConfig.from_clip_config(clip, num_queries=10)
    assert config.feature_layers == [6, 12, 18] and config.projection_dim == 48 and config.num_queries == 10


def test_round_trip_and_auto_config(tmp_path):
    config = tiny_config(slice_overlap=16, use_scale_attention=False)
    config.save_pretrained(tmp_path)
    for loaded in (MROVSegConfig.from_pretrained(tmp_path), AutoConfig.from_pretrained(tmp_path)):
        assert isinstance(loaded, MROVSegConfig)
        assert loaded.to_diff_dict() == config.to_diff_dict()
        assert loaded.id2label == {0: "sky", 1: "road", 2: "car"} and loaded.label2id["car"] == 2
        assert loaded.vision_config.hidden_size == 64 and loaded.slice_overlap == 16


@pytest.mark.parametrize("overrides,field,allowed", [
    (dict(feature_layers=[1, 4]), "feature_layers", "[0, 3]"),
    (dict(feature_layers=[2, 1]), "feature_layers", "increasing"),
    (dict(feature_layers=[]), "feature_layers", "at least one"),
    (dict(feature_layers=[1, 3], query_layer=2), "query_layer", "[3, 3]"),
    (dict(query_layer=4), "query_layer", "[3, 3]"),
    (dict(slice_overlap=64), "slice_overlap", "[0, 63]"),
    (dict(slice_overlap=-8), "slice_overlap", "[0, 63]"),
    (dict(slice_overlap=12), "slice_overlap", "multiple of the patch size 8"),
    (dict(slice_size=60), "slice_size", "multiple of the patch size 8"),
    (dict(slice_batch_size=0), "slice_batch_size", ">= 1"),
    (dict(adapter_kernel_size=4), "adapter_kernel_size", "odd"),
    (dict(hidden_dim=30), "hidden_dim", "multiple of num_decoder_heads"),
    (dict(pixel_decoder_channels=[8, 8]), "pixel_decoder_channels", "3 positive widths"),
    (dict(mask_decoder_channels=[8, 8]), "pixel_decoder_channels", "3 positive widths"),  # the field's old name
    (dict(num_queries="8"), "num_queries", "integer"),
    (dict(class_weight=float("nan")), "class_weight", "finite"),
    (dict(use_local_mask="no"), "use_local_mask", "true or false"),
    (dict(prompt_templates=["a {x} of {}"]), "prompt_templates", "no other placeholder"),
    (dict(prompt_templates=["a {} {}"]), "prompt_templates", "exactly one"),
    (dict(prompt_templates="a photo of a {}."), "prompt_templates", "list of strings"),
    (dict(high_res_encoding="tiles"), "high_res_encoding", "slices"),
    (dict(id2label={0: "a", 2: "b"}, label2id={"a": 0, "b": 2}), "id2label", "without gaps"),
    (dict(id2label={0: "a", 1: "b"}, label2id={"a": 1, "b": 0}), "label2id", "not the inverse"),
    (dict(num_queries=0), "num_queries", ">= 1"),
    (dict(no_object_weight=-1.0), "no_object_weight", ">= 0"),
    (dict(oversample_ratio=0.5), "oversample_ratio", ">= 1"),
    (dict(importance_sample_ratio=1.5), "importance_sample_ratio", "[0, 1]"),
    (dict(balanced_sample_ratio=1.5), "balanced_sample_ratio", "[0, 1]"),
    (dict(prompt_templates=["a photo"]), "prompt_templates", "'{}' slot"),
])
def test_validation_names_field_and_range(overrides, field, allowed):
    with pytest.raises(ValueError) as error:
        tiny_config(**overrides)
    assert f"MROVSegConfig.{field}=" in str(error.value) and allowed in str(error.value)


def test_unknown_preset_and_unknown_fields():
    with pytest.raises(ValueError, match="Unknown preset"):
        MROVSegConfig.from_preset("vit-h-14")
    # the builders take fields only: a config stores any other keyword and the model would use the default
    with pytest.raises(TypeError, match=r"no field\(s\) num_querys \(did you mean num_queries\?\)"):
        MROVSegConfig.from_preset("tiny", num_querys=50)
    with pytest.raises(TypeError, match="no field"):
        MROVSegConfig.from_clip_config(MROVSegConfig.from_preset("tiny").to_dict(), slice_sise=224)
    assert MROVSegConfig.from_preset("tiny", num_queries=50, id2label={0: "a"}, label2id={"a": 0}).num_queries == 50
    # built directly, a config keeps other keywords (what transformers saves beside the fields), but not one near a
    # field's name
    with pytest.raises(TypeError, match=r"logit_scale_init_value \(did you mean logit_scale_init\?\)"):
        MROVSegConfig(logit_scale_init_value=2.0)
    assert MROVSegConfig(architectures=["MROVSegForOpenVocabSegmentation"], note="mine").note == "mine"


def test_unlabelled_value_stays_outside_the_class_ids():
    """255 is a class of an 847-class vocabulary: unlabelled becomes 65535 (and back with a small vocabulary); a custom
    ignore_index that is a class id is an error."""
    from modeling_mrovseg import MROVSegConfig

    def config(num_classes, **kwargs):
        names = [f"class {i}" for i in range(num_classes)]
        return MROVSegConfig(id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)}, **kwargs)

    assert config(171).ignore_index == 255 and config(255).ignore_index == 255 and config(847).ignore_index == 65535
    assert config(3, ignore_index=65535).ignore_index == 255  # a conventional value follows the vocabulary
    assert config(3, ignore_index=7).ignore_index == 7
    with pytest.raises(ValueError, match="ignore_index.*is a class id of the 10-class vocabulary"):
        config(10, ignore_index=5)


def test_the_transformers_version_check_reads_release_numbers(monkeypatch):
    import re
    import sys

    from modeling_mrovseg.configuration_mrovseg import check_transformers_version

    # a failed check drops its module from sys.modules (for transformers' loader): put it back afterwards
    name = "modeling_mrovseg.configuration_mrovseg"
    monkeypatch.setitem(sys.modules, name, sys.modules[name])

    for version in ("5.21.0", "5.24.0", "5.25.0.dev0", "6.0.0rc1", "a local build"):
        check_transformers_version(version)
    for version in ("5.20.2", "4.57.6", "5.3.0"):
        with pytest.raises(ImportError, match=f"needs transformers 5.21 or newer, and this Python has transformers "
                                              f"{re.escape(version)}"):
            check_transformers_version(version)
